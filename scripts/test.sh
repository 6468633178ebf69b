#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh) and llama.cpp's tools (scripts/build_llama_cpp.sh), then runs the
# whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# llama.cpp's tools judge lowbit's GGUF files (built once into ~/.cache/lowbit, then reused).
bash scripts/build_llama_cpp.sh >/dev/null
. .venv/bin/activate
python -m pytest -q tests "$@"
