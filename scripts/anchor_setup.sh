#!/usr/bin/env bash
# The anchor for `benchmarks/anchor.py` (issue #15): llama.cpp's own llama-server, built from the
# llama.cpp source that the pinned llama-cpp-python sdist vendors (tools/server), with the same
# portable flags as the wheel; and guidellm, the load generator, in a venv of its own
# (.venv-bench). Both are cached in $PYGUARD_CACHE, keyed by version and flags; a second run
# reuses them. Prints the llama-server path. Needs cmake and a C++ compiler (~10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${PYGUARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyguard}
LLAMA_VERSION=$(sed -n 's/^LLAMA_VERSION=//p' scripts/setup.sh)
LLAMA_CMAKE_ARGS=$(sed -n 's/^LLAMA_CMAKE_ARGS="\(.*\)"$/\1/p' scripts/setup.sh)
GUIDELLM_VERSION=0.8.1
log() { printf '[anchor] %s\n' "$*" >&2; }

key=$(printf '%s|%s|%s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$(uname -m)" | sha256sum | cut -c1-16)
bindir=$CACHE/bin/llama-server-$LLAMA_VERSION-$key
if [ ! -x "$bindir/llama-server" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  log "fetching the llama-cpp-python $LLAMA_VERSION sdist"
  .venv/bin/python -m pip --disable-pip-version-check -q download --no-deps --no-binary :all: \
    "llama-cpp-python==$LLAMA_VERSION" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-"$LLAMA_VERSION".tar.gz -C "$tmp"
  src=$tmp/llama_cpp_python-$LLAMA_VERSION/vendor/llama.cpp
  log "building llama-server (portable flags: $LLAMA_CMAKE_ARGS)"
  # shellcheck disable=SC2086
  cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON $LLAMA_CMAKE_ARGS >"$tmp/cmake.log"
  cmake --build "$tmp/build" --target llama-server -j "$(nproc)" >"$tmp/build.log"
  mkdir -p "$bindir.tmp" && cp "$tmp/build/bin/llama-server" "$bindir.tmp/" && mv "$bindir.tmp" "$bindir"
fi

if [ "$(cat .venv-bench/.guidellm 2>/dev/null)" != "$GUIDELLM_VERSION" ]; then
  log "installing guidellm $GUIDELLM_VERSION into .venv-bench"
  python3 -m venv .venv-bench
  # torch and transformers pinned as in requirements-dev.txt (a plain torch would pull a CUDA build)
  .venv-bench/bin/python -m pip --disable-pip-version-check -q install "guidellm==$GUIDELLM_VERSION" \
    $(grep -E '^(torch|transformers)==' requirements-dev.txt)
  echo "$GUIDELLM_VERSION" > .venv-bench/.guidellm
fi
echo "$bindir/llama-server"
