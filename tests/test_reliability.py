"""Reliability: hostile input gets one sentence (no traceback, no silent loss), interrupted runs keep
their work, non-finite results never pass as success. Property-based tests (hypothesis) drive the
data and option parsers with arbitrary input."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import sample
import train_sft
from test_train import ROOT, TINY, run, train_losses


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for _ in range(240):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            f.write(json.dumps({"prompt": f"reverse {word}", "response": word[::-1]}) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- options and config files


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e400"])
def test_non_finite_numbers_are_refused_on_the_command_line(value):
    with pytest.raises(train_sft.OptionError, match=f"--learning_rate must be a finite number, got "):
        train_sft.parse_options([f"--learning_rate={value}"])


@pytest.mark.parametrize("text", ["float('nan')", "float('inf')", "10 ** 400", "-1e999"])
def test_non_finite_numbers_are_refused_in_config_files(tmp_path, text):
    path = tmp_path / "cfg.py"
    path.write_text(f"grad_clip = {text}\n")
    with pytest.raises(train_sft.OptionError, match=f"{path}: --grad_clip must be a finite number"):
        train_sft.parse_options([str(path)])


def test_nan_option_stops_the_trainer_with_exit_2(tmp_path):
    proc = run(["--learning_rate=nan", f"--output_dir={tmp_path}/run"], tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "train_sft.py: error: command line: --learning_rate must be a finite number, got nan"


def test_only_py_files_are_taken_as_config_files(tmp_path, data_file):
    """Anything else given without -- would run as python: a data file set nothing and training went on."""
    with pytest.raises(train_sft.OptionError, match=f"is not a config file .* give data as --data_path={data_file}"):
        train_sft.parse_options([data_file])
    script = tmp_path / "settings.txt"
    script.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    with pytest.raises(train_sft.OptionError, match="settings.txt is neither a config file .* nor an option"):
        train_sft.parse_options([str(script)])
    assert not (tmp_path / "ran").exists()


# ----------------------------------------------------------------------------- hostile data rows

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
        data.read_examples(str(path))
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
    examples, skipped = data.read_examples(str(path), skip_bad_rows=True, log=lambda line: None)
    assert [line for line, _ in examples] == [1, 3] and skipped == 1


@pytest.mark.parametrize("name", ["deep_nesting", "huge_integer"])
def test_hostile_items_of_a_json_list_name_their_line(tmp_path, name):
    row, problem = HOSTILE_ROWS[name]
    path = tmp_path / f"{name}.json"
    path.write_bytes(b"[\n" + GOOD[:-1] + b",\n" + row)
    with pytest.raises(data.DataError, match=f"{path}:3: .*{problem}"):
        data.read_examples(str(path), skip_bad_rows=True)


def test_a_byte_order_mark_is_not_a_bad_row(tmp_path):
    for suffix, text in ((".jsonl", GOOD * 2), (".json", b"[" + GOOD[:-1] + b"]")):
        path = tmp_path / f"bom{suffix}"
        path.write_bytes(b"\xef\xbb\xbf" + text)
        examples, skipped = data.read_examples(str(path))
        assert skipped == 0 and examples[0] == (1, [("a", "b")])


def test_unwritable_cache_dir_names_the_option(tmp_path, data_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run([f"--data_path={data_file}", f"--cache_dir={blocker}/cache", f"--output_dir={tmp_path}/run"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"--cache_dir={blocker}/cache cannot be used: Not a directory" in proc.stderr


# ----------------------------------------------------------------------------- sample.py


class TinyModel:
    def __init__(self, vocab_size):
        self.config = type("Config", (), {"vocab_size": vocab_size})()


def test_sample_refuses_a_tokenizer_the_model_was_not_trained_with():
    with pytest.raises(train_sft.OptionError, match="--tokenizer=gpt2 but --model=m was trained with the byte"):
        sample.check_tokenizer("gpt2", "byte", TinyModel(320), "m")
    with pytest.raises(train_sft.OptionError, match="--tokenizer=byte has 257 tokens but --model=m only 100"):
        sample.check_tokenizer("byte", None, TinyModel(100), "m")
    assert sample.check_tokenizer("", "byte", TinyModel(320), "m").n_vocab == 257


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
