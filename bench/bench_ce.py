"""Linear + masked cross-entropy, forward + backward, ours against the peers on one GPU.

    python bench/bench_ce.py

Shapes: hidden 768, GPT-2 vocabulary 50,257, bf16; token counts 4k/16k/64k times masked shares
0/50/90% (16k tokens with 50% masked is the anchor of ../shared/ANCHORS.md). Per implementation:
median fwd+bwd time (triton.testing.do_bench), peak extra memory (max_memory_allocated above what
was allocated before the call; the .grad tensors it creates count, as for every peer) and the
loss's relative error against the fp32 reference. Prints a table, writes bench/results/ce_<device>.json.
"""
import datetime
import hashlib
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HIDDEN, VOCAB, DTYPE, IGNORE = 768, 50257, torch.bfloat16, -100
CASES = [(tokens, masked) for tokens in (4096, 16384, 65536) for masked in (0.0, 0.5, 0.9)]


def eager(hidden, weight, labels):
    """What a plain PyTorch model does: bf16 logits, upcast, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE)


def implementations():
    """name -> loss_fn(hidden, weight, labels); Liger's entries only where it is importable."""
    from kernels import fused_masked_linear_cross_entropy
    impls = {"ours (triton)": fused_masked_linear_cross_entropy, "torch eager": eager,
             "torch.compile": torch.compile(eager, dynamic=False)}
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError as exc:
        print(f"note: Liger-Kernel not importable ({exc}); its rows are skipped")
        return impls
    liger_fused, liger_ce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE), LigerCrossEntropyLoss(ignore_index=IGNORE)

    def first(loss):  # some Liger versions return (loss, z_loss)
        return loss[0] if isinstance(loss, tuple) else loss

    impls["liger fused linear CE"] = lambda h, w, y: first(liger_fused(w, h, y))
    impls["liger CE on logits"] = lambda h, w, y: first(liger_ce(h @ w.T, y))
    return impls


def source_digest(paths):
    """The first 12 hex digits of each file's sha256 (as `sha256sum` prints it), so that a result
    file can be matched with the code that produced it: the GPU machine may have no git history."""
    return {path: hashlib.sha256((ROOT / path).read_bytes()).hexdigest()[:12] for path in paths}


def make_inputs(tokens, masked_share, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    weight = (torch.randn(VOCAB, HIDDEN, device="cuda", generator=gen) / HIDDEN**0.5).to(DTYPE).requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=gen)
    labels[torch.rand(tokens, device="cuda", generator=gen) < masked_share] = IGNORE
    return hidden, weight, labels


def reference_loss(hidden, weight, labels, rows_per_chunk=4096):
    """fp32 mean loss over unmasked tokens, in chunks so that 64k tokens fit beside the peers."""
    total = torch.zeros((), device="cuda", dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, len(labels), rows_per_chunk):
            logits = hidden[start:start + rows_per_chunk].float() @ weight.float().T
            total += F.cross_entropy(logits, labels[start:start + rows_per_chunk], ignore_index=IGNORE, reduction="sum")
    return (total / (labels != IGNORE).sum().clamp(min=1)).item()


def measure(loss_fn, hidden, weight, labels, ref):
    """Median fwd+bwd ms, peak extra MiB, relative loss error; None entries where it ran out of memory."""
    import triton.testing

    def step():
        loss_fn(hidden, weight, labels).backward()

    try:
        hidden.grad = weight.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss = loss_fn(hidden, weight, labels)
        loss.backward()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / 2**20
        rel_err = abs(loss.item() - ref) / max(abs(ref), 1e-12)
        ms = triton.testing.do_bench(step, grad_to_none=[hidden, weight], return_mode="median")
        return {"ms": ms, "peak_extra_mib": peak_mib, "loss_rel_err": rel_err}
    except torch.OutOfMemoryError:
        return {"ms": None, "peak_extra_mib": None, "loss_rel_err": None, "note": "out of memory"}
    finally:
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_ce.py needs a CUDA GPU: it measures GPU time and memory (CPU correctness is in tests/test_kernels.py)")
    import triton
    impls = implementations()
    rows = []
    print(f"{'tokens':>6} {'masked':>6}  {'implementation':<24} {'ms':>8} {'peak MiB':>9} {'loss rel err':>12}")
    for tokens, masked in CASES:
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile-limit fallback to eager
        hidden, weight, labels = make_inputs(tokens, masked)
        ref = reference_loss(hidden, weight, labels)
        for name, loss_fn in impls.items():
            result = {"tokens": tokens, "masked_share": masked, "implementation": name,
                      **measure(loss_fn, hidden, weight, labels, ref)}
            rows.append(result)
            fmt = lambda key, spec: "-" if result[key] is None else format(result[key], spec)  # noqa: E731
            print(f"{tokens:>6} {masked:>6.0%}  {name:<24} {fmt('ms', '8.2f')} {fmt('peak_extra_mib', '9.0f')} "
                  f"{fmt('loss_rel_err', '12.1e')}")
        del hidden, weight, labels
    device = torch.cuda.get_device_name()
    out = ROOT / "bench" / "results" / f"ce_{device.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(), "sources": source_digest(["kernels/cross_entropy.py"]),
            "hidden": HIDDEN, "vocab": VOCAB, "dtype": str(DTYPE)}
    out.write_text(json.dumps({**meta, "results": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
