#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, fetch the data (cached in the user's cache directory),
# train a small dense LM and a small PEER LM at the same training FLOP budget (~10 minutes on 2 CPU
# cores), and print their held-out perplexities side by side. Extra arguments go to `peerlm demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
exec .venv/bin/peerlm demo "$@"
