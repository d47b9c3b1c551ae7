"""Linear + masked cross-entropy, forward + backward, ours against the peers on one GPU.

    python bench/bench_ce.py

Shapes, bf16: hidden 768 and GPT-2's vocabulary of 50,257, the anchor (16k
tokens, 50% masked: one 16 x 1024 batch of GPT-2 124M with half its labels masked) first, then token counts 4k/16k/64k times masked shares 0/50/90%; last, Qwen2.5-0.5B's
head, hidden 896 and a vocabulary of 151,936, at 16k tokens, 50% masked. Per implementation:
median fwd+bwd time (triton.testing.do_bench), peak extra memory (max_memory_allocated above what
was allocated before the call; the .grad tensors it creates count, as for every peer) and the
loss's relative error against the fp32 reference. Peers: PyTorch eager, torch.compile of the same,
and, where their packages are installed (gpu_suite.py's wheels step installs them from .whl/), Liger-Kernel's
fused linear cross-entropy and its cross-entropy on materialised logits, and Apple's Cut
Cross-Entropy with its defaults (impl "cce", gradient filter "high", no autotuning).
Every implementation runs on the same inputs at every shape (torch.compile compiled anew for each).
Prints a table and rewrites bench/results/ce_<device>.json after every shape, so a run stopped by a
time limit keeps the shapes it finished ("complete": false until the last). A peer that fails
gets an error note in its row; the exit status is 1 when our own kernel failed anywhere.
"""
import importlib
import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import load_average, provenance  # noqa: E402

HIDDEN, VOCAB, DTYPE, IGNORE = 768, 50257, torch.bfloat16, -100  # the file's hidden and vocab: GPT-2's
QWEN_HIDDEN, QWEN_VOCAB = 896, 151936  # Qwen2.5-0.5B's head
ANCHOR = (16384, 0.5, HIDDEN, VOCAB)
# (tokens, masked share, hidden, vocabulary); rows record their hidden and vocab
CASES = [ANCHOR] + [(tokens, masked, HIDDEN, VOCAB) for tokens in (4096, 16384, 65536) for masked in (0.0, 0.5, 0.9)
                    if (tokens, masked) != ANCHOR[:2]] + [(16384, 0.5, QWEN_HIDDEN, QWEN_VOCAB)]
OURS = "ours (triton)"


def eager(hidden, weight, labels):
    """What a plain PyTorch model does: bf16 logits, upcast, cross-entropy."""
    return F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE)


def first(loss):
    """Some Liger versions return (loss, z_loss)."""
    return loss[0] if isinstance(loss, tuple) else loss


def liger_fused(loss_class):
    loss = loss_class(ignore_index=IGNORE)
    return lambda h, w, y: first(loss(w, h, y))


def liger_on_logits(loss_class):
    loss = loss_class(ignore_index=IGNORE)
    return lambda h, w, y: first(loss(h @ w.T, y))


def cut_cross_entropy(linear_cross_entropy):
    return lambda h, w, y: linear_cross_entropy(h, w, y, ignore_index=IGNORE)


# Peers from packages: row name -> (distribution, module, attribute, adapter to loss_fn(hidden, weight, labels)).
# gpu_suite.py's dry run checks these same paths.
PACKAGE_PEERS = {
    "liger fused linear CE": ("liger-kernel", "liger_kernel.transformers", "LigerFusedLinearCrossEntropyLoss",
                              liger_fused),
    "liger CE on logits": ("liger-kernel", "liger_kernel.transformers", "LigerCrossEntropyLoss", liger_on_logits),
    "cut cross-entropy": ("cut-cross-entropy", "cut_cross_entropy", "linear_cross_entropy", cut_cross_entropy),
}


def load_peer(module, attribute):
    """The peer's function or class; None when its package is not installed. A path that is wrong
    inside an installed package raises (ImportError, AttributeError): that is a bug here, not a
    missing peer."""
    if importlib.util.find_spec(module.split(".")[0]) is None:
        return None
    return getattr(importlib.import_module(module), attribute)


def implementations():
    """name -> loss_fn(hidden, weight, labels), and name -> why for each package peer left out."""
    from sft_kernels.cross_entropy import fused_masked_linear_cross_entropy
    impls = {OURS: fused_masked_linear_cross_entropy, "torch eager": eager,
             "torch.compile": torch.compile(eager, dynamic=False)}
    skipped = {}
    for name, (distribution, module, attribute, adapter) in PACKAGE_PEERS.items():
        try:
            peer = load_peer(module, attribute)
        except Exception as exc:  # installed but broken: say so, measure the others
            skipped[name] = f"{module}.{attribute} failed to load: {exc!r}"[:300]
        else:
            if peer is None:
                skipped[name] = f"{distribution} is not installed"
            else:
                impls[name] = adapter(peer)
        if name in skipped:
            print(f"note: row {name!r} is skipped: {skipped[name]}")
    return impls, skipped


def make_inputs(tokens, masked_share, n_hidden=HIDDEN, vocab=VOCAB, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(tokens, n_hidden, device="cuda", generator=gen).to(DTYPE).requires_grad_()
    weight = (torch.randn(vocab, n_hidden, device="cuda", generator=gen) / n_hidden**0.5).to(DTYPE).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=gen)
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
    """Median fwd+bwd ms, peak extra MiB, relative loss error; None entries and a note where it ran out
    of memory or failed."""
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
    except Exception as exc:  # a peer that breaks on this shape or this Triton: recorded, the run goes on
        return {"ms": None, "peak_extra_mib": None, "loss_rel_err": None, "note": f"error: {exc!r}"[:300]}
    finally:
        hidden.grad = weight.grad = None
        torch.cuda.empty_cache()


def write_results(meta, load_before, rows, complete):
    """Rewrite the result file with the rows so far (a run stopped by a time limit keeps them)."""
    device = meta["device"]
    out = ROOT / "bench" / "results" / f"ce_{device.replace(' ', '_').replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    peers = [distribution for distribution, *_ in PACKAGE_PEERS.values()]
    record = {**meta, **provenance(["bench/bench_ce.py"], load_before, packages=("triton", *peers)),
              "complete": complete, "results": rows}
    out.write_text(json.dumps(record, indent=1) + "\n")
    return out


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_ce.py needs a CUDA GPU: it measures GPU time and memory (CPU correctness is in tests/test_kernels.py)")
    load_before = load_average()
    impls, skipped = implementations()
    meta = {"device": torch.cuda.get_device_name(), "skipped_peers": skipped, "hidden": HIDDEN, "vocab": VOCAB,
            "dtype": str(DTYPE)}
    rows = []
    print(f"{'vocab':>7} {'tokens':>6} {'masked':>6}  {'implementation':<24} {'ms':>8} {'peak MiB':>9} "
          f"{'loss rel err':>12}")
    for case in CASES:
        tokens, masked, n_hidden, vocab = case
        torch._dynamo.reset()  # a fresh compile per shape, never the recompile-limit fallback to eager
        hidden, weight, labels = make_inputs(tokens, masked, n_hidden, vocab)
        ref = reference_loss(hidden, weight, labels)
        for name, loss_fn in impls.items():
            result = {"tokens": tokens, "masked_share": masked, "hidden": n_hidden, "vocab": vocab,
                      "implementation": name, **measure(loss_fn, hidden, weight, labels, ref)}
            rows.append(result)
            fmt = lambda key, spec: "-" if result[key] is None else format(result[key], spec)  # noqa: E731
            print(f"{vocab:>7} {tokens:>6} {masked:>6.0%}  {name:<24} {fmt('ms', '8.2f')} "
                  f"{fmt('peak_extra_mib', '9.0f')} {fmt('loss_rel_err', '12.1e')} {result.get('note', '')}")
        del hidden, weight, labels
        out = write_results(meta, load_before, rows, complete=case == CASES[-1])
    print(f"wrote {out.relative_to(ROOT)}")
    ours_failed = [row for row in rows if row["implementation"] == OURS and row["ms"] is None]
    if ours_failed:
        sys.exit(f"bench_ce.py: our kernel failed at {len(ours_failed)} shape(s): {ours_failed[0].get('note')}")


if __name__ == "__main__":
    main()
