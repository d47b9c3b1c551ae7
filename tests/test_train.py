"""The trainer end to end: options, distributed equivalence, resume, precision safeguards, export.

Runs train_sft.py on one rank in this process (conftest.train_here: what the command line would exit
with and print), as a real process where the process is what is tested, and compares with the session's
2-rank runs (conftest.engine_sweep, torchrun with gloo); a tiny model, a small JSONL file, metrics.jsonl."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import checkpoint
import train_sft
from conftest import ROOT, SWEEP_STEPS, run_trainer, train_here, train_losses


# ----------------------------------------------------------------------------- setup and schedule


def test_unwritable_output_dir_fails_before_training(tmp_path, data_file):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = train_here([f"--data_path={data_file}", f"--output_dir={blocker}/run"], tmp_path, check=False)
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
def test_two_ranks_match_one_rank_with_double_accumulation(tmp_path, data_file, engine_sweep):
    """2 ranks x accumulation 3 (the sweep's native stage 0) see the same micro-batches as 1 rank x accumulation 6."""
    two = train_losses(engine_sweep("native", 0))
    train_here([f"--data_path={data_file}", f"--max_steps={SWEEP_STEPS}", "--batch_size=8",
                "--gradient_accumulation_steps=6", "--dropout=0.0", f"--output_dir={tmp_path}/one"], tmp_path)
    one = train_losses(tmp_path / "one")
    assert sorted(one) == sorted(two) == list(range(1, SWEEP_STEPS + 1))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])
    assert one[SWEEP_STEPS] < one[1]  # it trained


def test_resume_gives_the_uninterrupted_losses(tmp_path, data_file):
    common = [f"--data_path={data_file}", "--max_steps=6", "--dropout=0.1", "--checkpoint_interval=3",
              "--keep_checkpoints=5", "--eval_exact_match=4", "--eval_at_start"]
    full = tmp_path / "full"
    train_here(common + [f"--output_dir={full}"], tmp_path)
    start = json.loads(open(full / "metrics.jsonl").readline())  # --eval_at_start: the untrained model's figures
    assert start["step"] == 0 and {"eval_loss", "exact_match"} <= set(start)
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
    proc = train_here(["--resume", f"--output_dir={part}"], tmp_path)
    assert "resumed from" in proc.stdout
    full_losses, resumed = train_losses(full), train_losses(part)
    records = [json.loads(line) for line in open(part / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 6]  # the start's eval is not repeated
    assert all(resumed[s] == full_losses[s] for s in (4, 5, 6)), (resumed, full_losses)
    # The exported model is the same as the uninterrupted run's.
    from safetensors.torch import load_file
    a, b = load_file(full / "hf" / "model.safetensors"), load_file(part / "hf" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model(tmp_path, data_file):
    out = tmp_path / "run"
    train_here([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={out}"], tmp_path)
    proc = train_here(["--resume", "--n_layer=3", f"--output_dir={out}"], tmp_path, check=False)
    assert proc.returncode == 2 and "has n_layer=2 but n_layer=3 was requested" in proc.stderr
    proc = train_here([f"--init_from={out}", "--n_embd=64", f"--data_path={data_file}", f"--output_dir={tmp_path}/b"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "has n_embd=32 but n_embd=64 was requested" in proc.stderr


def test_float16_skips_overflowing_steps(tmp_path, data_file):
    proc = train_here([f"--data_path={data_file}", "--max_steps=3", "--dtype=float16", "--initial_scale_power=60",
                f"--output_dir={tmp_path}/fp16"], tmp_path)
    assert "gradient overflow in float16, optimizer step skipped" in proc.stdout


def test_nonfinite_loss_stops_the_run(tmp_path, data_file):
    good = tmp_path / "good"
    train_here([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={good}"], tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(good / "ckpt-00000001", broken)
    weights = torch.load(broken / "model.pt", weights_only=True)
    weights["transformer.ln_f.weight"].fill_(float("nan"))
    torch.save(weights, broken / "model.pt")
    checkpoint.write_manifest(broken, json.loads((broken / "manifest.json").read_text()))
    proc = train_here([f"--init_from={broken}", f"--data_path={data_file}", "--max_steps=10",
                "--max_nonfinite_steps=2", f"--output_dir={tmp_path}/nan"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "NaN/Inf loss or gradient for 2 steps in a row" in proc.stderr


def test_lora_trains_only_the_factors_with_the_fused_adamw_on_a_cpu(tmp_path, data_file):
    out = tmp_path / "lora"
    train_here([f"--data_path={data_file}", "--max_steps=2", "--lora_dim=4", "--only_optimize_lora",
         "--learning_rate=1e-2", f"--output_dir={out}"], tmp_path)
    state = torch.load(out / "ckpt-00000002" / "zero_lite-stage0.pt", weights_only=True)
    trained = state["optimizer"]["state"]
    n_lora = sum(1 for k in torch.load(out / "ckpt-00000002" / "model.pt", weights_only=True) if "lora_" in k)
    assert n_lora > 0 and len(trained) == n_lora
    assert [group["fused"] for group in state["optimizer"]["param_groups"]] == [True]  # the CPU default too


def test_triton_kernel_trains_like_the_torch_loss(tmp_path, data_file):
    """The fused kernel inside real training steps; without a GPU it runs under Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1, which the trainer's process inherits)."""
    common = [f"--data_path={data_file}", "--max_steps=3", "--eval_exact_match=0"]
    assert "loss sft_kernels.chunked_cross_entropy.linear_cross_entropy" in train_here(common + ["--kernels=torch", f"--output_dir={tmp_path}/torch"],
                                                    tmp_path).stdout
    proc = train_here(common + ["--kernels=triton", f"--output_dir={tmp_path}/triton"], tmp_path)
    assert "loss sft_kernels.cross_entropy.fused_masked_linear_cross_entropy" in proc.stdout
    torch_losses, triton_losses = train_losses(tmp_path / "torch"), train_losses(tmp_path / "triton")
    assert sorted(triton_losses) == [1, 2, 3]
    for step, loss in torch_losses.items():
        assert abs(triton_losses[step] - loss) <= 1e-5 * loss, (step, loss, triton_losses[step])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_kernel_on_cpu_without_interpreter_is_refused(tmp_path, data_file):
    proc = run_trainer([f"--data_path={data_file}", "--kernels=triton", f"--output_dir={tmp_path}/run"], tmp_path,
               check=False, env={"TRITON_INTERPRET": "0"})
    assert proc.returncode == 2 and "--kernels=triton needs a CUDA device" in proc.stderr


def test_the_trainer_imports_no_triton_until_a_kernel_runs():
    """Triton costs a run about 70 MiB and 0.2 s: the loss kernel (--kernels=triton) and the sparse update
    import it where they run, so importing the trainer must not."""
    proc = subprocess.run([sys.executable, "-c", "import sys, train_sft; print(sorted(sys.modules))"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("triton", "sft_kernels.cross_entropy", "sft_kernels.sparse_adam"):
        assert f"'{name}'" not in proc.stdout, name


def test_init_from_a_hugging_face_directory(tmp_path, data_file):
    """An unpadded vocabulary (GPT-2's 50257; here the byte tokenizer's 257) loads and trains."""
    from model import GPT, GPTConfig
    GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=2, n_head=2, n_embd=32)).save_pretrained(tmp_path / "hf")
    train_here([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", "--max_steps=2",
         f"--output_dir={tmp_path}/run"], tmp_path)
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]
    proc = train_here([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", "--max_seq_len=100",
                f"--output_dir={tmp_path}/long"], tmp_path, check=False)
    assert proc.returncode == 2 and "--max_seq_len=100 needs 99 positions but the model has 64" in proc.stderr
    (tmp_path / "hf" / "model.safetensors").unlink()
    proc = train_here([f"--init_from={tmp_path}/hf", f"--data_path={data_file}", f"--output_dir={tmp_path}/broken"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "no model.safetensors or pytorch_model.bin" in proc.stderr


def test_init_from_a_checkpoint_takes_its_shape_and_the_runs_own_choices(tmp_path, data_file):
    base = tmp_path / "base"
    train_here([f"--data_path={data_file}", "--max_steps=1", f"--output_dir={base}"], tmp_path)
    proc = train_here([f"--init_from={base}", f"--data_path={data_file}", "--max_steps=1", "--dropout=0.2",
                "--attn_window=3", "--data_split=100,0", f"--output_dir={tmp_path}/next"], tmp_path)
    assert "skipped, the eval set is empty" in proc.stdout  # rather than a perfect score on nothing
    config = torch.load(tmp_path / "next" / "ckpt-00000001" / "trainer.pt", weights_only=True)["model_config"]
    assert (config["n_embd"], config["dropout"], config["attn_window"]) == (32, 0.2, 3)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weight": torch.zeros(2)}, foreign / "model.pt")
    (foreign / "manifest.json").write_text("{}")
    proc = train_here([f"--init_from={foreign}", f"--data_path={data_file}", f"--output_dir={tmp_path}/f"],
               tmp_path, check=False)
    assert proc.returncode == 2 and "foreign is not a train_sft.py checkpoint" in proc.stderr


def test_trained_tokens_per_s_counts_labelled_positions_only(tmp_path):
    """Two rows in one batch: 'a'+'bc' is 3 positions, all trained (b, c, end-of-text); 'abcdef'+'g' is 7
    positions, 2 trained. Padded to 7 each, the batch has 14 positions (4 of them padding) and 5 trained
    tokens, so every log line's trained rate is 5/14 of its positional rate."""
    data = tmp_path / "two.jsonl"
    data.write_text('{"prompt": "a", "response": "bc"}\n{"prompt": "abcdef", "response": "g"}\n')
    train_here([f"--data_path={data}", "--data_split=100,0", "--template={prompt}{response}", "--batch_size=2",
                 "--max_steps=3", f"--output_dir={tmp_path / 'out'}"], tmp_path)
    with open(tmp_path / "out" / "metrics.jsonl") as f:
        records = [r for r in map(json.loads, f) if "loss" in r]
    assert len(records) == 3
    for r in records:
        assert r["trained_tokens_per_s"] / r["tokens_per_s"] == pytest.approx(5 / 14, rel=1e-9)
        assert r["padding"] == pytest.approx(4 / 14)


def test_cpu_peak_memory_is_this_process_own_not_its_parents():
    """A child started from a parent holding 2 GiB reports its own peak: ru_maxrss alone would report the
    parent's 2 GiB, which made every rank's peak_mem_gib include its launcher's memory."""
    held = b"\x01" * 2**31  # touched, so resident
    code = "import torch, train_sft; print(train_sft.peak_memory_gib(torch.device('cpu')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    del held
    assert proc.returncode == 0, proc.stderr
    assert 0.05 < float(proc.stdout) < 1.5


def test_the_fused_adamw_on_a_cpu_trains_like_the_one_tensor_at_a_time_adamw():
    """make_optimizer(fused=True), the trainer's CPU default (bench/bench_cpu.py's full_unfused row measures
    what it gains): three steps through the native engine give the losses and weights of torch's
    one-tensor-at-a-time AdamW, to float32 rounding."""
    import zero_lite
    from model import GPT, GPTConfig
    cfg = {"sparse_density": 0, "lora_learning_rate": 0, "learning_rate": 1e-2, "weight_decay": 0.1,
           "beta1": 0.9, "beta2": 0.95}
    idx = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = idx.roll(-1, 1).masked_fill(torch.arange(12) < 5, -100)
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
        optimizer = train_sft.make_optimizer(model, cfg, fused=fused)
        assert optimizer.defaults["fused"] is fused
        engine = zero_lite.Engine(model, optimizer, stage=0, grad_clip=1.0)
        losses = []
        for _ in range(3):
            loss = engine(idx, labels)
            engine.backward(loss)
            engine.step(1.0, torch.isfinite(loss.detach()))
            losses.append(loss.item())
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (old_losses, old_weights), (new_losses, new_weights) = runs
    assert new_losses == pytest.approx(old_losses, rel=1e-6, abs=1e-6)
    for old, new in zip(old_weights, new_weights):  # Adam divides near-zero gradients by their own size: a few
        torch.testing.assert_close(new, old, rtol=1e-4, atol=2e-5)  # 1e-6 of rounding there; a step is 1e-2
