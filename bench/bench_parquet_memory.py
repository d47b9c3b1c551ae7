"""Peak memory while tokenizing a large Parquet file: it must stay well under the file's size.

    python bench/bench_parquet_memory.py [--mb=200] [--rows_per_group=10000] [--keep]

Writes a synthetic Alpaca-style Parquet file of about --mb megabytes (snappy, row groups of
--rows_per_group rows, as Hugging Face datasets ship them) into a temporary folder, then runs
data.prepare_data on it with the GPT-2 tokenizer in a fresh process and reports the file size, that
process's peak resident memory (ru_maxrss), its resident memory before tokenizing (Python, torch,
pyarrow and the tokenizer loaded) and the wall time. The file and the cache are deleted afterwards unless --keep.
CPU only. Writes bench/results/parquet_memory_<host>.json.
"""
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from options import parse_script_options  # noqa: E402
from bench.common import load_average, provenance  # noqa: E402


OPTIONS = {"mb": (200, "size of the Parquet file written and read, in MB"),
           "rows_per_group": (10000, "rows per Parquet row group"),
           "keep": (False, "keep the written file")}


def write_parquet(path, megabytes, rows_per_group, seed=0):
    """Alpaca rows of pseudo-English (words drawn from 5,000 made-up ones), written a row group at a time
    until the file reaches `megabytes`; returns the number of rows."""
    rng = random.Random(seed)
    vocabulary = ["".join(rng.choice("etaoinshrdlucmfwypvbgk") for _ in range(rng.randint(2, 9))) for _ in range(5000)]

    def sentence(lo, hi):
        return " ".join(rng.choice(vocabulary) for _ in range(rng.randint(lo, hi))) + "."

    schema = pa.schema([("instruction", pa.string()), ("input", pa.string()), ("output", pa.string())])
    rows = 0
    with pq.ParquetWriter(path, schema, compression="snappy") as writer:
        while os.path.getsize(path) < megabytes * 1e6:
            group = [{"instruction": sentence(5, 30), "input": sentence(0, 60) if rng.random() < 0.5 else "",
                      "output": sentence(20, 200)} for _ in range(rows_per_group)]
            writer.write_table(pa.Table.from_pylist(group, schema=schema))
            rows += rows_per_group
    return rows


# Run in a fresh process, so its peak resident memory is the tokenizing alone plus the imports.
CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
import pyarrow.parquet
import data
import tokenizer
tokenizer.get_tokenizer("gpt2")
before_kib = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1])
start = time.perf_counter()
train, _ = data.prepare_data({path!r}, "gpt2", 1024, data_split="100,0", cache_dir={cache!r}, log=lambda s: None)
seconds = time.perf_counter() - start
peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"rss_before_mib": before_kib / 1024, "peak_rss_mib": peak_kib / 1024, "seconds": seconds,
                  "samples": len(train), "tokens": train.stats["tokens"], "format": train.files[0]["format"]}}))
"""


def main():
    args = parse_script_options(sys.argv[1:], OPTIONS, __doc__)
    megabytes, rows_per_group = args["mb"], args["rows_per_group"]
    load_before = load_average()
    folder = tempfile.mkdtemp(prefix="bench-parquet-")
    try:
        path = os.path.join(folder, "alpaca.parquet")
        start = time.perf_counter()
        rows = write_parquet(path, megabytes, rows_per_group)
        print(f"wrote {path}: {os.path.getsize(path) / 2**20:.1f} MiB, {rows:,} rows in "
              f"{time.perf_counter() - start:.0f} s")
        child = CHILD.format(root=str(ROOT), path=path, cache=os.path.join(folder, "cache"))
        proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
        file_mib = os.path.getsize(path) / 2**20
        result = {"file_mib": file_mib, "rows": rows, "rows_per_group": rows_per_group, **measured,
                  "peak_over_file": measured["peak_rss_mib"] / file_mib,
                  "growth_over_file": (measured["peak_rss_mib"] - measured["rss_before_mib"]) / file_mib,
                  "host": platform.node(),  # the child process tokenizes with data.py and tokenizer.py
                  **provenance(["bench/bench_parquet_memory.py", "data.py", "tokenizer.py"], load_before,
                               packages=("pyarrow",))}
    finally:
        if not args["keep"]:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"{'file MiB':>9} {'rows':>9} {'tokens':>12} {'RSS before':>11} {'peak RSS':>9} {'seconds':>8}")
    print(f"{result['file_mib']:9.1f} {rows:9,} {result['tokens']:12,} {result['rss_before_mib']:11.1f} "
          f"{result['peak_rss_mib']:9.1f} {result['seconds']:8.1f}")
    out = ROOT / "bench" / "results" / f"parquet_memory_{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
