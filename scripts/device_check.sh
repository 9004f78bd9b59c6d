#!/usr/bin/env bash
# Does mtljax work on this GPU/TPU, and how fast? One command from a fresh clone
# (issue 27; about 8 minutes on one GPU, under a minute on CPU in tiny mode):
#
#   bash scripts/device_check.sh [--tiny] [--out FILE] [--no-tests] [--no-install] \
#       [-- DRIVER FLAGS]
#
# 1. Sets up .venv (scripts/setup_env.sh) unless --no-install or $PYTHON is
#    given; with `nvidia-smi` present and a CPU-only jax, installs the CUDA
#    build of the same jax version (BUILD_NOTES "CUDA GPUs": jax[cuda12]);
#    on a TPU VM (/dev/accel0 or /dev/vfio present), jax[tpu].
# 2. Prints the device and the versions.
# 3. Runs the device-relevant tests by name (step equivalence, the loop's
#    donation / no-sync / non-finite stop, the run on the real device count,
#    checkpoint round trips, bfloat16 precision), deterministic XLA ops on GPU.
#    --no-tests skips.
# 4. Runs experiments/device_check.py: bench_objectives, bench_train_step and
#    bench_dense_step (ResNet-50 + DeepLab heads, 288x384, B=8)
#    in float32 and bfloat16 (tiny sizes on CPU or with --tiny), XLA's cost analysis of the default
#    experiment's step and the benchmarks' against an H100's peak; writes one
#    JSON file (--out, default device_check.json) and prints a short table.
set -euo pipefail
cd "$(dirname "$0")/.."

tiny="" out="device_check.json" tests=1 install=1
while [ $# -gt 0 ]; do
  case "$1" in
    --) shift; break ;;  # the rest: experiments.device_check's flags
    --tiny) tiny="--tiny" ;;
    --out) out="$2"; shift ;;
    --out=*) out="${1#--out=}" ;;
    --no-tests) tests=0 ;;
    --no-install) install=0 ;;
    *) echo "device_check.sh: unknown argument $1 (use --tiny, --out FILE, --no-tests," \
            "--no-install)" >&2; exit 2 ;;
  esac
  shift
done

start=$(date +%s)
if [ -n "${PYTHON:-}" ]; then
  py="$PYTHON"
else
  [ "$install" = 1 ] && bash scripts/setup_env.sh requirements-test.txt
  py=.venv/bin/python
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

backend() { "$py" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo none; }
jax_version=$("$py" -c "import jax; print(jax.__version__)")
if [ "$install" = 1 ] && [ -z "${PYTHON:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && [ "$(backend)" != gpu ]; then
    echo "device_check: nvidia-smi found, jax runs on $(backend): installing jax[cuda12]==$jax_version"
    "$py" -m pip install --quiet "jax[cuda12]==$jax_version"
  elif { [ -e /dev/accel0 ] || [ -d /dev/vfio ]; } && [ "$(backend)" != tpu ]; then
    echo "device_check: TPU device files found: installing jax[tpu]==$jax_version"
    "$py" -m pip install --quiet "jax[tpu]==$jax_version"
  fi
fi

echo "== device_check: device and versions"
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader || true
"$py" -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, \
'backend', jax.default_backend(), 'devices', jax.devices())"

if [ "$tests" = 1 ]; then
  echo "== device_check: device-relevant tests"
  # Bitwise comparisons need deterministic reductions on GPU (scatter-adds).
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_deterministic_ops=true" "$py" -m pytest -q \
    -p no:cacheprovider -m "slow or not slow" \
    "tests/test_accel.py::test_the_loop_reads_nothing_from_the_device_between_sync_points" \
    "tests/test_accel.py::test_a_run_with_donation_equals_the_run_without_bitwise" \
    "tests/test_accel.py::test_the_step_is_donated_and_the_loop_keeps_no_copy" \
    "tests/test_accel.py::test_the_non_finite_stop_is_that_of_a_call_by_call_check" \
    "tests/test_train.py::test_unsampled_tasks_heads_and_optimizer_state_are_bitwise_unchanged" \
    "tests/test_train.py::test_independent_equals_single_task_trainings" \
    "tests/test_train.py::test_train_step_traces_once" \
    "tests/test_train.py::test_eval_step_matches_numpy_over_unequal_task_sizes" \
    "tests/test_faults.py::test_a_non_finite_step_leaves_the_state_untouched_and_names_the_task" \
    "tests/test_experiments.py::test_interrupted_run_resumes_from_its_checkpoint_and_matches" \
    "tests/test_experiments.py::test_checkpoint_round_trips_a_trained_objective_state_bitwise" \
    "tests/test_seeds.py::test_seeds_resume_bitwise_after_an_interruption" \
    "tests/test_precision.py::test_bf16_computes_in_bf16_and_the_solver_gradients_and_state_are_float32" \
    "tests/test_precision.py::test_a_bf16_run_checkpoints_float32_and_ends_near_the_float32_run" \
    "tests/test_precision.py::test_a_bf16_run_resumes_bitwise"
fi

echo "== device_check: benchmarks and cost analysis"
"$py" -m experiments.device_check $tiny --out="$out" "$@"
echo "device_check: done in $(( $(date +%s) - start )) s"
