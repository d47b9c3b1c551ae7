"""ZeRO stages 1-3 of the native engine (zero_lite.py) through train_sft.py: the losses and weights of
stage 0, model state within 10% of the ZeRO formula, resume at the same and at another number of ranks,
and bad input. The runs on 2 ranks are the session's sweep (conftest.engine_sweep: torchrun with gloo);
the others are real train_sft.py processes, or in this process on one rank (conftest.train_here)."""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import checkpoint
import options
import train_sft
import zero_lite
from model import GPT, GPTConfig
from conftest import SWEEP, SWEEP_STEPS, TINY, run_trainer, train_here, train_losses

RESUME = ["--resume", "--batch_size=8"]  # the sweep's batch; TINY says 4


def weights(output_dir, step=SWEEP_STEPS):
    return torch.load(os.path.join(output_dir, f"ckpt-{step:08d}", "model.pt"), weights_only=True)


def assert_same_run(a, b, tolerance, steps=range(1, SWEEP_STEPS + 1)):
    """Equal losses at the given steps, and equal final weights, within tolerance."""
    la, lb = train_losses(a), train_losses(b)
    assert all(abs(la[s] - lb[s]) <= tolerance for s in steps), [(s, la[s], lb[s]) for s in steps]
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all((wa[k] - wb[k]).abs().max() <= tolerance for k in wa), max((wa[k] - wb[k]).abs().max() for k in wa)


def resume_from(source, step, target):
    """A run directory holding only source's checkpoint at step (and its metrics, which the resume trims)."""
    target = Path(target)
    os.makedirs(target)
    shutil.copytree(os.path.join(source, f"ckpt-{step:08d}"), os.path.join(target, f"ckpt-{step:08d}"))
    shutil.copy(os.path.join(source, "metrics.jsonl"), target)
    return target


@pytest.mark.slow
def test_stages_1_2_3_give_stage_0s_losses_and_weights(engine_sweep, data_file, tmp_path):
    for stage in (1, 2, 3):
        assert_same_run(engine_sweep("native", 0), engine_sweep("native", stage), 1e-5)
    # 3 ranks x 2 micro-batches see the same 6 micro-batches per step as 2 ranks x 3
    run_trainer([f"--data_path={data_file}", *SWEEP, "--gradient_accumulation_steps=2", "--zero_stage=3",
                 f"--output_dir={tmp_path}/three_ranks"], tmp_path, nproc=3)
    assert_same_run(engine_sweep("native", 0), tmp_path / "three_ranks", 1e-5)
    assert train_losses(engine_sweep("native", 0))[20] < train_losses(engine_sweep("native", 0))[1] - 1  # it trained


@pytest.mark.slow
def test_memory_report_is_within_10_percent_of_the_zero_formula(engine_sweep):
    """Every rank's engine.memory_report() (in metrics.jsonl) beside the ZeRO paper's fp32 formula, N = 2."""
    held = {}
    for stage in range(4):
        # each rank says it at start
        assert engine_sweep.stdout("native", stage).count(f"formula for stage {stage} on 2 rank(s)") == 2
        with open(engine_sweep("native", stage) / "metrics.jsonl") as f:
            record = next(r for r in map(json.loads, f) if "memory" in r)
        assert len(record["memory"]) == 2
        for rank in record["memory"]:
            assert abs(rank["total"] / record["zero_formula_bytes"] - 1) <= 0.10, (stage, rank, record)
        held[stage] = [record["memory"][0][k] for k in ("params", "grads", "optimizer_state")]
    full = held[0]  # stage 0: weights, gradients and moments whole on every rank
    half = [x / 2 for x in full]
    expected = {1: [full[0], full[1], half[2]], 2: [full[0], half[1], half[2]], 3: half}
    for stage, kinds in expected.items():
        assert all(abs(a - b) <= 0.1 * b for a, b in zip(held[stage], kinds)), (stage, held[stage], kinds)


@pytest.mark.slow
def test_resume_on_the_same_ranks_is_exact(engine_sweep, resumed_sweep):
    assert "resumed from" in resumed_sweep.stdout("native", 3)
    assert_same_run(engine_sweep("native", 3), resumed_sweep("native", 3), 1e-6, steps=range(11, 21))


@pytest.mark.slow
def test_resume_on_another_number_of_ranks_reshards(engine_sweep, tmp_path):
    """Stage 2 from 2 ranks onto 1 at step 10 (6 micro-batches: the same batch), checkpointed by 1 rank at
    step 15 and resumed from there on 2 ranks: both continue from the re-sharded weights and moments, so
    the later losses are the uninterrupted run's (to reduction order), as from no other state."""
    stage2 = engine_sweep("native", 2)
    proc = train_here([*RESUME, "--gradient_accumulation_steps=6", "--checkpoint_interval=5",
                       f"--output_dir={resume_from(stage2, 10, tmp_path / 'two_to_one')}"], tmp_path)
    assert "formula for stage 2 on 1 rank(s)" in proc.stdout
    assert_same_run(stage2, tmp_path / "two_to_one", 1e-5, steps=range(11, 21))
    run_trainer([*RESUME, "--gradient_accumulation_steps=3",
                 f"--output_dir={resume_from(tmp_path / 'two_to_one', 15, tmp_path / 'one_to_two')}"], tmp_path, nproc=2)
    assert_same_run(stage2, tmp_path / "one_to_two", 1e-5, steps=range(16, 21))


@pytest.mark.slow
def test_a_missing_shard_stops_every_rank_with_one_sentence(engine_sweep, tmp_path):
    broken = resume_from(engine_sweep("native", 2), 10, tmp_path / "missing_shard")
    os.remove(os.path.join(broken, "ckpt-00000010", "zero_lite-shard00001-of00002.pt"))
    manifest = broken / "ckpt-00000010" / "manifest.json"  # as if the file was never written: past the checksums
    checkpoint.write_manifest(manifest.parent, json.loads(manifest.read_text()))
    proc = run_trainer([*RESUME, f"--output_dir={broken}"], tmp_path, nproc=2, check=False)
    missing = f"{broken}/ckpt-00000010/zero_lite-shard00001-of00002.pt is missing"
    printed = [line for line in proc.stderr.splitlines() if line.startswith(f"train_sft.py: error: {missing}")]
    assert proc.returncode != 0 and len(printed) == 1, proc.stderr[-3000:]  # by rank 0, once
    assert f"traceback : train_sft.py: error: {missing}" in proc.stderr  # and in torchrun's summary of the ranks
    assert "]: Traceback" not in proc.stderr  # no rank died of an exception, or hung


# ----------------------------------------------------------------------------- in one process


def tiny_model(n_embd=32, gradient_checkpointing=False):
    """The model TINY trains: byte tokenizer (257 ids, padded to 320), 2 layers, 48 positions."""
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=48, vocab_size=320, n_layer=2, n_head=2, n_embd=n_embd,
                         gradient_checkpointing=gradient_checkpointing))


def make_engine(argv, model):
    cfg, _ = options.parse_options(TINY + argv)
    return train_sft.make_engine(cfg, model, train_sft.make_optimizer(model, cfg, fused=False))


def test_options_a_stage_cannot_honour_are_named():
    with pytest.raises(options.OptionError, match="--zero_stage=3: --gradient_checkpointing cannot be combined"):
        make_engine(["--zero_stage=3"], tiny_model(gradient_checkpointing=True))
    with pytest.raises(options.OptionError, match="--zero_stage=3: --compile cannot be combined"):
        make_engine(["--zero_stage=3", "--compile"], tiny_model())
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters())
    optimizer.sparse_grads = []  # what sparse fine-tuning's optimizer carries
    with pytest.raises(ValueError, match="--sparse_density needs --zero_stage=0: stage 2 shards"):
        zero_lite.Engine(model, optimizer, stage=2)


@pytest.mark.slow
def test_shard_files_reshard_on_load_and_bad_ones_are_named(engine_sweep, tmp_path):
    """One rank loads a 2-rank stage-2 checkpoint: the re-sharded weights are the consolidated ones; a
    truncated, foreign or missing shard file, or another model's, is named in a ValueError."""
    ckpt = engine_sweep("native", 2) / "ckpt-00000010"
    engine = make_engine(["--zero_stage=2"], tiny_model())
    engine.load(ckpt)
    consolidated, loaded = torch.load(ckpt / "model.pt", weights_only=True), engine.full_state_dict()
    assert all(torch.equal(consolidated[k], loaded[k]) for k in consolidated)
    shard1 = "zero_lite-shard00001-of00002.pt"
    with pytest.raises(ValueError, match="another model: unit root has transformer.wte.weight"):
        make_engine(["--zero_stage=2", "--n_embd=16"], tiny_model(n_embd=16)).load(ckpt)
    cases = {"truncated": lambda f: f.write_bytes(f.read_bytes()[:2000]),
             "foreign": lambda f: shutil.copy(f.with_name(shard1.replace("00001-", "00000-")), f),
             "missing": lambda f: f.unlink()}
    messages = {"truncated": "cannot be read", "foreign": "is not shard 1 of a native-engine checkpoint",
                "missing": "is missing: the checkpoint was written by 2 ranks"}
    for case, damage in cases.items():
        bad = tmp_path / case
        shutil.copytree(ckpt, bad)
        damage(bad / shard1)
        with pytest.raises(ValueError, match=re.escape(f"{bad / shard1} {messages[case]}")):
            engine.load(bad)
