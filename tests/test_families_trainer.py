"""The Llama family through the trainer and the sampler: a Qwen2-shaped Hugging Face directory with its own
tokenizer and chat template fine-tuned with --template=model (data.py inspect shows what it trains, the
export loads in transformers with the same tokenizer, sample.py chats through the template), a Llama-shaped
model from scratch trained alike by the engines and stages that lay it out differently, and the bad input of
this path."""
import json
import os
import re

import pytest
import torch

import data
import sample
from checkpoint import starting_checkpoint
from conftest import ROOT, TINY, make_chatml_tokenizer_dir, train_here, train_losses
from model import GPT, family_config
from options import OptionError, parse_options
from tokenizer import ChatTemplate, get_tokenizer

# Options for a model from a directory: its sizes and tokenizer are the directory's.
FROM_DIR = ["--max_seq_len=96", "--batch_size=4", "--learning_rate=3e-3", "--log_interval=1", "--seed=7"]


def chat_rows(count):
    """Multi-turn conversations, every other one with a system message, in words the tiny tokenizer knows."""
    rows = []
    for i in range(count):
        system = [{"role": "system", "content": "be brief"}] if i % 2 else []
        rows.append({"messages": system + [
            {"role": "user", "content": f"what is two plus {i}"}, {"role": "assistant", "content": f"answer {i + 2}"},
            {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "yes please" if i % 3 else "no"}]})
    return rows


@pytest.fixture(scope="module")
def qwen2_run(tmp_path_factory):
    """A tiny random Qwen2 made by transformers, saved with a ChatML tokenizer directory, fine-tuned for 2 steps
    with --init_from=DIR --template=model and no --tokenizer. Returns (DIR, the data file, the run's directory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    tmp = tmp_path_factory.mktemp("qwen2")
    directory = tmp / "qwen2"
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    make_chatml_tokenizer_dir(directory)  # after the model: its generation_config.json is the tokenizer's
    assert get_tokenizer(str(directory)).n_vocab <= 448
    data_file = tmp / "chats.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in chat_rows(24)))
    out = tmp / "run"
    train_here([f"--init_from={directory}", "--template=model", f"--data_path={data_file}", "--max_steps=2",
                f"--output_dir={out}"], tmp, tiny=FROM_DIR)
    return directory, data_file, out


def test_a_qwen2_directory_trains_on_its_own_tokenizer_and_exports_whole(qwen2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    directory, _, out = qwen2_run
    assert sorted(train_losses(out)) == [1, 2]
    hf_dir = out / "hf"
    trained_with = json.loads((hf_dir / "sft_config.json").read_text())
    assert trained_with["tokenizer"] == str(hf_dir) and trained_with["template"] == "model"
    # The export's tokenizer is the training tokenizer: the same ids as ours on text with special tokens,
    # and the same rendered chat as our template.
    ours, theirs = get_tokenizer(str(directory)), AutoTokenizer.from_pretrained(hf_dir)
    text = "<|im_start|>user\nwhat is two plus four<|im_end|>\nhello world the cat sat"
    assert theirs(text, add_special_tokens=False)["input_ids"] == ours.encode(text, allowed_special="all")
    messages = chat_rows(2)[1]["messages"]
    rendered = theirs.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert list(rendered) == ChatTemplate(ours).encode(messages)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["eos_token_id"] == ours.eot_token
    assert config["pad_token_id"] == theirs.pad_token_id
    # The trained weights load in transformers with the logits of ours.
    model, reference = GPT.from_pretrained(hf_dir), AutoModelForCausalLM.from_pretrained(hf_dir)
    before = GPT.from_pretrained(directory)
    idx = torch.tensor([ours.encode(text, allowed_special="all")])
    with torch.no_grad():
        logits, expected = model(idx)[0], reference(idx).logits
        assert (logits - expected).abs().max() < 1e-4
        assert (logits - before(idx)[0]).abs().max() > 1e-3  # it trained


def test_inspect_shows_exactly_the_assistant_turns_as_trained(qwen2_run, tmp_path, capsys):
    directory, data_file, out = qwen2_run
    # The trainer's cache and settings: inspect reuses the very samples the run trained on.
    data.main(["inspect", f"--data_path={data_file}", f"--tokenizer={directory}", "--template=model", "--max_seq_len=96",
               "--seed=7", "--num_samples=30", f"--cache_dir={out.parent / 'cache'}"])
    shown = capsys.readouterr().out
    assert "data: reused cache" in shown
    samples = re.findall(r"--- sample \d+ \(\d+ tokens\)\n(.*?)(?=\n---|\npadding share)", shown, re.S)
    assert len(samples) >= 20
    chat = ChatTemplate(get_tokenizer(str(directory)))
    rendered = {chat.render(row["messages"]): row for row in chat_rows(24)}
    for text in samples:
        # The whole conversation as the template renders it (up to the last turn's end), of which exactly
        # each assistant message and its end-of-turn are trained: no system or user turn, no role header.
        whole = text.replace("[[", "").replace("]]", "") + "\n"
        assert whole in rendered, text
        assistant = [m["content"] for m in rendered[whole]["messages"] if m["role"] == "assistant"]
        assert re.findall(r"\[\[(.*?)\]\]", text, re.S) == [f"{content}<|im_end|>" for content in assistant]
        assert text.count("<|im_start|>assistant\n[[") == len(assistant)


def test_sample_chats_through_the_models_template_from_the_run_and_its_export(qwen2_run, capsys):
    directory, _, out = qwen2_run
    model = GPT.from_pretrained(out / "hf").eval()
    chat = ChatTemplate(get_tokenizer(str(directory)))
    prompt = [{"role": "user", "content": "what is two plus four"}]
    new = model.generate([chat.encode(prompt, add_generation_prompt=True)], 12, temperature=0.0,
                         eos_id=chat.end_of_turn, vocab_limit=chat.enc.n_vocab)[0]
    expected = chat.enc.decode(new)
    for source in (out, out / "hf"):
        sample.main([f"--model={source}", "--prompt=what is two plus four", "--max_new_tokens=12", "--device=cpu"])
        assert capsys.readouterr().out == expected + "\n"
    with pytest.raises(sample.OptionError, match="--tokenizer=byte but --model=.* was trained with the"):
        sample.main([f"--model={out / 'hf'}", "--tokenizer=byte", "--prompt=hi"])


# ----------------------------------------------------------------------------- configs/qwen2_5_0_5b.py

QWEN_CONFIG = os.path.join(ROOT, "configs", "qwen2_5_0_5b.py")
# The config's GPU choices, made CPU-sized: everything else (template, schedule, intervals) stays the config's.
ON_CPU = ["--device=cpu", "--dtype=float32", "--compile=false", "--kernels=torch", "--max_seq_len=96", "--batch_size=4",
          "--gradient_accumulation_steps=1", "--max_steps=2", "--log_interval=1"]


def test_the_qwen2_5_config_parses_and_stops_without_init_from():
    cfg, explicit = parse_options([QWEN_CONFIG])
    assert cfg["template"] == "model" and cfg["dtype"] == "bfloat16" and cfg["kernels"] == "triton"
    assert "tokenizer" not in explicit  # the directory's own tokenizer, not the gpt2 default
    with pytest.raises(OptionError, match=r"--init_from=/path/to/Qwen2.5-0.5B-Instruct is not a directory on disk"):
        starting_checkpoint(cfg, explicit, print, True, 1)


def test_the_qwen2_5_config_fine_tunes_a_qwen2_directory_with_its_template(qwen2_run, tmp_path):
    directory, data_file, _ = qwen2_run
    out = tmp_path / "run"
    train_here([QWEN_CONFIG, f"--init_from={directory}", f"--data_path={data_file}", *ON_CPU,
                f"--output_dir={out}"], tmp_path, tiny=[])
    assert sorted(train_losses(out)) == [1, 2]
    trained_with = json.loads((out / "hf" / "sft_config.json").read_text())
    assert trained_with["template"] == "model" and trained_with["tokenizer"] == str(out / "hf")


# ----------------------------------------------------------------------------- the engines on the family

@pytest.mark.slow
def test_sharding_engines_train_a_llama_shaped_model_like_native_stage_0(engine_sweep):
    """2 ranks, fp32: native stage 3 and DeepSpeed stage 3, which shard the untied head, the grouped k|v
    projection and the norms, give native stage 0's losses and weights (every stage of both engines meets
    native stage 0 on the GPT-2 shape in tests/test_engine.py and tests/test_zero.py)."""
    def run(engine, stage):
        out = engine_sweep(engine, stage, shape="llama")
        return train_losses(out), torch.load(out / "ckpt-00000004" / "model.pt", weights_only=True)

    expected, weights = run("native", 0)
    assert sorted(expected) == [1, 2, 3, 4] and expected[4] < expected[1]
    assert "transformer.h.0.attn.c_attn.weight" in weights and weights["lm_head.weight"].data_ptr() != weights[
        "transformer.wte.weight"].data_ptr()  # an untied head
    for engine, stage in [("native", 3), ("deepspeed", 3)]:
        losses, other = run(engine, stage)
        assert max(abs(expected[s] - losses[s]) for s in expected) <= 1e-5, (engine, stage, expected, losses)
        assert max((weights[k] - other[k]).abs().max().item() for k in weights) <= 1e-5, (engine, stage)


# ----------------------------------------------------------------------------- bad input

def bad_inputs(tmp_path):
    """name -> (the options, a part of the one sentence they must stop with)."""
    bare = tmp_path / "bare"
    bare.mkdir()
    small = tmp_path / "small"  # a Llama whose 320-row embedding cannot hold the ChatML tokenizer's ids
    GPT(family_config("llama", block_size=64, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).save_pretrained(small)
    make_chatml_tokenizer_dir(small)
    return {
        "tokenizer_without_tokenizer_json": ([f"--tokenizer={bare}"], f"tokenizer directory {bare} has no tokenizer.json"),
        "init_from_without_config_json": ([f"--init_from={bare}"], f"--init_from={bare}: neither a Hugging Face "
                                                                   f"directory (config.json) nor a checkpoint"),
        "init_from_not_on_disk": ([f"--init_from={tmp_path / 'nowhere'}"], "is not a directory on disk"),
        "tokenizer_larger_than_the_embedding": ([f"--init_from={small}", "--max_seq_len=48"],
                                                f"--init_from={small} has vocab_size 320, smaller than tokenizer"),
    }


@pytest.mark.parametrize("name", ["tokenizer_without_tokenizer_json", "init_from_without_config_json",
                                  "init_from_not_on_disk", "tokenizer_larger_than_the_embedding"])
def test_bad_tokenizer_or_model_directory_is_one_sentence(tmp_path, data_file, name):
    args, sentence = bad_inputs(tmp_path)[name]
    tiny = [a for a in TINY if not a.startswith("--tokenizer")]  # each case names its tokenizer or directory
    proc = train_here([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={tmp_path / 'out'}", *args],
                      tmp_path, check=False, tiny=tiny)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_sft.py: error: ") and sentence in lines[0], proc.stderr
