"""Tests for tokenizer.py: the Hugging Face side: tokenizer directories through `tokenizers`, the model's own chat
template (--template=model) checked against transformers' apply_chat_template, its label masks and bad
input, the cache key, and the tokenizer an HF export carries (gpt2 written from the r50k ranks).
Every tokenizer directory is built here by conftest.make_chatml_tokenizer_dir; nothing downloads."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHATML_TEMPLATE, ROOT, make_chatml_tokenizer_dir
from data import DataError, prepare_data
from tokenizer import ChatTemplate, chat_prompt, get_tokenizer, save_tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what is two plus four"},
                {"role": "assistant", "content": "six"}, {"role": "user", "content": "say hello"},
                {"role": "assistant", "content": "hello world"}]


@pytest.fixture(scope="module")
def chatml(tmp_path_factory):
    return make_chatml_tokenizer_dir(tmp_path_factory.mktemp("chatml"))


def reference(directory):
    """transformers' own reading of the directory, the peer our ids must equal."""
    return transformers.AutoTokenizer.from_pretrained(directory)


def reference_ids(directory, messages, add_generation_prompt=False):
    return list(reference(directory).apply_chat_template(messages, tokenize=True, return_dict=True,
                                                          add_generation_prompt=add_generation_prompt)["input_ids"])


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def prepare(tmp_path, files, tokenizer, template="model", **kwargs):
    return prepare_data(files, tokenizer, 256, template=template, data_split="100,0",
                        cache_dir=str(tmp_path / "cache"), log=lambda line: None, **kwargs)[0]


def trained_ids(dataset, i=0):
    return [t for t in dataset[i][1].tolist() if t != -100]


# -- tokenizer directories --------------------------------------------------------------------

def test_directory_tokenizer_has_the_tiktoken_face_and_transformers_ids(chatml):
    enc, hf = get_tokenizer(chatml), reference(chatml)
    im_end, endoftext = hf.convert_tokens_to_ids("<|im_end|>"), hf.convert_tokens_to_ids("<|endoftext|>")
    text = "hello world<|im_end|> what is two"
    assert enc.encode(text, allowed_special="all") == hf(text, add_special_tokens=False)["input_ids"]
    assert im_end in enc.encode(text, allowed_special="all") and im_end not in enc.encode_ordinary(text)
    assert enc.decode(enc.encode(text, allowed_special="all")) == text == enc.decode(enc.encode_ordinary(text))
    assert enc.n_vocab == len(hf) and enc.eot_token == im_end == hf.eos_token_id
    assert enc.stop_tokens == sorted([im_end, endoftext])  # generation_config's eos_token_id is a list
    assert enc.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


def test_without_an_eos_in_tokenizer_config_the_first_generation_eos_ends_responses(tmp_path):
    directory = make_chatml_tokenizer_dir(tmp_path / "a", eos_token=None)
    enc = get_tokenizer(directory)
    assert enc.eot_token == enc._tokenizer.token_to_id("<|im_end|>")
    os.remove(os.path.join(directory, "generation_config.json"))
    with pytest.raises(ValueError, match=f"^{directory} names no eos token .*$"):
        get_tokenizer(directory)


def test_missing_directory_or_tokenizer_json_is_one_sentence(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=f"no directory {missing} is on disk \\(nothing is downloaded\\)$"):
        get_tokenizer(str(missing))
    with pytest.raises(ValueError, match=f"^tokenizer directory {tmp_path} has no tokenizer.json"):
        get_tokenizer(str(tmp_path))
    directory = make_chatml_tokenizer_dir(tmp_path / "bad", eos_token="<|not_a_token|>")
    with pytest.raises(ValueError, match="tokenizer_config.json: eos_token '<\\|not_a_token\\|>' is not a token"):
        get_tokenizer(directory)


def test_a_text_template_ends_each_response_with_the_directorys_eos(tmp_path, chatml):
    path = write(tmp_path / "a.jsonl", [{"prompt": "hello", "response": "world"}])
    train = prepare(tmp_path, path, chatml, template="deepspeed_chat")
    enc = get_tokenizer(chatml)
    assert trained_ids(train) == enc.encode_ordinary(" world") + [enc.eot_token]
    assert train.tokens_and_mask(0)[0].tolist()[:-1] == enc.encode_ordinary(" Human: hello Assistant: world")


# -- the model's own chat template ------------------------------------------------------------

@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3]],
                         ids=["system_two_turns", "default_system", "one_turn"])
def test_rendered_ids_equal_transformers_apply_chat_template(chatml, messages):
    chat = ChatTemplate(get_tokenizer(chatml))
    assert chat.encode(messages) == reference_ids(chatml, messages)
    assert chat.encode(messages[:-1], add_generation_prompt=True) == \
        reference_ids(chatml, messages[:-1], add_generation_prompt=True)
    assert chat.render(messages) == reference(chatml).apply_chat_template(messages, tokenize=False)


def test_model_template_trains_exactly_the_assistant_turns_and_their_end_of_turn(tmp_path, chatml):
    train = prepare(tmp_path, write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), chatml)
    enc = get_tokenizer(chatml)
    im_end = enc.encode("<|im_end|>", allowed_special="all")
    assert trained_ids(train) == enc.encode_ordinary("six") + im_end + enc.encode_ordinary("hello world") + im_end
    whole = reference_ids(chatml, CONVERSATION)
    tokens = train.tokens_and_mask(0)[0].tolist()
    assert tokens == whole[:len(tokens)] and whole[len(tokens):] == enc.encode_ordinary("\n")  # ChatML's last newline
    assert train.eot_token == im_end[0]
    prompt, response = train.prompt_and_response(0)
    assert prompt == reference_ids(chatml, CONVERSATION[:-1], add_generation_prompt=True)
    assert response == enc.encode_ordinary("hello world") + im_end


def test_every_conversational_format_renders_as_its_messages(tmp_path, chatml):
    """Single-turn rows are one user and one assistant message; an assistant message inside a TRL
    prompt is context, rendered but not trained."""
    user, answer = {"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}
    cases = [({"prompt": "say hello", "response": "hello world"}, [user, answer], 1),
             ({"instruction": "say hello", "output": "hello world"}, [user, answer], 1),
             ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "say hello"},
                                 {"from": "gpt", "value": "hello world"}]}, [CONVERSATION[0], user, answer], 1),
             ({"prompt": CONVERSATION[:4], "completion": [answer]}, CONVERSATION[:4] + [answer], 1)]
    enc = get_tokenizer(chatml)
    for k, (row, messages, trained_turns) in enumerate(cases):
        train = prepare(tmp_path, write(tmp_path / f"{k}.jsonl", [row]), chatml)
        tokens = train.tokens_and_mask(0)[0].tolist()
        assert tokens == reference_ids(chatml, messages)[:len(tokens)], row
        assert trained_ids(train) == enc.encode("hello world<|im_end|>", allowed_special="all"), row


def test_loss_on_prompt_trains_the_whole_rendered_conversation(tmp_path, chatml):
    train = prepare(tmp_path, write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]), chatml,
                    loss_on_prompt=True)
    assert train[0][1].tolist() == train[0][0].tolist()[1:] + [train.tokens_and_mask(0)[0][-1]]


def test_chat_prompt_for_sampling_equals_transformers_generation_prompt(chatml):
    enc = get_tokenizer(chatml)
    ids, stops = chat_prompt(enc, CONVERSATION[:2])
    assert ids == reference_ids(chatml, CONVERSATION[:2], add_generation_prompt=True)
    assert stops == enc.stop_tokens and ChatTemplate(enc).end_of_turn in stops


def test_inspect_shows_the_trained_spans_of_a_chat_template(tmp_path, chatml):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    out = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "inspect", f"--data_path={path}",
                          f"--tokenizer={chatml}", "--template=model", f"--cache_dir={tmp_path / 'cache'}",
                          "--batch_size=1", "--data_split=100,0"], capture_output=True, text=True, check=True).stdout
    assert ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nwhat is two plus four<|im_end|>\n"
            "<|im_start|>assistant\n[[six<|im_end|>]]\n<|im_start|>user\nsay hello<|im_end|>\n"
            "<|im_start|>assistant\n[[hello world<|im_end|>]]") in out


# -- bad input --------------------------------------------------------------------------------

def test_model_template_needs_a_chat_template(tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    bare = make_chatml_tokenizer_dir(tmp_path / "bare", chat_template=None)
    with pytest.raises(ValueError, match=f"^--template=model .*, but {bare}'s tokenizer_config.json has no "
                                         "chat_template;"):
        prepare(tmp_path, path, bare)
    with pytest.raises(ValueError, match="^--template=model .*, but tokenizer byte has none;"):
        prepare(tmp_path, path, "byte")


BROKEN_TEMPLATES = {
    # raises on one row only: the row's file and line are named, and skip_bad_rows skips it
    "fails_on_a_row": (CHATML_TEMPLATE.replace("{% for message in messages %}", "{% for message in messages %}\n"
                                               "{% if 'forbidden' in message['content'] %}"
                                               "{{ raise_exception('no forbidden words') }}{% endif %}"),
                       "the chat template of {dir} fails to render this conversation: no forbidden words"),
    # renders user and assistant messages only: a system message would vanish from the training text
    "no_system_role": (CHATML_TEMPLATE.replace("{% if message['role'] not in ['system', 'user', 'assistant'] %}",
                                               "{% if message['role'] == 'system' %}{% continue %}{% endif %}\n"
                                               "{% if message['role'] not in ['system', 'user', 'assistant'] %}"),
                       "the chat template of {dir} does not render messages[0] (role 'system'): the template has no "
                       "such role or drops it"),
    # writes earlier answers differently from the last one (as templates that drop old reasoning do)
    "not_a_prefix": (CHATML_TEMPLATE.replace("{{ message['content'] }}", "{{ message['content'] }}{{ ' (said before)' "
                                             "if message['role'] == 'assistant' and not loop.last }}"),
                     "the chat template of {dir} renders messages[:3] as tokens that are not a prefix of the whole "
                     "conversation's, so the assistant turn messages[2] cannot be masked"),
}


@pytest.mark.parametrize("name", BROKEN_TEMPLATES)
def test_a_row_a_template_cannot_render_names_file_line_template_and_turn(tmp_path, name):
    template, problem = BROKEN_TEMPLATES[name]
    directory = make_chatml_tokenizer_dir(tmp_path / name, chat_template=template)
    good = {"messages": [{"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [*CONVERSATION[:3], {"role": "user", "content": "forbidden"}, CONVERSATION[4]]}
    path = write(tmp_path / "chat.jsonl", [good, bad])
    with pytest.raises(DataError) as error:
        prepare(tmp_path, path, directory)
    assert str(error.value) == f"{path}:2: " + problem.format(dir=directory)
    train = prepare(tmp_path, path, directory, skip_bad_rows=True)
    assert len(train) == 1 and train.stats["bad_rows"] == 1


def test_a_template_that_writes_no_end_of_turn_or_no_prefix_generation_prompt_is_refused(tmp_path):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    no_end = make_chatml_tokenizer_dir(tmp_path / "no_end", chat_template=CHATML_TEMPLATE.replace(
        "{{ message['content'] }}<|im_end|>", "{{ message['content'] }}"))
    with pytest.raises(ValueError, match=f"^the chat template of {no_end} writes no special token after an assistant "
                                         "message, so the end of a response cannot be marked$"):
        prepare(tmp_path, path, no_end)
    chatty = make_chatml_tokenizer_dir(tmp_path / "chatty", chat_template=CHATML_TEMPLATE.replace(
        "<|im_start|>assistant\n{% endif %}", "<|im_start|>assistant\nSure: {% endif %}"))
    with pytest.raises(ValueError, match=f"^the chat template of {chatty} renders messages\\[:1\\] with its generation "
                                         "prompt as tokens that are not a prefix"):
        prepare(tmp_path, path, chatty)
    broken = make_chatml_tokenizer_dir(tmp_path / "broken", chat_template="{% for m in messages %}")
    with pytest.raises(ValueError, match=f"^the chat template of {broken} is not a valid Jinja template"):
        prepare(tmp_path, path, broken)


# -- the cache key ----------------------------------------------------------------------------

def test_cache_key_follows_the_tokenizer_and_its_chat_template_not_its_path(tmp_path, chatml):
    path = write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])

    def caches(tokenizer, template="model"):
        prepare(tmp_path, path, tokenizer, template=template)
        return set(os.listdir(tmp_path / "cache"))

    seen = caches(chatml)
    shutil.copytree(chatml, tmp_path / "copy")
    assert caches(str(tmp_path / "copy")) == seen  # the same tokenizer elsewhere shares the cache
    other_template = make_chatml_tokenizer_dir(tmp_path / "other_template",
                                               chat_template=CHATML_TEMPLATE.replace("helpful", "brief"))
    other_eos = make_chatml_tokenizer_dir(tmp_path / "other_eos", eos_token="<|endoftext|>")
    for change in [dict(tokenizer=other_template), dict(tokenizer=other_eos), dict(tokenizer=chatml, template="chat"),
                   dict(tokenizer="gpt2", template="chat")]:
        now = caches(**change)
        assert len(now) == len(seen) + 1, change
        seen = now
    with open(tmp_path / "copy" / "tokenizer.json") as f:
        vocabulary = json.load(f)
    vocabulary["model"]["vocab"]["zzz"] = len(vocabulary["model"]["vocab"]) + 100
    with open(tmp_path / "copy" / "tokenizer.json", "w") as f:  # the same path, another vocabulary
        json.dump(vocabulary, f)
    assert len(caches(str(tmp_path / "copy"))) == len(seen) + 1


# -- the tokenizer of an HF export ------------------------------------------------------------

def test_export_copies_a_directory_tokenizer_and_keeps_the_models_config(tmp_path, chatml):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text('{"model_type": "qwen2"}')
    (tmp_path / "source").mkdir()
    for file in os.listdir(chatml):
        shutil.copy(os.path.join(chatml, file), tmp_path / "source" / file)
    (tmp_path / "source" / "config.json").write_text('{"model_type": "other"}')
    save_tokenizer(str(tmp_path / "source"), str(hf_dir))
    assert (hf_dir / "config.json").read_text() == '{"model_type": "qwen2"}'
    assert sorted(os.listdir(hf_dir)) == ["config.json", "generation_config.json", "tokenizer.json",
                                          "tokenizer_config.json"]
    assert reference_ids(str(hf_dir), CONVERSATION) == reference_ids(chatml, CONVERSATION)
    assert get_tokenizer(str(hf_dir)).identity == get_tokenizer(chatml).identity


@pytest.fixture(scope="module")
def gpt2_export(tmp_path_factory):
    hf_dir = tmp_path_factory.mktemp("gpt2_hf")
    save_tokenizer("gpt2", str(hf_dir))
    return str(hf_dir)


def test_gpt2_export_loads_in_transformers_with_tiktokens_ids(gpt2_export):
    hf, enc = reference(gpt2_export), get_tokenizer("gpt2")
    assert len(hf) == 50257 and hf.eos_token == hf.bos_token == "<|endoftext|>" and hf.eos_token_id == 50256
    texts = ["Hello world", "  two  spaces\n\n\tand tabs ", "don't I'LL you've 12345 3.14", "naïve café 日本語 🙂",
             "<|endoftext|> ends"]
    for text in texts:
        assert hf(text)["input_ids"] == enc.encode(text, allowed_special="all"), text
        assert hf.decode(hf(text)["input_ids"]) == text


# The characters where GPT-2's split pattern has its cases: spaces of every kind, contractions, digits, marks.
GPT2_TRICKY = st.text(alphabet=st.sampled_from(list(" \t\n\r\u00a0\u2028\u3000'sdmtlvreSDLV09²٣aZéß日本🙂\u0301.,!-")))


@settings(max_examples=300, deadline=None)
@given(text=st.one_of(st.text(), GPT2_TRICKY))
def test_gpt2_export_ids_equal_tiktokens_on_any_text(gpt2_tokenizer, text):
    assert gpt2_tokenizer.encode(text, add_special_tokens=False).ids == get_tokenizer("gpt2").encode_ordinary(text)


@pytest.fixture(scope="module")
def gpt2_tokenizer(gpt2_export):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(os.path.join(gpt2_export, "tokenizer.json"))
    tokenizer.encode_special_tokens = True  # encode_ordinary's view: "<|endoftext|>" in text is text
    return tokenizer


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(st.text(), GPT2_TRICKY, st.just("a<|endoftext|>b")))
def test_the_byte_tokenizers_export_gives_its_ids_in_transformers_and_here(byte_export, text):
    """The byte tokenizer had no Hugging Face form, so the demo's hf/ held no tokenizer for AutoTokenizer."""
    hf, ours = byte_export
    byte = get_tokenizer("byte")
    assert hf(text)["input_ids"] == byte.encode(text, allowed_special="all") == ours.encode(text, "all")
    assert ours.encode_ordinary(text) == byte.encode_ordinary(text)
    assert hf.decode(hf(text)["input_ids"]) == text


@pytest.fixture(scope="module")
def byte_export(tmp_path_factory):
    hf_dir = str(tmp_path_factory.mktemp("byte_hf"))
    save_tokenizer("byte", hf_dir)
    hf, ours = reference(hf_dir), get_tokenizer(hf_dir)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == ours.eot_token == 256 and len(hf) == 257
    return hf, ours
