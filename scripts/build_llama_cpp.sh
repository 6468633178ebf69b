#!/usr/bin/env bash
# Builds llama.cpp's tools (llama-bench, llama-quantize, llama-completion, llama-perplexity) once, from
# the llama.cpp tree that llama-cpp-python's PyPI source distribution ships (the prebuilt llama.cpp
# wheels need glibc 2.38), into a cache directory, and prints that directory's bin/. Later runs
# only print it. llama.cpp is lowbit's speed peer and the loader that proves GGUF files work.
#
#   bash scripts/build_llama_cpp.sh            # -> ~/.cache/lowbit/llama.cpp-<version>-<cpu>/bin
#
# It is built for this CPU (GGML_NATIVE, as llama.cpp users build it), so the cache directory is
# keyed by the CPU's flags as well as the version. About 15 minutes on two cores, the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36  # llama-cpp-python's release; its vendor/llama.cpp is the tree built
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
CPU=$(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-8)
CACHE="${LOWBIT_DATA_DIR:-$HOME/.cache/lowbit}/llama.cpp-$VERSION-$CPU"
TOOLS=(llama-bench llama-quantize llama-completion llama-perplexity)

built() { for t in "${TOOLS[@]}"; do [ -x "$CACHE/bin/$t" ] || return 1; done; }
if built; then
  echo "$CACHE/bin"
  exit 0
fi

mkdir -p "$(dirname "$CACHE")"
tmp=$(mktemp -d "$CACHE.tmp-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
# Only the source archive is wanted: no dependencies, no build (its metadata is read with the
# build tools already installed, not in an isolated environment).
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
  -d "$tmp" "llama-cpp-python==$VERSION" >&2
tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >&2
cmake --build "$tmp/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2
mkdir -p "$tmp/out/bin"
for t in "${TOOLS[@]}"; do cp "$tmp/build/bin/$t" "$tmp/out/bin/"; done
echo "llama-cpp-python $VERSION (vendor/llama.cpp), GGML_NATIVE on: $(grep -m1 'model name' /proc/cpuinfo)" \
  >"$tmp/out/SOURCE"
rm -rf "$CACHE"
mv "$tmp/out" "$CACHE"  # complete or absent: a killed build leaves only its temporary directory
built
echo "$CACHE/bin"
