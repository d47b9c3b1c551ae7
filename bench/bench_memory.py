"""Where the trainer's peak resident memory goes, phase by phase, in one process as a user runs it.

    .venv/bin/python bench/bench_memory.py [--label=after] -- TRAIN_SFT_OPTIONS...
    e.g. .venv/bin/python bench/prose_chats.py /tmp/chats
         .venv/bin/python bench/bench_memory.py -- --init_from=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf \
             --data_path=/tmp/chats/train.jsonl --eval_data_path=/tmp/chats/eval.jsonl --template=model \
             --batch_size=4 --max_seq_len=512 --max_steps=3 --eval_interval=0 --eval_exact_match=0 \
             --output_dir=/tmp/memory_run --overwrite_output_dir=true

It runs train_sft.main with those options in this process and wraps the trainer's phases (the data, the
model load, the optimizer, the engine, each step's forward, backward and optimizer step, the final
checkpoint, export and eval). Around each phase it reads /proc/self/status: the resident memory at its
end (VmRSS) and the peak during it (VmHWM, reset before the phase by writing 5 to /proc/self/clear_refs),
so a phase's peak is its own, not an earlier one's. Every step's three phases are recorded, so the first
step and the steady ones can be told apart. Linux only.

Writes bench/results/memory_<label>.json with the phases, the process's overall peak and the resident
memory once the engine exists (the model state, AdamW's moments made), with load average and provenance.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load_average, provenance  # noqa: E402

STEP_PHASES = ("forward", "backward", "optimizer step")


def status_mib(field):
    """A VmRSS/VmHWM line of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak():
    """Sets VmHWM back to the current VmRSS, so the next reading is the peak since now."""
    Path("/proc/self/clear_refs").write_text("5")


class PhaseLog:
    """The resident memory at the end of each phase and its peak during it, in the order they ran."""

    def __init__(self):
        self.phases, self.overall_peak = [], 0.0

    def mark(self, name):
        """The phase that just ended (or a point, such as after the imports): its resident memory and peak."""
        peak = status_mib("VmHWM")
        self.overall_peak = max(self.overall_peak, peak)
        self.phases.append({"phase": name, "rss_mib": round(status_mib("VmRSS"), 1), "peak_mib": round(peak, 1)})
        print(f"{name:<28} rss {self.phases[-1]['rss_mib']:8.1f} MiB   peak during {peak:8.1f} MiB", flush=True)

    def wrap(self, owner, attribute, name):
        """Replaces owner.attribute by a function that records the phase around each call; name may be a
        callable of the call count, so steps are told apart."""
        original = getattr(owner, attribute)
        calls = [0]

        def wrapped(*args, **kwargs):
            calls[0] += 1
            self.overall_peak = max(self.overall_peak, status_mib("VmHWM"))
            reset_peak()
            result = original(*args, **kwargs)
            self.mark(name(calls[0]) if callable(name) else name)
            return result
        setattr(owner, attribute, wrapped)


def main(argv):
    label = "run"
    if argv and argv[0].startswith("--label="):
        label, argv = argv[0].split("=", 1)[1], argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    load_before = load_average()
    log = PhaseLog()
    log.mark("start (python)")
    import torch  # noqa: F401
    import train_sft
    import zero_lite
    log.mark("after imports")
    for attribute, name in (("load_data", "data load + tokenize"), ("prepare_model", "model load"),
                            ("make_optimizer", "optimizer"), ("make_engine", "engine"),
                            ("checkpoint_now", "final checkpoint"), ("export", "export"),
                            ("run_eval", "final eval")):
        log.wrap(train_sft, attribute, name)
    for attribute, phase in zip(("__call__", "backward", "step"), STEP_PHASES):
        log.wrap(zero_lite.Engine, attribute, lambda n, phase=phase: f"step {n}: {phase}")
    train_sft.main(argv)
    log.mark("end")
    model_state = next((p for p in log.phases if p["phase"] == "engine"), None)
    record = {"label": label, "argv": argv, "phases": log.phases, "peak_rss_mib": round(log.overall_peak, 1),
              "rss_after_engine_mib": model_state and model_state["rss_mib"],
              **provenance(["bench/bench_memory.py", "train_sft.py"], load_before)}
    path = ROOT / "bench" / "results" / f"memory_{label}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"peak RSS {record['peak_rss_mib']:,.1f} MiB; load {record['load_average_before']} -> "
          f"{record['load_average_after']}; wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
