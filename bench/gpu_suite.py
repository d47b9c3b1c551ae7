"""The project's GPU figures from one command in under nine minutes on one GPU, the comparisons with
other systems' engines and trainers from a second.

    bash bench/gpu_suite.sh [--dry-run] [--only=STEP,...] [--skip=STEP,...] [--time_limit=540]
                            [--out=DIR] [--STEP_args="..."]

Steps, in this order, each in its own process with its own time limit; a failing step does not
stop the next. Estimates are for one H200 with cold caches (a fresh machine), made from the H100
runs in bench/results/ and the code; every run records the measured seconds in its summary.

  step     code  estimate  limit  what
  wheels      1      10 s   60 s  install the carried wheels in .whl/ (`pip wheel` of
                                  DeepSpeed, Liger-Kernel, Cut Cross-Entropy) into /tmp/site, then
                                  PYTHONPATH=/tmp/site and TORCH_CUDA_ARCH_LIST=9.0 for the rest
  tests       4      30 s  120 s  python -m pytest -m gpu: imports (~10 s), the Triton kernels
                                  compiled for three dtypes, four tests of under a second
  ce          8     135 s  240 s  bench/bench_ce.py: 10 shapes x 6 implementations; do_bench takes at
                                  least 8 calls (up to ~1.5 s for the eager peers at 64k tokens), and
                                  torch.compile compiles every shape anew (~20 s the first, ~4 s after);
                                  the last shape, Qwen2.5's 151,936-word head, ~15 s
  train      16     200 s  300 s  bench/bench_train.py: the compiled loop (~40 s to compile GPT-2 with
                                  its loss) and 3 trainer processes (imports, data, compile, 13
                                  steps, final eval and a 1.5 GB checkpoint: ~60 s the first, less
                                  once inductor's cache holds the model's graph; DeepSpeed ~60 s)
  llama     512     120 s  240 s  bench/bench_train.py --shape=qwen2_5_0_5b --rows=triton: the
                                  trainer at Qwen2.5-0.5B's shape (494M parameters; ~10 s to build
                                  and write its weights, imports, ~60 s to compile 24 layers, 13
                                  steps, final eval, a 6 GB checkpoint and the export); its peer
                                  with --llama_args="--rows=peer,triton" (~70 s more)
  profile   128      25 s   60 s  bench/profile_ce.py: a few GEMMs and 4 kernel variants
  total             520 s         --time_limit (default 540 s) caps the whole: a step gets at most
                                  what is left, and none starts with under 20 s left; the last step
                                  gets what the others leave
Extra steps, run only when --only names them (with the ones above they would not fit the limit):
  engines    32      60 s  120 s  bench/compare_engines.py, where it exists
  sparse     64      45 s   90 s  bench/bench_sparse.py, where it exists (DeepSpeed's FusedAdam
                                  builds just in time, ~40 s on an H100 machine)
  trl       256     150 s  240 s  bench/compare_trl.py: TRL's SFTTrainer against train_sft.py, 3
                                  alternating pairs of data preparation (~15 s for TRL) and 20 steps
                                  of a 16M GPT-2 (start-up dominates); skipped where TRL does not
                                  import (carry trl, accelerate and datasets wheels in .whl/)
  total             255 s         bash bench/gpu_suite.sh --only=engines,sparse,trl

--only / --skip take step names; --STEP_args passes options to a step's script (for example
--train_args="--deepspeed_stages=0,1,2,3", each DeepSpeed stage at ~60 s). Every JSON goes to
bench/results/ with the device in its name; the summary (each step's status, seconds and files,
the anchor and training figures against their targets) is printed last and written to
bench/results/gpu_suite_<device>.json. Each step's output goes to the console and to
out/gpu_suite/<step>.log. With --out=DIR (default: $OUT where set) the files this run wrote and
the logs are also packed into DIR/gpu_suite.tar.gz, paths relative to the repository root.

--dry-run (any machine, no GPU needed, nothing written): lists the steps that would run with
their budgets and checks the wiring: every script exists and imports, each peer's module path
loads where its package is installed (elsewhere: "not installed here", and where .whl/ carries
the package, the module must be inside the wheel), the GPT-2 vocabulary is there to carry, and
whether train_sft.py has the --engine option for the DeepSpeed rows.

Exit status: 0 when every step that ran passed; 2 for a bad option or no GPU (nothing runs);
otherwise the sum of the codes of the failed steps (a step stopped at its limit has failed, a
skipped one has not; in a dry run, the steps whose wiring is broken). An exit status holds 8 bits:
a sum of 256 or more (trl or llama failed) exits 255, which no sum of codes is (none is 2), and
the summary holds the sum itself.
"""
import importlib
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import load_average, provenance  # noqa: E402
RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / "out" / "gpu_suite"
WHEELS = ROOT / ".whl"
SITE = "/tmp/site"
VOCAB = ROOT / ".cache" / "r50k_base.tiktoken"
MIN_START_S = 20
CE_TARGET_MS, CE_TARGET_MIB, TRAIN_TARGET = 4.0, 256.0, 1.15
QWEN_VOCAB = 151936  # bench_ce's row at Qwen2.5's vocabulary


@dataclass
class Step:
    name: str
    code: int        # its bit in the exit status
    script: str      # the file it runs, relative to the root ("" for the install)
    estimate_s: int
    limit_s: int
    optional: bool = False  # skipped, not failed, where the script does not exist (yet)
    extra: bool = False     # runs only when --only names it
    args: tuple = ()        # the script's options, before the run's own --STEP_args


STEPS = [
    Step("wheels", 1, "", 10, 60),
    Step("tests", 4, "tests", 30, 120),
    Step("ce", 8, "bench/bench_ce.py", 135, 240),
    Step("train", 16, "bench/bench_train.py", 200, 300),
    Step("llama", 512, "bench/bench_train.py", 120, 240,
         args=("--shape=qwen2_5_0_5b", "--rows=triton", "--deepspeed_stages=")),
    Step("profile", 128, "bench/profile_ce.py", 25, 60),
    Step("engines", 32, "bench/compare_engines.py", 60, 120, optional=True, extra=True),
    Step("sparse", 64, "bench/bench_sparse.py", 45, 90, optional=True, extra=True),
    Step("trl", 256, "bench/compare_trl.py", 150, 240, extra=True),
]


class OptionError(ValueError):
    """A bad command-line option: the message names it."""


def parse_options(argv):
    """--dry-run, --only, --skip, --time_limit, --out and --STEP_args; returns a dict."""
    names = [step.name for step in STEPS]
    opts = {"dry_run": False, "steps": [step.name for step in STEPS if not step.extra], "time_limit": 540.0,
            "out": os.environ.get("OUT", ""), "args": {name: [] for name in names}}
    skip = []
    for arg in argv:
        key, has_value, value = arg.partition("=")
        if arg == "--dry-run":
            opts["dry_run"] = True
        elif key in ("--only", "--skip") and has_value:
            chosen = [name for name in value.split(",") if name]
            unknown = [name for name in chosen if name not in names]
            if unknown:
                raise OptionError(f"{key}: unknown step {unknown[0]!r}; the steps are {', '.join(names)}")
            if key == "--only":
                opts["steps"] = [name for name in names if name in chosen]
            else:
                skip += chosen
        elif key == "--time_limit" and has_value:
            try:
                opts["time_limit"] = float(value)
            except ValueError:
                raise OptionError(f"--time_limit must be a number of seconds, got {value!r}") from None
        elif key == "--out" and has_value:
            opts["out"] = value
        elif key.startswith("--") and key.endswith("_args") and key[2:-5] in names and has_value:
            opts["args"][key[2:-5]] = shlex.split(value)
        else:
            raise OptionError(f"unknown option {arg!r} (the steps are {', '.join(names)}; see bench/gpu_suite.py)")
    opts["steps"] = [name for name in opts["steps"] if name not in skip]
    return opts


def command(step, args):
    """The argv of a step."""
    if step.name == "wheels":
        return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", SITE, *map(str, sorted(WHEELS.glob("*.whl"))), *args]
    if step.name == "tests":
        return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "tests", *args]
    return [sys.executable, step.script, *step.args, *args]


def device_name():
    """The GPU's name as the benchmarks write it, or "" without one; asked in a child process so that
    this one holds no CUDA context while the steps measure."""
    probe = "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else '')"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout.strip()


def file_name(device):
    return device.replace(" ", "_").replace("/", "_")


def snapshot():
    """path -> (mtime, size) of every file in bench/results/: what a step wrote is what changed."""
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in RESULTS.glob("*") if p.is_file()}


def run_step(step, argv, timeout, env):
    """Runs one step in its own process group, its output to the console and its log; returns
    (status, seconds). At the limit the whole group is killed (torchrun's children too)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    print(f"\n=== {step.name}: {shlex.join(argv[1:] if argv[0] == sys.executable else argv)} "
          f"(limit {timeout:.0f} s)", flush=True)
    start = time.monotonic()
    with open(LOGS / f"{step.name}.log", "w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace")

        def tee():
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            sys.stdout.flush()

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            status = f"timeout (killed at {timeout:.0f} s)"
        reader.join(timeout=10)
    return status, time.monotonic() - start


def run(opts, device, started):
    """Runs the chosen steps within opts["time_limit"] seconds of `started` (time.monotonic());
    returns the summary dict."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    deadline = started + opts["time_limit"]
    load_before = load_average()
    rows = []
    for step in STEPS:
        row = {"step": step.name, "estimate_s": step.estimate_s, "limit_s": step.limit_s, "seconds": 0.0,
               "outputs": []}
        rows.append(row)
        left = deadline - time.monotonic()
        if step.name not in opts["steps"]:
            row["status"] = "skipped (not chosen)"
        elif step.name == "wheels" and not list(WHEELS.glob("*.whl")):
            row["status"] = "skipped (no .whl/: the peers from packages will be missing)"
        elif step.optional and not (ROOT / step.script).exists():
            row["status"] = f"skipped ({step.script} does not exist)"
        elif step.name == "trl" and not trl_installed(env):
            row["status"] = "skipped (TRL does not import here: carry its wheels, see bench/requirements-peers.txt)"
        elif left < MIN_START_S:
            row["status"] = f"skipped (the suite's time limit: {max(left, 0):.0f} s left)"
        else:
            before = snapshot()
            row["status"], row["seconds"] = run_step(step, command(step, opts["args"][step.name]),
                                                     min(step.limit_s, left), env)
            after = snapshot()
            row["outputs"] = sorted(str(p.relative_to(ROOT)) for p in after if before.get(p) != after[p])
            if step.name == "wheels" and row["status"] == "ok":
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [SITE, env.get("PYTHONPATH")]))
                env["TORCH_CUDA_ARCH_LIST"] = "9.0"  # DeepSpeed cannot parse "9.0a"
        print(f"=== {step.name}: {row['status']}, {row['seconds']:.0f} s", flush=True)
    scripts = ["bench/gpu_suite.py"] + [step.script for step in STEPS if step.script.endswith(".py")]
    return {"device": device, **provenance([path for path in scripts if (ROOT / path).exists()], load_before),
            "time_limit_s": opts["time_limit"], "total_s": sum(row["seconds"] for row in rows), "steps": rows, "figures": figures(device), "exit_status": exit_status(rows)}


def merge_earlier(summary, earlier):
    """Steps not chosen in this run keep their row from this device's earlier summary (marked with its
    date), so a rerun of the failed steps completes the earlier run's record instead of replacing it."""
    before = {row["step"]: row for row in (earlier or {}).get("steps", [])}
    for i, row in enumerate(summary["steps"]):
        old = before.get(row["step"])
        if row["status"] == "skipped (not chosen)" and old and old["status"] != "skipped (not chosen)":
            summary["steps"][i] = {**old, "earlier_run": old.get("earlier_run", earlier["date"][:10])}


def trl_installed(env=None):
    """Whether bench/compare_trl.py's peers (TRL and its dependencies) import in the Python it will use."""
    from bench import compare_trl
    return compare_trl.peers_installed(compare_trl.default_peers_python(), env)


def exit_status(rows):
    """The sum of the failed steps' codes (ok and skipped steps add nothing)."""
    codes = {step.name: step.code for step in STEPS}
    return sum(codes[row["step"]] for row in rows if not row["status"].startswith(("ok", "skipped")))


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ce_rows_at(ce, vocab=None, tokens=16384, masked_share=0.5):
    """implementation -> its figures in a bench_ce file at one shape; vocab None is the file's own (GPT-2's),
    which is also that of rows that name none."""
    own = ce.get("vocab")
    return {r["implementation"]: {k: r.get(k) for k in ("ms", "peak_extra_mib", "note") if r.get(k) is not None}
            for r in ce["results"] if (r["tokens"], r["masked_share"], r.get("vocab", own)) ==
            (tokens, masked_share, own if vocab is None else vocab)}


def figures(device):
    """The anchor row of bench_ce (and its row at Qwen2.5's vocabulary) and the training rows, from this
    device's files, against the targets."""
    out = {}
    ce = read_json(RESULTS / f"ce_{file_name(device)}.json")
    if ce:
        out["ce_anchor"] = ce_rows_at(ce)
        ours = out["ce_anchor"].get("ours (triton)", {})
        if ours.get("ms") is not None:
            out["ce_target_met"] = ours["ms"] <= CE_TARGET_MS and ours["peak_extra_mib"] <= CE_TARGET_MIB
        if qwen_rows := ce_rows_at(ce, QWEN_VOCAB):
            out["ce_qwen_vocab"] = qwen_rows
    train = read_json(RESULTS / f"train_{file_name(device)}.json")
    if train:
        out["train"] = train["rows"]
        ratio = train["rows"].get("train_sft --kernels=triton", {}).get("vs_peer")
        if ratio is not None:
            out["train_target_met"] = ratio >= TRAIN_TARGET
    llama = read_json(RESULTS / f"train_qwen2_5_0_5b_{file_name(device)}.json")
    if llama:
        out["llama"] = llama["rows"]
    return out


def print_ce_rows(title, rows):
    ours = rows.get("ours (triton)", {}).get("ms")
    print(f"\n{title}:")
    for name, r in rows.items():
        if r.get("ms") is None:
            print(f"  {name:<26} {r.get('note', 'no figure')}")
            continue
        ratio = f"{r['ms'] / ours:6.2f}x ours" if ours else ""
        print(f"  {name:<26} {r['ms']:8.2f} ms {r['peak_extra_mib']:8.0f} MiB  {ratio}")


def print_train_rows(title, rows):
    print(f"\n{title}:")
    for name, r in rows.items():
        if "tokens_per_s" not in r:
            print(f"  {name:<46} {r.get('error', 'no figure')}")
            continue
        ratio = f"{r['vs_peer']:5.2f}x peer" if "vs_peer" in r else ""
        print(f"  {name:<46} {r['tokens_per_s']:>9,.0f} tok/s {r['mfu']:6.1%} MFU {r['peak_gib']:6.2f} GiB  {ratio}")


def print_summary(summary):
    """The table printed last: each step, then the figures against their targets."""
    print(f"\n{'step':<8} {'status':<44} {'seconds':>7} {'limit':>6}  files written")
    for row in summary["steps"]:
        status = f"{row['status']} (run of {row['earlier_run']})" if "earlier_run" in row else row["status"]
        print(f"{row['step']:<8} {status[:44]:<44} {row['seconds']:>7.0f} {row['limit_s']:>6}  "
              f"{', '.join(Path(p).name for p in row['outputs'])}")
    print(f"{'total':<8} {'(this run)':<44} {summary['total_s']:>7.0f} {summary['time_limit_s']:>6.0f}")
    figs = summary["figures"]
    if "ce_anchor" in figs:
        print_ce_rows(f"bench_ce anchor, 16,384 tokens, half masked ({summary['device']})", figs["ce_anchor"])
        if "ce_target_met" in figs:
            print(f"  target ours <= {CE_TARGET_MS} ms and <= {CE_TARGET_MIB:.0f} MiB: "
                  f"{'met' if figs['ce_target_met'] else 'MISSED'}")
    if "ce_qwen_vocab" in figs:
        print_ce_rows(f"bench_ce at Qwen2.5's vocabulary {QWEN_VOCAB:,}, hidden 896, 16,384 tokens, half masked",
                      figs["ce_qwen_vocab"])
    if "train" in figs:
        print_train_rows("bench_train, GPT-2 124M shape, 16 x 1024, bf16, half masked", figs["train"])
        if "train_target_met" in figs:
            print(f"  target train_sft --kernels=triton >= {TRAIN_TARGET}x the compiled loop: "
                  f"{'met' if figs['train_target_met'] else 'MISSED'}")
    if "llama" in figs:
        print_train_rows("bench_train, Qwen2.5-0.5B shape, 16 x 1024, bf16, half masked", figs["llama"])
    failed = [row["step"] for row in summary["steps"]
              if not row["status"].startswith(("ok", "skipped")) and "earlier_run" not in row]
    print(f"\nexit status {summary['exit_status']} (failed: {', '.join(failed) or 'none'})")


def pack(summary_path, summary, out_dir):
    """DIR/gpu_suite.tar.gz: every file this run wrote under bench/results/, the summary and the logs."""
    files = {summary_path} | {ROOT / p for row in summary["steps"] for p in row["outputs"] if (ROOT / p).exists()}
    files |= set(LOGS.glob("*.log"))
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    archive = Path(out_dir) / "gpu_suite.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(files):
            tar.add(path, arcname=str(path.relative_to(ROOT)))
    print(f"packed {len(files)} files into {archive}")


# ----------------------------------------------------------------------------- dry run

def wheel_holding(module):
    """The carried wheel whose distribution provides module's top package, or None; raises where that
    wheel lacks the module itself (a wrong path would only show on the GPU machine)."""
    top, *rest = module.split(".")
    for wheel in sorted(WHEELS.glob("*.whl")):
        names = set(zipfile.ZipFile(wheel).namelist())
        if f"{top}/__init__.py" in names:
            path = "/".join([top, *rest])
            if not {f"{path}.py", f"{path}/__init__.py"} & names:
                raise ImportError(f"{wheel.name} has no module {module}")
            return wheel.name
    return None


def check_peer(module, attribute):
    """"ok", or "not installed here" (+ the wheel that carries it); raises where the path is wrong."""
    from bench.bench_ce import load_peer
    if load_peer(module, attribute) is not None:
        return "ok"
    carried = wheel_holding(module)
    return f"not installed here; carried in .whl/{carried}" if carried else "not installed here, not in .whl/"


def check_bench_train(module, argv):
    """Lines for a bench_train step run with argv: its options valid, the vocabulary its data needs,
    whether its DeepSpeed rows can run; raises where they cannot."""
    from options import parse_options
    shape, rows, stages = module.check_args(parse_options(argv, module.OPTIONS, {}, {})[0])
    if not VOCAB.exists():
        raise FileNotFoundError(f"{VOCAB.relative_to(ROOT)} is missing (bash setup.sh fetches it); "
                                "the GPU machine cannot download it, so it must be carried")
    lines = [f"shape {shape} ({module.SHAPES[shape][0]}), rows {', '.join(rows) or 'none'}",
             f"{VOCAB.relative_to(ROOT)} present (carry it to the GPU machine)"]
    ds_rows, why_not = module.deepspeed_rows(stages)
    if why_not and "not installed" in why_not:
        carried = wheel_holding("deepspeed")
        why_not += f"; carried in .whl/{carried}" if carried else "; not in .whl/ either"
    if stages:
        lines.append(f"DeepSpeed rows: {', '.join(ds_rows) if ds_rows else 'skipped here: ' + why_not}")
    return lines


def check_step(step, args=()):
    """Lines saying what the step will run (with the run's own args) and with which peers; raises where
    its wiring is broken."""
    if step.name == "wheels":
        wheels = sorted("-".join(w.name.split("-")[:2]) for w in WHEELS.glob("*.whl"))  # name-version
        return [f"{len(wheels)} wheels in .whl/: {', '.join(wheels)}" if wheels else
                "no .whl/: make it with `pip wheel` where there is network and carry it, or the package peers "
                "are missing"]
    if step.optional and not (ROOT / step.script).exists():
        return [f"{step.script} does not exist yet: the step will be skipped"]
    if step.name == "tests":
        if importlib.util.find_spec("pytest") is None:
            raise ImportError("pytest is not installed")
        marked = sum((ROOT / "tests" / f.name).read_text().count("@pytest.mark.gpu")
                     for f in (ROOT / "tests").glob("test_*.py"))
        if not marked:
            raise RuntimeError("no test in tests/ is marked gpu")
        return [f"{marked} test functions marked gpu in tests/"]
    module = importlib.import_module(step.script[:-3].replace("/", "."))
    lines = [f"{step.script} imports"]
    if step.name == "ce":
        lines += [f"peer {name}: {module_path}.{attribute}: {check_peer(module_path, attribute)}"
                  for name, (_, module_path, attribute, _) in module.PACKAGE_PEERS.items()]
    if step.script == "bench/bench_train.py":
        lines += check_bench_train(module, [*step.args, *args])
    if step.name == "trl":
        python = module.default_peers_python()
        lines.append(f"peers (TRL, accelerate, datasets) in {python}: "
                     f"{'installed' if trl_installed() else 'not installed here; the step will be skipped'}")
    return lines


def dry_run(opts):
    """Lists the steps and checks their wiring; returns the exit status."""
    print(f"{'step':<8} {'code':>4} {'estimate':>9} {'limit':>6}  wiring")
    status, total = 0, 0
    for step in STEPS:
        chosen = step.name in opts["steps"]
        try:
            lines = check_step(step, opts["args"][step.name])
        except Exception as exc:
            lines = [f"BROKEN: {exc!r}"]
            status += step.code
        will_run = chosen and ((ROOT / step.script).exists() if step.script else any(WHEELS.glob("*.whl")))
        total += step.estimate_s if will_run else 0
        budget = (f"{step.estimate_s:>7} s {step.limit_s:>4} s" if chosen else
                  f"{'extra: --only':>16}" if step.extra else f"{'not chosen':>16}")
        print(f"{step.name:<8} {step.code:>4} {budget}  {lines[0]}")
        for line in lines[1:]:
            print(f"{'':<8} {'':>4} {'':>16}  {line}")
    print(f"{'total':<8} {'':>4} {total:>7} s  estimated for the steps that will run (time limit "
          f"{opts['time_limit']:.0f} s)")
    print(f"dry run: {'wiring ok' if not status else f'exit status {status}'}")
    return status


def main(argv):
    started = time.monotonic()
    try:
        opts = parse_options(argv)
    except OptionError as exc:
        print(f"gpu_suite.py: error: {exc}", file=sys.stderr)
        return 2
    if opts["dry_run"]:
        return dry_run(opts)
    device = device_name()
    if not device:
        print("gpu_suite.py: error: no CUDA GPU here; on a CPU machine use --dry-run", file=sys.stderr)
        return 2
    summary = run(opts, device, started)
    summary_path = RESULTS / f"gpu_suite_{file_name(device)}.json"
    merge_earlier(summary, read_json(summary_path))
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    if opts["out"]:  # first: the files must come back even if printing failed
        pack(summary_path, summary, opts["out"])
    print_summary(summary)
    return summary["exit_status"]


def process_exit_status(status):
    """The exit status for a sum of step codes: an exit status keeps 8 bits, so a sum of 256 or more
    exits 255 (no sum of codes is 255: none of them is 2) instead of wrapping to a success."""
    return status if status < 256 else 255


if __name__ == "__main__":
    sys.exit(process_exit_status(main(sys.argv[1:])))
