"""Reliability: hostile input gets one sentence (no traceback, no silent loss), interrupted runs keep
their work, non-finite results never pass as success. Property-based tests (hypothesis) drive the
data and option parsers with arbitrary input."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import data
import checkpoint
import train_sft
from conftest import ROOT, TINY, run_trainer, train_here, train_losses, write_reverse_pairs
from tokenizer import DEFAULT_TEMPLATE


# ----------------------------------------------------------------------------- hostile data rows


def read_examples(path, skip_bad_rows=False):
    """All of a file's examples and its count of bad rows (iter_examples streams them)."""
    found = {}
    examples = list(data.iter_examples(str(path), skip_bad_rows=skip_bad_rows, log=lambda line: None, found=found))
    return examples, found["bad_rows"]


GOOD = b'{"prompt": "a", "response": "b"}\n'
HOSTILE_ROWS = {
    "deep_nesting": (b'{"prompt": ' + b"[" * 100_000 + b"\n", "nested too deeply"),
    "huge_integer": (b'{"prompt": "a", "response": "b", "n": ' + b"7" * 5000 + b"}\n", "4300 digits"),
    "lone_surrogate": (b'{"prompt": "a\\ud800", "response": "b"}\n', "unpaired surrogate \\ud800"),
    "surrogate_in_response": (b'{"prompt": "a", "response": "b\\udfff"}\n', "unpaired surrogate \\udfff"),
}


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_hostile_rows_are_bad_rows_not_crashes(tmp_path, name):
    row, problem = HOSTILE_ROWS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(GOOD + row + GOOD)
    with pytest.raises(data.DataError) as error:
        read_examples(path)
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
    examples, skipped = read_examples(path, skip_bad_rows=True)
    assert [line for line, _ in examples] == [1, 3] and skipped == 1


@pytest.mark.parametrize("name", ["deep_nesting", "huge_integer"])
def test_hostile_items_of_a_json_list_name_their_line(tmp_path, name):
    row, problem = HOSTILE_ROWS[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(b"[\n" + GOOD[:-1] + b",\n" + row)
    with pytest.raises(data.DataError, match=f"{path}:3: .*{problem}"):
        read_examples(path, skip_bad_rows=True)


def test_a_chat_of_system_messages_only_is_a_bad_row(tmp_path):
    """Found by test_every_row_is_trained_or_reported: it reached the tokenizer with no turn and crashed."""
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"messages": [{"role": "system", "content": "s"}]}\n{"messages": [{"role": "user", '
                     b'"content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    with pytest.raises(data.DataError, match=f"{path}:1: the conversation .* has no assistant turn"):
        read_examples(path)
    assert read_examples(path, skip_bad_rows=True) == ([(2, [("a", "b", True)])], 1)


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path):
    for suffix, text in ((".jsonl", GOOD * 2), (".json", b"[" + GOOD[:-1] + b"]")):
        path = tmp_path / f"bom{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + text)
        examples, skipped = read_examples(path)
        assert skipped == 0 and examples[0] == (1, [("a", "b", True)])


def test_unwritable_cache_dir_names_the_option(tmp_path, data_file):
    """The trainer turns a data error into its one sentence with data_error_sentence."""
    cache_dir = str(tmp_path / "a_file" / "cache")
    (tmp_path / "a_file").write_text("")
    for data_path in (data_file, "demo"):
        with pytest.raises(OSError) as error:
            data.prepare_data(data_path, "byte", 48, cache_dir=cache_dir, log=lambda line: None)
        assert train_sft.data_error_sentence(error.value, cache_dir).startswith(
            f"--cache_dir={cache_dir} cannot be used: Not a directory (")
    missing = FileNotFoundError(f"data file {str(tmp_path / 'nope.jsonl')!r} not found")
    assert train_sft.data_error_sentence(missing, cache_dir) == str(missing)  # not about the cache


# ----------------------------------------------------------------------------- metrics.jsonl


def test_a_torn_last_metrics_line_is_dropped_with_a_notice(tmp_path):
    records = [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "lo')
    notices = []
    metrics = train_sft.MetricsLog(str(tmp_path), False, resumed_step=2, log=notices.append)
    metrics.write({"step": 3, "loss": 0.5})
    assert [json.loads(line) for line in open(path)] == records[:2] + [{"step": 3, "loss": 0.5}]
    assert len(notices) == 1 and "dropped line 4" in notices[0] and "cut short" in notices[0]


# ----------------------------------------------------------------------------- property-based: the data parser

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | st.just("a\ud800"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
texts = st.text(max_size=12) | st.just("") | st.just(" ") | st.just("b\udc80")
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "bot"]),
                                           "content": texts}), max_size=4)
rows = st.one_of(
    st.fixed_dictionaries({"prompt": texts, "response": texts}),
    st.fixed_dictionaries({"prompt": texts | json_values, "chosen": texts}),
    st.fixed_dictionaries({"messages": messages}),
    json_values)
raw_lines = st.binary(max_size=20).map(lambda b: b.replace(b"\n", b""))  # anything at all on one line
hostile_lines = st.sampled_from([b'{"prompt": ' + b"[" * 5000, b'{"prompt": "a", "response": ' + b"9" * 5000 + b"}",
                                 b'{"prompt": "a", "response": "\\ud83d"}'])
lines = st.one_of(rows.map(lambda row: json.dumps(row).encode()), raw_lines, hostile_lines)


def parse(path, skip_bad_rows):
    """read_examples, with any DataError returned rather than raised (anything else propagates)."""
    try:
        return read_examples(path, skip_bad_rows)
    except data.DataError as error:
        return error


def check_loaded(result, path, numbered_rows, skip_bad_rows, is_list):
    """Loaded rows are whole and in place; with skip_bad_rows, rows in = rows loaded + rows reported bad."""
    if isinstance(result, data.DataError):
        assert str(result).startswith(f"{path}:{result.line}: ") and result.line >= 1
        if skip_bad_rows and not is_list:  # only a file with no usable row at all may stop a skipping JSONL read
            assert result.problem in ("no usable rows", "the file is empty")
        return
    examples, skipped = result
    assert {line for line, _ in examples} <= set(numbered_rows)
    for _, turns in examples:
        for prompt, response, _ in turns:  # real text: a lone surrogate would have reached the model as U+FFFD
            prompt.encode("utf-8"), response.encode("utf-8")
    assert len(examples) + skipped == len(numbered_rows)
    assert skipped == 0 or skip_bad_rows


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(file_lines=st.lists(lines | st.just(b"") | st.just(b"  "), max_size=8), skip_bad_rows=st.booleans(),
       bom=st.booleans())
def test_any_jsonl_loads_or_names_file_and_line(tmp_path_factory, file_lines, skip_bad_rows, bom):
    path = tmp_path_factory.mktemp("prop") / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" * bom + b"\n".join(file_lines))
    is_list = b"\n".join(file_lines).lstrip().startswith(b"[")
    numbered_rows = [n for n, line in enumerate(file_lines, 1) if line.strip()]
    check_loaded(parse(str(path), skip_bad_rows), str(path), numbered_rows, skip_bad_rows, is_list)


@settings(max_examples=100, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.lists(rows.map(json.dumps) | hostile_lines.map(bytes.decode), max_size=6), skip_bad_rows=st.booleans())
def test_any_json_list_loads_or_names_file_and_line(tmp_path_factory, items, skip_bad_rows):
    """A JSON list written one item per line: item k sits on line k + 2, and errors must say so. An item
    that does not decode stops the read even with skip_bad_rows: where it ends cannot be known."""
    path = tmp_path_factory.mktemp("prop") / "rows.json"
    path.write_text("[\n" + ",\n".join(items) + "\n]\n")
    result = parse(str(path), skip_bad_rows)
    if isinstance(result, data.DataError) and result.problem != "no usable rows":
        assert 2 <= result.line <= len(items) + 1
    check_loaded(result, str(path), list(range(2, len(items) + 2)), skip_bad_rows, is_list=True)


@settings(max_examples=25, deadline=10000, suppress_health_check=[HealthCheck.too_slow])
@given(file_rows=st.lists(rows, min_size=1, max_size=6), template=st.sampled_from(["{prompt}{response}",
                                                                                     DEFAULT_TEMPLATE]))
@example(file_rows=[{"messages": [{"role": "system", "content": ""}]}, {"prompt": "a", "response": "b"}],
         template=DEFAULT_TEMPLATE)
def test_every_row_is_trained_or_reported(tmp_path_factory, file_rows, template):
    """Through tokenizing and the cache: rows in = rows kept + rows too long + rows reported bad."""
    folder = tmp_path_factory.mktemp("prop")
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in file_rows))
    try:
        train, _ = data.prepare_data(str(path), "byte", 32, data_split="100,0", template=template,
                                     skip_bad_rows=True, cache_dir=str(folder / "cache"), log=lambda line: None)
    except data.DataError as error:  # a first row that is a list makes the file read as a JSON list
        assert str(error).startswith(f"{path}:{error.line}: ")
        assert error.problem == "no usable rows" or path.read_text().startswith("[")
        return
    except ValueError as error:  # every row too long for max_seq_len: said in a sentence
        assert str(error).startswith("no training samples left")
        return
    stats = train.stats
    assert stats["rows"] + stats["bad_rows"] == len(file_rows)
    assert len(train) + stats["dropped_too_long"] == stats["rows"]


# ----------------------------------------------------------------------------- SIGTERM and SIGINT

STEPS = 25  # within the first epoch: 1 rank x 2 and 2 ranks x 1 see the same micro-batches until its tail
LONG_RUN = [f"--max_steps={STEPS}", "--keep_checkpoints=5"]


def interrupt(args, tmp_path, sig, nproc=1, repeat=False):
    """Starts the trainer, sends sig once it has logged step 2 (with repeat, then every 2 ms until it
    exits), and returns (exit code, stdout, stderr)."""
    cmd = [sys.executable, "train_sft.py"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train_sft.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    errors = open(tmp_path / f"stderr-{sig}-{nproc}", "w+")
    proc = subprocess.Popen(cmd + TINY + [f"--cache_dir={tmp_path / 'cache'}"] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=errors, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2 |"):
            proc.send_signal(sig)
            break
    if repeat:
        threading.Thread(target=keep_signalling, args=(proc, sig), daemon=True).start()
    lines += proc.stdout.readlines()
    proc.wait(timeout=120)
    errors.seek(0)
    return proc.returncode, "".join(lines), errors.read()


def keep_signalling(proc, sig):
    while proc.poll() is None:
        proc.send_signal(sig)  # a no-op once the process has been reaped
        time.sleep(0.002)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, data_file):
    """A run that nobody stops: 1 rank x 2 micro-batches per step."""
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    train_here([f"--data_path={data_file}", "--gradient_accumulation_steps=2", f"--output_dir={out}"] + LONG_RUN,
               out.parent)
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
    return train_losses(uninterrupted_run)


def stopped_step(stderr, signame):
    """The step that the one-line stop message names."""
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"train_sft.py: stopped by {signame} after step "), stderr[-2000:]
    return int(last.split("after step ")[1].split(";")[0])


def test_ctrl_c_finishes_the_step_checkpoints_and_resumes_exactly(tmp_path, data_file, uninterrupted):
    """SIGINT and SIGTERM share one handler: Ctrl-C here, SIGTERM under torchrun below."""
    out = tmp_path / "run"
    args = [f"--data_path={data_file}", "--gradient_accumulation_steps=2", f"--output_dir={out}"] + LONG_RUN
    code, stdout, stderr = interrupt(args, tmp_path, signal.SIGINT)
    assert code == 128 + signal.SIGINT and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    step = stopped_step(stderr, "SIGINT")
    assert 2 <= step < STEPS and (out / f"ckpt-{step:08d}").is_dir() and not (out / "hf").exists()
    with open(out / "metrics.jsonl", "a") as f:  # and a kill cut the next record short
        f.write('{"step": %d, "loss": 1.2' % (step + 1))
    log = train_here(["--resume", f"--output_dir={out}"], tmp_path).stdout
    assert f"resumed from {out}/ckpt-{step:08d} at step {step}" in log and "dropped line" in log
    assert train_losses(out) == uninterrupted  # every step, before and after the stop, bit for bit


def test_a_stop_holds_while_the_signal_keeps_coming_until_the_run_exits(tmp_path, data_file):
    """A kill -9 of torchrun reached each rank as several parent-death signals, ms apart; one that came
    after the loop, when the default handler was back, killed the rank before its checkpoint."""
    out = tmp_path / "run"
    args = [f"--data_path={data_file}", f"--output_dir={out}"] + LONG_RUN
    code, stdout, stderr = interrupt(args, tmp_path, signal.SIGTERM, repeat=True)
    assert code == 128 + signal.SIGTERM, stderr[-2000:]
    step = stopped_step(stderr, "SIGTERM")
    assert (out / f"ckpt-{step:08d}").is_dir()
    assert json.loads((out / "run.json").read_text())["exit_code"] == 128 + signal.SIGTERM


def test_a_signal_during_the_final_checkpoint_waits_for_it_then_stops_the_run(tmp_path, data_file, uninterrupted,
                                                                               monkeypatch):
    """The previous handler used to be back before the final checkpoint: a scheduler's SIGTERM during
    that write killed the run and cost every step since the last checkpoint."""
    out = tmp_path / "run"
    args = [f"--data_path={data_file}", "--gradient_accumulation_steps=2", f"--output_dir={out}"] + LONG_RUN

    def signalled_while_writing(run, engine, batches, model, step):
        if step == STEPS:
            os.kill(os.getpid(), signal.SIGTERM)
        checkpoint_now(run, engine, batches, model, step)

    checkpoint_now = train_sft.checkpoint_now
    monkeypatch.setattr(train_sft, "checkpoint_now", signalled_while_writing)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, lambda *_: None)  # not pytest's death, should the trainer let it through
    try:
        proc = train_here(args, tmp_path, check=False)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert f"train_sft.py: stopped by SIGTERM after step {STEPS};" in proc.stderr
    assert proc.returncode == 128 + signal.SIGTERM
    assert (out / f"ckpt-{STEPS:08d}").is_dir() and not (out / "hf").exists()
    monkeypatch.undo()
    train_here(["--resume", f"--output_dir={out}"], tmp_path)  # no step left: it exports
    assert (out / "hf" / "model.safetensors").is_file() and train_losses(out) == uninterrupted


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_one_step(tmp_path, data_file, uninterrupted):
    """torchrun forwards SIGTERM to its workers; they agree on the step through the step's counts."""
    out = tmp_path / "run"
    args = [f"--data_path={data_file}", f"--output_dir={out}"] + LONG_RUN  # 2 ranks x 1 = 1 rank x 2
    code, stdout, stderr = interrupt(args, tmp_path, signal.SIGTERM, nproc=2)
    assert code != 0 and 'train_sft.py", line' not in stderr  # torchrun prints its own SignalException
    messages = [line for line in stderr.splitlines() if "train_sft.py: stopped by SIGTERM" in line]
    assert len(messages) == 1, stderr[-3000:]
    step = stopped_step(messages[0], "SIGTERM")
    assert [p.name for p in out.iterdir() if p.name.startswith("ckpt-")] == [f"ckpt-{step:08d}"]
    run_trainer(["--resume", f"--output_dir={out}"], tmp_path, nproc=2)
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-5 for s in resumed), (resumed, uninterrupted)


# ----------------------------------------------------------------------------- NaN/Inf never passes as success


def with_nan(run_dir, tmp_path, tensor, row):
    """A copy of run_dir's last checkpoint with NaN in one row of one weight (manifest rewritten to match)."""
    broken = tmp_path / "broken"
    shutil.copytree(run_dir / f"ckpt-{STEPS:08d}", broken)
    weights = torch.load(broken / "model.pt", weights_only=True)
    weights[tensor][row] = float("nan")
    torch.save(weights, broken / "model.pt")
    checkpoint.write_manifest(broken, json.loads((broken / "manifest.json").read_text()))
    return broken


def test_max_nonfinite_steps_stops_with_a_sentence_and_lists_the_batches(tmp_path, data_file, uninterrupted_run):
    """In this process, to save a start-up: what train_sft.py exits with and prints."""
    broken = with_nan(uninterrupted_run, tmp_path, "transformer.ln_f.weight", 0)
    out = tmp_path / "nan"
    proc = train_here([f"--init_from={broken}", f"--data_path={data_file}", "--max_steps=10", "--max_nonfinite_steps=2",
                       f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == train_sft.EXIT_NONFINITE
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "train_sft.py: error: NaN/Inf loss or gradient for 2 steps in a row at step 1: stopping")
    assert sorted(p.name for p in out.iterdir() if p.name not in ("metrics.jsonl", "run.lock")) == [
        "nonfinite-step-00000000-rank0.json", "nonfinite-step-00000001-rank0.json", "run.json"]  # no checkpoint, no export
    listed = json.loads((out / "nonfinite-step-00000001-rank0.json").read_text())
    assert [(b["epoch"], b["micro_batch"], len(b["rows"])) for b in listed["micro_batches"]] == [(0, 1, 4)]
    assert all(len(row) == 1 and 0 <= row[0] < 240 for row in listed["micro_batches"][0]["rows"])


@pytest.mark.parametrize("tensor, row, what, stage", [
    ("transformer.ln_f.weight", 0, "loss", 0),  # every step NaN, but fewer than max_nonfinite_steps of them
    ("transformer.wpe.weight", -1, "weight", 0),  # a position no sample reaches: the loss stays finite
    ("transformer.wpe.weight", -1, "weight", 3),  # ZeRO-3 holds no whole weight outside a forward
])
def test_a_run_that_ends_non_finite_exits_non_zero_and_exports_nothing(tmp_path, data_file, uninterrupted_run,
                                                                         tensor, row, what, stage):
    broken = with_nan(uninterrupted_run, tmp_path, tensor, row)
    out = tmp_path / "nan"
    proc = train_here([f"--init_from={broken}", f"--data_path={data_file}", "--max_steps=2", "--max_nonfinite_steps=5",
                       f"--zero_stage={stage}", f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == train_sft.EXIT_NONFINITE
    assert proc.stderr.strip().splitlines()[-1].startswith(
        f"train_sft.py: error: the run ended at step 2 with a NaN/Inf {what}: neither its checkpoint nor its export")
    assert not (out / "hf").exists() and not any(p.name.startswith("ckpt-") for p in out.iterdir())


# ----------------------------------------------------------------------------- resuming on more ranks


@pytest.mark.slow
def test_resume_on_ranks_that_cannot_share_the_position_is_one_sentence(tmp_path, uninterrupted_run):
    """A checkpoint at an odd global micro-batch cannot resume on 2 ranks: it said so in a raw ValueError."""
    out = tmp_path / "run"
    ckpt = out / f"ckpt-{STEPS:08d}"
    shutil.copytree(uninterrupted_run / ckpt.name, ckpt)
    state = torch.load(ckpt / "trainer.pt", weights_only=True)
    state["batches"]["position"] = 2 * STEPS - 1
    torch.save(state, ckpt / "trainer.pt")
    checkpoint.write_manifest(ckpt, json.loads((ckpt / "manifest.json").read_text()))
    proc = run_trainer(["--resume", f"--max_steps={STEPS + 2}", f"--output_dir={out}"], tmp_path, nproc=2, check=False)
    assert proc.returncode != 0 and 'train_sft.py", line' not in proc.stderr
    assert (f"train_sft.py: error: cannot resume from {out}/ckpt-{STEPS:08d}: it stopped after {2 * STEPS - 1} "
            f"micro-batches of epoch 0, which 2 ranks cannot share evenly") in proc.stderr


# ----------------------------------------------------------------------------- resuming on fewer ranks keeps the batch


@pytest.mark.slow
def test_a_two_rank_stage2_checkpoint_resumed_on_one_rank_continues_the_same_run(tmp_path, engine_sweep):
    """It went on with 1 x 1 x 4 samples per step instead of 2 x 1 x 4, silently: another run."""
    out = tmp_path / "run"  # the sweep's 2-rank stage-2 run, as if stopped after step 10
    shutil.copytree(engine_sweep("native", 2) / "ckpt-00000010", out / "ckpt-00000010")
    shutil.copy(engine_sweep("native", 2) / "metrics.jsonl", out)
    uninterrupted = train_losses(engine_sweep("native", 2))
    proc = train_here(["--resume", "--batch_size=8", f"--output_dir={out}"], tmp_path)  # the sweep's batch size
    assert ("--resume on 1 rank(s) instead of 2: --gradient_accumulation_steps=6 keeps the checkpoint's 48 samples "
            "per step (2 ranks x 3 x 8)") in proc.stdout
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, 21))
    assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-5 for s in resumed), (resumed, uninterrupted)


def resumed_options(world, explicit=(), **options):
    """The options a resume on world ranks would train with, from a checkpoint of 2 ranks x 3 x 4."""
    cfg = {"gradient_accumulation_steps": 3, "batch_size": 4, **options}
    saved = {"world_size": 2, "options": {"gradient_accumulation_steps": 3, "batch_size": 4},
             "path": "out/ckpt-00000006"}
    logged = []
    checkpoint.keep_global_batch(cfg, set(explicit), saved, world, logged.append)
    return cfg, logged


def test_a_world_size_change_keeps_the_global_batch_or_says_why_not():
    assert resumed_options(3) == ({"gradient_accumulation_steps": 2, "batch_size": 4}, [
        "--resume on 3 rank(s) instead of 2: --gradient_accumulation_steps=2 keeps the checkpoint's 24 samples per "
        "step (2 ranks x 3 x 4)"])
    assert resumed_options(2) == ({"gradient_accumulation_steps": 3, "batch_size": 4}, [])
    with pytest.raises(checkpoint.OptionError) as error:
        resumed_options(4)
    assert str(error.value) == (
        "--resume on 4 rank(s) cannot keep out/ckpt-00000006's 24 samples per step (2 ranks x 3 x 4): 24 is not a "
        "multiple of 4 ranks x --batch_size=4; resume on 1, 2, 3 or 6 ranks, or give --gradient_accumulation_steps "
        "to change the batch")
    cfg, logged = resumed_options(4, explicit=["gradient_accumulation_steps"], gradient_accumulation_steps=1)
    assert cfg["gradient_accumulation_steps"] == 1 and logged == [
        "--gradient_accumulation_steps=1 changes the batch: 16 samples per step (4 ranks x 1 x 4) instead of "
        "out/ckpt-00000006's 24 (2 ranks x 3 x 4)"]


# ----------------------------------------------------------------------------- data paths that are not files


def test_a_data_path_that_is_not_a_readable_file_says_what_it_is(tmp_path):
    """A FIFO, a symlink loop and a non-numeric weight all said "not found", which sends one looking elsewhere."""
    fifo, loop, data_file = tmp_path / "rows.jsonl", tmp_path / "loop.jsonl", tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    os.symlink(loop, loop)
    write_reverse_pairs(data_file, 4)
    cases = {
        str(fifo): f"--data_path: {fifo} is a FIFO (named pipe), not a regular file",
        str(loop): f"--data_path: {loop} is a symbolic link that loops back on itself",
        f"{data_file}:abc": f"--data_path: in {data_file}:abc, 'abc' is not a weight (FILE:WEIGHT takes a positive "
                            f"number, as in {data_file}:2)",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError) as error:
            data.check_data_files(f"{data_file},{spec}", "data_path")
        assert str(error.value) == message
    data.check_data_files(f"{data_file}:2, {data_file}", "data_path")  # fine: nothing raised
    data.check_data_files(str(tmp_path / "absent.jsonl"), "eval_data_path")  # data.py names what is missing


# ----------------------------------------------------------------------------- no orphaned ranks


def children_of(pid):
    """The ids of the processes whose parent is pid (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[1]) == pid:
            found.append(int(entry))
    return found


def running(pid):
    """Whether pid is a live process (a zombie waiting for its reaper is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_kill_9_of_torchrun_stops_every_rank_with_a_checkpoint(tmp_path, data_file, uninterrupted):
    """Each rank runs in a session of its own: they trained to the end, holding run.lock, after torchrun died."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_sft.py", *TINY,
           f"--cache_dir={tmp_path / 'cache'}", f"--data_path={data_file}", f"--output_dir={out}", *LONG_RUN]
    errors = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=errors, text=True, start_new_session=True)
    for line in proc.stdout:
        if line.startswith("step 2 |"):
            break
    ranks = children_of(proc.pid)
    assert len(ranks) == 2
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 60
    while any(running(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(running(pid) for pid in ranks)
    errors.seek(0)
    stderr = errors.read()
    step = stopped_step(stderr, "SIGTERM")
    assert 2 <= step < STEPS and sorted(p.name for p in out.glob("ckpt-*")) == [f"ckpt-{step:08d}"]
    assert json.loads((out / "run.json").read_text())["exit_code"] == 128 + signal.SIGTERM
    run_trainer(["--resume", f"--output_dir={out}"], tmp_path, nproc=2)  # the lock is free
    resumed = train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    assert all(abs(resumed[s] - uninterrupted[s]) <= 1e-5 for s in resumed), (resumed, uninterrupted)


# ----------------------------------------------------------------------------- a full disk, a crash, one config run


def outcome_of(args, tmp_path):
    """train_sft.outcome in this process on the tiny model: (exit status, sentence), run.json written."""
    return train_sft.outcome(TINY + [f"--cache_dir={tmp_path / 'cache'}"] + args)


class FullDiskWriter:
    """A file opened for writing on a disk that another process has just filled: half of the first write
    lands (a torn line), then ENOSPC, as a real write that meets the end of the disk does."""

    def __init__(self, file):
        self.file = file

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()

    def write(self, text):
        self.file.write(text[:len(text) // 2])
        self.file.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_appending_metrics_stops_with_a_checkpoint_and_resumes_exactly(
        tmp_path, data_file, uninterrupted_run, uninterrupted, monkeypatch):
    """The disk fills at step 4's metrics record, before any checkpoint: the run stops after the next step
    with a checkpoint (it used to die with a traceback and lose every step), exit 4, no torn line."""
    metrics_module = sys.modules[train_sft.MetricsLog.__module__]
    appends = []

    def open_on_a_disk_that_fills(path, mode="r", *args, **kwargs):
        file = open(path, mode, *args, **kwargs)
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            appends.append(path)
            return FullDiskWriter(file) if len(appends) >= 4 else file
        return file
    monkeypatch.setattr(metrics_module, "open", open_on_a_disk_that_fills, raising=False)
    out = tmp_path / "run"
    args = [f"--data_path={data_file}", "--gradient_accumulation_steps=2", f"--output_dir={out}"] + LONG_RUN
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as train_here: losses bit for bit those of the uninterrupted run
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    try:
        code, sentence = outcome_of(args, tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert code == train_sft.EXIT_CHECKPOINT_NOT_WRITTEN == 4
    assert sentence == (f"error: {out}/metrics.jsonl could not be written: the disk is full; the run stopped after "
                        f"step 5 with its checkpoint in {out}: continue with --resume once there is space")
    assert json.loads((out / "run.json").read_text())["exit_code"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt")) == ["ckpt-00000005"]
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3]
    monkeypatch.undo()
    train_here(["--resume", f"--output_dir={out}"], tmp_path)
    assert train_losses(out) == {s: loss for s, loss in uninterrupted.items() if s not in (4, 5)}
    weights, reference = (load_file(run / "hf" / "model.safetensors") for run in (out, uninterrupted_run))
    assert weights.keys() == reference.keys() and all(torch.equal(weights[k], reference[k]) for k in weights)


def test_resume_to_fewer_steps_than_the_checkpoint_is_refused(tmp_path, uninterrupted_run):
    """It used to say "done" and export the checkpoint's 25-step model for --max_steps=20."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted_run, out)
    exported = (out / "hf" / "model.safetensors").read_bytes()
    code, sentence = outcome_of(["--resume", "--max_steps=20", f"--output_dir={out}"], tmp_path)
    assert (code, sentence) == (2, f"error: --resume to 20 steps (--max_steps / --num_train_epochs), but "
                                   f"{out}/ckpt-00000025 has already taken 25: give at least --max_steps=25, or use "
                                   f"that checkpoint as it is (sample.py --model, --init_from)")
    assert json.loads((out / "run.json").read_text())["exit_code"] == 2
    assert (out / "hf" / "model.safetensors").read_bytes() == exported


def test_a_crash_and_a_full_cache_disk_are_recorded_in_run_json(tmp_path, data_file, monkeypatch):
    """run.json holds the outcome of a run that dies before its first checkpoint: a bug (exit 1, raised on)
    or a full disk while writing the data cache (exit 4, one sentence; it used to be exit 2, bad input)."""
    out = tmp_path / "run"
    monkeypatch.setattr(train_sft, "count_steps", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        outcome_of([f"--data_path={data_file}", f"--output_dir={out}"], tmp_path)
    record = json.loads((out / "run.json").read_text())
    assert record["exit_code"] == 1 and record["reason"] == "crashed: RuntimeError: boom" and len(record["run_id"]) == 32
    cache_file = str(tmp_path / "cache" / "tokens.bin")
    monkeypatch.setattr(train_sft, "prepare_data", lambda *args, **kwargs: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device", cache_file)))
    code, sentence = outcome_of([f"--data_path={data_file}", f"--output_dir={out}", "--overwrite_output_dir"], tmp_path)
    assert (code, sentence) == (4, f"error: {cache_file} could not be written: the disk is full; the run stops "
                                   f"before training")
    assert json.loads((out / "run.json").read_text())["exit_code"] == 4


CONFIG_RUN_ONCE = """
import os as _os, time as _time
with open(_os.environ["CONFIG_RUNS"], "a") as _runs:
    _runs.write("run\\n")
output_dir = _os.path.join(_os.environ["CONFIG_OUT"], f"run-{_time.time_ns()}")
"""


def exit_status_of(argv):
    """The exit status of train_sft.py's command line, run in this process (torchrun's error handler,
    which wraps it, returns on exit status 0)."""
    try:
        train_sft.run_from_command_line(argv)
    except SystemExit as exit_status:
        return exit_status.code
    return 0


def test_a_config_file_runs_once_and_its_outcome_reaches_run_json(tmp_path, data_file, monkeypatch, capsys):
    """report_outcome used to parse the options again: a time-based output_dir got no outcome, and a config
    raising KeyboardInterrupt (Ctrl-C while it runs) gave a traceback instead of one line and 130."""
    config, runs = tmp_path / "config.py", tmp_path / "runs.txt"
    config.write_text(CONFIG_RUN_ONCE)
    monkeypatch.setenv("CONFIG_RUNS", str(runs))
    monkeypatch.setenv("CONFIG_OUT", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the run leaves this process's thread count alone
    assert exit_status_of([str(config), *TINY, f"--cache_dir={tmp_path / 'cache'}", f"--data_path={data_file}",
                           "--max_steps=1", "--eval_exact_match=0"]) == 0
    assert runs.read_text() == "run\n"
    [record] = [json.loads(path.read_text()) for path in tmp_path.glob("run-*/run.json")]
    assert record["exit_code"] == 0 and record["reason"] == "done"
    config.write_text("raise KeyboardInterrupt\n")
    capsys.readouterr()
    assert exit_status_of([str(config)]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "train_sft.py: interrupted; the latest checkpoint in output_dir, if any, holds the run's work"]


# ----------------------------------------------------------------------------- DeepSpeed on another number of ranks


def test_a_deepspeed_zero_checkpoint_resumed_on_other_ranks_is_refused_before_any_notice():
    """DeepSpeed's own loader died with ZeRORuntimeException (exit 1) after the trainer had announced that
    it kept the samples per step; now the refusal comes first and names both world sizes and the way out."""
    cfg, saved = {"gradient_accumulation_steps": 3, "batch_size": 4}, {
        "world_size": 2, "engine": "deepspeed", "path": "out/ckpt-00000006",
        "options": {"gradient_accumulation_steps": 3, "batch_size": 4, "zero_stage": 2}}
    logged = []
    with pytest.raises(checkpoint.OptionError) as error:
        checkpoint.keep_global_batch(cfg, set(), saved, 1, logged.append)
    assert logged == [] and str(error.value) == (
        "--resume on 1 rank(s): out/ckpt-00000006 was written by DeepSpeed's ZeRO-2 on 2 rank(s), and DeepSpeed "
        "cannot re-partition that optimizer state; resume on 2 rank(s), or start a new run from its weights with "
        "--init_from=out/ckpt-00000006 (the optimizer state starts anew)")
    checkpoint.keep_global_batch(cfg, set(), saved, 2, logged.append)  # the same world size resumes
    assert logged == [] and cfg["gradient_accumulation_steps"] == 3
