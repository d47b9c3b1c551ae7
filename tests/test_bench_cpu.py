"""bench/bench_cpu.py and the CPU MFU it gives the trainer: the step's GEMM FLOPs, the recorded peak that
the trainer's log line divides by, the line's arithmetic, and a training row timed on a tiny model."""
import json

import pytest
import torch

import model as model_module
import train_sft
from bench import bench_cpu
from model import GPT, family_config


def tiny_llama():
    return GPT(family_config("llama", vocab_size=300, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                             intermediate_size=48, block_size=64))


def test_the_step_gemms_are_six_flops_per_linear_weight_and_position():
    """Forward and both backward products of every Linear: 6 x weights x rows, the head at the trained rows."""
    model = tiny_llama()
    positions, trained = 40, 15
    flops = sum(2 * m * k * n for m, k, n in bench_cpu.step_gemms(model.config, positions, trained))
    block_weights = sum(m.weight.numel() for m in model.transformer.h.modules() if isinstance(m, torch.nn.Linear))
    assert flops == 6 * block_weights * positions + 6 * model.lm_head.weight.numel() * trained


def test_the_trainer_reads_the_peak_recorded_for_its_thread_count(tmp_path, monkeypatch):
    monkeypatch.setattr(model_module, "CPU_RESULTS", tmp_path)
    cpu = torch.device("cpu")
    assert model_module.peak_flops(cpu, threads=2) is None, "nothing recorded: no MFU on a CPU"
    model_module.cpu_peak_path().write_text(json.dumps({"matmul_peak_flops": {"2": 1.5e11, "1": 8e10}}))
    assert model_module.peak_flops(cpu, threads=2) == 1.5e11
    assert model_module.peak_flops(cpu, threads=1) == 8e10
    assert model_module.peak_flops(cpu, threads=4) is None, "a peak measured with other threads is not this run's"
    model_module.cpu_peak_path().write_text(json.dumps({"matmul_peak_flops": {"1": 7e9},
                                                        "matmul_peak_flops_of_cpu_time": {"1": 8.8e10}}))
    assert model_module.peak_flops(cpu, threads=1) == 8.8e10, "timed under load, the CPU-time peak is the closer"
    model_module.cpu_peak_path().write_text("{not json")
    assert model_module.peak_flops(cpu, threads=2) is None


def test_the_mfu_in_the_log_line_is_model_flops_per_second_over_the_peak_of_all_ranks(monkeypatch):
    clock = iter([100.0, 104.0])  # start, then 4 seconds later when the rates are read
    monkeypatch.setattr(train_sft.time, "perf_counter", lambda: next(clock))
    speed = train_sft.Throughput(flops_per_token=1e9, peak=5e10, world=2)
    speed.add(torch.tensor(300.0), torch.tensor(800.0))
    rates = speed.rates()
    assert rates["tokens_per_s"] == 200.0 and rates["trained_tokens_per_s"] == 75.0
    assert rates["mfu"] == pytest.approx(200.0 * 1e9 / (5e10 * 2))


def test_a_training_row_is_timed_through_the_trainers_optimizer_and_engine(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "init")
    idx, labels = bench_cpu.sft_batch(2, 16, 300)
    assert (labels[:, :8] == -100).all() and (labels[:, 8:] != -100).all()
    rows, times = bench_cpu.time_rows(["full", "lora16"], str(tmp_path / "init"), idx, labels, steps=2)
    full, _ = rows["full"]
    lora, _ = rows["lora16"]
    assert len(times["full"]["wall_s"]) == 2 and len(times["lora16"]["cpu_s"]) == 2
    figures = bench_cpu.row_figures(lora, times["lora16"], idx.numel(), 16, 16, peak=1e9, threads=1)
    assert figures["trainable_parameters"] < sum(p.numel() for p in full.parameters())
    assert figures["mfu"] == pytest.approx(lora.flops_per_token(16) * 32 / figures["median_step_wall_s"] / 1e9)


def test_the_peak_is_the_step_flops_over_the_best_times_of_its_shapes():
    gemms = [(8, 16, 32), (8, 16, 32), (32, 8, 16)]
    peak, peak_of_cpu_time, shapes = bench_cpu.matmul_peak(gemms, repeats=2, threads=1)
    assert len(shapes) == 2 and peak > 0 and peak_of_cpu_time > 0
    seconds = {(s["m"], s["k"], s["n"]): 2 * s["m"] * s["k"] * s["n"] / (s["gflops"] * 1e9) for s in shapes}
    assert peak == pytest.approx(sum(2 * m * k * n for m, k, n in gemms) / sum(seconds[g] for g in gemms))


def test_the_profile_splits_a_step_into_its_phases_and_kinds_of_work(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "init")
    idx, labels = bench_cpu.sft_batch(2, 16, 300)
    _, engine = bench_cpu.make_row("full", str(tmp_path / "init"))
    summary = bench_cpu.profile_summary(bench_cpu.profile_step(engine, idx, labels))
    assert set(summary["phases_s"]) == set(bench_cpu.PHASES)
    assert summary["op_groups_self_s"]["matmul"] > 0 and summary["op_groups_self_s"]["attention"] > 0
    assert engine.module.loss_fn is bench_cpu.GPT(tiny_llama().config).loss_fn, "the loss is put back"
