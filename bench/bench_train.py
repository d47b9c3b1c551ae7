"""Training steps on GPT-2 124M's shape on one GPU: the trainer against the strongest plain loop.

    python bench/bench_train.py [--steps=10] [--warmup=3] [--deepspeed_stages=2]

Shape (../shared/ANCHORS.md): 12 layers, 768 wide, vocabulary padded to 50,304, batch 16 x 1024
tokens, bf16, half of the labels masked, from scratch. Rows, all measured in this one run:
  compiled loop, loss inside  the peer, the fastest plain loop a user would write (nanoGPT's):
                              model.py's GPT whose forward returns nanoGPT's loss (full logits,
                              F.cross_entropy), the whole forward under torch.compile, bf16
                              autocast, fused AdamW, TF32 matmuls allowed; no clipping, no checks
  train_sft --kernels=torch   the real trainer, --compile (cached data, batching, masking, loss
                              weighting, clipping, non-finite checks, logging every step), with
                              the chunked PyTorch loss
  train_sft --kernels=triton  the same with the fused masked linear cross-entropy of sft_kernels/
  train_sft --engine=deepspeed --zero_stage=N
                              the triton row's options on DeepSpeed, for each N in
                              --deepspeed_stages (comma-separated; empty for none), where
                              train_sft.py has --engine and DeepSpeed is installed
Every trainer row runs in its own process under torchrun (one process), as DeepSpeed needs.
tokens/s counts every position; MFU uses model.flops_per_token against 989 TFLOP/s (H100/H200
dense bf16); peak is torch.cuda.max_memory_allocated. Rewrites bench/results/train_<device>.json
after every row ("complete": false until the last); a row that fails gets an "error" and the
others still run; the exit status is 1 when any row failed.
"""
import contextlib
import datetime
import gc
import importlib.util
import io
import json
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from options import parse_script_options  # noqa: E402
from bench.bench_ce import source_digest  # noqa: E402
from data import get_tokenizer, tokenize_turns  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

BATCH, SEQ, PEAK_FLOPS = 16, 1024, 989e12
SHAPE = dict(block_size=SEQ, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
PEER = "compiled loop, loss inside"
SOURCES = ["sft_kernels/cross_entropy.py", "model.py", "train_sft.py", "data.py", "zero_lite.py", "bench/bench_train.py"]


OPTIONS = {"steps": (10, "timed training steps per row"), "warmup": (3, "untimed steps before them"),
           "deepspeed_stages": ("2", "comma-separated ZeRO stages of the DeepSpeed rows; empty = none")}


def nanogpt_loss(hidden, weight, labels, ignore_index=-100):
    """nanoGPT's loss: the full (B*T, V) logits, then F.cross_entropy (autocast runs it in fp32)."""
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=ignore_index)


def compiled_loop(steps, warmup):
    """The peer: the shortest fast bf16 training loop, its forward (loss included) compiled."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    raw = GPT(GPTConfig(**SHAPE)).cuda()
    raw.loss_fn = nanogpt_loss
    model = torch.compile(raw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    idx = torch.randint(0, 50257, (BATCH, SEQ), device="cuda")
    labels = torch.randint(0, 50257, (BATCH, SEQ), device="cuda")
    labels[:, : SEQ // 2] = -100  # the prompt half

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(idx, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": BATCH * SEQ * steps / elapsed, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def free_gpu():
    """Release the peer's model, optimizer and compiled graphs before the trainer processes start."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def write_sft_data(path, n_samples):
    """Samples of exactly SEQ + 1 tokens with the prompt half masked, so the trainer's rows are full
    1024-token rows without padding, the same work as the peer's."""
    enc = get_tokenizer("gpt2")
    words = " ".join(["the"] * (SEQ // 2))
    for n_response in range(SEQ // 2, 0, -1):
        tokens, _, _ = tokenize_turns([(words, " ".join(["cat"] * n_response))], enc)
        if len(tokens) <= SEQ + 1:
            break
    prompt = " ".join(["the"] * (SEQ // 2 + SEQ + 1 - len(tokens)))
    response = " ".join(["cat"] * n_response)
    assert len(tokenize_turns([(prompt, response)], enc)[0]) == SEQ + 1
    with open(path, "w") as f:
        for _ in range(n_samples):
            f.write(json.dumps({"prompt": prompt, "response": response}) + "\n")


def trainer_options():
    """The option names `train_sft.py --help` lists, so the rows that need --engine run only where it
    exists. Run in this process (runpy, as `python train_sft.py --help` would): no second interpreter
    has to import torch again."""
    help_text = io.StringIO()
    argv, sys.argv = sys.argv, [str(ROOT / "train_sft.py"), "--help"]
    try:
        with contextlib.redirect_stdout(help_text):
            runpy.run_path(str(ROOT / "train_sft.py"), run_name="__main__")
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            raise RuntimeError(f"train_sft.py --help exited with {exit_.code}") from None
    finally:
        sys.argv = argv
    return set(re.findall(r"^\s+--(\w+)", help_text.getvalue(), flags=re.MULTILINE))


def deepspeed_rows(stages):
    """name -> train_sft options for each requested DeepSpeed stage, and why none run where they cannot."""
    if not stages:
        return {}, None
    if not {"engine", "zero_stage"} <= trainer_options():
        return {}, "train_sft.py has no --engine/--zero_stage options"
    if importlib.util.find_spec("deepspeed") is None:
        return {}, "DeepSpeed is not installed"
    return {f"train_sft --engine=deepspeed --zero_stage={stage}":
            ["--kernels=triton", "--engine=deepspeed", f"--zero_stage={stage}"] for stage in stages}, None


def trainer(name, options, steps, warmup, workdir):
    """The real train_sft.py in its own process; tokens/s of the steps after warmup, from metrics.jsonl."""
    data, eval_data = Path(workdir) / "sft.jsonl", Path(workdir) / "eval.jsonl"
    if not data.exists():
        # whole batches only: a short last batch would make torch.compile recompile inside the timed steps
        write_sft_data(data, BATCH * (steps + warmup))
        write_sft_data(eval_data, 2)
    out = Path(workdir) / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train_sft.py"), f"--data_path={data}", f"--eval_data_path={eval_data}",
           "--tokenizer=gpt2", f"--max_seq_len={SEQ + 1}", f"--batch_size={BATCH}", "--dtype=bfloat16", "--compile",
           *options, f"--max_steps={steps + warmup}", "--log_interval=1", "--lr_scheduler=constant",
           f"--output_dir={out}", f"--cache_dir={Path(workdir) / 'cache'}"]
    print(f"--- {name}: {' '.join(cmd[5:])}", flush=True)
    try:
        subprocess.run(cmd, check=True, cwd=ROOT)
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    except (subprocess.CalledProcessError, OSError) as exc:
        return {"error": repr(exc)[:300]}
    finally:
        shutil.rmtree(out, ignore_errors=True)  # its checkpoint and export are GBs; only metrics.jsonl was needed
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup]
    if not timed:
        return {"error": f"metrics.jsonl has no step after the {warmup} warm-up steps"}
    seconds = sum(BATCH * SEQ / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": BATCH * SEQ * len(timed) / seconds, "peak_gib": max(r["peak_mem_gib"] for r in timed)}


def add_ratios(rows, flops_per_token):
    """MFU of every measured row, and its tokens/s over the peer's."""
    peer = rows.get(PEER, {}).get("tokens_per_s")
    for row in rows.values():
        if "tokens_per_s" in row:
            row["mfu"] = row["tokens_per_s"] * flops_per_token / PEAK_FLOPS
            if peer:
                row["vs_peer"] = row["tokens_per_s"] / peer


def main():
    args = parse_script_options(sys.argv[1:], OPTIONS, __doc__)
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    steps, warmup = args["steps"], args["warmup"]
    stages = [stage for stage in args["deepspeed_stages"].split(",") if stage]
    if any(stage not in ("0", "1", "2", "3") for stage in stages):
        print("bench_train.py: error: --deepspeed_stages takes ZeRO stages 0 to 3, comma-separated", file=sys.stderr)
        sys.exit(2)
    flops_per_token = GPT(GPTConfig(**SHAPE)).flops_per_token(SEQ)
    device = torch.cuda.get_device_name()
    out = ROOT / "bench" / "results" / f"train_{device.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "sources": source_digest([path for path in SOURCES if (ROOT / path).exists()]),
              "shape": {**SHAPE, "batch": BATCH, "seq": SEQ, "dtype": "bfloat16", "masked_share": 0.5},
              "steps": steps, "warmup": warmup, "peer": PEER, "skipped": {}, "rows": {}}
    rows = result["rows"]

    def record(name, row, complete=False):
        rows[name] = row
        add_ratios(rows, flops_per_token)
        out.write_text(json.dumps({**result, "complete": complete}, indent=1) + "\n")

    try:
        record(PEER, compiled_loop(steps, warmup))
    except Exception as exc:  # recorded; the trainer rows still run
        record(PEER, {"error": repr(exc)[:300]})
    free_gpu()
    trainer_rows = {f"train_sft --kernels={kernels}": [f"--kernels={kernels}"] for kernels in ("torch", "triton")}
    extra, why_not = deepspeed_rows(stages)
    if why_not:
        result["skipped"]["deepspeed"] = why_not
        print(f"note: DeepSpeed rows skipped: {why_not}")
    trainer_rows |= extra
    with tempfile.TemporaryDirectory() as workdir:
        for i, (name, options) in enumerate(trainer_rows.items()):
            record(name, trainer(name, options, steps, warmup, workdir), complete=i == len(trainer_rows) - 1)
    print(f"{'implementation':<46} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs peer':>8}")
    for name, row in rows.items():
        if "error" in row:
            print(f"{name:<46} failed: {row['error']}")
        else:
            ratio = f"{row['vs_peer']:>7.2f}x" if "vs_peer" in row else "       -"
            print(f"{name:<46} {row['tokens_per_s']:>10,.0f} {row['mfu']:>6.1%} {row['peak_gib']:>9.2f} {ratio}")
    print(f"wrote {out.relative_to(ROOT)}")
    if any("error" in row for row in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
