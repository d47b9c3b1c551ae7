"""sft_kernels/lean_autograd.py against the plain PyTorch formulas it replaces: the same forward values (bit for
bit in float32), the same gradients (to float rounding), on random inputs of odd shapes; and what it keeps for
the backward, the reason it exists."""
import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from model import GPT, MLP, RMSNorm, apply_lora, family_config
from sft_kernels.lean_autograd import rms_norm, swiglu, swiglu_linear

SHAPES = [(1, 1), (3, 7), (2, 5, 13), (2, 3, 4, 33)]  # the last dimension is normalized / halved


def random_pair(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def grads(fn, *inputs, grad_out):
    """fn(*inputs) and the gradients of (fn(*inputs) * grad_out).sum() for every input."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    (out * grad_out).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_rms_norm_matches_nn_rmsnorm(shape, dtype, tol):
    x, grad_out = random_pair(shape, dtype, seed=len(shape))
    weight = torch.randn(shape[-1]) + 1
    reference = nn.RMSNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        reference.weight.copy_(weight)
    expected, (expected_dx,) = grads(reference, x, grad_out=grad_out)
    actual, (dx, dw) = grads(lambda x, w: rms_norm(x, w, 1e-6), x, weight, grad_out=grad_out)
    assert actual.dtype == expected.dtype == dtype
    if dtype == torch.float32:
        assert torch.equal(actual, expected)  # the forward is the same arithmetic
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(dx, expected_dx, rtol=tol, atol=tol * 10)
    torch.testing.assert_close(dw, reference.weight.grad, rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("shape", [s[:-1] + (2 * s[-1],) for s in SHAPES])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_swiglu_matches_silu_times_up(shape, dtype, tol):
    gate_up, _ = random_pair(shape, dtype, seed=len(shape))
    _, grad_out = random_pair(shape[:-1] + (shape[-1] // 2,), dtype, seed=7)

    def reference(h):
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    expected, (expected_grad,) = grads(reference, gate_up, grad_out=grad_out)
    actual, (grad,) = grads(swiglu, gate_up, grad_out=grad_out)
    assert torch.equal(actual, expected) and grad.dtype == dtype
    torch.testing.assert_close(grad, expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape, out_features, bias", [((1, 2), 1, False), ((3, 14), 5, True), ((2, 3, 10), 7, True)])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_swiglu_linear_matches_silu_times_up_then_linear(shape, out_features, bias, dtype, tol):
    gate_up, _ = random_pair(shape, dtype, seed=3)
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(out_features, shape[-1] // 2, generator=gen).to(dtype)
    b = torch.randn(out_features, generator=gen).to(dtype) if bias else None
    grad_out = torch.randn(shape[:-1] + (out_features,), generator=gen).to(dtype)
    inputs = (gate_up, weight) + ((b,) if bias else ())

    def reference(h, w, b=None):
        gate, up = h.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w, b)
    expected, expected_grads = grads(reference, *inputs, grad_out=grad_out)
    actual, actual_grads = grads(lambda h, w, b=None: swiglu_linear(h, w, b), *inputs, grad_out=grad_out)
    assert torch.equal(actual, expected)
    for ours, theirs in zip(actual_grads, expected_grads):
        torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


def test_swiglu_linear_under_bfloat16_autocast_gives_float32_weight_gradients():
    gate_up = torch.randn(3, 4, 12)
    weight, bias = torch.randn(5, 6), torch.randn(5)
    grad_out = torch.randn(3, 4, 5)

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (gate_up, weight, bias)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(*leaves)
        (out.float() * grad_out).sum().backward()
        return out, [t.grad for t in leaves]

    def reference(h, w, b):
        gate, up = h.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w, b)
    expected, expected_grads = run(reference)
    actual, actual_grads = run(swiglu_linear)
    assert actual.dtype == expected.dtype == torch.bfloat16 and torch.equal(actual, expected)
    for ours, theirs in zip(actual_grads, expected_grads):
        assert ours.dtype == theirs.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-2)


def test_rms_norm_weight_may_be_frozen_and_input_a_view():
    x = torch.randn(4, 6, 10)[:, 1:, ::2]  # not contiguous
    weight = torch.randn(5)
    actual, (dx,) = grads(lambda x: rms_norm(x, weight, 1e-5), x, grad_out=torch.ones(4, 5, 5))
    expected, (expected_dx,) = grads(lambda x: F.rms_norm(x, (5,), weight, 1e-5), x, grad_out=torch.ones(4, 5, 5))
    torch.testing.assert_close(actual, expected)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-5)


def saved_bytes(fn, *inputs, params=()):
    """Bytes of the distinct storages autograd keeps between fn's forward and its backward, params' own aside."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(storages.values())


def test_model_norm_and_mlp_keep_less_for_the_backward():
    """The reason for the Functions: a Llama block's RMSNorm keeps its input and one float per row, not the
    normalized product too; its SwiGLU MLP keeps its input and [gate; up], not silu(gate) nor the product
    (c_proj's input) too; with LoRA on c_proj, the product is c_proj's own input and is kept."""
    config = family_config("llama", n_layer=1, n_head=2, n_embd=16, intermediate_size=24, vocab_size=32)
    x = torch.randn(3, 5, 16, requires_grad=True)
    rows = 3 * 5
    norm = RMSNorm(16, eps=1e-6)
    assert saved_bytes(norm, x, params=norm.parameters()) == x.nbytes + rows * 4
    plain = saved_bytes(lambda x: F.rms_norm(x, (16,), norm.weight, 1e-6), x, params=norm.parameters())
    assert plain >= 2 * x.nbytes
    mlp = MLP(config)
    h_bytes, product_bytes = rows * 48 * 4, rows * 24 * 4
    assert saved_bytes(mlp, x, params=mlp.parameters()) == x.nbytes + h_bytes  # c_fc's input, [gate; up]
    apply_lora(mlp, 4, module_name="c_proj")
    lora_saved = saved_bytes(mlp, x, params=mlp.parameters())
    assert x.nbytes + h_bytes + product_bytes <= lora_saved < x.nbytes + h_bytes + 2 * product_bytes


def test_llama_model_loss_and_gradients_unchanged():
    """The whole model with the lean Functions against the same weights through nn.RMSNorm and F.silu(gate) * up."""
    config = family_config("llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=32, intermediate_size=40,
                           vocab_size=64, block_size=16, qk_norm=True)
    torch.manual_seed(0)
    model = GPT(config)
    idx = torch.randint(0, 64, (2, 9))
    labels = torch.randint(0, 64, (2, 9))
    labels[:, :3] = -100
    loss = model(idx, labels)
    loss.backward()
    lean = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for module in model.modules():  # the plain formulas, same weights
        if isinstance(module, RMSNorm):
            module.forward = lambda x, m=module: F.rms_norm(x, m.normalized_shape, m.weight, m.eps)
        if isinstance(module, MLP):
            def plain_mlp(x, m=module):
                gate, up = m.c_fc(x).chunk(2, dim=-1)
                return m.c_proj(F.silu(gate) * up)
            module.forward = plain_mlp
    plain_loss = model(idx, labels)
    plain_loss.backward()
    assert torch.equal(loss, plain_loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(lean[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)


def model_loss_and_grads(model, idx, labels, autocast_dtype=None):
    """The loss and every trainable parameter's gradient (float32, on the CPU) of one forward and backward."""
    model.zero_grad()
    device = idx.device.type
    with torch.autocast(device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = model(idx, labels)
    loss.backward()
    return loss.float().cpu(), {name: p.grad.float().cpu() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("lora", [False, True])
def test_lean_functions_on_cuda_give_the_cpu_loss_and_gradients(lora, monkeypatch):
    """The lean norm, SwiGLU(+down projection), LoRA's in-place adapter and the chunked loss, as the trainer runs
    them on a GPU: in float32 the CPU's loss and gradients, under bfloat16 autocast the same to bfloat16's
    precision, every gradient finite."""
    config = family_config("llama", n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                           vocab_size=101, block_size=32, qk_norm=True)
    torch.manual_seed(0)
    model = GPT(config)
    if lora:
        apply_lora(model, 4)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_left" in name:
                torch.nn.init.normal_(p, std=0.1)  # off its zero init, so the adapter's path counts
    idx = torch.randint(0, 101, (3, 29))
    labels = torch.randint(0, 101, (3, 29))
    labels[:, :11] = -100
    cpu_loss, cpu_grads = model_loss_and_grads(model, idx, labels)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # a trainer in this process may have set it
    model.cuda()
    cuda_loss, cuda_grads = model_loss_and_grads(model, idx.cuda(), labels.cuda())
    bf16_loss, bf16_grads = model_loss_and_grads(model, idx.cuda(), labels.cuda(), torch.bfloat16)
    torch.testing.assert_close(cuda_loss, cpu_loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bf16_loss, cpu_loss, rtol=3e-2, atol=1e-2)
    for name, grad in cpu_grads.items():
        torch.testing.assert_close(cuda_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)
        scale = grad.abs().max().clamp_min(1e-6)
        assert torch.isfinite(bf16_grads[name]).all(), name
        assert (bf16_grads[name] - grad).abs().max() <= 0.1 * scale, name
