"""Tests for data.py: tokenizers offline, exact labels per format, length policy, cache keys,
packing, sharding, resume, bad input and the demo task. Byte-level tokenizer unless GPT-2 is the point."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from options import OptionError
import torch

import data
import tokenizer
from conftest import ROOT
from data import Batches, DataError, prepare_data
from tokenizer import DEFAULT_TEMPLATE, DEMO_TEMPLATE, GPT2_VOCAB_URL, get_tokenizer, render_prompt

EOT_BYTE = 256
PROMPT = " Human: {} Assistant:"  # DEFAULT_TEMPLATE's prompt part, written out independently


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tmp_path, files, max_seq_len=64, **kwargs):
    """prepare_data with the byte tokenizer, a private cache and logs collected in .logs."""
    logs = []
    kwargs.setdefault("data_split", "100,0")
    train, evaluation = prepare_data(files, "byte", max_seq_len, cache_dir=str(tmp_path / "cache"),
                                     log=logs.append, **kwargs)
    train.logs = logs
    return train, evaluation


def expected(segments):
    """(input_ids, labels) for byte tokens of [(text, trained), ...], EOT written as None."""
    tokens, trained = [], []
    for text, is_trained in segments:
        ids = [EOT_BYTE] if text is None else list(text.encode())
        tokens += ids
        trained += [is_trained] * len(ids)
    labels = [t if m else -100 for t, m in zip(tokens[1:], trained[1:])]
    return tokens[:-1], labels


def rows(n, prefix="q"):
    return [{"prompt": f"{prefix}{i}", "response": f"answer {i}"} for i in range(n)]


# -- tokenizers -------------------------------------------------------------------------------

def test_gpt2_tokenizer_is_offline_and_exact(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tokenizer tried to use the network")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(tokenizer, "_tokenizers", {})
    enc = get_tokenizer("gpt2")
    assert enc.encode("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256] and enc.eot_token == 50256
    assert enc.n_vocab == 50257


def test_gpt2_tokenizer_missing_vocab_says_run_setup(monkeypatch, tmp_path):
    monkeypatch.setenv("SFT_GPT2_VOCAB", str(tmp_path / "missing.tiktoken"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty"))
    monkeypatch.setattr(tokenizer, "_tokenizers", {})
    with pytest.raises(FileNotFoundError, match="bash setup.sh"):
        get_tokenizer("gpt2")


def test_gpt2_tokenizer_falls_back_to_tiktoken_cache(monkeypatch, tmp_path):
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    shutil.copy(os.path.join(ROOT, ".cache", "r50k_base.tiktoken"),
                cache / hashlib.sha1(GPT2_VOCAB_URL.encode()).hexdigest())
    monkeypatch.setenv("SFT_GPT2_VOCAB", str(tmp_path / "missing.tiktoken"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tokenizer, "_tokenizers", {})
    assert get_tokenizer("gpt2").encode("Hello world") == [15496, 995]


def test_byte_tokenizer():
    enc = get_tokenizer("byte")
    assert enc.encode_ordinary("hé") == [104, 195, 169]
    assert enc.eot_token == EOT_BYTE and enc.n_vocab == 257
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt5")


# -- formats and exact labels -----------------------------------------------------------------

def test_render_prompt_is_deepspeed_chat_style():
    assert render_prompt("Hi?") == " Human: Hi? Assistant:"
    assert render_prompt("x", "Q: {prompt}\nA:{response}") == "Q: x\nA:"


@pytest.mark.parametrize("response_key", ["response", "chosen"])
def test_prompt_response_labels(tmp_path, response_key):
    path = write(tmp_path / "a.jsonl", [{"prompt": "hi", response_key: "yo", "rejected": "no"}])
    train, _ = prepare(tmp_path, path)
    input_ids, labels = train[0]
    assert input_ids.tolist() == list(b" Human: hi Assistant: yo")
    assert labels.tolist() == [-100] * 20 + [32, 121, 111, EOT_BYTE]  # " yo" and EOT trained


def test_json_list_gives_the_same_samples(tmp_path):
    items = rows(3)
    jsonl = write(tmp_path / "a.jsonl", items)
    (tmp_path / "a.json").write_text(json.dumps(items, indent=2))
    a, _ = prepare(tmp_path, jsonl)
    b, _ = prepare(tmp_path, str(tmp_path / "a.json"))
    assert [x.tolist() + y.tolist() for x, y in (a[i] for i in range(3))] == \
           [x.tolist() + y.tolist() for x, y in (b[i] for i in range(3))]


def test_multi_turn_trains_on_every_assistant_turn_only(tmp_path):
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                         {"role": "assistant", "content": "d"}]}
    train, _ = prepare(tmp_path, write(tmp_path / "chat.jsonl", [chat]))
    input_ids, labels = train[0]
    want = expected([(PROMPT.format("Be brief.\na"), False), (" b", True), (None, True),
                     (PROMPT.format("c"), False), (" d", True), (None, True)])
    assert (input_ids.tolist(), labels.tolist()) == want
    prompt, response = train.prompt_and_response(0)
    assert prompt == list((PROMPT.format("Be brief.\na") + " b").encode()) + [EOT_BYTE] + list(PROMPT.format("c").encode())
    assert response == [32, ord("d"), EOT_BYTE]


def test_gpt2_prompt_and_response_are_tokenized_separately(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "What is 2+2?", "response": "4"}])
    train, _ = prepare_data(path, "gpt2", 64, data_split="100,0", cache_dir=str(tmp_path / "c"), log=lambda s: None)
    enc = get_tokenizer("gpt2")
    prompt_ids = enc.encode(render_prompt("What is 2+2?"))
    response_ids = enc.encode(" 4") + [50256]
    input_ids, labels = train[0]
    assert input_ids.tolist() == (prompt_ids + response_ids)[:-1]
    assert labels.tolist() == [-100] * (len(prompt_ids) - 1) + response_ids
    assert train.prompt_and_response(0) == (prompt_ids, response_ids)


def test_loss_on_prompt_trains_everything_like_deepspeed_chat(tmp_path):
    train, _ = prepare(tmp_path, write(tmp_path / "a.jsonl", rows(2)), loss_on_prompt=True)
    input_ids, labels = train[0]
    tokens = list(b" Human: q0 Assistant: answer 0") + [EOT_BYTE]
    assert input_ids.tolist() == tokens[:-1] and labels.tolist() == tokens[1:]
    assert train.stats["trained_share"] == 1.0


# -- length policy ----------------------------------------------------------------------------

def test_overlong_sample_is_dropped_and_counted(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "abcdefghij", "response": "yo"}, {"prompt": "a", "response": "b"}])
    train, _ = prepare(tmp_path, path, max_seq_len=25)
    assert len(train) == 1 and train.stats["dropped_too_long"] == 1 and train.stats["truncated"] == 0
    assert any("1 dropped" in line for line in train.logs)


def test_truncation_cuts_the_prompt_from_the_left_and_keeps_eot(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "abcdefghij", "response": "yo"}])  # 33 tokens
    train, _ = prepare(tmp_path, path, max_seq_len=25, truncate_prompt=True)
    tokens, _ = train.tokens_and_mask(0)
    assert len(tokens) == 25 and tokens[-1] == EOT_BYTE
    assert bytes(tokens[:-1].tolist()) == b"Human: abcdefghij Assistant: yo"[-24:]
    assert train[0][1].tolist() == [-100] * 20 + [32, 121, 111, EOT_BYTE]
    assert train.stats["truncated"] == 1 and train.stats["dropped_too_long"] == 0


def test_response_that_cannot_fit_is_dropped_even_with_truncation(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "a", "response": "x" * 9}, {"prompt": "a", "response": "x" * 8}])
    train, _ = prepare(tmp_path, path, max_seq_len=11, truncate_prompt=True)  # " xxxxxxxx"+EOT = 10 tokens fits
    assert len(train) == 1 and train.stats["dropped_too_long"] == 1
    tokens, _ = train.tokens_and_mask(0)
    assert tokens.tolist() == [ord(":")] + list(b" " + b"x" * 8) + [EOT_BYTE]  # one prompt token is kept


# -- splits and blending ----------------------------------------------------------------------

def test_split_is_deterministic_by_seed_and_disjoint(tmp_path):
    path = write(tmp_path / "a.jsonl", rows(50))
    train, evaluation = prepare(tmp_path, path, data_split="80,20")
    again, _ = prepare(tmp_path, path, data_split="80,20")
    other, _ = prepare(tmp_path, path, data_split="80,20", seed=7)
    assert len(train) == 40 and len(evaluation) == 10
    assert set(train.index.tolist()).isdisjoint(evaluation.index.tolist())
    assert train.index.tolist() == again.index.tolist() != other.index.tolist()


def test_blend_weights_multiply_samples_per_epoch(tmp_path):
    a, b = write(tmp_path / "a.jsonl", rows(5, "a")), write(tmp_path / "b.jsonl", rows(4, "b"))
    train, _ = prepare(tmp_path, f"{a}:2,{b}:1")
    assert len(train) == 2 * 5 + 4
    train, _ = prepare(tmp_path, f"{a}:0.4,{b}")
    assert len(train) == 2 + 4


def test_explicit_eval_file(tmp_path):
    train, evaluation = prepare(tmp_path, write(tmp_path / "a.jsonl", rows(5)),
                                eval_data_path=write(tmp_path / "e.jsonl", rows(3, "e")), data_split="98,2")
    assert len(train) == 5 and len(evaluation) == 3
    assert bytes(evaluation[0][0].tolist()).startswith(b" Human: e0")


# -- cache ------------------------------------------------------------------------------------

def test_cache_is_reused_and_rebuilt_when_any_key_input_changes(tmp_path):
    a = write(tmp_path / "a.jsonl", rows(20))
    b = write(tmp_path / "b.jsonl", rows(4, "b"))
    base = dict(data_path=a, tokenizer_name="byte", max_seq_len=64, data_split="90,10")

    def cache_dirs(**change):
        prepare_data(**{**base, **change}, cache_dir=str(tmp_path / "cache"), log=lambda s: None)
        return {d for d in os.listdir(tmp_path / "cache") if d != "demo"}

    seen = cache_dirs()
    assert cache_dirs() == seen  # nothing changed: reused
    shutil.copy(a, tmp_path / "renamed.jsonl")
    assert cache_dirs(data_path=str(tmp_path / "renamed.jsonl")) == seen  # keyed by content, not name
    changes = [dict(tokenizer_name="gpt2"), dict(template="Q: {prompt}\nA: {response}"), dict(max_seq_len=63),
               dict(truncate_prompt=True), dict(loss_on_prompt=True), dict(data_format="prompt_response"),
               dict(data_split="80,20"), dict(seed=1), dict(skip_bad_rows=True), dict(data_path=f"{a}:2"),
               dict(data_path=f"{a},{b}"), dict(eval_data_path=b)]
    for change in changes:
        now = cache_dirs(**change)
        assert len(now) == len(seen) + 1, change
        seen = now
    with open(a, "a") as f:  # same name, new content
        f.write(json.dumps({"prompt": "new", "response": "row"}) + "\n")
    assert len(cache_dirs()) == len(seen) + 1


def test_only_local_rank_zero_builds(tmp_path, monkeypatch):
    path = write(tmp_path / "a.jsonl", rows(3))
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(FileNotFoundError):  # nothing built, no process group to wait on
        prepare(tmp_path, path)
    monkeypatch.setenv("LOCAL_RANK", "0")
    prepare(tmp_path, path)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert len(prepare(tmp_path, path)[0]) == 3


def _two_rank_prepare(rank, path, cache_dir, init_file, out):
    os.environ["LOCAL_RANK"] = str(rank)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    train, _ = prepare_data(path, "byte", 64, data_split="100,0", cache_dir=cache_dir, log=lambda s: None)
    np.save(f"{out}{rank}.npy", train[2][0])
    torch.distributed.destroy_process_group()


def test_two_ranks_wait_for_the_cache_at_a_barrier(tmp_path):
    path = write(tmp_path / "a.jsonl", rows(3))
    torch.multiprocessing.spawn(_two_rank_prepare, nprocs=2,
                                args=(path, str(tmp_path / "cache"), str(tmp_path / "init"), str(tmp_path / "out")))
    assert np.load(tmp_path / "out0.npy").tolist() == np.load(tmp_path / "out1.npy").tolist() \
        == list(b" Human: q2 Assistant: answer 2")


# -- batches ----------------------------------------------------------------------------------

@pytest.fixture
def varied(tmp_path):
    """40 distinct samples of 25 to 63 byte tokens."""
    items = [{"prompt": f"p{i}", "response": "r" * (1 + (i * 7) % 37)} for i in range(40)]
    return prepare(tmp_path, write(tmp_path / "v.jsonl", items), max_seq_len=64)[0]


def sample_of_row(row):
    """A padded input row without its trailing EOT padding (inputs never end in EOT themselves)."""
    ids = row.tolist()
    while ids and ids[-1] == EOT_BYTE:
        ids.pop()
    return tuple(ids)


def test_padded_batches_pad_with_eot_and_ignore_index(varied):
    batch = Batches(varied, 4, shuffle=False).next_batch()  # samples 0..3 in order
    lengths = [len(varied[i][0]) for i in range(4)]
    assert batch["segment_ids"] is None and batch["input_ids"].shape == (4, max(lengths))
    for i, (x, y) in enumerate(zip(batch["input_ids"], batch["labels"])):
        n = lengths[i]
        assert x[:n].tolist() == varied[i][0].tolist() and y[:n].tolist() == varied[i][1].tolist()
        assert (x[n:] == EOT_BYTE).all() and (y[n:] == -100).all()


def test_length_grouping_reduces_padding_and_can_be_turned_off(varied):
    grouped, mixed = Batches(varied, 4, seed=0), Batches(varied, 4, seed=0, group_by_length=False)
    take(grouped, 10)
    take(mixed, 10)
    assert grouped.padding_fraction < 0.5 * mixed.padding_fraction


def test_packing_marks_samples_and_padding_as_separate_segments(varied):
    batches = Batches(varied, 2, seed=0, packing=True)
    by_inputs = {tuple(varied[i][0].tolist()): varied[i][1].tolist() for i in range(len(varied))}
    seen = []
    for _ in range(batches.batches_per_epoch):
        batch = batches.next_batch()
        assert batch["input_ids"].shape[1] == 63
        for x, y, seg in zip(batch["input_ids"], batch["labels"], batch["segment_ids"]):
            steps = seg[1:] - seg[:-1]
            assert seg[0] == 0 and steps.ge(0).all() and steps.le(1).all()  # contiguous, in order
            for s in range(int(seg.max()) + 1):
                inputs, labels = tuple(x[seg == s].tolist()), y[seg == s].tolist()
                if inputs in by_inputs:
                    assert labels == by_inputs[inputs]
                    seen.append(inputs)
                else:  # only the last segment may be padding: all EOT, nothing trained
                    assert s == seg.max() and set(inputs) == {EOT_BYTE} and set(labels) == {-100}
    assert sorted(seen) == sorted(by_inputs)  # every sample exactly once per epoch
    assert 0 < batches.padding_fraction < 0.5


def take(batches, n):
    return [batches.next_batch() for _ in range(n)]


def same(a, b):
    return all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
               for x, y in zip(a, b))


@pytest.mark.parametrize("packing", [False, True])
def test_same_seed_same_batches_other_seed_other_batches(varied, packing):
    assert same(take(Batches(varied, 4, seed=3, packing=packing), 25), take(Batches(varied, 4, seed=3, packing=packing), 25))
    assert not same(take(Batches(varied, 4, seed=3, packing=packing), 5), take(Batches(varied, 4, seed=4, packing=packing), 5))


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_take_interleaved_global_batches_independent_of_world_size(varied, packing):
    one = Batches(varied, 3, seed=1, packing=packing)
    ranks = [Batches(varied, 3, rank=r, world_size=2, seed=1, packing=packing) for r in range(2)]
    for epoch in range(3):
        assert one.epoch == ranks[0].epoch == ranks[1].epoch == epoch
        steps, tail = ranks[0].batches_per_epoch, ranks[0].dropped_batches
        assert 2 * steps + tail == one.batches_per_epoch
        for _ in range(steps):
            assert same(take(one, 2), [ranks[0].next_batch(), ranks[1].next_batch()])
        take(one, tail)  # the tail two ranks cannot share is dropped, not carried over


def test_ranks_get_disjoint_samples(varied):
    ranks = [Batches(varied, 4, rank=r, world_size=3, seed=1) for r in range(3)]
    shards = [{sample_of_row(x) for b in take(r, r.batches_per_epoch) for x in b["input_ids"]} for r in ranks]
    assert all(shards[i].isdisjoint(shards[j]) for i in range(3) for j in range(i + 1, 3))
    assert ranks[0].dropped_batches == 10 % 3 and sum(map(len, shards)) == 9 * 4


@pytest.mark.parametrize("packing", [False, True])
def test_resume_gives_identical_next_batches(varied, packing):
    run = Batches(varied, 4, seed=5, packing=packing)
    take(run, 7)
    state = run.state_dict()
    resumed = Batches(varied, 4, seed=5, packing=packing)
    resumed.load_state_dict(state)
    assert same(take(run, 15), take(resumed, 15))  # across the epoch boundary too
    assert resumed.epoch == run.epoch >= 1


def test_resume_on_another_world_size(varied):
    run = Batches(varied, 2, seed=5)
    take(run, 6)
    state, expected_pair = run.state_dict(), take(run, 2)
    ranks = [Batches(varied, 2, rank=r, world_size=2, seed=5) for r in range(2)]
    for r in ranks:
        r.load_state_dict(state)
    assert same(expected_pair, [ranks[0].next_batch(), ranks[1].next_batch()])


def test_resume_in_an_epoch_tail_on_more_ranks_starts_the_next_epoch(varied):
    """20 micro-batches per epoch: on 3 ranks each takes 6 and the last 2 are the dropped tail, so
    a single-rank run stopped after 18 resumes on 3 ranks at the start of epoch 1."""
    run = Batches(varied, 2, seed=5)
    take(run, 18)
    state = run.state_dict()
    take(run, 2)
    next_epoch = take(run, 3)
    ranks = [Batches(varied, 2, rank=r, world_size=3, seed=5) for r in range(3)]
    for r in ranks:
        r.load_state_dict(state)
    assert all(r.epoch == 1 for r in ranks)
    assert same(next_epoch, [r.next_batch() for r in ranks])


# -- bad input --------------------------------------------------------------------------------

GOOD = b'{"prompt": "a", "response": "b"}\n'
BAD_FILES = {
    "malformed": (GOOD + b'{"prompt": "a",\n', 2, "malformed JSON"),
    "missing": (GOOD + b'{"prompt": "a", "chosen": "b"}\n', 2, "missing field 'response'"),
    "wrong_type": (b'{"prompt": 3, "response": "b"}\n', 1, "must be a string, got 3"),
    "empty_response": (GOOD * 2 + b'{"prompt": "a", "response": "  "}\n', 3, "'response' is empty"),
    "utf8": (GOOD + b'\n{"prompt": "\xff", "response": "b"}\n', 3, "invalid UTF-8"),
    "empty_file": (b"\n", 1, "empty"),
    "unknown_format": (b'{"question": "a", "answer": "b"}\n', 1, "unknown format"),
    "not_object": (GOOD + b'["a", "b"]\n', 2, "expected a JSON object"),
    "list_malformed": (b'[\n' + GOOD[:-1] + b',\n{"prompt": "a" "response": "b"}\n]', 3, "malformed JSON"),
    "list_missing": (b'[\n' + GOOD[:-1] + b',\n\n{"prompt": "a"}\n]', 4, "missing field 'response'"),
    "list_utf8": (b'[\n' + GOOD[:-1] + b',\n{"prompt": "\xff", "response": "b"}]', 3, "invalid UTF-8"),
    "chat_role": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}\n',
                  1, "expected role 'assistant', got 'bot'"),
    "chat_end": (b'{"messages": [{"role": "user", "content": "a"}]}\n', 1, "must end with an assistant"),
    "chat_empty_answer": (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}\n',
                          1, "messages[1].'content' is empty"),
}


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_input_names_file_line_and_problem(tmp_path, name):
    content, line, problem = BAD_FILES[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        prepare(tmp_path, str(path))
    assert f"{path}:{line}: " in str(error.value) and problem in str(error.value)


def test_a_prompt_that_renders_to_nothing_is_bad_input(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "a", "response": "b"}, {"prompt": "", "response": "b"}])
    with pytest.raises(DataError, match=f"{path}:2: the prompt renders to nothing"):
        prepare(tmp_path, path, template="{prompt}{response}")
    train, _ = prepare(tmp_path, path, template="{prompt}{response}", skip_bad_rows=True)
    assert len(train) == 1 and train.stats["bad_rows"] == 1
    assert len(prepare(tmp_path, path)[0]) == 2  # the default template always puts text before the response


def test_skip_bad_rows_skips_counts_and_logs(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(GOOD + b'{"prompt": "a",\n' + GOOD + b'{"prompt": "a"}\n{"prompt": "\xff", "response": "b"}\n'
                     + b'{"prompt": "a", "response": ""}\n' + GOOD)
    train, _ = prepare(tmp_path, str(path), skip_bad_rows=True)
    assert len(train) == 3 and train.stats["bad_rows"] == 4
    assert any(f"{path}:2:" in line for line in train.logs) and any("4 bad rows" in line for line in train.logs)


def test_bad_options_are_rejected(tmp_path):
    path = write(tmp_path / "a.jsonl", rows(2))
    for kwargs, message in [(dict(data_format="csv"), "unknown data_format"), (dict(template="{response}"), "template"),
                            (dict(data_split="98"), "data_split"), (dict(max_seq_len=1), "max_seq_len")]:
        with pytest.raises(ValueError, match=message):
            prepare(tmp_path, path, **kwargs)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        prepare(tmp_path, str(tmp_path / "nope.jsonl"))


# -- demo task and command line ---------------------------------------------------------------

def test_demo_task_is_deterministic_held_out_short_and_correct(tmp_path):
    first = data.write_demo(str(tmp_path / "one"))
    second = data.write_demo(str(tmp_path / "two"))
    assert [open(p).read() for p in first] == [open(p).read() for p in second]
    train, evaluation = ([json.loads(line) for line in open(p)] for p in first)
    assert len(train) >= 20000 and len(evaluation) >= 500
    assert {r["prompt"] for r in train}.isdisjoint(r["prompt"] for r in evaluation)
    shift = str.maketrans("abcdefghijklmnopqrstuvwxyz", "bcdefghijklmnopqrstuvwxyza")
    answers = {"reverse": lambda w: w[::-1], "sort": lambda d: "".join(sorted(d)), "upper": str.upper,
               "shift": lambda w: w.translate(shift), "double": lambda w: "".join(c * 2 for c in w)}
    tasks = set()
    for row in train + evaluation:
        task, _, arg = row["prompt"].partition(" ")
        assert answers[task](arg) == row["response"]
        tasks.add(task)
        assert len(DEFAULT_TEMPLATE.format(**row).encode()) + 1 < 64
        assert len(DEMO_TEMPLATE.format(**row).encode()) + 1 <= 24
    assert tasks == set(answers)


def test_demo_data_path(tmp_path):
    train, evaluation = prepare(tmp_path, "demo")
    assert len(train) >= 20000 and len(evaluation) >= 500 and train.stats["max_len"] < 64


def test_inspect_command_shows_trained_tokens(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "hi", "response": "yo"}])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "inspect", f"--data_path={path}",
                          "--tokenizer=byte", f"--cache_dir={tmp_path / 'cache'}", "--batch_size=1"],
                         capture_output=True, text=True, check=True).stdout
    assert " Human: hi Assistant:[[ yo<|endoftext|>]]" in out
    assert "train 1 samples" in out and "trained share" in out and "padding share" in out


# -- the formats people already have: TRL, Alpaca, ShareGPT, DeepSpeed-Chat; JSONL, JSON, Parquet --

SYSTEM = "Be brief."
# One row per format, the format detection must find, and the (prompt, response, trained) turns the
# row must become, written out by hand: the system text and every prompt are untrained context.
FORMAT_ROWS = {
    "prompt_response": ("prompt_response", {"prompt": "What is 2+2?", "response": "4.", "source": "extra"},
                        [("What is 2+2?", "4.", True)]),
    "prompt_chosen": ("prompt_chosen", {"prompt": "Name a color.", "chosen": "Blue.", "rejected": "Loud."},
                      [("Name a color.", "Blue.", True)]),
    "trl_strings": ("prompt_completion", {"prompt": "The sky is", "completion": "blue."},
                    [("The sky is", "blue.", True)]),
    "trl_messages": ("prompt_completion",
                     {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
                      "completion": [{"role": "assistant", "content": "See you."}]},
                     [(SYSTEM + "\nHi", "Hello.", False), ("Bye", "See you.", True)]),
    "messages": ("messages",
                 {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                               {"role": "assistant", "content": "d"}]},
                 [(SYSTEM + "\na", "b", True), ("c", "d", True)]),
    "alpaca": ("alpaca", {"instruction": "Translate to French.", "input": "cat", "output": "chat", "text": "x"},
               [("Translate to French.\n\ncat", "chat", True)]),
    "alpaca_no_input": ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi"}, [("Say hi.", "hi", True)]),
    "sharegpt": ("sharegpt",
                 {"id": "7", "conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": "a"},
                                               {"from": "gpt", "value": "b"}, {"from": "user", "value": "c"},
                                               {"from": "assistant", "value": "d"}]},
                 [(SYSTEM + "\na", "b", True), ("c", "d", True)]),
}


def write_kind(path, rows, kind):
    """rows as a .jsonl, .json (a list) or .parquet file at path + kind."""
    path = f"{path}.{kind}"
    if kind == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        with open(path, "w") as f:
            f.write(json.dumps(rows, indent=1) if kind == "json" else "".join(json.dumps(r) + "\n" for r in rows))
    return path


def gpt2_expected(turns):
    """(input_ids, labels) under the default template, from turns: prompts untrained, responses + EOT trained."""
    enc, tokens, trained = get_tokenizer("gpt2"), [], []
    for prompt, response, is_trained in turns:
        prompt_ids, response_ids = enc.encode_ordinary(PROMPT.format(prompt)), enc.encode_ordinary(" " + response)
        tokens += prompt_ids + response_ids + [50256]
        trained += [False] * len(prompt_ids) + [is_trained] * (len(response_ids) + 1)
    return tokens[:-1], [t if m else -100 for t, m in zip(tokens[1:], trained[1:])]


def gpt2_prepare(tmp_path, files, **kwargs):
    logs = []
    train, evaluation = prepare_data(files, "gpt2", 128, cache_dir=str(tmp_path / "cache"), log=logs.append,
                                     **{"data_split": "100,0", **kwargs})
    train.logs = logs
    return train, evaluation


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("name", FORMAT_ROWS)
def test_each_format_and_file_kind_trains_exactly_the_responses(tmp_path, name, kind):
    data_format, row, turns = FORMAT_ROWS[name]
    train, _ = gpt2_prepare(tmp_path, write_kind(tmp_path / name, [row], kind))
    assert [f["format"] for f in train.files] == [data_format]
    input_ids, labels = train[0]
    assert (input_ids.tolist(), labels.tolist()) == gpt2_expected(turns)
    trained_text = get_tokenizer("gpt2").decode([t for t in labels.tolist() if t != -100])
    assert trained_text == "".join(f" {response}<|endoftext|>" for _, response, trained in turns if trained)
    assert SYSTEM not in trained_text and all(prompt not in trained_text for prompt, _, _ in turns)


def test_byte_order_mark_and_crlf_are_accepted(tmp_path):
    items = rows(3)
    plain, _ = prepare(tmp_path, write(tmp_path / "plain.jsonl", items))
    bom = b"\xef\xbb\xbf"
    (tmp_path / "win.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\r\n" for r in items).encode())
    (tmp_path / "win.json").write_bytes(bom + json.dumps(items, indent=1).replace("\n", "\r\n").encode())
    for name in ("win.jsonl", "win.json"):
        train, _ = prepare(tmp_path, str(tmp_path / name))
        assert [train[i][1].tolist() for i in range(3)] == [plain[i][1].tolist() for i in range(3)]
        assert [train[i][0].tolist() for i in range(3)] == [plain[i][0].tolist() for i in range(3)]


def test_forced_data_format_and_presets(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"prompt": "hi", "completion": "yo", "response": "other"}])
    train, _ = prepare(tmp_path, path, data_format="prompt_response")
    assert bytes(train.tokens_and_mask(0)[0][:-1].tolist()) == b" Human: hi Assistant: other"
    train, _ = prepare(tmp_path, path, template="raw")  # detected: TRL prompt/completion, concatenated as TRL does
    assert bytes(train.tokens_and_mask(0)[0][:-1].tolist()) == b"hiyo" and train.files[0]["format"] == "prompt_completion"
    train, _ = prepare(tmp_path, path, template="chat")
    assert bytes(train.tokens_and_mask(0)[0][:-1].tolist()) == b"<|user|>\nhi\n<|assistant|>\nyo"
    assert train[0][1].tolist() == [-100] * (len(b"<|user|>\nhi\n<|assistant|>") - 1) + list(b"\nyo") + [EOT_BYTE]
    assert render_prompt("hi", "deepspeed_chat") == render_prompt("hi") == " Human: hi Assistant:"


RM_STATIC = {"prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:", "chosen": " Paris.",
             "rejected": " London."}


def test_rm_static_row_renders_as_deepspeed_chat_does(tmp_path):
    """DeepSpeed-Chat trains on prompt + chosen + end-of-text for Dahoas/rm-static rows; ours is the
    same text with the prompt masked. A plain row in the same blend is still wrapped by the template."""
    rm = write(tmp_path / "rm.jsonl", [RM_STATIC])
    plain = write(tmp_path / "plain.jsonl", [{"prompt": "Hi", "response": "Hello."}])
    train, _ = gpt2_prepare(tmp_path, f"{rm},{plain}")
    enc = get_tokenizer("gpt2")
    tokens, _ = train.tokens_and_mask(0)
    assert tokens.tolist() == enc.encode(RM_STATIC["prompt"] + RM_STATIC["chosen"] + "<|endoftext|>",
                                         allowed_special="all")
    assert [t for t in train[0][1].tolist() if t != -100] == enc.encode(" Paris.") + [50256]
    assert train.tokens_and_mask(1)[0].tolist() == enc.encode(" Human: Hi Assistant: Hello.<|endoftext|>",
                                                              allowed_special="all")
    assert train.stats["rendered_raw"] == 1 and any("rm.jsonl: 1 prompts already hold" in s for s in train.logs)
    custom, _ = gpt2_prepare(tmp_path, rm, template="Q: {prompt}\nA: {response}")  # a custom template is as given
    assert enc.decode(custom.tokens_and_mask(0)[0].tolist()).startswith("Q: \n\nHuman: What")


def test_deepspeed_chat_jsonfile_directory_uses_its_eval_file(tmp_path):
    root = tmp_path / "dschat"
    (root / "data").mkdir(parents=True)
    train_rows = [{"prompt": f" Human: q{i} Assistant:", "chosen": f" a{i}", "rejected": " no"} for i in range(5)]
    (root / "data" / "train.json").write_text(json.dumps(train_rows))
    write(root / "data" / "eval.json", [{"prompt": " Human: e0 Assistant:", "chosen": " x", "rejected": " y"}])
    train, evaluation = prepare(tmp_path, str(root), data_split="98,2")
    assert len(train) == 5 and len(evaluation) == 1  # the split is not used: eval.json is the eval set
    assert evaluation.tokens_and_mask(0)[0].tolist() == list(b" Human: e0 Assistant: x") + [EOT_BYTE]
    assert train[0][1].tolist().count(-100) == len(" Human: q0 Assistant:") - 1
    (root / "data" / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="local/jsonfile layout.*eval.json"):
        prepare(tmp_path, str(root))


def test_template_preset_is_in_the_cache_key_and_a_name_shares_its_text(tmp_path):
    path = write(tmp_path / "a.jsonl", rows(3))
    keys = set()
    for template in ("deepspeed_chat", DEFAULT_TEMPLATE, "raw", "chat"):
        prepare(tmp_path, path, template=template)
        keys = {d for d in os.listdir(tmp_path / "cache")}
    assert len(keys) == 3


FORMAT_ERRORS = {
    "alpaca_no_output": (b'{"instruction": "a", "input": "b"}\n', "missing field 'output' (format alpaca)"),
    "no_assistant": (b'{"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"}]}\n',
                     "it has no assistant turn (format sharegpt)"),
    "out_of_order": (b'{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}\n',
                     "conversations[1]: expected role 'assistant', got 'human'"),
    "trl_mixed": (b'{"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}\n',
                  "must both be strings or both lists of messages"),
    "trl_prompt_answered": (b'{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],'
                            b' "completion": [{"role": "assistant", "content": "c"}]}\n',
                            "completion[0]: expected role 'user', got 'assistant'"),
}


@pytest.mark.parametrize("name", FORMAT_ERRORS)
def test_bad_rows_of_the_new_formats_name_file_and_line_and_can_be_skipped(tmp_path, name):
    content, problem = FORMAT_ERRORS[name]
    path = tmp_path / f"{name}.jsonl"
    good = FORMAT_ROWS[{"alpaca_no_output": "alpaca", "trl_mixed": "trl_messages",
                        "trl_prompt_answered": "trl_messages"}.get(name, "sharegpt")][1]
    path.write_bytes(json.dumps(good).encode() + b"\n" + content)
    with pytest.raises(DataError) as error:
        prepare(tmp_path, str(path), max_seq_len=256)
    assert str(error.value).startswith(f"{path}:2: ") and problem in str(error.value)
    train, _ = prepare(tmp_path, str(path), max_seq_len=256, skip_bad_rows=True)
    assert len(train) == 1 and train.stats["bad_rows"] == 1


def test_a_row_of_no_format_names_the_formats_checked(tmp_path):
    path = write(tmp_path / "a.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=f"{path}:1: unknown format") as error:
        prepare(tmp_path, path)
    for fields in ("prompt+response", "prompt+chosen", "prompt+completion", "(messages)", "instruction+output",
                   "(conversations)"):
        assert fields in str(error.value)


def test_parquet_missing_column_null_values_and_unreadable_pages(tmp_path):
    no_output = str(tmp_path / "no_output.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "input": "b"}] * 3), no_output)
    with pytest.raises(DataError, match=f"^{no_output}: row 1: missing field 'output' \\(format alpaca\\)$"):
        prepare(tmp_path, no_output)
    nulls = str(tmp_path / "nulls.parquet")
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "input": None, "output": "b"},
                                         {"instruction": "a", "input": "c", "output": None}]), nulls)
    with pytest.raises(DataError, match=f"^{nulls}: row 2: field 'output' must be a string, got null"):
        prepare(tmp_path, nulls)
    train, _ = prepare(tmp_path, nulls, skip_bad_rows=True)
    assert len(train) == 1 and train.stats["bad_rows"] == 1
    damaged = str(tmp_path / "damaged.parquet")
    pq.write_table(pa.Table.from_pylist(rows(6)), damaged, row_group_size=2, compression="none")
    offset = pq.ParquetFile(damaged).metadata.row_group(1).column(0).data_page_offset
    with open(damaged, "r+b") as f:  # overwrite the page header of the second row group
        f.seek(offset)
        f.write(b"\xff" * 8)
    with pytest.raises(DataError, match=f"^{damaged}: row 3: rows 3-4 \\(row group 1\\) cannot be read: [^\\n]*$"):
        prepare(tmp_path, damaged)
    train, _ = prepare(tmp_path, damaged, skip_bad_rows=True)
    assert len(train) == 4 and train.stats["bad_rows"] == 2
    assert sorted(bytes(train[i][0].tolist()) for i in range(4))[0].startswith(b" Human: q0")


def test_blend_of_formats_trains_two_steps_through_train_sft(tmp_path, monkeypatch):
    """One run over every file kind: JSONL, JSON, Parquet and a DeepSpeed-Chat directory, GPT-2 tokens;
    a damaged file stops the trainer with its one-sentence error (exit status 2 from the command line)."""
    root = tmp_path / "dschat"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.json").write_text(json.dumps([RM_STATIC] * 3))
    write(root / "data" / "eval.json", [RM_STATIC])
    files = [write_kind(tmp_path / name, [FORMAT_ROWS[name][1]] * 2, kind)
             for name, kind in [("alpaca", "json"), ("sharegpt", "parquet"), ("trl_messages", "jsonl")]]
    options = ["--tokenizer=gpt2", "--n_layer=1", "--n_head=2", "--n_embd=16", "--max_seq_len=64", "--batch_size=2",
               "--max_steps=2", f"--cache_dir={tmp_path / 'cache'}"]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft.py"), *options,
                           f"--data_path={','.join(files)},{root}:2", f"--output_dir={tmp_path / 'out'}"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train 12 samples" in proc.stdout and "eval 1 samples" in proc.stdout
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        assert [r["step"] for r in map(json.loads, f) if "loss" in r][-1] == 2
    import train_sft
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist([{"instruction": "a"}]), str(bad))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # keep this process's thread count as it is
    with pytest.raises(OptionError, match=f"^{bad}: row 1: missing field 'output' \\(format alpaca\\)$"):
        train_sft.main([*options, f"--data_path={bad}", f"--output_dir={tmp_path / 'out2'}"])


def test_inspect_shows_each_files_format_the_alpaca_join_and_a_sample_per_format(tmp_path):
    files = [write_kind(tmp_path / name, [FORMAT_ROWS[name][1]], kind)
             for name, kind in [("alpaca", "jsonl"), ("sharegpt", "parquet")]]
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "inspect", f"--data_path={','.join(files)}",
                          "--tokenizer=byte", f"--cache_dir={tmp_path / 'cache'}", "--batch_size=1", "--num_samples=0",
                          "--data_split=100,0"], capture_output=True, text=True, check=True).stdout
    assert f"file {files[0]}: format alpaca, 1 samples" in out and f"file {files[1]}: format sharegpt" in out
    assert "alpaca: prompt = instruction + '\\n\\n' + input" in out
    assert " Human: Translate to French.\n\ncat Assistant:[[ chat<|endoftext|>]]" in out
    assert " Human: Be brief.\na Assistant:[[ b<|endoftext|>]] Human: c Assistant:[[ d<|endoftext|>]]" in out


def test_tokens_spilled_to_disk_in_many_chunks_give_the_same_cache(tmp_path, monkeypatch):
    path = write(tmp_path / "a.jsonl", rows(20))
    whole, _ = prepare(tmp_path, path)
    monkeypatch.setattr(data._ArrayFile, "BUFFER", 7)  # flush every few values
    spilled, _ = prepare(tmp_path / "other", path)
    assert np.array_equal(whole.tokens, spilled.tokens) and np.array_equal(whole.loss_mask, spilled.loss_mask)
    assert not [f for f in os.listdir(tmp_path / "other" / "cache") if f.startswith(".tmp")]


def test_markers_inside_a_conversation_are_words_not_a_template(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Say 'Human: x Assistant: y'"},
                         {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"},
                         {"role": "assistant", "content": "ok"}]}
    train, _ = prepare(tmp_path, write(tmp_path / "chat.jsonl", [chat]), max_seq_len=128)
    assert bytes(train.tokens_and_mask(0)[0][:30].tolist()) == b" Human: Say 'Human: x Assistan"
    assert train.stats["rendered_raw"] == 0
    with pytest.raises(FileNotFoundError, match="is a directory; a DeepSpeed-Chat"):
        prepare(tmp_path, write(tmp_path / "a.jsonl", rows(2)), eval_data_path=str(tmp_path))


def test_inspect_exits_2_with_one_line_on_bad_data(tmp_path, capsys):
    path = write(tmp_path / "a.jsonl", [{"instruction": "a"}])
    with pytest.raises(SystemExit) as exit_info:
        data.main(["inspect", f"--data_path={path}", "--tokenizer=byte", f"--cache_dir={tmp_path / 'cache'}"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"data.py: error: {path}:1: missing field 'output' (format alpaca)\n"


# -- absurd values: one sentence each ---------------------------------------------------------

def test_a_weight_that_no_epoch_can_hold_is_refused_before_tokenizing(tmp_path):
    """A weight of 1e12 was a MemoryError: the epoch's index was built before anything said no."""
    path = write(tmp_path / "a.jsonl", rows(3))
    with pytest.raises(ValueError) as error:
        prepare(tmp_path, f"{path}:1e12")
    assert str(error.value) == (f"the weight of {path!r} in data_path is 1e+12, but a weight repeats each of the "
                                f"file's samples that many times per epoch and an epoch holds at most 134,217,728; "
                                f"lower it")
    assert not os.path.exists(tmp_path / "cache")  # refused before any file was tokenized


def test_weights_that_give_an_epoch_too_many_samples_are_refused_before_any_copy(tmp_path):
    path = write(tmp_path / "a.jsonl", rows(300))
    with pytest.raises(ValueError) as error:
        prepare(tmp_path, f"{path}:1000000")
    assert str(error.value) == (f"the weight 1e+06 of {path!r} repeats its 300 training samples to 300,000,000 "
                                f"samples per epoch, more than the 134,217,728 an epoch may hold; lower the weights "
                                f"in data_path")
    assert os.listdir(tmp_path / "cache") == []  # the unfinished cache was removed


@pytest.mark.parametrize("split", ["inf,1", "1,inf", "nan,1", "1e400,1"])
def test_a_data_split_that_is_not_finite_is_refused(tmp_path, split):
    """"inf,1" was accepted and held out nothing: inf / (inf + 1) is nan, 1 / (inf + 1) is 0."""
    with pytest.raises(ValueError) as error:
        prepare(tmp_path, write(tmp_path / "a.jsonl", rows(5)), data_split=split)
    assert str(error.value) == f"data_split must be two finite shares like '98,2', got {split!r}"
