"""
The real DeepSpeed behind the trainer's engine seam (zero_lite.Engine's interface), so that
`--engine=deepspeed` trains the same run as the native engine and the two compare on it.

Here is everything DeepSpeed: importing it (only for --engine=deepspeed, so the native path never
needs it), adopting a user's DeepSpeed JSON (its fields that options also set must agree with
them), generating the config from the options, and the adapter class.
"""
import contextlib
import json
import logging
import os
import warnings

import torch
import torch.distributed as dist

from options import CHOICES, OPTIONS, RANGES, OptionError, convert

ROOT = os.path.dirname(os.path.abspath(__file__))


def import_deepspeed():
    """DeepSpeed is imported for --engine=deepspeed only: the native path never needs it installed."""
    # The shared-memory op that DeepSpeed compiles with g++ at its first initialize (~100 s) is prebuilt
    # by setup.sh into this cache, so runs and tests find it there.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, ".cache", "torch_extensions"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # rather than a warning that it guessed so
    try:
        import deepspeed
    except ImportError:
        raise OptionError("--engine=deepspeed needs DeepSpeed, which is not installed: run bash setup.sh, or "
                          "pip install deepspeed==0.19.8 into the environment that already has torch") from None
    deepspeed.utils.logger.setLevel(logging.WARNING)
    return deepspeed


def adopt_options(cfg, explicit, world, device):
    """--engine=deepspeed: adopts a --deepspeed_config JSON's settings into cfg, refuses what DeepSpeed
    cannot run here, and imports DeepSpeed, all before any data is prepared."""
    if cfg["deepspeed_config"]:
        adopt_deepspeed_config(cfg, explicit, world)
    if cfg["dtype"] == "float16" and device.type == "cpu":
        raise OptionError("--engine=deepspeed --dtype=float16 needs a GPU (DeepSpeed's fp16 mode does not run on "
                          "the CPU); use --dtype=bfloat16")
    import_deepspeed()


def read_deepspeed_json(path):
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise OptionError(f"--deepspeed_config={path} cannot be read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise OptionError(f"--deepspeed_config={path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise OptionError(f"--deepspeed_config={path} must hold a JSON object, not {type(config).__name__}")
    check_field_types(config, path)
    return config


# The JSON fields that the trainer reads or adds to, by the type they must have.
JSON_OBJECTS = ("zero_optimization", "zero_optimization.offload_optimizer", "fp16", "bf16", "torch_autocast")
JSON_BOOLEANS = ("fp16.enabled", "bf16.enabled", "torch_autocast.enabled")
JSON_INTEGERS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                 "zero_optimization.stage", "fp16.initial_scale_power")


def check_field_types(config, path):
    """A field the trainer reads, of another type than DeepSpeed's (a list for a section, say), is one
    sentence naming it here rather than a TypeError inside the trainer or DeepSpeed."""
    for fields, wanted, kind in ((JSON_OBJECTS, dict, "a JSON object"), (JSON_BOOLEANS, bool, "true or false"),
                                 (JSON_INTEGERS, int, "an integer")):
        for field in fields:
            value = json_field(config, field)
            if value is not None and (not isinstance(value, wanted) or wanted is int and isinstance(value, bool)):
                raise OptionError(f"--deepspeed_config={path}: {field} must be {kind}, not {type(value).__name__}")


def json_field(config, dotted):
    """config["a"]["b"] for "a.b"; None where a part is missing."""
    for key in dotted.split("."):
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def json_dtype(config):
    """The --dtype that a DeepSpeed config's precision sections mean; None if it sets none."""
    if json_field(config, "fp16.enabled"):
        return "float16"
    if json_field(config, "bf16.enabled") or json_field(config, "torch_autocast.enabled"):
        return "bfloat16"
    return None


# DeepSpeed config fields that trainer options also decide: field -> (option, field value -> option value).
DEEPSPEED_FIELDS = {
    "train_micro_batch_size_per_gpu": ("batch_size", lambda v: v),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", lambda v: v),
    "gradient_clipping": ("grad_clip", lambda v: v),
    "zero_optimization.stage": ("zero_stage", lambda v: v),
    "zero_optimization.offload_optimizer.device": ("offload", lambda v: v != "none"),
    "fp16.initial_scale_power": ("initial_scale_power", lambda v: v),
}


def adopt_deepspeed_config(cfg, explicit, world):
    """A user's DeepSpeed JSON: where it sets what an option also sets, an explicit option must agree
    with it and any other option takes its value, so the trainer (data, logs, checkpoints) and
    DeepSpeed run the same configuration. Fields no option covers pass through to DeepSpeed."""
    path = cfg["deepspeed_config"]
    config = read_deepspeed_json(path)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise OptionError(f"--deepspeed_config={path} has an {section!r} section, but the optimizer and the "
                              f"learning-rate schedule are the trainer's own (AdamW, --lr_scheduler): remove it")
    found = [(field, option, to_option(json_field(config, field)))
             for field, (option, to_option) in DEEPSPEED_FIELDS.items() if json_field(config, field) is not None]
    if json_dtype(config):
        found.append(("fp16/bf16/torch_autocast.enabled", "dtype", json_dtype(config)))
    for field, option, value in found:
        value = convert(option, value, f"--deepspeed_config={path} ({field})", OPTIONS, CHOICES, RANGES)
        if option in explicit and cfg[option] != value:
            raise OptionError(f"--deepspeed_config={path} sets {field} to {value!r} (--{option}) but "
                              f"--{option}={cfg[option]!r} was given")
        cfg[option] = value
    total = cfg["batch_size"] * cfg["gradient_accumulation_steps"] * world
    if json_field(config, "train_batch_size") not in (None, total):
        raise OptionError(f"--deepspeed_config={path} sets train_batch_size={config['train_batch_size']} but "
                          f"--batch_size x --gradient_accumulation_steps x {world} ranks is {total}")


def deepspeed_config(cfg, model):
    """DeepSpeed's config for the run the options describe (after any --deepspeed_config was adopted):
    the same micro-batch, accumulation, clipping, precision and ZeRO stage as the native engine."""
    config = read_deepspeed_json(cfg["deepspeed_config"]) if cfg["deepspeed_config"] else {}
    world = dist.get_world_size() if dist.is_initialized() else 1
    config.update(train_micro_batch_size_per_gpu=cfg["batch_size"], train_batch_size=cfg["batch_size"] * world
                  * cfg["gradient_accumulation_steps"], gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
                  gradient_clipping=cfg["grad_clip"])
    config.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs; DeepSpeed's own prints stay off
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = cfg["zero_stage"]
    if cfg["offload"]:
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        config["zero_force_ds_cpu_optimizer"] = False  # the trainer's own AdamW steps on the CPU copy
    if cfg["zero_stage"] == 3:
        # Shard every parameter, as ZeRO-3 means (DeepSpeed keeps those under 100k elements whole by
        # default), with buckets no larger than the model, so a small model is sharded too.
        n_params = sum(p.numel() for p in model.parameters())
        zero.setdefault("stage3_param_persistence_threshold", 0)
        for bucket in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_max_live_parameters"):
            zero.setdefault(bucket, min(n_params, 50_000_000))
    if cfg["dtype"] == "float16":
        config["fp16"] = {**config.get("fp16", {}), "enabled": True, "initial_scale_power": cfg["initial_scale_power"]}
    elif cfg["dtype"] == "bfloat16" and not json_field(config, "bf16.enabled"):
        # fp32 weights under torch.autocast, as --dtype=bfloat16 means natively (not DeepSpeed's bf16 weights)
        config["torch_autocast"] = {**config.get("torch_autocast", {}), "enabled": True, "dtype": "bfloat16"}
    return config


class DeepSpeedEngine:
    """zero_lite.Engine's interface on deepspeed.initialize, with the trainer's model, its AdamW param
    groups as DeepSpeed's client optimizer and a config made from the same options."""

    def __init__(self, model, optimizer, config, compile=False):
        deepspeed = import_deepspeed()
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
        # DeepSpeed's optimizer-state files hold these plain classes: allowed, they load with weights_only.
        torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])
        # torch 2.13 deprecates two collectives that DeepSpeed calls for every ZeRO-3 bucket: hundreds of lines
        warnings.filterwarnings("ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                r"is deprecated", FutureWarning)
        self.ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        # DeepSpeed reads its checkpoint files with weights_only=False, which runs whatever code was
        # pickled into them; here they are read as tensors and plain types only.
        self.ds.checkpoint_engine.load = lambda path, map_location=None: torch.load(
            path, map_location=map_location, weights_only=True)
        self.module, self.stage = self.ds.module, config["zero_optimization"]["stage"]
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.device = self.ds.device
        if compile:
            self.ds.compile()

    def __call__(self, idx, labels, segment_ids=None, boundary=True):
        self.ds.set_gradient_accumulation_boundary(boundary)  # DeepSpeed exchanges gradients at the boundary
        return self.ds(idx, labels, segment_ids=segment_ids)

    def backward(self, loss):
        self.ds.backward(loss, scale_wrt_gas=False)  # the trainer's token weight already spans the step

    def step(self, lr_multiplier, loss_is_finite):
        """As zero_lite.Engine.step. At stage 0 (fp32/bf16) DeepSpeed neither reports the norm nor skips
        a non-finite step, so that is done here; at stages 1-3 (and in fp16 mode) DeepSpeed's optimizer
        computes the norm, clips and skips a NaN/Inf step itself. A non-finite loss has non-finite
        gradients, so it is skipped there too."""
        for group in self.ds.optimizer.param_groups:  # re-read every step: load_checkpoint replaces them
            group["lr"] = group["base_lr"] * lr_multiplier
        if self.stage == 0 and not self.ds.fp16_enabled():
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            if not bool(torch.isfinite(grad_norm) & loss_is_finite):
                self.ds.zero_grad()
                return grad_norm, False
            self.ds.step()  # clips to the config's gradient_clipping, updates, zeroes the gradients
            return grad_norm, True
        self.ds.step()
        return torch.tensor(float(self.ds.get_global_grad_norm()), device=self.device), self.ds.was_step_applied()

    @property
    def loss_scale(self):
        return float(getattr(self.ds.optimizer, "cur_scale", 1.0))

    def full_state_dict(self):
        """The fp32 weights on rank 0 (DeepSpeed's master copy where it keeps one); at ZeRO-3 gathered
        from every rank. Every rank calls it."""
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param
        params = list(self.module.parameters())
        with zero.GatheredParameters(params) if self.stage == 3 else contextlib.nullcontext():
            copies, state = {}, {}
            for name, tensor in self.module.state_dict(keep_vars=True).items():
                if id(tensor) not in copies:
                    master = safe_get_full_fp32_param(tensor) if tensor.requires_grad else None  # collective
                    copies[id(tensor)] = (master if master is not None else tensor).detach().to(
                        "cpu", torch.float32, copy=True)
                state[name] = copies[id(tensor)]
        return state if self.rank == 0 else None

    def memory_report(self):
        """Bytes of model state this rank holds: parameters (ZeRO-3: this rank's partition), gradients
        (stages 2-3: the partition) and optimizer state (Adam moments plus DeepSpeed's fp32 master copy
        of the partition at stages 1-3, which the ZeRO paper's fp32 formula does not count)."""
        opt = self.ds.optimizer
        params = list(self.module.parameters())
        if self.stage == 3:
            param_bytes = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in params)
        else:
            param_bytes = sum(p.numel() * p.element_size() for p in params)
        masters = (getattr(opt, "single_partition_of_fp32_groups", None)
                   or getattr(opt, "fp32_partitioned_groups_flat", None) or [])
        inner = getattr(opt, "optimizer", opt)
        moments = sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
                      if torch.is_tensor(t))
        master_bytes = sum(t.numel() * t.element_size() for t in masters)
        grad_bytes = master_bytes if self.stage >= 2 else sum(p.numel() * 4 for p in params if p.requires_grad)
        report = {"params": param_bytes, "grads": grad_bytes, "optimizer_state": moments + master_bytes}
        return {**report, "total": sum(report.values())}

    def checkpoint_bytes(self):
        """About how many bytes save() writes on this rank, for the space a first checkpoint needs: the model
        states file (rank 0; at ZeRO-3 every rank, with its partition) and, where DeepSpeed keeps fp32 master
        partitions (stages 1-3), each rank's optimizer file of masters and Adam moments, beside which rank 0
        copies DeepSpeed's two recovery scripts. A plain client optimizer's state is in the model states file."""
        from zero_lite import FILE_RECORD_BYTES, optimizer_state_bytes, saved_bytes
        opt = self.ds.optimizer
        masters = (getattr(opt, "single_partition_of_fp32_groups", None)
                   or getattr(opt, "fp32_partitioned_groups_flat", None) or [])
        total = 0
        if self.rank == 0 or self.stage == 3:
            total += FILE_RECORD_BYTES + saved_bytes(self.module.state_dict(keep_vars=True).values())  # ZeRO-3: empty
            # DeepSpeed records the frozen (not trained) parameters again from stage 2: ZeRO-3 their partitions,
            # stage 2 their .cpu() copies, which on the CPU are the module's own tensors, saved once
            if self.stage == 3 or (self.stage == 2 and self.device.type != "cpu"):
                frozen = [getattr(p, "ds_tensor", p) for p in self.module.parameters() if not p.requires_grad]
                total += saved_bytes(frozen)
        if not masters:
            return total + (optimizer_state_bytes(opt) if self.rank == 0 else 0)
        total += FILE_RECORD_BYTES + saved_bytes(masters) + optimizer_state_bytes(getattr(opt, "optimizer", opt))
        if self.rank == 0:
            utils = os.path.join(os.path.dirname(import_deepspeed().__file__), "utils")
            total += sum(os.path.getsize(os.path.join(utils, name)) for name in ("zero_to_fp32.py", "zero_to_torch.py"))
        return total

    def save(self, ckpt_dir):
        """DeepSpeed's own files (model states, each rank's optimizer shard) under ckpt_dir/deepspeed/."""
        self.ds.save_checkpoint(ckpt_dir, tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir):
        if not os.path.isdir(os.path.join(ckpt_dir, "deepspeed")):
            raise ValueError(f"{ckpt_dir} holds no DeepSpeed engine state")
        path, _ = self.ds.load_checkpoint(ckpt_dir, tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the engine state in {ckpt_dir}")
