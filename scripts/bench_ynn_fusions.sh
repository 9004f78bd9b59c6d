#!/bin/bash
# XLA:CPU's YNNPACK fusions off (mtljax's default, mtljax/xla_workarounds.py)
# against on (jaxlib's default list): the dense-backbone and small train-step
# benchmarks, alternating, ROUNDS times (default 2). Run on an idle machine
# from the repository root; BUILD_NOTES.md ("XLA:CPU's YNNPACK fusions are
# off") has the numbers.
set -u
PY=${PY:-.venv/bin/python}
for r in $(seq "${ROUNDS:-2}"); do
  for mode in off on; do
    if [ "$mode" = on ]; then
      export XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_dot
    else
      unset XLA_FLAGS
    fi
    echo "=== round $r, fusions $mode: bench_dense_step ($(date +%T))"
    "$PY" -m experiments.bench_dense_step --methods=fixed,pcgrad,mgda_ub --calls=3 --rounds=3 \
      2>&1 | grep -v "libtpu"
    echo "=== round $r, fusions $mode: bench_train_step ($(date +%T))"
    "$PY" -m experiments.bench_train_step --encoders=mlp,cnn --archs=multi_head --num_tasks=2 \
      --steps=100 --steps_per_call=1 2>&1 | grep -v "libtpu"
  done
done
