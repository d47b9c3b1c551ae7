"""AdamW on a sparse set of matrix entries, written back into the weight: a Triton kernel beside
the plain-PyTorch reference it must match.

Sparse fine-tuning (sparse.py) trains, per matrix, only the entries at `indices` (flat, int32,
no duplicates). For those entries it keeps fp32 `delta` (the trained change over the frozen base),
the Adam moments `exp_avg` and `exp_avg_sq`, and `base` (the frozen weight's values there, so that
the weight can always be rewritten exactly as base + delta, whatever the weight's dtype). One
update, for every selected entry i:

    g       = grad[i]                       (gathered from a dense gradient, or already gathered)
    delta   = delta * (1 - lr * weight_decay)    decoupled weight decay pulls the delta to 0 (the base)
    m       = beta1 * m + (1 - beta1) * g
    v       = beta2 * v + (1 - beta2) * g^2
    delta  -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
    weight[indices[i]] = base + delta       in the weight's dtype

which is torch.optim.AdamW's update applied to the delta. The kernel does it in one pass: each
program reads BLOCK entries' state and gradient and scatters the new values into the weight, so
one update touches ~ 6 x 4 bytes per selected entry and nothing else of the matrix. That is why
it beats a dense step, which must read and write every parameter, its gradient and both moments.
"""
import torch
import triton
import triton.language as tl

BLOCK = 1024  # selected entries per program


def reference_sparse_adamw_(weight, indices, grad, delta, exp_avg, exp_avg_sq, base, *, lr, beta1, beta2,
                            eps, weight_decay, step, gathered=True):
    """Plain PyTorch: the update above, in place on delta, the moments and weight. grad is the
    already gathered (n,) values, or with gathered=False the dense gradient of weight's shape."""
    g = grad.float() if gathered else grad.reshape(-1).index_select(0, indices).float()
    delta.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(eps)
    delta.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1**step))
    weight.view(-1).index_copy_(0, indices.long(), (base + delta).to(weight.dtype))


@triton.jit
def _sparse_adamw_kernel(weight_ptr, indices_ptr, grad_ptr, delta_ptr, exp_avg_ptr, exp_avg_sq_ptr, base_ptr, n,
                         lr, beta1, beta2, eps, decay_factor, step_size, bias_correction2_sqrt,
                         GATHER: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    index = tl.load(indices_ptr + offsets, mask=mask, other=0).to(tl.int64)
    if GATHER:  # the dense gradient: read it at the selected entries only
        g = tl.load(grad_ptr + index, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    delta = tl.load(delta_ptr + offsets, mask=mask, other=0.0) * decay_factor
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    m = m + (g - m) * (1 - beta1)  # as torch's lerp_
    v = v * beta2 + (1 - beta2) * g * g
    delta = delta - step_size * m / (tl.sqrt(v) / bias_correction2_sqrt + eps)
    tl.store(delta_ptr + offsets, delta, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    base = tl.load(base_ptr + offsets, mask=mask, other=0.0)
    tl.store(weight_ptr + index, (base + delta).to(weight_ptr.dtype.element_ty), mask=mask)


def sparse_adamw_(weight, indices, grad, delta, exp_avg, exp_avg_sq, base, *, lr, beta1, beta2, eps,
                  weight_decay, step, gathered=True):
    """The Triton kernel; same arguments and result as reference_sparse_adamw_. The indices must
    be duplicate-free (check_indices), or two programs would race on one weight entry."""
    n = indices.numel()
    for name, t in (("delta", delta), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("base", base)):
        if t.dtype != torch.float32 or t.shape != (n,):
            raise ValueError(f"{name} must be fp32 of shape ({n},), got {t.dtype} {tuple(t.shape)}")
    if gathered and grad.shape != (n,):
        raise ValueError(f"gathered grad must have shape ({n},), got {tuple(grad.shape)}")
    if not gathered and grad.shape != weight.shape:
        raise ValueError(f"dense grad must have the weight's shape {tuple(weight.shape)}, got {tuple(grad.shape)}")
    if not (weight.is_contiguous() and grad.is_contiguous()):
        raise ValueError("weight and grad must be contiguous (entries are addressed by flat index)")
    if n == 0:
        return
    _sparse_adamw_kernel[(triton.cdiv(n, BLOCK),)](
        weight, indices, grad, delta, exp_avg, exp_avg_sq, base, n,
        lr, beta1, beta2, eps, 1 - lr * weight_decay, lr / (1 - beta1**step), (1 - beta2**step) ** 0.5,
        GATHER=not gathered, BLOCK=BLOCK)


def check_indices(indices, numel, what="indices"):
    """Raises ValueError unless indices is a 1-D int32 tensor of distinct entries in [0, numel).
    Called when an index set is made or loaded, not on every update (it sorts)."""
    if indices.dim() != 1 or indices.dtype != torch.int32:
        raise ValueError(f"{what} must be a 1-D int32 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= numel:
        raise ValueError(f"{what} must lie in [0, {numel}), got [{int(indices.min())}, {int(indices.max())}]")
    ordered = indices.sort().values
    if bool((ordered[1:] == ordered[:-1]).any()):
        raise ValueError(f"{what} hold duplicates: each entry may be selected once")
