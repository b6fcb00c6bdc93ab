#!/usr/bin/env bash
# Build pyguard._C with AddressSanitizer + UBSan into a scratch folder and run the tests that
# reach the C++ kernels (all shapes, bad input, non-finite values) against that build.
set -euo pipefail
cd "$(dirname "$0")/.."
VPY=$PWD/.venv/bin/python
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
PYGUARD_SANITIZE=1 "$VPY" setup.py -q build_ext --build-temp "$out/build" --build-lib "$out/lib" >/dev/null
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
export PYGUARD_EXT_DIR=$out/lib/pyguard
"$VPY" -m pytest -q -p no:cacheprovider tests/test_coca.py tests/test_cmrm.py tests/test_casa.py \
  tests/test_validation.py tests/test_sanitized.py tests/test_capture.py -k "not triton and not torch and not cost" "$@"
