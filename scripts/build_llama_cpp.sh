#!/usr/bin/env bash
# Builds llama.cpp's command-line tools (llama-quantize, llama-perplexity, llama-simple, llama-completion) from the
# llama.cpp source that the llama-cpp-python sdist on PyPI carries. Opt-in (`make engines`), never part of
# `make test`: about 7 minutes on 2 cores. Output: $ENGINES_DIR/llama.cpp/build/bin/.
set -euo pipefail
PIP=${PIP:-.venv/bin/pip}
ENGINES_DIR=${ENGINES_DIR:-.engines}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-$(nproc)}
if [ -e "$PIP" ]; then PIP=$(readlink -f "$PIP"); fi  # a relative path must survive the cd below
mkdir -p "$ENGINES_DIR"
cd "$ENGINES_DIR"
if [ ! -d llama.cpp ]; then
  "$PIP" download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d sdist
  tar xzf "sdist/llama_cpp_python-$VERSION.tar.gz"
  mv "llama_cpp_python-$VERSION/vendor/llama.cpp" llama.cpp
  rm -rf "llama_cpp_python-$VERSION"
fi
# Not GGML_NATIVE: on AMX machines -march=native compiles ggml's AMX matmul, which crashed (SIGSEGV in
# ggml_backend_amx_mul_mat, then SIGILL) on this machine's Q8_0/Q4_0 tensors; AVX2/AVX-512 without AMX runs.
cmake -S llama.cpp -B llama.cpp/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF \
  -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
  -DGGML_AMX_BF16=OFF
nice -n 10 cmake --build llama.cpp/build -j "$JOBS" --target llama-quantize llama-perplexity llama-simple llama-completion
ls -la llama.cpp/build/bin
