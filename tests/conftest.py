"""Shared test setup.

Triton reads TRITON_INTERPRET when it is imported (transformers imports it too), so the flag is
set here, before any test module loads: without a GPU the Triton kernels then run on the CPU
under Triton's interpreter. With a GPU they compile as usual."""
import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
