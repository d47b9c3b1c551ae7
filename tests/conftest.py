"""Shared test setup and helpers: the trainer launcher, the tiny model's options and a data writer.

Triton reads TRITON_INTERPRET when it is imported (transformers imports it too), so the flag is
set here, before any test module loads: without a GPU the Triton kernels then run on the CPU
under Triton's interpreter. With a GPU they compile as usual."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough that a run of a few steps takes about a second.
TINY = ["--tokenizer=byte", "--n_layer=2", "--n_head=2", "--n_embd=32", "--max_seq_len=48", "--batch_size=4",
        "--learning_rate=3e-3", "--log_interval=1", "--seed=7"]


def write_reverse_pairs(path, count):
    """Reverse-a-word pairs: small, varied lengths, so batches carry different padding."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(count):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            f.write(json.dumps({"prompt": f"reverse {word}", "response": word[::-1]}) + "\n")
    return str(path)


def run_trainer(args, tmp_path, nproc=1, check=True, env=None, script="train_sft.py", tiny=TINY):
    """Runs the trainer (or another script taking its options) on the tiny model (options `tiny`) in a
    fresh process, under torchrun with gloo when nproc > 1, with a cache of its own in tmp_path unless
    args name one; environment: ours plus env. Returns the completed process; with check, a failure raises."""
    cache = [] if any(a.startswith("--cache_dir") for a in args) else ["--cache_dir=" + str(tmp_path / "cache")]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *launcher, script, *tiny, *cache, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(output_dir):
    """{step: loss} of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """240 reverse-a-word pairs in a JSONL file, shared by a module's tests."""
    return write_reverse_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 240)
