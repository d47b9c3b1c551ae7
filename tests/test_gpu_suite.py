"""bench/gpu_suite.py without a GPU: its dry run, its step runner on stand-in steps; every generated block of
README.md and docs/ against bench/results/ (bench/results_table.py), old result files and new ones; the one
provenance writer every bench script uses (bench/common.py)."""
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bench import bench_demo, bench_train, common, gpu_suite, results_table
from model import GPT, GPTConfig

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_step_and_finds_the_wiring_intact(capsys):
    """In this process: the modules it imports are mostly loaded already, which keeps it fast."""
    assert gpu_suite.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[1:] if line[:1].isalpha()]
    assert listed == [step.name for step in gpu_suite.STEPS] + ["total", "dry"]
    assert "peer cut cross-entropy: cut_cross_entropy.linear_cross_entropy" in out
    assert "shape qwen2_5_0_5b (Qwen2.5-0.5B), rows triton" in out
    extras = [line.split()[0] for line in out.splitlines() if "extra: --only" in line]
    assert extras == [step.name for step in gpu_suite.STEPS if step.extra] and "trl" in extras
    assert "dry run: wiring ok" in out


def test_the_default_steps_fit_the_default_time_limit():
    opts = gpu_suite.parse_options([])
    default = [step for step in gpu_suite.STEPS if step.name in opts["steps"]]
    assert [step.name for step in default] == ["wheels", "tests", "ce", "train", "llama", "profile"]
    assert sum(step.estimate_s for step in default) <= opts["time_limit"]
    assert gpu_suite.parse_options(["--only=trl,llama"])["steps"] == ["llama", "trl"]


def test_the_llama_step_runs_bench_train_at_qwen2_5_shape_and_its_options_are_checked(capsys):
    llama = next(step for step in gpu_suite.STEPS if step.name == "llama")
    opts = gpu_suite.parse_options(["--llama_args=--rows=peer,triton"])
    assert gpu_suite.command(llama, opts["args"]["llama"])[1:] == [
        "bench/bench_train.py", "--shape=qwen2_5_0_5b", "--rows=triton", "--deepspeed_stages=", "--rows=peer,triton"]
    assert gpu_suite.dry_run(gpu_suite.parse_options(["--dry-run", "--only=llama", "--llama_args=--shape=qwen9"])) == 512
    assert "BROKEN: ValueError(\"--shape must be one of gpt2_124m, qwen2_5_0_5b, got 'qwen9'\")" in capsys.readouterr().out


def test_a_sum_of_codes_beyond_8_bits_exits_255_not_0():
    assert [gpu_suite.process_exit_status(status) for status in (0, 2, 8 + 128, 256, 512 + 8)] == [0, 2, 136, 255, 255]


def test_bench_train_shapes_and_their_files():
    with torch.device("meta"):
        qwen = GPT(bench_train.model_config("qwen2_5_0_5b"))
    assert sum(p.numel() for p in qwen.parameters()) == 494_032_768  # Qwen2.5-0.5B's parameter count
    assert qwen.config.n_kv_head == 2 and qwen.config.tie_word_embeddings and qwen.config.qkv_bias
    assert bench_train.model_config("gpt2_124m") == GPTConfig(block_size=1024, vocab_size=50304)
    assert bench_train.result_file("gpt2_124m", "NVIDIA H200").name == "train_NVIDIA_H200.json"
    assert bench_train.result_file("qwen2_5_0_5b", "NVIDIA H200").name == "train_qwen2_5_0_5b_NVIDIA_H200.json"
    args = {"shape": "qwen2_5_0_5b", "rows": "triton", "deepspeed_stages": ""}
    assert bench_train.check_args(args) == ("qwen2_5_0_5b", ["triton"], [])
    with pytest.raises(ValueError, match="--rows takes peer, torch and triton"):
        bench_train.check_args({**args, "rows": "peer,fused"})
    with pytest.raises(ValueError, match="there is no row to measure"):
        bench_train.check_args({**args, "rows": ""})


def test_the_shell_entry_point_runs_the_suite():
    proc = subprocess.run(["bash", "bench/gpu_suite.sh", "--only=nothing"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHON=sys.executable), timeout=60)
    assert proc.returncode == 2 and "unknown step 'nothing'" in proc.stderr


def test_dry_run_fails_on_a_wrong_peer_path_but_not_on_a_missing_package(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "WHEELS", tmp_path)
    assert gpu_suite.check_peer("torch.nn.functional", "cross_entropy") == "ok"
    with pytest.raises(AttributeError):
        gpu_suite.check_peer("torch.nn.functional", "no_such_loss")
    assert gpu_suite.check_peer("no_such_package_here.losses", "f") == "not installed here, not in .whl/"
    with zipfile.ZipFile(tmp_path / "no_such_package_here-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("no_such_package_here/__init__.py", "")
        wheel.writestr("no_such_package_here/other.py", "")
    with pytest.raises(ImportError, match="has no module no_such_package_here.losses"):
        gpu_suite.check_peer("no_such_package_here.losses", "f")
    assert "carried in .whl/" in gpu_suite.check_peer("no_such_package_here.other", "f")


def test_dry_run_fails_on_a_missing_script_and_skips_a_missing_optional_one(monkeypatch, capsys):
    steps = [gpu_suite.Step("ce", 8, "bench/no_such_bench.py", 1, 1),
             gpu_suite.Step("sparse", 64, "bench/no_such_sparse_bench.py", 1, 1, optional=True)]
    monkeypatch.setattr(gpu_suite, "STEPS", steps)
    assert gpu_suite.dry_run(gpu_suite.parse_options(["--dry-run"])) == 8
    out = capsys.readouterr().out
    assert "BROKEN" in out and "does not exist yet: the step will be skipped" in out


def alive(pid):
    """True while the process runs (a zombie, killed but not yet reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def write_script(path, body):
    path.write_text(body)
    return str(path)


def test_steps_run_in_order_a_failure_or_timeout_does_not_stop_the_rest(tmp_path, monkeypatch):
    """Stand-in steps: one fails, one writes a result, one outlives its limit with a child process
    (which must die with it), and the exit status is the sum of the failed steps' codes."""
    for module in (gpu_suite, common):  # the stand-in steps are this repository's files
        monkeypatch.setattr(module, "ROOT", tmp_path)
    monkeypatch.setattr(gpu_suite, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(gpu_suite, "LOGS", tmp_path / "logs")
    (tmp_path / "results").mkdir()
    child_pid = tmp_path / "child.pid"
    steps = [
        gpu_suite.Step("ce", 8, write_script(tmp_path / "fails.py", "print('about to fail'); raise SystemExit(3)"),
                       1, 30),
        gpu_suite.Step("train", 16, write_script(tmp_path / "writes.py",
                                                 "open('results/train_Fake_GPU.json', 'w').write('{}')"), 1, 30),
        gpu_suite.Step("profile", 128, write_script(tmp_path / "hangs.py", (
            "import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
            "time.sleep(60)\n")), 1, 1.5),
        gpu_suite.Step("sparse", 64, "no_such_sparse_bench.py", 1, 30, optional=True),
    ]
    monkeypatch.setattr(gpu_suite, "STEPS", steps)
    summary = gpu_suite.run(gpu_suite.parse_options([]), "Fake GPU", time.monotonic())
    status = {row["step"]: row["status"] for row in summary["steps"]}
    assert status["ce"] == "failed (exit 3)" and status["train"] == "ok"
    assert status["profile"].startswith("timeout") and status["sparse"].startswith("skipped")
    assert summary["exit_status"] == 8 + 128
    assert summary["steps"][1]["outputs"] == ["results/train_Fake_GPU.json"]
    assert "about to fail" in (tmp_path / "logs" / "ce.log").read_text()
    pid = int(child_pid.read_text())
    deadline = time.monotonic() + 5
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(pid), "the step's child process outlived the step's time limit"


def test_time_limit_skips_the_steps_that_no_longer_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "RESULTS", tmp_path)
    summary = gpu_suite.run(gpu_suite.parse_options(["--time_limit=5", "--skip=wheels"]), "Fake GPU",
                            time.monotonic())
    assert all(row["status"].startswith("skipped") for row in summary["steps"])
    assert summary["steps"][1]["status"].startswith("skipped (the suite's time limit")
    assert summary["exit_status"] == 0


def test_a_rerun_keeps_the_earlier_rows_of_the_steps_it_did_not_run():
    earlier = {"date": "2026-12-01", "steps": [{"step": "ce", "status": "ok", "seconds": 100.0},
                                               {"step": "train", "status": "timeout (killed at 300 s)"}]}
    rerun = {"steps": [{"step": "ce", "status": "skipped (not chosen)"}, {"step": "train", "status": "ok"}]}
    gpu_suite.merge_earlier(rerun, earlier)
    assert rerun["steps"] == [{"step": "ce", "status": "ok", "seconds": 100.0, "earlier_run": "2026-12-01"},
                              {"step": "train", "status": "ok"}]


@pytest.mark.parametrize("argv, message", [
    (["--only=cee"], "unknown step 'cee'"),
    (["--time_limit=soon"], "--time_limit must be a number"),
    (["--fast"], "unknown option '--fast'"),
])
def test_bad_options_exit_2_with_one_sentence(argv, message, capsys):
    assert gpu_suite.main(argv) == 2
    assert message in capsys.readouterr().err


def test_options_choose_steps_and_pass_arguments():
    opts = gpu_suite.parse_options(["--only=ce,train,profile", "--skip=profile", "--train_args=--deepspeed_stages=0,1",
                                    "--time_limit=300"])
    assert opts["steps"] == ["ce", "train"] and opts["time_limit"] == 300
    train = next(step for step in gpu_suite.STEPS if step.name == "train")
    assert gpu_suite.command(train, opts["args"]["train"])[1:] == ["bench/bench_train.py", "--deepspeed_stages=0,1"]


def test_every_generated_block_of_readme_and_docs_is_what_results_table_renders_now():
    stale = []
    for page, name, rendered in results_table.rendered_blocks():
        begin, end = rendered.split("\n", 1)[0], results_table.end_marker(name)
        if results_table.generated_block(page.read_text(), begin, end) != rendered:
            stale.append(f"{page.relative_to(ROOT)}: {name}")
    assert not stale, f"generated blocks that differ from their sources: {stale}; run python bench/results_table.py --write"
    pages = {page.name for page, *_ in results_table.BLOCKS}
    assert {"README.md", "benchmarks.md", "engines.md", "sparse.md", "options.md", "checkpoints.md", "data.md"} <= pages


def test_the_headline_has_a_row_per_claim_naming_its_file():
    headline = results_table.render_headline()
    for name in ("ce_", "train_", "engines_124m_cpu.json", results_table.TRL_REAL_MODEL, "sparse_cpu.json",
                 "demo_cpu.json"):
        assert f"| `{name}" in headline, name


def test_a_figure_that_drifts_changes_the_rendered_results(tmp_path):
    """The check above can fail: one changed number in a result file changes the block."""
    for path in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    before = results_table.render(tmp_path)
    ce_file = next(tmp_path.glob("ce_*.json"))
    data = json.loads(ce_file.read_text())
    anchor = next(r for r in data["results"] if (r["tokens"], r["masked_share"]) == (16384, 0.5)
                  and r["implementation"] == "ours (triton)")
    anchor["ms"] += 0.5
    ce_file.write_text(json.dumps(data))
    after = results_table.render(tmp_path)
    assert after != before and f"| ours (triton) | {anchor['ms']:.2f} |" in after
    assert f"{anchor['ms']:.2f} ms and" in results_table.render_headline(tmp_path)
    demo = json.loads((tmp_path / "demo_cpu.json").read_text())
    (tmp_path / "demo_cpu.json").write_text(json.dumps({**demo, "exact_match": 0.5}))
    assert "**50.0%** of the held-out prompts" in results_table.render_headline(tmp_path)
    assert "| 50.0% |" in results_table.render_demos(tmp_path)


def test_the_llama_demo_renders_beside_the_gpt2_demo_once_its_file_exists(tmp_path):
    for path in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    (tmp_path / "demo_llama_cpu.json").unlink(missing_ok=True)
    assert "demo_llama" not in results_table.render_headline(tmp_path) + results_table.render_demos(tmp_path)
    demo = json.loads((tmp_path / "demo_cpu.json").read_text())
    command = "torchrun " + " ".join(bench_demo.command("configs/demo_llama.py")[2:])
    (tmp_path / "demo_llama_cpu.json").write_text(json.dumps({**demo, "config": "configs/demo_llama.py",
                                                              "command": command, "exact_match": 0.961, "wall_s": 301.4}))
    rows = [line for line in results_table.render_headline(tmp_path).splitlines() if "`demo" in line]
    assert [row.rsplit("`", 2)[1] for row in rows] == ["demo_cpu.json", "demo_llama_cpu.json"]
    assert "Llama-shaped model" in rows[1] and "**96.1%**" in rows[1] and "5 min 01 s" in rows[1]
    demos = results_table.render_demos(tmp_path)
    assert "| `torchrun --standalone --nproc_per_node=2 train_sft.py configs/demo_llama.py --overwrite_output_dir " \
           "--output_dir=out/bench_demo_llama` | 96.1% |" in demos
    assert demos.index("`demo_cpu.json`") < demos.index("`demo_llama_cpu.json`")


def test_a_pretrained_demo_renders_its_figures_before_and_after_fine_tuning(tmp_path):
    for path in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    demo = json.loads((tmp_path / "demo_cpu.json").read_text())
    (tmp_path / "smollm2_cpu_cpu.json").write_text(json.dumps({**demo, "config": "configs/smollm2_cpu.py", "exact_match": 0.41,
                                                           "eval_loss": 0.25, "exact_match_before": 0.012,
                                                           "eval_loss_before": 3.5}))
    row = next(line for line in results_table.render_headline(tmp_path).splitlines() if "`smollm2_cpu_cpu.json`" in line)
    assert "SmolLM2-135M-Instruct" in row and "**41.0%**" in row and "from 1.2% before fine-tuning" in row
    assert "eval loss 0.2500, from 3.5000" in row
    demos = results_table.render_demos(tmp_path)
    from_scratch = f"| {demo['exact_match']:.1%} | {demo['eval_loss']:.4f} |"  # no "before": only where measured
    assert "| 1.2% -> 41.0% | 3.5000 -> 0.2500 |" in demos and from_scratch in demos


def test_bench_demo_reads_the_eval_before_the_first_step_where_there_is_one(tmp_path):
    records = [{"step": 0, "eval_loss": 3.0, "exact_match": 0.0}, {"step": 5, "loss": 2.0},
               {"step": 10, "eval_loss": 1.5, "exact_match": 0.3}, {"step": 20, "eval_loss": 1.0, "exact_match": 0.5}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert bench_demo.evals(metrics) == (records[0], records[3])
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records[1:]))
    assert bench_demo.evals(metrics) == (None, records[3])


def test_bench_demo_names_its_result_after_the_config():
    assert bench_demo.result_path("configs/demo.py") == ROOT / "bench" / "results" / "demo_cpu.json"
    assert bench_demo.result_path("configs/demo_llama.py").name == "demo_llama_cpu.json"
    assert bench_demo.command("configs/demo.py")[4:] == ["train_sft.py", "configs/demo.py", "--overwrite_output_dir",
                                                         "--output_dir=out/bench_demo"]
    assert bench_demo.output_dir("configs/demo_llama.py") == "out/bench_demo_llama"


def test_the_files_a_suite_run_writes_render(tmp_path):
    """Today's formats, with what a GPU run can leave: a peer not installed, a failed or skipped row,
    an incomplete file, a step rerun later."""
    device, common = "NVIDIA H200", {"device": "NVIDIA H200", "torch": "2.11.0", "date": "2026-12-01",
                                     "sources": {"model.py": "0123456789ab"}}
    ce_rows = [{"tokens": 16384, "masked_share": 0.5, "implementation": name, "ms": ms, "peak_extra_mib": mib,
                "loss_rel_err": None if ms is None else 1e-6, **({"note": "error: boom"} if ms is None else {})}
               for name, ms, mib in [("ours (triton)", 3.9, 240.0), ("torch.compile", 9.0, 1744.0),
                                     ("cut cross-entropy", None, None)]]
    ce_rows += [{"tokens": 16384, "masked_share": 0.5, "hidden": 896, "vocab": 151936, "implementation": name,
                 "ms": ms, "peak_extra_mib": mib, "loss_rel_err": 2e-6} for name, ms, mib in
                [("ours (triton)", 12.5, 700.0), ("torch.compile", 30.0, 5200.0)]]
    qwen_shape = {"name": "Qwen2.5-0.5B", **bench_train.SHAPES["qwen2_5_0_5b"][1], "batch": 16, "seq": 1024,
                  "dtype": "bfloat16", "masked_share": 0.5}
    files = {
        "ce": {**common, "triton": "3.6.0", "peers": {"liger-kernel": "not installed", "cut-cross-entropy": "25.1.1"},
               "skipped_peers": {"liger fused linear CE": "liger-kernel is not installed"}, "hidden": 768,
               "vocab": 50257, "complete": False, "results": ce_rows},
        "train": {**common, "shape": {"n_layer": 12, "n_embd": 768, "vocab_size": 50304, "batch": 16, "seq": 1024,
                                      "dtype": "bfloat16", "masked_share": 0.5},
                  "steps": 10, "warmup": 3, "peer": "compiled loop, loss inside", "complete": True,
                  "skipped": {"deepspeed": "train_sft.py has no --engine/--zero_stage options"},
                  "rows": {"compiled loop, loss inside": {"tokens_per_s": 5e5, "peak_gib": 9.0, "mfu": 0.43,
                                                          "vs_peer": 1.0},
                           "train_sft --kernels=triton": {"error": "CalledProcessError(1)"}}},
        "train_qwen2_5_0_5b": {**common, "shape": qwen_shape, "steps": 10, "warmup": 3,
                               "peer": "compiled loop, loss inside", "complete": True,
                               "skipped": {"compiled loop, loss inside": "not in --rows=triton"},
                               "rows": {"train_sft --kernels=triton": {"tokens_per_s": 1.2e5, "peak_gib": 40.0,
                                                                       "mfu": 0.36}}},
        "gpu_suite": {"device": device, "date": "2026-12-01", "time_limit_s": 540.0, "total_s": 300.0,
                      "steps": [{"step": "ce", "status": "ok", "seconds": 100.0, "earlier_run": "2026-11-30"},
                                {"step": "train", "status": "timeout (killed at 300 s)", "seconds": 300.0}]},
    }
    for kind, data in files.items():
        (tmp_path / f"{kind}_NVIDIA_H200.json").write_text(json.dumps(data))
    block = results_table.render(tmp_path)
    for expected in ("#### On one NVIDIA H200", "| ours (triton) | 3.90 | 240 | 1.0e-06 | 1.00x |",
                     "| cut cross-entropy (error: boom) | - | - | - | - |", "cut-cross-entropy 25.1.1",
                     "| liger fused linear CE: not measured, liger-kernel is not installed |", "INCOMPLETE",
                     "`model.py` 0123456789ab", "the peer is `compiled loop, loss inside`",
                     "| train_sft --kernels=triton | failed: CalledProcessError(1) |",
                     "| deepspeed: not measured, train_sft.py has no --engine/--zero_stage options |",
                     "ce ok 100 s (run of 2026-11-30); train timeout (killed at 300 s) 300 s; 300 s in all",
                     "At hidden 896 and a vocabulary of 151,936 (Qwen2.5-0.5B's head), 16,384 tokens, 50% of the "
                     "labels masked:\n\n| implementation | ms |", "| torch.compile | 30.00 | 5,200 | 2.0e-06 | 2.40x |",
                     "**Training steps**, Qwen2.5-0.5B shape (24 layers, 896 wide, 14 query heads sharing 2 key/value "
                     "heads, SwiGLU 4,864 wide, qwen2's RMSNorm and rotary positions, tied head, vocabulary 151,936)",
                     "| train_sft --kernels=triton | 120,000 | 36.0% | 40.00 | - |",
                     "| compiled loop, loss inside: not measured, not in --rows=triton | - | - | - | - |"):
        assert expected in block, expected
    anchor_table = block.split("The anchor:")[1].split("Every shape")[0]
    assert "30.00" not in anchor_table and "12.50" not in anchor_table  # Qwen's head is not the anchor
    assert block.index("GPT-2 124M shape") < block.index("Qwen2.5-0.5B shape")


def test_the_summary_prints_each_step_and_the_targets(tmp_path, monkeypatch, capsys):
    ce = {"results": [{"tokens": 16384, "masked_share": 0.5, "implementation": name, "ms": ms, "peak_extra_mib": mib}
                      for name, ms, mib in [("ours (triton)", 4.5, 240.0), ("torch.compile", 9.0, 1744.0)]]}
    train = {"rows": {"compiled loop, loss inside": {"tokens_per_s": 5e5, "peak_gib": 9.0, "mfu": 0.43, "vs_peer": 1.0},
                      "train_sft --kernels=triton": {"tokens_per_s": 6e5, "peak_gib": 7.0, "mfu": 0.5, "vs_peer": 1.2},
                      "train_sft --engine=deepspeed --zero_stage=2": {"error": "CalledProcessError(1)"}}}
    (tmp_path / "ce_Fake_GPU.json").write_text(json.dumps(ce))
    (tmp_path / "train_Fake_GPU.json").write_text(json.dumps(train))
    monkeypatch.setattr(gpu_suite, "RESULTS", tmp_path)
    figures = gpu_suite.figures("Fake GPU")
    assert figures["ce_target_met"] is False and figures["train_target_met"] is True
    gpu_suite.print_summary({"device": "Fake GPU", "time_limit_s": 540.0, "total_s": 350.0, "exit_status": 16,
                             "figures": figures, "steps": [
                                 {"step": "ce", "status": "ok", "seconds": 100.0, "limit_s": 240, "outputs": []},
                                 {"step": "train", "status": "failed (exit 1)", "seconds": 250.0, "limit_s": 300,
                                  "outputs": ["bench/results/train_Fake_GPU.json"]}]})
    out = capsys.readouterr().out
    assert "target ours <= 4.0 ms and <= 256 MiB: MISSED" in out and "2.00x ours" in out
    assert "1.20x peer" in out and "CalledProcessError(1)" in out and "exit status 16 (failed: train)" in out


def test_the_summary_shows_qwen2_5s_head_and_training_rows_apart_from_the_anchor(tmp_path, monkeypatch, capsys):
    ce = {"vocab": 50257, "results": [
        {"tokens": 16384, "masked_share": 0.5, "vocab": vocab, "implementation": name, "ms": ms, "peak_extra_mib": 250.0}
        for vocab, name, ms in [(50257, "ours (triton)", 3.9), (50257, "torch.compile", 9.0),
                                (151936, "ours (triton)", 12.0), (151936, "torch.compile", 30.0)]]}
    llama = {"rows": {"train_sft --kernels=triton": {"tokens_per_s": 1.2e5, "peak_gib": 40.0, "mfu": 0.36}}}
    (tmp_path / "ce_Fake_GPU.json").write_text(json.dumps(ce))
    (tmp_path / "train_qwen2_5_0_5b_Fake_GPU.json").write_text(json.dumps(llama))
    monkeypatch.setattr(gpu_suite, "RESULTS", tmp_path)
    figures = gpu_suite.figures("Fake GPU")
    assert figures["ce_anchor"]["ours (triton)"]["ms"] == 3.9 and figures["ce_target_met"] is True
    assert figures["ce_qwen_vocab"]["torch.compile"]["ms"] == 30.0 and "train" not in figures
    gpu_suite.print_summary({"device": "Fake GPU", "time_limit_s": 540.0, "total_s": 120.0, "exit_status": 0,
                             "figures": figures, "steps": []})
    out = capsys.readouterr().out
    assert "bench_ce at Qwen2.5's vocabulary 151,936" in out and "2.50x ours" in out
    assert "bench_train, Qwen2.5-0.5B shape" in out and "120,000 tok/s" in out


def copy_results(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    for path in (ROOT / "bench" / "results").glob("*.json"):
        shutil.copy(path, tmp_path)
    return tmp_path


def edit_result(results_dir, name, edit):
    data = json.loads((results_dir / name).read_text())
    edit(data)
    (results_dir / name).write_text(json.dumps(data))


def test_each_cpu_table_follows_its_result_file(tmp_path):
    """The blocks of engines.md, sparse.md and benchmarks.md change with one figure of their file."""
    results = copy_results(tmp_path)
    renders = {"engines": results_table.render_engines, "engines_124m": results_table.render_engines_124m,
               "trl": results_table.render_trl, "sparse": results_table.render_sparse,
               "checkpoints": results_table.render_checkpoints, "parquet": results_table.render_parquet}
    before = {name: render(results) for name, render in renders.items()}
    edit_result(results, "engines_cpu.json", lambda d: d["rows"][0].update(tokens_per_s=12345.4))
    edit_result(results, "engines_124m_cpu.json", lambda d: d["rows"][1].update(max_loss_difference=0.25))
    edit_result(results, "trl_cpu.json", lambda d: d["systems"]["trl"]["eval"]["loss"].update(median=7.0))
    edit_result(results, "sparse_cpu.json", lambda d: d["results"][1].update(exact_match=0.987))
    edit_result(results, "checkpoint_2cpu.json", lambda d: d.update(verify_s=9.87))
    edit_result(results, "soak_kill.json", lambda d: d["modes"]["2-ranks-stage3"].update(max_abs_difference=1e-3))
    edit_result(results, "parquet_memory_vm.json", lambda d: d.update(peak_rss_mib=d["rss_before_mib"] + 1234))
    after = {name: render(results) for name, render in renders.items()}
    assert "| native | 0 | " in "\n".join(after["engines"]) and "| 12,345 |" in "\n".join(after["engines"])
    assert "| 2.5e-01 |" in "\n".join(after["engines_124m"])
    assert "| 7.864 | 7.000 | 1.123x |" in "\n".join(after["trl"])
    assert "| 98.7% |" in "\n".join(after["sparse"])
    assert "verification 9.9 s" in after["checkpoints"][0]
    assert "the rounds of 2-ranks-stage3 did NOT end with the uninterrupted run's weights" in after["checkpoints"][0]
    assert "rising by 1234 MiB" in after["parquet"][0]
    assert all(after[name] != before[name] for name in renders)


def new_spelling(data):
    """A result file as bench/common.py spells provenance, from one in an older spelling."""
    found = results_table.versions_of(data)
    machine, load = results_table.machine_of(data), results_table.load_average_of(data)
    old_fields = ("machine", "cpu", "cpu_cores", "torch", "triton", "deepspeed", "python", "pyarrow", "peers",
                  "versions", "loadavg_before", "loadavg_after", "load_average_before", "load_average_after")
    new = {key: value for key, value in data.items() if key not in old_fields}
    new["versions"] = {key: value for key, value in found.items() if key != "project_torch"}
    new.update({"machine": machine} if machine else {})
    new.update({"load_average_before": load[0], "load_average_after": load[1]} if load else {})
    return new


def test_old_and_new_provenance_spellings_render_the_same(tmp_path):
    """The committed files spell machine, load and versions four ways; bench/common.py's one spelling renders
    every block exactly as they do."""
    old = copy_results(tmp_path / "old")
    new = copy_results(tmp_path / "new")
    spellings = set()
    for path in new.glob("*.json"):
        data = json.loads(path.read_text())
        spellings.add(type(data.get("machine")).__name__ + ("/loadavg" if "loadavg_before" in data else ""))
        path.write_text(json.dumps(new_spelling(data)))
    assert {"str", "dict/loadavg", "NoneType"} <= spellings  # the spellings this test converts
    for page, name, source, render in results_table.BLOCKS:
        assert render(new) == render(old), name
    demo = json.loads((new / "demo_cpu.json").read_text())
    assert set(demo["machine"]) == {"cpu", "cores"} and "cpu_cores" not in demo


def test_provenance_is_spelled_one_way_and_renders(tmp_path, monkeypatch):
    monkeypatch.setattr(common.os, "getloadavg", lambda: (1.234, 2.0, 3.0))
    record = common.provenance(["bench/compare_engines.py", "train_sft.py"], [0.5, 0.25, 0.125],
                               packages=("deepspeed", "no-such-package"))
    assert list(record) == ["date", "versions", "sources", "machine", "load_average_before", "load_average_after"]
    assert record["load_average_before"] == [0.5, 0.25, 0.125] and record["load_average_after"] == [1.23, 2.0, 3.0]
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["no-such-package"] == "not installed"
    assert set(record["machine"]) == {"cpu", "cores"} and record["machine"]["cores"] == os.cpu_count()
    # every project file the trainer runs, also those compare_engines.py used to leave out
    for path in ("train_sft.py", "deepspeed_engine.py", "options.py", "checkpoint.py", "zero_lite.py", "model.py",
                 "hf_format.py", "tokenizer.py", "data.py", "sparse.py", "sft_kernels/cross_entropy.py",
                 "bench/common.py"):
        assert path in record["sources"], path
    assert record["sources"]["model.py"] == common.source_digests(["model.py"])["model.py"]
    assert results_table.machine_words(record).endswith("shared (load average 0.50 before, 1.23 after)")
    with pytest.raises(ValueError, match="is not a file of this repository"):
        common.source_digests(["../PREAMBLE.md"])


BENCH_SCRIPTS = sorted(path for path in (ROOT / "bench").glob("*.py") if path.name not in ("common.py", "results_table.py", "prose_chats.py"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda path: path.name)
def test_every_bench_script_records_provenance_through_bench_common(script):
    text = script.read_text()
    assert "provenance(" in text, f"{script.name} writes no provenance through bench/common.py"
    for private in ("getloadavg", "loadavg", "platform.python_version", "hashlib.sha256", "/proc/cpuinfo",
                    "source_digest("):
        assert private not in text, f"{script.name} records {private} itself instead of through bench/common.py"
    assert "../" not in text and "/work/" not in text, f"{script.name} cites a file outside the repository"
