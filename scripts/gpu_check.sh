#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent machine (15 minutes of device time in all).
#
#   bash scripts/gpu_check.sh --prepare    # here, once: the study's prepared data (prepared if need be)
#                                          # and the peer-pytorch wheels into .gpu/ (ignored by git)
#   then on the device:  command "bash scripts/gpu_check.sh", carry [".gpu"], timeout_s 600
#   bash scripts/gpu_check.sh --smoke      # here, before a loan: every step on the CPU with tiny sizes
#                                          # (Triton in its interpreter, the isoflop step 3 steps a run),
#                                          # so a mistake in the script cannot cost the device's minutes
#
# On the GPU machine (a python3 with torch and triton, no network) it runs these steps, each bounded in
# time, each writing its own file under $OUT (results/gpu/ where $OUT is unset; /tmp/gpu_check_smoke with
# --smoke):
#   device.txt          nvidia-smi, torch / triton versions, the device
#   gpu_tests.txt       pytest -m gpu: the Triton kernels against the reference on CUDA
#   triton.json, .txt   benchmarks/peer_triton_benchmark.py: triton (deterministic reduction) vs
#                       triton-atomic vs fused vs reference (vs peer-pytorch when its wheel is carried),
#                       time and achieved bandwidth, experts alone and the whole layer
#   decode.txt          benchmarks/decode_benchmark.py on CUDA
#   isoflop.json, .txt  a small isoFLOP comparison: the study's 2e12 optima of dense and PEER (and PKM)
#                       re-trained on CUDA from their committed records (`peerlm study isoflop
#                       --reproduce`'s rows): val loss and training seconds against the CPU record
# A failing step is written down and the next one runs; the exit status counts the failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    set -e
    here="${PYTHON:-.venv/bin/python}"
    # the study's prepared data (prepared here first if it is not yet: the corpora come from the registries)
    data=$("$here" -c "import sys; from peerlm.study.isoflop import isoflop_study
print(isoflop_study('results/isoflop', log=lambda s: print(s, file=sys.stderr)).data_dir())")
    mkdir -p .gpu/study .gpu/wheels
    rm -rf .gpu/study/data-v1024 && cp -r "$data" .gpu/study/data-v1024
    # peer-pytorch and what the GPU image lacks of its requirements (einops, numpy, sympy are there)
    python3 -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels peer-pytorch==0.2.2 einx frozendict \
        || echo "note: no peer-pytorch wheels; the benchmark runs without it"
    du -sh .gpu
    exit 0
fi

smoke=0
if [ "${1:-}" = "--smoke" ]; then smoke=1; fi
out="${OUT:-results/gpu}"
[ $smoke -eq 1 ] && out="${OUT:-/tmp/gpu_check_smoke}"
mkdir -p "$out"
py="${PYTHON:-python3}"
[ $smoke -eq 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && py=.venv/bin/python
device=cuda
[ $smoke -eq 1 ] && device=cpu
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ $smoke -eq 0 ] && ls .gpu/wheels/*.whl >/dev/null 2>&1; then  # (the smoke's venv has them)
    "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu-site .gpu/wheels/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
fi
failed=0

step() {  # step NAME SECONDS FILE COMMAND...: run with a time limit, output to FILE, count a failure
    local name=$1 limit=$2 file=$3
    shift 3
    local t0=$SECONDS
    timeout "$limit" "$@" >"$out/$file" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - t0)) s" | tee -a "$out/device.txt"
    [ $rc -eq 0 ] || failed=$((failed + 1))
}

{
    date -u
    nvidia-smi || true
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__); \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
} >"$out/device.txt" 2>&1

if [ $smoke -eq 1 ]; then  # without a GPU the gpu tests skip; collecting them still checks they import
    step "gpu tests" 120 gpu_tests.txt "$py" -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_peer_triton.py
    step "triton benchmark" 240 triton.txt "$py" benchmarks/peer_triton_benchmark.py --interpret-smoke \
        --out "$out/triton.json"
    step "decode" 90 decode.txt "$py" benchmarks/decode_benchmark.py --device cpu --quick --methods dense peer
else
    step "gpu tests" 120 gpu_tests.txt "$py" -m pytest -q -p no:cacheprovider -m gpu tests
    step "triton benchmark" 240 triton.txt "$py" benchmarks/peer_triton_benchmark.py --repeats 10 --out "$out/triton.json"
    step "decode" 90 decode.txt "$py" benchmarks/decode_benchmark.py --device cuda
fi
if [ ! -f .gpu/study/data-v1024/meta.json ]; then  # the device has no network to prepare it
    echo "isoflop: skipped: no .gpu/study/data-v1024 (run \`bash scripts/gpu_check.sh --prepare\` first)" \
        | tee -a "$out/device.txt"
    [ $smoke -eq 1 ] || failed=$((failed + 1))
else
rm -f "$out/isoflop.json"  # reproduce() adds to it: this call's rows only
step "isoflop" 200 isoflop.txt env GPU_CHECK_DEVICE=$device GPU_CHECK_SMOKE=$smoke "$py" - "$out/isoflop.json" <<'EOF'
"""Re-train the study's 2e12 optima on CUDA from their records (peerlm.study.reproduce): val loss and
training seconds against the CPU record (with --smoke: on the CPU, 3 steps a run, to check the code path)."""
import os, sys, tempfile
from pathlib import Path

from peerlm.study.isoflop import isoflop_study
from peerlm.study.reproduce import reproduce

RUNS = ["2e12_dense_L2d64_lr2_s0", "2e12_peer_L1d48_lr2_x3_s0", "2e12_pkm_L2d64_lr2_x10_s0"]
smoke = os.environ["GPU_CHECK_SMOKE"] == "1"
with tempfile.TemporaryDirectory() as scratch:  # smoke: nothing written under .gpu
    work = Path(scratch) / "reproduce" if smoke else Path(".gpu/study/reproduce")
    study = isoflop_study("results/isoflop", work=".gpu/study/isoflop", device=os.environ["GPU_CHECK_DEVICE"],
                          log=lambda s: print(s, flush=True))
    reproduce(study, RUNS, out=Path(sys.argv[1]), work=work, tokens=3 * 16 * 128 if smoke else None)
EOF
fi

echo "failed steps: $failed" | tee -a "$out/device.txt"
exit "$failed"
