#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite.
# pytest's exit code 5 ("no tests collected") is a failure here: a suite that
# runs nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-test.txt || exit 1
.venv/bin/python -m pytest "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests (exit 5): failing." >&2
  exit 1
fi
exit "$rc"
