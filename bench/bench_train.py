"""Training steps on one GPU: the trainer against the strongest plain loop, at GPT-2 124M's shape or
Qwen2.5-0.5B's.

    python bench/bench_train.py [--shape=gpt2_124m] [--rows=peer,torch,triton] [--steps=10] [--warmup=3]
                                [--deepspeed_stages=2]

Shapes, each batch 16 x 1024 tokens, bf16, half of the labels masked, weights random:
  gpt2_124m     GPT-2 124M's: 12 layers, 768 wide, vocabulary padded to 50,304, from scratch
                -> bench/results/train_<device>.json
  qwen2_5_0_5b  Qwen2.5-0.5B's: 24 layers, 896 wide, 14 query heads sharing 2 key/value heads
                (grouped-query attention), RMSNorm, rotary positions, a SwiGLU MLP 4,864 wide, qkv
                biases, vocabulary 151,936, the head tied to the embedding; the trainer rows start
                from a Hugging Face directory of it written here (--init_from), as
                configs/qwen2_5_0_5b.py does -> bench/results/train_qwen2_5_0_5b_<device>.json
The trainer rows read GPT-2-tokenized data (ids below 50,257) whatever the vocabulary: the head's
work is the vocabulary's size all the same. Rows (--rows and --deepspeed_stages choose), all
measured in this one run:
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
dense bf16); peak is torch.cuda.max_memory_allocated. Rewrites the shape's result file
after every row ("complete": false until the last); a row that fails gets an "error" and the
others still run; the exit status is 1 when any row failed.
"""
import contextlib
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
from bench.common import load_average, provenance  # noqa: E402
from tokenizer import get_tokenizer, tokenize_turns  # noqa: E402
from model import GPT, family_config  # noqa: E402

BATCH, SEQ, PEAK_FLOPS = 16, 1024, 989e12
GPT2_TOKENS = 50257  # the data's token ids (GPT-2's tokenizer) lie below this, whatever the shape's vocabulary
# name -> (what the tables call it, the model's sizes; model_type, where given, picks the family's other fields)
SHAPES = {
    "gpt2_124m": ("GPT-2 124M", dict(block_size=SEQ, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)),
    "qwen2_5_0_5b": ("Qwen2.5-0.5B", dict(model_type="qwen2", block_size=32768, vocab_size=151936, n_layer=24,
                                          n_head=14, n_kv_head=2, n_embd=896, intermediate_size=4864, rope_theta=1e6,
                                          tie_word_embeddings=True)),
}
PEER = "compiled loop, loss inside"
TRAINER_ROWS = ("torch", "triton")  # train_sft --kernels=...
SOURCES = ["bench/bench_train.py", "train_sft.py"]  # and every project file they import (bench/common.py)


OPTIONS = {"shape": ("gpt2_124m", "the model's shape: " + " | ".join(SHAPES)),
           "rows": ("peer,torch,triton", "comma-separated: peer (the compiled loop), torch, triton (train_sft "
                                         "--kernels=...)"),
           "steps": (10, "timed training steps per row"), "warmup": (3, "untimed steps before them"),
           "deepspeed_stages": ("2", "comma-separated ZeRO stages of the DeepSpeed rows; empty = none")}


def model_config(shape):
    """The GPTConfig of a SHAPES entry."""
    sizes = dict(SHAPES[shape][1])
    return family_config(sizes.pop("model_type", "gpt2"), **sizes)


def result_file(shape, device):
    """bench/results/train_<device>.json for GPT-2 124M (the name it always had), else train_<shape>_<device>.json."""
    prefix = "train" if shape == "gpt2_124m" else f"train_{shape}"
    return ROOT / "bench" / "results" / f"{prefix}_{device.replace(' ', '_').replace('/', '_')}.json"


def check_args(args):
    """(shape, rows, DeepSpeed stages) of the options; ValueError with one sentence for a bad one."""
    if args["shape"] not in SHAPES:
        raise ValueError(f"--shape must be one of {', '.join(SHAPES)}, got {args['shape']!r}")
    rows = [row for row in args["rows"].split(",") if row]
    unknown = [row for row in rows if row not in ("peer", *TRAINER_ROWS)]
    if unknown:
        raise ValueError(f"--rows takes peer, torch and triton, comma-separated; got {unknown[0]!r}")
    stages = [stage for stage in args["deepspeed_stages"].split(",") if stage]
    if any(stage not in ("0", "1", "2", "3") for stage in stages):
        raise ValueError("--deepspeed_stages takes ZeRO stages 0 to 3, comma-separated")
    if not rows and not stages:
        raise ValueError("--rows and --deepspeed_stages are both empty: there is no row to measure")
    return args["shape"], rows, stages


def nanogpt_loss(hidden, weight, labels, ignore_index=-100):
    """nanoGPT's loss: the full (B*T, V) logits, then F.cross_entropy (autocast runs it in fp32)."""
    return F.cross_entropy(F.linear(hidden, weight), labels, ignore_index=ignore_index)


def compiled_loop(config, steps, warmup):
    """The peer: the shortest fast bf16 training loop, its forward (loss included) compiled."""
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    raw = GPT(config).cuda()
    raw.loss_fn = nanogpt_loss
    model = torch.compile(raw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=True)
    idx = torch.randint(0, GPT2_TOKENS, (BATCH, SEQ), device="cuda")
    labels = torch.randint(0, GPT2_TOKENS, (BATCH, SEQ), device="cuda")
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


def write_model_directory(model, path):
    """The shape's random weights as a Hugging Face directory (bf16, as released models are) for
    --init_from: the trainer then builds exactly this model, vocabulary and all."""
    model.to(torch.bfloat16).save_pretrained(path)
    return path


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


def trainer_rows_of(chosen, stages, skipped):
    """name -> train_sft options of the chosen trainer rows; what is left out goes into skipped, with why."""
    rows = {f"train_sft --kernels={kernels}": [f"--kernels={kernels}"] for kernels in TRAINER_ROWS if kernels in chosen}
    for left_out in [PEER] * ("peer" not in chosen) + [f"train_sft --kernels={k}" for k in TRAINER_ROWS
                                                       if k not in chosen]:
        skipped[left_out] = f"not in --rows={','.join(chosen)}"
    extra, why_not = deepspeed_rows(stages)
    if why_not:
        skipped["deepspeed"] = why_not
        print(f"note: DeepSpeed rows skipped: {why_not}")
    return rows | extra


def main():
    args = parse_script_options(sys.argv[1:], OPTIONS, __doc__)
    try:
        shape, chosen, stages = check_args(args)
    except ValueError as exc:
        print(f"bench_train.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if not torch.cuda.is_available():
        sys.exit("bench_train.py needs a CUDA GPU")
    steps, warmup = args["steps"], args["warmup"]
    name, sizes = SHAPES[shape]
    config = model_config(shape)
    model = GPT(config)  # on the CPU: its FLOPs, and the trainer's weights where it starts from a directory
    flops_per_token = model.flops_per_token(SEQ)
    device = torch.cuda.get_device_name()
    out = result_file(shape, device)
    out.parent.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    result = {"device": device, "shape": {"name": name, **sizes, "batch": BATCH, "seq": SEQ, "dtype": "bfloat16", "masked_share": 0.5},
              "steps": steps, "warmup": warmup, "peer": PEER, "skipped": {}, "rows": {}}
    rows = result["rows"]

    def record(row_name, row, complete=False):
        rows[row_name] = row
        add_ratios(rows, flops_per_token)
        written = {**result, **provenance(SOURCES, load_before, packages=("triton", "deepspeed")), "complete": complete}
        out.write_text(json.dumps(written, indent=1) + "\n")

    trainer_rows = trainer_rows_of(chosen, stages, result["skipped"])
    if "peer" in chosen:
        try:
            row = compiled_loop(config, steps, warmup)
        except Exception as exc:  # recorded; the trainer rows still run
            row = {"error": repr(exc)[:300]}
        record(PEER, row, complete=not trainer_rows)
        free_gpu()
    with tempfile.TemporaryDirectory() as workdir:
        start = []
        if trainer_rows and shape != "gpt2_124m":
            start = [f"--init_from={write_model_directory(model, Path(workdir) / shape)}"]
        del model
        for i, (row_name, options) in enumerate(trainer_rows.items()):
            record(row_name, trainer(row_name, [*options, *start], steps, warmup, workdir),
                   complete=i == len(trainer_rows) - 1)
    print(f"{'implementation':<46} {'tokens/s':>10} {'MFU':>6} {'peak GiB':>9} {'vs peer':>8}")
    for row_name, row in rows.items():
        if "error" in row:
            print(f"{row_name:<46} failed: {row['error']}")
        else:
            ratio = f"{row['vs_peer']:>7.2f}x" if "vs_peer" in row else "       -"
            print(f"{row_name:<46} {row['tokens_per_s']:>10,.0f} {row['mfu']:>6.1%} {row['peak_gib']:>9.2f} {ratio}")
    print(f"wrote {out.relative_to(ROOT)}")
    if any("error" in row for row in rows.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
