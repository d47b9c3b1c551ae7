"""TRL's SFTTrainer and train_sft.py side by side: the same init, data, template and hyperparameters.

Setup, once (TRL and its dependencies live in their own virtual environment, never in .venv; the lock
keeps torch and transformers at the project's versions):

    python3 -m venv .venv-peers && .venv-peers/bin/pip install -r bench/requirements-peers.txt -c requirements.lock

    .venv/bin/python bench/compare_trl.py [--pairs=3] [--rows=320] [--data_path=alpaca.jsonl --eval_data_path=...]
    .venv/bin/python bench/compare_trl.py --init_from=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf [--data_path=chats.jsonl ...]
    .venv/bin/python bench/compare_trl.py --dry-run     # imports and wiring of both sides, no training

Two kinds of run. Without --init_from: one saved GPT-2 init (model.py's GPT, saved in Hugging Face
format) starts both systems, and one Alpaca-format file (by default the demo task's rows written as
Alpaca rows) feeds both. With --init_from (a Hugging Face directory, or a GGUF file, which the project
reads and saves as a directory for TRL): that real model, its own tokenizer and its own chat template
on both sides; the data are chat rows (TRL's conversational prompt/completion, or messages rows, whose
last assistant message becomes the completion), by default the demo task as one-turn chats. Only the
completion is trained in both; the project stops each sample at the end-of-turn token, while TRL also
trains what its chat template writes after it (ChatML's newline): that one position per row is counted
apart (verification.trl_extra_trained_positions) and every rate uses the positions both train. The project runs
`train_sft.py --init_from=DIR` in .venv; TRL runs in the peers' Python (this file's workers), with the
template's prompt part as TRL's prompt and its response part, plus the end-of-text token the project
appends, as the completion (completion-only loss). Before anything is timed, every row's token ids
and trained positions are compared between the two systems' prepared data.
(Realistic chats for a committed figure: bench/prose_chats.py.)

Each pair (project, then TRL; alternating, so a noisy machine slows both) measures, each in its own
process: data preparation (all rows of the file) and training (the first --rows rows, one epoch,
--rows / --batch_size steps, so both train exactly the same labelled positions). Measured from outside:
- data preparation: wall and CPU seconds from loading the tokenizer (the project: out of the model
  file, a GGUF's metadata included; TRL: AutoTokenizer from the tokenizer.json written for it) to the
  tokenized, labelled rows, and the process's peak resident memory (with its memory before preparation,
  after imports, for reference);
- training: wall time from the line each trainer prints when its loop starts (project: its "model state
  at start" line; TRL: a callback at on_train_begin) to the arrival of its last step's line, both
  timestamped by this process; trained tokens per second = the labelled positions of the trained rows
  (from the verified masks; padding and prompts do not count) / that time; CPU seconds read from
  /proc over the same span; step time = the median gap between step lines; peak RSS of the process
  (its VmHWM, polled) and on a GPU peak GPU memory (torch.cuda.max_memory_allocated in both);
- eval loss of both final models (the project's exported hf/ dir, TRL's saved dir) through one
  evaluator here: transformers' AutoModelForCausalLM, token-weighted cross-entropy on the held-out
  rows' trained positions as the project marks them.
Min and median over the pairs, the load average before and after, and the machine go to
bench/results/trl_cpu.json (trl_<GPU name>.json on a GPU).
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
SETUP_LINE = ("python3 -m venv .venv-peers && .venv-peers/bin/pip install -r bench/requirements-peers.txt "
              "-c requirements.lock")
# Lines that the parent timestamps: a trainer's loop starts, a step ends.
PROJECT_START = re.compile(r"^rank 0 model state at start")
PROJECT_STEP = re.compile(r"^step (\d+) \| loss")
TRL_START = re.compile(r"^trl: train begins")
TRL_STEP = re.compile(r"^trl: step (\d+)")
PEAK_GPU = re.compile(r"peak_mem_gib ([0-9.]+)|^trl: peak_gpu_gib ([0-9.]+)")

OPTIONS = {
    "pairs": (3, "alternating (project, TRL) pairs of data preparation and training runs"),
    "rows": (320, "training rows: the first ROWS of the train file, one epoch (a multiple of --batch_size)"),
    "init_from": ("", "a real model (Hugging Face directory or .gguf) with its chat template; empty = a GPT-2 init"),
    "data_path": ("", "the JSONL rows to train on: Alpaca rows, or chat rows with --init_from; empty = the demo task"),
    "eval_data_path": ("", "the held-out rows (same format) for the eval loss (needed with --data_path)"),
    "template": ("deepspeed_chat", "the project's --template; TRL gets its prompt part as the prompt and its "
                                   "response part as the completion"),
    "max_seq_len": (128, "most tokens in one sample (a longer row stops the benchmark: the systems cut differently)"),
    "batch_size": (16, "samples per optimizer step (one micro-batch, one process)"),
    "learning_rate": (1e-3, "peak learning rate; cosine to 0, no warmup, AdamW(0.9, 0.95), clip 1.0, no weight decay"),
    "group_by_length": (True, "length-grouped batches in both (the project's default; TRL's group_by_length)"),
    "n_layer": (4, "layers of the GPT-2 init"),
    "n_head": (4, "attention heads of the GPT-2 init"),
    "n_embd": (256, "width of the GPT-2 init (4 x 256 with GPT-2's 50,257 tokens: 16M parameters)"),
    "seed": (1337, "seed of the init and of both trainers; pair k runs both with seed + k (another batch order)"),
    "device": ("auto", "cpu | cuda | auto"),
    "dtype": ("auto", "float32 | bfloat16 | auto (float32 on a CPU, bfloat16 on a GPU)"),
    "peers_python": ("", "the Python that has TRL; empty = .venv-peers/bin/python, else this Python"),
    "dry_run": (False, "check imports and wiring of both sides (also --dry-run), train nothing"),
}
CHOICES = {"device": ("auto", "cpu", "cuda"), "dtype": ("auto", "float32", "bfloat16")}
RANGES = {"pairs": (1, None), "rows": (1, None), "max_seq_len": (2, None), "batch_size": (1, None)}


class PeersMissing(RuntimeError):
    """TRL cannot be imported by the peers' Python: the message says how to set it up."""


# ----------------------------------------------------------------------------- measuring a process

def proc_cpu_seconds(pid):
    """User + system CPU seconds of a running process (its threads included), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_peak_rss_mib(pid):
    """VmHWM of a running process: the peak resident memory of the program it runs now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def watch_peak_rss(pid, peak, stop):
    """Reads the process's high-water mark until stop is set; the last reading is its peak (to within
    the polling interval before it exits). ru_maxrss cannot give it: Linux folds in the memory of the
    parent that forked the process, before its exec."""
    while not stop.wait(0.05):
        try:
            peak[0] = proc_peak_rss_mib(pid) or peak[0]
        except (OSError, ValueError):
            return


def run_measured(argv, env=None, cwd=ROOT):
    """Runs argv to its end; returns its stdout lines, each with the time it arrived here and the
    process's CPU seconds then, its exit status, wall seconds, total CPU seconds and peak RSS."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        env = dict(env or os.environ, PYTHONUNBUFFERED="1")  # each line as it is printed
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                errors="replace")
        peak, stop = [None], threading.Event()
        watcher = threading.Thread(target=watch_peak_rss, args=(proc.pid, peak, stop), daemon=True)
        watcher.start()
        lines = []
        for line in proc.stdout:
            try:
                cpu = proc_cpu_seconds(proc.pid)
            except (OSError, IndexError):
                cpu = None
            lines.append((time.perf_counter(), cpu, line.rstrip("\n")))
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own CPU time
        stop.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        err = stderr.read()
    result = {"lines": lines, "returncode": proc.returncode, "wall_s": time.perf_counter() - start,
              "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": peak[0]}
    if proc.returncode != 0:
        out = "\n".join(line for _, _, line in lines[-30:])
        raise RuntimeError(f"{' '.join(map(str, argv[:3]))} ... exited with {proc.returncode}:\n{out}\n{err[-4000:]}")
    return result


def worker_report(result):
    """The JSON object a worker prints last, on a line of its own."""
    return json.loads(next(line for _, _, line in reversed(result["lines"]) if line.startswith("{")))


def training_span(result, start_line, step_line, gpu=False):
    """Training wall and CPU seconds from the loop-start line to the last step line, the step gaps, and
    on a GPU the peak GPU memory that the lines report."""
    start = next((t, cpu) for t, cpu, line in result["lines"] if start_line.match(line))
    steps = [(t, cpu) for t, cpu, line in result["lines"] if step_line.match(line)]
    gaps = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
    peaks = [float(m.group(1) or m.group(2)) for _, _, line in result["lines"] if (m := PEAK_GPU.search(line))]
    cpu = steps[-1][1] - start[1] if None not in (start[1], steps[-1][1]) else None
    return {"steps": len(steps), "wall_s": steps[-1][0] - start[0], "cpu_s": cpu,
            "step_s_median": statistics.median(gaps) if gaps else None, "step_s_min": min(gaps) if gaps else None,
            "peak_gpu_gib": max(peaks) if peaks and gpu else None}


# ----------------------------------------------------------------------------- the TRL side (peers' Python)

def rss_mib(field):
    """VmRSS (now) or VmHWM (peak so far) of this process in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def trl_dataset(spec, path, rows):
    """The Alpaca file as TRL's prompt/completion rows, rendered with the project's template parts;
    the completion ends with the end-of-text token, as the project's responses do (TRL would also
    append it itself when missing)."""
    from datasets import load_dataset
    dataset = load_dataset("json", data_files=path, split="train")
    if rows:
        dataset = dataset.select(range(rows))
    if spec["chat"]:  # conversational prompt/completion rows: TRL applies the model's chat template itself
        return dataset
    prompt_part, response_part, join, eot = spec["prompt_part"], spec["response_part"], spec["alpaca_join"], spec["eot"]

    def to_prompt_completion(row):
        prompt = row["instruction"] + (join + row["input"] if row.get("input") else "")
        return {"prompt": prompt_part.replace("{prompt}", prompt),
                "completion": response_part.replace("{response}", row["output"]) + eot}
    return dataset.map(to_prompt_completion, remove_columns=dataset.column_names)


def trl_config(spec, output_dir, max_steps):
    """SFTConfig with the project's hyperparameters; TRL's own defaults that differ (bf16 on, gradient
    checkpointing on, beta2 0.999, learning rate 2e-5) are overridden."""
    from trl import SFTConfig
    cpu = spec["device"] == "cpu"
    return SFTConfig(
        output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=spec["batch_size"],
        gradient_accumulation_steps=1, learning_rate=spec["learning_rate"], lr_scheduler_type="cosine",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, weight_decay=0.0, max_grad_norm=1.0,
        seed=spec["seed"], data_seed=spec["seed"], bf16=spec["dtype"] == "bfloat16", fp16=False,
        gradient_checkpointing=False, use_cpu=cpu, max_length=spec["max_seq_len"], completion_only_loss=True,
        packing=False, train_sampling_strategy="group_by_length" if spec["group_by_length"] else "random",
        eval_strategy="no", save_strategy="no", logging_steps=max(max_steps, 1), report_to="none",
        disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=not cpu)


def load_trl_model(spec):
    """The saved init, as a TRL user loads it."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(spec["seed"])
    return AutoModelForCausalLM.from_pretrained(spec["init_dir"], dtype=torch.float32)


def load_trl_tokenizer(spec):
    """The converted tokenizer, as a TRL user loads it."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(spec["tokenizer_dir"])


def trl_check(spec):
    """Imports and versions of the peers' side; the torch and transformers versions must be the project's."""
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    print(json.dumps({"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                      "datasets": datasets.__version__, "accelerate": accelerate.__version__}))


def trl_prep(spec):
    """TRL's data preparation, timed: the tokenizer's load and the file to prompt/completion rows, then
    SFTTrainer's own tokenizing and labelling (its _prepare_dataset, timed by a wrapper that changes
    nothing). The prepared rows are written for the comparison with the project's."""
    from trl import SFTTrainer
    model = load_trl_model(spec)
    timed = {}
    original = SFTTrainer._prepare_dataset

    def prepare_timed(self, *args, **kwargs):
        started, cpu = time.perf_counter(), time.process_time()
        dataset = original(self, *args, **kwargs)
        timed["wall_s"], timed["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu
        return dataset
    SFTTrainer._prepare_dataset = prepare_timed
    rss_before = rss_mib("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    tokenizer = load_trl_tokenizer(spec)  # timed: the project's preparation loads its tokenizer too
    dataset = trl_dataset(spec, spec["train_file"], 0)
    load_wall, load_cpu = time.perf_counter() - started, time.process_time() - cpu
    trainer = SFTTrainer(model=model, args=trl_config(spec, spec["output_dir"], 1), train_dataset=dataset,
                         processing_class=tokenizer)
    report = {"wall_s": load_wall + timed["wall_s"], "cpu_s": load_cpu + timed["cpu_s"],
              "tokenizer_and_format_wall_s": load_wall, "rss_before_mib": rss_before, "peak_rss_mib": rss_mib("VmHWM")}
    with open(spec["rows_file"], "w") as f:
        for row in trainer.train_dataset:
            f.write(json.dumps([row["input_ids"], row["labels"]]) + "\n")
    print(json.dumps(report))


def trl_train(spec):
    """TRL's training run: prints a line when its loop starts and after every step (a device sync first,
    as the project's step has one), then saves the final model."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTTrainer
    cuda = spec["device"] == "cuda"

    class StepLines(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            print("trl: train begins", flush=True)

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            print(f"trl: step {state.global_step}", flush=True)

    model, tokenizer = load_trl_model(spec), load_trl_tokenizer(spec)
    dataset = trl_dataset(spec, spec["train_file"], spec["rows"])
    steps = spec["rows"] // spec["batch_size"]
    trainer = SFTTrainer(model=model, args=trl_config(spec, spec["output_dir"], steps), train_dataset=dataset,
                         processing_class=tokenizer, callbacks=[StepLines()])
    trainer.train()
    if cuda:
        print(f"trl: peak_gpu_gib {torch.cuda.max_memory_allocated() / 2**30:.4f}", flush=True)
    trainer.save_model(spec["output_dir"])
    print(json.dumps({"model_dir": spec["output_dir"]}))


WORKERS = {"trl_check": trl_check, "trl_prep": trl_prep, "trl_train": trl_train}


# ----------------------------------------------------------------------------- the project side (.venv)

def project_prep(spec):
    """The project's data preparation, timed: prepare_data loads the tokenizer and tokenizes the file into a
    fresh cache."""
    sys.path.insert(0, str(ROOT))
    from data import prepare_data
    rss_before = rss_mib("VmRSS")
    started, cpu = time.perf_counter(), time.process_time()
    prepare_data(spec["train_file"], spec["tokenizer"], spec["max_seq_len"], eval_data_path=spec["eval_file"],
                 template=spec["template"], seed=spec["seed"], cache_dir=spec["cache_dir"], log=lambda *a: None)
    print(json.dumps({"wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu,
                      "rss_before_mib": rss_before, "peak_rss_mib": rss_mib("VmHWM")}))


WORKERS["project_prep"] = project_prep


def write_alpaca(rows, path):
    """prompt/response rows as Alpaca rows (the prompt is the instruction, no input)."""
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"instruction": row["prompt"], "input": "", "output": row["response"]}) + "\n")


def as_chat_row(row, where):
    """A chat row as TRL's conversational prompt/completion (the form both systems read): a messages row's
    last message, which must be the assistant's, becomes the completion; prompt/completion rows stay."""
    if isinstance(row.get("prompt"), list) and isinstance(row.get("completion"), list):
        return {"prompt": row["prompt"], "completion": row["completion"]}
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
            or messages[-1].get("role") != "assistant":
        raise ValueError(f"{where}: a chat row needs 'messages' ending with an assistant message, or 'prompt' and "
                         f"'completion' message lists")
    return {"prompt": messages[:-1], "completion": messages[-1:]}


def write_chats(rows, path):
    """Chat rows (or the demo's prompt/response rows as one-turn chats) as prompt/completion rows."""
    with open(path, "w") as f:
        for k, row in enumerate(rows):
            if "response" in row:
                row = {"messages": [{"role": "user", "content": row["prompt"]},
                                    {"role": "assistant", "content": row["response"]}]}
            f.write(json.dumps(as_chat_row(row, f"row {k + 1}")) + "\n")


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(args, workdir):
    """(train file, eval file, training-rows file): the chosen files, or the demo task (as Alpaca rows, or
    with --init_from as chats); with --init_from every file is rewritten as prompt/completion chat rows.
    The training rows are the first --rows rows of the train file, in a file of their own."""
    from data import demo_examples
    if args["data_path"]:
        train_file, eval_file = args["data_path"], args["eval_data_path"]
        if args["init_from"]:
            train_rows, eval_rows = read_jsonl(train_file), read_jsonl(eval_file)
    else:
        train_rows, eval_rows = demo_examples()
        train_file, eval_file = workdir / "train_alpaca.jsonl", workdir / "eval_alpaca.jsonl"
        if not args["init_from"]:
            write_alpaca(train_rows, train_file)
            write_alpaca(eval_rows, eval_file)
    if args["init_from"]:
        train_file, eval_file = workdir / "train_chats.jsonl", workdir / "eval_chats.jsonl"
        write_chats(train_rows, train_file)
        write_chats(eval_rows, eval_file)
    with open(train_file) as f:
        head = [line for line, _ in zip(f, range(args["rows"]))]
    if len(head) < args["rows"]:
        raise ValueError(f"{train_file} has {len(head)} rows, fewer than --rows={args['rows']}")
    subset = workdir / "train_rows.jsonl"
    subset.write_text("".join(head))
    return str(train_file), str(eval_file), str(subset)


def real_model_init(args, workdir):
    """(model directory, tokenizer directory, parameters) of --init_from for TRL: a directory as it is; a GGUF
    file read by the project's own loader (what the trainer's --init_from does) and saved as a directory."""
    from model import GPT
    from tokenizer import save_tokenizer
    model = GPT.from_pretrained(args["init_from"])
    n_params = model.num_params(non_embedding=False)
    if os.path.isdir(args["init_from"]):
        return args["init_from"], args["init_from"], n_params
    init_dir = workdir / "init"
    model.save_pretrained(init_dir)
    save_tokenizer(args["init_from"], init_dir)
    return str(init_dir), str(init_dir), n_params


def save_init(args, workdir):
    """One GPT-2 init in Hugging Face format (model.py's GPT, GPT-2's vocabulary) and a Hugging Face
    tokenizer made from the project's GPT-2 vocabulary file; returns their directories."""
    import torch
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from model import GPT, GPTConfig
    from tokenizer import EOT, GPT2_PATTERN, _gpt2_vocab_file, get_tokenizer
    torch.manual_seed(args["seed"])
    enc = get_tokenizer("gpt2")
    model = GPT(GPTConfig(block_size=args["max_seq_len"], vocab_size=enc.n_vocab, n_layer=args["n_layer"],
                          n_head=args["n_head"], n_embd=args["n_embd"], dropout=0.0, bias=True))
    init_dir, tokenizer_dir = workdir / "init", workdir / "tokenizer"
    model.save_pretrained(init_dir)
    converted = TikTokenConverter(vocab_file=_gpt2_vocab_file(), pattern=GPT2_PATTERN,
                                  extra_special_tokens=[EOT]).converted()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token=EOT)
    if tokenizer.eos_token_id != enc.eot_token:
        raise ValueError(f"the converted tokenizer's end-of-text id is {tokenizer.eos_token_id}, not {enc.eot_token}")
    tokenizer.save_pretrained(tokenizer_dir)
    return str(init_dir), str(tokenizer_dir), model.num_params(non_embedding=False)


def project_command(args, spec, output_dir, cache_dir):
    """train_sft.py with the benchmark's hyperparameters: one process, no eval or checkpoint before the end."""
    return [sys.executable, "train_sft.py", f"--data_path={spec['rows_train_file']}",
            f"--eval_data_path={spec['eval_file']}", f"--init_from={args['init_from'] or spec['init_dir']}",
            f"--tokenizer={spec['tokenizer']}", f"--template={args['template']}", f"--max_seq_len={args['max_seq_len']}",
            f"--batch_size={args['batch_size']}", "--gradient_accumulation_steps=1",
            f"--max_steps={args['rows'] // args['batch_size']}", f"--learning_rate={args['learning_rate']}",
            "--lr_scheduler=cosine", "--warmup_steps=0", "--weight_decay=0.0", "--beta1=0.9", "--beta2=0.95",
            "--grad_clip=1.0", f"--group_by_length={args['group_by_length']}", f"--seed={spec['seed']}",
            "--dropout=0.0", f"--device={args['device']}", f"--dtype={args['dtype']}", "--log_interval=1",
            "--eval_interval=0", "--eval_exact_match=0", "--checkpoint_interval=0", "--keep_checkpoints=1",
            f"--output_dir={output_dir}", f"--cache_dir={cache_dir}"]


def peers_command(python, worker, spec_path):
    """This file run as one of its workers in the peers' Python."""
    return [str(python), str(Path(__file__).resolve()), f"--worker={worker}", str(spec_path)]


def write_spec(spec, path):
    """A worker's settings as a JSON file: the peers' side cannot import the project's option parser."""
    Path(path).write_text(json.dumps(spec))
    return path


def verify_positions(project_set, trl_rows_file, limit=10, trailing_ok=False):
    """Row by row: the same token ids and the same trained positions (a label at position t trains
    token t; the first token is never a target). With trailing_ok (chat templates), TRL's row may go on
    after the project's sample ends (what the template writes after the end-of-turn token); those extra
    positions are counted in trl_extra_trained_positions. Returns the counts and the first differing rows."""
    import numpy as np
    differing, rows, extra_trained = [], 0, 0
    with open(trl_rows_file) as f:
        for i, line in enumerate(f):
            rows += 1
            trl_ids, trl_labels = json.loads(line)
            if i >= len(project_set):
                differing.append({"row": i, "why": "missing in the project's data"})
                continue
            tokens, mask = project_set.tokens_and_mask(i)
            if trailing_ok and len(trl_ids) > len(tokens):
                extra_trained += sum(label != -100 for label in trl_labels[len(tokens):])
                trl_ids, trl_labels = trl_ids[:len(tokens)], trl_labels[:len(tokens)]
            same_ids = tokens.tolist() == trl_ids
            same_mask = same_ids and np.array_equal(mask[1:] == 1, np.asarray(trl_labels[1:]) != -100)
            if not same_mask:
                differing.append({"row": i, "why": "token ids differ" if not same_ids else "trained positions differ"})
    extra = max(0, len(project_set) - rows)
    return {"rows_compared": rows, "project_rows": len(project_set), "identical_rows": rows - len(differing),
            "differing_rows": len(differing) + extra, "first_differences": differing[:limit],
            "trl_extra_trained_positions": extra_trained}


def trained_positions(project_set, rows):
    """Labelled positions of the first `rows` rows: what one epoch over them trains, in both systems."""
    return int(sum(int((project_set.tokens_and_mask(i)[1][1:] == 1).sum()) for i in range(rows)))


def eval_loss(model_dir, eval_set, device, batch_size=32):
    """The common evaluator: one model directory (either system's) loaded by transformers'
    AutoModelForCausalLM; token-weighted cross-entropy over the eval rows' trained positions."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(eval_set), batch_size):
            pairs = [eval_set[i] for i in range(start, min(start + batch_size, len(eval_set)))]
            T = max(len(x) for x, _ in pairs)
            idx = torch.full((len(pairs), T), eval_set.eot_token, dtype=torch.long)
            attention = torch.zeros((len(pairs), T), dtype=torch.long)  # right padding: changes no real position
            labels = torch.full((len(pairs), T), -100, dtype=torch.long)
            for r, (x, y) in enumerate(pairs):
                idx[r, :len(x)], labels[r, :len(y)] = torch.from_numpy(x), torch.from_numpy(y)
                attention[r, :len(x)] = 1
            logits = model(idx.to(device), attention_mask=attention.to(device)).logits.float()
            total += F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(), ignore_index=-100,
                                     reduction="sum").item()
            count += int((labels != -100).sum())
    return total / count


def summary(values):
    """Min and median of the runs (None where a figure does not apply, such as GPU memory on a CPU)."""
    values = [v for v in values if v is not None]
    return {"min": min(values), "median": statistics.median(values), "runs": values} if values else None


def resolve(args):
    """Fills in auto choices and checks the options that depend on each other."""
    import torch
    gpu = args["device"] == "cuda" or args["device"] == "auto" and torch.cuda.is_available()
    args["device"] = "cuda" if gpu else "cpu"
    args["dtype"] = args["dtype"] if args["dtype"] != "auto" else ("bfloat16" if gpu else "float32")
    if args["rows"] % args["batch_size"]:
        raise ValueError(f"--rows={args['rows']} must be a multiple of --batch_size={args['batch_size']}, so that "
                         "both systems train every row exactly once")
    if args["data_path"] and not args["eval_data_path"]:
        raise ValueError("--data_path needs --eval_data_path: the eval loss is taken on held-out rows")
    if args["init_from"]:
        if not os.path.exists(args["init_from"]):
            raise ValueError(f"--init_from={args['init_from']} does not exist")
        args["template"] = "model"  # a real model brings its chat template: both systems render with it
    args["peers_python"] = args["peers_python"] or default_peers_python()
    return args


def tokenizer_name(args):
    """The project's --tokenizer: GPT-2's for the GPT-2 init, else --init_from's own."""
    return args["init_from"] or "gpt2"


def default_peers_python():
    """.venv-peers' Python where the setup line made it, else this Python (a GPU machine's, say)."""
    return str(PEERS_PYTHON if PEERS_PYTHON.exists() else Path(sys.executable))


def peers_installed(python, env=None):
    """Whether python finds TRL and its dependencies, without importing them (a fraction of a second)."""
    probe = "import importlib.util, sys; sys.exit(any(importlib.util.find_spec(m) is None for m in sys.argv[1:]))"
    return Path(python).exists() and subprocess.run([python, "-c", probe, "trl", "accelerate", "datasets"],
                                                    env=env, capture_output=True).returncode == 0


def check_peers(python):
    """The peers' versions from their own Python; raises PeersMissing with the setup line where TRL is absent."""
    if not Path(python).exists():
        raise PeersMissing(f"{python} does not exist; set up the peers with: {SETUP_LINE}")
    probe = subprocess.run([python, str(Path(__file__).resolve()), "--worker=trl_check", "-"], cwd=ROOT,
                           capture_output=True, text=True)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise PeersMissing(f"{python} cannot import TRL and its dependencies ({last}); set up the peers with: "
                           f"{SETUP_LINE}")
    return json.loads(probe.stdout.strip().splitlines()[-1])


def check_project(args, workdir):
    """Project-side wiring without training: the data files and their format, the tokenizer (GPT-2's, or
    --init_from's with its chat template), the evaluator's transformers, and train_sft.py's command line
    as this benchmark builds it."""
    import transformers  # noqa: F401  (the common evaluator)

    import data
    from options import parse_options
    from tokenizer import ChatTemplate, get_tokenizer
    train_file, eval_file, rows_file = write_data(args, workdir)
    lines, wanted = [], "prompt_completion" if args["init_from"] else "alpaca"
    for path in (train_file, eval_file):
        found = {}
        first = next(data.iter_examples(path, found=found))
        if found["format"] != wanted:
            raise ValueError(f"{path} is in {found['format']} format; this benchmark needs "
                             + ("chat rows (prompt/completion message lists)" if args["init_from"]
                                else "Alpaca rows (instruction, input, output)"))
        lines.append(f"{path}: {wanted}, first row line {first[0]}")
    tokenizer = tokenizer_name(args)
    enc = get_tokenizer(tokenizer)
    if args["init_from"]:
        ChatTemplate(enc)  # the model's own template must exist
    spec = {"rows_train_file": rows_file, "eval_file": eval_file, "init_dir": str(workdir / "init"),
            "tokenizer": tokenizer, "seed": args["seed"]}
    command = project_command(args, spec, workdir / "out", workdir / "cache")
    parse_options(command[2:])
    lines.append("train_sft.py " + " ".join(command[2:]))
    return lines


def dry_run(args):
    """Checks both sides' wiring; returns the exit status (0 ok, 1 the peers are not set up)."""
    with tempfile.TemporaryDirectory() as workdir:
        for line in check_project(args, Path(workdir)):
            print(f"project: {line}")
    try:
        versions = check_peers(args["peers_python"])
    except PeersMissing as e:
        print(f"peers: {e}")
        return 1
    print(f"peers: {args['peers_python']}: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print("dry run: wiring ok")
    return 0


def prepare_pair(args, spec, workdir, k):
    """One data preparation per system, each in its own process with a fresh cache; the project's first."""
    project_spec = {**spec, "cache_dir": str(workdir / f"prep{k}" / "project_cache")}
    project = run_measured([sys.executable, str(Path(__file__).resolve()), "--worker=project_prep",
                            write_spec(project_spec, workdir / f"prep{k}_project.json")])
    env = dict(os.environ, HF_DATASETS_CACHE=str(workdir / f"prep{k}" / "hf_datasets"))
    trl_spec = {**spec, "output_dir": str(workdir / f"prep{k}" / "trl_out"),
                "rows_file": str(workdir / f"prep{k}_trl_rows.jsonl")}
    trl = run_measured(peers_command(args["peers_python"], "trl_prep", write_spec(trl_spec, workdir / f"prep{k}_trl.json")),
                       env=env)
    rows = []
    for result in (project, trl):
        report = worker_report(result)
        rows.append({**report, "added_rss_mib": report["peak_rss_mib"] - report["rss_before_mib"]})
    return (*rows, project_spec, trl_spec)


def train_pair(args, spec, workdir, k, trained_tokens):
    """One training run per system (project first), each measured from outside; returns both rows. Pair k
    seeds both systems with --seed + k: the same rows in another batch order, so that the spread of each
    system's eval loss over the pairs measures how much the batch order alone moves it."""
    out = workdir / f"train{k}"
    spec = {**spec, "seed": spec["seed"] + k}
    project = run_measured(project_command(args, spec, out / "project", out / "project_cache"))
    env = dict(os.environ, HF_DATASETS_CACHE=str(out / "hf_datasets"))
    trl_spec = {**spec, "output_dir": str(out / "trl"), "train_file": spec["rows_train_file"]}
    trl = run_measured(peers_command(args["peers_python"], "trl_train", write_spec(trl_spec, out / "trl.json")), env=env)
    rows = {}
    for name, result, start, step, model_dir in (("project", project, PROJECT_START, PROJECT_STEP, out / "project" / "hf"),
                                                 ("trl", trl, TRL_START, TRL_STEP, out / "trl")):
        span = training_span(result, start, step, gpu=args["device"] == "cuda")
        if span["steps"] != args["rows"] // args["batch_size"]:
            raise RuntimeError(f"{name} printed {span['steps']} step lines, not {args['rows'] // args['batch_size']}")
        rows[name] = {**span, "trained_tokens_per_s": trained_tokens / span["wall_s"],
                      "trained_tokens_per_cpu_s": trained_tokens / span["cpu_s"] if span["cpu_s"] else None,
                      "process_wall_s": result["wall_s"], "process_cpu_s": result["cpu_s"],
                      "peak_rss_mib": result["peak_rss_mib"], "model_dir": str(model_dir)}
    return rows


def print_table(record):
    print(f"\n{record['machine']['cpu']} ({record['machine']['cores']} cores), load {record['load_average_before']} "
          f"-> {record['load_average_after']}; {record['verification']['identical_rows']:,} of "
          f"{record['verification']['rows_compared']:,} rows identical")
    print("figure (min / median over pairs)          | project          | TRL              | project/TRL (median)")
    for label, key in (("data prep wall s", ("prep", "wall_s")), ("data prep CPU s", ("prep", "cpu_s")),
                       ("data prep peak RSS MiB", ("prep", "peak_rss_mib")),
                       ("data prep added RSS MiB", ("prep", "added_rss_mib")),
                       ("trained tokens/s", ("train", "trained_tokens_per_s")),
                       ("trained tokens/CPU-s", ("train", "trained_tokens_per_cpu_s")),
                       ("step s", ("train", "step_s_median")), ("train peak RSS MiB", ("train", "peak_rss_mib")),
                       ("peak GPU GiB", ("train", "peak_gpu_gib")), ("eval loss", ("eval", "loss"))):
        cells = [record["systems"][s][key[0]].get(key[1]) for s in ("project", "trl")]
        if None in cells:
            continue
        ratio = cells[0]["median"] / cells[1]["median"]
        print(f"{label:<42}| " + " | ".join(f"{c['min']:>7.4g} / {c['median']:<7.4g}" for c in cells) + f" | {ratio:.3f}")


def run_benchmark(args):
    import torch

    import data
    from bench.common import load_average, provenance
    from tokenizer import EOT, split_template
    load_before = load_average()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        versions = check_peers(args["peers_python"])
        train_file, eval_file, rows_file = write_data(args, workdir)
        chat = bool(args["init_from"])
        init_dir, tokenizer_dir, n_params = (real_model_init if chat else save_init)(args, workdir)
        prompt_part, response_part = split_template(args["template"]) if not chat else (None, None)
        spec = {"train_file": train_file, "eval_file": eval_file, "rows_train_file": rows_file, "init_dir": init_dir,
                "tokenizer_dir": tokenizer_dir, "template": args["template"], "prompt_part": prompt_part,
                "response_part": response_part, "alpaca_join": data.ALPACA_JOIN, "eot": EOT, "chat": chat,
                "tokenizer": tokenizer_name(args),
                **{k: args[k] for k in ("max_seq_len", "batch_size", "learning_rate", "seed", "device", "dtype",
                                        "group_by_length", "rows")}}
        prep = {"project": [], "trl": []}
        train = {"project": [], "trl": []}
        evals = {"project": [], "trl": []}
        verification = project_set = eval_set = trained_tokens = None
        for k in range(args["pairs"]):
            print(f"pair {k + 1}/{args['pairs']}: data preparation (project, TRL) ...", flush=True)
            project_prep_row, trl_prep_row, project_spec, trl_spec = prepare_pair(args, spec, workdir, k)
            prep["project"].append(project_prep_row)
            prep["trl"].append(trl_prep_row)
            if verification is None:  # every row of the file, before anything is trained
                project_set, eval_set = data.prepare_data(
                    train_file, spec["tokenizer"], args["max_seq_len"], eval_data_path=eval_file, template=args["template"],
                    seed=args["seed"], cache_dir=project_spec["cache_dir"], log=lambda *a: None)
                verification = verify_positions(project_set, trl_spec["rows_file"], trailing_ok=chat)
                print(f"verified: {verification['identical_rows']:,} of {verification['rows_compared']:,} rows "
                      f"identical in token ids and trained positions", flush=True)
                if verification["differing_rows"]:
                    raise RuntimeError(f"the systems would train different positions: {verification}")
                trained_tokens = trained_positions(project_set, args["rows"])
            print(f"pair {k + 1}/{args['pairs']}: training (project, TRL) ...", flush=True)
            rows = train_pair(args, spec, workdir, k, trained_tokens)
            for name, row in rows.items():
                row["eval_loss"] = eval_loss(row.pop("model_dir"), eval_set, args["device"])
                train[name].append(row)
                evals[name].append(row["eval_loss"])
                print(f"  {name}: {row['trained_tokens_per_s']:,.0f} trained tokens/s, step {row['step_s_median']:.3f} s, "
                      f"peak RSS {row['peak_rss_mib']:,.0f} MiB, eval loss {row['eval_loss']:.4f}", flush=True)
    systems = {}
    for name in ("project", "trl"):
        systems[name] = {
            "prep": {key: summary([r[key] for r in prep[name]]) for key in ("wall_s", "cpu_s", "peak_rss_mib",
                                                                          "rss_before_mib", "added_rss_mib")},
            "train": {key: summary([r[key] for r in train[name]]) for key in (
                "wall_s", "cpu_s", "trained_tokens_per_s", "trained_tokens_per_cpu_s", "step_s_median", "step_s_min",
                "peak_rss_mib", "peak_gpu_gib", "process_wall_s", "process_cpu_s")},
            "eval": {"loss": summary(evals[name]), "batch_order_spread": max(evals[name]) - min(evals[name])},
            "prep_runs": prep[name], "train_runs": train[name]}
    ratios = {}
    for section, key in (("prep", "wall_s"), ("prep", "cpu_s"), ("prep", "peak_rss_mib"), ("prep", "added_rss_mib"),
                         ("train", "trained_tokens_per_s"), ("train", "trained_tokens_per_cpu_s"),
                         ("train", "step_s_median"), ("train", "peak_rss_mib"), ("train", "peak_gpu_gib")):
        a, b = systems["project"][section][key], systems["trl"][section][key]
        if a and b:
            ratios[f"{section}.{key}"] = {"median": a["median"] / b["median"], "min": a["min"] / b["min"]}
    device = torch.cuda.get_device_name() if args["device"] == "cuda" else "cpu"
    record = {"device": device, **provenance(["bench/compare_trl.py", "train_sft.py"], load_before,
                                             packages=("transformers",)),
              "peers": versions, "options": args,
              "model": ({"init_from": args["init_from"], "parameters": n_params} if chat else
                        {"n_layer": args["n_layer"], "n_head": args["n_head"], "n_embd": args["n_embd"],
                         "vocab_size": 50257, "parameters": n_params}),
              "data": {"train_rows_prepared": verification["rows_compared"], "train_rows_trained": args["rows"],
                       "eval_rows": len(eval_set), "trained_tokens_per_run": trained_tokens,
                       "demo": not args["data_path"]},
              "verification": verification, "systems": systems, "ratios_project_over_trl": ratios}
    print_table(record)
    name = device.replace(" ", "_").replace("/", "_")
    if chat:  # beside the GPT-2 init's file, named by the model
        name = f"{Path(args['init_from']).stem}_{name}"
    path = ROOT / "bench" / "results" / f"trl_{name}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


def main(argv):
    if argv[:1] and argv[0].startswith("--worker="):  # a child process of this benchmark
        worker = argv[0].split("=", 1)[1]
        WORKERS[worker](json.loads(Path(argv[1]).read_text()) if argv[1] != "-" else {})
        return 0
    sys.path.insert(0, str(ROOT))
    from options import OptionError, parse_options
    try:
        args, _ = parse_options(["--dry_run" if a == "--dry-run" else a for a in argv], OPTIONS, CHOICES, RANGES, __doc__)
        args = resolve(args)
    except (OptionError, ValueError) as e:
        print(f"compare_trl.py: error: {e}", file=sys.stderr)
        return 2
    if args["dry_run"]:
        return dry_run(args)
    try:
        run_benchmark(args)
    except PeersMissing as e:
        print(f"compare_trl.py: error: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
