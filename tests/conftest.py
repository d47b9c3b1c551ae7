"""Shared test setup, fixtures and launchers: the tiny model's options, the trainer in this process
(train_here) or in new processes (run_trainer: python or torchrun), the data file, one session-wide
sweep of 2-rank runs over every engine and stage, and a tiny ChatML tokenizer directory.

Triton reads TRITON_INTERPRET when it is imported (transformers imports it too), so the flag is
set here, before any test module loads: without a GPU the Triton kernels then run on the CPU
under Triton's interpreter. With a GPU they compile as usual."""
import contextlib
import functools
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A model small enough that a run of a few steps takes about a second.
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


def run_trainer(args, tmp_path, nproc=1, check=True, env=None, script="train_sft.py", tiny=TINY):
    """Runs the trainer (or another script taking its options) on the tiny model (options `tiny`) in a
    fresh process, under torchrun with gloo when nproc > 1, with a cache of its own in tmp_path unless
    args name one; environment: ours plus env. Returns the completed process; with check, a failure raises."""
    cache = [] if any(a.startswith("--cache_dir") for a in args) else ["--cache_dir=" + str(tmp_path / "cache")]
    return launch([script, *tiny, *cache, *args], nproc, check, env)


def launch(command, nproc, check=True, env=None, timeout=300):
    """python COMMAND in ROOT, under torchrun with gloo when nproc > 1, one thread per process."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([sys.executable, *launcher, *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{command[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_here(args, tmp_path, check=True, tiny=TINY):
    """train_sft.py on one rank in this process (a process start costs seconds): train_sft.outcome (which
    writes run.json), then the sentence on stderr as the command line prints it, on the tiny model (options
    `tiny`) with a cache of its own in tmp_path unless args name one. One thread, as the processes of
    run_trainer have (OMP_NUM_THREADS=1), so that their losses agree bit for bit. Returns what a process
    would: a CompletedProcess with the exit status and the captured stdout and stderr; with check, a
    failure raises. An unexpected exception (a bug) propagates, as its traceback would end the process."""
    import train_sft  # here, after TRITON_INTERPRET is set
    cache = [] if any(a.startswith("--cache_dir") for a in args) else ["--cache_dir=" + str(tmp_path / "cache")]
    argv = [*tiny, *cache, *args]
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}  # a stopped run ignores them
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ["OMP_NUM_THREADS"] = "1"  # main then leaves the thread count alone
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            exit_code, sentence = train_sft.outcome(argv)  # which writes run.json
            if exit_code:  # as train_sft.run_from_command_line prints it
                print(f"train_sft.py: {sentence}", file=sys.stderr)
    finally:
        if torch.distributed.is_initialized():  # a run refused after its start leaves what its exit would end
            torch.distributed.destroy_process_group()
        torch.set_num_threads(threads)
        os.environ.pop("OMP_NUM_THREADS") if omp is None else os.environ.update(OMP_NUM_THREADS=omp)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    proc = subprocess.CompletedProcess(["train_sft.py", *argv], exit_code, stdout.getvalue(), stderr.getvalue())
    if check and exit_code != 0:
        raise AssertionError(f"train_sft.py failed ({exit_code}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(output_dir):
    """{step: loss} of a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    """240 reverse-a-word pairs in a JSONL file, shared by every test that trains on it."""
    return write_reverse_pairs(tmp_path_factory.mktemp("data") / "train.jsonl", 240)


# ----------------------------------------------------------------------------- one sweep of engines and stages

SWEEP_STEPS = 20
# 2 ranks x 3 micro-batches of 8 (accumulation without communication), checkpoints at steps 10 and 20, and a
# final eval with greedy generation. 235 training samples make 30 micro-batches of 8 per epoch: 5 steps of 6
# micro-batches on 1, 2 or 3 ranks alike, so runs on other numbers of ranks see the same batches at every step.
SWEEP = [f"--max_steps={SWEEP_STEPS}", "--batch_size=8", "--gradient_accumulation_steps=3", "--checkpoint_interval=10",
         "--keep_checkpoints=5", "--eval_exact_match=5", "--dropout=0.0"]
# The Llama shape (RMSNorm, rotary, SwiGLU, grouped-query attention, an untied head) for a few steps.
LLAMA_SHAPE = ["--model_type=llama", "--n_kv_head=1", "--max_steps=4", "--dropout=0.0"]
SWEEP_RUNS = ([("gpt2", engine, stage) for engine in ("native", "deepspeed") for stage in range(4)]
              + [("llama", "native", 0), ("llama", "native", 3), ("llama", "deepspeed", 3)])


class EngineSweep:
    """The session's 2-rank fp32 runs, every engine and stage on one data file: sweep(engine, stage, shape)
    is a run's output directory, sweep.stdout(...) what its ranks printed."""

    def __init__(self, root):
        self.root = root

    def __call__(self, engine, stage, shape="gpt2"):
        return self.root / f"{shape}-{engine}{stage}"

    def stdout(self, engine, stage, shape="gpt2"):
        return "".join(log.read_text() for log in sorted(self.root.glob(f"{shape}-{engine}{stage}.stdout-rank*")))


def train_several(runs, nproc, tmp_path, timeout=900):
    """Several trainer runs one after another in the same torchrun launch (see run_listed_runs below), so
    that they pay for the process starts once. runs: {output_dir: args} (on the tiny model, a cache in
    tmp_path); each run's stdout goes to <output_dir>.stdout-rank<r>. The first failure raises."""
    cache = "--cache_dir=" + str(tmp_path / "cache")
    listed = tmp_path / f"runs-{len(list(tmp_path.glob('runs-*.json')))}.json"
    listed.write_text(json.dumps([[str(out), [*TINY, cache, *args, f"--output_dir={out}"]] for out, args in runs.items()]))
    return launch([os.path.abspath(__file__), str(listed)], nproc, timeout=timeout)


@pytest.fixture(scope="session")
def engine_sweep(tmp_path_factory, data_file):
    """Native stages 0-3 and DeepSpeed stages 0-3 on the GPT-2 shape for SWEEP_STEPS steps, and native 0, native
    3 and DeepSpeed 3 on the Llama shape, on 2 ranks for the whole session: the native runs in one torchrun
    launch, each DeepSpeed run in one of its own, as from the command line (DeepSpeed keeps global state,
    its communication backend among it, that a later run in the same processes would inherit)."""
    sweep = EngineSweep(tmp_path_factory.mktemp("sweep"))
    shapes = {"gpt2": SWEEP, "llama": LLAMA_SHAPE}
    runs = {(engine, sweep(engine, stage, shape)): [f"--data_path={data_file}", *shapes[shape], f"--engine={engine}",
                                                    f"--zero_stage={stage}"] for shape, engine, stage in SWEEP_RUNS}
    train_several({out: args for (engine, out), args in runs.items() if engine == "native"}, 2, sweep.root)
    for (engine, out), args in runs.items():
        if engine == "deepspeed":
            train_several({out: args}, 2, sweep.root)
    return sweep


RESUME_AT = 10  # the sweep's first checkpoint


@pytest.fixture(scope="session")
def resumed_sweep(engine_sweep, tmp_path_factory):
    """Native stage 3 and DeepSpeed stages 2 and 3 of the sweep resumed on 2 ranks from their checkpoint at
    RESUME_AT: an EngineSweep of the resumed runs. The native run's directory has the uninterrupted run's
    metrics.jsonl too (the resume trims it); the DeepSpeed ones only the checkpoint."""
    resumed = EngineSweep(tmp_path_factory.mktemp("resumed"))
    for engine, stage in [("native", 3), ("deepspeed", 2), ("deepspeed", 3)]:
        source, target = engine_sweep(engine, stage), resumed(engine, stage)
        shutil.copytree(source / f"ckpt-{RESUME_AT:08d}", target / f"ckpt-{RESUME_AT:08d}")
        if engine == "native":
            shutil.copy(source / "metrics.jsonl", target)
        train_several({target: ["--resume", "--batch_size=8"]}, 2, resumed.root)  # the sweep's batch; TINY says 4
    return resumed


# ----------------------------------------------------------------------------- a tiny chat tokenizer

# A Qwen2-style ChatML template (a default system message when the conversation has none), written out
# with block tags on lines of their own, so that it renders right only under trim_blocks and lstrip_blocks.
CHATML_TEMPLATE = """{% for message in messages %}
    {% if loop.first and message['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
    {% endif %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unsupported role: ' + message['role']) }}
    {% endif %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""
CHATML_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def _training_text():
    """A few hundred short chat-like strings, enough for a byte-level BPE of a few hundred merges."""
    words = ("the cat dog sat on a mat hello world what is two plus four answer reverse sort shift upper "
             "system user assistant you are helpful brief be yes no please thanks").split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(3 + i % 5)) for i in range(400)]


def make_chatml_tokenizer_dir(path, chat_template=CHATML_TEMPLATE, **config):
    """Write a tiny Hugging Face tokenizer directory at path, built here (nothing downloads): a byte-level
    BPE with ChatML's special tokens, tokenizer_config.json with eos <|im_end|>, pad <|endoftext|> and
    chat_template (None leaves it out; **config overrides fields), and generation_config.json whose
    eos_token_id is a list, as instruct models write it. Returns the directory as a string."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    os.makedirs(path, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_training_text(), trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in CHATML_SPECIAL_TOKENS])
    tokenizer.save(os.path.join(path, "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>", "chat_template": chat_template, **config}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in settings.items() if v is not None}, f, indent=1)
    ids = {t: tokenizer.token_to_id(t) for t in CHATML_SPECIAL_TOKENS}
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]], "pad_token_id": ids["<|endoftext|>"]}, f)
    return str(path)


def run_listed_runs(listed):
    """Under torchrun (train_several): train_sft.py's runs listed in the JSON file, [[output_dir, argv], ...],
    one after another in this process, each as the command line runs it (train_sft.outcome, then its sentence)
    with its stdout in <output_dir>.stdout-rank<r>; a run that fails ends the process with its exit status."""
    sys.path.insert(0, ROOT)
    import torch.distributed as dist
    import train_sft
    with open(listed) as f:
        runs = json.load(f)
    # Each later run's process group meets in torchrun's store under a prefix of its own: a group made anew
    # after destroy_process_group has the same name as the last one, and would read the last one's addresses.
    rank, world, init_process_group = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), dist.init_process_group
    for i, (output_dir, argv) in enumerate(runs):
        if i:
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False)
            dist.init_process_group = functools.partial(init_process_group, store=dist.PrefixStore(f"run{i}", store),
                                                        rank=rank, world_size=world)
        with open(f"{output_dir}.stdout-rank{rank}", "w") as log, contextlib.redirect_stdout(log):
            exit_code, sentence = train_sft.outcome(argv)
        if exit_code:  # as train_sft.run_from_command_line ends a run (outcome has written run.json)
            if rank == 0:
                print(f"train_sft.py: {sentence}", file=sys.stderr)
            sys.exit(exit_code)


if __name__ == "__main__":
    run_listed_runs(sys.argv[1])
