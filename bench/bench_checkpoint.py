"""What checkpoint safety costs at GPT-2 124M's size: writing a checkpoint (with its manifest's
sha256 of every file and the fsyncs) and verifying it before a resume.

    python bench/bench_checkpoint.py [--dir=/tmp]

Builds model.py's GPT at GPT-2 124M's shape (vocabulary padded to 50,304) with AdamW state, wraps
it in the native engine (stage 0, one process) and calls checkpoint.save_checkpoint and
checkpoint.checkpoint_problem as a run does, on a directory under --dir (the disk being measured).
Hashing alone is timed again on the written files, so the share of verification that is sha256
rather than reading is visible. Writes bench/results/checkpoint_<cpu count>cpu.json.
"""
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from options import parse_script_options  # noqa: E402
import checkpoint  # noqa: E402
import zero_lite  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from bench.common import load_average, provenance  # noqa: E402


OPTIONS = {"dir": (tempfile.gettempdir(), "the folder (on the disk being measured) where the checkpoint is written")}


def main():
    args = parse_script_options(sys.argv[1:], OPTIONS, __doc__)
    load_before = load_average()
    model = GPT(GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768))
    optimizer = torch.optim.AdamW([{"params": list(model.parameters()), "lr": 1e-4, "base_lr": 1e-4}])
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates the Adam moments that a real checkpoint holds
    engine = zero_lite.Engine(model, optimizer)
    state = {"step": 1, "engine": "native", "run_id": "bench", "options": {}, "model_config": vars(model.config)}
    with tempfile.TemporaryDirectory(dir=args["dir"]) as out:
        began = time.perf_counter()
        path = checkpoint.save_checkpoint(out, 1, engine, state, keep=1, rank=0, world=1)
        save_s = time.perf_counter() - began
        files = json.load(open(os.path.join(path, checkpoint.MANIFEST_FILE)))["files"]
        began = time.perf_counter()
        assert checkpoint.checkpoint_problem(path, "bench") is None
        verify_s = time.perf_counter() - began
        began = time.perf_counter()
        for name in files:
            checkpoint.sha256_of(os.path.join(path, name))
        rehash_s = time.perf_counter() - began
    total = sum(entry["bytes"] for entry in files.values())
    result = {"script": "bench/bench_checkpoint.py", **provenance(["bench/bench_checkpoint.py"], load_before),
              "parameters": model.num_params(non_embedding=False),
              "checkpoint_bytes": total, "files": {k: v["bytes"] for k, v in files.items()},
              "save_s": round(save_s, 2), "verify_s": round(verify_s, 2), "sha256_again_s": round(rehash_s, 2),
              "sha256_gb_per_s": round(total / rehash_s / 1e9, 2)}
    print(json.dumps(result, indent=1))
    target = ROOT / "bench" / "results" / f"checkpoint_{os.cpu_count()}cpu.json"
    target.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {target}")


if __name__ == "__main__":
    main()
