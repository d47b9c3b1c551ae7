"""sft_kernels/cross_entropy.py against its fp32 PyTorch reference.

Without a GPU the Triton kernel runs on the CPU under TRITON_INTERPRET=1 (tests/conftest.py sets
it before triton is imported) on tiny shapes; with one, the same tests run compiled on the GPU.
Tolerances (relative, on the norm of the difference): fp32 loss and gradients 1e-5; bf16/fp16
loss 1e-3 and gradients 1e-2 against the fp32 reference on the same (rounded) inputs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sft_kernels.cross_entropy as cross_entropy

IGNORE = -100
ROOT = Path(__file__).resolve().parent.parent
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not cross_entropy._interpreted():
    raise RuntimeError("no CUDA and triton was imported without TRITON_INTERPRET=1 (see tests/conftest.py)")


@pytest.fixture
def ce(monkeypatch):
    """The module with small vocabulary tiles and logits chunks of a few rows, so tiny shapes still
    cross tile and chunk boundaries (and tails) as the anchor shape does."""
    monkeypatch.setattr(cross_entropy, "BLOCK_V", 32)
    monkeypatch.setattr(cross_entropy, "LOGITS_CHUNK_BYTES", 5 * 64 * 4)
    return cross_entropy


def make_inputs(n, c, v, masked_share, dtype=torch.float32, seed=0, device=DEVICE):
    """Fresh random hidden, weight and labels; a seeded generator keeps a failure reproducible."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, c, generator=gen).to(device, dtype)
    weight = (torch.randn(v, c, generator=gen) / c**0.5).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < masked_share] = IGNORE
    return hidden, weight, labels.to(device)


def loss_and_grads(loss_fn, hidden, weight, labels, scale=1.0, dtype=None):
    """Loss and the gradients of scale * loss, with inputs optionally cast to dtype first."""
    hidden = hidden.detach().to(dtype or hidden.dtype).requires_grad_()
    weight = weight.detach().to(dtype or weight.dtype).requires_grad_()
    loss = loss_fn(hidden, weight, labels, ignore_index=IGNORE)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_rel_close(actual, expected, tol, what):
    err = (actual.double() - expected.double()).norm()
    assert err <= tol * expected.double().norm() + 1e-12, f"{what}: relative error {err / expected.double().norm():.2e} > {tol}"


@pytest.mark.parametrize("n, c, v, masked_share", [
    (1, 16, 1, 0.0),     # one token, one word: the loss is exactly 0
    (1, 16, 50, 0.0),
    (37, 24, 257, 0.5),  # 257 words: 8 full tiles of 32 and a tail of 1
    (37, 16, 50, 0.0),   # none masked: no compaction
    (64, 16, 33, 0.9),
    (12, 16, 70, 0.7),   # 3 kept rows, fewer than the first chunk (5), whose logits come before the count
])
def test_fp32_matches_reference(ce, n, c, v, masked_share):
    inputs = make_inputs(n, c, v, masked_share, seed=n * v)
    ours = loss_and_grads(ce.fused_masked_linear_cross_entropy, *inputs)
    ref = loss_and_grads(ce.reference_masked_linear_cross_entropy, *inputs)
    for got, want, what in zip(ours, ref, ("loss", "grad hidden", "grad weight")):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_rel_close(got, want, 1e-5, what)


@pytest.mark.parametrize("v", [200, 1000, 128])
def test_vocabulary_head_with_a_partial_tile_and_a_tail(ce, monkeypatch, v):
    """Tiles of 128 over the head (the largest multiple of 64): 200 -> head 192 (one full tile, a
    partial one of 64) + tail 8; 1000 -> 960 (7 full, 64) + 40; 128 -> one full tile, no tail."""
    monkeypatch.setattr(ce, "BLOCK_V", 128)
    inputs = make_inputs(45, 16, v, 0.3, seed=v)
    ours = loss_and_grads(ce.fused_masked_linear_cross_entropy, *inputs)
    ref = loss_and_grads(ce.reference_masked_linear_cross_entropy, *inputs)
    for got, want, what in zip(ours, ref, ("loss", "grad hidden", "grad weight")):
        assert_rel_close(got, want, 1e-5, what)


def test_qwen_vocabulary_with_the_real_tiles(monkeypatch):
    """V = 151,936 (Qwen2/Qwen3): a multiple of 64, so no tail; with the real 8,192-column tiles the head
    is 18 full tiles and a masked one of 4,480. Logits chunks of 2 rows, so 5 kept rows cross chunk
    boundaries; labels at the first and last columns and inside the partial tile."""
    v = 151_936
    monkeypatch.setattr(cross_entropy, "LOGITS_CHUNK_BYTES", 2 * v * 4)
    assert (v // 64 * 64, cross_entropy.BLOCK_V) == (v, 8192)
    hidden, weight, labels = make_inputs(7, 4, v, 0.0, seed=5)
    labels[:] = torch.tensor([0, IGNORE, v - 1, 147_456, IGNORE, 151_000, 8191], device=DEVICE)
    ours = loss_and_grads(cross_entropy.fused_masked_linear_cross_entropy, hidden, weight, labels)
    ref = loss_and_grads(cross_entropy.reference_masked_linear_cross_entropy, hidden, weight, labels)
    for got, want, what in zip(ours, ref, ("loss", "grad hidden", "grad weight")):
        assert_rel_close(got, want, 1e-5, what)


@pytest.mark.parametrize("n, masked_share, dtype", [(0, 0.0, torch.int64), (1, 1.0, torch.int64),
                                                     (5000, 0.5, torch.int32), (4097, 0.0, torch.int64)])
def test_partition_puts_kept_rows_first_in_order(ce, monkeypatch, n, masked_share, dtype):
    """The partition kernel against torch: the kept rows first, in order, then every other row
    once; their labels as int64; with steps of 1024 labels so that 5,000 crosses the running
    offsets four times."""
    monkeypatch.setattr(ce, "PARTITION_BLOCK", 1024)
    labels = make_inputs(n, 1, 50, masked_share, seed=n)[2].to(dtype)
    order, kept_labels, read_count = ce._partition_rows(labels, 50, IGNORE)
    want = (labels != IGNORE).nonzero().squeeze(1)
    n_kept = read_count()
    assert n_kept == len(want) and torch.equal(order[:n_kept], want)
    assert torch.equal(order.sort().values, torch.arange(n, device=DEVICE))
    assert kept_labels.dtype == torch.int64 and torch.equal(kept_labels[:n_kept], labels[want].long())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_matches_fp32_reference(ce, dtype):
    hidden, weight, labels = make_inputs(37, 24, 257, 0.5, dtype=dtype, seed=1)
    loss, grad_h, grad_w = loss_and_grads(ce.fused_masked_linear_cross_entropy, hidden, weight, labels)
    ref = loss_and_grads(ce.reference_masked_linear_cross_entropy, hidden, weight, labels, dtype=torch.float32)
    assert loss.dtype == torch.float32 and grad_h.dtype == grad_w.dtype == dtype
    assert_rel_close(loss, ref[0], 1e-3, "loss")
    assert_rel_close(grad_h, ref[1], 1e-2, "grad hidden")
    assert_rel_close(grad_w, ref[2], 1e-2, "grad weight")


def test_autocast_runs_in_its_dtype_and_returns_fp32_grads(ce):
    inputs = make_inputs(37, 16, 50, 0.5, seed=2)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss, grad_h, grad_w = loss_and_grads(ce.fused_masked_linear_cross_entropy, *inputs)
    ref = loss_and_grads(ce.reference_masked_linear_cross_entropy, *inputs, dtype=torch.float32)
    exact = loss_and_grads(ce.fused_masked_linear_cross_entropy, *inputs)
    assert grad_h.dtype == grad_w.dtype == torch.float32 and loss.item() != exact[0].item()  # bf16 inside
    assert_rel_close(loss, ref[0], 1e-3, "loss")
    assert_rel_close(grad_h, ref[1], 1e-2, "grad hidden")
    assert_rel_close(grad_w, ref[2], 1e-2, "grad weight")


def test_all_masked_gives_zero_loss_and_zero_grads(ce):
    hidden, weight, labels = make_inputs(7, 16, 50, 1.0)
    loss, grad_h, grad_w = loss_and_grads(ce.fused_masked_linear_cross_entropy, hidden, weight, labels)
    assert loss.item() == 0.0
    assert grad_h.shape == hidden.shape and grad_w.shape == weight.shape
    assert not grad_h.any() and not grad_w.any()


def test_masked_rows_get_zero_grad_and_int32_labels_work(ce):
    hidden, weight, labels = make_inputs(20, 16, 50, 0.5, seed=3)
    _, grad_h, _ = loss_and_grads(ce.fused_masked_linear_cross_entropy, hidden, weight, labels.int())
    assert not grad_h[labels == IGNORE].any() and grad_h[labels != IGNORE].abs().sum(1).all()


def test_grad_output_scales_both_gradients(ce):
    """Gradient accumulation: the caller multiplies the loss; backward must honour the factor."""
    inputs = make_inputs(37, 16, 50, 0.5, seed=4)
    _, grad_h, grad_w = loss_and_grads(ce.fused_masked_linear_cross_entropy, *inputs, scale=0.25)
    _, ref_h, ref_w = loss_and_grads(ce.reference_masked_linear_cross_entropy, *inputs, scale=0.25)
    assert_rel_close(grad_h, ref_h, 1e-5, "grad hidden")
    assert_rel_close(grad_w, ref_w, 1e-5, "grad weight")


def test_frozen_weight_and_no_grad(ce, monkeypatch):
    """Evaluation (no_grad) and a frozen head must not pay for the gradients they do not need."""
    hidden, weight, labels = make_inputs(9, 16, 50, 0.3, seed=5)
    ref = ce.reference_masked_linear_cross_entropy(hidden, weight, labels)
    needed = []
    compute = ce._loss_and_grads
    monkeypatch.setattr(ce, "_loss_and_grads", lambda h, w, y, count, need_h, need_w, *rest: (
        needed.append((need_h, need_w)) or compute(h, w, y, count, need_h, need_w, *rest)))
    hidden.requires_grad_(), weight.requires_grad_()
    with torch.no_grad():
        assert_rel_close(ce.fused_masked_linear_cross_entropy(hidden, weight, labels), ref, 1e-5, "loss")
    weight.requires_grad_(False)
    ce.fused_masked_linear_cross_entropy(hidden, weight, labels).backward()
    assert hidden.grad is not None and weight.grad is None
    assert needed == [(False, False), (True, False)]


def test_second_backward_is_refused(ce):
    hidden, weight, labels = make_inputs(5, 16, 50, 0.0)
    loss = ce.fused_masked_linear_cross_entropy(hidden.requires_grad_(), weight, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


@pytest.mark.parametrize("change, error, message", [
    (lambda h, w, y: (h, w, torch.where(y == 0, 50, y)), ValueError, "outside"),
    (lambda h, w, y: (h, w, torch.full_like(y, -1)), ValueError, "outside"),
    (lambda h, w, y: (h[:, :8], w, y), ValueError, "shape"),
    (lambda h, w, y: (h, w, y[:-1]), ValueError, "shape"),
    (lambda h, w, y: (h[0], w, y), ValueError, "expected"),
    (lambda h, w, y: (h, w[:0], y), ValueError, "V > 0"),
    (lambda h, w, y: (h, w.double(), y), TypeError, "dtype"),
    (lambda h, w, y: (h.double(), w.double(), y), TypeError, "dtype"),
    (lambda h, w, y: (h, w, y.float()), TypeError, "int64"),
    (lambda h, w, y: (h, w.to("meta"), y), ValueError, "device"),
])
def test_bad_input_raises_a_clear_error(ce, change, error, message):
    hidden, weight, labels = make_inputs(6, 16, 50, 0.0)
    labels[0] = 0
    with pytest.raises(error, match=message):
        ce.fused_masked_linear_cross_entropy(*change(hidden, weight, labels))


def test_cpu_without_interpreter_says_what_to_do(ce, monkeypatch):
    monkeypatch.setattr(ce, "_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA device.*TRITON_INTERPRET=1.*--kernels=torch"):
        ce.fused_masked_linear_cross_entropy(*make_inputs(4, 16, 50, 0.0, device="cpu"))


@pytest.mark.parametrize("n, first", [(8091, 1408), (100, 1408), (1408, 1408), (1409, 1408), (5, 1), (0, 64)])
def test_chunks_cover_the_rows_and_fit_the_budget(n, first):
    anchor_row = 50240 * 2  # bf16 logits row of GPT-2's vocabulary head (its largest multiple of 64)
    max_rows = cross_entropy._max_chunk_rows(anchor_row, cross_entropy.LOGITS_CHUNK_BYTES)
    assert max_rows % 64 == 0 and max_rows * anchor_row <= cross_entropy.LOGITS_CHUNK_BYTES
    assert cross_entropy._max_chunk_rows(anchor_row, 1) == 1
    first = min(first, max_rows)
    bounds = cross_entropy._chunk_bounds(n, first, max_rows)
    assert bounds[0] == (0, min(first, n)) and bounds[-1][1] == n
    assert all(a == b for (_, a), (b, _) in zip(bounds, bounds[1:]))  # contiguous, no gap, no overlap
    sizes = [b - a for a, b in bounds[1:]]
    assert all(0 < size <= max_rows for size in sizes)
    assert not sizes or sizes[-1] > max(sizes) // 2  # the last chunk is not a sliver


COMPILE_FOR_H100 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import sft_kernels.cross_entropy as ce

softmax = {"logits_ptr": "*{t}", "tail_ptr": "*{t}", "labels_ptr": "*i64", "loss_ptr": "*fp32", "head": "i32",
           "tail": "i32", "row_stride": "i32", "BLOCK": "constexpr", "TAIL_BLOCK": "constexpr"}
partition = {"labels_ptr": "*{t}", "order_ptr": "*i64", "kept_labels_ptr": "*i64", "counts_ptr": "*i32", "N": "i32",
             "V": "i32", "ignore_index": "i32", "BLOCK": "constexpr"}
scale = {"x_ptr": "*{t}", "scale_ptr": "*fp32", "numel": "i32", "BLOCK": "constexpr"}
for kernel, signature, dtypes, constexprs, warps in [
        (ce._softmax_grad_kernel, softmax, ("bf16", "fp32"), {"BLOCK": ce.BLOCK_V, "TAIL_BLOCK": 32}, ce.NUM_WARPS),
        (ce._softmax_grad_kernel, softmax, ("bf16",), {"BLOCK": 64, "TAIL_BLOCK": 0}, 2),
        (ce._partition_kernel, partition, ("i64", "i32"), {"BLOCK": ce.PARTITION_BLOCK}, ce.PARTITION_WARPS),
        (ce._scale_kernel, scale, ("bf16", "fp32"), {"BLOCK": ce.SCALE_BLOCK}, 4)]:
    for t in dtypes:
        sig = {name: kind.format(t=t) for name, kind in signature.items()}
        triton.compile(ASTSource(kernel, sig, constexprs), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps})
print("compiled")
"""


def test_kernels_compile_for_an_h100():
    """The interpreter runs Python semantics that Triton's compiler refuses (a variable redefined
    with another type in a branch, say), so the CPU suite also compiles each kernel for sm_90:
    the whole pipeline down to the cubin, no GPU needed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# GPU: realistic shapes with the compiled kernel.

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_matches_reference(dtype):
    inputs = make_inputs(4096, 768, 50257, 0.5, dtype=dtype, seed=6, device="cuda")
    loss, grad_h, grad_w = loss_and_grads(cross_entropy.fused_masked_linear_cross_entropy, *inputs)
    ref = loss_and_grads(cross_entropy.reference_masked_linear_cross_entropy, *inputs, dtype=torch.float32)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_rel_close(loss, ref[0], min(tol, 1e-3), "loss")
    assert_rel_close(grad_h, ref[1], tol, "grad hidden")
    assert_rel_close(grad_w, ref[2], tol, "grad weight")


@pytest.mark.gpu
@gpu
def test_gpu_anchor_shape_peak_memory():
    """The target: at most 256 MiB extra at 16,384 x 768 x 50,257, bf16, half masked."""
    hidden, weight, labels = make_inputs(16384, 768, 50257, 0.5, dtype=torch.bfloat16, device="cuda")
    hidden.requires_grad_(), weight.requires_grad_()
    cross_entropy.fused_masked_linear_cross_entropy(hidden, weight, labels).backward()  # compile, cuBLAS workspace
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cross_entropy.fused_masked_linear_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= 256 * 2**20, f"peak extra memory {extra / 2**20:.0f} MiB"


def test_fp16_weight_gradient_does_not_overflow(ce):
    """grad_W sums over every kept row before the mean's 1/n: in fp16 that sum leaves fp16's range
    although the mean gradient itself is representable."""
    hidden = torch.full((1000, 16), 100.0, device=DEVICE).half()
    weight = torch.zeros(50, 16, device=DEVICE).half()
    labels = torch.zeros(1000, dtype=torch.long, device=DEVICE)
    loss, grad_h, grad_w = loss_and_grads(ce.fused_masked_linear_cross_entropy, hidden, weight, labels)
    ref = loss_and_grads(ce.reference_masked_linear_cross_entropy, hidden, weight, labels, dtype=torch.float32)
    assert torch.isfinite(grad_w).all() and grad_w.dtype == torch.float16
    assert_rel_close(grad_w, ref[2], 1e-2, "grad weight")
    assert_rel_close(grad_h, ref[1], 1e-2, "grad hidden")
