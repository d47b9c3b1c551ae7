"""Masked linear + cross-entropy for the LM head: a Triton version that skips masked tokens and
never holds the full (tokens x vocab) logits, beside a plain-PyTorch reference it must match.

Design (fused_masked_linear_cross_entropy):
1. Compact: keep only the rows whose label is not ignore_index (index_select), so prompt and
   padding tokens cost no FLOPs and no memory.
2. Chunk the kept rows so one chunk's logits fit in LOGITS_CHUNK_BYTES (128 MiB). Per chunk:
     logits = h @ W.T                   cuBLAS, fp32 accumulation, stored in the input dtype
     _softmax_grad_kernel (Triton)      per row: fp32 online log-sum-exp over vocabulary tiles,
                                        loss = lse - logit[label], then overwrites the logits in
                                        place with dlogits = softmax - onehot
     grad_h = dlogits @ W               cuBLAS, fp32 accumulation
     grad_W += dlogits.T @ h            cuBLAS, fp32 accumulation, accumulated in W's dtype
   Each GEMM runs on the vocabulary's largest multiple of 64 plus a thin GEMM for the odd rest
   (_vocab_pieces): at V=50,257 that is what lets cuBLAS use its fast kernels.
3. The gradients are computed in the forward (the loss is the last op of the graph, so they are
   needed anyway; this is what Liger does) and stored unscaled; backward multiplies them by
   grad_output / n. So an outside factor (gradient accumulation, fp16 loss scaling) is applied
   the standard way: multiply the returned loss, autograd passes the factor as grad_output.
   Scaling happens in place, so a second backward through the same graph is refused.

Cost at 16,384 tokens x 768 x 50,257 in bf16 with half the labels masked (8,091 kept rows),
measured on an H100 (bench/profile_ce.py, bench/results/): the three GEMMs are the ~1.9 TFLOP
floor, 2.75 ms unchunked (660-700 TFLOP/s) and 3.40 ms in 7 chunks (grad_W's read-modify-write
per chunk, and grad_h's long-K GEMM with a short output); the softmax pass 0.92 ms (one read and
one write of the bf16 logits, plus a re-read); compaction 0.31 ms (a host sync). About 4.8 ms in
all, against 9 ms for torch.compile of the plain loss.
Extra memory: chunk logits 117 MiB (7 chunks of <= 1,216 rows) + grad_W 74 MiB (bf16) + compacted
h and grad_h 12 MiB each, ~215 MiB at the peak; backward adds only the full (N, C) grad_hidden.
grad_W is accumulated in W's dtype, not fp32 (147 MiB would break the 256 MiB budget or force
small, slow chunks): each chunk's GEMM accumulates in fp32 and rounds once, so bf16 grad_W
carries one rounding per chunk (7 at that shape), well inside bf16's own 1e-2 tolerance.
fp16 is the exception: grad_W is a sum over every kept row before the 1/n of the mean, which
overflows fp16's range (65,504) on large batches, so fp16 inputs are computed in fp32 (slower;
bf16 is the fast path).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOGITS_CHUNK_BYTES = 128 * 2**20  # memory for one chunk of logits; sets the rows per chunk
BLOCK_V = 4096                    # vocabulary tile of the softmax kernel on a GPU ...
NUM_WARPS = 16                    # ... and its warps per row: the fastest pair measured on an H100
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def reference_masked_linear_cross_entropy(hidden, weight, labels, ignore_index=-100):
    """Plain PyTorch, fp32, full logits: obviously correct, memory hungry. Mean over unmasked
    tokens; with none it returns a graph-connected 0.0 (the sum is 0, divided by 1)."""
    logits = hidden.float() @ weight.float().T  # (N, V)
    loss_sum = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    n_valid = (labels != ignore_index).sum().clamp(min=1)
    return loss_sum / n_valid


@triton.jit
def _exp(x):
    """e^x through exp2, the hardware's native exponential."""
    return tl.math.exp2(x * 1.4426950408889634)


@triton.jit
def _merge_tile(running_max, running_sum, z):
    """Fold one tile of logits into a running (max, sum of e^(z - max))."""
    new_max = tl.maximum(running_max, tl.max(z, axis=0))
    return new_max, running_sum * _exp(running_max - new_max) + tl.sum(_exp(z - new_max), axis=0)


@triton.jit
def _softmax_grad_kernel(logits_ptr, labels_ptr, loss_ptr, V, row_stride, BLOCK: tl.constexpr):
    """One program per row of a logits chunk: log-sum-exp in fp32 streamed over vocabulary tiles,
    the row's loss, then dlogits = softmax - onehot written over the logits (same dtype).

    Fewer instructions per element made this pass faster at the same bytes (1,216 rows x 50,257
    on an H100: 0.196 -> 0.140 ms), so exponentials go through exp2 and the full tiles load
    unmasked; only the last tile is masked. Differences are taken before scaling (never
    z * log2(e) - max): with one class the loss and gradient are then exactly 0, where a fused
    multiply-add would leave rounding residue."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    cols = tl.arange(0, BLOCK)
    full = V // BLOCK * BLOCK
    running_max, running_sum = -float("inf"), 0.0
    for start in range(0, full, BLOCK):
        z = tl.load(row_ptr + start + cols).to(tl.float32)
        running_max, running_sum = _merge_tile(running_max, running_sum, z)
    tail = full + cols < V
    z = tl.load(row_ptr + full + cols, mask=tail, other=-float("inf")).to(tl.float32)
    running_max, running_sum = _merge_tile(running_max, running_sum, z)
    lse = running_max + tl.log(running_sum)
    label = tl.load(labels_ptr + row)
    tl.store(loss_ptr + row, lse - tl.load(row_ptr + label).to(tl.float32))
    for start in range(0, full, BLOCK):
        z = tl.load(row_ptr + start + cols).to(tl.float32)
        grad = _exp(z - lse) - tl.where(start + cols == label, 1.0, 0.0)
        tl.store(row_ptr + start + cols, grad.to(logits_ptr.dtype.element_ty))
    z = tl.load(row_ptr + full + cols, mask=tail, other=0.0).to(tl.float32)
    grad = _exp(z - lse) - tl.where(full + cols == label, 1.0, 0.0)
    tl.store(row_ptr + full + cols, grad.to(logits_ptr.dtype.element_ty), mask=tail)


def _check_inputs(hidden, weight, labels):
    """Raise a sentence a user can act on, before any kernel could read out of bounds."""
    if hidden.dim() != 2 or weight.dim() != 2 or labels.dim() != 1:
        raise ValueError(f"expected hidden (N, C), weight (V, C) and labels (N,); got shapes "
                         f"{tuple(hidden.shape)}, {tuple(weight.shape)} and {tuple(labels.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != labels.shape[0] or weight.shape[0] == 0:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"labels {tuple(labels.shape)}; need hidden (N, C), weight (V, C) with V > 0, labels (N,)")
    if hidden.dtype != weight.dtype or hidden.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"hidden and weight must share one dtype among float32, bfloat16, float16; "
                        f"got {hidden.dtype} and {weight.dtype}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be int64 or int32, got {labels.dtype}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"hidden, weight and labels must be on one device; got "
                         f"{hidden.device}, {weight.device} and {labels.device}")
    if hidden.device.type != "cuda" and not _interpreted():
        raise RuntimeError("the Triton cross-entropy needs a CUDA device (or TRITON_INTERPRET=1 set before "
                           "kernels is imported, for tests); on CPU use --kernels=torch")


def _interpreted():
    """True when Triton decorated the kernel for its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_softmax_grad_kernel).__name__ == "InterpretedFunction"


def runs_on(device):
    """Whether the Triton kernel can run on this torch.device: a GPU, or any device under the interpreter."""
    return device.type == "cuda" or _interpreted()


def _kept_rows(labels, vocab_size, ignore_index):
    """Indices of the rows that carry a label; one host sync also checks the label range."""
    kept = labels != ignore_index
    out_of_range = kept & ((labels < 0) | (labels >= vocab_size))
    n_bad, n_kept = torch.stack([out_of_range.sum(), kept.sum()]).tolist()
    if n_bad:
        bad = labels[out_of_range][:5].tolist()
        raise ValueError(f"{n_bad} labels outside [0, {vocab_size}) and not ignore_index={ignore_index}, e.g. {bad}")
    return kept.nonzero().squeeze(1), n_kept


def _chunk_rows(n_rows, row_bytes, budget_bytes):
    """Rows per chunk: as many as fit the logits budget, balanced so the last chunk is not tiny,
    and a multiple of 64 when there is room (GEMM-friendly shapes)."""
    max_rows = max(1, budget_bytes // row_bytes)
    if max_rows >= 64:
        max_rows = max_rows // 64 * 64
    rows = triton.cdiv(n_rows, triton.cdiv(n_rows, max_rows))
    return min(max_rows, triton.cdiv(rows, 64) * 64)


def _vocab_pieces(V):
    """Column ranges of the vocabulary for the GEMMs: the largest multiple of 64, then the rest.
    cuBLAS runs all three GEMMs several times slower when the vocabulary dimension is not a
    multiple of 8 (95-150 TFLOP/s at V=50,257 on an H100), so the odd tail gets its own thin GEMM
    and the head, a contiguous slice of W, gets the fast kernels without copying W."""
    head = V // 64 * 64
    return [(a, b) for a, b in ((0, head), (head, V)) if a < b]


def _loss_and_grads(h, weight, labels, need_grad_h, need_grad_w, chunk_bytes, block_v, num_warps):
    """Sum of the per-row losses of the kept rows h (n, C) and the unscaled gradients of that sum
    (None where not needed), one chunk of logits at a time."""
    n, V = h.shape[0], weight.shape[0]
    padded_v = triton.cdiv(V, 64) * 64  # keeps every logits row 128-byte aligned for cuBLAS
    chunk_rows = _chunk_rows(n, padded_v * h.element_size(), chunk_bytes)
    buffer = torch.empty(min(chunk_rows, n), padded_v, device=h.device, dtype=h.dtype)
    block = min(block_v, triton.next_power_of_2(V))
    pieces = _vocab_pieces(V)
    losses = torch.empty(n, device=h.device, dtype=torch.float32)
    grad_h = torch.empty_like(h) if need_grad_h else None
    grad_w = torch.empty_like(weight) if need_grad_w else None
    for start in range(0, n, chunk_rows):
        end = min(start + chunk_rows, n)
        h_chunk, logits = h[start:end], buffer[: end - start, :V]
        for a, b in pieces:
            torch.mm(h_chunk, weight[a:b].T, out=logits[:, a:b])  # (rows, V)
        _softmax_grad_kernel[(end - start,)](logits, labels[start:end], losses[start:end], V, logits.stride(0),
                                             BLOCK=block, num_warps=min(num_warps, max(1, block // 32)))
        dlogits = logits  # the kernel overwrote the logits in place
        for i, (a, b) in enumerate(pieces):
            if need_grad_h and i == 0:
                torch.mm(dlogits[:, a:b], weight[a:b], out=grad_h[start:end])
            elif need_grad_h:
                grad_h[start:end].addmm_(dlogits[:, a:b], weight[a:b])
            if need_grad_w and start == 0:
                torch.mm(dlogits[:, a:b].T, h_chunk, out=grad_w[a:b])
            elif need_grad_w:
                grad_w[a:b].addmm_(dlogits[:, a:b].T, h_chunk)
    return losses.sum(), grad_h, grad_w


class _FusedMaskedLinearCrossEntropy(torch.autograd.Function):
    """Gradients come from the forward and backward scales them in place, so backward runs once."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, grad_enabled, chunk_bytes, block_v, num_warps):
        rows, n_kept = _kept_rows(labels, weight.shape[0], ignore_index)
        ctx.n_kept, ctx.rows, ctx.hidden_shape, ctx.dtype = n_kept, rows, hidden.shape, weight.dtype
        # needs_input_grad stays True under torch.no_grad; eval must not pay for gradients.
        need_grad_h, need_grad_w = [grad_enabled and need for need in ctx.needs_input_grad[:2]]
        if n_kept == 0:
            ctx.grads = (hidden.new_zeros(0, hidden.shape[1]) if need_grad_h else None,
                         torch.zeros_like(weight) if need_grad_w else None)
            return torch.zeros((), device=hidden.device, dtype=torch.float32)
        all_kept = n_kept == hidden.shape[0]
        h = hidden.contiguous() if all_kept else hidden.index_select(0, rows)  # (n, C)
        kept_labels = (labels if all_kept else labels[rows]).long().contiguous()
        if weight.dtype == torch.float16:  # grad_W sums over all rows, beyond fp16's range: work in fp32
            h, weight = h.float(), weight.float()
        loss_sum, *ctx.grads = _loss_and_grads(h, weight, kept_labels, need_grad_h, need_grad_w, chunk_bytes, block_v,
                                                  num_warps)
        return loss_sum / n_kept

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_masked_linear_cross_entropy supports one backward per forward "
                               "(its gradients are computed in the forward and scaled in place)")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        scale = grad_output / max(ctx.n_kept, 1)
        grad_hidden = grad_weight = None
        if grad_h is not None:
            grad_hidden = grad_h.mul_(scale).to(ctx.dtype)
            if ctx.n_kept < ctx.hidden_shape[0]:  # masked rows get zero gradient
                grad_hidden = grad_hidden.new_zeros(ctx.hidden_shape).index_copy_(0, ctx.rows, grad_hidden)
        if grad_w is not None:
            grad_weight = grad_w.mul_(scale).to(ctx.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def _autocast(hidden, weight):
    """Inside torch.autocast, cast hidden and weight to its dtype, as F.linear would (custom
    autograd Functions are not autocast by themselves and would run the GEMMs in fp32)."""
    device = hidden.device.type
    if not torch.is_autocast_enabled(device) or not (hidden.is_floating_point() and weight.is_floating_point()):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    return hidden.to(dtype), weight.to(dtype)


@torch.compiler.disable  # data-dependent shapes (row compaction): torch.compile should not trace it
def fused_masked_linear_cross_entropy(hidden, weight, labels, ignore_index=-100):
    """Mean cross-entropy of hidden @ weight.T against labels over the tokens whose label is not
    ignore_index (0.0 with zero grads when there are none); differentiable in hidden and weight.

    hidden (N, C) and weight (V, C) share a dtype (fp32, bf16 or fp16), labels (N,) are integers.
    For gradient accumulation or loss scaling multiply the returned loss: the factor reaches
    backward as grad_output and scales both gradients. Needs a CUDA device (or TRITON_INTERPRET=1).
    Under torch.autocast the matmuls run in the autocast dtype, as F.linear's would.
    """
    hidden, weight = _autocast(hidden, weight)
    _check_inputs(hidden, weight, labels)
    return _FusedMaskedLinearCrossEntropy.apply(hidden, weight, labels, ignore_index, torch.is_grad_enabled(),
                                                LOGITS_CHUNK_BYTES, BLOCK_V, NUM_WARPS)
