#!/usr/bin/env bash
# Sets up the environment if needed, then runs the default experiment: multi-task
# training on the bundled handwritten-digit data (two tasks), printing per-task
# test metrics. Extra arguments are passed to experiments.main.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
exec .venv/bin/python -m experiments.main \
  --config=experiments/configs/multi_digits.py \
  --workdir="${WORKDIR:-workdirs/multi_digits}" "$@"
