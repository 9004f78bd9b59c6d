#!/usr/bin/env bash
# Creates .venv (if missing) with Python 3.11 and installs mtljax and its pinned
# dependencies. Usage: bash scripts/setup_env.sh [requirements file]
# The install is skipped when the requirements, setup.cfg and pyproject.toml
# are unchanged since the last successful install into this .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp_file=".venv/.mtljax-installed-$(basename "$req")"
stamp="$(cat requirements*.txt setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] \
    && .venv/bin/python -c "import mtljax" 2>/dev/null; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r "$req"
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "$stamp" > "$stamp_file"
