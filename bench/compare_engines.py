"""The same training run on each engine and ZeRO stage, side by side: loss curves, speed, memory.

    python bench/compare_engines.py        # CPU: 2 gloo ranks, the demo task, fp32; GPU: 1 GPU, GPT-2 124M, bf16
    python bench/compare_engines.py --preset=gpt2_124m_cpu   # CPU: 2 gloo ranks, GPT-2 124M's shape, 64 tokens
    python bench/compare_engines.py --engines=native,deepspeed --stages=0,1,2,3 --steps=60 --nproc=2

Each (engine, stage) is a real `torchrun train_sft.py` with the same options and seed; a native
stage the native engine does not have yet is listed as such. Every row is compared with the first
one (native stage 0 by default). Each stage runs --repeats times on every engine in alternating order
(native, deepspeed, native, deepspeed, ...), so that a change in the machine's load while the benchmark
runs falls on both engines alike. A run's tokens/s is the median over its steps after --warmup, a row's
the median of its runs (each run's figure is kept); losses and memory are those of a row's first run.
Peak memory is each rank's (CPU: peak resident memory of the process; GPU:
torch.cuda.max_memory_allocated); model state is each rank's engine.memory_report() beside the ZeRO
paper's fp32 formula. Writes bench/results/engines_<device>.json (gpt2_124m_cpu:
engines_124m_<device>.json) with the load average before and after and a digest of every source the
runs execute, and a loss-curve PNG beside it. gpt2_124m_cpu is GPT-2 small's shape at a size a 2-core
CPU runs in about ten minutes for all eight rows, one run each: short packed sequences and a
few steps, so its tokens/s are about the engines' cost per step on a real model's parameter count, not
about long-sequence compute.
"""
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import load_average, provenance  # noqa: E402
from options import OptionError, parse_options  # noqa: E402

OPTIONS = {
    "engines": ("native,deepspeed", "comma-separated engines to run"),
    "stages": ("0,1,2,3", "comma-separated ZeRO stages to run on each engine"),
    "preset": ("auto", "demo (a 0.8M-parameter GPT on the built-in task) | gpt2_124m (GPT-2 small's shape) | "
                       "gpt2_124m_cpu (GPT-2 small's shape, 64-token packed rows, a few steps) | "
                       "auto (demo on a CPU, gpt2_124m on a GPU)"),
    "nproc": (0, "processes (ranks) per run; 0 = 2 on a CPU, 1 on a GPU"),
    "steps": (40, "optimizer steps per run"),
    "warmup": (5, "steps left out of tokens/s"),
    "repeats": (1, "runs of each (engine, stage), alternating between the engines; tokens/s is their median"),
    "dtype": ("auto", "float32 | bfloat16 | auto (float32 on a CPU, bfloat16 on a GPU)"),
    "device": ("auto", "cpu | cuda | auto"),
    "seed": (1337, "the seed of every run"),
}
CHOICES = {"preset": ("auto", "demo", "gpt2_124m", "gpt2_124m_cpu"), "dtype": ("auto", "float32", "bfloat16"),
           "device": ("auto", "cpu", "cuda")}
RANGES = {"steps": (2, None), "repeats": (1, None)}
PRESETS = {  # trainer options of each preset, on top of the ones every run shares
    "demo": ["configs/demo.py", "--batch_size=16", "--warmup_steps=0"],
    "gpt2_124m": ["--data_path=demo", "--tokenizer=gpt2", "--n_layer=12", "--n_head=12", "--n_embd=768",
                  "--max_seq_len=1024", "--batch_size=8", "--packing", "--learning_rate=6e-4"],
    "gpt2_124m_cpu": ["--data_path=demo", "--tokenizer=gpt2", "--n_layer=12", "--n_head=12", "--n_embd=768",
                      "--max_seq_len=64", "--batch_size=2", "--packing", "--learning_rate=6e-4"],
}
# A preset's own --steps and --warmup, where the command line does not set them.
PRESET_STEPS = {"gpt2_124m_cpu": {"steps": 4, "warmup": 1}}
# The JSON's name: engines_<prefix><device>.json.
PRESET_FILE_PREFIX = {"gpt2_124m_cpu": "124m_"}


def run_trainer(engine, stage, args, workdir, repeat=0):
    """One torchrun of train_sft.py; returns its metrics records, or the one-line reason it refused."""
    out = Path(workdir) / f"{engine}{stage}-{repeat}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args['nproc']}",
           "train_sft.py", *PRESETS[args["preset"]], f"--engine={engine}", f"--zero_stage={stage}",
           f"--max_steps={args['steps']}", f"--dtype={args['dtype']}", f"--device={args['device']}",
           f"--seed={args['seed']}", "--dropout=0.0", "--log_interval=1", "--eval_interval=0",
           "--eval_exact_match=0", "--checkpoint_interval=0", f"--output_dir={out}",
           f"--cache_dir={Path(workdir) / 'cache'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "error:" in line]
        if errors and "not built" in errors[0]:
            return errors[0].split("error: ", 1)[1]
        raise RuntimeError(f"{engine} stage {stage} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def summarize(runs, warmup):
    """One row from the runs of an (engine, stage): the median of the runs' tokens/s, the first run's losses
    and memory."""
    speeds = [statistics.median(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > warmup)
              for records in runs]
    losses = {r["step"]: r["loss"] for r in runs[0] if "loss" in r}
    memory = next(r for r in runs[0] if "memory" in r)
    return {"losses": losses, "tokens_per_s": statistics.median(speeds), "tokens_per_s_runs": speeds,
            "ranks": memory["memory"], "formula_bytes": memory["zero_formula_bytes"]}


def run_alternating(engines, stages, args, workdir):
    """Every (engine, stage) args["repeats"] times, the engines alternating within each stage; returns the rows
    in engine-major order, as the table shows them."""
    runs, skipped = {}, {}
    for stage in stages:
        for repeat in range(args["repeats"]):
            for engine in engines:
                if (engine, stage) in skipped:
                    continue
                print(f"running {engine} stage {stage} ({repeat + 1} of {args['repeats']}) ...", flush=True)
                result = run_trainer(engine, stage, args, workdir, repeat)
                if isinstance(result, str):
                    skipped[engine, stage] = result
                else:
                    runs.setdefault((engine, stage), []).append(result)
    return [{"engine": engine, "stage": stage, "skipped": skipped[engine, stage]} if (engine, stage) in skipped
            else {"engine": engine, "stage": stage, **summarize(runs[engine, stage], args["warmup"])}
            for engine in engines for stage in stages]


def print_table(rows, checkpoints):
    reference = next(r for r in rows if "losses" in r)
    header = (["engine", "stage"] + [f"loss@{s}" for s in checkpoints] +
              ["max |dloss|", "tokens/s", "peak GiB/rank", "model state MiB/rank", "formula MiB"])
    print(" | ".join(header))
    for r in rows:
        if "losses" not in r:
            print(f"{r['engine']} | {r['stage']} | {r['skipped']}")
            continue
        diff = max(abs(r["losses"][s] - reference["losses"][s]) for s in reference["losses"])
        r["max_loss_difference"] = diff
        cells = [r["engine"], str(r["stage"])] + [f"{r['losses'][s]:.6f}" for s in checkpoints] + [
            f"{diff:.2e}", f"{r['tokens_per_s']:,.0f}",
            "/".join(f"{m['peak_mem_gib']:.3f}" for m in r["ranks"]),
            "/".join(f"{m['total'] / 2**20:.3f}" for m in r["ranks"]), f"{r['formula_bytes'] / 2**20:.3f}"]
        print(" | ".join(cells))


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(11, 4))
    reference = next(r for r in rows if "losses" in r)
    for r in rows:
        if "losses" not in r:
            continue
        steps = sorted(r["losses"])
        label = f"{r['engine']} stage {r['stage']}"
        ax.plot(steps, [r["losses"][s] for s in steps], label=label)
        ax_diff.plot(steps, [abs(r["losses"][s] - reference["losses"][s]) for s in steps], label=label)
    ax.set(xlabel="step", ylabel="training loss", title="loss")
    ax_diff.set(xlabel="step", ylabel="|loss - first row's loss|", title="difference", yscale="symlog",
                ylim=(0, None))
    ax_diff.set_yscale("symlog", linthresh=1e-8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv):
    args, explicit = parse_options(argv, OPTIONS, CHOICES, RANGES, __doc__)
    gpu = args["device"] == "cuda" or args["device"] == "auto" and torch.cuda.is_available()
    defaults = {"device": ("cpu", "cuda"), "preset": ("demo", "gpt2_124m"), "dtype": ("float32", "bfloat16")}
    args.update({name: pair[gpu] for name, pair in defaults.items() if args[name] == "auto"})
    args["nproc"] = args["nproc"] or (1 if gpu else 2)
    args.update({k: v for k, v in PRESET_STEPS.get(args["preset"], {}).items() if k not in explicit})
    engines, stages = args["engines"].split(","), [int(s) for s in args["stages"].split(",")]
    rows, load_before = [], load_average()  # the machine may be shared: its load goes with the figures
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        rows = run_alternating(engines, stages, args, workdir)
    checkpoints = sorted({1, args["steps"] // 4, args["steps"] // 2, args["steps"]})
    print_table(rows, checkpoints)

    device = torch.cuda.get_device_name() if args["device"] == "cuda" else "cpu"
    name = PRESET_FILE_PREFIX.get(args["preset"], "") + device.replace(" ", "_")
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    record = {"device": device, **provenance(["bench/compare_engines.py", "train_sft.py"], load_before,
                                             packages=("deepspeed",)),
              "wall_s": round(time.perf_counter() - start), "options": args, "rows": rows}
    (results / f"engines_{name}.json").write_text(json.dumps(record, indent=1))
    plot(rows, results / f"engines_{name}.png")
    print(f"wrote bench/results/engines_{name}.json and .png")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except OptionError as e:
        print(f"compare_engines.py: error: {e}", file=sys.stderr)
        sys.exit(2)
