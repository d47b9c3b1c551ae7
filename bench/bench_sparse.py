"""Sparse fine-tuning (sparse.py, sft_kernels/sparse_adam.py) against dense AdamW and LoRA.

    python bench/bench_sparse.py gpu [--dry-run]   # one CUDA GPU; --dry-run: tiny shapes on the CPU, no file
    python bench/bench_sparse.py cpu [--steps=500] [--base_steps=800] [--sweep_steps=0]   # the demo task on the CPU

gpu (skipped without CUDA unless --dry-run), on GPT-2 124M's parameter set (fp32 weights):
  update     median time of one optimizer step (triton.testing.do_bench; gradients already in
             place, so the backward's gather is not in it) for torch's fused AdamW and DeepSpeed's
             FusedAdam over every parameter, and SparseAdamW at densities 0.1%, 1% and 5% of every
             matrix (blocks and embeddings; the 1-D parameters dense), with each one's optimizer
             state in bytes.
  memory     peak torch.cuda.max_memory_allocated over 3 training steps (batch 8 x 1024, bf16
             autocast, GPT-2 124M shape) for full fine-tuning (fused AdamW), sparse 1% of the
             blocks' Linear weights, and LoRA on the same Linears with the rank whose trainable
             count is nearest (only the LoRA factors train; in the sparse run only the selected
             entries do).
  -> bench/results/sparse_<device>.json

cpu: the demo task as fine-tuning. A base model first learns three of the five demo tasks
(reverse, sort, shift) with full training; then each variant fine-tunes that base on all five
(double and upper are new) for the same number of steps: full (AdamW), LoRA on the blocks'
Linears (factors only, scale lora_scaling / rank = 1) at the ranks whose trainable counts are
nearest the sparse runs', sparse 1% and 5% (block Linears; biases and LayerNorms dense), and
sparse 5% of the embeddings too (the output layer is the tied token embedding).
Each variant gets its own learning rate, chosen the same way for all: runs of --sweep_steps (by
default as long as the final runs: with 120-step trials LoRA rank 6 once chose a rate at which it
diverged later) at each of LEARNING_RATES, and the one with the lowest eval loss on a validation
split (100 training prompts per task, held out of every run's training data) wins; the scoring
set below never takes part in the choice. Per variant, after --steps at its learning rate: final
eval loss, greedy exact match on the 500 held-out prompts (100 per task), mean step time (the
trainer's tokens/s turned into seconds per step), optimizer-state bytes and, for sparse runs, the
delta file's size beside the checkpoint's. Shorter than configs/demo.py (its 2000 steps) so the
runs fit in minutes on two cores. Run it with OMP_NUM_THREADS=1 on a shared machine (intra-op
threads fighting other processes ran ~15x slower).
  -> bench/results/sparse_cpu.json
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
import sparse  # noqa: E402
from bench.common import load_average, provenance  # noqa: E402
from model import GPT, GPTConfig, apply_lora, only_optimize_lora  # noqa: E402

GPT2 = dict(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768)
TINY = dict(block_size=64, vocab_size=128, n_layer=2, n_head=2, n_embd=32)  # --dry-run
DENSITIES = (0.001, 0.01, 0.05)
SOURCES = ["bench/bench_sparse.py", "train_sft.py", "configs/demo.py"]  # and the project files they import


CPU_OPTIONS = {"steps": (500, "fine-tuning steps of each variant"), "base_steps": (800, "steps of the base model"),
               "sweep_steps": (0, "steps of each learning-rate trial; 0: as many as --steps")}


def timed(fn, device):
    """Median milliseconds of fn(): do_bench on a GPU, a plain loop on the CPU (dry runs)."""
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=200)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def state_bytes(optimizer):
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t))


def sparse_optimizer(model, density, pattern="h.", embedding=True, dense_rest=True):
    """SparseAdamW over the chosen matrices; the 1-D parameters dense (or frozen)."""
    matrices = sparse.sparse_matrices(model, pattern, embedding=embedding)
    chosen = {id(p) for _, p in matrices}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen or (dense_rest and p.dim() == 1))
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    groups = [{"params": dense, "lr": 1e-4, "base_lr": 1e-4, "weight_decay": 0.0}] if dense else []
    return sparse.SparseAdamW(matrices, groups, density, lr=1e-4, betas=(0.9, 0.95))


def update_rows(shape, device):
    """One optimizer step over the parameter set, dense peers against SparseAdamW."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape)).to(device)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    dense = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    rows.append({"optimizer": "torch AdamW (fused)" if device.type == "cuda" else "torch AdamW",
                 "ms": timed(dense.step, device), "state_bytes": state_bytes(dense), "trained": sum(p.numel() for p in params)})
    del dense
    try:
        from deepspeed.ops.adam import FusedAdam
        if device.type != "cuda":
            raise RuntimeError("FusedAdam needs CUDA")
        fused = FusedAdam(params, lr=1e-4, betas=(0.9, 0.95), adam_w_mode=True)
        rows.append({"optimizer": "DeepSpeed FusedAdam", "ms": timed(fused.step, device),
                     "state_bytes": state_bytes(fused), "trained": sum(p.numel() for p in params)})
        del fused
    except Exception as e:  # not built or not installed on this machine: say so in the file
        rows.append({"optimizer": "DeepSpeed FusedAdam", "skipped": f"{type(e).__name__}: {e}"[:300]})
    del model, params
    for density in DENSITIES:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**shape)).to(device)  # fresh: an optimizer's gradient hooks stay on its weights
        optimizer = sparse_optimizer(model, density)
        for g in optimizer.sparse_grads:
            g.normal_(0, 1e-3)
        for p in model.parameters():
            if p.dim() == 1:
                p.grad = torch.randn_like(p) * 1e-3
        sparse_entries, dense_entries = optimizer.trainable_entries()
        rows.append({"optimizer": f"SparseAdamW {density:.1%}", "density": density,
                     "ms": timed(optimizer.step, device), "state_bytes": optimizer.state_bytes(),
                     "trained": sparse_entries + dense_entries, "sparse_entries": sparse_entries})
        del optimizer, model
    for row in rows:
        if "ms" in row and device.type == "cuda":
            row["vs_fused_adam"] = next((r["ms"] for r in rows if r["optimizer"] == "DeepSpeed FusedAdam"
                                         and "ms" in r), float("nan")) / row["ms"]
    return rows


def lora_rank_for(count, shape):
    """The LoRA rank on the blocks' Linears whose trainable count is nearest to count."""
    C = shape["n_embd"]
    per_rank = shape["n_layer"] * ((C + 3 * C) + (C + C) + (C + 4 * C) + (4 * C + C))
    return max(1, round(count / per_rank))


def memory_rows(shape, device, batch=8, steps=3):
    """Peak memory of whole training steps: full, sparse 1% and LoRA at the same trainable count."""
    rows = []
    for variant in ("full", "sparse 1%", "lora"):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        model = GPT(GPTConfig(**shape)).to(device)
        if variant == "full":
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
            trained = sum(p.numel() for p in model.parameters())
        elif variant == "sparse 1%":
            optimizer = sparse_optimizer(model, 0.01, embedding=False, dense_rest=False)
            trained = sparse_count = optimizer.trainable_entries()[0]
        else:
            rank = lora_rank_for(sparse_count, shape)
            apply_lora(model, rank)
            only_optimize_lora(model)
            model.to(device)
            trained_params = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trained_params, lr=1e-4, fused=device.type == "cuda")
            trained = sum(p.numel() for p in trained_params)
        idx = torch.randint(0, shape["vocab_size"], (batch, shape["block_size"]), device=device)
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(idx, torch.roll(idx, -1, 1))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        row = {"variant": variant, "trained": trained, "s_per_step": (time.perf_counter() - start) / steps,
               "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
        if variant == "lora":
            row["lora_rank"] = rank
        rows.append(row)
        del model, optimizer, loss
    return rows


def gpu(dry_run):
    if not torch.cuda.is_available() and not dry_run:
        print("bench_sparse gpu: no CUDA device; skipped (use --dry-run to run its code on tiny CPU shapes)")
        return
    load_before = load_average()
    device = torch.device("cuda" if torch.cuda.is_available() and not dry_run else "cpu")
    shape = TINY if dry_run else GPT2
    update = update_rows(shape, device)
    memory = memory_rows(shape, device, batch=2 if dry_run else 8)
    for row in update + memory:
        print(json.dumps(row))
    if dry_run:
        return
    name = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    write(f"sparse_{name}.json", {"device": torch.cuda.get_device_name(), "update": update, "memory": memory}, load_before)


def write(name, results, load_before):
    out = ROOT / "bench" / "results" / name
    out.write_text(json.dumps({**provenance(SOURCES, load_before, packages=("deepspeed",)), **results}, indent=1) + "\n")
    print("wrote", out)


BASE_TASKS = ("reverse ", "sort ", "shift ")  # what the base model learns; double and upper are new to it
TASKS = BASE_TASKS + ("double ", "upper ")
VALIDATION_PER_TASK = 100  # training prompts held out to choose learning rates on
LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # the same for every variant: half the demo's rate up to 50x
FINE_TUNE = {  # variant -> options on top of configs/demo.py; LoRA ranks match the sparse runs' trainable counts
    "full": [],
    "lora r6": ["--lora_dim=6", "--lora_scaling=6", "--only_optimize_lora"],
    "sparse 5%": ["--sparse_density=0.05"],
    "sparse 5% + embeddings": ["--sparse_density=0.05", "--sparse_embedding"],  # the tied output layer too
    "lora r2": ["--lora_dim=2", "--lora_scaling=2", "--only_optimize_lora"],
    "sparse 1%": ["--sparse_density=0.01"],
}


def split_validation(rows):
    """(training rows, validation rows): the first VALIDATION_PER_TASK rows of each task held out."""
    validation = [r for task in TASKS for r in [r for r in rows if r["prompt"].startswith(task)][:VALIDATION_PER_TASK]]
    held_out = {id(r) for r in validation}
    return [r for r in rows if id(r) not in held_out], validation


def write_rows(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return path


def checkpoint_of(run_dir):
    """The run's latest checkpoint (a file or a directory) and its size in bytes."""
    names = sorted(n for n in os.listdir(run_dir) if n.startswith("ckpt-"))
    path = os.path.join(run_dir, names[-1])
    files = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)]
    return path, sum(os.path.getsize(f) for f in files)


def optimizer_figures(checkpoint):
    """(trained entries, bytes of every tensor in the optimizer state) as the checkpoint holds them:
    every trained entry has one first moment."""
    files = [checkpoint] if os.path.isfile(checkpoint) else [
        os.path.join(checkpoint, n) for n in os.listdir(checkpoint) if n.endswith(".pt")]
    trained, total = 0, 0
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if "optimizer" not in state:
            continue
        state = state["optimizer"]
        trained += sum(s["exp_avg"].numel() for s in state["state"].values())
        total += sum(t.numel() * t.element_size() for s in state["state"].values() for t in s.values()
                     if torch.is_tensor(t) and t.dim() > 0)
    return trained, total


def run(argv):
    """train_sft.main in this process; its final eval and the wall-clock seconds."""
    import train_sft
    start = time.perf_counter()
    result = train_sft.main(argv)
    return result, time.perf_counter() - start


def fine_tune(common, variant, steps, learning_rate, out, exact_match):
    """One fine-tuning run of variant from the base model; its final eval and wall-clock seconds."""
    return run(common + FINE_TUNE[variant] + [f"--max_steps={steps}", "--warmup_steps=20",
                                              f"--learning_rate={learning_rate}",
                                              f"--eval_exact_match={exact_match}", f"--output_dir={out}"])


def choose_learning_rate(variant, sweep_common, steps, work):
    """Short runs at each of LEARNING_RATES; the rate with the lowest validation loss and every loss seen.
    A run that stops on NaN/Inf losses counts as an infinite loss."""
    import train_sft
    losses = {}
    for lr in LEARNING_RATES:
        out = f"{work}/sweep/{variant.replace(' ', '_').replace('%', '')}_lr{lr:g}"
        try:
            losses[lr] = fine_tune(sweep_common, variant, steps, lr, out, exact_match=0)[0]["eval_loss"]
        except train_sft.RunStopped:  # diverged: train_sft stops it rather than train on NaN
            losses[lr] = float("inf")
        print(json.dumps({"sweep": variant, "learning_rate": lr, "validation_loss": losses[lr]}))
    return min(losses, key=losses.get), losses


def cpu(steps, base_steps, sweep_steps):
    from data import demo_examples
    load_before = load_average()
    sweep_steps = sweep_steps or steps
    train_rows, eval_rows = demo_examples()
    train_rows, validation_rows = split_validation(train_rows)
    work = tempfile.mkdtemp(prefix="bench_sparse_")
    base_train = write_rows(f"{work}/base_train.jsonl", [r for r in train_rows if r["prompt"].startswith(BASE_TASKS)])
    all_train = write_rows(f"{work}/train.jsonl", train_rows)
    validation = write_rows(f"{work}/validation.jsonl", validation_rows)
    evaluation = write_rows(f"{work}/eval.jsonl", eval_rows)
    shared = [str(ROOT / "configs/demo.py"), "--eval_interval=0", f"--cache_dir={work}/cache"]
    base, base_s = run(shared + [f"--eval_data_path={evaluation}", f"--log_interval={max(1, base_steps // 4)}",
                                 f"--data_path={base_train}", f"--max_steps={base_steps}", f"--output_dir={work}/base"])
    rows = [{"variant": "base (3 of 5 tasks)", "steps": base_steps, "eval_loss": base["eval_loss"],
             "exact_match": base["exact_match"], "wall_s": base_s}]
    print(json.dumps(rows[-1]))
    fine_tuning = shared + [f"--data_path={all_train}", f"--init_from={work}/base/hf"]
    sweep_common = fine_tuning + [f"--eval_data_path={validation}", f"--log_interval={max(1, sweep_steps // 2)}"]
    final_common = fine_tuning + [f"--eval_data_path={evaluation}", f"--log_interval={max(1, steps // 4)}"]
    sweep = []
    for variant in FINE_TUNE:
        start = time.perf_counter()
        learning_rate, losses = choose_learning_rate(variant, sweep_common, sweep_steps, work)
        sweep.append({"variant": variant, "steps": sweep_steps, "chosen": learning_rate,
                      "validation_loss": {f"{lr:g}": loss for lr, loss in losses.items()},
                      "wall_s": time.perf_counter() - start})
        out = f"{work}/{variant.replace(' ', '_').replace('%', '')}"
        result, wall = fine_tune(final_common, variant, steps, learning_rate, out, exact_match=len(eval_rows))
        records = [json.loads(line) for line in open(f"{out}/metrics.jsonl") if '"tokens_per_s"' in line]
        checkpoint, checkpoint_bytes = checkpoint_of(out)
        trained, state_bytes = optimizer_figures(checkpoint)
        row = {"variant": variant, "steps": steps, "learning_rate": learning_rate, "eval_loss": result["eval_loss"],
               "exact_match": result["exact_match"], "wall_s": wall,
               "tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
               "trained": trained, "optimizer_state_bytes": state_bytes,
               "checkpoint_bytes": checkpoint_bytes,
               "hf_weights_bytes": os.path.getsize(f"{out}/hf/model.safetensors")}
        if os.path.exists(f"{out}/sparse_delta.safetensors"):
            row["delta_bytes"] = os.path.getsize(f"{out}/sparse_delta.safetensors")
        rows.append(row)
        print(json.dumps(row))
    write("sparse_cpu.json", {"device": "cpu", "torch_threads": torch.get_num_threads(),
                              "base_tasks": [t.strip() for t in BASE_TASKS],
                              "validation_per_task": VALIDATION_PER_TASK, "learning_rate_sweep": sweep,
                              "results": rows}, load_before)


if __name__ == "__main__":
    if sys.argv[1:2] == ["gpu"]:
        gpu("--dry-run" in sys.argv)
    elif sys.argv[1:2] == ["cpu"]:
        args = parse_script_options(sys.argv[2:], CPU_OPTIONS, __doc__)
        cpu(args["steps"], args["base_steps"], args["sweep_steps"])
    else:
        sys.exit(__doc__)
