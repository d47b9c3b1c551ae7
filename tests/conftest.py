"""Shared test setup and helpers: the trainer launcher, the tiny model's options, a data writer and a
tiny ChatML tokenizer directory.

Triton reads TRITON_INTERPRET when it is imported (transformers imports it too), so the flag is
set here, before any test module loads: without a GPU the Triton kernels then run on the CPU
under Triton's interpreter. With a GPU they compile as usual."""
import json
import os
import random
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough that a run of a few steps takes about a second.
TINY = ["--tokenizer=byte", "--n_layer=2", "--n_head=2", "--n_embd=32", "--max_seq_len=48", "--batch_size=4",
        "--learning_rate=3e-3", "--log_interval=1", "--seed=7"]


def write_reverse_pairs(path, count):
    """Reverse-a-word pairs: small, varied lengths, so batches carry different padding."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(count):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            f.write(json.dumps({"prompt": f"reverse {word}", "response": word[::-1]}) + "\n")
    return str(path)


def run_trainer(args, tmp_path, nproc=1, check=True, env=None, script="train_sft.py", tiny=TINY):
    """Runs the trainer (or another script taking its options) on the tiny model (options `tiny`) in a
    fresh process, under torchrun with gloo when nproc > 1, with a cache of its own in tmp_path unless
    args name one; environment: ours plus env. Returns the completed process; with check, a failure raises."""
    cache = [] if any(a.startswith("--cache_dir") for a in args) else ["--cache_dir=" + str(tmp_path / "cache")]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *launcher, script, *tiny, *cache, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(output_dir):
    """{step: loss} of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    """240 reverse-a-word pairs in a JSONL file, shared by a module's tests."""
    return write_reverse_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 240)


# ----------------------------------------------------------------------------- a tiny chat tokenizer

# A Qwen2-style ChatML template (a default system message when the conversation has none), written out
# with block tags on lines of their own, so that it renders right only under trim_blocks and lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unsupported role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _training_text():
    """A few hundred short chat-like strings, enough for a byte-level BPE of a few hundred merges."""
    words = ("the cat dog sat on a mat hello world what is two plus four answer reverse sort shift upper "
             "system user assistant you are helpful brief be yes no please thanks").split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5)) for i in range(400)]


def make_chatml_tokenizer_dir(path, chat_template=CHATML_TEMPLATE, **config):
    """Write a tiny Hugging Face tokenizer directory at path, built here (nothing downloads): a byte-level
    BPE with ChatML's special tokens, tokenizer_config.json with eos <|im_end|>, pad <|endoftext|> and
    chat_template (None leaves it out; **config overrides fields), and generation_config.json whose
    eos_token_id is a list, as instruct models write it. Returns the directory as a string."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(path, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_training_text(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in CHATML_SPECIAL_TOKENS])
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>", "chat_template": chat_template, **config}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=1)
    ids = {t: tokenizer.token_to_id(t) for t in CHATML_SPECIAL_TOKENS}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}, f)
    return str(path)
