#!/usr/bin/env bash
# Create .venv (if missing) and install peerlm into it with the given extras (default: dev).
# torch is pinned to the CPU build 2.13.0 when no torch is present; an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
py=.venv/bin/python
if ! "$py" -c "import torch" 2>/dev/null; then
    "$py" -m pip install --quiet torch==2.13.0
fi
"$py" -m pip install --quiet -e ".[${extras}]"
"$py" -c "import torch, peerlm; print(f'peerlm {peerlm.__version__} with torch {torch.__version__} in .venv')"
# compile the CPU kernels now (about a minute, once; cached by torch), not inside the first training
"$py" -c "from peerlm.kernels.cpu import cpu_kernels; print('CPU kernels:', 'built' if cpu_kernels() else 'unavailable, PyTorch ops instead')"
