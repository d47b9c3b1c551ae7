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
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import sys
import time
import traceback
import uuid
import warnings

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import sft_kernels
import sparse
import zero_lite
from data import DEFAULT_TEMPLATE, Batches, get_tokenizer, prepare_data
from model import GPT, GPTConfig, apply_lora, only_optimize_lora

ROOT = os.path.dirname(os.path.abspath(__file__))

# -----------------------------------------------------------------------------
# Options: name -> (default, meaning). A config file (python) may set any of them, then
# --key=value on the command line overrides. Types follow the defaults.
OPTIONS = {
    # data
    "data_path": ("demo", "comma-separated .jsonl/.json/.parquet files or DeepSpeed-Chat local/jsonfile "
                          "directories, each optionally path:weight; 'demo' = built-in task"),
    "eval_data_path": ("", "explicit eval file; empty = split off data_split's eval share"),
    "data_split": ("98,2", "train,eval proportions when there is no eval file (eval_data_path, or a "
                           "DeepSpeed-Chat directory's data/eval.json)"),
    "data_format": ("auto", "auto (detected per file) | prompt_response | prompt_chosen | prompt_completion | "
                            "messages | alpaca | sharegpt"),
    "tokenizer": ("gpt2", "gpt2 | byte (256 byte tokens, for tiny CPU runs)"),
    "max_seq_len": (512, "most tokens in one sample, end-of-text included"),
    "truncate_prompt": (False, "cut over-long prompts from the left instead of dropping the sample"),
    "loss_on_prompt": (False, "train on prompt tokens too (DeepSpeed-Chat's behaviour, for comparison)"),
    "skip_bad_rows": (False, "skip and count malformed rows instead of stopping"),
    "template": (DEFAULT_TEMPLATE, "how a prompt and response become text: deepspeed_chat (this default) | raw | "
                                   "chat, or a custom string with {prompt} and {response}"),
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
    "engine": ("native", "native (zero_lite.py) | deepspeed (the same run on deepspeed.initialize)"),
    "zero_stage": (0, "0 = data parallel (every rank holds everything); 1, 2, 3 = ZeRO: shard optimizer state, "
                      "+ gradients, + parameters over ranks"),
    "deepspeed_config": ("", "deepspeed: a DeepSpeed JSON config; its fields that options also set must agree with them"),
    "offload": (False, "deepspeed, zero_stage 1-3: keep optimizer state and its update on the CPU (ZeRO-Offload)"),
    # system
    "device": ("auto", "auto | cpu | cuda"),
    "dtype": ("float32", "float32 | bfloat16 | float16 (float16 uses dynamic loss scaling)"),
    "initial_scale_power": (16, "float16: the loss scale starts at 2**initial_scale_power"),
    "max_nonfinite_steps": (3, "stop after this many optimizer steps in a row with a NaN/Inf loss"),
    "compile": (False, "torch.compile the model"),
    "seed": (1337, "random seed (model init, data order, dropout)"),
    # logging, eval, checkpoints
    "output_dir": ("out", "checkpoints, metrics.jsonl and the exported Hugging Face model"),
    "resume": (False, "continue the run in output_dir from its latest intact checkpoint"),
    "overwrite_output_dir": (False, "a new run in an output_dir holding an earlier run's checkpoints or metrics "
                                    "removes them (and its hf/, tensorboard/) instead of stopping"),
    "log_interval": (10, "optimizer steps between log lines"),
    "eval_interval": (0, "optimizer steps between evals; 0 = only at the end"),
    "eval_exact_match": (0, "eval: greedy-generate this many eval responses and score exact match; 0 = off"),
    "checkpoint_interval": (0, "optimizer steps between checkpoints; 0 = only at the end"),
    "keep_checkpoints": (2, "how many of the latest checkpoints to keep in output_dir"),
    "tensorboard": (False, "also log to TensorBoard in output_dir/tensorboard (needs the tensorboard package)"),
}
CHOICES = {
    "engine": ("native", "deepspeed"),
    "data_format": ("auto", "prompt_response", "prompt_chosen", "prompt_completion", "messages", "alpaca", "sharegpt"),
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
# Options that a resumed run may change; every other one is the checkpoint's. A run resumed on another
# number of ranks keeps its batch by changing gradient_accumulation_steps (2 ranks x 3 = 3 ranks x 2).
RESUME_MAY_CHANGE = ("resume", "max_steps", "num_train_epochs", "log_interval", "eval_interval", "eval_exact_match",
                     "checkpoint_interval", "keep_checkpoints", "tensorboard", "device", "compile", "kernels",
                     "output_dir", "cache_dir", "gradient_accumulation_steps")


class OptionError(ValueError):
    """A bad option, config file or output directory: the message says which and why."""


class RunStopped(Exception):
    """The run ended before its last step or without a result to keep: on SIGTERM/SIGINT (after a
    checkpoint), or on NaN/Inf (with nothing exported). The message says why (empty on ranks other
    than 0, so that torchrun prints it once); exit_code tells a calling script which it was."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_NONFINITE = 3  # 2 is bad input; a signal gives 128 + its number, as a shell reports a killed process
EXIT_CHECKPOINT_NOT_WRITTEN = 4


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
        try:
            value = float(value)
        except OverflowError:  # an int beyond float's range, from a config file
            value = math.inf
    if type(value) is not type(default):
        raise OptionError(f"{source}: --{name} must be {type(default).__name__}, got {value!r}")
    low, high = ranges.get(name, (0, None))
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, float) and not math.isfinite(value):  # NaN passes every comparison: check it first
        raise OptionError(f"{source}: --{name} must be a finite number, got {value!r}")
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
            check_config_file_name(arg)
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


def check_config_file_name(arg):
    """A config file is python and is run as such, so only a .py file is taken as one: anything else
    given without --, a data file say, would otherwise run as code, set nothing and go unnoticed."""
    if arg.endswith(".py"):
        return
    if arg.endswith((".json", ".jsonl", ".parquet")):
        raise OptionError(f"{printable(arg)} is not a config file (those end in .py); give data as "
                          f"--data_path={printable(arg)}")
    raise OptionError(f"{printable(arg)} is neither a config file (those end in .py) nor an option (--key=value)")


def printable(text):
    """text as it is, or quoted with escapes when it holds a newline or other control character, so that
    an error message stays one line."""
    return text if text.isprintable() else repr(text)


def read_config_file(path, options):
    """Runs a python config file and returns the options it assigns; any other name is an error."""
    shown = printable(path)
    if not os.path.isfile(path):
        raise OptionError(f"config file {shown} does not exist")
    scope = {}
    try:
        exec(compile(open(path).read(), path, "exec"), scope)
    except Exception as e:
        raise OptionError(f"config file {shown} failed to run: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
              and not isinstance(v, type(os))}
    for name in values:
        if name not in options:
            raise OptionError(f"config file {shown} sets unknown option {name!r}")
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
    backend = "nccl" if use_cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    elif cfg["engine"] == "deepspeed":  # DeepSpeed needs a process group and torchrun's variables even alone
        os.environ.update({k: os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK")}, WORLD_SIZE="1")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
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


def data_error_sentence(e, cache_dir):
    """A data problem's message; one that happened inside the cache names --cache_dir, the option to change."""
    inside = getattr(e, "filename", None) and os.path.join(os.path.abspath(e.filename), "").startswith(
        os.path.join(os.path.abspath(cache_dir), ""))
    return f"--cache_dir={cache_dir} cannot be used: {e.strerror} ({e.filename})" if inside else str(e)


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


def starting_checkpoint(cfg, explicit, log, master):
    """The checkpoint to resume (the whole run's state) or to start from (the model's shape and
    weights), with the options it fixes adopted into cfg; None when starting otherwise."""
    if cfg["resume"]:
        path = find_checkpoint(cfg["output_dir"], log, set_aside=master)
        if path is None:
            raise OptionError(f"--resume: no intact ckpt-<step> checkpoint of the run in "
                              f"--output_dir={cfg['output_dir']}")
        checkpoint = load_checkpoint(path)
        adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path, list(OPTIONS))
        return checkpoint
    if cfg["init_from"] == "scratch":
        return None
    if os.path.isfile(os.path.join(cfg["init_from"], "config.json")):  # a Hugging Face directory: ours say
        cfg.update({k: v for k, v in exported_options(cfg["init_from"]).items() if k not in explicit})  # how trained
        return None
    path = find_checkpoint(cfg["init_from"], log)
    if path is None:
        raise OptionError(f"--init_from={cfg['init_from']}: neither a Hugging Face GPT-2 directory "
                          f"(config.json) nor a checkpoint")
    checkpoint = load_checkpoint(path)
    adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path, MODEL_OPTIONS)
    return checkpoint


def resume_run(checkpoint, engine, batches, rank):
    """Restores the engine's files, the data position and this rank's random generators; returns the step."""
    try:
        engine.load(checkpoint["path"])
    except ValueError as e:
        raise OptionError(str(e)) from None
    try:
        batches.load_state_dict(checkpoint["batches"])
    except ValueError as e:
        raise OptionError(f"cannot resume from {checkpoint['path']}: {e}") from None
    set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
    return checkpoint["step"]


def prepare_model(cfg, n_vocab, checkpoint, device):
    """The model to train, on its device: built, checked against max_seq_len, LoRA-frozen as asked,
    with the chosen loss kernel and NEFTune noise."""
    model = build_model(cfg, n_vocab, checkpoint)
    if cfg["max_seq_len"] - 1 > model.config.block_size:
        raise OptionError(f"--max_seq_len={cfg['max_seq_len']} needs {cfg['max_seq_len'] - 1} positions but the "
                          f"model has {model.config.block_size}")
    if cfg["only_optimize_lora"]:
        if not cfg["lora_dim"]:
            raise OptionError("--only_optimize_lora needs --lora_dim > 0")
        only_optimize_lora(model)
    if cfg["kernels"] == "triton":
        model.loss_fn = sft_kernels.fused_masked_linear_cross_entropy
    if cfg["neftune_alpha"] > 0:
        add_neftune_noise(model, cfg["neftune_alpha"])
    return model.to(device)


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


def check_sparse_options(cfg):
    """Sparse fine-tuning lives in the optimizer, whose gathered gradients only the native engine's
    stage 0 knows how to carry; LoRA would train the same matrices a second way."""
    if cfg["sparse_density"] > 0 and cfg["lora_dim"]:
        raise OptionError("--sparse_density cannot be combined with --lora_dim: choose one way of fine-tuning")
    if cfg["sparse_density"] > 0 and (cfg["engine"] != "native" or cfg["zero_stage"] != 0):
        raise OptionError(f"--sparse_density needs the native engine at --zero_stage=0; --engine={cfg['engine']} "
                          f"--zero_stage={cfg['zero_stage']} cannot carry its sparse gradients")


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


# -----------------------------------------------------------------------------
# Engines: the native one (zero_lite.py) or DeepSpeed behind the same interface


def make_engine(cfg, model, optimizer):
    """The engine that owns gradient exchange, precision, clipping, the update and its checkpoint files."""
    if cfg["engine"] == "deepspeed":
        if getattr(optimizer, "sparse_grads", None) is not None:
            raise OptionError("sparse fine-tuning (--sparse_density) runs on --engine=native --zero_stage=0 "
                              "only, not on --engine=deepspeed")
        return DeepSpeedEngine(model, optimizer, deepspeed_config(cfg, model), compile=cfg["compile"])
    try:
        return zero_lite.Engine(model, optimizer, stage=cfg["zero_stage"], dtype=getattr(torch, cfg["dtype"]),
                                grad_clip=cfg["grad_clip"], initial_scale_power=cfg["initial_scale_power"],
                                compile=cfg["compile"])
    except ValueError as e:
        raise OptionError(f"--zero_stage={cfg['zero_stage']}: {e}") from None


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


def check_engine_options(cfg, explicit, world, device):
    """Engine options that cannot work together stop the run here, before any data is prepared."""
    if cfg["engine"] == "native":
        for name in ("deepspeed_config", "offload"):
            if cfg[name]:
                raise OptionError(f"--{name} is a DeepSpeed setting: it needs --engine=deepspeed")
        return
    if cfg["deepspeed_config"]:
        adopt_deepspeed_config(cfg, explicit, world)
    if cfg["offload"] and cfg["zero_stage"] == 0:
        raise OptionError("--offload moves the sharded optimizer state: it needs --zero_stage=1, 2 or 3")
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
    return config


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

    def save(self, ckpt_dir):
        """DeepSpeed's own files (model states, each rank's optimizer shard) under ckpt_dir/deepspeed/."""
        self.ds.save_checkpoint(ckpt_dir, tag="deepspeed", save_latest=False)

    def load(self, ckpt_dir):
        if not os.path.isdir(os.path.join(ckpt_dir, "deepspeed")):
            raise ValueError(f"{ckpt_dir} holds no DeepSpeed engine state")
        path, _ = self.ds.load_checkpoint(ckpt_dir, tag="deepspeed", load_lr_scheduler_states=False)
        if path is None:
            raise ValueError(f"DeepSpeed could not load the engine state in {ckpt_dir}")


# -----------------------------------------------------------------------------
# Speed and memory


def peak_flops(device):
    """Dense bf16 peak of known GPUs, for MFU; None where unknown (CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L4", 121e12)):
        if key in name:
            return flops
    return None


def report_model_state(engine, device, rank, world, stage, n_params, n_trained, step, metrics, log):
    """Every rank's model-state bytes (engine.memory_report()) and peak memory into metrics.jsonl, and
    rank 0's beside the ZeRO paper's formula in the log; every rank calls it."""
    mine = {**engine.memory_report(), "peak_mem_gib": peak_memory_gib(device)}
    memory = [mine]
    if world > 1:
        memory = [None] * world
        dist.all_gather_object(memory, mine)
    if rank == 0:
        formula = zero_formula_bytes(n_params, n_trained, stage, world)
        metrics.write({"step": step, "memory": memory, "zero_formula_bytes": formula})
        mib = {k: v / 2**20 for k, v in memory[0].items() if k != "peak_mem_gib"}
        log(f"model state on rank 0: {mib['total']:.2f} MiB (params {mib['params']:.2f}, grads {mib['grads']:.2f}, "
            f"optimizer {mib['optimizer_state']:.2f}); the ZeRO paper's fp32 formula: {formula / 2**20:.2f} MiB")


def zero_formula_bytes(n_params, n_trained, stage, world):
    """The ZeRO paper's model-state bytes per rank with fp32 weights and Adam: 4 (weights) + 4 (gradients)
    + 8 (moments) per parameter, the moments sharded from stage 1, gradients from 2, weights at 3."""
    share = [1 / world if stage >= s else 1 for s in (3, 2, 1)]
    return 4 * n_params * share[0] + 4 * n_trained * share[1] + 8 * n_trained * share[2]


def peak_memory_gib(device):
    """Peak tensor memory on a GPU; on a CPU, this process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


# -----------------------------------------------------------------------------
# Eval


@torch.no_grad()
def evaluate(model, eval_set, cfg, device, autocast, rank, world):
    """Token-weighted loss over the whole eval set (every rank takes every world-th sample).

    Every rank runs the same number of forwards, a rank out of samples on a stand-in that counts for
    nothing: a ZeRO-3 engine gathers the weights with collectives inside each forward."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(rank, len(eval_set), world))
    for start in range(0, -(-len(eval_set) // world), cfg["batch_size"]):
        chunk = indices[start:start + cfg["batch_size"]]
        idx, labels = pad_batch([eval_set[i] for i in chunk or [0]], device)
        if not chunk:
            labels.fill_(-100)
        n = (labels != -100).sum()
        with autocast:
            loss = model(idx, labels)
        if chunk and n > 0:
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
    """Share of eval prompts whose greedy continuation equals the reference response exactly.

    As in evaluate(), every rank takes the same steps (the same number of generate calls, each the
    whole length of the longest reference, without stopping early at end-of-text) for ZeRO-3."""
    model.eval()
    total = min(count, len(eval_set))
    indices = list(range(total))[rank::world]
    longest = max(len(eval_set.prompt_and_response(i)[1]) for i in range(total))
    eot = tokenizer.eot_token
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, -(-total // world), 64):
        chunk = indices[start:start + 64]
        pairs = [eval_set.prompt_and_response(i) for i in chunk or [0]]  # a stand-in on a rank out of prompts
        with autocast:
            outputs = model.generate([p for p, _ in pairs], max_new_tokens=longest, temperature=0.0,
                                     vocab_limit=tokenizer.n_vocab)
        for (_, reference), out in zip(pairs[:len(chunk)], outputs):
            hits[0] += float(out[:out.index(eot) + 1] == reference if eot in out else False)
        hits[1] += len(chunk)
    if world > 1:
        dist.all_reduce(hits)
    model.train()
    return {"exact_match": (hits[0] / hits[1].clamp(min=1)).item()}


# -----------------------------------------------------------------------------
# Stopping: signals, NaN/Inf


class StopSignals:
    """While installed, SIGTERM (a scheduler's preemption; torchrun forwards it to every worker) and
    SIGINT (Ctrl-C) only record that the run should stop: the loop finishes its step, writes a
    checkpoint and exits. Repeats are ignored (Ctrl-C under torchrun reaches a worker twice, from the
    terminal and from torchrun); SIGKILL still ends a run at once, at the cost of the work since the
    last checkpoint. The handler only sets a number: printing from it could interrupt a print."""

    def __init__(self):
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.received = self.received or signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def weights_are_finite(weights, world):
    """Whether the consolidated weights (engine.full_state_dict(): rank 0's, None elsewhere) are free of
    NaN/Inf, with rank 0's answer on every rank. The consolidated copy is checked so that an engine that
    shards the parameters (ZeRO-3) is checked whole."""
    finite = weights is None or all(bool(torch.isfinite(t).all()) for t in weights.values())
    return from_rank0(finite, world)


def write_nonfinite_batches(output_dir, step, rank, micro, loss):
    """output_dir/nonfinite-step-<step>-rank<rank>.json: where this rank's micro-batches of a NaN/Inf
    step came from (epoch, global micro-batch, training-set sample indices per row), to look at."""
    path = os.path.join(output_dir, f"nonfinite-step-{step:08d}-rank{rank}.json")
    with open(path, "w") as f:
        json.dump({"step": step, "rank": rank, "loss": loss, "micro_batches": [b["samples"] for b in micro]}, f)
    return path


# -----------------------------------------------------------------------------
# Checkpoints and logs


# A checkpoint is a directory ckpt-<step>/ holding each rank's engine files, the trainer's state
# (rank 0), the consolidated weights and manifest.json: every file with its size and sha256, the step
# and the id of the run that wrote it. It is written as ckpt-<step>.tmp/ and renamed once every rank
# is done. run.json in output_dir names the run whose checkpoints these are: resume and rotation
# consider that run's checkpoints only, and a resume checks every sha256 first, falling back to the
# previous intact checkpoint. run.lock, locked by rank 0 for the run's life, keeps a second run out.
CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8,})")
LEFTOVER_NAME = re.compile(r"(ckpt-\d{8,})\.(tmp|old)")  # being written, or being replaced, when a crash came
TRAINER_FILE, WEIGHTS_FILE, MANIFEST_FILE = "trainer.pt", "model.pt", "manifest.json"
RUN_FILE, LOCK_FILE = "run.json", "run.lock"
RUN_OUTPUTS = re.compile(r"metrics\.jsonl|hf|tensorboard|nonfinite-step-\d{8}-rank\d+\.json")  # besides checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (a full disk, say): the message says where and why."""


def claim_output_dir(output_dir, resume, overwrite, rank, world, log):
    """Makes output_dir this run's before any work: rank 0 locks it for the run's life, restores or
    removes what a crash left behind and, for a new run, refuses an earlier run's output unless told
    to overwrite it. Returns (the lock, to keep referenced, None on other ranks; a new run id)."""
    lock, error = None, None
    if rank == 0:
        try:
            if resume and overwrite:
                raise OptionError("give either --resume (continue the run in --output_dir) or "
                                  "--overwrite_output_dir (replace it), not both")
            lock = lock_output_dir(output_dir)
            remove_leftovers(output_dir, log)
            if not resume:
                make_room_for_new_run(output_dir, overwrite, log)
        except OptionError as e:
            error = str(e)
    error, run_id = from_rank0((error, uuid.uuid4().hex), world)
    if error:
        raise OptionError(error)
    return lock, run_id


def from_rank0(value, world):
    """Rank 0's value on every rank, so that all ranks take the same decision."""
    if world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def lock_output_dir(output_dir):
    """An exclusive lock on output_dir/run.lock while the returned file stays open. The kernel drops
    it when the process ends, however it ends, so a killed run leaves nothing stuck."""
    f = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OptionError(f"--output_dir={output_dir} is in use by a run that is still going ({holder}); "
                          f"wait for it to end or give another --output_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_leftovers(output_dir, log):
    """A crash can leave ckpt-<step>.tmp/ (unfinished: removed) and ckpt-<step>.old/ (a complete
    checkpoint moved aside for the same step saved again: restored if its replacement never arrived)."""
    for name in sorted(os.listdir(output_dir)):  # .old before .tmp
        match = LEFTOVER_NAME.fullmatch(name)
        path = os.path.join(output_dir, name)
        if not match or not os.path.isdir(path):
            continue
        final = os.path.join(output_dir, match.group(1))
        if match.group(2) == "old" and not os.path.exists(final):
            os.replace(path, final)
            log(f"restored {final} from {name}, left by an interrupted run")
        else:
            shutil.rmtree(path)
            log(f"removed {path}, left unfinished by an interrupted run")


def make_room_for_new_run(output_dir, overwrite, log):
    """A new run must not mix its checkpoints and metrics with an earlier run's: that output stops
    the run, or with --overwrite_output_dir is removed first."""
    checkpoints = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    outputs = sorted(name for name in os.listdir(output_dir) if RUN_OUTPUTS.fullmatch(name))
    if not checkpoints and "metrics.jsonl" not in outputs:
        return
    if not overwrite:
        found = ", ".join(checkpoints[-2:]) if checkpoints else "metrics.jsonl and no checkpoint"
        resume = "continue that run with --resume or " if checkpoints else ""
        raise OptionError(f"--output_dir={output_dir} holds an earlier run's output ({found}): {resume}"
                          f"replace it with --overwrite_output_dir")
    for name in checkpoints + outputs + [RUN_FILE]:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    log(f"--overwrite_output_dir: removed the earlier run's {', '.join(checkpoints + outputs)} from {output_dir}")


def list_checkpoints(output_dir):
    """(step, path) of every directory named as this project's checkpoints (ckpt-<8 digits>), ordered by
    step; any other name, such as ckpt-best/, is the user's and never touched."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def read_json_object(path):
    """The JSON object in path, or None when the file is missing, unreadable or holds no object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_of(ckpt_dir):
    """The id of the run that wrote a checkpoint, from its manifest (None if it has none)."""
    return (read_json_object(os.path.join(ckpt_dir, MANIFEST_FILE)) or {}).get("run_id")


def find_checkpoint(path, log=lambda message: print(message, file=sys.stderr), set_aside=False):
    """An intact checkpoint: path itself when it is a checkpoint directory, else the latest intact one
    of the run that run directory path records (of any run, without a record). Each one passed over is
    reported by name; with set_aside (rank 0 of a resume) they are renamed <name>.rejected, so that the
    resumed run neither counts them as its own nor writes over them. None if none is intact."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):  # a checkpoint directory named by the user
        problem = checkpoint_problem(path)
        if problem:
            raise OptionError(f"{path} is not a train_sft.py checkpoint, or not an intact one: {problem}")
        return path
    run_id = (read_json_object(os.path.join(path, RUN_FILE)) or {}).get("run_id")
    passed_over = []
    for _, candidate in reversed(list_checkpoints(path)):
        problem = checkpoint_problem(candidate, run_id)
        if problem is None:
            for rejected in passed_over if set_aside else []:
                move_aside(rejected, log)
            if passed_over:
                log(f"using the previous intact checkpoint, {candidate}")
            return candidate
        log(f"checkpoint {candidate} cannot be used: {problem}")
        passed_over.append(candidate)
    return None


def move_aside(ckpt_dir, log):
    """Renames a checkpoint that a resume passed over to <name>.rejected (.rejected2, ... when taken)."""
    target, count = ckpt_dir + ".rejected", 1
    while os.path.exists(target):
        count += 1
        target = f"{ckpt_dir}.rejected{count}"
    os.replace(ckpt_dir, target)
    log(f"moved {ckpt_dir} aside to {target}")


def checkpoint_problem(ckpt_dir, run_id=None):
    """None if ckpt_dir is an intact checkpoint (of run run_id, when given), else what is wrong with it.
    Ranks share the hashing (each checks every world-th file) and all get the same answer."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    manifest = read_json_object(os.path.join(ckpt_dir, MANIFEST_FILE))
    named_step = CHECKPOINT_NAME.fullmatch(os.path.basename(ckpt_dir))
    problem = None
    if manifest is None or not isinstance(manifest.get("files"), dict):
        problem = f"its {MANIFEST_FILE} is missing or unreadable (an unfinished or foreign directory)"
    elif named_step and manifest.get("step") != int(named_step.group(1)):
        problem = f"its {MANIFEST_FILE} is for step {manifest.get('step')!r} (a foreign directory)"
    elif run_id is not None and manifest.get("run_id") != run_id:
        problem = f"it was written by another run than the one {RUN_FILE} records"
    else:
        for name in sorted(manifest["files"])[rank::world]:
            problem = file_problem(ckpt_dir, name, manifest["files"][name])
            if problem:
                break
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem


def file_problem(ckpt_dir, name, expected):
    """What is wrong with one file of a checkpoint, measured against its manifest entry; None if nothing."""
    path = os.path.join(ckpt_dir, name)
    if not isinstance(expected, dict) or os.path.isabs(name) or ".." in name.split("/"):
        return f"its {MANIFEST_FILE} entry for {name!r} is not valid"
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != expected.get("bytes"):
        return f"{name} has {size} bytes instead of {expected.get('bytes')} (truncated or replaced)"
    if sha256_of(path) != expected.get("sha256"):
        return f"{name} does not match its sha256 (corrupted)"
    return None


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def save_checkpoint(output_dir, step, engine, trainer_state, keep, rank, world):
    """Every rank writes its engine files into ckpt-<step>.tmp/, rank 0 adds the trainer state, the
    consolidated weights and the manifest, then renames it to ckpt-<step>/ and drops this run's oldest
    checkpoints. A checkpoint that does not fit stops the run with CheckpointError before it is renamed:
    the unfinished directory is removed and the earlier checkpoints stay as they were."""
    final = os.path.join(output_dir, f"ckpt-{step:08d}")
    tmp = final + ".tmp"
    run_id = trainer_state["run_id"]
    weights = engine.full_state_dict()  # collective: every rank takes part
    needed, error = 0, None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        needed = checkpoint_bytes_needed(output_dir, run_id, weights)
        free = shutil.disk_usage(output_dir).free
        if free < needed:
            error = (f"checkpoint step {step} needs about {mib(needed)} in {output_dir} but only {mib(free)} "
                     f"are free: the run stops here and keeps its earlier checkpoints")
        else:
            os.makedirs(tmp)
    error, needed = from_rank0((error, needed), world)
    if error:
        raise CheckpointError(error)
    with removed_on_failure(tmp, output_dir, step, needed):
        engine.save(tmp)
        if rank == 0:
            torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
            torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
    barrier(world)  # every rank's files are in place
    if rank == 0:
        with removed_on_failure(tmp, output_dir, step, needed):
            write_manifest(tmp, {"step": step, "engine": trainer_state["engine"], "run_id": run_id})
        replace_directory(tmp, final)
        fsync_directory(output_dir)  # the rename itself survives a power cut
        write_run_record(output_dir, run_id)
        remove_old_checkpoints(output_dir, keep, run_id)
    barrier(world)
    return final


def checkpoint_bytes_needed(output_dir, run_id, weights):
    """The space the next checkpoint needs: the size of this run's latest one or, before the first,
    a lower bound from the state (the consolidated weights; engines write theirs in other dtypes)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        manifest = read_json_object(os.path.join(path, MANIFEST_FILE))
        if manifest and manifest.get("run_id") == run_id and isinstance(manifest.get("files"), dict):
            return sum(entry.get("bytes", 0) for entry in manifest["files"].values() if isinstance(entry, dict))
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in weights.values()}.values())


@contextlib.contextmanager
def removed_on_failure(tmp, output_dir, step, needed):
    """Turns a failed write (torch.save reports a full disk as a RuntimeError) into one sentence, after
    removing the unfinished directory so that it cannot fill the disk for the next run."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(output_dir).free  # before the removal frees space again
        failure = e
        while failure is not None:  # frees the writers held by the tracebacks: their files are still open
            traceback.clear_frames(failure.__traceback__)
            failure = failure.__context__
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 2**20:
            reason = f"the disk is full ({mib(free)} free; it needs at least {mib(needed)})"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint step {step} could not be written to {output_dir}: {reason}; "
                              f"the run stops here and keeps its earlier checkpoints") from None


def mib(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def barrier(world):
    if world > 1:
        dist.barrier()


def write_manifest(ckpt_dir, info):
    """manifest.json: every other file under ckpt_dir with its size and sha256, beside info. Each file
    is flushed to disk first, so that a renamed checkpoint survives a power cut too."""
    files = {}
    for root, _, names in os.walk(ckpt_dir):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, ckpt_dir)
            if relative == MANIFEST_FILE:
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[relative] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    with open(os.path.join(ckpt_dir, MANIFEST_FILE), "w") as f:
        json.dump({**info, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_run_record(output_dir, run_id):
    """run.json: the run whose checkpoints output_dir holds (written atomically, when it changes)."""
    path = os.path.join(output_dir, RUN_FILE)
    if (read_json_object(path) or {}).get("run_id") != run_id:
        with open(path + ".tmp", "w") as f:
            json.dump({"run_id": run_id}, f)
        os.replace(path + ".tmp", path)


def replace_directory(src, dst):
    """Renames src to dst; an existing dst (the same step saved again) is moved aside first, so a
    complete checkpoint exists at every moment (remove_leftovers restores it after a crash)."""
    if os.path.exists(dst):
        os.replace(dst, dst + ".old")
        os.replace(src, dst)
        shutil.rmtree(dst + ".old")
    else:
        os.replace(src, dst)


def remove_old_checkpoints(output_dir, keep, run_id):
    """Keeps the latest `keep` of this run's checkpoints by step; every other run's and name is left alone."""
    ours = [path for _, path in list_checkpoints(output_dir) if run_of(path) == run_id]
    for path in ours[:-keep]:
        shutil.rmtree(path)


def load_checkpoint(path):
    """The trainer's state of a checkpoint directory, with the consolidated weights as "model" and the
    id of the run that wrote it as "run_id"."""
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
    state["path"], state["run_id"] = path, run_of(path)
    return state


class MetricsLog:
    """One JSON object per line in output_dir/metrics.jsonl (appended across resumes), and TensorBoard.

    A resumed run starts from its checkpoint's step, so records after that step (written before a
    crash) are dropped: they are about to be written again. So is a line that a kill cut short."""

    def __init__(self, output_dir, tensorboard, resumed_step=None, log=print):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if resumed_step is not None and os.path.exists(self.path):
            kept = self.records_up_to(resumed_step, log)
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

    def records_up_to(self, step, log):
        """The lines of records up to step; an unreadable line (the torn end of a killed write) is
        dropped with a notice rather than stopping the resume."""
        kept = []
        with open(self.path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    record_step = json.loads(line)["step"]
                except (ValueError, TypeError, KeyError):
                    log(f"metrics: dropped line {number} of {self.path}, which is not a whole record "
                        f"(a write cut short by a kill)")
                    continue
                if record_step <= step:
                    kept.append(line.rstrip("\n") + "\n")
        return kept

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
    # Rank 0 holds the output directory's lock until the run ends; a new run gets a new id.
    lock, run_id = claim_output_dir(cfg["output_dir"], cfg["resume"], cfg["overwrite_output_dir"], rank, world, log)
    if cfg["kernels"] == "triton" and not sft_kernels.runs_on(device):
        raise OptionError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1, for tests); "
                          "use --kernels=torch on CPU")

    checkpoint = starting_checkpoint(cfg, explicit, log, master)
    if checkpoint is not None and cfg["resume"]:
        run_id = checkpoint["run_id"] or run_id  # the resumed run keeps its id
    check_engine_options(cfg, explicit, world, device)
    check_sparse_options(cfg)
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
        raise OptionError(data_error_sentence(e, cfg["cache_dir"])) from None
    accum = cfg["gradient_accumulation_steps"]
    total_steps = cfg["max_steps"] or cfg["num_train_epochs"] * batches.batches_per_epoch // accum
    if total_steps < 1:
        raise OptionError(f"{len(train_set)} training samples make no full optimizer step of "
                          f"{world} ranks x {accum} micro-batches x {cfg['batch_size']}")

    # Model: from scratch, a Hugging Face directory or a checkpoint; then the engine that trains it.
    model = prepare_model(cfg, tokenizer.n_vocab, checkpoint, device)
    n_params = model.num_params(non_embedding=False)  # counted before an engine may shard the parameters
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    flops_per_token = model.flops_per_token(cfg["max_seq_len"])
    optimizer = make_optimizer(model, cfg, fused=device.type == "cuda" and not cfg["offload"],
                               total_steps=total_steps)
    engine = make_engine(cfg, model, optimizer)
    dtype = getattr(torch, cfg["dtype"])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    if cfg["sparse_density"] > 0:
        if cfg["sparse_init"] == "gradient" and not cfg["resume"]:
            choose_sparse_entries(model, optimizer, batches, device, autocast)
        log(sparse_report(optimizer))
    step = 0
    if cfg["resume"]:
        step = resume_run(checkpoint, engine, batches, rank)
        log(f"resumed from {checkpoint['path']} at step {step}")
    checkpoint = None  # free the host memory it holds

    peak = peak_flops(device)
    log(f"model: {n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained; {world} rank(s) x {accum} x "
        f"{cfg['batch_size']} samples per step, {total_steps} steps, {cfg['dtype']} on {device.type}; "
        f"loss {model.loss_fn.__module__}.{model.loss_fn.__name__}")
    memory, formula = engine.memory_report(), zero_formula_bytes(n_params, n_trained, cfg["zero_stage"], world)
    tqdm.write(f"rank {rank} model state at start: " + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in memory.items())
               + f"; the ZeRO paper's fp32 formula for stage {cfg['zero_stage']} on {world} rank(s): "
               f"{formula / 2**20:.3f} MiB")
    resumed_step = step if cfg["resume"] else None
    metrics = MetricsLog(cfg["output_dir"], cfg["tensorboard"], resumed_step, log) if master else None

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
                         "model_config": vars(model.config).copy(), "engine": cfg["engine"], "world_size": world,
                         "run_id": run_id}
        path = save_checkpoint(cfg["output_dir"], step, engine, trainer_state, cfg["keep_checkpoints"], rank, world)
        log(f"checkpoint step {step} -> {path}")

    progress = tqdm(total=total_steps, initial=step, disable=not master, dynamic_ncols=True, desc="sft")
    nonfinite_in_a_row, failure, stopping, signals = 0, None, False, StopSignals()
    window_tokens, window_start = 0, time.perf_counter()
    while step < total_steps and not stopping:
        # Fetch the step's micro-batches first: the loss is normalised by the trained tokens of the
        # whole step on all ranks, so splitting a batch differently cannot change the result.
        micro = [batches.next_batch() for _ in range(accum)]
        counts = torch.tensor([float(sum((b["labels"] != -100).sum() for b in micro)),
                               float(sum(b["input_ids"].numel() for b in micro)), float(signals.received)],
                              device=device)
        if world > 1:
            dist.all_reduce(counts)
        stop_votes = counts[2].to("cpu", non_blocking=True)  # read after the step's one host sync
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
        # A signal stops the run after this step; ranks agree through the votes sent with the counts.
        stopping = bool(stop_votes) if world > 1 else signals.received > 0
        # Skipped steps are rare, so the device syncs of the checks below cost nothing in a normal step.
        if applied or cfg["dtype"] == "float16" and math.isfinite(step_loss.item()):
            nonfinite_in_a_row = 0
            if not applied:
                log(f"step {step - 1}: gradient overflow in float16, optimizer step skipped; "
                    f"loss scale now {engine.loss_scale:g}")
        else:
            nonfinite_in_a_row += 1
            listed = write_nonfinite_batches(cfg["output_dir"], step - 1, rank, micro, step_loss.item())
            log(f"step {step - 1}: NaN/Inf loss or gradient (loss {step_loss.item():.4g}), optimizer step skipped "
                f"({nonfinite_in_a_row} in a row); its batches are listed in {listed}")
            if nonfinite_in_a_row >= cfg["max_nonfinite_steps"]:
                failure = (f"NaN/Inf loss or gradient for {nonfinite_in_a_row} steps in a row at step {step - 1}: "
                           f"stopping instead of training on garbage, nothing exported (lower --learning_rate, "
                           f"use --dtype=bfloat16, or check the init weights and the batches listed in "
                           f"{cfg['output_dir']}/nonfinite-step-*.json)")
                break
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
        if stopping:
            break  # the checkpoint follows the loop
        pause = time.perf_counter()  # eval and checkpoints do not count against tokens/s
        if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < total_steps:
            run_eval()
        if cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < total_steps:
            checkpoint_now()
        window_start += time.perf_counter() - pause
    progress.close()
    signals.restore()
    report_model_state(engine, device, rank, world, cfg["zero_stage"], n_params, n_trained, step, metrics, log)

    result = None
    weights = engine.full_state_dict()  # collective; rank 0 checks and exports this consolidated copy
    if not failure and (nonfinite_in_a_row or not weights_are_finite(weights, world)):
        failure = (f"the run ended at step {step} with a NaN/Inf {'loss' if nonfinite_in_a_row else 'weight'}: "
                   f"neither its checkpoint nor its export is written (see {cfg['output_dir']}/nonfinite-step-*"
                   f".json and lower --learning_rate, or check the init weights)")
    if stopping and not failure:
        checkpoint_now()
    elif not failure:
        checkpoint_now()  # checkpoint and export first, so that nothing in the final eval can cost the trained model
        if master:
            log(f"exported Hugging Face model -> {export_hf(weights, vars(model.config), cfg, cfg['output_dir'])}")
        if master and cfg["sparse_density"] > 0:
            path = os.path.join(cfg["output_dir"], "sparse_delta.safetensors")
            log(f"sparse delta -> {sparse.save_delta(optimizer, path, base_name=cfg['init_from'])}")
        result = run_eval()
    if dist.is_initialized():
        # Release the engine before the process group: dropped later (when main returns), its last
        # reference to the group would destroy it while holding the GIL that gloo's threads wait for.
        del engine
        dist.barrier()
        dist.destroy_process_group()
    if failure:
        raise RunStopped(f"error: {failure}" if master else "", EXIT_NONFINITE)
    if stopping:
        name = signal.Signals(signals.received or signal.SIGTERM).name
        raise RunStopped(f"stopped by {name} after step {step}; its checkpoint is in {cfg['output_dir']}, "
                         f"continue with --resume" if master else "", 128 + (signals.received or signal.SIGTERM))
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as e:  # bad input: one sentence, no traceback
        print(f"train_sft.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except CheckpointError as e:  # a full disk, say: one sentence, no traceback
        print(f"train_sft.py: error: {e}", file=sys.stderr)
        sys.exit(EXIT_CHECKPOINT_NOT_WRITTEN)
    except RunStopped as e:
        if str(e):
            print(f"train_sft.py: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, where there is no step to finish
        print("train_sft.py: interrupted; the latest checkpoint in output_dir, if any, holds the run's work",
              file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
