#!/usr/bin/env bash
# The one command for a lent GPU machine (docs/benchmarks.md says how to call it): installs the wheels
# carried in bench/refs/wheels, then runs `pytest -m gpu` and every benchmark within BUDGET seconds,
# writing results-gpu.json(.l), log-gpu.txt and nvidia-smi.txt under $OUT (bench/results without one).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
BUDGET=${BUDGET:-520}
mkdir -p "$OUT"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
pip_target() {  # dest wheels…
  local dest=$1
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$dest" "$@"
}
# loracord's and diffusers' example's missing packages; kohya's pinned ones apart, ahead of them for kohya only.
pip_target /tmp/site bench/refs/wheels/common/*.whl || exit 1
pip_target /tmp/site-kohya bench/refs/wheels/kohya/*.whl || exit 1
# loracord's own metadata (its version goes into files and PNGs); the code is imported from the checkout.
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m bench.run_all --profile gpu --out "$OUT" --work /tmp/bench-work --budget-s "$BUDGET" \
  --ref-python python3 --kohya-python python3 --kohya-path /tmp/site-kohya "$@"
