"""The install: the project's own import names never shadow an installed distribution, transformers
imports from the repository root (where users and tests run), .venv holds exactly the lock, and
setup.sh refuses to guess without one."""
import importlib.metadata
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def project_import_names():
    """Every name `import X` could resolve to in the repository root: modules, and folders (a folder
    without __init__.py still imports, as a namespace package)."""
    modules = {path.stem for path in ROOT.glob("*.py")}
    folders = {path.name for path in ROOT.iterdir() if path.is_dir() and not path.name.startswith((".", "__"))}
    return modules | folders


def test_no_project_name_shadows_an_installed_distribution():
    installed = importlib.metadata.packages_distributions()
    clashes = {name: installed[name] for name in project_import_names() if name in installed}
    assert not clashes, f"project names that shadow installed distributions: {clashes}"


def test_the_kernels_folder_is_a_package_of_its_own():
    import sft_kernels
    assert pathlib.Path(sft_kernels.__file__).parent == ROOT / "sft_kernels"
    assert not (ROOT / "kernels").exists()


def test_transformers_imports_from_the_repository_root():
    code = "from transformers import AutoModelForCausalLM, GPT2LMHeadModel; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


def read_lock():
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_the_lock_pins_every_direct_requirement():
    pins = read_lock()
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        name = re.split(r"[=<>~ #\[]", line.strip(), maxsplit=1)[0]
        if name:
            assert re.sub(r"[-_.]+", "-", name).lower() in pins, f"requirements.txt names {name}, the lock does not"


@pytest.mark.skipif(pathlib.Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="checks the project's own .venv, which this interpreter is not")
def test_the_venv_holds_exactly_the_lock():
    installed = {re.sub(r"[-_.]+", "-", dist.metadata["Name"]).lower(): dist.version
                 for dist in importlib.metadata.distributions()}
    wrong = {name: (version, installed.get(name)) for name, version in read_lock().items()
             if installed.get(name, "").split("+")[0] != version}
    assert not wrong, f"lock version vs installed (rerun bash setup.sh): {wrong}"


def test_setup_refuses_a_missing_lock_with_a_sentence(tmp_path):
    shutil.copy(ROOT / "setup.sh", tmp_path)
    shutil.copy(ROOT / "requirements.txt", tmp_path)
    proc = subprocess.run(["bash", "setup.sh"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "requirements.lock is missing" in proc.stderr and "--update-lock" in proc.stderr
    assert not (tmp_path / ".venv").exists()


def test_setup_refuses_an_unknown_option(tmp_path):
    shutil.copy(ROOT / "setup.sh", tmp_path)
    proc = subprocess.run(["bash", "setup.sh", "--lock"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option '--lock'" in proc.stderr
