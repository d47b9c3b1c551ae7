"""README's demo, timed: the whole command, and the exact match and eval loss it ends with.

    python bench/bench_demo.py [--config=configs/demo.py]

Runs README's demo command (torchrun, 2 processes, configs/demo.py, or the config given, such as
configs/demo_llama.py) into out/bench_<config name> (its own directory, so out/demo is left alone),
timing the whole command from start to exit: data generation, tokenizing, the steps, evaluation,
the last checkpoint and the export. Reads the final eval record from its metrics.jsonl (and the one
before the first step, where the config sets eval_at_start, as configs/smollm2_cpu.py does) and writes
bench/results/<config name>_cpu.json (demo_cpu.json, demo_llama_cpu.json, smollm2_cpu_cpu.json) with the machine (CPU
model, cores, load average before and after: the machine may be shared, which slows the run) and
the digests of the sources it ran.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_average, provenance  # noqa: E402
from options import parse_script_options  # noqa: E402

OPTIONS = {"config": ("configs/demo.py", "the demo's config file (relative to the repository); the result goes to "
                                         "bench/results/<its name>_cpu.json")}
SOURCES = ["bench/bench_demo.py", "train_sft.py"]  # + the config; bench/common.py adds what they import


def config_name(config):
    """configs/demo_llama.py -> demo_llama: the name of its output directory and result file."""
    return Path(config).stem


def output_dir(config):
    return f"out/bench_{config_name(config)}"


def command(config):
    """README's demo command with this config, into its own output directory."""
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py", config,
            "--overwrite_output_dir", f"--output_dir={output_dir(config)}"]


def result_path(config):
    return ROOT / "bench" / "results" / f"{config_name(config)}_cpu.json"


def evals(metrics_path):
    """(the eval before the first step or None, the end-of-run eval): the first and last records of
    metrics.jsonl that carry an exact match; the first is the start's when the config sets eval_at_start."""
    with open(metrics_path) as f:
        records = [record for record in map(json.loads, f) if "exact_match" in record]
    if not records:
        raise ValueError(f"{metrics_path} holds no eval record with exact_match: did the run finish?")
    return (records[0] if records[0]["step"] == 0 else None), records[-1]


def main():
    config = parse_script_options(sys.argv[1:], OPTIONS, __doc__)["config"]
    if not config.endswith(".py") or not (ROOT / config).is_file():
        print(f"bench_demo.py: error: --config={config} is not a config file (a .py file on disk)", file=sys.stderr)
        sys.exit(2)
    argv = command(config)
    load_before = load_average()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the demo run failed with exit status {proc.returncode}; see its output above")
    start, final = evals(ROOT / output_dir(config) / "metrics.jsonl")
    result = {
        "script": "bench/bench_demo.py",
        "device": "cpu",
        "config": config,
        "command": "torchrun " + " ".join(argv[2:]),
        **provenance([*SOURCES, config], load_before),
        "wall_s": round(wall_s, 1),
        "step": final["step"],
        "exact_match": final["exact_match"],
        "eval_loss": final["eval_loss"],
    }
    if start:  # the starting model's figures (eval_at_start), e.g. a pretrained model's before fine-tuning
        result |= {"exact_match_before": start["exact_match"], "eval_loss_before": start["eval_loss"]}
    path = result_path(config)
    path.write_text(json.dumps(result, indent=1) + "\n")
    before = f" (before training: {start['exact_match']:.1%}, {start['eval_loss']:.4g})" if start else ""
    print(f"demo: {wall_s:.0f} s, exact match {final['exact_match']:.1%}, eval loss {final['eval_loss']:.4g}{before} "
          f"at step {final['step']}; load average {load_before[0]:.2f} before, {result['load_average_after'][0]:.2f} "
          f"after -> {path}")


if __name__ == "__main__":
    main()
