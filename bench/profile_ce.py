"""Where the time of fused_masked_linear_cross_entropy goes, at the anchor shape, on one GPU.

    python bench/profile_ce.py

The anchor of bench_ce.py: 16,384 tokens, hidden 768, vocabulary 50,257, bf16, half masked.
Prints, with triton.testing.do_bench medians:
  - each phase of one logits chunk at the default settings (the logits GEMM, the softmax-gradient
    kernel, grad_h's GEMM, grad_W's accumulating GEMM) times the number of chunks, and the
    vocabulary tail's GEMMs over all rows;
  - the GPU time inside kernels per call (torch.profiler), against the measured time;
  - the same three GEMMs over all kept rows at once (no chunking: the matrix-unit floor), with the
    odd vocabulary and with its largest multiple of 64;
  - the whole function per logits-chunk budget, vocabulary tile and warp count, with its peak
    extra memory.
Writes bench/results/profile_ce_<device>.json.
"""
import json
import sys
from pathlib import Path

import torch
import triton
import triton.testing

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sft_kernels.cross_entropy as ce  # noqa: E402
from bench.bench_ce import make_inputs  # noqa: E402
from bench.common import load_average, provenance  # noqa: E402

TOKENS, MASKED = 16384, 0.5


def bench(fn):
    return triton.testing.do_bench(fn, return_mode="median")


def tflops(flops, ms):
    return flops / ms / 1e9


def phases(h, weight, labels):
    """Time each step of one full chunk at the default settings and scale by the chunk count (a
    slight overestimate: after the first, chunks are balanced, a little smaller); the vocabulary
    tail's three thin GEMMs run once over all rows."""
    n, C = h.shape
    V = weight.shape[0]
    head = V // 64 * 64
    rows = ce._max_chunk_rows(head * h.element_size(), ce.LOGITS_CHUNK_BYTES)
    chunks = len(ce._chunk_bounds(n, rows, rows))
    logits, h_chunk, y = torch.empty(rows, head, device="cuda", dtype=h.dtype), h[:rows], labels[:rows]
    w_head, w_tail = weight[:head], weight[head:]
    tail_logits = h_chunk @ w_tail.T
    losses = torch.empty(rows, device="cuda", dtype=torch.float32)
    grad_h, grad_w = torch.empty_like(h), torch.zeros_like(weight)
    tail_block = triton.next_power_of_2(V - head)

    def logits_gemm():
        torch.mm(h_chunk, w_head.T, out=logits)

    def softmax():
        logits_gemm()  # fresh logits: the kernel overwrites them
        ce._softmax_grad_kernel[(rows,)](logits, tail_logits, y, losses, head, V - head, logits.stride(0),
                                         BLOCK=ce.BLOCK_V, TAIL_BLOCK=tail_block, num_warps=ce.NUM_WARPS)

    def tail_gemms():
        all_tail = h @ w_tail.T
        grad_h.addmm_(all_tail, w_tail)
        torch.mm(all_tail.T, h, out=grad_w[head:])

    out = {"chunk_rows": rows, "chunks": chunks, "logits_gemm_ms": bench(logits_gemm) * chunks}
    out["softmax_ms"] = bench(softmax) * chunks - out["logits_gemm_ms"]
    out["grad_h_gemm_ms"] = bench(lambda: torch.mm(logits, w_head, out=grad_h[:rows])) * chunks
    out["grad_w_addmm_ms"] = bench(lambda: grad_w[:head].addmm_(logits.T, h_chunk)) * chunks
    out["tail_gemms_ms"] = bench(tail_gemms)
    flops = 2 * rows * head * C * chunks
    out["gemm_tflops_per_s"] = {k: tflops(flops, out[f"{k}_ms"]) for k in ("logits_gemm", "grad_h_gemm", "grad_w_addmm")}
    return out


def kernel_time(hidden, weight, labels):
    """GPU time inside kernels for one forward + backward, from the profiler: the rest of the
    measured time is the GPU waiting (on the host sync for the kept-row count, and on launches)."""
    def step():
        ce.fused_masked_linear_cross_entropy(hidden, weight, labels).backward()
        hidden.grad = weight.grad = None
    step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name = {}
    for e in kernels:
        by_name[e.name] = by_name.get(e.name, 0.0) + e.device_time / 1e3 / 10
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:12]
    return {"kernel_ms_per_step": sum(by_name.values()), "kernels_per_step": len(kernels) / 10,
            "top_kernels_ms": {name[:90]: ms for name, ms in top}}


def unchunked_gemms(h, weight):
    """The three GEMMs over all kept rows at once: what the matrix units need, no chunking."""
    logits = h @ weight.T
    flops = 2 * h.shape[0] * weight.shape[0] * h.shape[1]
    times = {"logits": bench(lambda: h @ weight.T), "grad_h": bench(lambda: logits @ weight),
             "grad_w": bench(lambda: logits.T @ h)}
    return {"ms": times, "total_ms": sum(times.values()), "tflops_per_s": {k: tflops(flops, v) for k, v in times.items()}}


def whole(hidden, weight, labels, chunk_mib, block_v, num_warps):
    def step():
        ce._FusedMaskedLinearCrossEntropy.apply(hidden, weight, labels, -100, True, chunk_mib * 2**20, block_v,
                                                num_warps).backward()
    hidden.grad = weight.grad = None
    step()  # compile this kernel variant outside the measurement
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    ms = triton.testing.do_bench(step, grad_to_none=[hidden, weight], return_mode="median")
    hidden.grad = weight.grad = None
    return {"chunk_mib": chunk_mib, "block_v": block_v, "num_warps": num_warps, "ms": ms, "peak_extra_mib": peak}


def main():
    if not torch.cuda.is_available():
        sys.exit("profile_ce.py needs a CUDA GPU")
    load_before = load_average()
    hidden, weight, labels = make_inputs(TOKENS, MASKED)
    rows = (labels != -100).nonzero().squeeze(1)
    h, y = hidden.detach().index_select(0, rows), labels[rows]
    w = weight.detach()
    report = {"device": torch.cuda.get_device_name(), "tokens": TOKENS, "masked_share": MASKED, "kept_rows": len(rows)}
    report["partition_ms"] = bench(lambda: ce._partition_rows(labels, w.shape[0], -100)[2]())
    head = w.shape[0] // 64 * 64
    report["unchunked_gemms"] = {f"V={w.shape[0]}": unchunked_gemms(h, w), f"V={head}": unchunked_gemms(h, w[:head])}
    report["phases"] = phases(h, w, y)
    report["kernel_time"] = kernel_time(hidden, weight, labels)
    report["whole"] = [whole(hidden, weight, labels, mib, block, warps) for mib in (128, 136)
                       for block, warps in ((4096, 16), (8192, 16))]
    print(json.dumps({k: v for k, v in report.items() if k != "whole"}, indent=1))
    print(f"{'chunk MiB':>9} {'block':>6} {'warps':>5} {'ms':>7} {'peak MiB':>8}")
    for r in report["whole"]:
        print(f"{r['chunk_mib']:>9} {r['block_v']:>6} {r['num_warps']:>5} {r['ms']:>7.3f} {r['peak_extra_mib']:>8.0f}")
    name = report["device"].replace(" ", "_").replace("/", "_")
    out = ROOT / "bench" / "results" / f"profile_ce_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report.update(provenance(["bench/profile_ce.py"], load_before, packages=("triton",)))
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
