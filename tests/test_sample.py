"""sample.py: the same answer from a run, a checkpoint or the Hugging Face export; an export whose files
changed since is refused (by --init_from too); the tokenizer the model was trained with; and a sampler that
builds its model without the trainer or Triton."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import checkpoint
import options
import sample
import train_sft
from conftest import CHATML_TEMPLATE, ROOT, TINY, make_chatml_tokenizer_dir, train_here
from model import GPT, GPTConfig, family_config
from tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_file):
    """A run of two steps, with its checkpoints and hf/ export, shared by this module's tests: read it, or copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_here([f"--data_path={data_file}", "--max_steps=2", "--template={prompt}={response}", "--attn_window=4",
                f"--output_dir={out}"], out.parent)
    return out


def answer_of(model):
    return subprocess.run([sys.executable, "sample.py", f"--model={model}", "--prompt=reverse abc",
                           "--max_new_tokens=5"], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_sample_builds_its_model_without_the_trainer_or_triton(tmp_path):
    GPT(GPTConfig(block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "hf")
    script = ("import sys, sample\n"
              "model, _ = sample.load_model(sys.argv[1])\n"
              "print(model.config.n_embd, sorted(sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "hf")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    width, loaded = proc.stdout.split(" ", 1)
    assert width == "16"
    for name in ("train_sft", "triton", "sft_kernels.cross_entropy", "sft_kernels.sparse_adam", "zero_lite",
                 "deepspeed_engine", "deepspeed"):
        assert f"'{name}'" not in loaded, name


def test_sample_answers_from_a_run_a_checkpoint_and_the_hf_export(tmp_path, trained_run):
    out = trained_run
    hf_meta = json.loads((out / "hf" / "sft_config.json").read_text())
    assert hf_meta == {"tokenizer": "byte", "template": "{prompt}={response}", "attn_window": 4}
    answers = []
    for model in (out, out / "ckpt-00000002", out / "hf"):
        proc = answer_of(model)
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


# ----------------------------------------------------------------------------- the export's checksums


def flip_a_byte_inside(path):
    """Inverts one bit in the middle of a file (inside a weight, for model.safetensors): it still loads."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def refusal(hf_dir, option, problem):
    return (f"{option}={hf_dir} does not match the export's checksums (sft_manifest.json): {problem}; export it "
            f"again, or delete sft_manifest.json if its files were changed on purpose")


def test_the_export_lists_every_file_with_its_size_and_sha256(trained_run):
    hf = trained_run / "hf"
    manifest = json.loads((hf / "sft_manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in hf.iterdir() if p.name != "sft_manifest.json")
    for name, entry in manifest["files"].items():
        assert entry == {"bytes": (hf / name).stat().st_size, "sha256": checkpoint.sha256_of(hf / name)}


def test_a_flipped_byte_in_the_export_stops_sample_and_init_from(tmp_path, trained_run, data_file):
    hf = shutil.copytree(trained_run / "hf", tmp_path / "hf")
    flip_a_byte_inside(hf / "model.safetensors")
    proc = answer_of(hf)
    problem = "model.safetensors does not match its sha256 (corrupted)"
    assert proc.returncode == 2 and proc.stderr.strip() == f"sample.py: error: {refusal(hf, '--model', problem)}"
    proc = train_here([f"--init_from={hf}", f"--data_path={data_file}", f"--output_dir={tmp_path / 'out'}"], tmp_path,
                      check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"train_sft.py: error: {refusal(hf, '--init_from', problem)}"


@pytest.mark.parametrize("change, problem", [
    (lambda hf: (hf / "sft_config.json").unlink(), "sft_config.json is missing"),
    (lambda hf: (hf / "config.json").write_text((hf / "config.json").read_text() + " "),
     "config.json has {bytes} bytes instead of {listed} (truncated or replaced)"),
], ids=["missing", "resized"])
def test_a_missing_or_resized_export_file_is_refused(tmp_path, trained_run, change, problem):
    hf = shutil.copytree(trained_run / "hf", tmp_path / "hf")
    listed = json.loads((hf / "sft_manifest.json").read_text())["files"]["config.json"]["bytes"]
    change(hf)
    with pytest.raises(options.OptionError) as error:
        checkpoint.load_model(str(hf))
    assert str(error.value) == refusal(hf, "--model", problem.format(bytes=listed + 1, listed=listed))


def test_an_intact_export_and_a_directory_without_checksums_load(tmp_path, trained_run, data_file, capsys):
    """A file added beside the listed ones is fine; without sft_manifest.json (a directory from elsewhere, or
    an export edited by hand and its manifest deleted) nothing is checked, as before exports had one."""
    hf = shutil.copytree(trained_run / "hf", tmp_path / "hf")
    (hf / "README.md").write_text("notes\n")
    train_here([f"--init_from={hf}", f"--data_path={data_file}", "--max_steps=1", f"--output_dir={tmp_path / 'out'}"],
               tmp_path)
    flip_a_byte_inside(hf / "model.safetensors")
    (hf / "sft_manifest.json").unlink()
    capsys.readouterr()
    model, trained_with = checkpoint.load_model(str(hf))
    assert trained_with["template"] == "{prompt}={response}" and capsys.readouterr() == ("", "")


# ----------------------------------------------------------------------------- the export: atomic, complete, readable


def export_of(run, output_dir, change=0.0):
    """checkpoint.export_hf of run's last checkpoint into output_dir, in this process; change is added to every
    weight, so that two exports differ."""
    state = checkpoint.load_checkpoint(str(run / "ckpt-00000002"))
    weights = {name: tensor + change for name, tensor in state["model"].items()}
    return checkpoint.export_hf(weights, state["model_config"], state["options"], str(output_dir), log=lambda m: None)


def test_an_export_stopped_midway_leaves_the_earlier_export_or_none_never_a_partial_one(tmp_path, trained_run,
                                                                                      monkeypatch):
    """A run killed while exporting left hf/ with config.json and model.safetensors only, which loaded silently."""
    def killed(*args):
        raise KeyboardInterrupt  # as a signal would, after the weights and before the tokenizer
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_tokenizer", killed)
        with pytest.raises(KeyboardInterrupt):
            export_of(trained_run, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf.tmp"]
    export_of(trained_run, tmp_path)
    earlier = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # the leftover was removed
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "save_tokenizer", killed)
        with pytest.raises(KeyboardInterrupt):
            export_of(trained_run, tmp_path, change=1.0)
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == earlier
    checkpoint.check_export(str(tmp_path / "hf"), "--model")


def test_an_export_that_cannot_be_written_is_one_sentence_and_leaves_nothing(tmp_path, trained_run, monkeypatch):
    def full_disk(*args):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "save_tokenizer", full_disk)
    with pytest.raises(checkpoint.CheckpointError) as error:
        export_of(trained_run, tmp_path)
    assert str(error.value).startswith(f"the Hugging Face export could not be written to {tmp_path / 'hf'}: the disk "
                                       f"is full (")
    assert str(error.value).endswith("; the run's final checkpoint holds the model, and --resume exports it again")
    assert list(tmp_path.iterdir()) == []


def test_a_runs_own_export_without_its_manifest_is_refused_a_foreign_directory_loads(tmp_path, trained_run,
                                                                                   data_file):
    """What a run killed while exporting used to leave: loaded by sample.py, trained by --init_from with the
    default template instead of the trained one."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    for name in ("sft_manifest.json", "sft_config.json", "tokenizer.json", "tokenizer_config.json"):
        (run / "hf" / name).unlink(missing_ok=True)
    sentence = (f"is the export of the run in {run} but has no sft_manifest.json, which an export writes last, so "
                f"it may be incomplete: continue the run with --resume to export it again, or copy the directory "
                f"out of the run to use it as it is")
    with pytest.raises(options.OptionError) as error:
        checkpoint.load_model(str(run / "hf"))
    assert str(error.value) == f"--model={run / 'hf'} {sentence}"
    with pytest.raises(options.OptionError) as error:
        train_sft.main(TINY + [f"--init_from={run / 'hf'}", f"--data_path={data_file}",
                               f"--output_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'cache'}"])
    assert str(error.value) == f"--init_from={run / 'hf'} {sentence}"
    foreign = shutil.copytree(run / "hf", tmp_path / "elsewhere" / "hf")
    model, trained_with = checkpoint.load_model(str(foreign))
    assert model.config.n_embd == 32 and trained_with == {}


@pytest.mark.parametrize("name", ["chat_template.jinja", "special_tokens_map.json", "model.safetensors.index.json",
                                  "model-00002-of-00002.safetensors"])
def test_a_file_the_loader_would_read_but_the_manifest_does_not_list_is_refused(tmp_path, trained_run, data_file,
                                                                               name):
    """An added chat_template.jinja was read, and silently changed the template the model was trained with."""
    hf = shutil.copytree(trained_run / "hf", tmp_path / "hf")
    (hf / name).write_text("{{ messages[0]['content'] }}")
    problem = f"{name} is not listed, but loading the directory would read it (it was added after the export)"
    with pytest.raises(options.OptionError) as error:
        checkpoint.load_model(str(hf))
    assert str(error.value) == refusal(hf, "--model", problem)
    with pytest.raises(options.OptionError) as error:
        train_sft.main(TINY + [f"--init_from={hf}", f"--data_path={data_file}", f"--output_dir={tmp_path / 'out'}",
                               f"--cache_dir={tmp_path / 'cache'}"])
    assert str(error.value) == refusal(hf, "--init_from", problem)


def test_the_export_is_readable_as_the_umask_allows_and_autotokenizer_reads_the_byte_tokenizer(tmp_path,
                                                                                              trained_run):
    """model.safetensors was written 0600 (the temporary file's mode), the other files 0644; and the byte
    tokenizer was not exported at all, so AutoTokenizer could not load the demo's hf/."""
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            hf = export_of(trained_run, tmp_path / oct(umask))
        finally:
            os.umask(previous)
        modes = {p.name: p.stat().st_mode & 0o777 for p in pathlib.Path(hf).iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {mode}, modes
    transformers = pytest.importorskip("transformers")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(trained_run / "hf"))
    byte = get_tokenizer("byte")
    for text in ("reverse abc", "naïve 日本 🙂\n\t", "a<|endoftext|>b"):
        assert hf_tokenizer(text)["input_ids"] == byte.encode(text, allowed_special="all"), text
    assert hf_tokenizer.eos_token_id == byte.eot_token == 256


# ----------------------------------------------------------------------------- config.json fields of the wrong type


def tiny_hf_dir(path, model_type):
    config = family_config(model_type, block_size=16, vocab_size=320, n_layer=1, n_head=2, n_embd=16)
    GPT(config).save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type, field, value, meaning", [
    ("llama", "num_key_value_heads", "2", "an integer >= 0"),
    ("llama", "head_dim", "8", "an integer >= 0"),
    ("llama", "rms_norm_eps", "1e-6", "a positive number"),
    ("llama", "rope_theta", None, "a positive number"),
    ("llama", "rope_theta", "10000", "a positive number"),
    ("llama", "tie_word_embeddings", "false", "true or false"),
    ("llama", "rope_scaling", "llama3", "a JSON object or null"),
    ("mistral", "sliding_window", "4", "an integer >= 0"),
    ("qwen2", "use_sliding_window", 0, "true or false"),
    ("gpt2", "n_embd", "16", "a positive integer"),
    ("gpt2", "layer_norm_epsilon", None, "a positive number"),
])
def test_a_config_field_of_the_wrong_type_is_one_sentence_naming_it(tmp_path, model_type, field, value, meaning):
    """These were TypeError tracebacks from inside the model."""
    hf = tiny_hf_dir(tmp_path / "hf", model_type)
    config = json.loads((hf / "config.json").read_text())
    config[field] = value
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(options.OptionError) as error:
        checkpoint.load_model(str(hf))
    assert str(error.value) == (f"--model={hf}: {hf / 'config.json'}: {field} is {json.dumps(value)}, but must be "
                                f"{meaning}")


def test_sample_exits_2_naming_the_field_of_a_wrong_config(tmp_path):
    hf = tiny_hf_dir(tmp_path / "hf", "llama")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "rope_theta": "big"}))
    proc = answer_of(hf)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f'sample.py: error: --model={hf}: {hf / "config.json"}: rope_theta is "big", but must be a positive number')


# ----------------------------------------------------------------------------- a chat template that refuses the prompt

REFUSING_TEMPLATE = CHATML_TEMPLATE.replace(
    "{% if message['role'] not in", "{% if message['content'] == 'boom' %}{{ raise_exception('no booms here') }}"
    "{% endif %}\n    {% if message['role'] not in")


def test_a_chat_template_that_raises_on_the_prompt_is_one_sentence(tmp_path, monkeypatch, capsys):
    """sample.py gave a traceback when the model's chat template called raise_exception on the prompt."""
    hf = tmp_path / "hf"
    GPT(GPTConfig(block_size=32, vocab_size=448, n_layer=1, n_head=2, n_embd=16)).save_pretrained(hf)
    make_chatml_tokenizer_dir(hf, chat_template=REFUSING_TEMPLATE)
    with pytest.raises(options.OptionError) as error:
        sample.main([f"--model={hf}", "--prompt=boom", "--max_new_tokens=2"])
    assert str(error.value) == f"the chat template of {hf} fails to render this conversation: no booms here"
    said = iter(["boom", "hello", ""])  # in a chat, the refused message is dropped and the chat goes on
    monkeypatch.setattr("builtins.input", lambda prompt: next(said))
    sample.main([f"--model={hf}", "--max_new_tokens=2"])
    out, err = capsys.readouterr()
    assert err == f"sample.py: {error.value}; say it another way\n" and out.count("model> ") == 1
