#!/usr/bin/env bash
# The GPU check, for a machine with a CUDA device; a few minutes, no network needed.
# Builds pyguard (with pyguard._C) into a temporary folder with the machine's own Python (torch
# with CUDA, triton, transformers, pytest), runs the CUDA tests (pytest -m cuda: every Triton
# kernel against the reference at real sizes with NaN-poisoned outputs, guard() on CUDA with
# CoCA, CMRM and CASA, the decode loop's host reads and syncs), then benchmarks/gpu_bench.py,
# which prints one table. PYTHON: the interpreter (default python3). OUT: a folder that also
# gets the test log and the table (default benchmarks/gpu). GPU_CHECK_DEVICE=cpu: a dry run of
# the same steps on the CPU (CUDA tests skipped, benchmark small).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
OUTDIR=${OUT:-$ROOT/benchmarks/gpu}
log() { printf '[gpu_check] %s\n' "$*" >&2; }

"$PY" -c 'import triton, transformers, pytest, torch; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__)'
if [ "$DEVICE" = cuda ]; then
  "$PY" -c 'import sys, torch; sys.exit(None if torch.cuda.is_available() else "[gpu_check] torch sees no CUDA device (GPU_CHECK_DEVICE=cpu: a dry run)")'
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
mkdir -p "$OUTDIR"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
log "building pyguard into $SITE"
"$PY" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --no-compile --target "$SITE" "$ROOT"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
cd "$SITE"  # import pyguard from the build, not from the source tree
status=0
log "CUDA tests"
mapfile -t files < <(grep -l "mark.cuda" "$ROOT"/tests/test_*.py)  # only these: the others may import packages this machine lacks
"$PY" -m pytest "${files[@]}" -m cuda -q -p no:cacheprovider --rootdir "$ROOT" 2>&1 | tee "$OUTDIR/gpu_tests.log" || status=1
log "benchmark"
bench=(--device "$DEVICE" --out "$OUTDIR/gpu_bench.md")
[ "$DEVICE" = cuda ] || bench+=(--quick)
"$PY" "$ROOT/benchmarks/gpu_bench.py" "${bench[@]}" || status=1
log "$([ $status = 0 ] && echo passed || echo FAILED); log and table in $OUTDIR"
exit $status
