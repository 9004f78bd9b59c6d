#!/usr/bin/env bash
# Creates .venv (if missing) with Python 3.11 and installs mtljax and its pinned
# dependencies. Usage: bash scripts/setup_env.sh [requirements file]
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$req"
.venv/bin/python -m pip install --quiet --no-deps -e .
