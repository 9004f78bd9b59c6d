r"""Steps/second of every objective method, against plain-JAX references timed
in the same run.

    taskset -c 0 env XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \
        intra_op_parallelism_threads=1" python -m experiments.bench_objectives \
        [--num_tasks=4] [--methods=...] [--json=out.json]

Problem (issue 3's, and the LibMTL comparison's): T tasks on one shared input
x in R^64 (half regression, half 10-class classification), MLP encoder
64 -> 256 -> 256 with linear per-task heads (multi_head), B = 256 examples,
K = T tasks per step, Adam 1e-3, 10 steps per call under ``lax.scan``.

A method entry is ``NAME[@accumulate][+shared][/vmap]``: ``@accumulate`` uses
the memory-light Gram path, ``+shared`` one example batch for every task
(``shared_inputs``: the trunk then runs once per step; implied by ``mgda_ub``),
``/vmap`` batches the K trunk backwards instead of looping (``slot_backwards``).

Reference rows, written here as plain JAX on the same data and model shapes:

* ``plain:equal`` -- the MLP and heads as one flat function, one backward of
  the summed loss, Adam, steps in ``lax.scan``;
* ``plain:per-task:NAME`` -- per-task gradients by ``vmap`` of ``jax.grad``
  (one per task group), then the same combiner (Gram weights of
  :data:`mtljax.gradients.REGISTRY`), Adam, steps in ``lax.scan``.

Timing: every configuration is compiled first, then timed in ``--rounds``
interleaved rounds (round-robin over configurations, so machine noise hits them
alike); the table reports each one's median. Columns: ms/step, steps/s, the
ratio to ``plain:equal``, to the matching ``plain:per-task`` row and to
``fixed+shared``, compile seconds, solver failures, and the compiled step's
scratch memory (XLA ``temp_size_in_bytes``).
"""

import json
import os
import time

from absl import app
from absl import flags
import jax
import numpy as np

from experiments import bench_common as bc
from mtljax import objectives

_TASKS = flags.DEFINE_integer("num_tasks", 4, "Number of tasks T (K = T).")
_METHODS = flags.DEFINE_list(
    "methods", ["plain:equal", "fixed", "fixed+shared"]
    + [m + "+shared" for m in objectives.methods() if m not in ("fixed", "mgda_ub")]
    + ["mgda_ub", "mgda@accumulate+shared", "pcgrad+shared/vmap",
       "auto_lambda#meta_grad=finite_difference+shared"]
    + [f"plain:per-task:{m}" for m in ("pcgrad", "cagrad", "mgda", "nash_mtl")],
    "Rows: NAME[#key=value...][@accumulate][+shared][/vmap] or plain:equal / "
    "plain:per-task:NAME.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds.")
_CALLS = flags.DEFINE_integer("calls", 10, "Host calls per round (10 steps each).")
_JSON = flags.DEFINE_string("json", "", "Write the rows as JSON here.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                               "The mtljax rows' compute dtype (mtljax/precision.py); the "
                               "plain-JAX rows stay float32.")


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def _prepare(entry, data):
  if entry.startswith("plain:"):
    step, state, d = bc.plain_step(entry, data)
  else:
    step, state, d = bc.mtljax_step(entry, data, _PRECISION.value)
  t0 = time.perf_counter()
  compiled = step.lower(state, d).compile()
  stats = compiled.memory_analysis()
  state, _ = step(state, d)
  jax.block_until_ready(state)
  return {"entry": entry, "step": step, "state": state, "data": d,
          "compile_s": time.perf_counter() - t0,
          "scratch_mib": stats.temp_size_in_bytes / 2**20 if stats is not None else None,
          "times": [], "failures": 0.0}


def _time_round(row, calls):
  step, state, d = row["step"], row["state"], row["data"]
  t0 = time.perf_counter()
  for _ in range(calls):
    state, meas = step(state, d)
  jax.block_until_ready(state)
  row["times"].append((time.perf_counter() - t0) / (calls * bc.SPC))
  row["state"] = state
  if "solver_failures" in meas:
    row["failures"] += float(np.sum(meas["solver_failures"]))


def _ratio(a, b):
  return f"{a / b:8.2f}" if a and b else f"{'-':>8}"


def main(argv):
  del argv
  data = bc.bench_data(_TASKS.value)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, T=K={_TASKS.value}, "
        f"B={bc.B}, MLP {bc.D}-{bc.H}-{bc.H}, steps/call={bc.SPC}, {_PRECISION.value}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"cpus={sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}")
  rows = [_prepare(e, data) for e in _METHODS.value]
  for _ in range(_ROUNDS.value):
    for row in rows:
      _time_round(row, _CALLS.value)
  rate = {r["entry"]: 1.0 / float(np.median(r["times"])) for r in rows}
  print(f"{'method':28} {'ms/step':>8} {'steps/s':>8} {'x plain':>8} {'x plain/pt':>10} "
        f"{'x fixed+sh':>10} {'compile s':>9} {'fails':>6} {'MiB':>7}")
  out = []
  for r in rows:
    e = r["entry"]
    method = bc.parse_entry(e)[0] if not e.startswith("plain:") else None
    pt = rate.get(f"plain:per-task:{method}")
    rec = {"entry": e, "ms_per_step": 1000.0 / rate[e], "steps_per_s": rate[e],
           "vs_plain_equal": rate[e] / rate["plain:equal"] if "plain:equal" in rate else None,
           "vs_plain_per_task": rate[e] / pt if pt else None,
           "vs_fixed_shared": (rate[e] / rate["fixed+shared"] if "fixed+shared" in rate
                               else None),
           "compile_s": r["compile_s"], "solver_failures": r["failures"],
           "scratch_mib": r["scratch_mib"], "times_s": r["times"]}
    out.append(rec)
    print(f"{e:28} {rec['ms_per_step']:8.3f} {rate[e]:8.1f} "
          f"{_ratio(rate[e], rate.get('plain:equal')):>8} "
          f"{_ratio(rate[e], pt):>10} {_ratio(rate[e], rate.get('fixed+shared')):>10} "
          f"{r['compile_s']:9.2f} {r['failures']:6.0f} "
          f"{r['scratch_mib'] if r['scratch_mib'] is not None else float('nan'):7.1f}",
          flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"num_tasks": _TASKS.value, "backend": jax.default_backend(),
                 "precision": _PRECISION.value,
                 "xla_flags": os.environ.get("XLA_FLAGS", ""), "rows": out}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
