#!/usr/bin/env bash
# Every GPU figure of the project from one command: runs bench/gpu_suite.py (its docstring lists the
# steps, their time budget and the exit status) with the Python that holds torch: .venv's where it
# exists, else python3 (the GPU machine's), or $PYTHON. On a machine without a GPU: --dry-run.
set -euo pipefail
export PYTHONUNBUFFERED=1  # the steps' output shows as it comes, also when the run is cut short
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then
  python=.venv/bin/python
fi
exec "$python" bench/gpu_suite.py "$@"
