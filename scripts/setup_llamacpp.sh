#!/usr/bin/env bash
# llama.cpp's own OpenAI-compatible server, `llama-server` (parallel slots with continuous batching, GBNF grammars),
# for `data/distill.py --backend llamacpp`, bench_llm.py and the tests. Neither PyPI nor this machine has a binary of
# it, and llama-cpp-python's Python server answers one request at a time (a lock around the model), so the server is
# built from the llama.cpp source that the llama-cpp-python sdist on PyPI vendors: the `llama-server` target alone,
# CPU, -march=native (about 3 minutes on 2 cores). Installs .llamacpp/bin/llama-server; skipped when it is there for
# this version. LLAMA_SERVER=/path/to/llama-server (your own build, e.g. with CUDA) is used instead when set.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36                       # llama-cpp-python release whose vendored llama.cpp is built
DEST=.llamacpp
PY=${PYTHON:-python3}
if [ -x "$DEST/bin/llama-server" ] && [ "$(cat "$DEST/VERSION" 2>/dev/null)" = "$VERSION" ]; then
    exit 0
fi
command -v cmake >/dev/null && command -v c++ >/dev/null || { echo "setup_llamacpp.sh: needs cmake and a C++ compiler (apt-get install cmake g++, or pip install cmake)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama-server from llama-cpp-python==$VERSION's llama.cpp source (a few minutes; log: $DEST/build.log)"
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" -d "$work"
tar xzf "$work/llama_cpp_python-$VERSION.tar.gz" -C "$work"
{
    cmake -S "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
        -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF
    cmake --build "$work/build" --target llama-server -j "$(nproc)"
} > "$DEST/build.log" 2>&1 || { tail -30 "$DEST/build.log" >&2; echo "setup_llamacpp.sh: build failed (log: $DEST/build.log)" >&2; exit 1; }
mkdir -p "$DEST/bin"
cp "$work/build/bin/llama-server" "$DEST/bin/llama-server.tmp"
mv "$DEST/bin/llama-server.tmp" "$DEST/bin/llama-server"
echo "$VERSION" > "$DEST/VERSION"
"$DEST/bin/llama-server" --version 2>&1 | head -2
