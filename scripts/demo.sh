#!/usr/bin/env bash
# Sets up .venv (scripts/setup.sh), then runs `lowbit demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
lowbit demo "$@"
