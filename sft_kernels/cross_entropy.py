"""Masked linear + cross-entropy for the LM head: a Triton version that skips masked tokens and
never holds the full (tokens x vocab) logits, beside a plain-PyTorch reference it must match.

Design (fused_masked_linear_cross_entropy):
1. Partition: one Triton program orders the rows so that those whose label is not ignore_index
   come first, and counts them and the out-of-range labels (_partition_kernel); index_select
   gathers the rows in that order. Only the kept rows reach the GEMMs, so prompt and padding
   tokens cost no FLOPs.
2. The host needs the count to size the chunks: its one sync. The count is copied to pinned
   memory without blocking, and the first chunk's logits GEMM (over the first rows, kept or not)
   is queued before the host waits for it, so the GPU computes while the host waits and then
   queues the rest. Without that, the GPU sat idle for ~0.5 ms per call on an H100 machine.
3. Split the vocabulary: the head, its largest multiple of 64, goes through cuBLAS chunk by chunk
   (with an odd vocabulary dimension cuBLAS runs several times slower); the tail (17 columns for
   GPT-2) gets three thin GEMMs over all rows at once.
4. Chunk the kept rows so one chunk's head logits fit in LOGITS_CHUNK_BYTES. Per chunk:
     logits = h @ W_head.T              cuBLAS, fp32 accumulation, stored in the input dtype
     _softmax_grad_kernel (Triton)      per row: fp32 online log-sum-exp over vocabulary tiles
                                        (head and tail), loss = lse - logit[label], then overwrites
                                        the logits in place with dlogits = softmax - onehot
     grad_h = dlogits @ W_head          cuBLAS, fp32 accumulation
     grad_W_head += dlogits.T @ h       cuBLAS, fp32 accumulation, accumulated in W's dtype
5. The gradients are computed in the forward (the loss is the last op of the graph, so they are
   needed anyway; this is what Liger does) and stored unscaled; backward multiplies them by
   grad_output / n (_scale_kernel). So an outside factor (gradient accumulation, fp16 loss
   scaling) is applied the standard way: multiply the returned loss, autograd passes the factor
   as grad_output. Scaling happens in place, so a second backward through the same graph is refused.

Cost at 16,384 tokens x 768 x 50,257 in bf16 with half the labels masked (8,091 kept rows) on an
H100, as bench/results/ holds it (bench/bench_ce.py, bench/profile_ce.py): 4.20 ms against 9.09 ms
for torch.compile of the plain loss; 3.96 ms of it kernel time: the three GEMMs 3.1 ms in 6 chunks
(2.8 ms unchunked, the matrix units' floor), the softmax pass 0.88 ms, the partition 49 us. Those
files predate the scaling kernel and the softmax tuning described at their kernels, which were
timed per kernel only.
Extra memory at that shape: chunk logits 135 MiB (<= 1,408 rows) + grad_W 74 MiB (bf16) + the
ordered h 24 MiB + grad_h 12 MiB, ~246 MiB at the peak; backward adds the full (N, C) grad_hidden.
grad_W is accumulated in W's dtype, not fp32 (147 MiB would break the 256 MiB budget or force
small, slow chunks): each chunk's GEMM accumulates in fp32 and rounds once, so bf16 grad_W
carries one rounding per chunk (6 at that shape), well inside bf16's own 1e-2 tolerance.
fp16 is the exception: grad_W is a sum over every kept row before the 1/n of the mean, which
overflows fp16's range (65,504) on large batches, so fp16 inputs are computed in fp32 (slower;
bf16 is the fast path).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

LOGITS_CHUNK_BYTES = 136 * 2**20  # memory for one chunk of logits; sets the rows per chunk
BLOCK_V = 8192                    # vocabulary tile of the softmax kernel on a GPU ...
NUM_WARPS = 16                    # ... and its warps per row: the fastest pair measured on an H100
PARTITION_BLOCK = 4096            # labels per step of the one-program partition kernel ...
PARTITION_WARPS = 16              # ... whose scans want threads: 46 -> 26 us for 16k labels on an H100
SCALE_BLOCK = 4096                # elements per program of the gradient-scaling kernel
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
def _softmax_grad_kernel(logits_ptr, tail_ptr, labels_ptr, loss_ptr, head, tail, row_stride,
                         BLOCK: tl.constexpr, TAIL_BLOCK: tl.constexpr):
    """One program per row of a logits chunk: log-sum-exp in fp32 streamed over vocabulary tiles,
    the row's loss, then dlogits = softmax - onehot written over the logits (same dtype).

    A row's logits live in two places: columns [0, head) in the chunk buffer (row_stride apart) and
    the last `tail` columns in their own small buffer (see _loss_and_grads).
    The pass is bound by instructions and memory latency, not bytes. Measured per chunk on an
    H100: exp2 with unmasked full tiles (only the last is masked) took 1,216 rows from 0.196 ms
    to 0.140; loading the next tile before reducing the current one, 0.129; on 1,408 rows, the
    second pass run backwards (its first tiles are the first pass's last, likeliest still in L2)
    with 8,192-wide tiles and 16 warps, 0.154 -> 0.130.
    Differences are taken before scaling (never z * log2(e) - max): with one class the loss and
    gradient are then exactly 0, where a fused multiply-add would leave rounding residue."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    tail_row_ptr = tail_ptr + row * tail
    cols = tl.arange(0, BLOCK)
    full = head // BLOCK * BLOCK
    in_head = full + cols < head
    running_max, running_sum = tl.full([], -float("inf"), tl.float32), tl.zeros([], tl.float32)
    if full > 0:
        tile = tl.load(row_ptr + cols)
        for start in range(BLOCK, full, BLOCK):
            next_tile = tl.load(row_ptr + start + cols)
            running_max, running_sum = _merge_tile(running_max, running_sum, tile.to(tl.float32))
            tile = next_tile
        running_max, running_sum = _merge_tile(running_max, running_sum, tile.to(tl.float32))
    if full < head:  # a tile with at least one column, or the merge would compute -inf - -inf
        part = tl.load(row_ptr + full + cols, mask=in_head, other=-float("inf")).to(tl.float32)
        running_max, running_sum = _merge_tile(running_max, running_sum, part)
    if TAIL_BLOCK > 0:
        tail_cols = tl.arange(0, TAIL_BLOCK)
        tail_z = tl.load(tail_row_ptr + tail_cols, mask=tail_cols < tail, other=-float("inf")).to(tl.float32)
        running_max, running_sum = _merge_tile(running_max, running_sum, tail_z)
    lse = running_max + tl.log(running_sum)

    label = tl.load(labels_ptr + row)
    label_logit = tl.where(label < head, tl.load(row_ptr + label, mask=label < head, other=0.0),
                           tl.load(tail_row_ptr + label - head, mask=label >= head, other=0.0))
    tl.store(loss_ptr + row, lse - label_logit.to(tl.float32))
    # The second pass runs backwards, tail first: the tiles the first pass read last are the
    # likeliest to be still in L2.
    out_dtype = logits_ptr.dtype.element_ty
    if TAIL_BLOCK > 0:
        tail_cols = tl.arange(0, TAIL_BLOCK)
        tail_z = tl.load(tail_row_ptr + tail_cols, mask=tail_cols < tail, other=0.0).to(tl.float32)
        tail_grad = _exp(tail_z - lse) - tl.where(head + tail_cols == label, 1.0, 0.0)
        tl.store(tail_row_ptr + tail_cols, tail_grad.to(out_dtype), mask=tail_cols < tail)
    if full < head:
        part = tl.load(row_ptr + full + cols, mask=in_head, other=0.0).to(tl.float32)
        grad = _exp(part - lse) - tl.where(full + cols == label, 1.0, 0.0)
        tl.store(row_ptr + full + cols, grad.to(out_dtype), mask=in_head)
    if full > 0:
        tile = tl.load(row_ptr + full - BLOCK + cols)
        for i in range(1, full // BLOCK):
            next_tile = tl.load(row_ptr + full - (i + 1) * BLOCK + cols)
            grad = _exp(tile.to(tl.float32) - lse) - tl.where(full - i * BLOCK + cols == label, 1.0, 0.0)
            tl.store(row_ptr + full - i * BLOCK + cols, grad.to(out_dtype))
            tile = next_tile
        grad = _exp(tile.to(tl.float32) - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(row_ptr + cols, grad.to(out_dtype))


@triton.jit
def _partition_kernel(labels_ptr, order_ptr, kept_labels_ptr, counts_ptr, N, V, ignore_index, BLOCK: tl.constexpr):
    """One program streams the labels and writes a permutation of the rows into order_ptr: the rows
    to keep (label != ignore_index) first, in order, then the others from the back. The kept rows'
    labels go to kept_labels_ptr; counts_ptr[0] = how many rows are kept, counts_ptr[1] = how many
    of their labels are outside [0, V)."""
    offsets = tl.arange(0, BLOCK)
    n_kept = tl.zeros([], tl.int32)
    n_dropped = tl.zeros([], tl.int32)
    n_bad = tl.zeros([], tl.int32)
    for start in range(0, N, BLOCK):
        index = start + offsets
        label = tl.load(labels_ptr + index, mask=index < N, other=ignore_index)
        keep = label != ignore_index
        drop = (index < N) & (label == ignore_index)
        kept_so_far = tl.cumsum(keep.to(tl.int32), axis=0)  # in this step, up to and including each label
        tl.store(order_ptr + n_kept + kept_so_far - 1, index, mask=keep)
        tl.store(order_ptr + N - n_dropped - (offsets + 1 - kept_so_far), index, mask=drop)
        tl.store(kept_labels_ptr + n_kept + kept_so_far - 1, label, mask=keep)
        n_kept += tl.sum(keep.to(tl.int32), axis=0)
        n_dropped += tl.sum(drop.to(tl.int32), axis=0)
        n_bad += tl.sum((keep & ((label < 0) | (label >= V))).to(tl.int32), axis=0)
    tl.store(counts_ptr, n_kept)
    tl.store(counts_ptr + 1, n_bad)


@triton.jit
def _scale_kernel(x_ptr, scale_ptr, numel, BLOCK: tl.constexpr):
    """x *= scale in place, the factor read from GPU memory. (torch's mul_ by a 0-dim GPU tensor
    takes a strided, unvectorised path: 0.15 ms for a GPT-2 grad_W on an H100.)"""
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = offsets < numel
    x = tl.load(x_ptr + offsets, mask=in_range).to(tl.float32)
    tl.store(x_ptr + offsets, (x * tl.load(scale_ptr)).to(x_ptr.dtype.element_ty), mask=in_range)


def _scale_(x, scale):
    """x *= scale (a 1-element fp32 tensor on x's device), in place; returns x."""
    if x.numel():
        _scale_kernel[(triton.cdiv(x.numel(), SCALE_BLOCK),)](x, scale, x.numel(), BLOCK=SCALE_BLOCK)
    return x


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


def _partition_rows(labels, vocab_size, ignore_index):
    """(order, kept_labels, read_count) without waiting for the GPU: order (N,) permutes the rows so
    that the n that carry a label come first, kept_labels[:n] are their labels (int64), and
    read_count() blocks until n has reached the host, checks the label range and returns n. GPU
    work queued between this call and read_count() keeps the GPU busy while the host waits."""
    N = labels.shape[0]
    order = torch.empty(N, device=labels.device, dtype=torch.int64)
    kept_labels = torch.empty(N, device=labels.device, dtype=torch.int64)
    counts = torch.empty(2, device=labels.device, dtype=torch.int32)
    if N:  # the kernel writes both counts
        _partition_kernel[(1,)](labels, order, kept_labels, counts, N, vocab_size, ignore_index, BLOCK=PARTITION_BLOCK,
                                num_warps=PARTITION_WARPS)
    else:  # an empty tensor has no pointer to hand to a kernel
        counts.zero_()
    host_counts, copied = counts, None
    if counts.is_cuda:
        host_counts = torch.empty(2, dtype=torch.int32, pin_memory=True)
        host_counts.copy_(counts, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()

    def read_count():
        if copied is not None:
            copied.synchronize()
        n_kept, n_bad = host_counts.tolist()
        if n_bad:
            kept = labels != ignore_index
            bad = labels[kept & ((labels < 0) | (labels >= vocab_size))][:5].tolist()
            raise ValueError(f"{n_bad} labels outside [0, {vocab_size}) and not ignore_index={ignore_index}, "
                             f"e.g. {bad}")
        return n_kept
    return order, kept_labels, read_count


def _max_chunk_rows(row_bytes, budget_bytes):
    """The most rows whose logits fit the budget, a multiple of 64 when there is room."""
    rows = max(1, budget_bytes // row_bytes)
    return rows // 64 * 64 if rows >= 64 else rows


def _chunk_bounds(n, first, max_rows):
    """Row ranges of the chunks: the first `first` rows (their logits are computed before n is
    known), then the rest in balanced chunks of at most max_rows, multiples of 64 where there is
    room (GEMM-friendly shapes), so that the last chunk is not a sliver."""
    bounds = [(0, min(first, n))]
    rest = n - bounds[0][1]
    if rest > 0:
        rows = triton.cdiv(rest, triton.cdiv(rest, max_rows))
        rows = min(max_rows, triton.cdiv(rows, 64) * 64)
        bounds += [(start, min(start + rows, n)) for start in range(bounds[0][1], n, rows)]
    return bounds


def _loss_and_grads(h, weight, labels, read_count, need_grad_h, need_grad_w, chunk_bytes, block_v, num_warps):
    """Sum of the per-row losses of the kept rows, their number n, and the unscaled gradients of
    that sum (None where not needed), one chunk of logits at a time. h (N, C) holds the kept rows
    first; read_count() gives n.

    The vocabulary is split in two. The head, its largest multiple of 64 (50,240 of 50,257), goes
    through cuBLAS chunk by chunk: with an odd vocabulary dimension cuBLAS runs all three GEMMs
    several times slower (95-150 TFLOP/s at V=50,257 on an H100). The tail (the other 17) is
    done for all rows at once, three thin GEMMs per call instead of three per chunk."""
    N, V = h.shape[0], weight.shape[0]
    head = V // 64 * 64
    tail = V - head
    w_head, w_tail = weight[:head], weight[head:]
    max_rows = _max_chunk_rows(max(head, 64) * h.element_size(), chunk_bytes)
    # At least one column: a 0-byte tensor has no pointer to hand to Triton.
    buffer = torch.empty(min(max_rows, N), max(head, 1), device=h.device, dtype=h.dtype)
    # Queued before n is known, so the GPU has work while the host waits for it: the first
    # chunk's logits (the first rows of h, kept or not) and the tail's logits for all rows.
    if head:
        torch.mm(h[: buffer.shape[0]], w_head.T, out=buffer[:, :head])
    tail_logits = h @ w_tail.T if tail else buffer  # (N, tail); overwritten with its dlogits
    n = read_count()
    losses = torch.empty(n, device=h.device, dtype=torch.float32)
    grad_h = h.new_empty(n, h.shape[1]) if need_grad_h else None
    grad_w = torch.empty_like(weight) if need_grad_w else None
    if n == 0:
        return losses.sum(), n, grad_h, grad_w.zero_() if need_grad_w else None
    block = min(block_v, triton.next_power_of_2(max(head, 1)))
    tail_block = triton.next_power_of_2(tail) if tail else 0
    for start, end in _chunk_bounds(n, buffer.shape[0], max_rows):
        h_chunk, logits = h[start:end], buffer[: end - start, :head]
        if head and start > 0:
            torch.mm(h_chunk, w_head.T, out=logits)
        _softmax_grad_kernel[(end - start,)](logits, tail_logits[start:end], labels[start:end], losses[start:end], head,
                                             tail, buffer.stride(0), BLOCK=block, TAIL_BLOCK=tail_block,
                                             num_warps=min(num_warps, max(1, max(block, tail_block) // 32)))
        dlogits = logits  # the kernel overwrote the logits in place
        if head and need_grad_h:
            torch.mm(dlogits, w_head, out=grad_h[start:end])
        if head and need_grad_w:  # beta=0: the first chunk overwrites the uninitialised grad_w
            grad_w[:head].addmm_(dlogits.T, h_chunk, beta=0 if start == 0 else 1)
    if tail and need_grad_h:
        grad_h.addmm_(tail_logits[:n], w_tail, beta=1 if head else 0)
    if tail and need_grad_w:
        torch.mm(tail_logits[:n].T, h[:n], out=grad_w[head:])
    return losses.sum(), n, grad_h, grad_w


class _FusedMaskedLinearCrossEntropy(torch.autograd.Function):
    """Gradients come from the forward and backward scales them in place, so backward runs once."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, grad_enabled, chunk_bytes, block_v, num_warps):
        ctx.hidden_shape, ctx.dtype = hidden.shape, weight.dtype
        # needs_input_grad stays True under torch.no_grad; eval must not pay for gradients.
        need_grad_h, need_grad_w = [grad_enabled and need for need in ctx.needs_input_grad[:2]]
        order, kept_labels, read_count = _partition_rows(labels, weight.shape[0], ignore_index)
        h = hidden.index_select(0, order)  # (N, C), the rows that carry a label first
        if weight.dtype == torch.float16:  # grad_W sums over all rows, beyond fp16's range: work in fp32
            h, weight = h.float(), weight.float()
        loss_sum, n_kept, *ctx.grads = _loss_and_grads(h, weight, kept_labels, read_count, need_grad_h, need_grad_w,
                                                          chunk_bytes, block_v, num_warps)
        ctx.rows = order[:n_kept]  # the kept rows' indices, in the order of grad_h's rows
        return loss_sum / max(n_kept, 1)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("fused_masked_linear_cross_entropy supports one backward per forward "
                               "(its gradients are computed in the forward and scaled in place)")
        (grad_h, grad_w), ctx.grads = ctx.grads, None
        n_kept = ctx.rows.shape[0]
        scale = (grad_output.float() / max(n_kept, 1)).reshape(1)
        grad_hidden = grad_weight = None
        if grad_h is not None:
            grad_hidden = _scale_(grad_h, scale).to(ctx.dtype)
            if n_kept < ctx.hidden_shape[0]:  # masked rows get zero gradient
                grad_hidden = grad_hidden.new_zeros(ctx.hidden_shape).index_copy_(0, ctx.rows, grad_hidden)
        if grad_w is not None:
            grad_weight = _scale_(grad_w, scale).to(ctx.dtype)
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
