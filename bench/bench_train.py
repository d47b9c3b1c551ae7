"""Training steps on GPT-2 124M's shape on one GPU: the trainer against plain compiled PyTorch.

    python bench/bench_train.py [--steps=10] [--warmup=3]

Shape (../shared/ANCHORS.md): 12 layers, 768 wide, vocabulary padded to 50,304, batch 16 x 1024
tokens, bf16, half of the labels masked, from scratch. Rows, all measured in this one run:
  plain torch.compile        model.py's GPT, autocast bf16, full logits + F.cross_entropy, fused
                             AdamW, compiled: the peer a user would write by hand
  train_sft --kernels=torch  the real trainer (cached data, batching, masking, loss weighting,
                             logging, non-finite checks) with the chunked PyTorch loss
  train_sft --kernels=triton the same with the fused masked linear cross-entropy of kernels/
tokens/s counts every position; MFU uses model.flops_per_token against 989 TFLOP/s (H100/H200
dense bf16); peak is torch.cuda.max_memory_allocated. Writes bench/results/train_<device>.json.
"""
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_ce import source_digest  # noqa: E402
from data import get_tokenizer, tokenize_turns  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

BATCH, SEQ, PEAK_FLOPS = 16, 1024, 989e12
SHAPE = dict(block_size=SEQ, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)


def option(name, default):
    for arg in sys.argv[1:]:
        if arg.startswith(f"--{name}="):
            return type(default)(arg.split("=", 1)[1])
    return default


def plain_compiled(steps, warmup):
    """The peer: the shortest correct bf16 training loop, compiled; tokens/s and peak GiB."""
    torch.manual_seed(0)
    model = torch.compile(GPT(GPTConfig(**SHAPE)).cuda())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    idx = torch.randint(0, 50257, (BATCH, SEQ), device="cuda")
    labels = torch.randint(0, 50257, (BATCH, SEQ), device="cuda")
    labels[:, : SEQ // 2] = -100  # the prompt half

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(idx)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=-100)
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


def trainer(kernels, steps, warmup, workdir):
    """The real train_sft.py in its own process; tokens/s of the steps after warmup, from metrics.jsonl."""
    data, eval_data = Path(workdir) / "sft.jsonl", Path(workdir) / "eval.jsonl"
    if not data.exists():
        # whole batches only: a short last batch would make torch.compile recompile inside the timed steps
        write_sft_data(data, BATCH * (steps + warmup))
        write_sft_data(eval_data, 2)
    out = Path(workdir) / f"out-{kernels}"
    cmd = [sys.executable, str(ROOT / "train_sft.py"), f"--data_path={data}", f"--eval_data_path={eval_data}",
           "--tokenizer=gpt2", f"--max_seq_len={SEQ + 1}", f"--batch_size={BATCH}", "--dtype=bfloat16", "--compile",
           f"--kernels={kernels}", f"--max_steps={steps + warmup}", "--log_interval=1", "--lr_scheduler=constant",
           f"--output_dir={out}", f"--cache_dir={Path(workdir) / 'cache'}"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    timed = [r for r in records if "tokens_per_s" in r and r["step"] > warmup]
    seconds = sum(BATCH * SEQ / r["tokens_per_s"] for r in timed)
    return {"tokens_per_s": BATCH * SEQ * len(timed) / seconds, "peak_gib": max(r["peak_mem_gib"] for r in timed)}


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    steps, warmup = option("steps", 10), option("warmup", 3)
    flops_per_token = GPT(GPTConfig(**SHAPE)).flops_per_token(SEQ)
    rows = {"plain torch.compile": plain_compiled(steps, warmup)}
    with tempfile.TemporaryDirectory() as workdir:
        for kernels in ("torch", "triton"):
            rows[f"train_sft --kernels={kernels}"] = trainer(kernels, steps, warmup, workdir)
    peer = rows["plain torch.compile"]["tokens_per_s"]
    print(f"{'implementation':<28} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs peer':>8}")
    for name, row in rows.items():
        row["mfu"] = row["tokens_per_s"] * flops_per_token / PEAK_FLOPS
        row["vs_peer"] = row["tokens_per_s"] / peer
        print(f"{name:<28} {row['tokens_per_s']:>10,.0f} {row['mfu']:>6.1%} {row['peak_gib']:>9.2f} {row['vs_peer']:>7.2f}x")
    device = torch.cuda.get_device_name()
    result = {"device": device, "torch": torch.__version__, "date": datetime.date.today().isoformat(),
              "sources": source_digest(["kernels/cross_entropy.py", "model.py", "train_sft.py", "data.py"]),
              "shape": {**SHAPE, "batch": BATCH, "seq": SEQ, "dtype": "bfloat16", "masked_share": 0.5},
              "steps": steps, "warmup": warmup, "rows": rows}
    out = ROOT / "bench" / "results" / f"train_{device.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
