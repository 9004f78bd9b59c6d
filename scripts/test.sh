#!/usr/bin/env bash
# Sets up the environment if needed, then runs the whole test suite: the fast
# tier (-m "not slow", what a bare `pytest` runs) and then the slow tier
# (end-to-end experiments, the full one-pass x method matrix, long toy runs),
# each on 2 worker processes (pytest-xdist). Extra arguments replace the tiers:
#   bash scripts/test.sh tests/test_objectives.py -m "slow or not slow"
# pytest's exit code 5 ("no tests collected") is a failure here: a tier that
# runs nothing must not pass.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements-test.txt || exit 1

# The fast tier hands out whole files (a file's shared programs compile once:
# tests/conftest.py); the slow tier hands out single tests, longest files
# first, because its files hold minutes-long tests that one worker would run
# in series (test_backbone_models' slow tests, about 11 minutes).
run() {
  local dist=$1
  shift
  .venv/bin/python -m pytest -n "${MTLJAX_TEST_WORKERS:-2}" --dist "$dist" \
    --no-loadscope-reorder "$@"
  local rc=$?
  if [ "$rc" -eq 5 ]; then
    echo "pytest collected no tests (exit 5) for: $*" >&2
    return 1
  fi
  return "$rc"
}

if [ "$#" -gt 0 ]; then
  run loadfile "$@"
  exit $?
fi
echo "== fast tier (-m 'not slow') =="
run loadfile -m "not slow" --durations=15 || exit $?
echo "== slow tier (-m slow) =="
run load -m slow --durations=25
