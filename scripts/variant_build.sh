#!/usr/bin/env bash
# Builds lowbit._C with extra CMake options into build/NAME -- the normal editable install is left
# alone -- and stages a package there: links to python/lowbit (the current sources) plus that
# module, with a sitecustomize that drops the editable install's import redirect (which would
# otherwise load the installed _C whatever PYTHONPATH says; child processes inherit it). Prints
# the directory to put first on PYTHONPATH (`import lowbit._C; lowbit._C.__file__` shows which
# module loaded; a sanitized one needs its runtime preloaded first, as sanitize.sh does).
#
#   STAGE=$(bash scripts/variant_build.sh debug -DCMAKE_BUILD_TYPE=Debug)
#   PYTHONPATH=$STAGE .venv/bin/python -m pytest tests/test_pack.py
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
NAME=${1:?usage: variant_build.sh NAME [cmake options...]}
shift
BUILD=$ROOT/build/$NAME
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 2; }

# The same CMakeLists as the normal build, against the venv's torch and pybind11.
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$BUILD" "${GEN[@]}" -DPython_EXECUTABLE="$PY" "$@" >/dev/null
cmake --build "$BUILD" -j "$(nproc)" >&2
SO=$(ls "$BUILD"/_C*.so)

STAGE=$BUILD/stage
rm -rf "$STAGE" && mkdir -p "$STAGE/lowbit"
for f in "$ROOT"/python/lowbit/*; do
  case "$f" in *.so|*/__pycache__) ;; *) ln -s "$f" "$STAGE/lowbit/" ;; esac
done
cp "$SO" "$STAGE/lowbit/"
cat > "$STAGE/sitecustomize.py" <<'PYEOF'
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "ScikitBuild" not in type(f).__name__]
PYEOF
echo "$STAGE"
