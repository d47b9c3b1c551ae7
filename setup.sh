#!/usr/bin/env bash
# Prepares a fresh clone: a virtual environment in .venv with requirements.txt, and the GPT-2
# vocabulary (r50k_base.tiktoken) in .cache/. Everything comes from the Python package
# registry: the vocabulary is the byte-identical copy shipped inside the openai-whisper source
# distribution, checked against the sha256 that tiktoken itself expects. DeepSpeed's one compiled
# op is prebuilt into .cache/. Safe to rerun; it only does work that is missing.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
wanted=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha256 2>/dev/null)" != "$wanted" ]; then
  echo "setup: installing requirements.txt into .venv (the first time takes a few minutes)"
  # torch first, at its pinned version: deepspeed only asks for some torch, which could otherwise
  # resolve to another (CUDA) build.
  .venv/bin/python -m pip install -q --disable-pip-version-check "$(grep '^torch==' requirements.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
  echo "$wanted" > .venv/.requirements.sha256
fi

# DeepSpeed compiles a shared-memory communication op with g++ at the first deepspeed.initialize
# (about 100 s on a CPU; training never uses the op). Build it once here, into the cache that
# train_sft.py points TORCH_EXTENSIONS_DIR at, so that runs and tests do not pay for it.
ops=.cache/torch_extensions
if [ "$(cat "$ops/.built-for" 2>/dev/null)" != "$wanted" ]; then
  echo "setup: building DeepSpeed's shared-memory op into $ops (about 2 minutes, once)"
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
