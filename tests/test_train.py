"""The trainer end to end: options, distributed equivalence, resume, precision safeguards, export.

Runs train_sft.py as a real process (python or torchrun with gloo) on a tiny model and a small
JSONL file, and reads metrics.jsonl."""

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch

import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_reverse_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 240)


def run(args, tmp_path, nproc=1, check=True, env=None):
    """Runs the trainer in a fresh process (environment: ours plus env); returns the completed process."""
    cache = ["--cache_dir=" + str(tmp_path / "cache")] if not any(a.startswith("--cache_dir") for a in args) else []
    if nproc == 1:
        cmd = [sys.executable, "train_sft.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train_sft.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd + TINY + cache + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_sft.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


# ----------------------------------------------------------------------------- options


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_sft.parse_options(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name, (default, meaning) in train_sft.OPTIONS.items():
        assert f"--{name:<28} {meaning} [default: {default!r}]" in text, name


def test_readme_documents_every_option():
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name, (default, meaning) in train_sft.OPTIONS.items():
        assert f"| `{name}` | `{default!r}` | {meaning} |" in readme, name


def test_options_are_typed_and_named_in_errors(tmp_path):
    cfg, explicit = train_sft.parse_options(["--max_steps=5", "--compile", "--packing=false", "--learning_rate=1"])
    assert cfg["max_steps"] == 5 and cfg["compile"] is True and cfg["packing"] is False
    assert cfg["learning_rate"] == 1.0 and explicit == {"max_steps", "compile", "packing", "learning_rate"}
    bad = {"--max_step=5": "unknown option --max_step", "--max_steps=five": "--max_steps must be int",
           "--compile=maybe": "--compile must be true or false", "--dtype=fp8": "--dtype must be one of",
           "--batch_size": "--batch_size needs a value", "--batch_size=0": "--batch_size must be at least 1",
           "--learning_rate=-1e-3": "--learning_rate must be at least 0", "--max_seq_len=1": "at least 2",
           "--dropout=2": "--dropout must be between 0 and 0.99"}
    for arg, message in bad.items():
        with pytest.raises(train_sft.OptionError, match=message):
            train_sft.parse_options([arg])


@pytest.mark.parametrize("name, text, message", [
    ("broken", "n_layer = (\n", "broken.py failed to run: SyntaxError"),
    ("unknown", "n_layers = 3\n", "unknown.py sets unknown option 'n_layers'"),
    ("typed", "n_layer = 'three'\n", "typed.py: --n_layer must be int"),
])
def test_config_file_errors_name_the_file(tmp_path, name, text, message):
    (tmp_path / f"{name}.py").write_text(text)
    with pytest.raises(train_sft.OptionError, match=message):
        train_sft.parse_options([str(tmp_path / f"{name}.py")])


def test_config_file_then_command_line(tmp_path):
    with pytest.raises(train_sft.OptionError, match="nope.py does not exist"):
        train_sft.parse_options([str(tmp_path / "nope.py")])
    good = tmp_path / "good.py"
    good.write_text("import math\nn_layer = 3\nlearning_rate = math.sqrt(4e-8)\n")
    cfg, explicit = train_sft.parse_options([str(good), "--n_layer=5"])
    assert cfg["n_layer"] == 5 and cfg["learning_rate"] == pytest.approx(2e-4) and "learning_rate" in explicit


def test_unwritable_output_dir_fails_before_training(tmp_path, data_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run([f"--data_path={data_file}", f"--output_dir={blocker}/run"], tmp_path, check=False)
    assert proc.returncode == 2
    assert f"--output_dir={blocker}/run cannot be written" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_lr_schedule_shapes():
    cfg = {"warmup_steps": 10, "lr_scheduler": "cosine", "min_lr_ratio": 0.1}
    assert train_sft.lr_multiplier(0, cfg, 110) == pytest.approx(0.1)
    assert train_sft.lr_multiplier(9, cfg, 110) == pytest.approx(1.0)
    assert train_sft.lr_multiplier(60, cfg, 110) == pytest.approx(0.55)
    assert train_sft.lr_multiplier(110, cfg, 110) == pytest.approx(0.1)
    assert train_sft.lr_multiplier(60, dict(cfg, lr_scheduler="linear"), 110) == pytest.approx(0.55)
    assert train_sft.lr_multiplier(60, dict(cfg, lr_scheduler="constant"), 110) == 1.0


# ----------------------------------------------------------------------------- runs


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_double_accumulation(tmp_path, data_file):
    """2 ranks x accumulation 2 see the same micro-batches as 1 rank x accumulation 4."""
    common = [f"--data_path={data_file}", "--max_steps=4", "--dropout=0.0"]
    run(common + ["--gradient_accumulation_steps=4", f"--output_dir={tmp_path}/one"], tmp_path)
    run(common + ["--gradient_accumulation_steps=2", f"--output_dir={tmp_path}/two"], tmp_path, nproc=2)
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert sorted(one) == [1, 2, 3, 4] and sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert one[4] < one[1]  # it trained


def test_resume_gives_the_uninterrupted_losses(tmp_path, data_file):
    common = [f"--data_path={data_file}", "--max_steps=6", "--dropout=0.1", "--checkpoint_interval=3",
              "--keep_checkpoints=5", "--eval_exact_match=4"]
    full = tmp_path / "full"
    run(common + [f"--output_dir={full}"], tmp_path)
    assert sorted(os.listdir(full)) == ["ckpt-00000003", "ckpt-00000006", "hf", "metrics.jsonl", "run.json",
                                        "run.lock"]
    # Crashed after logging step 6 but before its checkpoint: the last checkpoint is step 3's, and
    # metrics.jsonl already holds steps 4-6, which the resumed run must replace, not duplicate. The
    # unfinished step-6 directory (still under its temporary name) is no checkpoint.
    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(full / "ckpt-00000003", part / "ckpt-00000003")
    shutil.copytree(full / "ckpt-00000006", part / "ckpt-00000006.tmp")
    shutil.copy(full / "metrics.jsonl", part)
    proc = run(["--resume", f"--output_dir={part}"], tmp_path)
    assert "resumed from" in proc.stdout
    full_losses, resumed = train_losses(full), train_losses(part)
    records = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(resumed[s] == full_losses[s] for s in (4, 5, 6)), (resumed, full_losses)
    # The exported model is the same as the uninterrupted run's.
    from safetensors.torch import load_file
    a, b = load_file(full / "hf" / "model.safetensors"), load_file(part / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model(tmp_path, data_file):
    out = tmp_path / "run"
    run([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={out}"], tmp_path)
    proc = run(["--resume", "--n_layer=3", f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "has n_layer=2 but n_layer=3 was requested" in proc.stderr
    proc = run([f"--init_from={out}", "--n_embd=64", f"--data_path={data_file}", f"--output_dir={tmp_path}/b"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "has n_embd=32 but n_embd=64 was requested" in proc.stderr


def test_float16_skips_overflowing_steps(tmp_path, data_file):
    proc = run([f"--data_path={data_file}", "--max_steps=3", "--dtype=float16", "--initial_scale_power=60",
                f"--output_dir={tmp_path}/fp16"], tmp_path)
    assert "gradient overflow in float16, optimizer step skipped" in proc.stdout


def test_nonfinite_loss_stops_the_run(tmp_path, data_file):
    good = tmp_path / "good"
    run([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={good}"], tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(good / "ckpt-00000001", broken)
    weights = torch.load(broken / "model.pt", weights_only=True)
    weights["transformer.ln_f.weight"].fill_(float("nan"))
    torch.save(weights, broken / "model.pt")
    train_sft.write_manifest(broken, json.loads((broken / "manifest.json").read_text()))
    proc = run([f"--init_from={broken}", f"--data_path={data_file}", "--max_steps=10",
                "--max_nonfinite_steps=2", f"--output_dir={tmp_path}/nan"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "NaN/Inf loss or gradient for 2 steps in a row" in proc.stderr


def test_lora_trains_only_the_factors(tmp_path, data_file):
    out = tmp_path / "lora"
    run([f"--data_path={data_file}", "--max_steps=2", "--lora_dim=4", "--only_optimize_lora",
         "--learning_rate=1e-2", f"--output_dir={out}"], tmp_path)
    state = torch.load(out / "ckpt-00000002" / "zero_lite-stage0.pt", weights_only=True)
    trained = state["optimizer"]["state"]
    n_lora = sum(1 for k in torch.load(out / "ckpt-00000002" / "model.pt", weights_only=True) if "lora_" in k)
    assert n_lora > 0 and len(trained) == n_lora


def test_sample_answers_from_a_run_a_checkpoint_and_the_hf_export(tmp_path, data_file):
    out = tmp_path / "run"
    run([f"--data_path={data_file}", "--max_steps=2", "--template={prompt}={response}", "--attn_window=4",
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


def test_triton_kernel_trains_like_the_torch_loss(tmp_path, data_file):
    """The fused kernel inside real training steps; without a GPU it runs under Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1, which the trainer's process inherits)."""
    common = [f"--data_path={data_file}", "--max_steps=3", "--eval_exact_match=0"]
    assert "loss model.linear_cross_entropy" in run(common + ["--kernels=torch", f"--output_dir={tmp_path}/torch"],
                                                    tmp_path).stdout
    proc = run(common + ["--kernels=triton", f"--output_dir={tmp_path}/triton"], tmp_path)
    assert "loss sft_kernels.cross_entropy.fused_masked_linear_cross_entropy" in proc.stdout
    torch_losses, triton_losses = train_losses(tmp_path / "torch"), train_losses(tmp_path / "triton")
    assert sorted(triton_losses) == [1, 2, 3]
    for step, loss in torch_losses.items():
        assert abs(triton_losses[step] - loss) <= 1e-5 * loss, (step, loss, triton_losses[step])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_kernel_on_cpu_without_interpreter_is_refused(tmp_path, data_file):
    proc = run([f"--data_path={data_file}", "--kernels=triton", f"--output_dir={tmp_path}/run"], tmp_path,
               check=False, env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "--kernels=triton needs a CUDA device" in proc.stderr


def test_init_from_a_hugging_face_directory(tmp_path, data_file):
    """An unpadded vocabulary (GPT-2's 50257; here the byte tokenizer's 257) loads and trains."""
    from model import GPT, GPTConfig
    GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).save_pretrained(tmp_path / "hf")
    run([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", "--max_steps=2",
         f"--output_dir={tmp_path}/run"], tmp_path)
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    proc = run([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", "--max_seq_len=100",
                f"--output_dir={tmp_path}/long"], tmp_path, check=False)
    assert proc.returncode == 2 and "--max_seq_len=100 needs 99 positions but the model has 64" in proc.stderr
    (tmp_path / "hf" / "model.safetensors").unlink()
    proc = run([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", f"--output_dir={tmp_path}/broken"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "no model.safetensors or pytorch_model.bin" in proc.stderr


def test_init_from_a_checkpoint_takes_its_shape_and_the_runs_own_choices(tmp_path, data_file):
    base = tmp_path / "base"
    run([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={base}"], tmp_path)
    proc = run([f"--init_from={base}", f"--data_path={data_file}", "--max_steps=1", "--dropout=0.2",
                "--attn_window=3", "--data_split=100,0", f"--output_dir={tmp_path}/next"], tmp_path)
    assert "skipped, the eval set is empty" in proc.stdout  # rather than a perfect score on nothing
    config = torch.load(tmp_path / "next" / "ckpt-00000001" / "trainer.pt", weights_only=True)["model_config"]
    assert (config["n_embd"], config["dropout"], config["attn_window"]) == (32, 0.2, 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weight": torch.zeros(2)}, foreign / "model.pt")
    (foreign / "manifest.json").write_text("{}")
    proc = run([f"--init_from={foreign}", f"--data_path={data_file}", f"--output_dir={tmp_path}/f"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "foreign is not a train_sft.py checkpoint" in proc.stderr
