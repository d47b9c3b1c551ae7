"""bench/compare_trl.py without TRL: its project-side wiring, the row-by-row check that both systems
train the same positions, and the timing read from a trainer's output; the peers' side is checked
only where their virtual environment is set up."""
import json

import numpy as np
import pytest

from bench import compare_trl
from options import parse_options


def default_args(**overrides):
    args, _ = parse_options([f"--{k}={v}" for k, v in overrides.items()], compare_trl.OPTIONS, compare_trl.CHOICES,
                            compare_trl.RANGES, compare_trl.__doc__)
    return compare_trl.resolve(args)


def test_the_project_side_of_the_dry_run_finds_its_data_and_a_command_line_train_sft_accepts(tmp_path):
    lines = compare_trl.check_project(default_args(device="cpu"), tmp_path)
    assert lines[0].endswith("train_alpaca.jsonl: alpaca, first row line 1")
    assert lines[1].endswith("eval_alpaca.jsonl: alpaca, first row line 1")
    command = lines[2]
    assert command.startswith("train_sft.py ") and "--max_steps=20" in command and "--template=deepspeed_chat" in command
    assert len((tmp_path / "train_rows.jsonl").read_text().splitlines()) == 320


def test_the_dry_run_rejects_data_that_is_not_alpaca(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "p", "response": "r"}) + "\n" for _ in range(16)))
    with pytest.raises(ValueError, match="prompt_response format; this benchmark needs Alpaca rows"):
        compare_trl.check_project(default_args(data_path=rows, eval_data_path=rows, rows=16), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    ({"rows": 100}, "--rows=100 must be a multiple of --batch_size=16"),
    ({"data_path": "train.jsonl"}, "--data_path needs --eval_data_path"),
])
def test_options_that_would_make_the_runs_differ_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        default_args(**overrides)


class FakeProjectSet:
    """SFTDataset's tokens_and_mask for rows given as (tokens, mask)."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def tokens_and_mask(self, i):
        tokens, mask = self.rows[i]
        return np.array(tokens), np.array(mask, dtype=np.uint8)


def test_verification_names_the_rows_whose_ids_or_trained_positions_differ(tmp_path):
    project = FakeProjectSet([([5, 6, 7, 8], [0, 0, 1, 1]), ([5, 6, 7], [0, 1, 1]), ([1, 2, 3], [0, 0, 1]),
                              ([9, 9], [0, 1])])
    trl_rows = [([5, 6, 7, 8], [5, -100, 7, 8]),  # TRL's first label is never used: the same positions
                ([5, 6, 7], [-100, -100, 7]),      # one response token fewer trained
                ([1, 2, 4], [-100, -100, 4])]      # another token id; the project's fourth row is missing here
    rows_file = tmp_path / "trl_rows.jsonl"
    rows_file.write_text("".join(json.dumps(row) + "\n" for row in trl_rows))
    result = compare_trl.verify_positions(project, rows_file)
    assert result["identical_rows"] == 1 and result["differing_rows"] == 3
    assert result["first_differences"] == [{"row": 1, "why": "trained positions differ"},
                                           {"row": 2, "why": "token ids differ"}]
    assert compare_trl.trained_positions(project, 2) == 2 + 2


def test_training_time_runs_from_the_loop_start_line_to_the_last_step_line():
    lines = [(0.0, 1.0, "data: reused cache"), (2.0, 3.0, "rank 0 model state at start: weights 1 MiB"),
             (3.0, 4.0, "step 1 | loss 10.9 | peak_mem_gib 0.5"), (3.5, 5.0, "step 2 | loss 10.1 | peak_mem_gib 0.7"),
             (4.5, 6.5, "step 3 | loss 9.8 | peak_mem_gib 0.6"), (9.0, 9.0, "eval step 3: loss 9.7")]
    span = compare_trl.training_span({"lines": lines}, compare_trl.PROJECT_START, compare_trl.PROJECT_STEP, gpu=True)
    assert span == {"steps": 3, "wall_s": 2.5, "cpu_s": 3.5, "step_s_median": 0.75, "step_s_min": 0.5,
                    "peak_gpu_gib": 0.7}
    on_cpu = compare_trl.training_span({"lines": lines}, compare_trl.PROJECT_START, compare_trl.PROJECT_STEP)
    assert on_cpu["peak_gpu_gib"] is None, "on a CPU the project's peak_mem_gib is resident memory, not GPU memory"


def test_the_peers_side_imports_trl_at_the_projects_torch_version():
    """Runs the peers' Python (a few seconds of imports); skipped where the peers are not set up."""
    import torch
    try:
        versions = compare_trl.check_peers(str(compare_trl.PEERS_PYTHON))
    except compare_trl.PeersMissing as e:
        pytest.skip(f"TRL is not set up for bench/compare_trl.py: {e}")
    assert versions["trl"] == "1.16.0"
    assert versions["torch"].split("+")[0] == torch.__version__.split("+")[0]


def test_a_measured_process_reports_its_own_peak_memory_and_its_lines_as_they_come():
    """The peak is the child's (300 MiB written), not this process's memory at the fork (pytest with
    torch loaded), which ru_maxrss would report."""
    import sys
    child = "import time; x = b'x' * (300 << 20); print('allocated', flush=True); time.sleep(1.0); print('done')"
    result = compare_trl.run_measured([sys.executable, "-c", child])
    assert [line for _, _, line in result["lines"]] == ["allocated", "done"]
    assert 300 <= result["peak_rss_mib"] < 400
    (first, _, _), (last, _, _) = result["lines"]
    # read as they come: 1 s apart, not both at the exit (the slack is the reader thread's on a busy machine)
    assert last - first >= 0.5 and result["cpu_s"] > 0


def test_chat_rows_become_prompt_completion_rows_and_other_rows_are_refused():
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert compare_trl.as_chat_row({"messages": [user, answer, user, answer]}, "row 1") == {
        "prompt": [user, answer, user], "completion": [answer]}
    kept = {"prompt": [user], "completion": [answer]}
    assert compare_trl.as_chat_row(kept, "row 1") == kept
    with pytest.raises(ValueError, match="row 3: a chat row needs 'messages' ending with an assistant message"):
        compare_trl.as_chat_row({"messages": [answer, user]}, "row 3")


def test_verification_counts_what_trl_trains_after_the_end_of_turn_token(tmp_path):
    """The project's chat sample ends at <|im_end|> (id 9 here); TRL's row goes on with the newline (id 4),
    trained: the rows are the same positions plus one that TRL alone trains, counted apart."""
    project = FakeProjectSet([([5, 6, 7, 9], [0, 0, 1, 1]), ([5, 7, 9], [0, 1, 1])])
    rows_file = tmp_path / "trl_rows.jsonl"
    rows_file.write_text(json.dumps([[5, 6, 7, 9, 4], [-100, -100, 7, 9, 4]]) + "\n"
                         + json.dumps([[5, 7, 9, 4], [-100, 7, 9, 4]]) + "\n")
    chat = compare_trl.verify_positions(project, rows_file, trailing_ok=True)
    assert chat["identical_rows"] == 2 and chat["differing_rows"] == 0 and chat["trl_extra_trained_positions"] == 2
    strict = compare_trl.verify_positions(project, rows_file)
    assert strict["differing_rows"] == 2, "without a chat template the rows must match to the last token"


def test_the_dry_run_with_a_real_model_trains_chats_with_its_own_template(tmp_path):
    from conftest import make_chatml_tokenizer_dir
    from model import GPT, family_config
    init = tmp_path / "init"
    GPT(family_config("llama", vocab_size=512, n_layer=1, n_head=2, n_embd=16, block_size=64)).save_pretrained(init)
    make_chatml_tokenizer_dir(init)
    args = default_args(device="cpu", init_from=init, rows=16)
    lines = compare_trl.check_project(args, tmp_path)
    assert lines[0].endswith("train_chats.jsonl: prompt_completion, first row line 1")
    assert f"--init_from={init} --tokenizer={init} --template=model" in lines[2]
    first = json.loads((tmp_path / "train_rows.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in first["prompt"] + first["completion"]] == ["user", "assistant"]
    with pytest.raises(ValueError, match="does not exist"):
        default_args(init_from=tmp_path / "missing")
