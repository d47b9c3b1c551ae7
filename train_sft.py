"""
Supervised fine-tuning (SFT) of a GPT on prompt/response pairs: step 1 of the DeepSpeed-Chat
recipe in one file that reads top to bottom.

    python train_sft.py [config.py] [--key=value ...]
    torchrun --nproc_per_node=2 train_sft.py configs/demo.py
    python train_sft.py --help

Order of business: options -> distributed setup -> data -> model -> optimizer -> engine -> training loop
(with eval and checkpoints) -> the end of the run (checkpoint, export, final eval). Loss is
token-weighted over the whole optimizer step, across micro-batches and ranks, so a run's numbers do
not depend on how the batch is split.

The rooms this file uses: options.py (the option table and its checks), data.py, model.py, checkpoint.py
(the output directory, checkpoints, metrics.jsonl, the Hugging Face export), and the two engines behind
one seam: zero_lite.py (native) and deepspeed_engine.py.
"""

import contextlib
import ctypes
import gc
import json
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record as torchelastic_record
from tqdm import tqdm

import deepspeed_engine
import sparse
import zero_lite
from checkpoint import (CheckpointError, MetricsLog, build_model, check_resumed_data, check_scratch_model_fits,
                        data_identity, export_hf, from_rank0, is_disk_error, open_run, resume_run, rng_state,
                        save_checkpoint, write_failure, write_outcome)
from data import Batches, check_data_files, prepare_data
from model import only_optimize_lora, peak_flops
from options import OptionError, check_combinations, parse_options
from tokenizer import get_tokenizer


class RunStopped(Exception):
    """The run ended before its last step or without a result to keep: on SIGTERM/SIGINT (after a
    checkpoint), or on NaN/Inf (with nothing exported). The message says why (empty on ranks other
    than 0, so that torchrun prints it once); exit_code tells a calling script which it was."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


EXIT_NONFINITE = 3  # 2 is bad input; a signal gives 128 + its number, as a shell reports a killed process
EXIT_CHECKPOINT_NOT_WRITTEN = 4


@dataclass
class Run:
    """What the phases of a run share: its options and id, this process's place among the ranks, the
    precision context of its forwards, and where its log lines and metrics go (metrics on rank 0)."""
    cfg: dict
    run_id: str
    rank: int
    world: int
    device: torch.device
    autocast: contextlib.AbstractContextManager
    log: object
    data_identity: dict  # each data file's sha256, the tokenizer, the sample options (checkpoint.data_identity)
    metrics: object = None

    def write_failure(self):
        """The sentence of a metrics.jsonl write that failed (rank 0), which stops the run; None if none did."""
        return self.metrics.failure if self.metrics is not None else None


# -----------------------------------------------------------------------------
# Setup: distributed, device, data


def stop_when_the_launcher_dies():
    """torchrun starts each rank in a session of its own, so a kill -9 of torchrun (or of its process group)
    would leave the ranks training on and holding the output directory's lock. Here the kernel sends this
    process SIGTERM when its parent dies (Linux's parent-death signal), and it stops as on any SIGTERM:
    it finishes the step, writes a checkpoint, releases the lock and exits."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the request: no signal will come
        os.kill(os.getpid(), signal.SIGTERM)


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def setup_distributed(cfg):
    """Initialises torch.distributed when launched by torchrun; returns (rank, local_rank, world_size, device)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun
        stop_when_the_launcher_dies()
    rank, local_rank, world = (int(os.environ.get(k, d)) for k, d in
                               (("RANK", 0), ("LOCAL_RANK", 0), ("WORLD_SIZE", 1)))
    use_cuda = cfg["device"] == "cuda" or (cfg["device"] == "auto" and torch.cuda.is_available())
    if cfg["device"] == "cuda" and not torch.cuda.is_available():
        raise OptionError("--device=cuda but no CUDA device is available")
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # torchrun sets OMP_NUM_THREADS=1; otherwise share the cores between local processes.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    backend = "nccl" if use_cuda else "gloo"
    if world > 1:
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    elif cfg["engine"] == "deepspeed":  # DeepSpeed needs a process group and torchrun's variables even alone
        os.environ.update({k: os.environ.get(k, "0") for k in ("RANK", "LOCAL_RANK")}, WORLD_SIZE="1")
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, local_rank, world, device


def data_error_sentence(e, cache_dir):
    """A data problem's message; one that happened inside the cache names --cache_dir, the option to change."""
    inside = getattr(e, "filename", None) and os.path.join(os.path.abspath(e.filename), "").startswith(
        os.path.join(os.path.abspath(cache_dir), ""))
    return f"--cache_dir={cache_dir} cannot be used: {e.strerror} ({e.filename})" if inside else str(e)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg, rank, world, log, saved_state):
    """The tokenizer, the train and eval sets (tokenized once per machine and cached), this rank's
    batches and the data's identity, which a resumed run's checkpoint must share (or be told to accept
    otherwise). A data problem is bad input: its message names the file, line or option."""
    try:
        for option in ("data_path", "eval_data_path"):
            check_data_files(cfg[option] if cfg[option] != "demo" else "", option)
        tokenizer = get_tokenizer(cfg["tokenizer"])
        train_set, eval_set = prepare_data(
            cfg["data_path"], cfg["tokenizer"], cfg["max_seq_len"], eval_data_path=cfg["eval_data_path"],
            data_split=cfg["data_split"], data_format=cfg["data_format"], template=cfg["template"],
            loss_on_prompt=cfg["loss_on_prompt"], truncate_prompt=cfg["truncate_prompt"],
            skip_bad_rows=cfg["skip_bad_rows"], seed=cfg["seed"], cache_dir=cfg["cache_dir"], log=log)
        batches = Batches(train_set, cfg["batch_size"], rank=rank, world_size=world, seed=cfg["seed"],
                          packing=cfg["packing"], group_by_length=cfg["group_by_length"])
        identity = data_identity(cfg, tokenizer)
    except (OSError, ValueError) as e:
        if is_disk_error(e):  # the cache did not fit: a full disk, as anywhere else
            raise CheckpointError(f"{write_failure(e.filename, e)}; the run stops before training") from None
        raise OptionError(data_error_sentence(e, cfg["cache_dir"])) from None
    if saved_state is not None and cfg["resume"]:
        check_resumed_data(saved_state, identity, len(train_set), cfg["resume_data_changed"], log)
    return tokenizer, train_set, eval_set, batches, identity


def count_steps(cfg, train_set, batches, world, saved_state):
    """The run's optimizer steps: --max_steps, or the whole epochs' worth of micro-batches. A resume to
    fewer steps than its checkpoint has taken is refused: it would train nothing and export a model of
    more steps than asked for."""
    accum = cfg["gradient_accumulation_steps"]
    total_steps = cfg["max_steps"] or cfg["num_train_epochs"] * batches.batches_per_epoch // accum
    if total_steps < 1:
        raise OptionError(f"{len(train_set)} training samples make no full optimizer step of "
                          f"{world} ranks x {accum} micro-batches x {cfg['batch_size']}")
    if cfg["resume"] and total_steps < saved_state["step"]:
        raise OptionError(f"--resume to {total_steps} steps (--max_steps / --num_train_epochs), but "
                          f"{saved_state['path']} has already taken {saved_state['step']}: give at least "
                          f"--max_steps={saved_state['step']}, or use that checkpoint as it is "
                          f"(sample.py --model, --init_from)")
    return total_steps


# -----------------------------------------------------------------------------
# Model, optimizer, engine


def prepare_model(cfg, n_vocab, saved_state, device):
    """The model to train, on its device: built, checked against max_seq_len, LoRA-frozen as asked,
    with the chosen loss kernel and NEFTune noise."""
    if saved_state is None and cfg["init_from"] == "scratch":
        check_scratch_model_fits(cfg, n_vocab, device)
    model = build_model(cfg, n_vocab, saved_state)
    if cfg["max_seq_len"] - 1 > model.config.block_size:
        raise OptionError(f"--max_seq_len={cfg['max_seq_len']} needs {cfg['max_seq_len'] - 1} positions but the "
                          f"model has {model.config.block_size}")
    if cfg["only_optimize_lora"]:
        only_optimize_lora(model)
    if cfg["kernels"] == "triton":
        import sft_kernels.cross_entropy  # here, not on top: Triton and the compiler stack cost a CPU run about 70 MiB
        if not sft_kernels.cross_entropy.runs_on(device):
            raise OptionError("--kernels=triton needs a CUDA device (or TRITON_INTERPRET=1, for tests); "
                              "use --kernels=torch on CPU")
        model.loss_fn = sft_kernels.cross_entropy.fused_masked_linear_cross_entropy
    elif cfg["compile"]:  # traced, its data-dependent row count recompiled, then crashed in dynamo (torch 2.11, H100)
        model.loss_fn = torch.compiler.disable(model.loss_fn)
    if cfg["neftune_alpha"] > 0:
        add_neftune_noise(model, cfg["neftune_alpha"])
    return model.to(device)


def make_optimizer(model, cfg, fused, total_steps=1):
    """AdamW (main asks for torch's fused one, one pass over each tensor and faster on a CPU too, unless DeepSpeed's
    offload steps its own CPU copy); weight decay on matrices only; LoRA factors may have their own learning rate.
    With --sparse_density, sparse.SparseAdamW: the chosen matrices train at their selected entries,
    the other matrices are frozen, and the 1-D parameters (biases, LayerNorms) train densely."""
    matrices = []
    if cfg["sparse_density"] > 0:
        try:
            matrices = sparse.sparse_matrices(model, cfg["sparse_pattern"], cfg["sparse_embedding"])
        except ValueError as e:
            raise OptionError(f"--sparse_pattern: {e}") from None
    chosen = {id(p) for _, p in matrices}
    groups = {}
    for name, p in model.named_parameters():
        if matrices and p.dim() >= 2 and id(p) not in chosen:
            p.requires_grad_(False)
        if not p.requires_grad or id(p) in chosen:
            continue
        is_lora = "lora_" in name
        lr = cfg["lora_learning_rate"] if is_lora and cfg["lora_learning_rate"] > 0 else cfg["learning_rate"]
        decay = cfg["weight_decay"] if p.dim() >= 2 else 0.0
        groups.setdefault((lr, decay), []).append(p)
    param_groups = [{"params": ps, "lr": lr, "base_lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    if matrices:
        return sparse.SparseAdamW(matrices, param_groups, cfg["sparse_density"], lr=cfg["learning_rate"],
                                  betas=(cfg["beta1"], cfg["beta2"]), weight_decay=cfg["weight_decay"],
                                  regrow_interval=cfg["sparse_regrow_interval"],
                                  regrow_share=cfg["sparse_regrow_share"], total_steps=total_steps, seed=cfg["seed"])
    return torch.optim.AdamW(param_groups, betas=(cfg["beta1"], cfg["beta2"]), fused=fused)


SPARSE_PROBE_BATCHES = 4  # micro-batches over all ranks whose gradients choose the first entries (--sparse_init=gradient)


def start_sparse(run, model, optimizer, batches):
    """--sparse_init=gradient chooses a new run's entries by its first gradients; the choice is logged."""
    if run.cfg["sparse_init"] == "gradient" and not run.cfg["resume"]:
        choose_sparse_entries(model, optimizer, batches, run.device, run.autocast)
    run.log(sparse.sparse_report(optimizer))


def choose_sparse_entries(model, optimizer, batches, device, autocast):
    """--sparse_init=gradient: the largest gradients over the first micro-batches (the same ones
    on any number of ranks) choose each matrix's entries; the batches are rewound, so the data order
    is unchanged."""
    position = batches.state_dict()

    def probe():
        for _ in range(max(1, SPARSE_PROBE_BATCHES // batches.world_size)):
            b = batches.next_batch()
            segments = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
            with autocast:
                loss = model(b["input_ids"].to(device), b["labels"].to(device), segment_ids=segments)
            loss.backward()
    optimizer.select_by_gradient(probe)
    batches.load_state_dict(position)


def lr_multiplier(step, cfg, total_steps):
    """Linear warmup, then cosine, linear or constant down to min_lr_ratio (step counts from 0)."""
    if step < cfg["warmup_steps"]:
        return (step + 1) / cfg["warmup_steps"]
    if cfg["lr_scheduler"] == "constant":
        return 1.0
    progress = min(1.0, (step - cfg["warmup_steps"]) / max(1, total_steps - cfg["warmup_steps"]))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg["lr_scheduler"] == "cosine" else 1 - progress
    return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * shape


def add_neftune_noise(model, alpha):
    """NEFTune: uniform noise of scale alpha / sqrt(T * C) on the token embeddings while training."""
    def hook(module, inputs, output):
        if module.training:
            scale = alpha / math.sqrt(output.size(-2) * output.size(-1))
            output = output + torch.empty_like(output).uniform_(-scale, scale)
        return output
    model.transformer.wte.register_forward_hook(hook)


def make_engine(cfg, model, optimizer):
    """The engine that owns gradient exchange, precision, clipping, the update and its checkpoint files."""
    if cfg["engine"] == "deepspeed":  # sparse fine-tuning never gets here: check_combinations refuses it
        return deepspeed_engine.DeepSpeedEngine(model, optimizer, deepspeed_engine.deepspeed_config(cfg, model),
                                                compile=cfg["compile"])
    try:
        return zero_lite.Engine(model, optimizer, stage=cfg["zero_stage"], dtype=getattr(torch, cfg["dtype"]),
                                grad_clip=cfg["grad_clip"], initial_scale_power=cfg["initial_scale_power"],
                                compile=cfg["compile"])
    except ValueError as e:
        raise OptionError(f"--zero_stage={cfg['zero_stage']}: {e}") from None


# -----------------------------------------------------------------------------
# Speed, memory and the log


class Throughput:
    """Positions (padding included) and trained tokens (positions with a label) of all ranks since the
    last log line, per second of training: eval and checkpoints are paused out. The counts stay
    tensors, so that counting costs no device sync."""

    def __init__(self, flops_per_token, peak, world):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak, world
        self.restart()

    def restart(self):
        self.positions, self.trained, self.start = 0, 0, time.perf_counter()

    def add(self, trained, positions):
        self.trained, self.positions = self.trained + trained, self.positions + positions

    @contextlib.contextmanager
    def paused(self):
        pause = time.perf_counter()
        yield
        self.start += time.perf_counter() - pause

    def rates(self):
        """tokens_per_s, trained_tokens_per_s and, where the peak is known (a GPU's datasheet, a CPU's
        bench/bench_cpu.py measurement), MFU (of the positional rate)."""
        elapsed = time.perf_counter() - self.start
        rates = {"tokens_per_s": float(self.positions) / elapsed, "trained_tokens_per_s": float(self.trained) / elapsed}
        if self.peak:
            rates["mfu"] = rates["tokens_per_s"] * self.flops_per_token / (self.peak * self.world)
        return rates


def report_model_state(run, engine, n_params, n_trained, step):
    """Every rank's model-state bytes (engine.memory_report()) and peak memory into metrics.jsonl beside
    the ZeRO paper's formula (log_start logs them at the start); every rank calls it."""
    mine = {**engine.memory_report(), "peak_mem_gib": peak_memory_gib(run.device)}
    memory = [mine]
    if run.world > 1:
        memory = [None] * run.world
        dist.all_gather_object(memory, mine)
    if run.rank == 0:
        formula = zero_lite.zero_formula_bytes(n_params, n_trained, run.cfg["zero_stage"], run.world)
        run.metrics.write({"step": step, "memory": memory, "zero_formula_bytes": formula})


def peak_memory_gib(device):
    """Peak tensor memory on a GPU; on a CPU, this process's own peak resident memory (Linux's VmHWM:
    ru_maxrss, the fallback elsewhere, also counts what the parent held when it started this process)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    if os.path.exists("/proc/self/status"):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def log_start(run, model, engine, n_params, n_trained, total_steps, step, eval_set, tokenizer):
    """The run's shape, each rank's model state beside the ZeRO formula, --eval_at_start's eval (not on resume)."""
    cfg = run.cfg
    run.log(f"model: {n_params / 1e6:.2f}M parameters, {n_trained / 1e6:.2f}M trained; {run.world} rank(s) x "
            f"{cfg['gradient_accumulation_steps']} x {cfg['batch_size']} samples per step, {total_steps} steps, "
            f"{cfg['dtype']} on {run.device.type}; loss {model.loss_fn.__module__}.{model.loss_fn.__name__}")
    memory = engine.memory_report()
    formula = zero_lite.zero_formula_bytes(n_params, n_trained, cfg["zero_stage"], run.world)
    tqdm.write(f"rank {run.rank} model state at start: " + ", ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in memory.items())
               + f"; the ZeRO paper's fp32 formula for stage {cfg['zero_stage']} on {run.world} rank(s): "
               f"{formula / 2**20:.3f} MiB")
    if cfg["eval_at_start"] and step == 0:
        run_eval(run, engine, eval_set, tokenizer, step)


def log_step(run, progress, step_record):
    """A training record into metrics.jsonl, the progress bar and the log (rank 0)."""
    if run.rank == 0:
        run.metrics.write(step_record)
        progress.set_postfix(loss=f"{step_record['loss']:.4f}", lr=f"{step_record['lr']:.2e}")
        run.log(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in step_record.items()))


# -----------------------------------------------------------------------------
# Eval


@torch.no_grad()
def evaluate(model, eval_set, cfg, device, autocast, rank, world):
    """Token-weighted loss over the whole eval set (every rank takes every world-th sample).

    Every rank runs the same number of forwards, a rank out of samples on a stand-in that counts for
    nothing: a ZeRO-3 engine gathers the weights with collectives inside each forward."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    indices = list(range(rank, len(eval_set), world))
    for start in range(0, -(-len(eval_set) // world), cfg["batch_size"]):
        chunk = indices[start:start + cfg["batch_size"]]
        idx, labels = pad_batch([eval_set[i] for i in chunk or [0]], device)
        if not chunk:
            labels.fill_(-100)
        n = (labels != -100).sum()
        with autocast:
            loss = model(idx, labels)
        if chunk and n > 0:
            loss_sum += loss.double() * n
            tokens += n
    stats = torch.stack([loss_sum, tokens])
    if world > 1:
        dist.all_reduce(stats)
    model.train()
    loss = (stats[0] / stats[1].clamp(min=1)).item()
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": int(stats[1].item())}


def pad_batch(samples, device):
    """Right-pads (input_ids, labels) pairs into (B, T) tensors; padding is never trained."""
    width = max(len(x) for x, _ in samples)
    idx = torch.zeros(len(samples), width, dtype=torch.long)
    labels = torch.full((len(samples), width), -100, dtype=torch.long)
    for row, (x, y) in enumerate(samples):
        idx[row, :len(x)] = torch.as_tensor(x, dtype=torch.long)
        labels[row, :len(y)] = torch.as_tensor(y, dtype=torch.long)
    return idx.to(device), labels.to(device)


@torch.no_grad()
def exact_match(model, eval_set, count, tokenizer, device, autocast, rank, world):
    """Share of eval prompts whose greedy continuation equals the reference response exactly.

    As in evaluate(), every rank takes the same steps (the same number of generate calls, each the
    whole length of the longest reference, without stopping early at end-of-text) for ZeRO-3."""
    model.eval()
    total = min(count, len(eval_set))
    indices = list(range(total))[rank::world]
    longest = max(len(eval_set.prompt_and_response(i)[1]) for i in range(total))
    eot = eval_set.eot_token  # the end of every response: end-of-text, or a chat template's end-of-turn
    hits = torch.zeros(2, dtype=torch.float64, device=device)
    for start in range(0, -(-total // world), 64):
        chunk = indices[start:start + 64]
        pairs = [eval_set.prompt_and_response(i) for i in chunk or [0]]  # a stand-in on a rank out of prompts
        with autocast:
            outputs = model.generate([p for p, _ in pairs], max_new_tokens=longest, temperature=0.0,
                                     vocab_limit=tokenizer.n_vocab)
        for (_, reference), out in zip(pairs[:len(chunk)], outputs):
            hits[0] += float(out[:out.index(eot) + 1] == reference if eot in out else False)
        hits[1] += len(chunk)
    if world > 1:
        dist.all_reduce(hits)
    model.train()
    return {"exact_match": (hits[0] / hits[1].clamp(min=1)).item()}


def run_eval(run, engine, eval_set, tokenizer, step):
    """Eval loss and perplexity, and exact match when asked, with every rank taking part; rank 0 logs."""
    cfg = run.cfg
    if len(eval_set) == 0:
        run.log(f"eval step {step}: skipped, the eval set is empty (see --data_split / --eval_data_path)")
        return {}
    result = evaluate(engine.module, eval_set, cfg, run.device, run.autocast, run.rank, run.world)
    if cfg["eval_exact_match"]:
        result |= exact_match(engine.module, eval_set, cfg["eval_exact_match"], tokenizer, run.device, run.autocast,
                              run.rank, run.world)
    if run.rank == 0:
        run.metrics.write({"step": step, **result})
        run.log(f"eval step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items()))
    return result


# -----------------------------------------------------------------------------
# Stopping and the end of the run: signals, NaN/Inf, the last checkpoint and the export


class StopSignals:
    """From the first step through the final checkpoint, SIGTERM (a scheduler's preemption; torchrun
    forwards it to every worker) and SIGINT (Ctrl-C) only record that the run should stop after the step
    or checkpoint in progress. Repeats are ignored, by a stopping run until it exits (SIG_IGN: Python
    drops its handlers at exit): Ctrl-C under torchrun reaches a worker twice; a kill -9 of torchrun sends
    a rank parent-death signals ms apart (one per dying launcher thread). SIGKILL still ends a run at once."""

    def __init__(self):
        self.received = 0
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        self.received = self.received or signum  # only a number: printing here could interrupt a print

    def release(self, stopping):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_IGN if stopping else handler)


def weights_are_finite(weights, world):
    """Whether the consolidated weights (engine.full_state_dict(): rank 0's, None elsewhere) are free of
    NaN/Inf, with rank 0's answer on every rank. The consolidated copy is checked so that an engine that
    shards the parameters (ZeRO-3) is checked whole."""
    finite = weights is None or all(bool(torch.isfinite(t).all()) for t in weights.values())
    return from_rank0(finite, world)


def write_nonfinite_batches(output_dir, step, rank, micro, loss):
    """output_dir/nonfinite-step-<step>-rank<rank>.json: where this rank's micro-batches of a NaN/Inf
    step came from (epoch, global micro-batch, training-set sample indices per row), to look at."""
    path = os.path.join(output_dir, f"nonfinite-step-{step:08d}-rank{rank}.json")
    with open(path, "w") as f:
        json.dump({"step": step, "rank": rank, "loss": loss, "micro_batches": [b["samples"] for b in micro]}, f)
    return path


def nonfinite_count(run, engine, applied, step, micro, step_loss, in_a_row):
    """The count of NaN/Inf steps in a row after a step: 0 after one the engine applied. A float16
    gradient overflow is routine (the loss scaler lowers its scale) and starts the count again; a
    NaN/Inf loss or gradient adds one, and its batches are listed in output_dir to look at."""
    if applied:
        return 0
    loss = step_loss.item()
    if run.cfg["dtype"] == "float16" and math.isfinite(loss):
        run.log(f"step {step}: gradient overflow in float16, optimizer step skipped; "
                f"loss scale now {engine.loss_scale:g}")
        return 0
    listed = write_nonfinite_batches(run.cfg["output_dir"], step, run.rank, micro, loss)
    run.log(f"step {step}: NaN/Inf loss or gradient (loss {loss:.4g}), optimizer step skipped "
            f"({in_a_row + 1} in a row); its batches are listed in {listed}")
    return in_a_row + 1


def too_many_nonfinite(in_a_row, step, output_dir):
    return (f"NaN/Inf loss or gradient for {in_a_row} steps in a row at step {step}: stopping instead of training "
            f"on garbage, nothing exported (lower --learning_rate, use --dtype=bfloat16, or check the init weights "
            f"and the batches listed in {output_dir}/nonfinite-step-*.json)")


def final_failure(run, weights, step, nonfinite_in_a_row):
    """Why the run's result must not be kept (a NaN/Inf loss at its last step, or in its consolidated
    weights), with the same answer on every rank; None when it may be."""
    if nonfinite_in_a_row or not weights_are_finite(weights, run.world):
        return (f"the run ended at step {step} with a NaN/Inf {'loss' if nonfinite_in_a_row else 'weight'}: "
                f"neither its checkpoint nor its export is written (see {run.cfg['output_dir']}/nonfinite-step-*"
                f".json and lower --learning_rate, or check the init weights)")
    return None


def checkpoint_now(run, engine, batches, model, step):
    """Every rank's random generators gathered into the trainer's state, then the checkpoint, which
    every rank writes its part of (checkpoint.save_checkpoint)."""
    rngs = [rng_state()]
    if run.world > 1:
        rngs = [None] * run.world
        dist.all_gather_object(rngs, rng_state())
    trainer_state = {"step": step, "batches": batches.state_dict(), "rng": rngs, "data": run.data_identity,
                     "options": run.cfg, "model_config": vars(model.config).copy(), "engine": run.cfg["engine"],
                     "world_size": run.world, "run_id": run.run_id}
    path = save_checkpoint(run.cfg["output_dir"], step, engine, trainer_state, run.cfg["keep_checkpoints"],
                           run.rank, run.world)
    run.log(f"checkpoint step {step} -> {path}")


def export(run, weights, model, optimizer):
    """Rank 0 writes the Hugging Face export of the consolidated weights and, for a sparse run, its delta."""
    if run.rank != 0:
        return
    hf_dir = export_hf(weights, vars(model.config), run.cfg, run.cfg["output_dir"], log=run.log)
    run.log(f"exported Hugging Face model -> {hf_dir}")
    if run.cfg["sparse_density"] > 0:
        path = os.path.join(run.cfg["output_dir"], "sparse_delta.safetensors")
        run.log(f"sparse delta -> {sparse.save_delta(optimizer, path, base_name=run.cfg['init_from'])}")


def close_process_group():
    if dist.is_initialized():
        gc.collect()  # the engines' gradient hooks make reference cycles: only the collector frees them
        dist.barrier()
        dist.destroy_process_group()


def raise_if_stopped(run, failure, stopped_by, step):
    """A run that stopped on NaN/Inf, on a failed write or on a signal ends with RunStopped, whose exit
    code says which."""
    if failure:
        raise RunStopped(f"error: {failure}" if run.rank == 0 else "", EXIT_NONFINITE)
    if run.write_failure():
        raise RunStopped(f"error: {run.write_failure()}; the run stopped after step {step} with its checkpoint "
                         f"in {run.cfg['output_dir']}: continue with --resume once there is space",
                         EXIT_CHECKPOINT_NOT_WRITTEN)
    if stopped_by:
        raise RunStopped(f"stopped by {signal.Signals(stopped_by).name} after step {step}; its checkpoint is in "
                         f"{run.cfg['output_dir']}, continue with --resume" if run.rank == 0 else "", 128 + stopped_by)


# -----------------------------------------------------------------------------
# The run


def main(argv, options=None):
    """One run; options: argv already parsed, (cfg, explicit), as outcome passes them (a config file runs once)."""
    cfg, explicit = options or parse_options(argv, doc=__doc__)
    rank, _, world, device = setup_distributed(cfg)
    log = tqdm.write if rank == 0 else (lambda *a, **k: None)  # tqdm.write keeps the progress bar intact
    # Rank 0 holds the output directory's lock until the run ends; a resumed run keeps its id.
    lock, run_id, saved_state = open_run(cfg, explicit, rank, world, log)
    if cfg["engine"] == "deepspeed":
        deepspeed_engine.adopt_options(cfg, explicit, world, device)
    check_combinations(cfg)
    seed_everything(cfg["seed"])

    # Data: tokenized once per machine and cached; every rank draws its own micro-batches.
    tokenizer, train_set, eval_set, batches, data_hashes = load_data(cfg, rank, world, log, saved_state)
    accum = cfg["gradient_accumulation_steps"]
    total_steps = count_steps(cfg, train_set, batches, world, saved_state)

    # Model: from scratch, a Hugging Face directory or a checkpoint; then the engine that trains it.
    model = prepare_model(cfg, tokenizer.n_vocab, saved_state, device)
    n_params = model.num_params(non_embedding=False)  # counted before an engine may shard the parameters
    n_trained = model.num_params(non_embedding=False, trained_only=True)
    speed = Throughput(model.flops_per_token(cfg["max_seq_len"]), peak_flops(device), world)
    optimizer = make_optimizer(model, cfg, fused=not cfg["offload"], total_steps=total_steps)
    dtype = getattr(torch, cfg["dtype"])
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    run = Run(cfg, run_id, rank, world, device, autocast, log, data_hashes)
    if cfg["sparse_density"] > 0:  # before the engine: the probe's backward must not reach its gradient hooks
        start_sparse(run, model, optimizer, batches)
    engine = make_engine(cfg, model, optimizer)
    step = 0
    if cfg["resume"]:
        step = resume_run(saved_state, engine, batches, rank)
        log(f"resumed from {saved_state['path']} at step {step}")
    saved_state = None  # free the host memory it holds
    if rank == 0:
        run.metrics = MetricsLog(cfg["output_dir"], cfg["tensorboard"], step if cfg["resume"] else None, log)
    log_start(run, model, engine, n_params, n_trained, total_steps, step, eval_set, tokenizer)

    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, dynamic_ncols=True, desc="sft")
    nonfinite_in_a_row, failure, stopping, signals = 0, None, False, StopSignals()
    while step < total_steps and not stopping:
        # Fetch the step's micro-batches first: the loss is normalised by the trained tokens of the
        # whole step on all ranks, so splitting a batch differently cannot change the result.
        micro = [batches.next_batch() for _ in range(accum)]
        stop_vote = bool(signals.received or run.write_failure())
        counts = torch.tensor([float(sum((b["labels"] != -100).sum() for b in micro)),
                               float(sum(b["input_ids"].numel() for b in micro)), float(stop_vote)], device=device)
        if world > 1:
            dist.all_reduce(counts)
        stop_votes = counts[2].to("cpu", non_blocking=True)  # read after the step's one host sync
        trained = counts[0].clamp(min=1)
        speed.add(counts[0], counts[1])

        multiplier = lr_multiplier(step, cfg, total_steps)
        step_loss = torch.zeros((), device=device)
        for i, b in enumerate(micro):
            idx, labels = b["input_ids"].to(device), b["labels"].to(device)
            segments = b["segment_ids"].to(device) if b["segment_ids"] is not None else None
            # Engines average gradients over ranks; the loss weight undoes that and applies the token share.
            weight = (labels != -100).sum() * world / trained
            loss = engine(idx, labels, segment_ids=segments, boundary=i == accum - 1)
            engine.backward(loss * weight)
            step_loss += loss.detach().float() * weight / world
        if world > 1:
            dist.all_reduce(step_loss)
        # Clip, then update unless the loss or the gradients hold a NaN/Inf: that must not reach the weights.
        grad_norm, applied = engine.step(multiplier, torch.isfinite(step_loss))
        step += 1
        progress.update(1)
        # A signal or a failed metrics write stops the run after this step; ranks agree through the votes.
        stopping = bool(stop_votes) if world > 1 else bool(signals.received or run.write_failure())
        nonfinite_in_a_row = nonfinite_count(run, engine, applied, step - 1, micro, step_loss, nonfinite_in_a_row)
        if nonfinite_in_a_row >= cfg["max_nonfinite_steps"]:
            failure = too_many_nonfinite(nonfinite_in_a_row, step - 1, cfg["output_dir"])
            break
        if nonfinite_in_a_row:
            continue

        if step % cfg["log_interval"] == 0 or step == total_steps:
            log_step(run, progress, {"step": step, "loss": step_loss.item(), "lr": cfg["learning_rate"] * multiplier,
                                     "grad_norm": grad_norm.item(), **speed.rates(), "epoch": batches.epoch,
                                     "padding": batches.padding_fraction, "peak_mem_gib": peak_memory_gib(device)})
            speed.restart()
        if stopping:
            break  # the checkpoint follows the loop
        with speed.paused():  # eval and checkpoints do not count against tokens/s
            if cfg["eval_interval"] and step % cfg["eval_interval"] == 0 and step < total_steps:
                run_eval(run, engine, eval_set, tokenizer, step)
            if cfg["checkpoint_interval"] and step % cfg["checkpoint_interval"] == 0 and step < total_steps:
                checkpoint_now(run, engine, batches, model, step)
    progress.close()
    report_model_state(run, engine, n_params, n_trained, step)

    # The end: checkpoint, export and the final eval, unless the last steps or the weights hold a NaN/Inf.
    weights = engine.full_state_dict()  # collective; rank 0 checks and exports this consolidated copy
    failure = failure or final_failure(run, weights, step, nonfinite_in_a_row)
    result = None
    if not failure:
        checkpoint_now(run, engine, batches, model, step)  # first, so nothing after it can cost the trained model
        stopping = stopping or from_rank0(signals.received > 0, world)  # a signal since the last step's vote
    signals.release(stopping)  # a signal during the export or the final eval ends the process there
    if not failure and not stopping:
        export(run, weights, model, optimizer)
        result = run_eval(run, engine, eval_set, tokenizer, step)
    # Released (here, and by close_process_group's collector) before the process group: dropped later, the
    # engine's last reference to the group would destroy it while holding the GIL that gloo's threads wait for.
    del engine
    close_process_group()
    raise_if_stopped(run, failure, (signals.received or signal.SIGTERM) if stopping else 0, step)
    return result


def outcome(argv):
    """(exit status, the sentence that says why) of a run: 0 done, 2 bad input, 3 NaN/Inf, 4 a file (a
    checkpoint, say) not written, 128 + the signal when stopped by one. The sentence is empty on ranks other
    than 0 where rank 0 has the same one to print. The outcome goes into output_dir/run.json too, also
    for a crash (exit 1, the exception raised on). The options are parsed here, once: a config file is code."""
    cfg = {}
    try:
        cfg, explicit = parse_options(argv, doc=__doc__)
        main(argv, (cfg, explicit))
        exit_code, sentence = 0, "done"
    except OptionError as e:  # bad input: one sentence, no traceback
        exit_code, sentence = 2, f"error: {e}"
    except CheckpointError as e:  # a full disk, say: one sentence, no traceback
        exit_code, sentence = EXIT_CHECKPOINT_NOT_WRITTEN, f"error: {e}"
    except RunStopped as e:
        exit_code, sentence = e.exit_code, str(e)
    except KeyboardInterrupt:  # Ctrl-C outside the training steps, where there is no step to finish
        exit_code, sentence = 128 + signal.SIGINT, ("interrupted; the latest checkpoint in output_dir, if any, "
                                                    "holds the run's work")
    except Exception as e:
        if not is_disk_error(e):  # a bug: recorded, then its traceback
            if cfg:
                write_outcome(cfg["output_dir"], 1, f"crashed: {type(e).__name__}: {e}")
            raise
        exit_code, sentence = EXIT_CHECKPOINT_NOT_WRITTEN, f"error: {write_failure(e.filename, e)}"
    if cfg:
        write_outcome(cfg["output_dir"], exit_code, sentence)
    return exit_code, sentence


@torchelastic_record  # an unexpected exception (a bug) reaches torchrun's failure summary with its traceback
def run_from_command_line(argv):
    """Runs; prints the sentence once, from rank 0, and under torchrun writes it into the error file that
    torchrun reads, so that its failure summary shows it rather than a pointer to its documentation."""
    exit_code, sentence = outcome(argv)
    if int(os.environ.get("RANK", 0)) == 0 and exit_code:
        print(f"train_sft.py: {sentence}", file=sys.stderr)
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and exit_code and sentence:
        with open(error_file, "w") as f:
            # torchrun's summary prints py_callstack; here it is the sentence, which says more than a traceback
            sentence = f"train_sft.py: {sentence}"
            json.dump({"message": {"message": sentence, "extraInfo": {"py_callstack": sentence,
                                                                      "timestamp": str(int(time.time()))}}}, f)
    sys.exit(exit_code)


if __name__ == "__main__":
    run_from_command_line(sys.argv[1:])
