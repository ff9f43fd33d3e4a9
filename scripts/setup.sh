#!/usr/bin/env bash
# Creates .venv and installs prune-lightning with its test dependencies.
#
# torch is installed first, on its own: pyproject.toml asks only for torch>=2.1, and with no torch present pip would
# resolve that to the newest CUDA build (several GB). On the CPU machines this project is developed on,
# torch==2.13.0 is a CPU build that lies on local disk. Elsewhere set TORCH_SPEC (e.g. TORCH_SPEC="torch") or bring
# a venv that already has the torch you want: an importable torch is kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
fi
"$VENV/bin/python" -m pip install --quiet -e ".[dev]"
"$VENV/bin/python" -c "import torch, lightning, transformers; print(f'torch {torch.__version__}, lightning {lightning.__version__}, transformers {transformers.__version__}')"
