"""
The trainer's options in one table: each option's default and meaning, its allowed choices and
ranges, `--help`, the parser for `[config.py] [--key=value ...]` (sample.py, data.py inspect and the
benchmarks reuse it with tables of their own), and the checks that span several options.

A config file is python that assigns option names; the command line overrides it. Every value
is converted to the type of its default and checked against its choices and range here, so a
bad value stops the run with one sentence (OptionError) before any work starts.
"""
import math
import os
import sys

from model import FAMILIES

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
    "tokenizer": ("gpt2", "gpt2 | byte (256 byte tokens, for tiny CPU runs) | a directory with tokenizer.json "
                          "(Hugging Face's) | a .gguf file; default with --init_from=DIR or FILE.gguf: its own "
                          "tokenizer, if it has one"),
    "max_seq_len": (512, "most tokens in one sample, end-of-text included"),
    "truncate_prompt": (False, "cut over-long prompts from the left instead of dropping the sample"),
    "loss_on_prompt": (False, "train on prompt tokens too (DeepSpeed-Chat's behaviour, for comparison)"),
    "skip_bad_rows": (False, "skip and count malformed rows instead of stopping"),
    "template": ("deepspeed_chat", "how a prompt and response become text: deepspeed_chat | raw | chat | model (the "
                                   "tokenizer directory's own chat template; trains the assistant turns only), or a "
                                   "custom string with {prompt} and {response}"),
    "packing": (False, "pack several samples per row (no attention between them) instead of padding"),
    "group_by_length": (True, "batch samples of similar length together (less padding); false = fully random"),
    "cache_dir": (".cache/data", "where tokenized data is cached, keyed by its content and options"),
    # model
    "init_from": ("scratch", f"scratch | a Hugging Face directory ({', '.join(FAMILIES)}) | a .gguf file (llama, "
                            "qwen2, qwen3, gpt2; dequantized to float) | a checkpoint directory or run directory"),
    "model_type": ("gpt2", f"the family of a model from scratch: {' | '.join(FAMILIES)} (all but gpt2: RMSNorm, "
                           "rotary positions, SwiGLU; qwen2 adds qkv biases, qwen3 q/k norms; see docs/model.md)"),
    "n_layer": (12, "layers (scratch only)"),
    "n_head": (12, "attention heads (scratch only)"),
    "n_embd": (768, "width (scratch only)"),
    "n_kv_head": (0, "key/value heads, grouped-query attention (scratch only); 0 = n_head"),
    "bias": (True, "biases in Linear and LayerNorm (scratch, model_type gpt2 only: the Llama family has none)"),
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
    "export_gguf": ("", "also export <output_dir>/model-<type>.gguf for llama.cpp, Ollama and LM Studio, its "
                        "matrices in f32 | f16 | q8_0; empty = no GGUF"),
    "resume": (False, "continue the run in output_dir from its latest intact checkpoint"),
    "resume_data_changed": ("stop", "--resume when a training file's content changed since the checkpoint: stop | "
                                    "continue (the same data position) | restart_epoch (its epoch over, from the start)"),
    "overwrite_output_dir": (False, "a new run in an output_dir holding an earlier run's checkpoints or metrics "
                                    "removes them (and its hf/, tensorboard/) instead of stopping"),
    "log_interval": (10, "optimizer steps between log lines"),
    "eval_interval": (0, "optimizer steps between evals; 0 = only at the end"),
    "eval_exact_match": (0, "eval: greedy-generate this many eval responses and score exact match; 0 = off"),
    "eval_at_start": (False, "also evaluate before the first step: the starting model's figures, to compare the end with"),
    "checkpoint_interval": (0, "optimizer steps between checkpoints; 0 = only at the end"),
    "keep_checkpoints": (2, "how many of the latest checkpoints to keep in output_dir"),
    "tensorboard": (False, "also log to TensorBoard in output_dir/tensorboard (needs the tensorboard package)"),
}


CHOICES = {
    "engine": ("native", "deepspeed"),
    "data_format": ("auto", "prompt_response", "prompt_chosen", "prompt_completion", "messages", "alpaca", "sharegpt"),
    "model_type": tuple(FAMILIES),
    "kernels": ("torch", "triton"),
    "sparse_init": ("random", "gradient"),
    "lr_scheduler": ("cosine", "linear", "constant"),
    "device": ("auto", "cpu", "cuda"),
    "dtype": ("float32", "bfloat16", "float16"),
    "resume_data_changed": ("stop", "continue", "restart_epoch"),
    "export_gguf": ("", "f32", "f16", "q8_0"),
}


# Allowed ranges (lowest, highest or None), both inclusive; every other number must be at least 0. A
# highest value is what the machine can honour: numpy seeds are 32-bit, 2.0 ** 64 is already a loss scale
# no float16 run needs, and positions and accumulation far beyond any real run would only exhaust memory
# before the first step (check_combinations also bounds what one step holds).
RANGES = {"max_seq_len": (2, 2**20), "zero_stage": (0, 3), "dropout": (0, 0.99), "beta1": (0, 0.9999),
          "beta2": (0, 0.9999), "min_lr_ratio": (0, 1), "sparse_density": (0, 1), "sparse_regrow_share": (0, 1),
          "seed": (0, 2**32 - 1), "initial_scale_power": (0, 64), "gradient_accumulation_steps": (1, 2**14),
          **{name: (1, None) for name in (
              "batch_size", "n_layer", "n_head", "n_embd", "log_interval", "keep_checkpoints", "max_nonfinite_steps",
              "num_train_epochs")}}

MAX_STEP_POSITIONS = 2**28  # token positions one optimizer step holds at once (ids and labels: 4 GiB)


# Options that shape the model: a checkpoint to start from must agree with them.
MODEL_OPTIONS = ("tokenizer", "model_type", "n_layer", "n_head", "n_kv_head", "n_embd", "bias", "lora_dim",
                 "lora_scaling", "lora_module_name")


# Options that a resumed run may change; every other one is the checkpoint's. A run resumed on another
# number of ranks keeps its batch by changing gradient_accumulation_steps (2 ranks x 3 = 3 ranks x 2).
RESUME_MAY_CHANGE = ("resume", "resume_data_changed", "max_steps", "num_train_epochs", "log_interval", "eval_interval", "eval_exact_match",
                     "eval_at_start", "checkpoint_interval", "keep_checkpoints", "tensorboard", "device", "compile",
                     "kernels", "output_dir", "cache_dir", "gradient_accumulation_steps", "export_gguf")


class OptionError(ValueError):
    """A bad option, config file or output directory: the message says which and why."""


def usage(options, doc):
    lines = [doc.strip(), ""] if doc.strip() else []
    lines.append("Options (--key=value; booleans also as --key):")
    for name, (default, meaning) in options.items():
        lines.append(f"  --{name:<28} {meaning} [default: {default!r}]")
    return "\n".join(lines)


def markdown_table(options=OPTIONS):
    """The option table as docs/options.md shows it (bench/results_table.py --write puts it there). A '|' in a
    cell is escaped as '\\|', or GitHub would split the row there and show the rest under other columns."""
    def cell(text):
        return str(text).replace("|", "\\|")
    lines = ["| option | default | meaning |", "|---|---|---|"]
    lines += [f"| `{cell(name)}` | `{cell(repr(default))}` | {cell(meaning)} |"
              for name, (default, meaning) in options.items()]
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


def parse_options(argv, options=OPTIONS, choices=CHOICES, ranges=RANGES, doc=""):
    """Defaults, then an optional python config file, then --key=value overrides; --help prints doc
    and the option table.

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


def parse_script_options(argv, options, doc):
    """parse_options for a script's own table (a benchmark's, say): its values, or for a bad option one
    sentence naming it and exit status 2, as the trainer does."""
    try:
        return parse_options(argv, options, {}, {}, doc)[0]
    except OptionError as e:
        print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)


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
    except SystemExit as e:  # else the run would end here, silently, with the file's exit status
        raise OptionError(f"config file {shown} called sys.exit({e.code if e.code is not None else ''}) or raised "
                          f"SystemExit: a config file only assigns options") from None
    except Exception as e:
        raise OptionError(f"config file {shown} failed to run: {type(e).__name__}: {e}") from None
    values = {k: v for k, v in scope.items() if not k.startswith("_") and not callable(v)
              and not isinstance(v, type(os))}
    for name in values:
        if name not in options:
            raise OptionError(f"config file {shown} sets unknown option {name!r}")
    return values


def check_combinations(cfg):
    """Options that cannot work together stop the run here, before any data is prepared; called once a
    checkpoint or a DeepSpeed JSON has supplied the options it fixes."""
    if cfg["engine"] == "native":
        for name in ("deepspeed_config", "offload"):
            if cfg[name]:
                raise OptionError(f"--{name} is a DeepSpeed setting: it needs --engine=deepspeed")
    if cfg["offload"] and cfg["zero_stage"] == 0:
        raise OptionError("--offload moves the sharded optimizer state: it needs --zero_stage=1, 2 or 3")
    if cfg["data_path"] == "demo" and cfg["eval_data_path"]:
        raise OptionError(f"--eval_data_path={printable(cfg['eval_data_path'])} is not used with --data_path=demo, "
                          f"which brings its own eval set: give your training files as --data_path too, or leave "
                          f"it out")
    positions = cfg["gradient_accumulation_steps"] * cfg["batch_size"] * cfg["max_seq_len"]
    if positions > MAX_STEP_POSITIONS:
        raise OptionError(f"--gradient_accumulation_steps={cfg['gradient_accumulation_steps']} x --batch_size="
                          f"{cfg['batch_size']} x --max_seq_len={cfg['max_seq_len']} is {positions:,} token positions, "
                          f"which one optimizer step holds in memory at once (about {positions * 16 / 2**30:.0f} GiB "
                          f"of ids and labels); lower one of them (at most {MAX_STEP_POSITIONS:,} positions)")
    if cfg["only_optimize_lora"] and not cfg["lora_dim"]:
        raise OptionError("--only_optimize_lora needs --lora_dim > 0")
    # Sparse fine-tuning lives in the optimizer, whose gathered gradients only the native engine's stage 0
    # knows how to carry; LoRA would train the same matrices a second way.
    if cfg["sparse_density"] > 0 and cfg["lora_dim"]:
        raise OptionError("--sparse_density cannot be combined with --lora_dim: choose one way of fine-tuning")
    if cfg["sparse_density"] > 0 and (cfg["engine"] != "native" or cfg["zero_stage"] != 0):
        raise OptionError(f"--sparse_density needs the native engine at --zero_stage=0; --engine={cfg['engine']} "
                          f"--zero_stage={cfg['zero_stage']} cannot carry its sparse gradients")
