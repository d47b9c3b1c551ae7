"""Data for supervised fine-tuning: files -> batches (formats, label masking, cache, batches, the demo task).

JSONL/JSON/Parquet rows (prompt/response, prompt/chosen, TRL prompt/completion, messages, Alpaca,
ShareGPT; the format detected per file) -> validated (prompt, response) turns -> template text ->
token ids and a loss mask -> numpy arrays cached under a hash of everything that shaped them -> SFTDataset giving
(input_ids, labels) -> Batches, length-grouped or packed, sharded over data-parallel ranks.

Labels are already shifted (nanoGPT style): labels[t] is the target for position t, and -100 where
nothing is trained (prompt, template text, padding). Every response ends with the end-of-text token
(a tokenizer directory's eos; with the model's own chat template, the end-of-turn token the template
writes), which is trained, so a fine-tuned model learns to stop.

Tokenizers and templates (text templates for (prompt, response) pairs, or --template=model: the
directory's own chat template renders each row as a conversation) live in tokenizer.py.

    python data.py inspect --data_path=FILE[,FILE...] [--tokenizer=gpt2|byte|DIR --template=model ...]
    python data.py demo --out_dir=DIR
"""

import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import stat
import sys
import tempfile
from array import array

import numpy as np
import torch

from tokenizer import (DEFAULT_TEMPLATE, MODEL_TEMPLATE, RAW_TEMPLATE, ROLE_MARKERS, ChatTemplate, already_templated,
                       get_tokenizer, render_prompt, resolve_template, split_template, tokenize_turns,
                       tokenizer_identity)

IGNORE_INDEX = -100


def fit_length(tokens, mask, response_start, max_seq_len, truncate_prompt):
    """Apply the length policy; returns (tokens, mask, response_start, outcome) or None to drop.

    A sample longer than max_seq_len is dropped, or with truncate_prompt cut from the left. The
    final response with its EOT is never cut, and at least one token must stay in front of it
    (its first token is only a target if something precedes it), else the sample is dropped.
    """
    excess = len(tokens) - max_seq_len
    if excess <= 0:
        return tokens, mask, response_start, "kept"
    if not truncate_prompt or excess >= response_start:
        return None
    return tokens[excess:], mask[excess:], response_start - excess, "truncated"


# Reading and validating files: .jsonl, .json, .parquet; one format per file

FORMATS = ("prompt_response", "prompt_chosen", "prompt_completion", "messages", "alpaca", "sharegpt")
# The fields that identify a format, in the order detection tries them.
FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction",),
               "prompt_completion": ("prompt", "completion"), "prompt_response": ("prompt", "response"),
               "prompt_chosen": ("prompt", "chosen")}
# The fields each format reads (a Parquet file reads these columns only); every other field is ignored.
FORMAT_FIELDS = {"messages": ("messages",), "sharegpt": ("conversations",),
                 "alpaca": ("instruction", "input", "output"), "prompt_completion": ("prompt", "completion"),
                 "prompt_response": ("prompt", "response"), "prompt_chosen": ("prompt", "chosen")}
# Alpaca's prompt is the instruction, then a blank line and the input when there is one (as Alpaca's own
# prompt puts the input in a section below the instruction).
ALPACA_JOIN = "\n\n"
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
UTF8_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """A problem in an input file, reported as "path:line: problem" (Parquet: "path: row N: problem")
    so the user can fix that line."""

    def __init__(self, path, line, problem, unit="line"):
        super().__init__(f"{path}:{line}: {problem}" if unit == "line" else f"{path}: {unit} {line}: {problem}")
        self.path, self.line, self.problem = path, line, problem


def _json_list_items(path, text):
    """(line, value) for each element of a top-level JSON list; json.loads would lose the lines."""
    decoder, space = json.JSONDecoder(), re.compile(r"[ \t\n\r]*")
    pos = space.match(text, space.match(text).end() + 1).end()  # just after "["
    line, counted = 1, 0
    try:
        while not text.startswith("]", pos):
            value, end = decoder.raw_decode(text, pos)
            line, counted = line + text.count("\n", counted, pos), pos
            yield line, value
            pos = space.match(text, end).end()
            if text.startswith(",", pos):
                pos = space.match(text, pos + 1).end()
            elif not text.startswith("]", pos):
                raise json.JSONDecodeError("Expecting ',' or ']'", text, pos)
    except json.JSONDecodeError as e:
        raise DataError(path, e.lineno, _json_problem(e)) from None
    except (ValueError, RecursionError) as e:  # raised at the start of the item being decoded
        raise DataError(path, text.count("\n", 0, pos) + 1, _json_problem(e)) from None
    if space.match(text, pos + 1).end() != len(text):
        raise DataError(path, text.count("\n", 0, pos) + 1, "malformed JSON: extra data after the list")


def _json_problem(e):
    """What json found wrong, in words: not all of its errors are JSONDecodeErrors."""
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON: {e.msg} (column {e.colno})"
    if isinstance(e, RecursionError):
        return "malformed JSON: nested too deeply to read"
    return f"unreadable JSON: {str(e).split(';')[0]}"  # such as an integer of more than 4300 digits


def _json_rows(path, bad):
    """(line, value) per row of a JSONL file (streamed) or a JSON list; bad(line, problem) handles broken lines.

    A UTF-8 byte-order mark and CRLF line ends are accepted. In a JSON list a syntax error cannot be
    skipped (nothing after it can be trusted), so it raises.
    """
    with open(path, "rb") as f:
        head = f.read(1 << 16).removeprefix(UTF8_BOM).lstrip()
        f.seek(0)
        if head.startswith(b"["):
            data = f.read().removeprefix(UTF8_BOM)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(path, data.count(b"\n", 0, e.start) + 1, f"invalid UTF-8 ({e.reason})") from None
            yield from _json_list_items(path, text)
            return
        empty = True
        for number, raw in enumerate(f, 1):
            raw = raw.removeprefix(UTF8_BOM) if number == 1 else raw
            if not raw.strip():
                continue
            empty = False
            try:
                yield number, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                bad(number, f"invalid UTF-8 ({e.reason} at byte {e.start})")
            except (ValueError, RecursionError) as e:
                bad(number, _json_problem(e))
    if empty:
        raise DataError(path, 1, "the file is empty")


def _parquet_rows(path, data_format, bad):
    """(row number, dict) per row of a Parquet file, read one row group at a time so memory stays small.

    Only the columns of the file's format are read. A row group that cannot be decoded (a damaged
    page) is reported with its rows, or with skip_bad_rows skipped and counted as that many bad rows.
    """
    import pyarrow
    import pyarrow.parquet  # only Parquet needs it
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(path, 1, f"not a readable Parquet file ({' '.join(str(e).split())})", unit="row") from None
    names = parquet.schema_arrow.names
    data_format = _detect_format(names) if data_format == "auto" else data_format
    columns = [c for c in FORMAT_FIELDS[data_format] if c in names] if data_format else names
    row = 0
    for group in range(parquet.num_row_groups):
        n_rows = parquet.metadata.row_group(group).num_rows
        try:
            # One thread: decoding is a small share of the time next to tokenizing, and threads hold more buffers.
            table = parquet.read_row_group(group, columns=columns, use_threads=False)
        except (OSError, pyarrow.ArrowException) as e:
            reason = " ".join(str(e).split())  # pyarrow's messages span lines; ours is one
            bad(row + 1, f"rows {row + 1}-{row + n_rows} (row group {group}) cannot be read: {reason}", n_rows)
            row += n_rows
            continue
        for batch in table.to_batches(max_chunksize=1024):
            for values in batch.to_pylist():
                row += 1
                yield row, values
        table = None  # free this row group before reading the next


def _detect_format(keys):
    """The format whose identifying fields are all among `keys` (a row or a Parquet schema), or None."""
    for data_format, needed in FORMAT_KEYS.items():
        if all(k in keys for k in needed):
            return data_format
    return None


def _no_format(row):
    """The problem of a row that matches no format, naming the formats it was checked against."""
    checked = "; ".join(f"{name} ({'+'.join(FORMAT_KEYS[name] if name != 'alpaca' else ('instruction', 'output'))})"
                        for name in FORMAT_KEYS)
    got = f"keys {', '.join(list(row)[:8])}" if isinstance(row, dict) else json.dumps(row)[:40]
    return f"unknown format: the row matches none of {checked}; got {got}"


def _text(obj, key, where="", allow_empty=False):
    """obj[key] if it is a string (non-blank unless allow_empty); else ValueError naming the problem."""
    if key not in obj:
        raise ValueError(f"missing field {where}{key!r}")
    value = obj[key]
    if not isinstance(value, str):
        raise ValueError(f"field {where}{key!r} must be a string, got {json.dumps(value)[:40]}")
    if not allow_empty and not value.strip():
        raise ValueError(f"field {where}{key!r} is empty")
    try:  # JSON may escape half a surrogate pair; the tokenizer would silently turn it into U+FFFD
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"field {where}{key!r} holds an unpaired surrogate \\u{ord(value[e.start]):04x}, "
                         f"which is not text") from None
    return value


def _message_list(row, key):
    """row[key] if it is a non-empty list; else ValueError."""
    if key not in row:
        raise ValueError(f"missing field {key!r}")
    if not isinstance(row[key], list) or not row[key]:
        raise ValueError(f"field {key!r} must be a non-empty list")
    return row[key]


def _chat_turns(messages, names, roles=CHAT_ROLES, role_key="role", content_key="content"):
    """[(prompt, response), ...] of a chat: optional system messages, then user/assistant alternating.

    names[k] is how an error calls messages[k]; roles maps the file's role spellings to ours. System
    text is put in front of the first user message, so it is part of the (masked) prompt.
    """
    system, turns, user, expected = [], [], None, "user"
    for name, message in zip(names, messages):
        if not isinstance(message, dict):
            raise ValueError(f"{name} must be an object with {role_key!r} and {content_key!r}")
        spelled = _text(message, role_key, f"{name}.")
        role = roles.get(spelled)
        content = _text(message, content_key, f"{name}.", allow_empty=role != "assistant")
        if role == "system" and user is None and not turns:
            system.append(content)
        elif role != expected:
            raise ValueError(f"{name}: expected role {expected!r}, got {spelled!r}")
        elif role == "user":
            user, expected = "\n".join(system + [content]), "assistant"
            system = []
        else:
            turns.append((user, content))
            expected = "user"
    if not turns:
        raise ValueError("the conversation must end with an assistant message; it has no assistant turn")
    if expected != "user":
        raise ValueError("the conversation must end with an assistant message")
    return turns


def _prompt_completion_turns(row):
    """TRL's prompt/completion: two strings, or two message lists of which only the completion is trained."""
    prompt, completion = row.get("prompt"), row.get("completion")
    if not isinstance(prompt, list) and not isinstance(completion, list):
        return [(_text(row, "prompt", allow_empty=True), _text(row, "completion"), True)]
    if not (isinstance(prompt, list) and isinstance(completion, list)):
        raise ValueError("fields 'prompt' and 'completion' must both be strings or both lists of messages")
    prompt, completion = _message_list(row, "prompt"), _message_list(row, "completion")
    names = [f"prompt[{k}]" for k in range(len(prompt))] + [f"completion[{k}]" for k in range(len(completion))]
    turns = _chat_turns(prompt + completion, names)
    in_prompt = sum(isinstance(m, dict) and m.get("role") == "assistant" for m in prompt)
    return [(user, answer, k >= in_prompt) for k, (user, answer) in enumerate(turns)]


def _row_turns(row, data_format):
    """Validate one row in the given format and return its [(prompt, response, trained), ...]."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {json.dumps(row)[:40]}")
    if data_format == "messages":
        messages = _message_list(row, "messages")
        return [(u, a, True) for u, a in _chat_turns(messages, [f"messages[{k}]" for k in range(len(messages))])]
    if data_format == "sharegpt":
        messages = _message_list(row, "conversations")
        names = [f"conversations[{k}]" for k in range(len(messages))]
        return [(u, a, True) for u, a in _chat_turns(messages, names, SHAREGPT_ROLES, "from", "value")]
    if data_format == "alpaca":
        instruction, output = _text(row, "instruction"), _text(row, "output")
        extra = row.get("input") or ""  # optional; null in a Parquet column means none
        if not isinstance(extra, str):
            raise ValueError(f"field 'input' must be a string, got {json.dumps(extra)[:40]}")
        return [(instruction + ALPACA_JOIN + extra if extra.strip() else instruction, output, True)]
    if data_format == "prompt_completion":
        return _prompt_completion_turns(row)
    response_key = "response" if data_format == "prompt_response" else "chosen"
    return [(_text(row, "prompt", allow_empty=True), _text(row, response_key), True)]


def _row_messages(row, data_format):
    """Validate one row and return it as a conversation [(role, content, trained), ...] for a model's chat
    template: system messages stay messages (the text templates fold them into the first prompt), a
    single-turn row is one user and one assistant message, and only the assistant messages that
    _row_turns would train are trained."""
    turns = _row_turns(row, data_format)  # validates the row
    if data_format in ("messages", "sharegpt"):
        key, roles, role_key, content_key = (("messages", CHAT_ROLES, "role", "content") if data_format == "messages"
                                             else ("conversations", SHAREGPT_ROLES, "from", "value"))
        spoken = [(roles[m[role_key]], m[content_key]) for m in row[key]]
        return [(role, content, role == "assistant") for role, content in spoken]
    if data_format == "prompt_completion" and isinstance(row["prompt"], list):
        messages = row["prompt"] + row["completion"]
        return [(m["role"], m["content"], m["role"] == "assistant" and k >= len(row["prompt"]))
                for k, m in enumerate(messages)]
    (prompt, response, _), = turns
    return [("user", prompt, False), ("assistant", response, True)]


def iter_examples(path, data_format="auto", skip_bad_rows=False, log=print, found=None, as_messages=False):
    """Yield (line, turns) for each valid row of one file, streamed (a Parquet or JSONL file never loads whole).

    The format is detected from the first usable row (a Parquet file: from its columns) unless
    data_format names one; every row must then be in that format. A bad row raises
    DataError("path:line: problem"), or with skip_bad_rows is skipped, logged and counted.
    `found` receives the file's "format" and its "bad_rows". as_messages=True yields each row as a
    conversation of (role, content, trained) messages instead (see _row_messages).
    """
    found = {} if found is None else found
    found.update(format=None if data_format == "auto" else data_format, bad_rows=0)
    unit = "row" if path.endswith(".parquet") else "line"

    def bad(line, problem, rows=1):
        if not skip_bad_rows:
            raise DataError(path, line, problem, unit)
        found["bad_rows"] += rows
        if found["bad_rows"] <= 5:
            log(f"data: skipping {DataError(path, line, problem, unit)}")

    rows = _parquet_rows(path, data_format, bad) if unit == "row" else _json_rows(path, bad)
    used = 0
    for line, row in rows:
        row_format = found["format"] or (_detect_format(row) if isinstance(row, dict) else None)
        if row_format is None:
            bad(line, _no_format(row))
            continue
        try:
            turns = (_row_messages if as_messages else _row_turns)(row, row_format)
        except ValueError as e:
            bad(line, f"{e} (format {row_format})")
            continue
        found["format"], used = row_format, used + 1
        yield line, turns
    if found["bad_rows"]:
        log(f"data: skipped {found['bad_rows']} bad rows in {path}")
    if not used:
        raise DataError(path, 1, "no usable rows", unit)


# -----------------------------------------------------------------------------
# Demo task: small synthetic instructions a tiny byte-level GPT learns on a CPU in minutes

def _word(rng, alphabet="abcdefghijklmnopqrstuvwxyz", lo=3, hi=6):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _reverse(rng):
    word = _word(rng)
    return f"reverse {word}", word[::-1]


def _sort(rng):
    digits = _word(rng, "0123456789")
    return f"sort {digits}", "".join(sorted(digits))


def _shift(rng):
    """Caesar shift by one letter (z wraps to a): a per-letter rule, as upper-casing is."""
    word = _word(rng)
    return f"shift {word}", "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in word)


def _double(rng):
    word = _word(rng, lo=2, hi=5)
    return f"double {word}", "".join(c + c for c in word)


def _upper(rng):
    word = _word(rng)
    return f"upper {word}", word.upper()


DEMO_TASKS = (_reverse, _sort, _shift, _double, _upper)


def demo_examples(train_per_task=6000, eval_per_task=100, seed=0):
    """(train rows, eval rows) of the demo task; no eval prompt occurs in train.

    Every answer is fully determined by its prompt, so greedy exact match is a fair score.
    """
    rng = random.Random(seed)
    train, evaluation = [], []
    for task in DEMO_TASKS:
        pairs = {}
        while len(pairs) < train_per_task + eval_per_task:  # distinct prompts only
            prompt, response = task(rng)
            pairs.setdefault(prompt, response)
        rows = [{"prompt": p, "response": r} for p, r in pairs.items()]
        evaluation += rows[:eval_per_task]
        train += rows[eval_per_task:]
    rng.shuffle(train)
    return train, evaluation


def _write_if_changed(path, text):
    """Write atomically, and only if the content differs (so the file's hash, the cache key, is stable)."""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_demo(out_dir):
    """Write the demo's train.jsonl and eval.jsonl into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, rows in zip(("train", "eval"), demo_examples()):
        paths.append(os.path.join(out_dir, f"{name}.jsonl"))
        _write_if_changed(paths[-1], "".join(json.dumps(row) + "\n" for row in rows))
    return tuple(paths)


# -----------------------------------------------------------------------------
# Cache: token arrays on disk, keyed by a hash of everything that shaped them

CACHE_VERSION = 2  # bump when the way samples are built changes (2: more formats, templated prompts raw)


# The most training samples one epoch may hold: its plan keeps a Python list per sample (~100 bytes), so
# blend weights that ask for more would exhaust memory before the first step.
MAX_EPOCH_SAMPLES = 2**27


def parse_sources(spec, allow_directories=False):
    """[(path, weight)] from "a.jsonl:2,b.parquet"; a weight multiplies the file's samples per epoch."""
    sources = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        path, _, weight = item.rpartition(":")
        try:
            sources.append((path, float(weight)) if path else (item, 1.0))
        except ValueError:  # a ':' that is part of the path
            sources.append((item, 1.0))
    for path, weight in sources:
        if os.path.isdir(path) and not allow_directories:
            raise FileNotFoundError(f"{path!r} is a directory; a DeepSpeed-Chat local/jsonfile directory goes in "
                                    f"data_path, and its data/eval.json becomes the eval set")
        if not (os.path.isfile(path) or os.path.isdir(path)):
            raise FileNotFoundError(f"data file {path!r} not found")
        if not weight > 0 or math.isinf(weight):
            raise ValueError(f"the weight of {path!r} must be a positive number, got {weight}")
        if weight > MAX_EPOCH_SAMPLES:  # refused before tokenizing: more copies than an epoch holds samples
            raise ValueError(f"the weight of {path!r} in data_path is {weight:g}, but a weight repeats each of "
                             f"the file's samples that many times per epoch and an epoch holds at most "
                             f"{MAX_EPOCH_SAMPLES:,}; lower it")
    return sources


def split_jsonfile_directories(sources):
    """(train files, eval files) where a directory is in DeepSpeed-Chat's local/jsonfile layout:
    DIR/data/train.json trains with the directory's weight and DIR/data/eval.json is an eval file."""
    train, evaluation = [], []
    for path, weight in sources:
        if not os.path.isdir(path):
            train.append((path, weight))
            continue
        files = [os.path.join(path, "data", f"{name}.json") for name in ("train", "eval")]
        for file in files:
            if not os.path.isfile(file):
                raise FileNotFoundError(f"{path!r} is a directory but not in DeepSpeed-Chat's local/jsonfile "
                                        f"layout: {file!r} not found")
        train.append((files[0], weight))
        evaluation.append((files[1], 1.0))
    return train, evaluation


def _file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(train_sources, eval_sources, settings):
    """Hash of the files' contents (not their names), blend weights and every setting that changes samples."""
    key = {"version": CACHE_VERSION, "settings": settings,
           "train": [(_file_sha256(p), w) for p, w in train_sources],
           "eval": [_file_sha256(p) for p, _ in eval_sources]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def eval_share(data_split):
    """The share of samples held out for eval: "98,2" -> 0.02 (DeepSpeed-Chat writes splits this way)."""
    try:
        train_part, eval_part = (float(x) for x in data_split.split(","))
    except ValueError:
        train_part = eval_part = -1.0
    finite = math.isfinite(train_part) and math.isfinite(eval_part)  # "inf,1" would hold out nothing, silently
    if not finite or min(train_part, eval_part) < 0 or train_part + eval_part <= 0:
        raise ValueError(f"data_split must be two finite shares like '98,2', got {data_split!r}")
    return eval_part / (train_part + eval_part)


def _split_indices(file_ranges, train_sources, eval_fraction, seed, has_eval_files):
    """(train index, eval index) into the samples: split each training file, then blend by weight.

    Without eval files, each training file gives a seeded random eval_fraction of its samples to
    eval. A weight w gives floor(w) copies of a file's training samples plus a seeded random
    fraction: "a:2,b:1" trains on each sample of a twice per epoch, "big:0.1" on a tenth of big.
    Weights that would give an epoch more than MAX_EPOCH_SAMPLES are refused before any copy is made.
    """
    rng = np.random.default_rng(seed)
    train, evaluation, planned = [], [], 0
    for k, (first, end) in enumerate(file_ranges):
        ids = np.arange(first, end)
        if k >= len(train_sources):  # an explicit eval file
            evaluation.append(ids)
            continue
        if not has_eval_files:
            ids = rng.permutation(ids)
            n_eval = round(len(ids) * eval_fraction)
            evaluation.append(np.sort(ids[:n_eval]))
            ids = np.sort(ids[n_eval:])
        path, weight = train_sources[k]
        copies, fraction = divmod(weight, 1)
        planned += int(copies) * len(ids) + round(fraction * len(ids))
        if planned > MAX_EPOCH_SAMPLES:
            raise ValueError(f"the weight {weight:g} of {path!r} repeats its {len(ids):,} training samples to "
                             f"{planned:,} samples per epoch, more than the {MAX_EPOCH_SAMPLES:,} an epoch may "
                             f"hold; lower the weights in data_path")
        extra = rng.choice(ids, round(fraction * len(ids)), replace=False)
        train += [ids] * int(copies) + [np.sort(extra)]
    return np.concatenate(train).astype(np.int64), np.concatenate(evaluation).astype(np.int64)


class _ArrayFile:
    """A growing 1-D array kept on disk: values are buffered and appended to a raw file, then saved as
    .npy, so tokenizing a file larger than memory holds one buffer of it at a time."""

    BUFFER = 1 << 20

    def __init__(self, path, dtype):
        self.path, self.dtype, self.flushed = path, np.dtype(dtype), 0
        self.buffer, self.raw = array(self.dtype.char), open(path + ".raw", "w+b")  # same item type as dtype

    def __len__(self):
        return self.flushed + len(self.buffer)

    def extend(self, values):
        self.buffer.extend(values)
        if len(self.buffer) >= self.BUFFER:
            self._flush()

    def _flush(self):
        self.raw.write(self.buffer.tobytes())
        self.flushed, self.buffer = self.flushed + len(self.buffer), array(self.dtype.char)

    def save(self):
        """Write path as .npy (a header, then the raw values copied in chunks) and delete the raw file.

        Plain reads and writes rather than memory maps, so the copy adds no resident pages."""
        self._flush()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.flushed,)}
        with open(self.path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            self.raw.seek(0)
            shutil.copyfileobj(self.raw, out, 1 << 22)
        self.raw.close()
        os.remove(self.path + ".raw")


def build_cache(out_dir, train_sources, eval_sources, enc, settings, log=print):
    """Tokenize every file into flat arrays in a temporary folder, then rename it to out_dir.

    Rows are streamed and tokens go to disk as they come, so memory does not grow with the data.
    The rename is atomic, so a reader sees a complete cache or none, even if the build is killed.
    """
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
    try:
        _tokenize_into(tmp, train_sources, eval_sources, enc, settings, log)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is for every user of the machine
    try:
        os.rename(tmp, out_dir)
    except OSError:  # another machine sharing this folder finished first: same key, same content
        shutil.rmtree(tmp)


def _make_sample(turns, enc, template, chat, loss_on_prompt):
    """((tokens, loss mask, final response start), rendered raw?) of one row; ValueError for a row the
    template cannot turn into a sample."""
    if chat is not None:
        return chat.tokenize(turns, loss_on_prompt), False
    wrapped = already_templated(turns, template)
    row_template = RAW_TEMPLATE if wrapped else template
    if not render_prompt(turns[0][0], row_template):
        raise ValueError(f"the prompt renders to nothing with template {row_template!r}, so the "
                         f"response's first token would have nothing to be predicted from")
    return tokenize_turns(turns, enc, row_template, loss_on_prompt), wrapped


def _tokenize_into(folder, train_sources, eval_sources, enc, settings, log):
    """The cache's arrays and meta.json in folder: samples of every file, and the train/eval split.

    A row whose prompt already holds the template's role markers is rendered raw (prompt + response),
    as DeepSpeed-Chat renders such rows, with one notice per file; see ROLE_MARKERS. With the model's
    own chat template every row is a conversation rendered by it.
    """
    tokens = _ArrayFile(os.path.join(folder, "tokens.npy"), np.uint16 if enc.n_vocab <= 2**16 else np.uint32)
    mask = _ArrayFile(os.path.join(folder, "loss_mask.npy"), np.uint8)
    offsets, starts, trained = array("q", [0]), array("q"), array("q")
    counts = {"rows": 0, "bad_rows": 0, "dropped_too_long": 0, "truncated": 0, "rendered_raw": 0}
    files, file_ranges, template = [], [], settings["template"]
    chat = ChatTemplate(enc) if template == MODEL_TEMPLATE else None
    for path, _ in train_sources + eval_sources:
        first, found, raw_rows = len(starts), {}, 0
        rows = iter_examples(path, settings["data_format"], settings["skip_bad_rows"], log, found, chat is not None)
        for line, turns in rows:
            try:
                sample, wrapped = _make_sample(turns, enc, template, chat, settings["loss_on_prompt"])
            except ValueError as e:  # a row this template cannot make a sample of
                if not settings["skip_bad_rows"]:
                    raise DataError(path, line, str(e), "row" if path.endswith(".parquet") else "line") from None
                counts["bad_rows"] += 1
                continue
            raw_rows += wrapped
            counts["rows"] += 1
            fitted = fit_length(*sample, settings["max_seq_len"], settings["truncate_prompt"])
            if fitted is None:
                counts["dropped_too_long"] += 1
                continue
            sample_tokens, sample_mask, response_start, outcome = fitted
            counts["truncated"] += outcome == "truncated"
            starts.append(len(tokens) + response_start)
            trained.append(sum(sample_mask) - sample_mask[0])  # the first token is never a target
            tokens.extend(sample_tokens)
            mask.extend(sample_mask)
            offsets.append(len(tokens))
        counts["bad_rows"] += found["bad_rows"]
        counts["rendered_raw"] += raw_rows
        if raw_rows:
            log(f"data: {path}: {raw_rows} prompts already hold the template's role markers "
                f"{' '.join(ROLE_MARKERS[resolve_template(template)])}; rendered raw (prompt + response), "
                f"as DeepSpeed-Chat does (--template=raw says so)")
        file_ranges.append((first, len(starts)))
        files.append({"path": path, "format": found["format"], "samples": len(starts) - first, "first": first,
                      "rendered_raw": raw_rows})
        if first == len(starts):
            log(f"data: warning: every sample of {path} is longer than max_seq_len={settings['max_seq_len']}")
    train_index, eval_index = _split_indices(file_ranges, train_sources,
                                             eval_share(settings["data_split"]), settings["seed"], bool(eval_sources))
    if len(train_index) == 0:
        raise ValueError(f"no training samples left ({counts}); raise max_seq_len or use truncate_prompt")
    tokens.save()
    mask.save()
    arrays = {"offsets": np.asarray(offsets), "response_starts": np.asarray(starts), "trained": np.asarray(trained),
              "train_index": train_index, "eval_index": eval_index}
    for name, values in arrays.items():
        np.save(os.path.join(folder, f"{name}.npy"), values)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"counts": counts, "files": files, "settings": settings}, f, indent=1)


def load_cache(cache_path):
    """The cached arrays as read-only memory maps, the build counts, and each file's format and samples."""
    arrays = {name: np.load(os.path.join(cache_path, f"{name}.npy"), mmap_mode="r")
              for name in ("tokens", "loss_mask", "offsets", "response_starts", "trained", "train_index", "eval_index")}
    with open(os.path.join(cache_path, "meta.json")) as f:
        meta = json.load(f)
    return arrays, meta["counts"], meta["files"]


# -----------------------------------------------------------------------------
# Dataset

class SFTDataset:
    """Samples of one split: (input_ids, labels) of length L-1 for a sample of L tokens ending in EOT."""

    def __init__(self, arrays, index, counts, eot_token, max_seq_len, files=()):
        self.files = files  # each input file's path, detected format, and its first sample and count
        self.tokens, self.loss_mask = arrays["tokens"], arrays["loss_mask"]
        self.offsets, self.response_starts = arrays["offsets"], arrays["response_starts"]
        self.index = np.asarray(index)
        self.eot_token, self.max_seq_len = eot_token, max_seq_len
        self.lengths = np.diff(self.offsets)[self.index] - 1
        self.stats = {**self._token_stats(arrays["trained"]), **counts}

    def _token_stats(self, trained):
        """Samples, tokens, and the share of input positions whose target is trained (per-sample counts
        from the cache: summing the mask here would read every token into memory)."""
        positions, n = int(self.lengths.sum()), len(self)
        return {"samples": n, "tokens": positions + n, "trained_tokens": int(trained[self.index].sum()),
                "trained_share": int(trained[self.index].sum()) / max(positions, 1),
                "mean_len": positions / n + 1 if n else 0.0, "max_len": int(self.lengths.max()) + 1 if n else 0}

    def __len__(self):
        return len(self.index)

    def tokens_and_mask(self, i):
        """The sample's full token ids and its 0/1 loss mask (1 = trained when it is a target)."""
        j = self.index[i]
        start, end = self.offsets[j], self.offsets[j + 1]
        return self.tokens[start:end].astype(np.int64), self.loss_mask[start:end]

    def __getitem__(self, i):
        tokens, mask = self.tokens_and_mask(i)
        labels = np.where(mask[1:] == 1, tokens[1:], IGNORE_INDEX)
        return tokens[:-1], labels

    def prompt_and_response(self, i):
        """Prompt tokens (all before the final response) and final response tokens incl. EOT."""
        j = self.index[i]
        start, split, end = self.offsets[j], self.response_starts[j], self.offsets[j + 1]
        return self.tokens[start:split].tolist(), self.tokens[split:end].tolist()


def _barrier():
    """Wait for the other ranks when running under torch.distributed; nothing to do otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _describe(name, stats):
    return (f"{name} {stats['samples']:,} samples, {stats['tokens']:,} tokens (mean {stats['mean_len']:.1f}, "
            f"max {stats['max_len']}), trained share {stats['trained_share']:.1%}")


def prepare_data(data_path, tokenizer_name, max_seq_len, *, eval_data_path="", data_split="98,2",
                 data_format="auto", template=DEFAULT_TEMPLATE, loss_on_prompt=False, truncate_prompt=False,
                 skip_bad_rows=False, seed=1337, cache_dir=".cache/data", log=print):
    """(train, eval) SFTDatasets from "a.jsonl:2,b.parquet,dschat_dir" (or "demo"), cached on disk.

    A directory in DeepSpeed-Chat's local/jsonfile layout trains on its data/train.json and adds its
    data/eval.json to the eval files; with any eval file, data_split is not used.
    Local rank 0 builds the cache while the other ranks of a process group wait at a barrier.
    loss_on_prompt=True trains on every non-padding token, as DeepSpeed-Chat does (for comparison).
    tokenizer_name is gpt2, byte or a tokenizer directory; template=model renders every row with that
    directory's chat template, and each sample then ends with the template's end-of-turn token, which
    the datasets' eot_token names.
    """
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    if data_format not in ("auto",) + FORMATS:
        raise ValueError(f"unknown data_format {data_format!r}; use auto or one of {', '.join(FORMATS)}")
    if template != MODEL_TEMPLATE:
        split_template(template)  # fail early on a bad template or split, before any tokenizing
    eval_share(data_split)
    enc = get_tokenizer(tokenizer_name)
    end_token = ChatTemplate(enc).end_of_turn if template == MODEL_TEMPLATE else enc.eot_token
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if data_path == "demo":  # the demo task, with its held-out eval file
        if local_rank == 0:
            write_demo(os.path.join(cache_dir, "demo"))
        _barrier()
        data_path, eval_data_path = (os.path.join(cache_dir, "demo", f) for f in ("train.jsonl", "eval.jsonl"))
    train_sources, jsonfile_evals = split_jsonfile_directories(parse_sources(data_path, allow_directories=True))
    eval_sources = parse_sources(eval_data_path)
    if not train_sources:
        raise ValueError("data_path names no file; give FILE[:WEIGHT],... or 'demo'")
    if any(w != 1 for _, w in eval_sources):
        raise ValueError("blend weights apply to training files only, not to eval_data_path")
    eval_sources += jsonfile_evals
    # The template's text, so a preset's name and its text share a cache (the format is in data_format
    # or, detected, follows from the files' contents). A tokenizer directory is keyed by what it holds
    # (tokenizer.json, special tokens, chat template), not by where it is.
    settings = {"tokenizer": tokenizer_identity(enc), "eot_token": end_token, "template": resolve_template(template),
                "max_seq_len": max_seq_len, "truncate_prompt": truncate_prompt, "loss_on_prompt": loss_on_prompt,
                "skip_bad_rows": skip_bad_rows, "data_format": data_format, "data_split": data_split, "seed": seed}
    cache_path = os.path.join(cache_dir, cache_key(train_sources, eval_sources, settings))
    built = local_rank == 0 and not os.path.exists(cache_path)
    if built:
        build_cache(cache_path, train_sources, eval_sources, enc, settings, log)
    _barrier()
    arrays, counts, files = load_cache(cache_path)
    train, evaluation = (SFTDataset(arrays, arrays[f"{name}_index"], counts, end_token, max_seq_len, files)
                         for name in ("train", "eval"))
    log(f"data: {'built' if built else 'reused'} cache {cache_path}")
    log(f"data: {_describe('train', train.stats)}; {_describe('eval', evaluation.stats)}")
    log(f"data: {counts['rows']:,} valid rows, {counts['dropped_too_long']} dropped as longer than "
        f"max_seq_len={max_seq_len}, {counts['truncated']} prompts truncated, {counts['bad_rows']} bad rows skipped, "
        f"{counts['rendered_raw']} already-templated prompts rendered raw")
    return train, evaluation


# -----------------------------------------------------------------------------
# Batches: length-grouped or packed micro-batches, sharded over ranks, resumable

class Batches:
    """Endless micro-batches for one data-parallel rank.

    An epoch's list of global micro-batches depends only on (dataset, batch_size, seed, epoch,
    packing), never on world_size: rank r takes micro-batches r, r+W, r+2W, ..., so two ranks see
    exactly what one rank would see in two steps, and a run can resume on another number of ranks.
    A micro-batch is a list of rows and a row a list of sample indices (one unless packing).
    group_by_length=False keeps batches fully random: on data whose length reveals the task (the
    demo), length-grouped batches hold one task each and train much worse.
    """

    MEGA_CHUNK = 64  # length-grouping sorts windows of 64 batches: similar lengths, still random

    def __init__(self, dataset, batch_size, *, rank=0, world_size=1, seed=1337, packing=False, shuffle=True,
                 group_by_length=True):
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"need 0 <= rank < world_size and batch_size >= 1, got {rank}, {world_size}, {batch_size}")
        self.dataset, self.batch_size, self.rank, self.world_size = dataset, batch_size, rank, world_size
        self.seed, self.packing, self.shuffle, self.group_by_length = seed, packing, shuffle, group_by_length
        self.padding_positions = self.total_positions = 0
        self._start_epoch(0)

    def _start_epoch(self, epoch):
        self.epoch, self.step = epoch, 0
        self._plan = self._plan_epoch(epoch)
        self.batches_per_epoch = len(self._plan) // self.world_size  # per rank; packing may vary it by epoch
        self.dropped_batches = len(self._plan) % self.world_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(self.dataset)} samples give {len(self._plan)} micro-batches of "
                             f"{self.batch_size}, fewer than the {self.world_size} ranks")

    def _plan_epoch(self, epoch):
        """The epoch's global micro-batches, from a generator seeded by (seed, epoch)."""
        rng = np.random.default_rng([self.seed, epoch])
        n, B = len(self.dataset), self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.packing:
            rows = self._pack(order)
        else:
            if self.shuffle and self.group_by_length:  # sort windows by length so a batch pads little
                chunks = [order[i:i + B * self.MEGA_CHUNK] for i in range(0, n, B * self.MEGA_CHUNK)]
                order = np.concatenate([c[np.argsort(-self.dataset.lengths[c], kind="stable")] for c in chunks])
            rows = [[i] for i in order.tolist()]
        batches = [rows[i:i + B] for i in range(0, len(rows), B)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def _pack(self, order):
        """Fill rows of max_seq_len-1 positions with whole samples, in order (next-fit: simple, O(n))."""
        capacity, lengths = self.dataset.max_seq_len - 1, self.dataset.lengths
        rows, row, used = [], [], 0
        for i in order.tolist():
            if used + lengths[i] > capacity:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += lengths[i]
        return rows + [row] if row else rows

    def next_batch(self):
        """{"input_ids", "labels", "segment_ids", "samples"}; moves to the next, reshuffled epoch when one
        ends. "samples" says where the batch came from (epoch, global micro-batch, the training set's
        sample indices per row), so that a batch that misbehaves can be looked at."""
        position = self.step * self.world_size + self.rank
        rows, samples = self._plan[position], {"epoch": self.epoch, "micro_batch": position}
        self.step += 1
        if self.step == self.batches_per_epoch:  # so epoch and batches_per_epoch describe the next batch
            self._start_epoch(self.epoch + 1)
        return {**self._collate(rows), "samples": {**samples, "rows": rows}}

    def _collate(self, rows):
        """Pad rows with EOT ids (label -100); when packing, mark each sample and the padding as segments."""
        samples = [[self.dataset[i] for i in row] for row in rows]
        T = self.dataset.max_seq_len - 1 if self.packing else max(sum(len(x) for x, _ in row) for row in samples)
        input_ids = torch.full((len(rows), T), self.dataset.eot_token, dtype=torch.long)  # (B, T)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        segment_ids = torch.zeros((len(rows), T), dtype=torch.long) if self.packing else None
        for r, row in enumerate(samples):
            pos = 0
            for s, (x, y) in enumerate(row):
                input_ids[r, pos:pos + len(x)] = torch.from_numpy(x)
                labels[r, pos:pos + len(x)] = torch.from_numpy(y)
                if self.packing:
                    segment_ids[r, pos:pos + len(x)] = s
                pos += len(x)
            if self.packing:
                segment_ids[r, pos:] = len(row)  # padding is a segment of its own
            self.padding_positions += T - pos
        self.total_positions += len(rows) * T
        return {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids}

    @property
    def padding_fraction(self):
        """Share of the positions served so far that were padding (compute spent on nothing)."""
        return self.padding_positions / max(self.total_positions, 1)

    def state_dict(self):
        """Where we are: epoch and global micro-batches consumed, so any world size can resume."""
        return {"epoch": self.epoch, "position": self.step * self.world_size, "samples": len(self.dataset)}

    def load_state_dict(self, state):
        if state["samples"] != len(self.dataset):
            raise ValueError(f"it was taken on {state['samples']} training samples but the data now gives "
                             f"{len(self.dataset)}; resume with the same data and data options")
        if state["position"] % self.world_size:
            raise ValueError(f"it stopped after {state['position']} micro-batches of epoch {state['epoch']}, which "
                             f"{self.world_size} ranks cannot share evenly; resume on a number of ranks that "
                             f"divides {state['position']}")
        self._start_epoch(state["epoch"])
        self.step = state["position"] // self.world_size
        if self.step >= self.batches_per_epoch:  # on fewer batches per rank, the rest of that epoch is its tail
            self._start_epoch(state["epoch"] + 1)


def check_data_files(spec, option):
    """One sentence for a data path that exists but cannot be read as data (a FIFO would block the
    reader; a symlink loop never resolves) and for a FILE:WEIGHT whose weight is no number, where the
    data loader would only say "not found". A path that does not exist is left to it to name."""
    for item in filter(None, (part.strip() for part in spec.split(","))):
        path, colon, weight = item.rpartition(":")
        if colon and not os.path.lexists(item) and os.path.lexists(path):
            try:
                float(weight)
            except ValueError:
                raise ValueError(f"--{option}: in {item}, {weight!r} is not a weight (FILE:WEIGHT takes a positive "
                                  f"number, as in {path}:2)") from None
        else:
            path = item
        try:
            mode = os.stat(path).st_mode
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ValueError(f"--{option}: {path} is a symbolic link that loops back on itself") from None
            continue
        kind = {stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device"}.get(stat.S_IFMT(mode))
        if kind:
            raise ValueError(f"--{option}: {path} is {kind}, not a regular file")


# -----------------------------------------------------------------------------
# Command line: look at the data a model will be trained on

def show_sample(tokens, mask, enc, color):
    """A sample's text with trained tokens in green (terminal) or in [[double brackets]]."""
    trained = np.concatenate([[0], mask[1:]])  # the first token is never a target
    cuts = [0] + [k for k in range(1, len(tokens)) if trained[k] != trained[k - 1]] + [len(tokens)]
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        text = enc.decode(tokens[a:b].tolist())
        parts.append((f"\033[32m{text}\033[0m" if color else f"[[{text}]]") if trained[a] else text)
    return "".join(parts)


def show_files(dataset, enc, color):
    """Each file's detected format, then the first sample of each format as it will be trained."""
    shown = set()
    for file in dataset.files:
        raw = f", {file['rendered_raw']} already-templated prompts rendered raw" if file["rendered_raw"] else ""
        print(f"file {file['path']}: format {file['format']}, {file['samples']:,} samples{raw}")
        if file["format"] == "alpaca":
            print(f"  alpaca: prompt = instruction + {ALPACA_JOIN!r} + input "
                  "(the instruction alone when input is empty)")
    for file in dataset.files:
        if file["format"] not in shown and file["samples"]:
            shown.add(file["format"])
            start, end = dataset.offsets[file["first"]], dataset.offsets[file["first"] + 1]
            text = show_sample(dataset.tokens[start:end].astype(np.int64), dataset.loss_mask[start:end], enc, color)
            print(f"--- first sample of format {file['format']} ({file['path']})\n{text}")


# The trainer's options that shape what inspect shows, with their defaults and meanings.
INSPECT_OPTIONS = ("data_path", "eval_data_path", "data_split", "data_format", "tokenizer", "max_seq_len", "template",
                   "loss_on_prompt", "truncate_prompt", "skip_bad_rows", "seed", "cache_dir", "batch_size")


def main(argv):
    """`inspect`: each file's format, samples with trained tokens marked, and statistics; `demo`: write
    the demo files. A bad option or bad data exits with status 2 and one line naming it."""
    # Imported here: options.py imports this module for the template's default.
    from options import CHOICES, OPTIONS, RANGES, OptionError, parse_options
    try:
        if argv[:1] == ["demo"]:
            o, _ = parse_options(argv[1:], {"out_dir": ("demo_data", "where the demo's files are written")},
                                 doc=__doc__)
            print("wrote", *write_demo(o["out_dir"]))
        elif argv[:1] == ["inspect"]:
            table = {name: OPTIONS[name] for name in INSPECT_OPTIONS}
            table["data_path"] = ("", "the files to inspect, as train_sft.py's --data_path takes them")
            table["num_samples"] = (3, "samples shown with their trained tokens marked")
            o, _ = parse_options(argv[1:], table, CHOICES, RANGES, __doc__)
            if not o["data_path"]:
                raise OptionError("inspect needs --data_path=FILE (or --data_path=demo --tokenizer=byte)")
            inspect(o)
        else:
            sys.exit(__doc__)
    except (OSError, ValueError) as e:  # OptionError included: one line naming the option, file or row
        print(f"data.py: error: {e}", file=sys.stderr)
        sys.exit(2)


def inspect(o):
    """Prints what training on o["data_path"] would see: formats, samples with trained tokens marked,
    and the padding share of one epoch, length-grouped and packed."""
    train, _ = prepare_data(o["data_path"], o["tokenizer"], o["max_seq_len"], eval_data_path=o["eval_data_path"],
                            data_split=o["data_split"], data_format=o["data_format"], template=o["template"],
                            loss_on_prompt=o["loss_on_prompt"], truncate_prompt=o["truncate_prompt"],
                            skip_bad_rows=o["skip_bad_rows"], seed=o["seed"], cache_dir=o["cache_dir"])
    enc, color = get_tokenizer(o["tokenizer"]), sys.stdout.isatty()
    print("trained tokens are " + ("\033[32mgreen\033[0m" if color else "[[in double brackets]]"))
    show_files(train, enc, color)
    for i in range(min(o["num_samples"], len(train))):
        text = show_sample(*train.tokens_and_mask(i), enc, color)
        print(f"--- sample {i} ({train.lengths[i] + 1} tokens)\n{text}")
    for packing in (False, True):
        batches = Batches(train, o["batch_size"], seed=o["seed"], packing=packing)
        for _ in range(batches.batches_per_epoch):
            batches.next_batch()
        print(f"padding share over one epoch, batch_size={o['batch_size']}, "
              f"{'packed' if packing else 'length-grouped'}: {batches.padding_fraction:.1%}")

if __name__ == "__main__":
    main(sys.argv[1:])
