"""RMSNorm and SwiGLU as autograd Functions that keep less for the backward than their PyTorch formulas.

Written as plain tensor ops, RMSNorm (x * rsqrt(mean(x^2) + eps) * w) makes autograd keep the input and
the normalized product, a full (rows, C) tensor more than it needs, and SwiGLU (silu(gate) * up) keeps
gate, up and silu(gate). Between a forward and its backward every block's saved tensors are alive at
once, so on a CPU, with no fused kernel, they are most of a step's activation memory. These Functions
keep only the input and per-row 1/rms (RMSNorm) or the [gate; up] input (SwiGLU) and recompute the rest
in the backward, a few elementwise passes over tensors that are there anyway. swiglu_linear goes one
further: with the down projection in the same Function, the (rows, width) product that the Linear would
keep is recomputed too. The forward's values are those of the formulas, bit for bit; the gradients agree
to float rounding (tests/test_lean_autograd.py).
"""
import torch
from torch.nn import functional as F


def _compute_dtype(dtype):
    """float32 for bfloat16/float16 inputs (as torch's own rms_norm computes them), else the dtype itself."""
    return torch.promote_types(dtype, torch.float32)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        xc = x.to(_compute_dtype(x.dtype))
        rstd = xc.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt()  # (..., 1): all the backward needs besides x
        ctx.save_for_backward(x, weight, rstd)
        return (xc * rstd).mul_(weight).to(x.dtype)  # in place: one (rows, C) allocation, not two

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        xc = x.to(rstd.dtype)
        normed = xc * rstd  # recomputed rather than kept
        grad_normed = grad_y.to(rstd.dtype) * weight
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_y.to(rstd.dtype) * normed).reshape(-1, weight.numel()).sum(0).to(weight.dtype)
        # d/dx of x * r(x): r * (g - normed * mean(g * normed)) over the last dimension
        dot = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed.mul_(dot)).mul_(rstd).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x, weight, eps):
    """x * rsqrt(mean(x^2, -1) + eps) * weight over the last dimension, keeping x and 1/rms for the backward."""
    return _RMSNorm.apply(x, weight, eps)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        ctx.save_for_backward(gate_up)
        return F.silu(gate).mul_(up)  # in place: no (rows, width) temporary

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        return _swiglu_backward(gate_up, grad_out)[0]


def _swiglu_backward(gate_up, grad_out, want_product=False):
    """The gradient for gate_up of silu(gate) * up given the output's gradient, and (want_product) that output,
    recomputed. Written into one buffer, with as few (rows, width) temporaries as the formula allows."""
    dtype = _compute_dtype(gate_up.dtype)
    gate, up = (t.to(dtype) for t in gate_up.chunk(2, dim=-1))
    g = grad_out.to(dtype)
    sig = torch.sigmoid(gate)
    silu = gate * sig
    product = (silu * up).to(gate_up.dtype) if want_product else None
    grad = torch.empty(gate_up.shape, dtype=dtype, device=gate_up.device)
    grad_gate, grad_up = grad.chunk(2, dim=-1)
    torch.mul(g, silu, out=grad_up)
    # silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a))) = sig + silu * (1 - sig)
    torch.mul(g, up, out=grad_gate).mul_(silu.mul_(sig.neg().add_(1)).add_(sig))
    return grad.to(gate_up.dtype), product


def swiglu(gate_up):
    """silu(gate) * up of gate_up = [gate; up] (its last dimension halves), keeping only gate_up for the backward."""
    return _SwiGLU.apply(gate_up)


class _SwiGLULinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up, weight, bias):
        gate, up = gate_up.chunk(2, dim=-1)
        product = F.silu(gate).mul_(up)
        out = F.linear(product, weight, bias)
        ctx.save_for_backward(gate_up, weight)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        gate_up, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.size(-1))  # (rows, out)
        grad_product = (g @ weight.to(g.dtype)).view(*gate_up.shape[:-1], weight.size(1))
        grad_gate_up, product = _swiglu_backward(gate_up, grad_product, want_product=True)  # recomputed, not kept
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_weight = (g.t() @ product.reshape(-1, product.size(-1)).to(g.dtype)).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        return grad_gate_up, grad_weight, grad_bias


def swiglu_linear(gate_up, weight, bias=None):
    """F.linear(silu(gate) * up, weight, bias) keeping only gate_up (and the weight) for the backward: the
    product, which the Linear alone would keep, is recomputed there (elementwise, no matmul)."""
    return _SwiGLULinear.apply(gate_up, weight, bias)
