r"""Steps/second of every objective method (issue 3's benchmark problem).

    python -m experiments.bench_objectives [--num_tasks=4,16,64] [--steps=100]

Problem: T tasks on one shared input x in R^64 (half regression, half 10-class
classification), MLP encoder 64 -> 256 -> 256 with linear per-task heads
(multi_head), B = 256 examples per task, K = T tasks per step, Adam 1e-3.
Times the compiled train step after a warm-up call and prints a table with each
method's step time relative to ``fixed`` (equal weighting) and the compiled
step's scratch memory (XLA's ``temp_size_in_bytes``).

A method entry is ``NAME[@accumulate][+shared]``: ``@accumulate`` uses the
memory-light Gram path (``config.objective.gram_path``), ``+shared`` one
example batch for every task (``config.sampling.shared_inputs``; implied by
``mgda_ub``, which needs it, so compare it with ``fixed+shared``).
"""

import time

from absl import app
from absl import flags
import jax
import numpy as np

from mtljax import objectives
from mtljax import optim
from mtljax import tasks
from mtljax import train
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.models import multitask

_TASKS = flags.DEFINE_list("num_tasks", ["4", "16", "64"], "Numbers of tasks T.")
_METHODS = flags.DEFINE_list(
    "methods", list(objectives.METHODS) + [
        "mgda@accumulate", "cagrad@accumulate", "nash_mtl@accumulate", "fixed+shared"],
    "Methods to time: NAME[@accumulate][+shared].")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed steps per configuration.")
_SPC = flags.DEFINE_integer("steps_per_call", 10, "Steps per host call.")


def _data(num_tasks, n=4096):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 64)).astype(np.float32)
  cols, columns = {"x": x}, []
  for t in range(num_tasks):
    if t % 2 == 0:
      cols[f"y{t}"] = (x @ rng.normal(size=64)).astype(np.float32)
      columns.append(loading.TaskColumn(tasks.Task(f"reg{t}", "regression"), f"y{t}"))
    else:
      cols[f"y{t}"] = np.argmax(x @ rng.normal(size=(64, 10)), axis=1)
      columns.append(loading.TaskColumn(tasks.Task(f"cls{t}", "classification", 10),
                                        f"y{t}"))
  return loading.build_task_data("bench", loading.DataSpec("x", tuple(columns)),
                                 {"train": cols, "test": cols})


def _variant(entry):
  method, shared = entry.removesuffix("+shared"), entry.endswith("+shared")
  method, _, path = method.partition("@")
  return method, path or "jacobian", shared or method == "mgda_ub"


def _time(entry, data):
  method, gram_path, shared = _variant(entry)
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, (64,), hidden=(256, 256))
  tx = optim.make_optimizer("adam", lr=1e-3)
  fn = train.make_train_step(
      model, tx, task_probs=sampling.task_probabilities("uniform", data.num_train),
      weights=tasks.task_weights(ts, None), tasks_per_step=len(ts), examples_per_task=256,
      steps_per_call=_SPC.value, objective=method,
      objective_kwargs={"gram_path": gram_path}, shared_inputs=shared)
  step = jax.jit(fn, donate_argnums=(0,))
  state = jax.device_put(train.init_train_state(model, tx, jax.random.key(0), method))
  d = jax.device_put(data.train)
  t0 = time.perf_counter()
  compiled = step.lower(state, d).compile()
  stats = compiled.memory_analysis()
  temp_mb = stats.temp_size_in_bytes / 2**20 if stats is not None else float("nan")
  state, _ = step(state, d)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  calls = max(1, _STEPS.value // _SPC.value)
  t0 = time.perf_counter()
  for _ in range(calls):
    state, meas = step(state, d)
  jax.block_until_ready(state)
  failures = float(np.sum(meas.get("solver_failures", 0.0)))
  return calls * _SPC.value / (time.perf_counter() - t0), compile_s, failures, temp_mb


def main(argv):
  del argv
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, B=256 per task, "
        f"MLP 64-256-256, K=T, steps/call={_SPC.value}")
  print(f"{'T':>3} {'method':22} {'steps/s':>8} {'ms/step':>8} {'x fixed':>8} "
        f"{'compile s':>9} {'solver fails':>12} {'scratch MiB':>11}")
  for t in _TASKS.value:
    data = _data(int(t))
    base = None
    for method in _METHODS.value:
      rate, comp, fails, temp_mb = _time(method, data)
      base = base or (1000 / rate if method == "fixed" else None)
      rel = f"{(1000 / rate) / base:8.2f}" if base else f"{'-':>8}"
      print(f"{t:>3} {method:22} {rate:8.1f} {1000 / rate:8.2f} {rel} {comp:9.2f} "
            f"{fails:12.0f} {temp_mb:11.1f}", flush=True)


if __name__ == "__main__":
  app.run(main)
