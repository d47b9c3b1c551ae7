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
set -euo pipefail
cd "$(dirname "$0")"

pip_install() { .venv/bin/python -m pip install -q --disable-pip-version-check "$@"; }

update_lock=false
case "${1:-}" in
  "") ;;
  --update-lock) update_lock=true ;;
  *) echo "setup: unknown option '$1' (the only one is --update-lock)" >&2; exit 2 ;;
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
