r"""How the compiled step scales with the number of tasks, and the FLOP rate it
reaches against a large matrix product timed in the same run.

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \
        intra_op_parallelism_threads=1" python -m experiments.bench_step_scaling \
        [--num_tasks=4,16,64,256,1024] [--json=out.json]

The problem of experiments/bench_objectives.py (shared input x in R^64, MLP
64 -> 256 -> 256, linear heads, half regression / half 10-class, B = 256,
shared inputs, K = T, Adam), for ``fixed+shared`` (equal weighting, the trunk
once per step) and ``mgda+shared`` (per-task gradients, Gram matrix, MGDA) on
the default and the memory-light (``accumulate``) Gram paths. Per T: ms/step,
ms/step/T (flat when linear in T), and the compiled step's scratch memory.

The FLOP rate: XLA's cost analysis of the compiled ``fixed+shared`` step
(FLOPs per step) over its measured time, against a 1024 x 1024 float32 matmul
timed in the same process -- the fraction of the machine's dense-matmul rate
the step reaches.
"""

import json
import time

from absl import app
from absl import flags
import jax

from experiments import bench_common as bench

_TASKS = flags.DEFINE_list("num_tasks", ["4", "16", "64", "256", "1024"], "Values of T.")
_ENTRIES = flags.DEFINE_list("entries", ["fixed+shared", "mgda+shared",
                                         "mgda@accumulate+shared"], "Rows per T.")
_MIN_SECONDS = flags.DEFINE_float("min_seconds", 2.0, "Timed seconds per row (at least).")
_OUT = flags.DEFINE_string("json", "", "Write the rows as JSON here.")


def _time(fn, *args, min_seconds):
  out = fn(*args)
  jax.block_until_ready(out)
  n, t0 = 0, time.perf_counter()
  while True:
    out = fn(*args)
    jax.block_until_ready(out)
    n += 1
    if time.perf_counter() - t0 >= min_seconds:
      return (time.perf_counter() - t0) / n, out


def _matmul_gflops(min_seconds):
  a = jax.random.normal(jax.random.key(0), (1024, 1024))
  mm = jax.jit(lambda a: a @ a)
  sec, _ = _time(mm, a, min_seconds=min_seconds)
  return 2 * 1024 ** 3 / sec / 1e9


def main(argv):
  del argv
  print(f"jax {jax.__version__}, backend {jax.default_backend()}")
  matmul = _matmul_gflops(_MIN_SECONDS.value)
  print(f"1024x1024 matmul: {matmul:.1f} GFLOP/s")
  print(f"{'T':>5} {'entry':24} {'ms/step':>9} {'ms/step/T':>10} {'scratch MiB':>11} "
        f"{'GFLOP/s':>8} {'x matmul':>8}")
  rows = []
  for t in map(int, _TASKS.value):
    data = bench.bench_data(t)
    for entry in _ENTRIES.value:
      step, state, d = bench.mtljax_step(entry, data)
      compiled = step.lower(state, d).compile()
      stats = compiled.memory_analysis()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      flops = float(cost.get("flops", float("nan"))) / bench.SPC  # per step
      holder = {"state": state}

      def call():
        holder["state"], _ = step(holder["state"], d)
        return holder["state"]
      sec, _ = _time(call, min_seconds=_MIN_SECONDS.value)
      ms = 1000 * sec / bench.SPC
      gflops = flops / (ms / 1000) / 1e9
      mib = stats.temp_size_in_bytes / 2**20 if stats is not None else float("nan")
      rows.append({"num_tasks": t, "entry": entry, "ms_per_step": ms,
                   "ms_per_step_per_task": ms / t, "scratch_mib": mib,
                   "flops_per_step": flops, "gflops": gflops,
                   "vs_matmul": gflops / matmul})
      print(f"{t:5d} {entry:24} {ms:9.3f} {ms / t:10.4f} {mib:11.1f} {gflops:8.1f} "
            f"{gflops / matmul:8.2f}", flush=True)
      del step, state, holder
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump({"matmul_gflops": matmul, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
