#!/usr/bin/env bash
# Builds llama.cpp's tools (llama-bench, llama-quantize, llama-completion, llama-perplexity,
# llama-imatrix, llama-tokenize) once, from the llama.cpp tree that llama-cpp-python's PyPI source
# distribution ships (the prebuilt llama.cpp wheels need glibc 2.38), into a cache directory, with
# its static libraries and headers; then lowbit's two small tools against them (llama-logits:
# the logits of a token sequence; ggml-quantize: rows through ggml's own quantizers), rebuilt
# when their source changes. Prints the cache's bin/. llama.cpp is lowbit's speed peer and the
# judge of its GGUF files.
#
#   bash scripts/build_llama_cpp.sh            # -> ~/.cache/lowbit/llama.cpp-<version>-<key>/bin
#
# It is built for this CPU (GGML_NATIVE, as llama.cpp users build it), so the cache directory is
# keyed by the CPU's flags and the build options as well as the version. About 5 minutes on two
# cores, the first time.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36  # llama-cpp-python's release; its vendor/llama.cpp is the tree built
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
# No contraction of a*b+c into FMAs in ggml's scalar C: its reference quantizers then round exactly
# as lowbit's C++ packers do, so their bytes can be compared (the SIMD kernels use explicit FMAs).
# No AMX: ggml's AMX matmul dies of SIGILL (tilezero in its worker threads) on the AMX-capable
# VMs lowbit is tested on, though the kernel grants the tile state; AVX-512 VNNI serves instead.
FLAGS="-ffp-contract=off -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
CMAKE_OPTIONS=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON
  "-DCMAKE_C_FLAGS=$FLAGS" "-DCMAKE_CXX_FLAGS=$FLAGS"
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF)
TOOLS=(llama-bench llama-quantize llama-completion llama-perplexity llama-imatrix llama-tokenize)
KEY=$( (grep -m1 '^flags' /proc/cpuinfo; echo "${CMAKE_OPTIONS[*]} ${TOOLS[*]}") | md5sum | cut -c1-8)
CACHE="${LOWBIT_DATA_DIR:-$HOME/.cache/lowbit}/llama.cpp-$VERSION-$KEY"

built() { for t in "${TOOLS[@]}"; do [ -x "$CACHE/bin/$t" ] || return 1; done; }
if ! built; then
  mkdir -p "$(dirname "$CACHE")"
  tmp=$(mktemp -d "$CACHE.tmp-XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  # Only the source archive is wanted: no dependencies, no build (its metadata is read with the
  # build tools already installed, not in an isolated environment).
  "$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --no-binary :all: --no-build-isolation \
    -d "$tmp" "llama-cpp-python==$VERSION" >&2
  tar xzf "$tmp"/llama_cpp_python-"$VERSION".tar.gz -C "$tmp" "llama_cpp_python-$VERSION/vendor/llama.cpp"
  src="$tmp/llama_cpp_python-$VERSION/vendor/llama.cpp"
  cmake -S "$src" -B "$tmp/build" "${CMAKE_OPTIONS[@]}" >&2
  cmake --build "$tmp/build" -j "$(nproc)" --target "${TOOLS[@]}" >&2
  mkdir -p "$tmp/out/bin" "$tmp/out/lib" "$tmp/out/include"
  for t in "${TOOLS[@]}"; do cp "$tmp/build/bin/$t" "$tmp/out/bin/"; done
  find "$tmp/build" \( -name 'libllama.a' -o -name 'libggml*.a' \) -exec cp {} "$tmp/out/lib/" \;
  cp "$src"/include/*.h "$src"/ggml/include/*.h "$tmp/out/include/"
  echo "llama-cpp-python $VERSION (vendor/llama.cpp, ggml $(grep -oP 'GGML_VERSION_(MAJOR|MINOR|PATCH) \K[0-9]+' \
    "$src/ggml/CMakeLists.txt" | paste -sd.)), GGML_NATIVE on:$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2-)" \
    >"$tmp/out/SOURCE"
  rm -rf "$CACHE"
  mv "$tmp/out" "$CACHE"  # complete or absent: a killed build leaves only its temporary directory
  built
fi

# lowbit's own tools: seconds to build, so rebuilt whenever their source is newer than the binary.
for tool in llama-logits:scripts/llama_logits.cpp ggml-quantize:scripts/ggml_quantize.cpp; do
  bin="$CACHE/bin/${tool%%:*}" source="${tool#*:}"
  if [ ! -x "$bin" ] || [ "$source" -nt "$bin" ]; then
    "${CXX:-c++}" -O2 -std=c++17 "$source" -I "$CACHE/include" \
      -Wl,--start-group "$CACHE"/lib/*.a -Wl,--end-group -fopenmp -lpthread -ldl -o "$bin.tmp$$" >&2
    mv "$bin.tmp$$" "$bin"
  fi
done
echo "$CACHE/bin"
