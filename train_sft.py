"""
Supervised fine-tuning (SFT) of a GPT on prompt/response pairs: step 1 of the DeepSpeed-Chat
recipe in one file that reads top to bottom.

    python train_sft.py [config.py] [--key=value ...]
    torchrun --nproc_per_node=2 train_sft.py configs/demo.py
    python train_sft.py --help

Order of business: options -> distributed setup -> data -> model -> optimizer -> engine -> training loop
(with eval and checkpoints) -> final eval and export. Loss is token-weighted over the whole
optimizer step, across micro-batches and ranks, so a run's numbers do not depend on how the
batch is split.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import kernels
import sparse
import zero_lite
from data import DEFAULT_TEMPLATE, Batches, get_tokenizer, prepare_data
from model import GPT, GPTConfig, apply_lora, only_optimize_lora

# -----------------------------------------------------------------------------
# Options: name -> (default, meaning). A config file (python) may set any of them, then
# --key=value on the command line overrides. Types follow the defaults.
OPTIONS = {
    # data
    "data_path": ("demo", "comma-separated JSON/JSONL files, each optionally path:weight; 'demo' = built-in task"),
    "eval_data_path": ("", "explicit eval file; empty = split off data_split's eval share"),
    "data_split": ("98,2", "train,eval proportions when there is no eval_data_path"),
    "data_format": ("auto", "auto | prompt_response | prompt_chosen | messages"),
    "tokenizer": ("gpt2", "gpt2 | byte (256 byte tokens, for tiny CPU runs)"),
    "max_seq_len": (512, "most tokens in one sample, end-of-text included"),
    "truncate_prompt": (False, "cut over-long prompts from the left instead of dropping the sample"),
    "loss_on_prompt": (False, "train on prompt tokens too (DeepSpeed-Chat's behaviour, for comparison)"),
    "skip_bad_rows": (False, "skip and count malformed rows instead of stopping"),
    "template": (DEFAULT_TEMPLATE, "how a prompt and response become text: {prompt} and {response} placeholders"),
    "packing": (False, "pack several samples per row (no attention between them) instead of padding"),
    "group_by_length": (True, "batch samples of similar length together (less padding); false = fully random"),
    "cache_dir": (".cache/data", "where tokenized data is cached, keyed by its content and options"),
    # model
    "init_from": ("scratch", "scratch | a Hugging Face GPT-2 directory | a checkpoint directory or run directory"),
    "n_layer": (12, "layers (scratch only)"),
    "n_head": (12, "attention heads (scratch only)"),
    "n_embd": (768, "width (scratch only)"),
    "bias": (True, "biases in Linear and LayerNorm (scratch only)"),
    "attn_window": (0, "0 = full causal attention; w > 0 = attend to the last w positions only"),
    "dropout": (0.0, "dropout probability"),
    "gradient_checkpointing": (False, "recompute each block's activations in the backward to save memory"),
    "lora_dim": (0, "LoRA rank; 0 = no LoRA"),
    "lora_scaling": (1.0, "LoRA output scale numerator (delta is scaled by lora_scaling / lora_dim)"),
    "lora_module_name": ("h.", "LoRA wraps Linear layers whose name contains this (comma-separated patterns)"),
    "only_optimize_lora": (False, "train the LoRA factors only (wrapped weights are always frozen; this freezes the rest)"),
    "kernels": ("torch", "loss implementation: torch | triton (fused masked linear + cross-entropy, CUDA)"),
    "sparse_density": (0.0, "sparse fine-tuning: train this share of each chosen matrix's entries; 0 = off"),
    "sparse_pattern": ("h.", "sparse fine-tuning trains Linear weights whose name contains this (comma-separated)"),
    "sparse_embedding": (False, "sparse fine-tuning also trains entries of the embeddings (and the tied lm_head)"),
    "sparse_init": ("random", "sparse entries at first: random | gradient (largest over a few probe batches)"),
    "sparse_regrow_interval": (100, "optimizer steps between sparse drop/regrow (SpIEL-AG); 0 = entries fixed"),
    "sparse_regrow_share": (0.2, "share of entries replaced at a regrow, decaying (cosine) to 0 over training"),
    # optimization
    "batch_size": (8, "micro-batch size per device"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step on each device"),
    "learning_rate": (1e-4, "peak learning rate"),
    "lora_learning_rate": (0.0, "learning rate of the LoRA factors; 0 = learning_rate"),
    "weight_decay": (0.0, "AdamW weight decay, applied to matrices only"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.95, "AdamW beta2"),
    "grad_clip": (1.0, "clip the global gradient norm to this; 0 = off"),
    "lr_scheduler": ("cosine", "cosine | linear | constant, after warmup"),
    "warmup_steps": (0, "optimizer steps of linear warmup"),
    "min_lr_ratio": (0.0, "cosine and linear decay end at learning_rate * min_lr_ratio"),
    "num_train_epochs": (1, "epochs, when max_steps is 0"),
    "max_steps": (0, "optimizer steps; 0 = derive from num_train_epochs"),
    "neftune_alpha": (0.0, "NEFTune noise on token embeddings during training; 0 = off"),
    # engine
    "engine": ("native", "native (zero_lite.py)"),
    "zero_stage": (0, "0 = data parallel (every rank holds everything); 1, 2, 3 = ZeRO: shard optimizer state, "
                      "+ gradients, + parameters over ranks"),
    # system
    "device": ("auto", "auto | cpu | cuda"),
    "dtype": ("float32", "float32 | bfloat16 | float16 (float16 uses dynamic loss scaling)"),
    "initial_scale_power": (16, "float16: the loss scale starts at 2**initial_scale_power"),
    "max_nonfinite_steps": (3, "stop after this many optimizer steps in a row with a NaN/Inf loss"),
    "compile": (False, "torch.compile the model"),
    "seed": (1337, "random seed (model init, data order, dropout)"),
    # logging, eval, checkpoints
    "output_dir": ("out", "checkpoints, metrics.jsonl and the exported Hugging Face model"),
    "resume": (False, "continue the run in output_dir from its latest checkpoint"),
    "log_interval": (10, "optimizer steps between log lines"),
    "eval_interval": (0, "optimizer steps between evals; 0 = only at the end"),
    "eval_exact_match": (0, "eval: greedy-generate this many eval responses and score exact match; 0 = off"),
    "checkpoint_interval": (0, "optimizer steps between checkpoints; 0 = only at the end"),
    "keep_checkpoints": (2, "how many of the latest checkpoints to keep in output_dir"),
    "tensorboard": (False, "also log to TensorBoard in output_dir/tensorboard (needs the tensorboard package)"),
}
CHOICES = {
    "engine": ("native",),
    "data_format": ("auto", "prompt_response", "prompt_chosen", "messages"),
    "tokenizer": ("gpt2", "byte"),
    "kernels": ("torch", "triton"),
    "sparse_init": ("random", "gradient"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "bfloat16", "float16"),
}
# Allowed ranges (lowest, highest or None), both inclusive; every other number must be at least 0.
RANGES = {"max_seq_len": (2, None), "zero_stage": (0, 3), "dropout": (0, 0.99), "beta1": (0, 0.9999), "beta2": (0, 0.9999),
          "min_lr_ratio": (0, 1), "sparse_density": (0, 1),
          "sparse_regrow_share": (0, 1), **{name: (1, None) for name in (
              "batch_size", "gradient_accumulation_steps", "n_layer", "n_head", "n_embd", "log_interval",
              "keep_checkpoints", "max_nonfinite_steps", "num_train_epochs")}}
# Options that shape the model: a checkpoint to start from must agree with them.
MODEL_OPTIONS = ("tokenizer", "n_layer", "n_head", "n_embd", "bias", "lora_dim", "lora_scaling", "lora_module_name")
# Options that a resumed run may change; every other one is the checkpoint's.
RESUME_MAY_CHANGE = ("resume", "max_steps", "num_train_epochs", "log_interval", "eval_interval", "eval_exact_match",
                     "checkpoint_interval", "keep_checkpoints", "tensorboard", "device", "compile", "kernels",
                     "output_dir", "cache_dir")


class OptionError(ValueError):
    """A bad option, config file or output directory: the message says which and why."""


def usage(options, doc):
    lines = [doc.strip(), "", "Options (--key=value; booleans also as --key):"]
    for name, (default, meaning) in options.items():
        lines.append(f"  --{name:<28} {meaning} [default: {default!r}]")
    return "\n".join(lines)


def convert(name, value, source, options, choices, ranges):
    """Turns a string or config-file value into the type of the option's default."""
    default = options[name][0]
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise OptionError(f"{source}: --{name} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and isinstance(value, str):
        try:
            value = type(default)(value)
        except ValueError:
            raise OptionError(f"{source}: --{name} must be {type(default).__name__}, got {value!r}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise OptionError(f"{source}: --{name} must be {type(default).__name__}, got {value!r}")
    low, high = ranges.get(name, (0, None))
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and (value < low or high is not None and value > high):
        allowed = f"at least {low}" if high is None else f"between {low} and {high}"
        raise OptionError(f"{source}: --{name} must be {allowed}, got {value!r}")
    if name in choices and value not in choices[name]:
        raise OptionError(f"{source}: --{name} must be one of {', '.join(choices[name])}, got {value!r}")
    return value


def parse_options(argv, options=OPTIONS, choices=CHOICES, ranges=RANGES, doc=__doc__):
    """Defaults, then an optional python config file, then --key=value overrides (sample.py
    reuses this with its own options).

    Returns (options as a dict, the names set explicitly by a file or the command line)."""
    cfg = {name: default for name, (default, _) in options.items()}
    explicit = set()
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage(options, doc))
            sys.exit(0)
        if not arg.startswith("--"):
            for name, value in read_config_file(arg, options).items():
                cfg[name] = convert(name, value, arg, options, choices, ranges)
                explicit.add(name)
            continue
        name, has_value, value = arg[2:].partition("=")
        if name not in options:
            raise OptionError(f"unknown option --{name} (--help lists them)")
        if not has_value:
            if not isinstance(options[name][0], bool):
                raise OptionError(f"--{name} needs a value: --{name}=...")
            value = "true"
        cfg[name] = convert(name, value, "command line", options, choices, ranges)
        explicit.add(name)
    return cfg, explicit


def read_config_file(path, options):
    """Runs a python config file and returns the options it assigns; any other name is an error."""
    if not os.path.isfile(path):
        raise OptionError(f"config file {path} does not exist")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except Exception as e:
        raise OptionError(f"config file {path} failed to run: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
              and not isinstance(v, type(os))}
    for name in values:
        if name not in options:
            raise OptionError(f"config file {path} sets unknown option {name!r}")
    return values


# -----------------------------------------------------------------------------
# Setup: distributed, device, precision, output directory


def setup_distributed(cfg):
    """Initialises torch.distributed when launched by torchrun; returns (rank, local_rank, world_size, device)."""
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device=cuda but no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # torchrun sets OMP_NUM_THREADS=1; otherwise share the cores between local processes.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None)
    return rank, local_rank, world, device


def check_output_dir(path):
    """Fails before training, not after an hour of it, when the output directory is not writable."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OptionError(f"--output_dir={path} cannot be written: {e.strerror}") from None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    """Every generator's state in plain types and tensors, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Model, optimizer, engine


def adopt_checkpoint_options(cfg, explicit, saved, path, names):
    """A checkpoint fixes these options: requested values must agree with it, the rest are taken
    from it (on resume, the options in RESUME_MAY_CHANGE may be set anew on the command line)."""
    for name in names:
        if name in explicit and name in RESUME_MAY_CHANGE and cfg["resume"]:
            continue
        if name in explicit and cfg[name] != saved[name]:
            hint = " (to put new LoRA on a trained model, start from its hf/ export)" if "lora" in name else ""
            raise OptionError(f"checkpoint {path} has {name}={saved[name]!r} but {name}={cfg[name]!r} "
                              f"was requested{hint}")
        cfg[name] = saved[name]


def build_model(cfg, n_vocab, checkpoint):
    """A checkpoint (its own config), a Hugging Face GPT-2 directory, or scratch; then LoRA.
    n_vocab is the tokenizer's; from scratch it is padded to a multiple of 64, which runs faster."""
    if checkpoint is not None:  # its shape and weights; these three are the run's choice, not the checkpoint's
        run_choices = {k: cfg[k] for k in ("dropout", "attn_window", "gradient_checkpointing")}
        model = GPT(GPTConfig(**{**checkpoint["model_config"], **run_choices}))
        if cfg["lora_dim"]:
            add_lora(model, cfg)
        model.load_state_dict(checkpoint["model"])
        return model
    if cfg["init_from"] == "scratch":
        if cfg["n_embd"] % cfg["n_head"]:
            raise OptionError(f"--n_embd={cfg['n_embd']} must be a multiple of --n_head={cfg['n_head']}")
        model = GPT(GPTConfig(block_size=cfg["max_seq_len"], vocab_size=-(-n_vocab // 64) * 64,
                              n_layer=cfg["n_layer"], n_head=cfg["n_head"], n_embd=cfg["n_embd"],
                              dropout=cfg["dropout"], bias=cfg["bias"], attn_window=cfg["attn_window"],
                              gradient_checkpointing=cfg["gradient_checkpointing"]))
    else:
        try:
            model = GPT.from_pretrained(cfg["init_from"], dropout=cfg["dropout"], attn_window=cfg["attn_window"],
                                        gradient_checkpointing=cfg["gradient_checkpointing"])
        except (OSError, ValueError) as e:  # from_pretrained's messages name the file and the field
            raise OptionError(f"--init_from={cfg['init_from']}: {e}") from None
        if model.config.vocab_size < n_vocab:
            raise OptionError(f"--init_from={cfg['init_from']} has vocab_size {model.config.vocab_size}, "
                              f"smaller than tokenizer {cfg['tokenizer']}'s {n_vocab}")
    if cfg["lora_dim"]:
        add_lora(model, cfg)
    return model


def add_lora(model, options):
    wrapped = apply_lora(model, options["lora_dim"], lora_scaling=options["lora_scaling"],
                         module_name=options["lora_module_name"])
    if wrapped == 0:
        raise OptionError(f"--lora_module_name={options['lora_module_name']!r} matches no Linear layer")


def make_optimizer(model, cfg, fused, total_steps=1):
    """AdamW; weight decay on matrices only; LoRA factors may have their own learning rate.
    With --sparse_density, sparse.SparseAdamW: the chosen matrices train at their selected entries,
    the other matrices are frozen, and the 1-D parameters (biases, LayerNorms) train densely."""
    matrices = []
    if cfg["sparse_density"] > 0:
        try:
            matrices = sparse.sparse_matrices(model, cfg["sparse_pattern"], cfg["sparse_embedding"])
        except ValueError as e:
            raise OptionError(f"--sparse_pattern: {e}") from None
    chosen = {id(p) for _, p in matrices}
    groups = {}
    for name, p in model.named_parameters():
        if matrices and p.dim() >= 2 and id(p) not in chosen:
            p.requires_grad_(False)
        if not p.requires_grad or id(p) in chosen:
            continue
        is_lora = "lora_" in name
        lr = cfg["lora_learning_rate"] if is_lora and cfg["lora_learning_rate"] > 0 else cfg["learning_rate"]
        decay = cfg["weight_decay"] if p.dim() >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if matrices:
        return sparse.SparseAdamW(matrices, param_groups, cfg["sparse_density"], lr=cfg["learning_rate"],
                                  betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"],
                                  regrow_interval=cfg["sparse_regrow_interval"],
                                  regrow_share=cfg["sparse_regrow_share"], total_steps=total_steps, seed=cfg["seed"])
    return torch.optim.AdamW(param_groups, betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


def make_engine(cfg, model, optimizer):
    """The engine that owns gradient exchange, precision, clipping, the update and its checkpoint files."""
    try:
        return zero_lite.Engine(model, optimizer, stage=cfg["zero_stage"], dtype=getattr(torch, cfg["dtype"]),
                                grad_clip=cfg["grad_clip"], initial_scale_power=cfg["initial_scale_power"],
                                compile=cfg["compile"])
    except ValueError as e:
        raise OptionError(f"--zero_stage={cfg['zero_stage']}: {e}") from None


SPARSE_PROBE_BATCHES = 4  # micro-batches over all ranks whose gradients choose the first entries (--sparse_init=gradient)


def choose_sparse_entries(model, optimizer, batches, device, autocast):
    """--sparse_init=gradient: the largest gradients over the first micro-batches (the same ones
    on any number of ranks) choose each matrix's entries; the batches are rewound, so the data order
    is unchanged."""
    position = batches.state_dict()

    def probe():
        for _ in range(max(1, SPARSE_PROBE_BATCHES // batches.world_size)):
            b = batches.next_batch()
            segments = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
            with autocast:
                loss = model(b["input_ids"].to(device), b["labels"].to(device), segment_ids=segments)
            loss.backward()
    optimizer.select_by_gradient(probe)
    batches.load_state_dict(position)


def sparse_report(optimizer):
    """The start-up line of a sparse run: what trains and what the optimizer holds."""
    entries, dense = optimizer.trainable_entries()
    total = sum(p.numel() for p in optimizer.matrices)
    dense_adamw = 8 * (total + dense)  # two fp32 moments per trained parameter
    return (f"sparse: {entries:,} of {total:,} entries in {len(optimizer.matrices)} matrices "
            f"({entries / total:.2%}) and {dense:,} dense parameters train; optimizer state "
            f"{optimizer.state_bytes() / 2**20:.2f} MiB (dense AdamW over the same parameters: "
            f"{dense_adamw / 2**20:.2f} MiB)")


def lr_multiplier(step, cfg, total_steps):
    """Linear warmup, then cosine, linear or constant down to min_lr_ratio (step counts from 0)."""
    if step < cfg["warmup_steps"]:
        return (step + 1) / cfg["warmup_steps"]
    if cfg["lr_scheduler"] == "constant":
        return 1.0
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, total_steps - cfg["warmup_steps"]))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg["lr_scheduler"] == "cosine" else 1 - progress
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * shape


def add_neftune_noise(model, alpha):
    """NEFTune: uniform noise of scale alpha / sqrt(T * C) on the token embeddings while training."""
    def hook(module, inputs, output):
        if module.training:
            scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
            output = output + torch.empty_like(output).uniform_(-scale, scale)
        return output
    model.transformer.wte.register_forward_hook(hook)


def peak_flops(device):
    """Dense bf16 peak of known GPUs, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)):
        if key in name:
            return flops
    return None


def peak_memory_gib(device):
    """Peak tensor memory on a GPU; on a CPU, this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -----------------------------------------------------------------------------
# Eval


@torch.no_grad()
def evaluate(model, eval_set, cfg, device, autocast, rank, world):
    """Token-weighted loss over the whole eval set (every rank takes every world-th sample)."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(rank, len(eval_set), world))
    for start in range(0, len(indices), cfg["batch_size"]):
        idx, labels = pad_batch([eval_set[i] for i in indices[start:start + cfg["batch_size"]]], device)
        n = (labels != -100).sum()
        if n == 0:
            continue
        with autocast:
            loss = model(idx, labels)
        loss_sum += loss.double() * n
        tokens += n
    stats = torch.stack([loss_sum, tokens])
    if world > 1:
        dist.all_reduce(stats)
    model.train()
    loss = (stats[0] / stats[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(stats[1].item())}


def pad_batch(samples, device):
    """Right-pads (input_ids, labels) pairs into (B, T) tensors; padding is never trained."""
    width = max(len(x) for x, _ in samples)
    idx = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(samples):
        idx[row, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        labels[row, :len(y)] = torch.as_tensor(y, dtype=torch.long)
    return idx.to(device), labels.to(device)


@torch.no_grad()
def exact_match(model, eval_set, count, tokenizer, device, autocast, rank, world):
    """Share of eval prompts whose greedy continuation equals the reference response exactly."""
    model.eval()
    indices = list(range(min(count, len(eval_set))))[rank::world]
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, len(indices), 64):
        pairs = [eval_set.prompt_and_response(i) for i in indices[start:start + 64]]
        with autocast:
            outputs = model.generate([p for p, _ in pairs], max_new_tokens=max(len(r) for _, r in pairs),
                                     temperature=0.0, eos_id=tokenizer.eot_token, vocab_limit=tokenizer.n_vocab)
        for (_, reference), out in zip(pairs, outputs):
            hits[0] += float(out + [tokenizer.eot_token] == reference)
        hits[1] += len(pairs)
    if world > 1:
        dist.all_reduce(hits)
    model.train()
    return {"exact_match": (hits[0] / hits[1].clamp(min=1)).item()}


# -----------------------------------------------------------------------------
# Checkpoints and logs


# A checkpoint is a directory ckpt-<step>/ holding each rank's engine files, the trainer's state
# (rank 0), the consolidated weights and a manifest of every file with its size and sha256. It is
# written as ckpt-<step>.tmp/ and renamed once every rank is done, so a directory with this name is
# complete and the latest one is the one to resume from.
CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8})")
TRAINER_FILE, WEIGHTS_FILE, MANIFEST_FILE = "trainer.pt", "model.pt", "manifest.json"


def list_checkpoints(output_dir):
    """(step, path) of this project's complete checkpoints in output_dir, ordered by step."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and os.path.isfile(os.path.join(output_dir, name, MANIFEST_FILE)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def find_checkpoint(path):
    """A checkpoint directory itself, or the latest one inside a run directory; None if there is none."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        return path
    found = list_checkpoints(path)
    return found[-1][1] if found else None


def save_checkpoint(output_dir, step, engine, trainer_state, keep, rank, world):
    """Every rank writes its engine files into ckpt-<step>.tmp/, rank 0 adds the trainer state, the
    consolidated weights and the manifest, then renames it to ckpt-<step>/ and drops old checkpoints."""
    final = os.path.join(output_dir, f"ckpt-{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        os.makedirs(tmp)
    barrier(world)
    engine.save(tmp)
    weights = engine.full_state_dict()  # collective: every rank takes part
    if rank == 0:
        torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
        torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
    barrier(world)  # every rank's files are in place
    if rank == 0:
        write_manifest(tmp, {"step": step, "engine": trainer_state["engine"]})
        replace_directory(tmp, final)
        remove_old_checkpoints(output_dir, keep)
    barrier(world)
    return final


def barrier(world):
    if world > 1:
        dist.barrier()


def write_manifest(ckpt_dir, info):
    """manifest.json: every file under ckpt_dir with its size and sha256, beside info."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            files[os.path.relpath(path, ckpt_dir)] = {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}
    with open(os.path.join(ckpt_dir, MANIFEST_FILE), "w") as f:
        json.dump({**info, "files": dict(sorted(files.items()))}, f, indent=1)


def replace_directory(src, dst):
    """Renames src to dst; an existing dst (the same step saved again) is moved aside first, so a
    complete checkpoint exists at every moment."""
    if os.path.exists(dst):
        os.replace(dst, dst + ".old")
        os.replace(src, dst)
        shutil.rmtree(dst + ".old")
    else:
        os.replace(src, dst)


def remove_old_checkpoints(output_dir, keep):
    """Keeps the latest `keep` checkpoints by step; anything not named as ours is left alone."""
    for _, path in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path)


def load_checkpoint(path):
    """The trainer's state of a checkpoint directory, with the consolidated weights as "model"."""
    files = [os.path.join(path, name) for name in (TRAINER_FILE, WEIGHTS_FILE)]
    if not all(os.path.isfile(f) for f in files):
        raise OptionError(f"{path} is not a train_sft.py checkpoint directory (for Hugging Face weights, "
                          f"give their directory)")
    try:  # tensors and plain types only: loading never runs code
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        state["model"] = torch.load(files[1], map_location="cpu", weights_only=True)
    except Exception as e:
        raise OptionError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"options", "model_config"} <= state.keys():
        raise OptionError(f"{path} is not a train_sft.py checkpoint directory")
    state["path"] = path
    return state


class MetricsLog:
    """One JSON object per line in output_dir/metrics.jsonl (appended across resumes), and TensorBoard.

    A resumed run starts from its checkpoint's step, so records after that step (written before a
    crash) are dropped: they are about to be written again."""

    def __init__(self, output_dir, tensorboard, resumed_step=None):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resumed_step is not None and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resumed_step]
            with open(self.path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(self.path + ".tmp", self.path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise OptionError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def write(self, record):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])


EXPORTED_OPTIONS = ("tokenizer", "template", "attn_window")  # what GPT-2's own config.json cannot say


def export_hf(weights, model_config, cfg, output_dir):
    """The consolidated weights in Hugging Face GPT-2 format (LoRA merged), plus sft_config.json with
    the options that sample.py and a later --init_from need to use it as it was trained."""
    hf_dir = os.path.join(output_dir, "hf")
    build_model(cfg, None, {"model_config": model_config, "model": weights}).save_pretrained(hf_dir)
    with open(os.path.join(hf_dir, "sft_config.json"), "w") as f:
        json.dump({name: cfg[name] for name in EXPORTED_OPTIONS}, f, indent=1)
    return hf_dir


def exported_options(hf_dir):
    """The sft_config.json of a Hugging Face directory that export_hf wrote; {} for any other."""
    path = os.path.join(hf_dir, "sft_config.json")
    return json.load(open(path)) if os.path.isfile(path) else {}


# -----------------------------------------------------------------------------
# The run


def main(argv):
    cfg, explicit = parse_options(argv)
    rank, _, world, device = setup_distributed(cfg)
    master = rank == 0
    log = tqdm.write if master else (lambda *a, **k: None)  # tqdm.write keeps the progress bar intact
    check_output_dir(cfg["output_dir"])
    if cfg["kernels"] == "triton" and not kernels.runs_on(device):
        raise OptionError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1, for tests); "
                          "use --kernels=torch on CPU")

    # A checkpoint to resume (the whole run's state) or to start from (the model's shape and weights).
    checkpoint = None
    if cfg["resume"]:
        path = find_checkpoint(cfg["output_dir"])
        if path is None:
            raise OptionError(f"--resume: no ckpt-<step> checkpoint in --output_dir={cfg['output_dir']}")
        checkpoint = load_checkpoint(path)
        adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path, list(OPTIONS))
    elif cfg["init_from"] != "scratch" and not os.path.isfile(os.path.join(cfg["init_from"], "config.json")):
        path = find_checkpoint(cfg["init_from"])
        if path is None:
            raise OptionError(f"--init_from={cfg['init_from']}: neither a Hugging Face GPT-2 directory "
                              f"(config.json) nor a checkpoint")
        checkpoint = load_checkpoint(path)
        adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path, MODEL_OPTIONS)
    elif cfg["init_from"] != "scratch":  # a Hugging Face directory: ours say what they were trained with
        cfg.update({k: v for k, v in exported_options(cfg["init_from"]).items() if k not in explicit})
    seed_everything(cfg["seed"])

    # Data: tokenized once per machine and cached; every rank draws its own micro-batches.
    try:  # a data problem (DataError included) is bad input: its message names the file, line or option
        tokenizer = get_tokenizer(cfg["tokenizer"])
        train_set, eval_set = prepare_data(
            cfg["data_path"], cfg["tokenizer"], cfg["max_seq_len"], eval_data_path=cfg["eval_data_path"],
            data_split=cfg["data_split"], data_format=cfg["data_format"], template=cfg["template"],
            loss_on_prompt=cfg["loss_on_prompt"], truncate_prompt=cfg["truncate_prompt"],
            skip_bad_rows=cfg["skip_bad_rows"], seed=cfg["seed"], cache_dir=cfg["cache_dir"], log=log)
        batches = Batches(train_set, cfg["batch_size"], rank=rank, world_size=world, seed=cfg["seed"],
                          packing=cfg["packing"], group_by_length=cfg["group_by_length"])
    except (OSError, ValueError) as e:
        raise OptionError(str(e)) from None
    accum = cfg["gradient_accumulation_steps"]
    total_steps = cfg["max_steps"] or cfg["num_train_epochs"] * batches.batches_per_epoch // accum
    if total_steps < 1:
        raise OptionError(f"{len(train_set)} training samples make no full optimizer step of "
                          f"{world} ranks x {accum} micro-batches x {cfg['batch_size']}")

    # Model: from scratch, a Hugging Face directory or a checkpoint; LoRA, precision, the loss kernel.
    model = build_model(cfg, tokenizer.n_vocab, checkpoint)
    if cfg["max_seq_len"] - 1 > model.config.block_size:
        raise OptionError(f"--max_seq_len={cfg['max_seq_len']} needs {cfg['max_seq_len'] - 1} positions but the "
                          f"model has {model.config.block_size}")
    if cfg["sparse_density"] > 0 and cfg["lora_dim"]:
        raise OptionError("--sparse_density cannot be combined with --lora_dim: choose one way of fine-tuning")
    if cfg["sparse_density"] > 0 and (cfg["engine"] != "native" or cfg["zero_stage"] != 0):
        raise OptionError(f"--sparse_density needs the native engine at --zero_stage=0; --engine={cfg['engine']} "
                          f"--zero_stage={cfg['zero_stage']} cannot carry its sparse gradients")
    if cfg["only_optimize_lora"]:
        if not cfg["lora_dim"]:
            raise OptionError("--only_optimize_lora needs --lora_dim > 0")
        only_optimize_lora(model)
    if cfg["kernels"] == "triton":
        model.loss_fn = kernels.fused_masked_linear_cross_entropy
    if cfg["neftune_alpha"] > 0:
        add_neftune_noise(model, cfg["neftune_alpha"])
    model.to(device)
    n_params = model.num_params(non_embedding=False)  # counted before an engine may shard the parameters
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_per_token = model.flops_per_token(cfg["max_seq_len"])
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda", total_steps=total_steps)
    engine = make_engine(cfg, model, optimizer)
    dtype = getattr(torch, cfg["dtype"])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if cfg["sparse_density"] > 0:
        if cfg["sparse_init"] == "gradient" and not cfg["resume"]:
            choose_sparse_entries(model, optimizer, batches, device, autocast)
        log(sparse_report(optimizer))
    step = 0
    if cfg["resume"]:
        try:
            engine.load(checkpoint["path"])
        except ValueError as e:
            raise OptionError(str(e)) from None
        batches.load_state_dict(checkpoint["batches"])
        set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
        step = checkpoint["step"]
        log(f"resumed from {checkpoint['path']} at step {step}")
    checkpoint = None  # free the host memory it holds

    peak = peak_flops(device)
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained; {world} rank(s) x {accum} x "
        f"{cfg['batch_size']} samples per step, {total_steps} steps, {cfg['dtype']} on {device.type}; "
        f"loss {model.loss_fn.__module__}.{model.loss_fn.__name__}")
    metrics = MetricsLog(cfg["output_dir"], cfg["tensorboard"], step if cfg["resume"] else None) if master else None

    def run_eval():
        if len(eval_set) == 0:
            log(f"eval step {step}: skipped, the eval set is empty (see --data_split / --eval_data_path)")
            return {}
        result = evaluate(engine.module, eval_set, cfg, device, autocast, rank, world)
        if cfg["eval_exact_match"]:
            result |= exact_match(engine.module, eval_set, cfg["eval_exact_match"], tokenizer, device, autocast,
                                  rank, world)
        if master:
            metrics.write({"step": step, **result})
            log(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
        return result

    def checkpoint_now():
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        trainer_state = {"step": step, "batches": batches.state_dict(), "rng": rngs, "options": cfg,
                         "model_config": vars(model.config).copy(), "engine": cfg["engine"], "world_size": world}
        path = save_checkpoint(cfg["output_dir"], step, engine, trainer_state, cfg["keep_checkpoints"], rank, world)
        log(f"checkpoint step {step} -> {path}")

    progress = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="sft")
    nonfinite_in_a_row = 0
    window_tokens, window_start = 0, time.perf_counter()
    while step < total_steps:
        # Fetch the step's micro-batches first: the loss is normalised by the trained tokens of the
        # whole step on all ranks, so splitting a batch differently cannot change the result.
        micro = [batches.next_batch() for _ in range(accum)]
        counts = torch.tensor([float(sum((b["labels"] != -100).sum() for b in micro)),
                               float(sum(b["input_ids"].numel() for b in micro))], device=device)
        if world > 1:
            dist.all_reduce(counts)
        trained = counts[0].clamp(min=1)
        window_tokens += counts[1]  # positions processed by all ranks (a tensor: no device sync here)

        multiplier = lr_multiplier(step, cfg, total_steps)
        lr = cfg["learning_rate"] * multiplier
        step_loss = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            idx, labels = b["input_ids"].to(device), b["labels"].to(device)
            segments = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
            # Engines average gradients over ranks; the loss weight undoes that and applies the token share.
            weight = (labels != -100).sum() * world / trained
            loss = engine(idx, labels, segment_ids=segments, boundary=i == accum - 1)
            engine.backward(loss * weight)
            step_loss += loss.detach().float() * weight / world
        if world > 1:
            dist.all_reduce(step_loss)
        # Clip, then update unless the loss or the gradients hold a NaN/Inf: that must not reach the weights.
        grad_norm, applied = engine.step(multiplier, torch.isfinite(step_loss))
        step += 1
        progress.update(1)
        # Skipped steps are rare, so the device syncs of the checks below cost nothing in a normal step.
        if applied or cfg["dtype"] == "float16" and math.isfinite(step_loss.item()):
            nonfinite_in_a_row = 0
            if not applied:
                log(f"step {step - 1}: gradient overflow in float16, optimizer step skipped; "
                    f"loss scale now {engine.loss_scale:g}")
        else:
            nonfinite_in_a_row += 1
            log(f"step {step - 1}: NaN/Inf loss or gradient (loss {step_loss.item():.4g}), optimizer step skipped "
                f"({nonfinite_in_a_row} in a row)")
            if nonfinite_in_a_row >= cfg["max_nonfinite_steps"]:
                raise RuntimeError(f"NaN/Inf loss or gradient for {nonfinite_in_a_row} steps in a row at step "
                                   f"{step - 1}: stopping instead of training on garbage (lower --learning_rate, "
                                   f"use --dtype=bfloat16, or check the data and init weights)")
            continue

        if step % cfg["log_interval"] == 0 or step == total_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": step_loss.item(), "lr": lr, "grad_norm": grad_norm.item(),
                      "tokens_per_s": float(window_tokens) / elapsed, "epoch": batches.epoch,
                      "padding": batches.padding_fraction}
            if peak:
                record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak * world)
            record["peak_mem_gib"] = peak_memory_gib(device)
            if master:
                metrics.write(record)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
            window_tokens, window_start = 0, time.perf_counter()
        pause = time.perf_counter()  # eval and checkpoints do not count against tokens/s
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < total_steps:
            run_eval()
        if cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < total_steps:
            checkpoint_now()
        window_start += time.perf_counter() - pause
    progress.close()

    checkpoint_now()  # checkpoint and export first, so that nothing in the final eval can cost the trained model
    weights = engine.full_state_dict()
    if master:
        log(f"exported Hugging Face model -> {export_hf(weights, vars(model.config), cfg, cfg['output_dir'])}")
    if master and cfg["sparse_density"] > 0:
        path = os.path.join(cfg["output_dir"], "sparse_delta.safetensors")
        log(f"sparse delta -> {sparse.save_delta(optimizer, path, base_name=cfg['init_from'])}")
    result = run_eval()
    if world > 1:
        # Release the engine before the process group: dropped later (when main returns), its last
        # reference to the group would destroy it while holding the GIL that gloo's threads wait for.
        del engine
        dist.barrier()
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as e:  # bad input: one sentence, no traceback
        print(f"train_sft.py: error: {e}", file=sys.stderr)
        sys.exit(2)
