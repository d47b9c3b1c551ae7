"""Kill -9 soak: random SIGKILLs, full disks and resumes must end with the same weights as an uninterrupted run.

    python bench/soak_kill.py [--kills=12] [--seed=0] [--modes=all]   # --kills per mode

Not part of the test suite (it takes minutes per mode). The modes: one process, and torchrun with 2
ranks (gloo, CPU) at native stages 0, 2 and 3 and on DeepSpeed at stage 2 (--modes picks some, by
name, comma-separated). For each mode it trains a tiny model once without interruption, then again
from scratch in rounds. Each start is killed with SIGKILL at a random moment (mostly within the
training loop's length after the loop began, sometimes during the setup, and in about a third of
the starts just after a checkpoint write began, in some during the Hugging Face export): the whole job
or, under torchrun, sometimes a single rank, which torchrun answers by stopping the other. On
DeepSpeed, the first resume of each round is tried on 1 rank first: it must be refused (exit 2, one
sentence naming both world sizes, the checkpoints untouched). The next start resumes
with --resume, or starts afresh with --overwrite_output_dir when no checkpoint was written yet,
until a start finishes; the round's exported weights are then compared with the uninterrupted
run's. Rounds repeat until the mode has seen --kills kills. Dropout is on, so the restored
random-number states matter too. A start that exits non-zero without having been killed is a
failure.

The disk-fills modes put the output directory on a small tmpfs (mounting one needs root; the modes
are recorded as skipped where it cannot be had) and, when each round's first start logs a random
step of the first half (between two checkpoints), another process fills it: the run must stop with
exit 4 and one sentence, run.json recording the 4, no temporary file left behind; the filler is then
removed and the run resumed to its end. Rounds there number --kills / 2. Writes --results
(bench/results/soak_kill.json); exits 1 when any round differs or failed.
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
OPTIONS_MAX_STEPS = 40


MODES = {"1-process": (1, []),  # name: (ranks, options of its own)
         "2-ranks-stage0": (2, ["--zero_stage=0"]),
         "2-ranks-stage2": (2, ["--zero_stage=2"]),
         "2-ranks-stage3": (2, ["--zero_stage=3"]),
         "1-process-disk-fills": (1, []),
         "2-ranks-stage2-disk-fills": (2, ["--zero_stage=2"]),
         "2-ranks-deepspeed-stage2": (2, ["--engine=deepspeed", "--zero_stage=2"])}
BENCH_OPTIONS = {"kills": (12, "runs killed with SIGKILL at a random moment, per mode"),
                 "seed": (0, "seed of the kill times"),
                 "modes": ("all", "all, or some of " + ", ".join(MODES) + ", comma-separated"),
                 "export_share": (0.15, "share of the kills aimed at the Hugging Face export"),
                 "results": ("bench/results/soak_kill.json", "where the JSON goes, relative to the repository")}


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


def wait_for_the_export(proc, log_path, rng):
    """Raises TimeoutExpired a few milliseconds after the final checkpoint is logged, which the Hugging
    Face export follows at once; returns when the run ends first."""
    final = f"checkpoint step {OPTIONS_MAX_STEPS} ->"
    while proc.poll() is None:
        if final in log_path.read_text(errors="replace"):
            time.sleep(rng.uniform(0.0, 0.05))
            raise subprocess.TimeoutExpired(proc.args, 0)
        time.sleep(0.005)


def refused_on_one_rank(workdir, out, mode_options):
    """A resume of a DeepSpeed ZeRO run on 1 rank instead of 2; None when it was refused as it must be
    (exit 2, one sentence naming both world sizes, run.json recording it, the checkpoints untouched),
    else what went wrong."""
    before = checkpoints(out)
    with open(workdir / "refused.log", "w") as log:
        proc = start(1, workdir, out, [*mode_options, "--resume"], log)
        proc.wait()
    text = (workdir / "refused.log").read_text(errors="replace")
    sentence = [line for line in text.splitlines() if line.startswith("train_sft.py: error: --resume on 1 rank(s)")]
    record = json.loads((out / "run.json").read_text())
    if (proc.returncode, len(sentence), record.get("exit_code"), checkpoints(out)) != (2, 1, 2, before) \
            or "on 2 rank(s)" not in sentence[0] or "Traceback" in text:
        return f"a resume on 1 rank: exit {proc.returncode}, run.json {record}: " + text[-2000:]
    return None


def checkpoints(out):
    return sorted(p.name for p in out.glob("ckpt-*") if p.name[5:].isdigit()) if out.exists() else []


def leftovers(out):
    return sorted(p.name for p in out.glob("ckpt-*") if p.suffix in (".tmp", ".old")) if out.exists() else []


def max_difference(a, b):
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a) if a.keys() == b.keys() else float("inf")


def soak(mode, kills_wanted, training_s, reference, workdir, rng, export_share):
    """Rounds of killed and resumed starts until kills_wanted kills; returns the mode's figures."""
    nproc, mode_options = MODES[mode]
    figures = {"rounds": 0, "kills": 0, "kills_of_one_rank": 0, "kills_during_a_checkpoint_write": 0,
               "kills_during_the_export": 0, "resumes": 0, "fresh_starts": 0, "max_abs_difference": 0.0,
               "failures": []}
    if "--engine=deepspeed" in mode_options:
        figures["refused_resumes_on_1_rank"] = 0
    began = time.perf_counter()
    while figures["kills"] < kills_wanted and not figures["failures"]:
        out = workdir / f"soak-{mode}-{figures['rounds']}"
        figures["rounds"] += 1
        other_world_size_tried = False
        while True:
            resume = bool(checkpoints(out))
            if resume and "refused_resumes_on_1_rank" in figures and not other_world_size_tried:
                other_world_size_tried = True
                problem = refused_on_one_rank(workdir, out, mode_options)
                if problem:
                    figures["failures"].append(f"round {figures['rounds']}: {problem}")
                    break
                figures["refused_resumes_on_1_rank"] += 1
            figures["resumes" if resume else "fresh_starts"] += 1
            with open(workdir / "start.log", "w") as log:
                restart = ["--resume"] if resume else ["--overwrite_output_dir"]
                stale = set(leftovers(out))  # unfinished checkpoints of the start before, not this one's
                proc = start(nproc, workdir, out, [*mode_options, *restart], log)
                moment = rng.random()  # below export_share: in the export; up to 0.3 above: in a checkpoint write
                try:
                    if figures["kills"] < kills_wanted:  # most kills in the loop, a few during the setup
                        if rng.random() < 0.85:
                            training_started(proc, workdir / "start.log")
                        if moment < export_share:
                            wait_for_the_export(proc, workdir / "start.log", rng)
                        elif moment < export_share + 0.3:
                            wait_for_a_checkpoint_write(proc, out, stale, rng)
                        proc.wait(timeout=rng.uniform(0.0, 1.0) * training_s)
                    proc.wait()
                except subprocess.TimeoutExpired:
                    exporting = moment < export_share
                    figures["kills_of_one_rank"] += kill(proc, nproc, rng) == "one rank"
                    figures["kills"] += 1
                    figures["kills_during_a_checkpoint_write"] += bool(leftovers(out))
                    figures["kills_during_the_export"] += exporting and "exported Hugging Face model" not in (
                        workdir / "start.log").read_text(errors="replace")
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


def mounted_tmpfs(path, size):
    """Whether a tmpfs of this size could be mounted at path (it needs root)."""
    path.mkdir()
    return shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def logged_step(proc, log_path, step):
    """Waits until the run logs this step (log_interval 5: between two checkpoints); False if it ends first."""
    while proc.poll() is None:
        if f"step {step} |" in log_path.read_text(errors="replace"):
            return True
        time.sleep(0.005)
    return False


def fill(disk):
    """Another process fills the disk to its last byte."""
    subprocess.run(["dd", "if=/dev/zero", f"of={disk}/filler", "bs=64k"], capture_output=True)


def stopped_on_a_full_disk(proc, nproc, out, log_path):
    """None when a start that met a full disk stopped as it must (exit 4, or torchrun's 1 with run.json
    recording 4; one sentence, no traceback from the trainer, no temporary file left), else what went wrong."""
    text = log_path.read_text(errors="replace")
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
    temporary = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".old"))]
    sentences = [line for line in text.splitlines() if line.startswith("train_sft.py: error: ")]
    # torchrun prints a traceback of its own launcher (ChildFailedError) for any failed rank: not the trainer's
    if (proc.returncode, record.get("exit_code"), len(sentences)) != (4 if nproc == 1 else 1, 4, 1) \
            or temporary or 'train_sft.py", line' in text:
        return f"a full disk: exit {proc.returncode}, run.json {record}, left {temporary}: " + text[-2000:]
    return None


def soak_disk_fills(mode, rounds, reference, workdir, rng):
    """Rounds in which another process fills the output directory's disk during the first start, the
    run stops, the space comes back and the run resumes to its end; returns the mode's figures."""
    nproc, mode_options = MODES[mode]
    figures = {"rounds": 0, "disk_fills": 0, "stops_on_a_full_disk": 0, "finished_before_the_fill": 0,
               "resumes": 0, "fresh_starts": 0, "max_abs_difference": 0.0, "failures": []}
    disk = workdir / f"disk-{mode}"
    if not mounted_tmpfs(disk, "8m"):
        return {"skipped": "a tmpfs cannot be mounted here (needs root)"}
    began = time.perf_counter()
    try:
        while figures["rounds"] < rounds and not figures["failures"]:
            out = disk / "out"
            figures["rounds"] += 1
            with open(workdir / "start.log", "w") as log:
                proc = start(nproc, workdir, out, [*mode_options, "--overwrite_output_dir"], log)
                figures["fresh_starts"] += 1
                if logged_step(proc, workdir / "start.log", rng.randrange(5, OPTIONS_MAX_STEPS // 2 + 1, 5)):
                    fill(disk)
                    figures["disk_fills"] += 1
                proc.wait()
            if proc.returncode == 0:
                figures["finished_before_the_fill"] += 1
            else:
                problem = stopped_on_a_full_disk(proc, nproc, out, workdir / "start.log")
                if problem:
                    figures["failures"].append(f"round {figures['rounds']}: {problem}")
                    break
                figures["stops_on_a_full_disk"] += 1
            (disk / "filler").unlink(missing_ok=True)
            while proc.returncode != 0 or not (out / "hf").exists():
                resume = bool(checkpoints(out))
                figures["resumes" if resume else "fresh_starts"] += 1
                with open(workdir / "start.log", "w") as log:
                    proc = start(nproc, workdir, out, [*mode_options, "--resume" if resume else
                                                       "--overwrite_output_dir"], log)
                    proc.wait()
                if proc.returncode != 0:
                    figures["failures"].append(f"round {figures['rounds']}: exit {proc.returncode} after the disk "
                                               "was freed: " + (workdir / "start.log").read_text()[-2000:])
                    break
            if not figures["failures"]:
                weights = load_file(out / "hf" / "model.safetensors")
                figures["max_abs_difference"] = max(figures["max_abs_difference"], max_difference(reference, weights))
            shutil.rmtree(out, ignore_errors=True)
    finally:
        subprocess.run(["umount", "-l", str(disk)])
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
    results = {"script": "bench/soak_kill.py", "options": OPTIONS, "kills_per_mode": kills_wanted,
               "export_share": args["export_share"], "modes": {}}
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
            if mode.endswith("disk-fills"):
                figures = soak_disk_fills(mode, max(1, kills_wanted // 2), reference, workdir, rng)
            else:
                figures = soak(mode, kills_wanted, training_s, reference, workdir, rng, args["export_share"])
            figures["uninterrupted_training_s"] = round(training_s, 1)
            results["modes"][mode] = {"ranks": nproc, "options": mode_options, **figures}
            print(f"{mode}: {json.dumps(figures)}", flush=True)
            # after every mode, so that a soak cut short keeps what it measured
            results.update(provenance(["bench/soak_kill.py", "train_sft.py"], load_before, packages=("deepspeed",)))
            path = ROOT / args["results"]
            path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"-> {path}")
    bad = any(m.get("failures") or m.get("max_abs_difference", 0.0) != 0.0 for m in results["modes"].values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
