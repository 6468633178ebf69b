#!/usr/bin/env bash
# Creates .venv (if needed) with the CPU build of torch 2.13.0, then builds and installs lowbit
# into it (editable, against that torch: --no-build-isolation). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -d /opt/wheels ] && export PIP_FIND_LINKS="${PIP_FIND_LINKS:-/opt/wheels}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@" -c scripts/constraints.txt; }
pip install torch==2.13.0
pip install "scikit-build-core>=0.10" "pybind11>=2.12" ninja
pip install --no-build-isolation -e ".[test${LOWBIT_EXTRAS:+,$LOWBIT_EXTRAS}]"
python -c "import torch, lowbit; print(f'lowbit {lowbit.__version__} ready (torch {torch.__version__})')"
