"""sample.py: the same answer from a run, a checkpoint or the Hugging Face export; the tokenizer the
model was trained with; and a sampler that builds its model without the trainer or Triton."""
import json
import subprocess
import sys

import pytest

import options
import sample
from conftest import ROOT, run_trainer
from model import GPT, GPTConfig


def test_sample_builds_its_model_without_the_trainer_or_triton(tmp_path):
    GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "hf")
    script = ("import sys, sample\n"
              "model, _ = sample.load_model(sys.argv[1])\n"
              "print(model.config.n_embd, sorted({name.split('.')[0] for name in sys.modules}))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    width, loaded = proc.stdout.split(" ", 1)
    assert width == "16"
    for name in ("train_sft", "triton", "sft_kernels", "zero_lite", "deepspeed_engine", "deepspeed"):
        assert f"'{name}'" not in loaded, name


def test_sample_answers_from_a_run_a_checkpoint_and_the_hf_export(tmp_path, data_file):
    out = tmp_path / "run"
    run_trainer([f"--data_path={data_file}", "--max_steps=2", "--template={prompt}={response}", "--attn_window=4",
         f"--output_dir={out}"], tmp_path)
    hf_meta = json.loads((out / "hf" / "sft_config.json").read_text())
    assert hf_meta == {"tokenizer": "byte", "template": "{prompt}={response}", "attn_window": 4}
    answers = []
    for model in (out, out / "ckpt-00000002", out / "hf"):
        proc = subprocess.run([sys.executable, "sample.py", f"--model={model}", "--prompt=reverse abc",
                               "--max_new_tokens=5"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        answers.append(proc.stdout)
    assert answers[0] == answers[1] == answers[2]  # the same greedy answer, whatever the form of the model
    proc = subprocess.run([sys.executable, "sample.py", f"--model={tmp_path}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "neither a Hugging Face directory nor holds a checkpoint" in proc.stderr


class TinyModel:
    def __init__(self, vocab_size):
        self.config = type("Config", (), {"vocab_size": vocab_size})()


def test_sample_refuses_a_tokenizer_the_model_was_not_trained_with():
    with pytest.raises(options.OptionError, match="--tokenizer=gpt2 but --model=m was trained with the byte"):
        sample.check_tokenizer("gpt2", "byte", TinyModel(320), "m")
    with pytest.raises(options.OptionError, match="--tokenizer=byte has 257 tokens but --model=m only 100"):
        sample.check_tokenizer("byte", None, TinyModel(100), "m")
    assert sample.check_tokenizer("", "byte", TinyModel(320), "m").n_vocab == 257


def test_a_prompt_longer_than_the_context_is_cut_with_a_notice(capsys):
    """The start of a long prompt was dropped silently: the answer then ignores what the user wrote first."""
    assert sample.fit_to_context(list(range(10)), block_size=16) == list(range(10))
    assert capsys.readouterr().err == ""
    assert sample.fit_to_context(list(range(40)), block_size=16) == list(range(25, 40))
    assert capsys.readouterr().err == ("sample.py: the prompt has 40 tokens but the model sees 16 positions: its "
                                       "first 25 tokens are left out\n")
