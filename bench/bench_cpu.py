"""The CPU's own yardstick and the trainer's CPU MFU against it; with --profile, where one step's time goes.

    .venv/bin/python bench/bench_cpu.py [--init_from=MODEL_DIR_OR_GGUF] [--steps=4] [--threads=0]
    .venv/bin/python bench/bench_cpu.py --profile      # one profiled step of full fine-tuning and of LoRA

1. The peak: torch.mm in float32, with the threads the trainer uses, at the GEMM shapes of one training
   step of the model (every Linear's forward, its two backward products, and the head at the trained
   rows), best of --gemm_repeats per shape. The peak is the step's matmul FLOPs over the sum of those
   best times: what a step could reach if it did nothing but its own matmuls at their best speed. It is
   timed in wall seconds and in CPU seconds per thread; both can only undercount the machine (waits for
   a core on a loaded machine; spinning threads), so the recorded peak is the larger.
2. The trainer's step: the model (--init_from, a Hugging Face directory or a GGUF file), batches of --batch_size rows
   of --seq_len tokens whose second halves are trained (SFT trains about half the positions), through
   the trainer's own optimizer (train_sft.make_optimizer) and engine (zero_lite.Engine, stage 0): forward,
   backward, clip, AdamW. Rows (each --steps timed steps after one warm-up, the rows alternating step by
   step so that a change of machine load hits all of them):
     full          full fine-tuning, the trainer's settings
     lora16        LoRA rank 16 on every block Linear, only the LoRA factors trained
     full_unfused  full fine-tuning with torch's one-tensor-at-a-time AdamW in place of the trainer's fused one:
                   that lever's effect, measured in the same run
   MFU = model FLOPs per position (model.flops_per_token(seq_len): 6 per trained weight, 4 per frozen
   one, plus attention, the head counted at every position, as on a GPU) x positions per second / the
   peak. mfu_of_cpu_time is the same with CPU seconds per thread for both the step and the peak: on a
   loaded machine, where wall time counts the waits for a core, it is the steadier figure.
Load average before and after, both recorded: on a shared machine the figures are noisy.

Writes bench/results/cpu_<machine>.json (model.cpu_peak_path()), whose matmul_peak_flops the trainer's
log line divides by to show `mfu` on this CPU; --profile writes bench/results/profile_cpu_<machine>.json.
"""
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_average, provenance  # noqa: E402
from model import GPT, apply_lora, cpu_machine_name, cpu_peak_path, only_optimize_lora  # noqa: E402
from options import parse_script_options  # noqa: E402

OPTIONS = {
    "init_from": (".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf",
                  "the model: a Hugging Face directory or a GGUF file (setup.sh --model=smollm2-135m), as float32"),
    "batch_size": (4, "rows per step"),
    "seq_len": (256, "tokens per row (the second half of each row is trained)"),
    "steps": (4, "timed steps of each row, after one warm-up step"),
    "threads": (0, "torch threads; 0: the trainer's choice for one process (all cores)"),
    "gemm_repeats": (5, "timed repeats of each GEMM shape (the best counts)"),
    "rows": ("full,lora16,full_unfused", "which training rows to time"),
    "profile": (False, "profile one step of full fine-tuning and of LoRA instead (torch.profiler)"),
}
LORA_RANK = 16
TRAINER_CFG = dict(sparse_density=0, lora_learning_rate=0, learning_rate=1e-5, weight_decay=0.0, beta1=0.9,
                   beta2=0.95)


# ----------------------------------------------------------------------------- the peak

def step_gemms(config, positions, trained):
    """(m, k, n) of every matmul in one training step: each block Linear's forward (positions x in -> out),
    its input gradient (positions x out -> in) and weight gradient (out x positions -> in), and the head's
    three at the trained rows only (the chunked loss skips the rest). Attention's own products are left
    out: SDPA does them, not torch.mm."""
    C, hs = config.n_embd, config.head_dim
    q, kv, width = config.n_head * hs, config.n_kv_head * hs, config.intermediate_size
    up = 2 * width if config.mlp == "swiglu" else width
    per_layer = [(C, q + 2 * kv), (q, C), (C, up), (width, C)]  # (in, out) of c_attn, attn.c_proj, c_fc, mlp.c_proj
    gemms = []
    for k, n in per_layer:
        gemms += [(positions, k, n), (positions, n, k), (n, positions, k)] * config.n_layer
    gemms += [(trained, C, config.vocab_size), (trained, config.vocab_size, C), (config.vocab_size, trained, C)]
    return gemms


def best_gemm_seconds(m, k, n, repeats):
    """The fastest wall and CPU seconds (of all threads) of `repeats` float32 torch.mm calls of
    (m, k) @ (k, n), after one untimed call."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    wall = cpu = float("inf")
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        wall, cpu = min(wall, time.perf_counter() - start), min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def matmul_peak(gemms, repeats, threads):
    """The step's matmul FLOPs over the sum of their best wall times (the peak), the same over their best
    CPU times / threads (the peak as CPU time sees it: steadier on a loaded machine), and per distinct shape."""
    shapes = {}
    for shape in gemms:
        if shape not in shapes:
            shapes[shape] = best_gemm_seconds(*shape, repeats)
    flops = sum(2 * m * k * n for m, k, n in gemms)
    wall = sum(shapes[shape][0] for shape in gemms)
    cpu = sum(shapes[shape][1] for shape in gemms) / threads
    per_shape = [{"m": m, "k": k, "n": n, "gflops": 2 * m * k * n / w / 1e9, "gflops_of_cpu_time": 2 * m * k * n / c
                  * threads / 1e9} for (m, k, n), (w, c) in shapes.items()]
    return flops / wall, flops / cpu, per_shape


# ----------------------------------------------------------------------------- the trainer's step

def sft_batch(batch_size, seq_len, vocab_size, seed=0):
    """Token ids and labels (already shifted) of SFT-like rows: the second half of each row is trained."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    labels = torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)
    labels[:, :seq_len // 2] = -100
    return idx, labels


def make_row(name, init_from):
    """(model, engine) of one training row, built as the trainer builds them (float32, stage 0)."""
    import train_sft
    import zero_lite
    model = GPT.from_pretrained(init_from)
    if name.startswith("lora"):
        apply_lora(model, LORA_RANK)
        only_optimize_lora(model)
    optimizer = train_sft.make_optimizer(model, TRAINER_CFG, fused=name != "full_unfused")
    return model, zero_lite.Engine(model, optimizer, stage=0, grad_clip=1.0)


def train_step(engine, idx, labels):
    """One optimizer step as the trainer's loop runs it (one micro-batch): forward, backward, clip, AdamW."""
    loss = engine(idx, labels)
    engine.backward(loss)
    engine.step(1.0, torch.isfinite(loss.detach()))
    return loss.detach()


def time_rows(names, init_from, idx, labels, steps):
    """Seconds (wall, CPU) of each row's timed steps, the rows alternating step by step."""
    rows = {name: make_row(name, init_from) for name in names}
    for _, engine in rows.values():
        train_step(engine, idx, labels)  # warm-up: allocations, the optimizer's state
    times = {name: {"wall_s": [], "cpu_s": []} for name in names}
    for _ in range(steps):
        for name, (_, engine) in rows.items():
            wall, cpu = time.perf_counter(), time.process_time()
            train_step(engine, idx, labels)
            times[name]["wall_s"].append(time.perf_counter() - wall)
            times[name]["cpu_s"].append(time.process_time() - cpu)
    return rows, times


def row_figures(model, times, positions, trained, seq_len, peak, threads, peak_of_cpu_time=None):
    """Rates and MFU of one row from its median step time; CPU MFU also per CPU-second of all threads."""
    wall = statistics.median(times["wall_s"])
    cpu = statistics.median(times["cpu_s"])
    flops = model.flops_per_token(seq_len) * positions
    return {"step_wall_s": times["wall_s"], "step_cpu_s": times["cpu_s"], "median_step_wall_s": wall,
            "positions_per_s": positions / wall, "trained_tokens_per_s": trained / wall,
            "trained_tokens_per_cpu_s": trained / cpu, "model_flops_per_step": flops,
            "mfu": cpu_mfu(flops, wall, peak),
            "mfu_of_cpu_time": cpu_mfu(flops, cpu / threads, peak_of_cpu_time or peak),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def cpu_mfu(flops, seconds, peak):
    """Model FLOPs done per second over the measured peak FLOP/s."""
    return flops / seconds / peak


# ----------------------------------------------------------------------------- the profile

PHASES = ("forward", "head + loss", "backward", "optimizer (clip + AdamW)")


def profile_step(engine, idx, labels):
    """One step under torch.profiler, its phases marked; returns the profiler."""
    from torch.profiler import ProfilerActivity, profile, record_function
    module, loss_fn = engine.module, engine.module.loss_fn

    def timed_loss(*args, **kwargs):
        with record_function("head + loss"):
            return loss_fn(*args, **kwargs)
    module.loss_fn = timed_loss
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with record_function("forward"):
            loss = engine(idx, labels)
        with record_function("backward"):
            engine.backward(loss)
        with record_function("optimizer (clip + AdamW)"):
            engine.step(1.0, torch.isfinite(loss.detach()))
    module.loss_fn = loss_fn
    return prof


def op_group(name):
    """Which kind of work a profiled op is."""
    if name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"):
        return "matmul"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if "adam" in name.lower() or name.startswith("aten::_foreach"):
        return "optimizer kernels"
    if name in ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::nonzero"):
        return "host syncs"
    return "other ops"


def profile_summary(prof):
    """Seconds per phase (wall, from the marked ranges) and per kind of op (self CPU time), and the host syncs."""
    events = prof.key_averages()
    phases = {e.key: e.cpu_time_total / 1e6 for e in events if e.key in PHASES}
    groups = {}
    for e in events:
        if e.key in PHASES or e.key.startswith("ProfilerStep"):
            continue
        group = op_group(e.key)
        groups[group] = groups.get(group, 0.0) + e.self_cpu_time_total / 1e6
    syncs = {e.key: e.count for e in events if op_group(e.key) == "host syncs"}
    top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]
    return {"phases_s": phases, "op_groups_self_s": groups, "host_sync_ops": syncs,
            "top_ops": [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6} for e in top]}


def run_profile(args, idx, labels):
    """Profiles one step (after a warm-up) of full fine-tuning and of LoRA; returns the summaries."""
    out = {}
    for name in ("full", f"lora{LORA_RANK}"):
        _, engine = make_row(name, args["init_from"])
        train_step(engine, idx, labels)
        out[name] = profile_summary(profile_step(engine, idx, labels))
        print(f"{name}: " + ", ".join(f"{k} {v:.3f} s" for k, v in out[name]["phases_s"].items()), flush=True)
        print("   ops: " + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(out[name]["op_groups_self_s"].items(),
                                                                         key=lambda kv: -kv[1])), flush=True)
        del engine
    return out


# ----------------------------------------------------------------------------- the run

def main(argv):
    args = parse_script_options(argv, OPTIONS, __doc__)
    threads = args["threads"] or os.cpu_count() or 1
    torch.set_num_threads(threads)
    load_before = load_average()
    config = GPT.from_pretrained(args["init_from"]).config
    idx, labels = sft_batch(args["batch_size"], args["seq_len"], config.vocab_size)
    positions, trained = idx.numel(), int((labels != -100).sum())
    record = {"threads": threads, "init_from": args["init_from"], "options": args}
    if args["profile"]:
        record["profile"] = run_profile(args, idx, labels)
        path = ROOT / "bench" / "results" / f"profile_cpu_{cpu_machine_name()}.json"
    else:
        peak_wall, peak_cpu, per_shape = matmul_peak(step_gemms(config, positions, trained), args["gemm_repeats"],
                                                     threads)
        peak = max(peak_wall, peak_cpu)  # both undercount (time waiting for a core, spinning threads): take the closer
        print(f"float32 matmul peak at the step's GEMM shapes, {threads} thread(s): {peak / 1e9:.1f} GFLOP/s "
              f"({peak_wall / 1e9:.1f} by wall time, {peak_cpu / 1e9:.1f} per CPU-second of each thread)", flush=True)
        names = [n for n in args["rows"].split(",") if n]
        rows, times = time_rows(names, args["init_from"], idx, labels, args["steps"])
        record.update(matmul_peak_flops={str(threads): peak}, matmul_peak_flops_of_wall_time={str(threads): peak_wall},
                      matmul_peak_flops_of_cpu_time={str(threads): peak_cpu},
                      gemm_shapes=per_shape, rows={})
        for name, (model, _) in rows.items():
            fig = row_figures(model, times[name], positions, trained, args["seq_len"], peak, threads, peak_cpu)
            record["rows"][name] = fig
            print(f"{name:<13} step {fig['median_step_wall_s']:.2f} s, {fig['trained_tokens_per_s']:.1f} trained "
                  f"tokens/s, MFU {fig['mfu']:.1%} (of CPU time: {fig['mfu_of_cpu_time']:.1%})", flush=True)
        path = cpu_peak_path()
        if path.exists():  # keep the peaks measured with other thread counts
            before = json.loads(path.read_text())
            for key in ("matmul_peak_flops", "matmul_peak_flops_of_wall_time", "matmul_peak_flops_of_cpu_time"):
                record[key] = {**before.get(key, {}), **record[key]}
    record.update(provenance(["bench/bench_cpu.py", "train_sft.py"], load_before))
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"load {record['load_average_before']} -> {record['load_average_after']}; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
