"""sample.py: the same answer from a run, a checkpoint or the Hugging Face export; an export whose files
changed since is refused (by --init_from too); the tokenizer the model was trained with; and a sampler that
builds its model without the trainer or Triton."""
import json
import shutil
import subprocess
import sys

import pytest

import checkpoint
import options
import sample
from conftest import ROOT, train_here
from model import GPT, GPTConfig


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
