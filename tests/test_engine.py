"""The engines behind train_sft.py's seam: zero_lite.Engine's contract on its own, and the trainer's
choice of engine and stage (the 2-rank runs are the session's sweep, conftest.engine_sweep)."""

import json
import shutil
import sys

import pytest
import torch

import checkpoint
import deepspeed_engine
import options
import zero_lite
from hf_format import HF_TRANSPOSED
from model import GPT, GPTConfig
from conftest import RESUME_AT, SWEEP_STEPS as STEPS, train_here, train_losses


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


# ----------------------------------------------------------------------------- both engines, end to end

# Every engine and stage trains the same as the native engine at stage 0 (plain data parallelism).
# Native stages 1-3 against stage 0 are in tests/test_zero.py; here they meet DeepSpeed's stage.
ENGINES = [("deepspeed", 0), ("deepspeed", 1), ("deepspeed", 2), ("deepspeed", 3)]
def final_eval(output_dir):
    with open(output_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f if "eval_loss" in line][-1]


def final_weights(output_dir):
    return torch.load(output_dir / f"ckpt-{STEPS:08d}" / "model.pt", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("engine, stage", ENGINES)
def test_engine_trains_like_native_stage0(engine_sweep, engine, stage):
    """2 ranks, fp32, the same seed and data: the same losses and final weights within 1e-5."""
    reference, other = engine_sweep("native", 0), engine_sweep(engine, stage)
    expected, got = train_losses(reference), train_losses(other)
    assert sorted(got) == list(range(1, STEPS + 1))
    differences = [abs(expected[s] - got[s]) for s in expected]
    assert max(differences) <= 1e-5, differences
    a, b = final_weights(reference), final_weights(other)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), max(
        (a[k] - b[k]).abs().max().item() for k in a)
    assert expected[STEPS] < expected[1]  # it trained
    # The final eval and greedy generation run on every rank (at ZeRO-3 gathering weights as they go).
    a, b = final_eval(reference), final_eval(other)
    assert abs(a["eval_loss"] - b["eval_loss"]) <= 1e-5 and a["exact_match"] == b["exact_match"], (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_native_stage_trains_like_deepspeed_at_the_same_stage(engine_sweep, stage):
    """2 ranks, fp32: zero_lite's ZeRO stage against DeepSpeed's, losses and final weights within 1e-5."""
    native, deepspeed = engine_sweep("native", stage), engine_sweep("deepspeed", stage)
    expected, got = train_losses(deepspeed), train_losses(native)
    assert sorted(got) == list(range(1, STEPS + 1))
    differences = [abs(expected[s] - got[s]) for s in expected]
    assert max(differences) <= 1e-5, differences
    a, b = final_weights(deepspeed), final_weights(native)
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a), max(
        (a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_resume_gives_the_uninterrupted_losses(engine_sweep, resumed_sweep, stage):
    full, part = engine_sweep("deepspeed", stage), resumed_sweep("deepspeed", stage)
    assert "resumed from" in resumed_sweep.stdout("deepspeed", stage)
    expected, got = train_losses(full), train_losses(part)
    assert sorted(got) == list(range(RESUME_AT + 1, STEPS + 1))
    assert all(abs(got[s] - expected[s]) <= 1e-6 for s in got), (got, expected)


@pytest.mark.slow
def test_deepspeed_zero3_export_loads_in_transformers(engine_sweep):
    """The hf/ export of a ZeRO-3 run holds the consolidated weights, which were sharded over the ranks."""
    from transformers import GPT2LMHeadModel
    out = engine_sweep("deepspeed", 3)
    weights = final_weights(out)
    hf = GPT2LMHeadModel.from_pretrained(out / "hf")
    theirs = hf.state_dict()
    for name, tensor in weights.items():  # the same names; GPT-2's Conv1D stores some matrices transposed
        assert torch.equal(theirs[name], tensor.t() if name.endswith(HF_TRANSPOSED) else tensor), name
    manifest = json.loads((out / f"ckpt-{STEPS:08d}" / "manifest.json").read_text())
    shards = [f for f in manifest["files"] if "optim_states" in f]
    assert len(shards) == 2 and manifest["engine"] == "deepspeed"  # one optimizer shard per rank
    # --init_from and sample.py read a DeepSpeed checkpoint directory as they read a native one.
    saved = checkpoint.load_checkpoint(str(out / f"ckpt-{STEPS:08d}"))
    model = checkpoint.build_model(saved["options"], None, saved)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)


# ----------------------------------------------------------------------------- bad input


def check(argv, world=2):
    """parse_options then the engine checks, as main() runs them; returns the options."""
    cfg, explicit = options.parse_options(argv)
    if cfg["engine"] == "deepspeed":
        deepspeed_engine.adopt_options(cfg, explicit, world, torch.device("cpu"))
    options.check_combinations(cfg)
    return cfg


def test_engine_options_that_cannot_work_are_one_sentence(tmp_path):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"zero_optimization": {"stage": 2,}}')
    stage3 = tmp_path / "stage3.json"
    stage3.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 2}))
    cases = {
        ("--zero_stage=4",): "--zero_stage must be between 0 and 3, got 4",
        ("--offload",): "--offload is a DeepSpeed setting: it needs --engine=deepspeed",
        ("--deepspeed_config=x.json",): "--deepspeed_config is a DeepSpeed setting",
        ("--engine=deepspeed", f"--deepspeed_config={bad_json}"): r"bad.json is not valid JSON: .*line 1 column 35",
        ("--engine=deepspeed", f"--deepspeed_config={tmp_path}/none.json"): "none.json cannot be read",
        ("--engine=deepspeed", f"--deepspeed_config={stage3}", "--zero_stage=2"):
            r"stage3.json sets zero_optimization.stage to 3 \(--zero_stage\) but --zero_stage=2 was given",
        ("--engine=deepspeed", "--offload"): "--offload moves the sharded optimizer state: it needs --zero_stage",
    }
    for argv, message in cases.items():
        with pytest.raises(options.OptionError, match=message):
            check(list(argv))


def test_deepspeed_config_fields_become_the_runs_options(tmp_path):
    """Fields the options also set are adopted (so data, logs and checkpoints follow them); the rest
    pass through to DeepSpeed untouched."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": True}, "gradient_clipping": 0.5,
                                "train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}}))
    cfg = check(["--engine=deepspeed", f"--deepspeed_config={path}"])
    assert (cfg["zero_stage"], cfg["grad_clip"], cfg["batch_size"], cfg["dtype"]) == (3, 0.5, 2, "bfloat16")
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    config = deepspeed_engine.deepspeed_config(cfg, model)
    assert config["zero_optimization"]["overlap_comm"] is True and config["bf16"] == {"enabled": True}
    assert "torch_autocast" not in config  # the user chose DeepSpeed's bf16 weights; nothing is added
    with pytest.raises(options.OptionError, match="train_batch_size=7 but --batch_size x"):
        path.write_text(json.dumps({"train_batch_size": 7}))
        check(["--engine=deepspeed", f"--deepspeed_config={path}"])
    with pytest.raises(options.OptionError, match="has an 'optimizer' section"):
        path.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
        check(["--engine=deepspeed", f"--deepspeed_config={path}"])


@pytest.mark.slow
def test_missing_deepspeed_and_a_checkpoint_of_the_other_engine_exit_2(tmp_path, data_file, engine_sweep,
                                                                         monkeypatch):
    """DeepSpeed made unimportable in the trainer's process: the run says how to install it."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    proc = train_here(["--engine=deepspeed", f"--data_path={data_file}", f"--output_dir={tmp_path}/ds"], tmp_path,
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--engine=deepspeed needs DeepSpeed, which is not installed: run bash setup.sh" in proc.stderr
    monkeypatch.undo()
    out = tmp_path / "native"  # a native run's checkpoint, refused before anything in it is touched
    out.mkdir()
    shutil.copytree(engine_sweep("native", 0) / f"ckpt-{STEPS:08d}", out / f"ckpt-{STEPS:08d}")
    proc = train_here(["--resume", "--engine=deepspeed", "--batch_size=8", f"--output_dir={out}"], tmp_path,
                      check=False)  # the sweep's batch size: only the engine differs
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"checkpoint {out}/ckpt-{STEPS:08d} has engine='native' but engine='deepspeed' was requested" in proc.stderr


# ----------------------------------------------------------------------------- consolidated weights


def test_full_state_dict_is_an_fp32_cpu_copy_with_tied_weights_once():
    """The weights that model.pt, the hf/ export and --init_from use: the model's keys, fp32, on the
    CPU, a copy (training on does not change it), the tied embedding and head one tensor."""
    engine = tiny_engine(1.0)
    weights = engine.full_state_dict()
    assert weights.keys() == engine.module.state_dict().keys()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in weights.values())
    assert weights["lm_head.weight"] is weights["transformer.wte.weight"]
    before = weights["lm_head.weight"].clone()
    with torch.no_grad():
        engine.module.lm_head.weight.add_(1.0)
    assert torch.equal(weights["lm_head.weight"], before)
