"""The engines behind train_sft.py's seam: zero_lite.Engine's contract on its own, and the trainer's
choice of engine and stage."""

import json
import shutil

import pytest
import torch

import train_sft
import zero_lite
from model import GPT, HF_TRANSPOSED, GPTConfig
from test_train import data_file, run, train_losses  # noqa: F401 (data_file is a fixture)


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


# ----------------------------------------------------------------------------- both engines, end to end

# Every engine and stage trains the same as the native engine at stage 0 (plain data parallelism).
# Native stages 1-3 join this list when zero_lite.py has them.
ENGINES = [("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]
STEPS, RESUME_AT = 20, 10


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory, data_file):
    """engine_run(engine, stage) -> the output directory of a 2-rank fp32 run of STEPS steps (each run once)."""
    runs = {}

    def get(engine, stage):
        if (engine, stage) not in runs:
            out = tmp_path_factory.mktemp(f"{engine}{stage}")
            run([f"--data_path={data_file}", f"--max_steps={STEPS}", "--dropout=0.0", "--eval_exact_match=0",
                 f"--engine={engine}", f"--zero_stage={stage}", f"--checkpoint_interval={RESUME_AT}",
                 f"--output_dir={out}"], out, nproc=2)
            runs[engine, stage] = out
        return runs[engine, stage]
    return get


def final_weights(output_dir):
    return torch.load(output_dir / f"ckpt-{STEPS:08d}" / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine, stage", ENGINES)
def test_engine_trains_like_native_stage0(engine_run, engine, stage):
    """2 ranks, fp32, the same seed and data: the same losses and final weights within 1e-5."""
    reference, other = engine_run("native", 0), engine_run(engine, stage)
    expected, got = train_losses(reference), train_losses(other)
    assert sorted(got) == list(range(1, STEPS + 1))
    differences = [abs(expected[s] - got[s]) for s in expected]
    assert max(differences) <= 1e-5, differences
    a, b = final_weights(reference), final_weights(other)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), max(
        (a[k] - b[k]).abs().max().item() for k in a)
    assert expected[STEPS] < expected[1]  # it trained


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_gives_the_uninterrupted_losses(engine_run, tmp_path, stage):
    full = engine_run("deepspeed", stage)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / f"ckpt-{RESUME_AT:08d}", part / f"ckpt-{RESUME_AT:08d}")
    proc = run(["--resume", f"--output_dir={part}"], tmp_path, nproc=2)
    assert "resumed from" in proc.stdout
    expected, got = train_losses(full), train_losses(part)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)


@pytest.mark.slow
def test_deepspeed_zero3_export_loads_in_transformers(engine_run):
    """The hf/ export of a ZeRO-3 run holds the consolidated weights, which were sharded over the ranks."""
    from transformers import GPT2LMHeadModel
    out = engine_run("deepspeed", 3)
    weights = final_weights(out)
    hf = GPT2LMHeadModel.from_pretrained(out / "hf")
    theirs = hf.state_dict()
    for name, tensor in weights.items():  # the same names; GPT-2's Conv1D stores some matrices transposed
        assert torch.equal(theirs[name], tensor.t() if name.endswith(HF_TRANSPOSED) else tensor), name
    manifest = json.loads((out / f"ckpt-{STEPS:08d}" / "manifest.json").read_text())
    shards = [f for f in manifest["files"] if "optim_states" in f]
    assert len(shards) == 2 and manifest["engine"] == "deepspeed"  # one optimizer shard per rank
