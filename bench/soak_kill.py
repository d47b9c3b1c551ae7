"""Kill -9 soak: random SIGKILLs and resumes must end with the same weights as an uninterrupted run.

    python bench/soak_kill.py [--kills=12] [--seed=0] [--modes=all]   # --kills per mode

Not part of the test suite (it takes minutes per mode). The modes: one process, and torchrun with 2
ranks (gloo, CPU) at native stages 0, 2 and 3 and on DeepSpeed at stage 2 (--modes picks some, by
name, comma-separated). For each mode it trains a tiny model once without interruption, then again
from scratch in rounds. Each start is killed with SIGKILL at a random moment (mostly within the
training loop's length after the loop began, sometimes during the setup, and in about a third of
the starts just after a checkpoint write began): the whole job or, under torchrun, sometimes a
single rank, which torchrun answers by stopping the other. The next start resumes
with --resume, or starts afresh with --overwrite_output_dir when no checkpoint was written yet,
until a start finishes; the round's exported weights are then compared with the uninterrupted
run's. Rounds repeat until the mode has seen --kills kills. Dropout is on, so the restored
random-number states matter too. A start that exits non-zero without having been killed is a
failure. Writes bench/results/soak_kill.json; exits 1 when any round differs or failed.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from options import parse_script_options  # noqa: E402
from bench.common import load_average, provenance  # noqa: E402
OPTIONS = ["--tokenizer=byte", "--n_layer=2", "--n_head=2", "--n_embd=32", "--max_seq_len=48", "--batch_size=4",
           "--learning_rate=3e-3", "--dropout=0.1", "--seed=7", "--max_steps=40", "--checkpoint_interval=2",
           "--keep_checkpoints=2", "--log_interval=5", "--eval_exact_match=0"]


MODES = {"1-process": (1, []),  # name: (ranks, options of its own)
         "2-ranks-stage0": (2, ["--zero_stage=0"]),
         "2-ranks-stage2": (2, ["--zero_stage=2"]),
         "2-ranks-stage3": (2, ["--zero_stage=3"]),
         "2-ranks-deepspeed-stage2": (2, ["--engine=deepspeed", "--zero_stage=2"])}
BENCH_OPTIONS = {"kills": (12, "runs killed with SIGKILL at a random moment, per mode"),
                 "seed": (0, "seed of the kill times"),
                 "modes": ("all", "all, or some of " + ", ".join(MODES) + ", comma-separated")}


def write_data(path):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(400):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9)))
            f.write(json.dumps({"prompt": f"reverse {word}", "response": word[::-1]}) + "\n")


def command(nproc, workdir, out, extra):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, str(ROOT / "train_sft.py"), *OPTIONS, f"--data_path={workdir}/data.jsonl",
            f"--cache_dir={workdir}/cache", f"--output_dir={out}", *extra]


def start(nproc, workdir, out, extra, log):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # the log shows when the loop begins
    return subprocess.Popen(command(nproc, workdir, out, extra), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def ranks_of(launcher):
    """The worker processes torchrun started (its children; each in a session of its own)."""
    try:
        return [int(pid) for pid in open(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read().split()]
    except OSError:
        return []


def alive(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(proc, nproc, rng):
    """SIGKILL to the whole job, or under torchrun sometimes to one rank only (torchrun then stops the
    other); returns once every process of the job is gone, so that its lock is released."""
    workers = ranks_of(proc) if nproc > 1 else []
    single_rank = bool(workers) and rng.random() < 0.5
    if single_rank:
        os.kill(rng.choice(workers), signal.SIGKILL)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            pass
    for pid in [proc.pid, *workers]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    while any(alive(pid) for pid in workers):
        time.sleep(0.05)
    return "one rank" if single_rank else "whole job"


def training_started(proc, log_path):
    """Waits until the trainer prints its model line (setup done, the loop begins) or exits; returns when."""
    while proc.poll() is None and "model: " not in log_path.read_text(errors="replace"):
        time.sleep(0.02)
    return time.perf_counter()


def wait_for_a_checkpoint_write(proc, out, stale, rng):
    """Raises TimeoutExpired (the moment to kill) a few milliseconds after a checkpoint directory
    appears under its unfinished name, so that kills land inside writes more often than at random;
    returns when the run ends first."""
    while proc.poll() is None:
        if set(leftovers(out)) - stale:
            time.sleep(rng.uniform(0.0, 0.02))
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(0.001)


def checkpoints(out):
    return sorted(p.name for p in out.glob("ckpt-*") if p.name[5:].isdigit()) if out.exists() else []


def leftovers(out):
    return sorted(p.name for p in out.glob("ckpt-*") if p.suffix in (".tmp", ".old")) if out.exists() else []


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")


def soak(mode, kills_wanted, training_s, reference, workdir, rng):
    """Rounds of killed and resumed starts until kills_wanted kills; returns the mode's figures."""
    nproc, mode_options = MODES[mode]
    figures = {"rounds": 0, "kills": 0, "kills_of_one_rank": 0, "kills_during_a_checkpoint_write": 0,
               "resumes": 0, "fresh_starts": 0, "max_abs_difference": 0.0, "failures": []}
    began = time.perf_counter()
    while figures["kills"] < kills_wanted and not figures["failures"]:
        out = workdir / f"soak-{mode}-{figures['rounds']}"
        figures["rounds"] += 1
        while True:
            resume = bool(checkpoints(out))
            figures["resumes" if resume else "fresh_starts"] += 1
            with open(workdir / "start.log", "w") as log:
                restart = ["--resume"] if resume else ["--overwrite_output_dir"]
                stale = set(leftovers(out))  # unfinished checkpoints of the start before, not this one's
                proc = start(nproc, workdir, out, [*mode_options, *restart], log)
                try:
                    if figures["kills"] < kills_wanted:  # most kills in the loop, a few during the setup
                        if rng.random() < 0.85:
                            training_started(proc, workdir / "start.log")
                        if rng.random() < 0.3:
                            wait_for_a_checkpoint_write(proc, out, stale, rng)
                        proc.wait(timeout=rng.uniform(0.0, 1.0) * training_s)
                    proc.wait()
                except subprocess.TimeoutExpired:
                    figures["kills_of_one_rank"] += kill(proc, nproc, rng) == "one rank"
                    figures["kills"] += 1
                    figures["kills_during_a_checkpoint_write"] += bool(leftovers(out))
                    continue
            if proc.returncode != 0:
                figures["failures"].append(f"round {figures['rounds']}: exit {proc.returncode} without a kill: "
                                           + (workdir / "start.log").read_text()[-2000:])
            break
        if not figures["failures"]:
            weights = load_file(out / "hf" / "model.safetensors")
            figures["max_abs_difference"] = max(figures["max_abs_difference"], max_difference(reference, weights))
        shutil.rmtree(out, ignore_errors=True)
    figures["wall_s"] = round(time.perf_counter() - began, 1)
    return figures


def chosen_modes(names):
    """The modes --modes names, in MODES's order; an unknown name stops with the ones there are."""
    if names == "all":
        return list(MODES)
    wanted = names.split(",")
    unknown = [name for name in wanted if name not in MODES]
    if unknown:
        sys.exit(f"--modes: unknown mode {unknown[0]!r}; the modes are all, " + ", ".join(MODES))
    return [name for name in MODES if name in wanted]


def main():
    args = parse_script_options(sys.argv[1:], BENCH_OPTIONS, __doc__)
    kills_wanted, rng, modes = args["kills"], random.Random(args["seed"]), chosen_modes(args["modes"])
    load_before = load_average()  # the machine may be shared: its load goes with the figures
    results = {"script": "bench/soak_kill.py", "options": OPTIONS, "kills_per_mode": kills_wanted, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        write_data(workdir / "data.jsonl")
        for mode in modes:
            nproc, mode_options = MODES[mode]
            out = workdir / f"uninterrupted-{mode}"
            with open(workdir / "start.log", "w") as log:
                proc = start(nproc, workdir, out, mode_options, log)
                began = training_started(proc, workdir / "start.log")
                if proc.wait() != 0:
                    sys.exit(f"the uninterrupted run failed:\n{(workdir / 'start.log').read_text()[-3000:]}")
            training_s = time.perf_counter() - began
            reference = load_file(out / "hf" / "model.safetensors")
            figures = soak(mode, kills_wanted, training_s, reference, workdir, rng)
            figures["uninterrupted_training_s"] = round(training_s, 1)
            results["modes"][mode] = {"ranks": nproc, "options": mode_options, **figures}
            print(f"{mode}: {json.dumps(figures)}", flush=True)
    results.update(provenance(["bench/soak_kill.py", "train_sft.py"], load_before, packages=("deepspeed",)))
    path = ROOT / "bench" / "results" / "soak_kill.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {path}")
    bad = any(m["failures"] or m["max_abs_difference"] != 0.0 for m in results["modes"].values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
