#!/usr/bin/env bash
# Set up everything (scripts/setup.sh) and run the tests: tests/, then the benchmark suite with
# timing off (each benchmark body runs once and checks its result). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PYGUARD_REQUIRE_MODELS=1
exec .venv/bin/python -m pytest tests benchmarks -q "$@"
