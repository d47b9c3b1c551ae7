"""
Checkpoints and the output directory: everything a run leaves on disk except its metrics.

- The output directory: claimed by one run at a time (run.lock), cleaned of what a crash left behind,
  and refused to a new run while it holds an earlier run's output (run.json names the run).
- Checkpoints: ckpt-<step>/ directories written atomically with a manifest of checksums, found and
  verified (a damaged one is named and passed over), rotated, loaded, with every rank's RNG state.
- Models: built from a checkpoint, a Hugging Face directory or scratch options, and exported in
  Hugging Face format at the end of a run. sample.py builds its model from here too.
- Metrics: metrics.jsonl, one record a line.
Every write here meets a full disk or an I/O error the same way: one sentence (CheckpointError, exit 4
in the trainer) and no temporary file left behind.
"""
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import sys
import traceback
import uuid

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError

import data
import gguf_format
from hf_format import HF_WEIGHT_FILES, HF_WEIGHT_SUFFIXES, save_peft_adapter
from model import GPT, GPTConfig, apply_lora, family_config
from options import MODEL_OPTIONS, OPTIONS, RESUME_MAY_CHANGE, OptionError
from tokenizer import (HF_TOKENIZER_FILES, HFTokenizer, get_tokenizer, gguf_tokenizer_metadata, save_tokenizer,
                       tokenizer_identity)

# A checkpoint is a directory ckpt-<step>/ holding each rank's engine files, the trainer's state
# (rank 0), the consolidated weights and manifest.json: every file with its size and sha256, the step
# and the id of the run that wrote it. It is written as ckpt-<step>.tmp/ and renamed once every rank
# is done. run.json in output_dir names the run whose checkpoints these are: resume and rotation
# consider that run's checkpoints only, and a resume checks every sha256 first, falling back to the
# previous intact checkpoint. run.lock, locked by rank 0 for the run's life, keeps a second run out.
CHECKPOINT_NAME = re.compile(r"ckpt-(\d{8,})")
LEFTOVER_NAME = re.compile(r"(ckpt-\d{8,}|hf)\.(tmp|old)")  # being written, or being replaced, when a crash came
REJECTED_NAME = re.compile(r"ckpt-(\d{8,})\.rejected(\d*)")  # passed over by a resume (move_aside)
TRAINER_FILE, WEIGHTS_FILE, MANIFEST_FILE = "trainer.pt", "model.pt", "manifest.json"
RUN_FILE, LOCK_FILE = "run.json", "run.lock"
RUN_OUTPUTS = re.compile(r"metrics\.jsonl|hf|tensorboard|nonfinite-step-\d{8}-rank\d+\.json")  # besides checkpoints


class CheckpointError(RuntimeError):
    """A checkpoint, or another file of the run, could not be written (a full disk, say): the message says
    where and why."""


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EIO)  # what a full disk or a failing one reports


def is_disk_error(e):
    return isinstance(e, OSError) and e.errno in DISK_ERRORS


def write_failure(path, e):
    """One sentence for a write to path that failed with OSError e."""
    reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else e.strerror or type(e).__name__
    return f"{path or 'a file of the run'} could not be written: {reason}"


# -----------------------------------------------------------------------------
# The output directory


def check_output_dir(path):
    """Fails before training, not after an hour of it, when the output directory is not writable."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise OptionError(f"--output_dir={path} cannot be written: {e.strerror}") from None


def open_run(cfg, explicit, rank, world, log):
    """Makes output_dir this run's (claim_output_dir) and finds the state it starts from (starting_checkpoint:
    None, or a loaded checkpoint whose options are adopted into cfg). Returns (the lock, to keep referenced;
    the run id, which a resumed run keeps from its checkpoint; that loaded state). Rank 0 records the id in
    run.json at once, so that the file, and the disk block that holds it, is there for the run's outcome
    even when the disk fills before the first checkpoint."""
    check_output_dir(cfg["output_dir"])
    lock, run_id = claim_output_dir(cfg["output_dir"], cfg["resume"], cfg["overwrite_output_dir"], rank, world, log)
    saved_state = starting_checkpoint(cfg, explicit, log, rank == 0, world)
    if saved_state is not None and cfg["resume"]:
        run_id = saved_state["run_id"] or run_id
    if rank == 0:
        try:
            write_run_record(cfg["output_dir"], run_id)
        except OSError as e:
            raise CheckpointError(f"{write_failure(os.path.join(cfg['output_dir'], RUN_FILE), e)}; "
                                  f"the run stops before training") from None
    return lock, run_id, saved_state


def claim_output_dir(output_dir, resume, overwrite, rank, world, log):
    """Makes output_dir this run's before any work: rank 0 locks it for the run's life, restores or
    removes what a crash left behind and, for a new run, refuses an earlier run's output unless told
    to overwrite it. Returns (the lock, to keep referenced, None on other ranks; a new run id)."""
    lock, error = None, None
    if rank == 0:
        try:
            if resume and overwrite:
                raise OptionError("give either --resume (continue the run in --output_dir) or "
                                  "--overwrite_output_dir (replace it), not both")
            lock = lock_output_dir(output_dir)
            remove_leftovers(output_dir, log)
            if not resume:
                make_room_for_new_run(output_dir, overwrite, log)
        except OptionError as e:
            error = str(e)
            if lock is not None:  # refused: the directory was never this run's (write_outcome leaves it alone)
                lock.truncate(0)
                lock.close()
    error, run_id = from_rank0((error, uuid.uuid4().hex), world)
    if error:
        raise OptionError(error)
    return lock, run_id


def from_rank0(value, world):
    """Rank 0's value on every rank, so that all ranks take the same decision."""
    if world > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def lock_output_dir(output_dir):
    """An exclusive lock on output_dir/run.lock while the returned file stays open. The kernel drops
    it when the process ends, however it ends, so a killed run leaves nothing stuck."""
    f = open(os.path.join(output_dir, LOCK_FILE), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise OptionError(f"--output_dir={output_dir} is in use by a run that is still going ({holder}); "
                          f"wait for it to end or give another --output_dir") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def remove_leftovers(output_dir, log):
    """A crash can leave ckpt-<step>.tmp/ or hf.tmp/ (unfinished: removed) and ckpt-<step>.old/ or hf.old/
    (a complete checkpoint or export moved aside for its replacement: restored if that never arrived)."""
    for name in sorted(os.listdir(output_dir)):  # .old before .tmp
        match = LEFTOVER_NAME.fullmatch(name)
        path = os.path.join(output_dir, name)
        if not match or not os.path.isdir(path):
            continue
        final = os.path.join(output_dir, match.group(1))
        if match.group(2) == "old" and not os.path.exists(final):
            os.replace(path, final)
            log(f"restored {final} from {name}, left by an interrupted run")
        else:
            shutil.rmtree(path)
            log(f"removed {path}, left unfinished by an interrupted run")


def make_room_for_new_run(output_dir, overwrite, log):
    """A new run must not mix its checkpoints and metrics with an earlier run's: that output stops
    the run, or with --overwrite_output_dir is removed first."""
    checkpoints = [os.path.basename(path) for _, path in list_checkpoints(output_dir)]
    outputs = sorted(name for name in os.listdir(output_dir) if RUN_OUTPUTS.fullmatch(name))
    if not checkpoints and "metrics.jsonl" not in outputs:
        return
    if not overwrite:
        found = ", ".join(checkpoints[-2:]) if checkpoints else "metrics.jsonl and no checkpoint"
        resume = "continue that run with --resume or " if checkpoints else ""
        raise OptionError(f"--output_dir={output_dir} holds an earlier run's output ({found}): {resume}"
                          f"replace it with --overwrite_output_dir")
    for name in checkpoints + outputs + [RUN_FILE]:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
    log(f"--overwrite_output_dir: removed the earlier run's {', '.join(checkpoints + outputs)} from {output_dir}")


# -----------------------------------------------------------------------------
# Finding and verifying checkpoints


def list_checkpoints(output_dir):
    """(step, path) of every directory named as this project's checkpoints (ckpt-<8 digits>), ordered by
    step; any other name, such as ckpt-best/, is the user's and never touched."""
    found = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        match = CHECKPOINT_NAME.fullmatch(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def read_json_object(path):
    """The JSON object in path, or None when the file is missing, unreadable or holds no object."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def run_of(ckpt_dir):
    """The id of the run that wrote a checkpoint, from its manifest (None if it has none)."""
    return (read_json_object(os.path.join(ckpt_dir, MANIFEST_FILE)) or {}).get("run_id")


def find_checkpoint(path, log=lambda message: print(message, file=sys.stderr), set_aside=False):
    """An intact checkpoint: path itself when it is a checkpoint directory, else the latest intact one
    of the run that run directory path records (of any run, without a record). Each one passed over is
    reported by name; with set_aside (rank 0 of a resume) they are renamed <name>.rejected, so that the
    resumed run neither counts them as its own nor writes over them. None if none is intact."""
    if os.path.isfile(os.path.join(path, MANIFEST_FILE)):  # a checkpoint directory named by the user
        problem = checkpoint_problem(path)
        if problem:
            raise OptionError(f"{path} is not a train_sft.py checkpoint, or not an intact one: {problem}")
        return path
    run_id = (read_json_object(os.path.join(path, RUN_FILE)) or {}).get("run_id")
    passed_over = []
    for _, candidate in reversed(list_checkpoints(path)):
        problem = checkpoint_problem(candidate, run_id)
        if problem is None:
            for rejected in passed_over if set_aside else []:
                move_aside(rejected, log)
            if passed_over:
                log(f"using the previous intact checkpoint, {candidate}")
            return candidate
        log(f"checkpoint {candidate} cannot be used: {problem}")
        passed_over.append(candidate)
    return None


def move_aside(ckpt_dir, log):
    """Renames a checkpoint that a resume passed over to <name>.rejected (.rejected2, ... when taken)."""
    target, count = ckpt_dir + ".rejected", 1
    while os.path.exists(target):
        count += 1
        target = f"{ckpt_dir}.rejected{count}"
    os.replace(ckpt_dir, target)
    log(f"moved {ckpt_dir} aside to {target}")


def checkpoint_problem(ckpt_dir, run_id=None):
    """None if ckpt_dir is an intact checkpoint (of run run_id, when given), else what is wrong with it.
    Ranks share the hashing (each checks every world-th file) and all get the same answer."""
    manifest = read_json_object(os.path.join(ckpt_dir, MANIFEST_FILE))
    named_step = CHECKPOINT_NAME.fullmatch(os.path.basename(ckpt_dir))
    problem = None
    if manifest is None or not isinstance(manifest.get("files"), dict):
        problem = f"its {MANIFEST_FILE} is missing or unreadable (an unfinished or foreign directory)"
    elif named_step and manifest.get("step") != int(named_step.group(1)):
        problem = f"its {MANIFEST_FILE} is for step {manifest.get('step')!r} (a foreign directory)"
    elif run_id is not None and manifest.get("run_id") != run_id:
        problem = f"it was written by another run than the one {RUN_FILE} records"
    return first_file_problem(ckpt_dir, {} if problem else manifest["files"], problem)


def first_file_problem(directory, files, problem=None):
    """problem if given, else what is wrong with the first of files (name -> its manifest entry) under
    directory, or None. Every rank calls it: they share the hashing (each checks every world-th file)
    and all get the same answer."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    for name in [] if problem else sorted(files)[rank::world]:
        problem = file_problem(directory, name, files[name])
        if problem:
            break
    if world > 1:
        problems = [None] * world
        dist.all_gather_object(problems, problem)
        problem = next((p for p in problems if p), None)
    return problem


def file_problem(directory, name, expected):
    """What is wrong with one file of a checkpoint or export, measured against its manifest entry; None if nothing."""
    path = os.path.join(directory, name)
    if not isinstance(expected, dict) or os.path.isabs(name) or ".." in name.split("/"):
        return f"its manifest's entry for {name!r} is not valid"
    if not os.path.isfile(path):
        return f"{name} is missing"
    size = os.path.getsize(path)
    if size != expected.get("bytes"):
        return f"{name} has {size} bytes instead of {expected.get('bytes')} (truncated or replaced)"
    if sha256_of(path) != expected.get("sha256"):
        return f"{name} does not match its sha256 (corrupted)"
    return None


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# -----------------------------------------------------------------------------
# Saving


def save_checkpoint(output_dir, step, engine, trainer_state, keep, rank, world):
    """Every rank writes its engine files into ckpt-<step>.tmp/, rank 0 adds the trainer state, the
    consolidated weights and the manifest, then renames it to ckpt-<step>/ and drops this run's oldest
    checkpoints. A checkpoint that does not fit stops the run with CheckpointError before it is renamed:
    the unfinished directory is removed and the earlier checkpoints stay as they were."""
    final = os.path.join(output_dir, f"ckpt-{step:08d}")
    tmp = final + ".tmp"
    run_id = trainer_state["run_id"]
    weights = engine.full_state_dict()  # collective: every rank takes part
    engine_bytes = sum_over_ranks(engine.checkpoint_bytes(), world)
    needed, error = 0, None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        needed = checkpoint_bytes_needed(output_dir, run_id, weights, trainer_state, engine_bytes)
        free = shutil.disk_usage(output_dir).free
        if free < needed:
            error = (f"checkpoint step {step} needs about {mib(needed)} in {output_dir} but only {mib(free)} "
                     f"are free: the run stops here and keeps its earlier checkpoints")
        else:
            os.makedirs(tmp)
    error, needed = from_rank0((error, needed), world)
    if error:
        raise CheckpointError(error)
    with removed_on_failure(tmp, output_dir, step, needed):
        engine.save(tmp)
        if rank == 0:
            torch.save(weights, os.path.join(tmp, WEIGHTS_FILE))
            torch.save(trainer_state, os.path.join(tmp, TRAINER_FILE))
    barrier(world)  # every rank's files are in place
    if rank == 0:
        with removed_on_failure(tmp, output_dir, step, needed):
            write_manifest(tmp, {"step": step, "engine": trainer_state["engine"], "run_id": run_id})
        replace_directory(tmp, final)
        fsync_directory(output_dir)  # the rename itself survives a power cut
        remove_old_checkpoints(output_dir, keep, run_id)
    barrier(world)
    return final


def checkpoint_bytes_needed(output_dir, run_id, weights, trainer_state, engine_bytes):
    """The space the next checkpoint needs: the size of this run's latest one or, before the first, an
    estimate of what it will hold: the consolidated weights, the trainer state and every rank's engine files
    (engine_bytes: their sum, which each engine reckons from the tensors its save writes)."""
    for _, path in reversed(list_checkpoints(output_dir)):
        manifest = read_json_object(os.path.join(path, MANIFEST_FILE))
        if manifest and manifest.get("run_id") == run_id and isinstance(manifest.get("files"), dict):
            return sum(entry.get("bytes", 0) for entry in manifest["files"].values() if isinstance(entry, dict))
    import zero_lite  # here: sample.py builds models through this module without importing the engines
    serialized = io.BytesIO()
    torch.save(trainer_state, serialized)  # small: options, data position, random generators
    weights_bytes = zero_lite.FILE_RECORD_BYTES + zero_lite.saved_bytes(weights.values())
    return weights_bytes + len(serialized.getbuffer()) + engine_bytes


def sum_over_ranks(value, world):
    """The sum of every rank's value, on every rank."""
    if world > 1:
        values = [None] * world
        dist.all_gather_object(values, value)
        value = sum(values)
    return value


@contextlib.contextmanager
def removed_on_failure(tmp, output_dir, step, needed):
    """Turns a failed write (torch.save reports a full disk as a RuntimeError) into one sentence, after
    removing the unfinished directory so that it cannot fill the disk for the next run."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(output_dir).free  # before the removal frees space again
        failure = e
        while failure is not None:  # frees the writers held by the tracebacks: their files are still open
            traceback.clear_frames(failure.__traceback__)
            failure = failure.__context__
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 2**20:
            reason = f"the disk is full ({mib(free)} free; it needs at least {mib(needed)})"
        else:
            reason = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"checkpoint step {step} could not be written to {output_dir}: {reason}; "
                              f"the run stops here and keeps its earlier checkpoints") from None


def mib(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB"


def barrier(world):
    if world > 1:
        dist.barrier()


def write_manifest(directory, info, name=MANIFEST_FILE):
    """The manifest `name`: every other file under directory with its size and sha256, beside info. Each
    file is flushed to disk first, and the manifest is written under a temporary name and renamed, so that
    a manifest, once there, is whole and vouches for files that survive a power cut."""
    files = {}
    for root, _, names in os.walk(directory):
        for file_name in sorted(names):
            path = os.path.join(root, file_name)
            relative = os.path.relpath(path, directory)
            if relative in (name, name + ".tmp"):
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            files[relative] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    path = os.path.join(directory, name)
    with open(path + ".tmp", "w") as f:
        json.dump({**info, "files": dict(sorted(files.items()))}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fsync_directory(directory)


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_run_record(output_dir, run_id):
    """run.json: the run whose checkpoints output_dir holds (written atomically, when it changes)."""
    path = os.path.join(output_dir, RUN_FILE)
    if (read_json_object(path) or {}).get("run_id") != run_id:
        write_json_atomically(path, {"run_id": run_id})


def write_json_atomically(path, value):
    """value as JSON in path, written as path.tmp and renamed; a failed write (OSError) leaves no path.tmp."""
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(path + ".tmp", path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise


def write_outcome(output_dir, exit_code, reason):
    """Adds how the run ended (exit_code, and reason: the sentence it printed) to output_dir/run.json, for
    a scheduler: under torchrun the job's own exit status is 1 whatever the ranks' was. Only the process
    that holds output_dir's lock writes, so a run refused because another one holds it leaves that run's
    record alone. On a full disk, where the atomic write fails, run.json is rewritten in place: it is
    smaller than the disk block it already holds. Returns whether it wrote."""
    path = os.path.join(output_dir, RUN_FILE)
    try:
        with open(os.path.join(output_dir, LOCK_FILE)) as f:
            if f.read().strip() != f"pid {os.getpid()} on {socket.gethostname()}":
                return False
        record = json.dumps({**(read_json_object(path) or {}), "exit_code": exit_code, "reason": reason})
        try:
            write_json_atomically(path, json.loads(record))
        except OSError:
            with open(path, "r+") as f:
                f.write(record)
                f.truncate()
    except OSError:  # the record is a courtesy; the exit status and the printed sentence remain
        return False
    return True


def replace_directory(src, dst):
    """Renames src to dst; an existing dst (the same step saved again) is moved aside first, so a
    complete checkpoint exists at every moment (remove_leftovers restores it after a crash)."""
    if os.path.exists(dst):
        os.replace(dst, dst + ".old")
        os.replace(src, dst)
        shutil.rmtree(dst + ".old")
    else:
        os.replace(src, dst)


def remove_old_checkpoints(output_dir, keep, run_id):
    """Keeps the latest `keep` of this run's checkpoints by step, and the latest `keep` of those that a resume
    set aside as <name>.rejected (to look at, not to fill the disk); every other name is left alone."""
    ours = [path for _, path in list_checkpoints(output_dir) if run_of(path) == run_id]
    rejected = sorted((int(match.group(1)), int(match.group(2) or 1), match.group(0))
                      for match in map(REJECTED_NAME.fullmatch, os.listdir(output_dir)) if match)
    for path in ours[:-keep] + [os.path.join(output_dir, name) for *_, name in rejected[:-keep]]:
        shutil.rmtree(path)


# -----------------------------------------------------------------------------
# Loading and resuming


def load_checkpoint(path):
    """The trainer's state of a checkpoint directory, with the consolidated weights as "model" and the
    id of the run that wrote it as "run_id"."""
    files = [os.path.join(path, name) for name in (TRAINER_FILE, WEIGHTS_FILE)]
    if not all(os.path.isfile(f) for f in files):
        raise OptionError(f"{path} is not a train_sft.py checkpoint directory (for Hugging Face weights, "
                          f"give their directory)")
    try:  # tensors and plain types only: loading never runs code
        state = torch.load(files[0], map_location="cpu", weights_only=True)
        state["model"] = torch.load(files[1], map_location="cpu", weights_only=True)
    except Exception as e:
        raise OptionError(f"checkpoint {path} cannot be read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not {"options", "model_config"} <= state.keys():
        raise OptionError(f"{path} is not a train_sft.py checkpoint directory")
    state["path"], state["run_id"] = path, run_of(path)
    return state


def rng_state():
    """Every generator's state in plain types and tensors, so checkpoints load with weights_only=True."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def adopt_checkpoint_options(cfg, explicit, saved, path, names):
    """A checkpoint fixes these options: requested values must agree with it, the rest are taken
    from it (on resume, the options in RESUME_MAY_CHANGE may be set anew on the command line). An option
    newer than the checkpoint is taken as its default, which is how that checkpoint's run went."""
    saved = {name: saved.get(name, OPTIONS[name][0]) for name in names}
    for name in names:
        if name in explicit and name in RESUME_MAY_CHANGE and cfg["resume"]:
            continue
        if name in explicit and cfg[name] != saved[name]:
            hint = " (to put new LoRA on a trained model, start from its hf/ export)" if "lora" in name else ""
            raise OptionError(f"checkpoint {path} has {name}={saved[name]!r} but {name}={cfg[name]!r} "
                              f"was requested{hint}")
        cfg[name] = saved[name]


THIS_RESUME_ONLY = ("resume_data_changed",)  # a choice for one resume, never inherited from the checkpoint


def keep_global_batch(cfg, explicit, checkpoint, world, log):
    """A run resumed on another number of ranks keeps its samples per step (ranks x accumulation x
    batch) by changing --gradient_accumulation_steps, so that it continues the same run; where that
    cannot divide, it stops with a sentence naming the numbers. An explicit --gradient_accumulation_steps
    that changes the batch is the user's choice, made with a notice."""
    saved_world, saved = checkpoint.get("world_size", world), checkpoint["options"]
    if checkpoint.get("engine") == "deepspeed" and saved.get("zero_stage", 0) > 0 and world != saved_world:
        raise OptionError(f"--resume on {world} rank(s): {checkpoint['path']} was written by DeepSpeed's ZeRO-"
                          f"{saved['zero_stage']} on {saved_world} rank(s), and DeepSpeed cannot re-partition that "
                          f"optimizer state; resume on {saved_world} rank(s), or start a new run from its weights "
                          f"with --init_from={checkpoint['path']} (the optimizer state starts anew)")
    per_step = saved_world * saved["gradient_accumulation_steps"] * saved["batch_size"]
    factors = f"({saved_world} ranks x {saved['gradient_accumulation_steps']} x {saved['batch_size']})"
    accum, batch = cfg["gradient_accumulation_steps"], cfg["batch_size"]
    if "gradient_accumulation_steps" in explicit:
        if world * accum * batch != per_step:
            log(f"--gradient_accumulation_steps={accum} changes the batch: {world * accum * batch} samples per step "
                f"({world} ranks x {accum} x {batch}) instead of {checkpoint['path']}'s {per_step} {factors}")
        return
    if world == saved_world:
        return
    if per_step % (world * batch):
        micro = per_step // batch
        fitting = [str(n) for n in range(1, micro + 1) if micro % n == 0][:8]
        raise OptionError(f"--resume on {world} rank(s) cannot keep {checkpoint['path']}'s {per_step} samples per step "
                          f"{factors}: {per_step} is not a multiple of {world} ranks x --batch_size={batch}; resume on "
                          f"{' or '.join([', '.join(fitting[:-1]), fitting[-1]] if len(fitting) > 1 else fitting)} "
                          f"ranks, or give --gradient_accumulation_steps to change the batch")
    cfg["gradient_accumulation_steps"] = per_step // (world * batch)
    explicit.add("gradient_accumulation_steps")  # a DeepSpeed JSON's own value must now agree with it
    log(f"--resume on {world} rank(s) instead of {saved_world}: --gradient_accumulation_steps="
        f"{cfg['gradient_accumulation_steps']} keeps the checkpoint's {per_step} samples per step {factors}")


def starting_checkpoint(cfg, explicit, log, master, world):
    """The checkpoint to resume (the whole run's state) or to start from (the model's shape and
    weights), with the options it fixes adopted into cfg; None when starting otherwise."""
    if cfg["resume"]:
        path = find_checkpoint(cfg["output_dir"], log, set_aside=master)
        if path is None:
            raise OptionError(f"--resume: no intact ckpt-<step> checkpoint of the run in --output_dir="
                              f"{cfg['output_dir']}; start the run anew without --resume, with --overwrite_output_dir "
                              f"to replace what it holds")
        checkpoint = load_checkpoint(path)
        adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path,
                                 [name for name in OPTIONS if name not in THIS_RESUME_ONLY])
        keep_global_batch(cfg, explicit, checkpoint, world, log)
        return checkpoint
    if cfg["init_from"] == "scratch":
        return None
    if cfg["init_from"].endswith(".gguf"):  # a GGUF file brings its own tokenizer and chat template
        if not os.path.isfile(cfg["init_from"]):
            raise OptionError(f"--init_from={cfg['init_from']} is not a file on disk (nothing is downloaded)")
        if "tokenizer" not in explicit:
            cfg["tokenizer"] = cfg["init_from"]
        return None
    if not os.path.isdir(cfg["init_from"]):
        raise OptionError(f"--init_from={cfg['init_from']} is not a directory on disk (scratch, a local Hugging Face "
                          f"directory or a checkpoint; nothing is downloaded)")
    if os.path.isfile(os.path.join(cfg["init_from"], "config.json")):  # a Hugging Face directory
        check_export(cfg["init_from"], "--init_from")
        # its tokenizer, and the sft_config.json of our exports, say how it was trained
        cfg.update({k: v for k, v in exported_options(cfg["init_from"]).items() if k not in explicit})
        return None
    path = find_checkpoint(cfg["init_from"], log)
    if path is None:
        raise OptionError(f"--init_from={cfg['init_from']}: neither a Hugging Face directory (config.json) "
                          f"nor a checkpoint")
    checkpoint = load_checkpoint(path)
    adopt_checkpoint_options(cfg, explicit, checkpoint["options"], path, MODEL_OPTIONS)
    return checkpoint


# Options that decide which samples a run sees and in which order, beside the files' contents.
SAMPLE_OPTIONS = ("data_path", "eval_data_path", "tokenizer", "data_split", "data_format", "max_seq_len",
                  "truncate_prompt", "loss_on_prompt", "skip_bad_rows", "template", "packing", "group_by_length",
                  "batch_size", "seed")


def data_identity(cfg, tokenizer):
    """What the run's samples are made of: each training and eval file with its sha256 (the content hash
    that keys the data cache too), the tokenizer's identity and the options that shape samples.
    Checkpoints record it, so that --resume can tell the same data from other data."""
    data_path, eval_path = cfg["data_path"], cfg["eval_data_path"]
    if data_path == "demo":  # prepare_data has written the demo's files into the cache directory
        data_path, eval_path = (os.path.join(cfg["cache_dir"], "demo", f"{name}.jsonl") for name in ("train", "eval"))
    train, evaluation = data.split_jsonfile_directories(data.parse_sources(data_path, allow_directories=True))
    evaluation = data.parse_sources(eval_path) + evaluation
    return {"train": [[path, sha256_of(path)] for path, _ in train],
            "eval": [[path, sha256_of(path)] for path, _ in evaluation],
            "tokenizer": tokenizer_identity(tokenizer),
            "options": {name: cfg[name] for name in SAMPLE_OPTIONS}}


def check_resumed_data(checkpoint, identity, n_samples, choice, log):
    """--resume on data other than the checkpoint's (a training file edited or reordered, or a tokenizer
    directory that tokenizes differently) stops with a sentence naming it, unless --resume_data_changed
    says how to go on: from the same position (continue) or from the start of the epoch (restart_epoch,
    which rewinds checkpoint["batches"]). Checkpoints from before data identities pass unchecked."""
    saved, path = checkpoint.get("data"), checkpoint["path"]
    if saved is None:
        return
    if [sha for _, sha in saved["eval"]] != [sha for _, sha in identity["eval"]]:
        log(f"--resume: the eval data changed since {path} was written; eval losses before and after differ in it")
    changed = [now for then, now in zip(saved["train"], identity["train"]) if then[1] != now[1]]
    if saved["tokenizer"] != identity["tokenizer"]:
        what = f"tokenizer {identity['options']['tokenizer']} tokenizes differently"
    elif changed or len(saved["train"]) != len(identity["train"]):
        what = f"training file {(changed or identity['train'])[0][0]} changed"
    else:
        return
    epoch = checkpoint["batches"]["epoch"]
    if choice == "stop":
        raise OptionError(f"--resume: {what} since {path} was written (its sha256 differs): give "
                          f"--resume_data_changed=continue to go on from the same position in it, or "
                          f"--resume_data_changed=restart_epoch to start epoch {epoch} over on it")
    if choice == "continue" and checkpoint["batches"]["samples"] != n_samples:
        raise OptionError(f"--resume_data_changed=continue: {what} since {path} was written and gives "
                          f"{n_samples} training samples instead of {checkpoint['batches']['samples']}, so the "
                          f"same position means nothing in it: give --resume_data_changed=restart_epoch")
    if choice == "restart_epoch":
        checkpoint["batches"] = {"epoch": epoch, "position": 0, "samples": n_samples}
    log(f"--resume_data_changed={choice}: {what} since {path} was written; the run "
        + ("goes on from the same position" if choice == "continue" else f"starts epoch {epoch} over") + " in it")


def resume_run(checkpoint, engine, batches, rank):
    """Restores the engine's files, the data position and this rank's random generators; returns the step."""
    try:
        engine.load(checkpoint["path"])
    except ValueError as e:
        raise OptionError(str(e)) from None
    try:
        batches.load_state_dict(checkpoint["batches"])
    except ValueError as e:
        raise OptionError(f"cannot resume from {checkpoint['path']}: {e}") from None
    set_rng_state(checkpoint["rng"][rank % len(checkpoint["rng"])])
    return checkpoint["step"]


# -----------------------------------------------------------------------------
# Models: from a checkpoint, a Hugging Face directory or scratch; the Hugging Face export


def build_model(cfg, n_vocab, checkpoint):
    """A checkpoint (its own config), a Hugging Face directory, or scratch (of --model_type's family); then
    LoRA. n_vocab is the tokenizer's; from scratch it is padded to a multiple of 64, which runs faster."""
    if checkpoint is not None:  # its shape and weights; these three are the run's choice, not the checkpoint's
        run_choices = {k: cfg[k] for k in ("dropout", "attn_window", "gradient_checkpointing")}
        model = GPT(GPTConfig(**{**checkpoint["model_config"], **run_choices}))
        if cfg["lora_dim"]:
            add_lora(model, cfg)
        model.load_state_dict(checkpoint["model"])
        return model
    if cfg["init_from"] == "scratch":
        if cfg["n_embd"] % cfg["n_head"]:
            raise OptionError(f"--n_embd={cfg['n_embd']} must be a multiple of --n_head={cfg['n_head']}")
        gpt2_only = {"bias": cfg["bias"]} if cfg["model_type"] == "gpt2" else {}  # the Llama family has no biases
        try:
            model = GPT(family_config(cfg["model_type"], block_size=cfg["max_seq_len"],
                                      vocab_size=-(-n_vocab // 64) * 64, n_layer=cfg["n_layer"], n_head=cfg["n_head"],
                                      n_kv_head=cfg["n_kv_head"], n_embd=cfg["n_embd"], dropout=cfg["dropout"],
                                      attn_window=cfg["attn_window"],
                                      gradient_checkpointing=cfg["gradient_checkpointing"], **gpt2_only))
        except ValueError as e:  # check_config's sentence names the field, which is the option of the same name
            raise OptionError(f"--model_type={cfg['model_type']} from scratch: {e}") from None
    else:
        try:
            model = GPT.from_pretrained(cfg["init_from"], dropout=cfg["dropout"], attn_window=cfg["attn_window"],
                                        gradient_checkpointing=cfg["gradient_checkpointing"])
        except (OSError, ValueError) as e:  # from_pretrained's messages name the file and the field
            raise OptionError(f"--init_from={cfg['init_from']}: {e}") from None
        if model.config.vocab_size < n_vocab:
            raise OptionError(f"--init_from={cfg['init_from']} has vocab_size {model.config.vocab_size}, "
                              f"smaller than tokenizer {cfg['tokenizer']}'s {n_vocab}")
    if cfg["lora_dim"]:
        add_lora(model, cfg)
    if cfg.get("export_gguf"):  # refused before training rather than after
        check_gguf_export(model.config, cfg)
    return model


def check_gguf_export(model_config, cfg):
    """--export_gguf stops here (OptionError) for a model or tokenizer that GGUF cannot describe."""
    try:
        gguf_format.check_gguf_expressible(model_config)
        gguf_tokenizer_metadata(get_tokenizer(cfg["tokenizer"]), model_config.vocab_size)
    except ValueError as e:
        raise OptionError(f"--export_gguf={cfg['export_gguf']}: {e}") from None


def export_gguf(model, cfg, output_dir):
    """<output_dir>/model-<type>.gguf of the model (LoRA merged), its tokenizer and chat template."""
    path = os.path.join(output_dir, f"model-{cfg['export_gguf']}.gguf")
    vocabulary = gguf_tokenizer_metadata(get_tokenizer(cfg["tokenizer"]), model.config.vocab_size)
    gguf_format.save_gguf(model, vocabulary, path, cfg["export_gguf"],
                          name=f"{model.config.model_type} fine-tuned by train_sft.py")
    return path


def check_scratch_model_fits(cfg, n_vocab, device):
    """A model from scratch is built whole on every rank before any engine shards it: options whose
    weights alone exceed the device's memory stop here with a sentence, not in the allocator."""
    n_embd = cfg["n_embd"]
    n_params = (n_vocab + cfg["max_seq_len"]) * n_embd + cfg["n_layer"] * 12 * n_embd**2  # GPT-2's shape
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if n_params * 4 > memory:
        raise OptionError(f"--n_layer={cfg['n_layer']} --n_embd={n_embd} --max_seq_len={cfg['max_seq_len']} make a "
                          f"model of about {n_params:,} parameters, whose float32 weights alone "
                          f"({n_params * 4 / 2**30:,.0f} GiB) exceed the {memory / 2**30:,.0f} GiB of this "
                          f"{device.type} device; make it smaller")


def add_lora(model, options):
    try:
        wrapped = apply_lora(model, options["lora_dim"], lora_scaling=options["lora_scaling"],
                             module_name=options["lora_module_name"])
    except ValueError as e:  # a rank too large for the matrices, or a tied embedding among them
        raise OptionError(f"--lora_dim={options['lora_dim']} --lora_module_name={options['lora_module_name']!r}: "
                          f"{e}") from None
    if wrapped == 0:
        raise OptionError(f"--lora_module_name={options['lora_module_name']!r} matches no Linear layer")


EXPORTED_OPTIONS = ("tokenizer", "template", "attn_window")  # what a family's own config.json cannot say
# Written last into the export: every other file's size and sha256, checked by sample.py and --init_from.
EXPORT_MANIFEST_FILE = "sft_manifest.json"
EXPORT_DIR = "hf"  # in output_dir; written as hf.tmp/ and renamed when complete, like ckpt-<step>/
# The files of a Hugging Face directory that loading it (GPT.from_pretrained, get_tokenizer, exported_options)
# reads; besides these, the weight shards an index names. An export's manifest must list each one it holds.
EXPORT_READ_FILES = ("config.json", "sft_config.json", *HF_WEIGHT_FILES, *HF_TOKENIZER_FILES)


def export_hf(weights, model_config, cfg, output_dir, log=print):
    """output_dir/hf/: the consolidated weights in Hugging Face format of the model's family (LoRA merged),
    its tokenizer (so that AutoTokenizer loads the one it was trained with) and sft_config.json with the
    options that sample.py and a later --init_from need to use it as it was trained. A directory tokenizer
    is copied in, so sft_config.json names the export itself.

    Every file is written into hf.tmp/, then the manifest sft_manifest.json (with which check_export finds
    a file changed since), then hf.tmp/ is renamed to hf/: a run stopped on the way leaves the previous hf/
    (or none) and an hf.tmp/ that the next run on output_dir removes, never a partial hf/. A write that
    fails (a full disk) removes hf.tmp/ and stops with CheckpointError. A LoRA run adds adapter/, its
    factors as PEFT's adapter of the starting model (export_peft_adapter). With --export_gguf, also
    <output_dir>/model-<type>.gguf, after hf/."""
    final = os.path.join(output_dir, EXPORT_DIR)
    tmp = final + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed {tmp}, left unfinished by an interrupted export")
    try:
        os.makedirs(tmp)
        model = write_export_files(tmp, final, weights, model_config, cfg)
        if cfg["lora_dim"]:
            log(export_peft_adapter(model, cfg, tmp, final))
        write_export_manifest(tmp)  # last: it lists every file written above
    except (OSError, RuntimeError, SafetensorError) as e:  # torch and safetensors report a full disk as these
        free, needed = shutil.disk_usage(output_dir).free, sum(t.nbytes for t in weights.values())
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < needed
        shutil.rmtree(tmp, ignore_errors=True)
        reason = f"the disk is full ({mib(free)} free; the weights alone need {mib(needed)})" if full else \
            f"{type(e).__name__}: {e}"
        raise CheckpointError(f"the Hugging Face export could not be written to {final}: {reason}; the run's "
                              f"final checkpoint holds the model, and --resume exports it again") from None
    replace_directory(tmp, final)
    fsync_directory(output_dir)
    if cfg.get("export_gguf"):
        log(f"exported GGUF -> {export_gguf(model, cfg, output_dir)}")
    return final


def write_export_files(directory, final, weights, model_config, cfg):
    """Everything an export holds but its manifest, written into directory (the export's temporary name;
    final is where it will be, which sft_config.json names as the tokenizer of a directory tokenizer); returns
    the model it wrote."""
    tokenizer = get_tokenizer(cfg["tokenizer"])
    model = build_model(cfg, None, {"model_config": model_config, "model": weights})
    model.save_pretrained(directory, token_ids=token_ids(tokenizer))
    save_tokenizer(cfg["tokenizer"], directory)
    trained_with = {name: cfg[name] for name in EXPORTED_OPTIONS}
    if isinstance(tokenizer, HFTokenizer):
        trained_with["tokenizer"] = final
    with open(os.path.join(directory, "sft_config.json"), "w") as f:
        json.dump(trained_with, f, indent=1)
    return model


def export_peft_adapter(model, cfg, directory, final):
    """The LoRA factors as a PEFT adapter of the model the run started from, written into directory/adapter
    (final/adapter once the export is renamed), when the factors are all that the run changed and that model
    is on disk; returns the sentence that says which, for the log."""
    base = cfg["init_from"]
    if not (os.path.isfile(os.path.join(base, "config.json")) or os.path.isfile(base)):
        return (f"export: no PEFT adapter: --init_from={base} is not a model directory or file that PEFT could "
                "load as the adapter's base (hf/ holds the whole model)")
    if not cfg["only_optimize_lora"]:
        return ("export: no PEFT adapter: without --only_optimize_lora the run also trained weights outside the "
                "LoRA factors (embeddings, norms), which an adapter does not carry (hf/ holds the whole model)")
    save_peft_adapter(model, os.path.join(directory, "adapter"), os.path.abspath(base))
    return f"export: PEFT adapter -> {os.path.join(final, 'adapter')}"


def write_export_manifest(hf_dir):
    """The export's manifest, written last: also by sparse.py merge, which changes an export's weights."""
    write_manifest(hf_dir, {"about": "the size and sha256 of every file exported here, checked before "
                            "sample.py or --init_from loads them; delete it after editing those files"},
                   EXPORT_MANIFEST_FILE)


def check_export(hf_dir, option):
    """Stops (OptionError) when a file that the export's manifest lists is missing or differs from it, or
    when the directory holds a file that loading it would read (EXPORT_READ_FILES, a weight shard) but the
    manifest does not list: added since, it would change the model, its tokenizer or its template unseen.
    A run's own hf/ (beside its run.json) without a manifest is an export that did not finish, and is
    refused too; another Hugging Face directory without one (not exported here, or copied out of its run
    and the manifest deleted after editing it) passes unchecked, and so do files no loader reads (a
    README). Every rank calls it (first_file_problem)."""
    path = os.path.join(hf_dir, EXPORT_MANIFEST_FILE)
    run_dir = run_directory_of(hf_dir)
    if run_dir and not os.path.exists(path):
        raise OptionError(f"{option}={hf_dir} is the export of the run in {run_dir} but has no "
                          f"{EXPORT_MANIFEST_FILE}, which an export writes last, so it may be incomplete: continue "
                          f"the run with --resume to export it again, or copy the directory out of the run to use "
                          f"it as it is")
    manifest = read_json_object(path) if os.path.exists(path) else {"files": {}}
    problem = None
    if manifest is None or not isinstance(manifest.get("files"), dict):
        manifest, problem = {"files": {}}, f"{EXPORT_MANIFEST_FILE} is unreadable"
    elif os.path.exists(path):
        problem = unlisted_read_file(hf_dir, manifest["files"])
    problem = first_file_problem(hf_dir, manifest["files"], problem)
    if problem:
        edited = (f"copy the directory out of {run_dir} and delete its {EXPORT_MANIFEST_FILE}" if run_dir
                  else f"delete {EXPORT_MANIFEST_FILE}")
        raise OptionError(f"{option}={hf_dir} does not match the export's checksums ({EXPORT_MANIFEST_FILE}): "
                          f"{problem}; export it again, or {edited} if its files were changed on purpose")


def run_directory_of(hf_dir):
    """The run directory whose export hf_dir is (an hf/ beside the run.json that only the trainer writes),
    else None."""
    hf_dir = os.path.abspath(hf_dir)
    parent = os.path.dirname(hf_dir)
    is_export = os.path.basename(hf_dir) == EXPORT_DIR and os.path.isfile(os.path.join(parent, RUN_FILE))
    return parent if is_export else None


def unlisted_read_file(hf_dir, listed):
    """What is wrong when hf_dir holds a file that loading it would read but the manifest `listed` does not
    name (a chat_template.jinja added after the export, say), else None."""
    for name in sorted(os.listdir(hf_dir)):
        read = name in EXPORT_READ_FILES or name.endswith(HF_WEIGHT_SUFFIXES)
        if read and name not in listed and name != EXPORT_MANIFEST_FILE:
            return (f"{name} is not listed, but loading the directory would read it (it was added after the "
                    f"export)")
    return None


def token_ids(tokenizer):
    """The special ids config.json names, which transformers' generate reads: end of text (a directory's
    eos, and its bos and pad when it names them)."""
    if not isinstance(tokenizer, HFTokenizer):  # GPT-2's convention: end-of-text begins and ends
        return {"bos_token_id": tokenizer.eot_token, "eos_token_id": tokenizer.eot_token}
    ids = {"eos_token_id": tokenizer.eot_token}
    for role in ("bos", "pad"):
        text = tokenizer.special_tokens.get(f"{role}_token")
        encoded = tokenizer.encode(text, allowed_special="all") if text else []
        if len(encoded) == 1:
            ids[f"{role}_token_id"] = encoded[0]
    return ids


def exported_options(hf_dir):
    """The options a Hugging Face directory was trained with: the sft_config.json that export_hf wrote ({} for
    a foreign directory) and, as its tokenizer, the directory itself when it holds tokenizer.json (unless it
    was trained with gpt2 or byte). Read from where the directory is now, so a moved export stays whole."""
    path = os.path.join(hf_dir, "sft_config.json")
    trained_with = json.load(open(path)) if os.path.isfile(path) else {}
    has_tokenizer = os.path.isfile(os.path.join(hf_dir, "tokenizer.json"))
    if has_tokenizer and trained_with.get("tokenizer") not in ("gpt2", "byte"):
        trained_with["tokenizer"] = hf_dir
    return trained_with


def load_model(path):
    """Returns (model, the options it was trained with, such as tokenizer and template, or {}) from a run
    directory, a checkpoint directory, a Hugging Face directory (ours carry sft_config.json) or a GGUF file
    (its own tokenizer)."""
    if path.endswith(".gguf"):
        try:
            return GPT.from_pretrained(path), {"tokenizer": path}
        except (OSError, ValueError) as e:  # its messages name the file and what is wrong
            raise OptionError(f"--model={path}: {e}") from None
    if os.path.isfile(os.path.join(path, "config.json")):
        check_export(path, "--model")
        trained_with = exported_options(path)
        try:
            model = GPT.from_pretrained(path, attn_window=trained_with.get("attn_window", 0))
        except (OSError, ValueError) as e:  # its messages name the file and the field
            raise OptionError(f"--model={path}: {e}") from None
        return model, trained_with
    checkpoint_path = find_checkpoint(path)
    if checkpoint_path is None:
        raise OptionError(f"--model={path} is neither a Hugging Face directory nor holds a checkpoint")
    checkpoint = load_checkpoint(checkpoint_path)
    options = checkpoint["options"]
    return build_model(options, None, checkpoint), {"tokenizer": options["tokenizer"], "template": options["template"]}


# -----------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """One JSON object per line in output_dir/metrics.jsonl (appended across resumes), and TensorBoard.

    A resumed run starts from its checkpoint's step, so records after that step (written before a
    crash) are dropped: they are about to be written again. So is a line that a kill cut short. A write
    that fails (a disk filled by another process) leaves the file as it was, keeps its sentence in
    `failure` for the trainer, which stops with a checkpoint, and writes nothing more."""

    def __init__(self, output_dir, tensorboard, resumed_step=None, log=print):
        self.path, self.failure = os.path.join(output_dir, "metrics.jsonl"), None
        if resumed_step is not None and os.path.exists(self.path):
            kept = self.records_up_to(resumed_step, log)
            try:
                with open(self.path + ".tmp", "w") as f:
                    f.writelines(kept)
                os.replace(self.path + ".tmp", self.path)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.remove(self.path + ".tmp")
                raise CheckpointError(f"{write_failure(self.path, e)}; the run stops before training") from None
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise OptionError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def records_up_to(self, step, log):
        """The lines of records up to step; an unreadable line (the torn end of a killed write) is
        dropped with a notice rather than stopping the resume."""
        kept = []
        with open(self.path, errors="replace") as f:
            for number, line in enumerate(f, 1):
                try:
                    record_step = json.loads(line)["step"]
                except (ValueError, TypeError, KeyError):
                    log(f"metrics: dropped line {number} of {self.path}, which is not a whole record "
                        f"(a write cut short by a kill)")
                    continue
                if record_step <= step:
                    kept.append(line.rstrip("\n") + "\n")
        return kept

    def write(self, record):
        if self.failure:
            return
        size = os.path.getsize(self.path) if os.path.exists(self.path) else 0
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            self.failure = write_failure(self.path, e)
            with contextlib.suppress(OSError):
                os.truncate(self.path, size)  # no torn line; truncating needs no space
            return
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])
