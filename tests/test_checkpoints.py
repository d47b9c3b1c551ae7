"""Checkpoint robustness: which checkpoints a run may resume from or delete, damaged and foreign
checkpoints, a second run on the same output directory, leftovers of a crash, and a full disk.

Most tests call checkpoint.py's functions on small hand-made checkpoints; a few run the
trainer (in this process, conftest.train_here, or as a process where the process is tested) to show
that main() wires them in."""

import errno
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile

import pytest
import torch

import checkpoint
import train_sft
from conftest import ROOT, run_trainer, train_here, write_reverse_pairs
from checkpoint import CheckpointError
from model import GPT, GPTConfig, family_config
from options import OptionError


def make_checkpoint(output_dir, step, run_id, n=4096):
    """A checkpoint directory as save_checkpoint lays it out, with small tensors standing in for the state."""
    path = output_dir / f"ckpt-{step:08d}"
    path.mkdir(parents=True)
    torch.save({"w": torch.arange(n, dtype=torch.float32) + step}, path / "model.pt")
    torch.save({"step": step}, path / "trainer.pt")
    checkpoint.write_manifest(path, {"step": step, "engine": "native", "run_id": run_id})
    return path


def record_run(output_dir, run_id):
    (output_dir / "run.json").write_text(json.dumps({"run_id": run_id}))


def flip_bytes_inside_a_tensor(path, count=64):
    """Inverts count bytes in the middle of the largest tensor stored in a torch.save file (same size)."""
    with zipfile.ZipFile(path) as archive:
        entry = max((e for e in archive.infolist() if "/data/" in e.filename), key=lambda e: e.file_size)
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)
        name_length, extra_length = (int.from_bytes(f.read(2), "little") for _ in range(2))
        start = entry.header_offset + 30 + name_length + extra_length + entry.file_size // 2 - count // 2
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))


def messages():
    logged = []
    return logged, logged.append


# ----------------------------------------------------------------------------- which checkpoints are the run's


def test_resume_and_rotation_consider_only_this_runs_checkpoints_by_step(tmp_path):
    """An earlier run's ckpt-25 and ckpt-30, and the user's ckpt-best/ and ckpt-best.pt, are neither
    resumed from nor deleted; this run's own are taken by step number, not by name."""
    out = tmp_path / "out"
    for step in (9, 10, 12):
        make_checkpoint(out, step, "this-run")
    for step in (25, 30):
        make_checkpoint(out, step, "earlier-run")
    shutil.copytree(out / "ckpt-00000030", out / "ckpt-best")
    torch.save({"w": torch.zeros(2)}, out / "ckpt-best.pt")
    record_run(out, "this-run")
    logged, log = messages()
    assert checkpoint.find_checkpoint(str(out), log) == str(out / "ckpt-00000012")
    assert [line.split(":")[0] for line in logged[:2]] == [
        f"checkpoint {out}/ckpt-00000030 cannot be used", f"checkpoint {out}/ckpt-00000025 cannot be used"]
    assert "written by another run" in logged[0]
    checkpoint.remove_old_checkpoints(str(out), 2, "this-run")
    assert sorted(os.listdir(out)) == ["ckpt-00000010", "ckpt-00000012", "ckpt-00000025", "ckpt-00000030",
                                       "ckpt-best", "ckpt-best.pt", "run.json"]


def test_resume_sets_aside_the_checkpoints_it_passed_over(tmp_path):
    out = tmp_path / "out"
    make_checkpoint(out, 1, "this-run")
    make_checkpoint(out, 2, "earlier-run")
    record_run(out, "this-run")
    logged, log = messages()
    assert checkpoint.find_checkpoint(str(out), log, set_aside=True) == str(out / "ckpt-00000001")
    assert sorted(os.listdir(out)) == ["ckpt-00000001", "ckpt-00000002.rejected", "run.json"]
    assert f"moved {out}/ckpt-00000002 aside to {out}/ckpt-00000002.rejected" in logged
    make_checkpoint(out, 2, "earlier-run")  # passed over again: the first one set aside stays
    assert checkpoint.find_checkpoint(str(out), log, set_aside=True) == str(out / "ckpt-00000001")
    assert sorted(os.listdir(out)) == ["ckpt-00000001", "ckpt-00000002.rejected", "ckpt-00000002.rejected2",
                                       "run.json"]


# ----------------------------------------------------------------------------- damaged checkpoints


def truncate(ckpt):
    with open(ckpt / "model.pt", "r+b") as f:
        f.truncate(os.path.getsize(ckpt / "model.pt") // 2)


def empty(ckpt):
    open(ckpt / "model.pt", "wb").close()


def flip(ckpt):
    flip_bytes_inside_a_tensor(ckpt / "model.pt")


def from_another_run(ckpt):
    shutil.rmtree(ckpt)
    make_checkpoint(ckpt.parent, 3, "another-run")


def renamed_from_another_step(ckpt):
    shutil.rmtree(ckpt)
    os.rename(make_checkpoint(ckpt.parent, 7, "this-run"), ckpt)


def without_manifest(ckpt):
    os.remove(ckpt / "manifest.json")


@pytest.mark.parametrize("damage, problem", [
    (truncate, "bytes instead of 6"),  # model.pt holds about 65 KiB
    (empty, "model.pt has 0 bytes instead of"),
    (flip, "model.pt does not match its sha256 (corrupted)"),
    (from_another_run, "it was written by another run than the one run.json records"),
    (renamed_from_another_step, "its manifest.json is for step 7 (a foreign directory)"),
    (without_manifest, "its manifest.json is missing or unreadable"),
])
def test_a_damaged_or_foreign_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, damage, problem):
    out = tmp_path / "out"
    for step in (1, 2, 3):
        make_checkpoint(out, step, "this-run", n=2**14)
    record_run(out, "this-run")
    damage(out / "ckpt-00000003")
    logged, log = messages()
    assert checkpoint.find_checkpoint(str(out), log) == str(out / "ckpt-00000002")
    assert logged[0].startswith(f"checkpoint {out}/ckpt-00000003 cannot be used: ")
    assert problem in logged[0], logged[0]
    assert logged[1] == f"using the previous intact checkpoint, {out}/ckpt-00000002"
    if damage in (truncate, empty, flip):  # named directly, as --init_from does: no fallback
        with pytest.raises(OptionError, match="ckpt-00000003 is not a train_sft.py checkpoint, or not an intact"):
            checkpoint.find_checkpoint(str(out / "ckpt-00000003"))


def test_no_intact_checkpoint_finds_none(tmp_path):
    out = tmp_path / "out"
    for step in (1, 2):
        flip(make_checkpoint(out, step, "this-run"))
    logged, log = messages()
    assert checkpoint.find_checkpoint(str(out), log) is None and len(logged) == 2


# ----------------------------------------------------------------------------- the output directory


def test_leftovers_of_a_crash_are_removed_or_restored(tmp_path):
    out = tmp_path / "out"
    make_checkpoint(out, 5, "r").rename(out / "ckpt-00000005.tmp")       # unfinished: removed
    make_checkpoint(out, 6, "r").rename(out / "ckpt-00000006.old")       # its replacement never came: restored
    make_checkpoint(out, 6, "r").rename(out / "ckpt-00000006.tmp")
    make_checkpoint(out, 7, "r").rename(out / "ckpt-00000007.old")       # replaced: removed
    make_checkpoint(out, 7, "r")
    for name in ("ckpt-best.tmp", "notes.old"):                         # not ours
        (out / name).mkdir()
    logged, log = messages()
    checkpoint.remove_leftovers(str(out), log)
    assert sorted(os.listdir(out)) == ["ckpt-00000006", "ckpt-00000007", "ckpt-best.tmp", "notes.old"]
    assert checkpoint.checkpoint_problem(str(out / "ckpt-00000006")) is None and len(logged) == 4


def test_a_new_run_replaces_an_earlier_runs_output_only_when_told(tmp_path):
    out = tmp_path / "out"
    make_checkpoint(out, 25, "earlier-run")
    make_checkpoint(out, 30, "earlier-run")
    (out / "hf").mkdir()
    for name in ("metrics.jsonl", "run.json", "nonfinite-step-00000003-rank0.json", "ckpt-best.pt", "notes.txt"):
        (out / name).write_text("{}")
    with pytest.raises(OptionError, match=r"holds an earlier run's output \(ckpt-00000025, ckpt-00000030\): "
                                          r"continue that run with --resume or replace it with --overwrite"):
        checkpoint.make_room_for_new_run(str(out), False, print)
    logged, log = messages()
    checkpoint.make_room_for_new_run(str(out), True, log)
    assert sorted(os.listdir(out)) == ["ckpt-best.pt", "notes.txt"]
    assert ("removed the earlier run's ckpt-00000025, ckpt-00000030, hf, metrics.jsonl, "
            "nonfinite-step-00000003-rank0.json") in logged[0]
    (out / "metrics.jsonl").write_text("{}")  # a run killed before its first checkpoint
    with pytest.raises(OptionError, match=r"\(metrics.jsonl and no checkpoint\): replace it with --overwrite"):
        checkpoint.make_room_for_new_run(str(out), False, print)


def test_the_trainer_refuses_an_earlier_runs_output_and_contradicting_options(tmp_path):
    out = tmp_path / "out"
    make_checkpoint(out, 30, "earlier-run")
    proc = train_here([f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"train_sft.py: error: --output_dir={out} holds an earlier run's output "
                                   f"(ckpt-00000030): continue that run with --resume or replace it with "
                                   f"--overwrite_output_dir")
    assert sorted(os.listdir(out)) == ["ckpt-00000030", "run.lock"]
    with pytest.raises(OptionError, match="give either --resume .* or --overwrite_output_dir .*, not both"):
        checkpoint.claim_output_dir(str(out), True, True, rank=0, world=1, log=print)


def test_a_live_run_locks_its_output_dir_and_a_killed_one_leaves_no_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time, checkpoint\nlock = checkpoint.lock_output_dir(sys.argv[1])\n"
                               "print('locked', flush=True)\ntime.sleep(300)", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OptionError, match=rf"is in use by a run that is still going \(pid {holder.pid} on "):
            checkpoint.lock_output_dir(str(out))
        proc = train_here([f"--output_dir={out}"], tmp_path, check=False)  # a second run started while the first goes on
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"--output_dir={out} is in use by a run that is still going" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    checkpoint.lock_output_dir(str(out)).close()  # SIGKILL released it


# ----------------------------------------------------------------------------- a full disk


class FakeEngine:
    """Stands in for an engine: weights of weight_bytes, engine files of engine_bytes."""

    def __init__(self, weight_bytes, engine_bytes, fail=None):
        self.weight_bytes, self.engine_bytes, self.fail = weight_bytes, engine_bytes, fail

    def full_state_dict(self):
        return {"w": torch.ones(self.weight_bytes // 4)}

    def checkpoint_bytes(self):
        return self.engine_bytes

    def save(self, ckpt_dir):
        with open(os.path.join(ckpt_dir, "engine.bin"), "wb") as f:
            f.write(os.urandom(self.engine_bytes // 2))
            if self.fail:
                raise self.fail
            f.write(os.urandom(self.engine_bytes - self.engine_bytes // 2))


def save(out, step, engine):
    state = {"step": step, "engine": "native", "run_id": "this-run"}
    return checkpoint.save_checkpoint(str(out), step, engine, state, keep=5, rank=0, world=1)


def assert_only_the_first_checkpoint(out, error, *phrases):
    assert all(phrase in str(error.value) for phrase in phrases), str(error.value)
    assert "ckpt-00000001" in os.listdir(out) and not any(n.endswith(".tmp") for n in os.listdir(out))
    assert checkpoint.checkpoint_problem(str(out / "ckpt-00000001")) is None


def mounted_tmpfs(size):
    """A tmpfs of this size (needs the right to mount: root), outside pytest's temporary directories,
    which a concurrent pytest may clean up; skips where it cannot be had. Unmounted when done."""
    disk = tempfile.mkdtemp(prefix="small-disk-")
    if not shutil.which("mount") or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", disk],
                                                   capture_output=True).returncode:
        os.rmdir(disk)
        pytest.skip("cannot mount a small tmpfs here (the simulated full disk test still runs)")
    yield pathlib.Path(disk)
    subprocess.run(["umount", "-l", disk])
    os.rmdir(disk)


@pytest.fixture
def small_disk():
    yield from mounted_tmpfs("1m")


def test_a_checkpoint_that_does_not_fit_on_a_small_filesystem(small_disk):
    out = small_disk / "out"
    out.mkdir()
    save(out, 1, FakeEngine(100_000, 100_000))
    # The estimate (the previous checkpoint's size) fits, then the serializer hits the end of the disk.
    with pytest.raises(CheckpointError) as error:
        save(out, 2, FakeEngine(2_000_000, 100_000))
    assert_only_the_first_checkpoint(out, error, f"checkpoint step 2 could not be written to {out}: the disk is full",
                                     "keeps its earlier checkpoints")
    # Not even the previous checkpoint's size is free: stopped before writing anything.
    (small_disk / "filler").write_bytes(os.urandom(shutil.disk_usage(small_disk).free - 100_000))
    with pytest.raises(CheckpointError) as error:
        save(out, 3, FakeEngine(100_000, 100_000))
    assert_only_the_first_checkpoint(out, error, f"checkpoint step 3 needs about 0.2 MiB in {out} but only")


def test_a_checkpoint_that_does_not_fit_simulated(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    save(out, 1, FakeEngine(100_000, 100_000))
    with pytest.raises(CheckpointError) as error:
        save(out, 2, FakeEngine(100_000, 100_000, fail=OSError(errno.ENOSPC, "No space left on device")))
    assert_only_the_first_checkpoint(out, error, f"checkpoint step 2 could not be written to {out}: the disk is full")
    usage = shutil.disk_usage(out)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: usage._replace(free=50_000))
    with pytest.raises(CheckpointError) as error:
        save(out, 3, FakeEngine(100_000, 100_000))
    assert_only_the_first_checkpoint(out, error, f"checkpoint step 3 needs about 0.2 MiB in {out} but only 0.0 MiB")


@pytest.fixture
def disk_for_one_checkpoint():
    yield from mounted_tmpfs("900k")


def test_the_trainer_stops_with_one_sentence_when_the_disk_is_full(tmp_path, data_file, disk_for_one_checkpoint):
    out = disk_for_one_checkpoint / "out"
    proc = train_here([f"--data_path={data_file}", "--max_steps=4", "--checkpoint_interval=1", "--keep_checkpoints=5",
                       f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == train_sft.EXIT_CHECKPOINT_NOT_WRITTEN == 4 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line.partition("train_sft.py: error: ")[2] for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("checkpoint step 2 needs about "), errors  # after the bar
    assert f"MiB in {out} but only " in errors[0]
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt-00000001"]
    assert checkpoint.checkpoint_problem(str(out / "ckpt-00000001")) is None


# Records what save_checkpoint reckons each checkpoint needs (rank 0 reckons it), a line each in $ESTIMATES.
RECORDING_DRIVER = """
import json, os, sys
import checkpoint, train_sft
estimate = checkpoint.checkpoint_bytes_needed
def recorded(*args):
    needed = estimate(*args)
    with open(os.environ["ESTIMATES"], "a") as f:
        f.write(json.dumps(needed) + "\\n")
    return needed
checkpoint.checkpoint_bytes_needed = recorded
train_sft.run_from_command_line(sys.argv[1:])
"""


@pytest.mark.parametrize("args, nproc", [
    pytest.param([], 1, id="native-stage0"),
    pytest.param(["--zero_stage=1", "--lora_dim=4"], 1, id="native-stage1-lora"),
    pytest.param(["--zero_stage=2"], 2, id="native-stage2-2ranks", marks=pytest.mark.slow),
    pytest.param(["--engine=deepspeed", "--zero_stage=3"], 2, id="deepspeed-stage3-2ranks", marks=pytest.mark.slow),
])
def test_the_space_a_first_checkpoint_needs_is_reckoned_from_everything_it_holds(tmp_path, data_file, args, nproc,
                                                                               monkeypatch):
    """Before the first checkpoint there is no earlier one to measure: the estimate counted only the weights
    (a third of what stage 0 writes), so a disk that could not hold the checkpoint let it start."""
    out, estimates, driver = tmp_path / "out", tmp_path / "estimates", tmp_path / "record_estimates.py"
    args = [f"--data_path={data_file}", "--max_steps=1", "--checkpoint_interval=1", f"--output_dir={out}", *args]
    if nproc == 1:  # in this process, recorded as the driver records them
        reckon, recorded = checkpoint.checkpoint_bytes_needed, []
        monkeypatch.setattr(checkpoint, "checkpoint_bytes_needed", lambda *a: recorded.append(reckon(*a)) or recorded[-1])
        train_here(args, tmp_path)
    else:
        driver.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + RECORDING_DRIVER)
        run_trainer(args, tmp_path, nproc=nproc, script=str(driver), env={"ESTIMATES": str(estimates)})
        recorded = [json.loads(line) for line in estimates.read_text().splitlines()]
    estimate = recorded[0]
    written = sum(path.stat().st_size for path in (out / "ckpt-00000001").rglob("*") if path.is_file())
    assert 0.9 * written <= estimate <= 1.1 * written, (estimate, written)


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_resume_passes_over_a_corrupted_latest_checkpoint_and_ends_as_the_uninterrupted_run(tmp_path, data_file):
    out = tmp_path / "out"
    common = [f"--data_path={data_file}", "--max_steps=3", "--checkpoint_interval=1", "--keep_checkpoints=5",
              f"--output_dir={out}"]
    assert train_here(common, tmp_path, check=False).returncode == 0
    uninterrupted = torch.load(out / "ckpt-00000003" / "model.pt", weights_only=True)
    flip_bytes_inside_a_tensor(out / "ckpt-00000003" / "zero_lite-stage0.pt")
    os.mkdir(out / "ckpt-best")
    proc = train_here(common + ["--resume", "--keep_checkpoints=2"], tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (f"checkpoint {out}/ckpt-00000003 cannot be used: zero_lite-stage0.pt does not match its sha256 "
            f"(corrupted)") in proc.stdout
    assert f"resumed from {out}/ckpt-00000002 at step 2" in proc.stdout
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == [
        "ckpt-00000002", "ckpt-00000003", "ckpt-00000003.rejected", "ckpt-best"]
    resumed = torch.load(out / "ckpt-00000003" / "model.pt", weights_only=True)
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


# ----------------------------------------------------------------------------- resuming on other data


@pytest.mark.parametrize("edit", ["one_row", "reorder"])
def test_resume_on_changed_data_stops_naming_the_file_and_the_option(tmp_path, edit):
    """The same number of rows used to pass: only the sample count was compared."""
    data_file = write_reverse_pairs(tmp_path / "train.jsonl", 120)
    out = tmp_path / "out"
    train_here([f"--data_path={data_file}", "--max_steps=2", f"--output_dir={out}"], tmp_path)
    rows = open(data_file).read().splitlines(keepends=True)
    rows = rows[::-1] if edit == "reorder" else [rows[0].replace("reverse", "flip")] + rows[1:]
    open(data_file, "w").writelines(rows)
    proc = train_here(["--resume", "--max_steps=4", f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "train_sft.py: error: " + (
        f"--resume: training file {data_file} changed since {out}/ckpt-00000002 was written (its sha256 differs): "
        f"give --resume_data_changed=continue to go on from the same position in it, or "
        f"--resume_data_changed=restart_epoch to start epoch 0 over on it")
    assert sorted(n for n in os.listdir(out) if n.startswith("ckpt")) == ["ckpt-00000002"]


@pytest.mark.parametrize("choice, logged", [("continue", "goes on from the same position"),
                                            ("restart_epoch", "starts epoch 0 over")])
def test_resume_on_changed_data_goes_on_when_told(tmp_path, choice, logged):
    data_file = write_reverse_pairs(tmp_path / "train.jsonl", 120)
    out = tmp_path / "out"
    train_here([f"--data_path={data_file}", "--max_steps=2", f"--output_dir={out}"], tmp_path)
    rows = open(data_file).read().splitlines(keepends=True)
    open(data_file, "w").writelines(rows[::-1] + (rows[:7] if choice == "restart_epoch" else []))
    log = train_here(["--resume", "--max_steps=4", f"--resume_data_changed={choice}", f"--output_dir={out}"],
                     tmp_path).stdout
    assert f"--resume_data_changed={choice}: training file {data_file} changed since {out}/ckpt-00000002" in log
    assert logged in log and f"resumed from {out}/ckpt-00000002 at step 2" in log
    assert (out / "ckpt-00000004").is_dir()
    # the next resume compares against the data the run now trains on, and does not inherit the choice
    state = torch.load(out / "ckpt-00000004" / "trainer.pt", weights_only=True)
    assert state["data"]["train"] == [[data_file, checkpoint.sha256_of(data_file)]]
    open(data_file, "a").write(rows[0])
    proc = train_here(["--resume", "--max_steps=6", f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2
    assert f"error: --resume: training file {data_file} changed since {out}/ckpt-00000004" in proc.stderr


def test_resume_without_a_checkpoint_names_overwrite_output_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    cfg = {"resume": True, "output_dir": str(out)}
    with pytest.raises(OptionError) as error:
        checkpoint.starting_checkpoint(cfg, set(), print, True, 1)
    assert str(error.value) == (
        f"--resume: no intact ckpt-<step> checkpoint of the run in --output_dir={out}; start the run anew "
        f"without --resume, with --overwrite_output_dir to replace what it holds")


def test_rotation_keeps_only_the_newest_rejected_checkpoints(tmp_path):
    """Every resume that passed over a damaged checkpoint left a .rejected directory, forever."""
    out = tmp_path / "out"
    for step in (1, 2, 3):
        make_checkpoint(out, step, "this-run")
    for name in ("ckpt-00000004.rejected", "ckpt-00000005.rejected", "ckpt-00000005.rejected2",
                 "ckpt-00000006.rejected"):
        (out / name).mkdir()
    checkpoint.remove_old_checkpoints(str(out), 2, "this-run")
    assert sorted(os.listdir(out)) == ["ckpt-00000002", "ckpt-00000003", "ckpt-00000005.rejected2",
                                       "ckpt-00000006.rejected"]


# ----------------------------------------------------------------------------- how a run ended, for a scheduler


def test_run_json_records_how_the_run_ended(tmp_path, data_file):
    out = tmp_path / "out"
    proc = train_here([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={out}"], tmp_path)
    record = json.loads((out / "run.json").read_text())
    assert record["exit_code"] == 0 and record["reason"] == "done" and len(record["run_id"]) == 32
    proc = train_here([f"--data_path={tmp_path}/none.jsonl", f"--output_dir={tmp_path}/new"], tmp_path, check=False)
    assert proc.returncode == 2
    refused = json.loads((tmp_path / "new" / "run.json").read_text())  # the run id is recorded when the run opens
    assert refused == {"run_id": refused["run_id"], "exit_code": 2,
                       "reason": f"error: data file '{tmp_path}/none.jsonl' not found"} and len(refused["run_id"]) == 32
    assert proc.stderr.strip().splitlines()[-1] == f"train_sft.py: error: data file '{tmp_path}/none.jsonl' not found"
    # a run refused because another holds the directory leaves that run's record alone (a process of its own:
    # the record's writer is the process that holds the lock)
    lock = checkpoint.lock_output_dir(str(out))
    try:
        proc = run_trainer([f"--data_path={data_file}", "--resume", f"--output_dir={out}"], tmp_path, check=False)
    finally:
        lock.close()
    assert proc.returncode == 2 and json.loads((out / "run.json").read_text()) == record


@pytest.mark.slow
def test_under_torchrun_a_full_disk_is_one_sentence_and_exit_4_in_run_json(tmp_path, data_file,
                                                                          disk_for_one_checkpoint):
    """torchrun's own exit status is 1 for any failed rank (it printed a ChildFailedError with a pointer to
    its documentation, and each rank its own copy of the sentence): run.json keeps the 4."""
    out = disk_for_one_checkpoint / "out"
    proc = run_trainer([f"--data_path={data_file}", "--max_steps=4", "--checkpoint_interval=1", "--keep_checkpoints=5",
                        f"--output_dir={out}"], tmp_path, nproc=2, check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    record = json.loads((out / "run.json").read_text())
    assert record["exit_code"] == 4 and record["reason"].startswith("error: checkpoint step 2 needs about ")
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train_sft.py: error: ")]
    assert lines == [f"train_sft.py: {record['reason']}"], proc.stderr[-3000:]
    assert f"traceback : train_sft.py: {record['reason']}" in proc.stderr  # torchrun's summary shows it
    assert "To enable traceback see" not in proc.stderr and 'train_sft.py", line' not in proc.stderr


def test_a_checkpoint_config_that_wrote_0_for_default_sizes_builds_the_same_model():
    """Older checkpoints stored n_kv_head, head_dim and intermediate_size as 0 ("the default"); GPTConfig
    resolves them once, so such a checkpoint loads to the model it was saved from, equal config and all."""
    resolved = GPTConfig(block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    assert (resolved.n_kv_head, resolved.head_dim, resolved.intermediate_size) == (2, 8, 64)
    saved = {**vars(resolved), "n_kv_head": 0, "head_dim": 0, "intermediate_size": 0}
    original = GPT(resolved).eval()
    run_choices = {"dropout": 0.0, "attn_window": 0, "gradient_checkpointing": False, "lora_dim": 0}
    loaded = checkpoint.build_model(run_choices, None, {"model_config": saved, "model": original.state_dict()})
    assert loaded.config == resolved
    idx = torch.randint(0, 32, (2, 8))
    assert torch.equal(loaded.eval()(idx), original(idx))


@pytest.mark.parametrize("family, sizes, refused", [
    ("gpt2", dict(intermediate_size=48), "intermediate_size=48"),  # GPT-2's config.json keeps 4 * n_embd
    ("gpt2", dict(n_kv_head=1), "n_kv_head=1"),  # and has no grouped-query attention
    ("gpt2", dict(head_dim=4), "head_dim=4"),  # nor a head size other than n_embd // n_head
    ("llama", dict(head_dim=4, n_kv_head=1, intermediate_size=48), None),  # the Llama family says all three
])
def test_the_export_refuses_sizes_the_family_cannot_write(tmp_path, family, sizes, refused):
    model = GPT(family_config(family, block_size=8, vocab_size=32, n_layer=1, n_head=2, n_embd=16, **sizes))
    if refused is None:
        model.save_pretrained(tmp_path)
        assert GPT.from_pretrained(tmp_path).config == model.config
        return
    with pytest.raises(ValueError, match=f"{refused} cannot be written as a Hugging Face {family} model"):
        model.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())


def test_leftovers_of_an_interrupted_export_are_removed_or_restored(tmp_path):
    """hf.tmp/ (an export stopped before its rename) is removed; hf.old/ (the previous export, moved aside for
    its replacement) comes back when the replacement never arrived, and is removed when it did."""
    out = tmp_path / "out"
    (out / "hf.tmp").mkdir(parents=True)
    (out / "hf.old").mkdir()
    (out / "hf.old" / "config.json").write_text("{}")
    logged, log = messages()
    checkpoint.remove_leftovers(str(out), log)
    assert sorted(os.listdir(out)) == ["hf"] and (out / "hf" / "config.json").exists() and len(logged) == 2
    (out / "hf.old").mkdir()
    checkpoint.remove_leftovers(str(out), log)
    assert sorted(os.listdir(out)) == ["hf"] and (out / "hf" / "config.json").exists() and len(logged) == 3


def test_an_export_that_does_not_fit_on_a_small_filesystem_is_one_sentence_and_leaves_nothing(small_disk):
    """The export wrote into hf/ directly: a full disk left a partial hf/ and a traceback."""
    from model import GPT, GPTConfig
    from options import parse_options
    model = GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=2, n_head=2, n_embd=128))  # 1.6 MB of weights
    out = small_disk / "out"
    out.mkdir()
    with pytest.raises(CheckpointError) as error:
        checkpoint.export_hf(model.state_dict(), vars(model.config), parse_options(["--tokenizer=byte"])[0], str(out))
    assert str(error.value).startswith(f"the Hugging Face export could not be written to {out / 'hf'}: the disk is "
                                       f"full (")
    assert str(error.value).endswith("; the run's final checkpoint holds the model, and --resume exports it again")
    assert os.listdir(out) == []


def test_on_a_full_disk_run_json_still_gets_the_outcome_and_no_temporary_file(tmp_path, monkeypatch):
    """Under torchrun a disk filled by another process left run.json without an exit code and an empty
    run.json.tmp: the atomic write cannot get a block, so the record is rewritten in the one it holds."""
    out = tmp_path / "out"
    out.mkdir()
    lock = checkpoint.lock_output_dir(str(out))
    checkpoint.write_run_record(str(out), "this-run")

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)  # creating an empty file takes no block
        if str(path).endswith(".tmp") and "w" in mode:
            file.close()
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return file
    monkeypatch.setattr(checkpoint, "open", open_on_a_full_disk, raising=False)
    try:
        assert checkpoint.write_outcome(str(out), 4, "error: the disk is full")
    finally:
        lock.close()
    assert json.loads((out / "run.json").read_text()) == {"run_id": "this-run", "exit_code": 4,
                                                          "reason": "error: the disk is full"}
    assert sorted(os.listdir(out)) == ["run.json", "run.lock"]
