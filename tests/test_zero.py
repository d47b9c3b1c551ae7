"""ZeRO stages 1-3 of the native engine (zero_lite.py) through train_sft.py: the losses and weights of
stage 0, model state within 10% of the ZeRO formula, resume at the same and at another number of ranks,
and bad input. The runs on 2 ranks are the session's sweep (conftest.engine_sweep: torchrun with gloo);
the others are real train_sft.py processes, or in this process on one rank (conftest.train_here)."""

import gc
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


# ----------------------------------------------------------------------------- stage 0's gradient buckets


@pytest.fixture
def process_group(tmp_path):
    """A gloo process group of one rank in this process: stage 0 then keeps its gradients in buckets and
    all-reduces them (an identity on one rank), the path it takes on several ranks."""
    dist = torch.distributed
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny_with_an_unused_parameter():
    """tiny_model() plus a trained parameter the forward never reads (it gets no gradient)."""
    model = tiny_model()
    model.unused = torch.nn.Parameter(torch.ones(3))
    return model


def stage0_engine(model):
    """Stage 0 with weight decay on every parameter, so that an update of the unused one would show."""
    groups = [{"params": list(model.parameters()), "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.1}]
    return zero_lite.Engine(model, torch.optim.AdamW(groups), stage=0, grad_clip=1.0)


def accumulate(engine, batches):
    """One optimizer step over the micro-batches; returns the gradients at the boundary (None where none)."""
    for i, idx in enumerate(batches):
        engine.backward(engine(idx, idx, boundary=i == len(batches) - 1) * 0.5)
    grads = [None if p.grad is None else p.grad.clone() for p in engine.module.parameters()]
    engine.step(1.0, torch.tensor(True))
    return grads


def test_make_buckets_cuts_at_the_size_splits_dtypes_and_views_one_buffer():
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtype))
              for n, dtype in [(3, torch.float32), (5, torch.float32), (100, torch.float32), (2, torch.float32),
                               (7, torch.bfloat16), (1, torch.float32)]]
    buckets = zero_lite.make_buckets(params, bucket_bytes=32)  # 8 fp32 elements
    assert [[p.numel() for p in b.params] for b in buckets] == [[3, 5], [100], [2], [7], [1]]
    for bucket in buckets:
        bucket.attach()
        assert bucket.flat.dtype == bucket.params[0].dtype and bucket.flat.numel() == sum(
            p.numel() for p in bucket.params)
        for p in bucket.params:
            assert p.grad.shape == p.shape and p.grad.untyped_storage().data_ptr() == bucket.flat.untyped_storage(
                ).data_ptr()


@pytest.mark.parametrize("bucket_bytes", [1, 1000, 50_000, 2**30])
def test_bucketed_stage0_gives_the_gradients_and_weights_of_the_plain_path(process_group, monkeypatch,
                                                                           bucket_bytes):
    """Buckets of one parameter each, of odd sizes cutting through the model (the 320 x 32 embedding is larger
    than 1,000 and 50,000 bytes), and one for everything: the same gradients at the boundary and the same
    weights after two steps of two micro-batches as the engine without a process group, bit for bit. The
    parameter that gets no gradient has none, and keeps its value."""
    monkeypatch.setattr(zero_lite, "BUCKET_BYTES", bucket_bytes)
    torch.manual_seed(1)
    steps = [[torch.randint(0, 320, (2, 12)) for _ in range(2)] for _ in range(2)]
    bucketed = stage0_engine(tiny_with_an_unused_parameter())
    assert bucketed.buckets and (bucket_bytes > 2**20 or len(bucketed.buckets) > 1)
    dist = torch.distributed
    dist.destroy_process_group()  # the reference engine: no process group, no buckets
    plain = stage0_engine(tiny_with_an_unused_parameter())
    assert not plain.buckets
    plain_grads = [accumulate(plain, batches) for batches in steps]
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    bucketed_grads = [accumulate(bucketed, batches) for batches in steps]
    unused = [p is bucketed.module.unused for p in bucketed.module.parameters()]
    for ours, reference in zip(bucketed_grads, plain_grads):
        assert [g is None for g in ours] == [g is None for g in reference] == unused
        assert all(torch.equal(a, b) for a, b in zip(ours, reference) if a is not None)
    assert all(torch.equal(a, b) for a, b in zip(bucketed.module.parameters(), plain.module.parameters()))
    assert torch.equal(bucketed.module.unused, torch.ones(3))


def test_stage0_sends_nothing_before_the_boundary_and_launches_buckets_inside_the_backward(process_group,
                                                                                           monkeypatch):
    """Accumulation: the first micro-batch's backward starts no collective. The boundary's: one all-reduce per
    bucket, each launched by a gradient hook before the backward returns (overlap), except a bucket holding a
    parameter that got no gradient, launched after it."""
    monkeypatch.setattr(zero_lite, "BUCKET_BYTES", 20_000)
    engine = stage0_engine(tiny_with_an_unused_parameter())
    events = []
    all_reduce, finish = zero_lite.dist.all_reduce, engine._finish_buckets
    monkeypatch.setattr(zero_lite.dist, "all_reduce", lambda *a, **kw: events.append("all_reduce") or all_reduce(
        *a, **kw))
    monkeypatch.setattr(engine, "_finish_buckets", lambda: events.append("backward returned") or finish())
    idx = torch.randint(0, 320, (2, 12))
    engine.backward(engine(idx, idx, boundary=False))
    assert events == ["backward returned"]
    events.clear()
    engine.backward(engine(idx, idx, boundary=True))
    launched_in_backward = len(engine.buckets) - 1  # all but the unused parameter's
    assert len(engine.buckets) > 3
    assert events == ["all_reduce"] * launched_in_backward + ["backward returned", "all_reduce"]


# ----------------------------------------------------------------------------- stages 1-3 on several ranks, spawned


def on_ranks(world, tmp_path, function, *args):
    """function(rank, world, *args) in `world` spawned processes joined by a gloo group; a failure in any raises."""
    torch.multiprocessing.spawn(join_group, args=(world, str(tmp_path / "store"), function, args), nprocs=world)


def join_group(rank, world, store, function, args):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        function(rank, world, *args)
    finally:  # the engines' gradient hooks make reference cycles; freed after the group, they aborted the exit
        gc.collect()
        torch.distributed.destroy_process_group()


def check_gather_and_reduce_scatter(rank, world):
    """Each rank's bucket holds (rank + 1) x 0..n-1: the reduce-scatter must leave every rank the sum of its slice,
    into a separate shard (which may take a slice) and into the bucket's own slice; the gather every rank's
    shard in rank order."""
    n = 5 * world
    bucket = torch.arange(n, dtype=torch.float32) * (rank + 1)
    expected = torch.arange(n, dtype=torch.float32).chunk(world)[rank] * sum(range(1, world + 1))
    shard = torch.full((5,), 7.0)  # what it holds beforehand must not count
    inbox = [shard] + [torch.empty(5) for _ in range(world - 2)]
    zero_lite.start_reduce_scatter(bucket, shard, rank, world, inbox)()
    assert torch.equal(shard, expected)
    own = bucket.chunk(world)[rank]
    zero_lite.start_reduce_scatter(bucket, own, rank, world, [torch.empty(5) for _ in range(world - 1)])()
    assert torch.equal(own, expected)
    flat = torch.full((n,), -1.0)
    for work in zero_lite.start_gather(flat, torch.full((5,), float(rank)), rank, world):
        work.wait()
    assert torch.equal(flat, torch.arange(world, dtype=torch.float32).repeat_interleave(5))


def test_gloo_reduce_scatter_and_gather_by_messages_give_the_collectives_results(tmp_path):
    """On 3 ranks, so that a rank receives from two (the engine's own 2-rank runs are below)."""
    on_ranks(3, tmp_path, check_gather_and_reduce_scatter)


def sharded_engine(model, stage):
    """A stage 0-3 engine with weight decay on every parameter, so that an update of the unused one would show.
    AdamW's eps is large enough that gradients which are rounding noise around zero (attention's key bias) make
    no steps: Adam would turn noise that differs between one and two ranks into full steps of opposite signs."""
    groups = [{"params": list(model.parameters()), "lr": 1e-2, "base_lr": 1e-2, "weight_decay": 0.1}]
    return zero_lite.Engine(model, torch.optim.AdamW(groups, eps=1e-5), stage=stage, grad_clip=1.0)


def train_two_steps(rank, world, out):
    """At stages 1, 2 and 3: two steps over four micro-batches each, rank r taking micro-batches r, r + world,
    ...; rank 0 saves each stage's weights and memory report into out."""
    results = {}
    for stage in (1, 2, 3):
        torch.manual_seed(1)
        steps = [[torch.randint(0, 320, (2, 12)) for _ in range(4)] for _ in range(2)]
        engine = sharded_engine(tiny_with_an_unused_parameter(), stage)
        for batches in steps:
            mine = batches[rank::world]
            for i, idx in enumerate(mine):
                engine.backward(engine(idx, idx, boundary=i == len(mine) - 1) / len(mine))
            engine.step(1.0, torch.tensor(True))
        results[stage] = {"weights": engine.full_state_dict(), "memory": engine.memory_report()}
    if rank == 0:
        torch.save(results, out)


def test_sharded_stages_on_two_ranks_give_one_ranks_weights_with_an_unused_parameter(tmp_path):
    """Accumulation over two micro-batches, a parameter that never gets a gradient, the reductions launched from
    the gradient hooks into reused buffers: two ranks end where one rank does on all their micro-batches (the
    same mean over the four), the unused parameter where weight decay alone takes it, and the model state at
    the ZeRO formula."""
    on_ranks(2, tmp_path, train_two_steps, str(tmp_path / "two.pt"))
    train_two_steps(0, 1, str(tmp_path / "one.pt"))  # world 1: no process group, nothing sent
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    n = sum(p.numel() for p in tiny_with_an_unused_parameter().parameters())
    for stage in (1, 2, 3):
        assert two[stage]["weights"].keys() == one[stage]["weights"].keys()
        for name, weight in one[stage]["weights"].items():
            torch.testing.assert_close(two[stage]["weights"][name], weight, rtol=1e-5, atol=1e-6,
                                       msg=f"stage {stage}: {name}")
        torch.testing.assert_close(two[stage]["weights"]["unused"], torch.full((3,), (1 - 1e-2 * 0.1) ** 2))
        assert abs(two[stage]["memory"]["total"] / zero_lite.zero_formula_bytes(n, n, stage, 2) - 1) < 0.1


def test_stage3_lets_go_of_each_blocks_weights_after_its_forward(monkeypatch):
    """Autograd saves a block's transposed weights for its backward. Stage 3 saves them as places in the unit's
    buffer instead, so that after the forward no block's gathered buffer is alive but the last one's (its
    backward comes first); the backward gathers them again and two steps end at stage 0's weights."""
    from torch.multiprocessing.reductions import StorageWeakRef
    released, free = {}, zero_lite.Unit.free

    def recording_free(unit):
        if unit.gathered:
            released[unit.name] = StorageWeakRef(unit.flat.untyped_storage())
        free(unit)
    monkeypatch.setattr(zero_lite.Unit, "free", recording_free)
    def three_blocks():  # so that one block is freed between two others
        torch.manual_seed(0)
        return GPT(GPTConfig(block_size=48, vocab_size=320, n_layer=3, n_head=2, n_embd=32))
    engines = {stage: sharded_engine(three_blocks(), stage) for stage in (0, 3)}
    released.clear()  # making the engine frees every unit once
    torch.manual_seed(2)
    for step in range(2):
        idx = torch.randint(0, 320, (2, 12))
        for stage, engine in engines.items():
            loss = engine(idx, idx)
            if stage == 3 and step == 0:
                assert sorted(released) == ["h.0", "h.1"] and all(ref.expired() for ref in released.values())
                assert engines[3].units[-1].gathered
            engine.backward(loss)
            engine.step(1.0, torch.tensor(True))
    ours = engines[3].full_state_dict()
    for name, weight in engines[0].module.state_dict().items():
        torch.testing.assert_close(ours[name], weight, msg=name)
