"""README's demo, timed: the whole command, and the exact match and eval loss it ends with.

    python bench/bench_demo.py

Runs README's demo command (torchrun, 2 processes, configs/demo.py) into out/bench_demo (its own
directory, so out/demo is left alone), timing the whole command from start to exit: data generation,
tokenizing, 2000 steps, evaluation, the last checkpoint and the export. Reads the final eval record
from its metrics.jsonl and writes bench/results/demo_<device>.json with the machine (CPU model,
cores, load average before and after: the machine may be shared, which slows the run) and the
digests of the sources it ran.
"""
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_ce import source_digest  # noqa: E402

OUTPUT_DIR = "out/bench_demo"
COMMAND = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py", "configs/demo.py",
           "--overwrite_output_dir", f"--output_dir={OUTPUT_DIR}"]
SOURCES = ["train_sft.py", "options.py", "checkpoint.py", "model.py", "data.py", "zero_lite.py", "configs/demo.py",
           "bench/bench_demo.py"]


def cpu_model():
    """The CPU's name as /proc/cpuinfo gives it (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def final_eval(metrics_path):
    """The last record of metrics.jsonl that carries an exact match: the end-of-run evaluation."""
    with open(metrics_path) as f:
        evals = [record for record in map(json.loads, f) if "exact_match" in record]
    if not evals:
        raise ValueError(f"{metrics_path} holds no eval record with exact_match: did the run finish?")
    return evals[-1]


def main():
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *COMMAND], cwd=ROOT)
    wall_s = time.perf_counter() - start
    load_after = os.getloadavg()
    if proc.returncode != 0:
        sys.exit(f"the demo run failed with exit status {proc.returncode}; see its output above")
    final = final_eval(ROOT / OUTPUT_DIR / "metrics.jsonl")
    result = {
        "script": "bench/bench_demo.py",
        "device": "cpu",
        "command": "torchrun " + " ".join(COMMAND[2:]),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": source_digest(SOURCES),
        "wall_s": round(wall_s, 1),
        "step": final["step"],
        "exact_match": final["exact_match"],
        "eval_loss": final["eval_loss"],
    }
    path = ROOT / "bench" / "results" / "demo_cpu.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"demo: {wall_s:.0f} s, exact match {final['exact_match']:.1%}, eval loss {final['eval_loss']:.4g} "
          f"at step {final['step']}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after -> {path}")


if __name__ == "__main__":
    main()
