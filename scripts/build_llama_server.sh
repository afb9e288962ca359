#!/usr/bin/env bash
# Build llama.cpp's own OpenAI server (`llama-server`), the anchor of bench/serve_load.py
# (--target llama-server).  Its sources ship inside llama-cpp-python's sdist: the same
# llama.cpp as the installed package (the version is read from it), built for this CPU.
# About 10 minutes on 2 cores; a bench tool, not part of CI.
#
#   bash scripts/build_llama_server.sh [OUT_DIR]     # default ~/.cache/dlmnumba/llama-server
#   python bench/serve_load.py --target llama-server --target dlmnumba-proc --settings ar
set -euo pipefail
out="${1:-${DLMNUMBA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/dlmnumba}/llama-server}"
version="$(python3 -c 'import llama_cpp; print(llama_cpp.__version__)')"
work="$(mktemp -d /tmp/llama-server-build-XXXX)"
trap 'rm -rf "$work"' EXIT
echo "llama-cpp-python $version: sources into $work, binary into $out"
python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
src="$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)"
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF >/dev/null
cmake --build "$work/build" --target llama-server -j"$(nproc)"
mkdir -p "$out"
cp "$work"/build/bin/llama-server "$out"/
# the shared ggml/llama libraries it links against, next to it (its RPATH points at the
# build tree, which is removed)
find "$work/build/bin" "$work/build" -maxdepth 3 -name 'lib*.so*' -exec cp -P {} "$out"/ \; || true
echo "built $out/llama-server"
