"""The engines behind train_sft.py's seam: zero_lite.Engine's contract on its own, and the trainer's
choice of engine and stage."""

import pytest
import torch

import train_sft
import zero_lite
from model import GPT, GPTConfig


class WithSparseGrads(torch.optim.AdamW):
    """Stands in for sparse fine-tuning's optimizer: gradients it keeps itself, listed as sparse_grads."""

    def __init__(self, params, sparse_grads, **kw):
        super().__init__(params, **kw)
        self.sparse_grads = sparse_grads


def tiny_engine(grad_clip, sparse_grads=()):
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    groups = [{"params": list(model.parameters()), "lr": 1e-3, "base_lr": 1e-3}]
    return zero_lite.Engine(model, WithSparseGrads(groups, list(sparse_grads)), grad_clip=grad_clip)


def test_stage0_norm_and_clipping_cover_the_sparse_gradients():
    idx = torch.randint(0, 64, (2, 8))
    sparse = torch.full((5,), 100.0)
    engine = tiny_engine(grad_clip=1.0, sparse_grads=[sparse])
    engine.backward(engine(idx, idx))
    dense = [p.grad.clone() for p in engine.module.parameters()]
    grad_norm, applied = engine.step(0.5, torch.tensor(True))
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in dense] + [torch.full((5,), 100.0)]))
    assert applied and torch.allclose(grad_norm, expected)
    assert torch.allclose(sparse, torch.full((5,), 100.0 / (float(expected) + 1e-6)))  # clipped in place
    assert engine.optimizer.param_groups[0]["lr"] == 0.5e-3
    assert all(p.grad is None for p in engine.module.parameters())  # zeroed after the step


def test_stage0_skips_a_nonfinite_step_and_leaves_the_weights():
    idx = torch.randint(0, 64, (2, 8))
    engine = tiny_engine(grad_clip=0.0)
    before = [p.detach().clone() for p in engine.module.parameters()]
    engine.backward(engine(idx, idx))
    grad_norm, applied = engine.step(1.0, torch.tensor(False))
    assert not applied and torch.isfinite(grad_norm)
    assert all(torch.equal(a, p) for a, p in zip(before, engine.module.parameters()))
    report = engine.memory_report()
    n = sum(p.numel() for p in engine.module.parameters())
    assert report["params"] == report["grads"] == 4 * n and report["total"] == sum(
        report[k] for k in ("params", "grads", "optimizer_state"))


def test_unbuilt_native_stage_is_an_option_error():
    cfg, _ = train_sft.parse_options(["--zero_stage=2"])
    engine = tiny_engine(1.0)
    with pytest.raises(train_sft.OptionError, match="--zero_stage=2: ZeRO stage 2 is not built"):
        train_sft.make_engine(cfg, engine.module, engine.optimizer)
