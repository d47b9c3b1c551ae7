"""Provenance shared by every bench script: what ran, where, when and under what load.

A result file is only worth quoting when it says which code produced it and on what machine, so every
script in bench/ builds its record the same way:

    from bench.common import load_average, provenance
    load_before = load_average()                      # before the measurement starts
    ...                                               # measure
    record = {"device": device, **provenance(["train_sft.py", "bench/my_bench.py"], load_before,
                                             packages=("deepspeed",)), ...the results...}

provenance(sources, load_before, packages=()) returns these fields, spelled the same in every file:
    date                  UTC time the record was made, ISO 8601 to the second
    versions              {"python": ..., "torch": ..., each of packages: its installed version or "not installed"}
    sources               {path: first 12 hex digits of its sha256} for each of sources (paths relative to the
                          repository root) and every project file they import, transitively (`sha256sum` checks
                          them; a GPU machine may have no git history)
    machine               {"cpu": the CPU's model name, "cores": logical CPU count}
    load_average_before   load_before: [1, 5, 15-minute load average] taken by load_average() before measuring
    load_average_after    the same, now: a shared machine's load goes with its figures

The smaller functions are there for scripts that need one field alone: load_average(), machine(),
versions(*packages), project_files(*paths), source_digests(paths). This module imports nothing heavy
(no torch), so a script may call it before deciding whether to import anything else.
"""
import ast
import datetime
import hashlib
import importlib.metadata
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def provenance(sources, load_before, packages=()):
    """The provenance fields of a result record (see the module docstring), taken after the measurement."""
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions("torch", *packages),
            "sources": source_digests(project_files(*sources)),
            "machine": machine(),
            "load_average_before": list(load_before),
            "load_average_after": load_average()}


def load_average():
    """The 1, 5 and 15-minute load averages, rounded to hundredths."""
    return [round(load, 2) for load in os.getloadavg()]


def machine():
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows) and its logical core count."""
    name = None
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        pass
    return {"cpu": name or platform.processor() or platform.machine(), "cores": os.cpu_count()}


def versions(*packages):
    """{"python": version, package: installed version or "not installed"} for each distribution named."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def project_files(*paths):
    """paths and every file of this repository they import, directly or not, sorted (lazy imports inside
    functions count: a script that may run them is digested with them)."""
    found, pending = set(), list(paths)
    while pending:
        path = pending.pop()
        if path not in found:
            found.add(path)
            if path.endswith(".py"):
                pending += imported_project_files(path)
    return sorted(found)


def imported_project_files(path):
    """The repository files (module.py or package/__init__.py) that the imports in path name."""
    modules = []
    for node in ast.walk(ast.parse(repository_file(path).read_text(), filename=path)):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from .x import y` counts from path's own package
            folder = Path(path).parent.parts
            package = folder[:len(folder) + 1 - node.level] if node.level else ()
            module = ".".join([*package, *([node.module] if node.module else [])])
            modules += [module] + [f"{module}.{alias.name}" for alias in node.names]
    files = []
    for module in modules:
        parts = [part for part in module.split(".") if part]
        for depth in range(1, len(parts) + 1):  # a.b.c imports a/__init__.py and a/b/__init__.py too
            stem = "/".join(parts[:depth])
            files += [name for name in (stem + ".py", stem + "/__init__.py") if (ROOT / name).is_file()]
    return files


def source_digests(paths):
    """{path: the first 12 hex digits of its sha256} for files of this repository (paths relative to its root)."""
    return {path: hashlib.sha256(repository_file(path).read_bytes()).hexdigest()[:12] for path in paths}


def repository_file(path):
    """ROOT / path, refusing a path outside the repository: a result must cite only files anyone can rerun."""
    file = (ROOT / path).resolve()
    if not file.is_relative_to(ROOT) or not file.is_file():
        raise ValueError(f"{path} is not a file of this repository ({ROOT})")
    return file
