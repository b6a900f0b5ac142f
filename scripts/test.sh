#!/usr/bin/env bash
# Set up .venv and run the default test suite (slow, gpu, triton and distributed tests are deselected;
# pass pytest arguments through, e.g. `bash scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,hf,tensorboard,study
exec .venv/bin/python -m pytest -q "$@"
