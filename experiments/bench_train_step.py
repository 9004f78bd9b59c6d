r"""Steps/second of the compiled multi-task train step, per architecture.

    python -m experiments.bench_train_step [--encoders=mlp,cnn] [--steps=200] \
        [--json=out.json]

Synthetic data (no TFDS): T tasks of 10-class classification on one shared
input; K = T tasks per step, B examples per task, Adam. Times only the compiled
step (after one warm-up call), for each ``steps_per_call`` (1 = a plain step,
>1 = ``lax.scan`` over steps). Prints a
table; record it in BUILD_NOTES.md with the machine it ran on.
"""

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np

from mtljax import optim
from mtljax import precision
from mtljax import sharding
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask

_ENCODERS = flags.DEFINE_list("encoders", ["mlp", "cnn"], "Encoders to time.")
_ARCHS = flags.DEFINE_list("archs", list(multitask.archs()), "Architectures to time.")
_TASKS = flags.DEFINE_list("num_tasks", ["2", "8"], "Numbers of tasks T.")
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps per configuration.")
_SPC = flags.DEFINE_list("steps_per_call", ["1", "50"],
                         "Steps per host call (1 = no loop; >1 = lax.scan).")
_BATCH = flags.DEFINE_integer("examples_per_task", 64, "B.")
_JSON = flags.DEFINE_string("json", "", "Write the rows as JSON here.")
_PRECISION = flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16"],
                               "The model's compute dtype (mtljax/precision.py).")


def _data(num_tasks, input_shape, n=2048):
  rng = np.random.default_rng(0)
  cols = {"x": rng.normal(size=(n,) + input_shape).astype(np.float32)}
  columns = []
  for t in range(num_tasks):
    cols[f"y{t}"] = rng.integers(0, 10, n)
    columns.append(specs.TaskColumn(tasks.Task(f"t{t}", "classification", 10), f"y{t}"))
  spec = specs.DataSpec("x", tuple(columns))
  return task_data.build_task_data("bench", spec, {"train": cols, "test": cols})


def _time(arch, encoder, num_tasks, spc):
  shape = (12, 16) if encoder == "cnn" else (64,)
  data = _data(num_tasks, shape)
  model = precision.mixed(multitask.make_model(
      arch, data.taskset, shape, encoder=encoder, hidden=(128,) if encoder == "cnn" else (256, 256),
      channels=(16, 32)), _PRECISION.value)
  tx = optim.make_optimizer("adam", lr=1e-3)
  placement = sharding.Placement(sharding.make_mesh())
  sampler = sampling.make_sampler(
      data.taskset, sampling.task_probabilities("uniform", data.num_train), num_tasks,
      _BATCH.value)
  fn = steps.make_train_step(model, tx, "fixed", sampler,
                             weights=tasks.task_weights(data.taskset, None), steps_per_call=spc,
                             placement=placement)
  step, state, d = sharding.prepare_train_step(
      fn, steps.init_train_state(model, tx, jax.random.key(0)), data.train, num_tasks,
      placement)
  t0 = time.perf_counter()
  state, _ = step(state, d)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - t0
  calls = max(1, _STEPS.value // spc)
  t0 = time.perf_counter()
  for _ in range(calls):
    state, _ = step(state, d)
  jax.block_until_ready(state)
  return calls * spc / (time.perf_counter() - t0), compile_s


def main(argv):
  del argv
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}, B={_BATCH.value}, {_PRECISION.value}")
  print(f"{'encoder':8} {'arch':15} {'T=K':>4} {'steps/call':>10} {'steps/s':>9} "
        f"{'ms/step':>8} {'compile s':>9}")
  rows = []
  for encoder in _ENCODERS.value:
    for arch in _ARCHS.value:
      for t in _TASKS.value:
        for spc in _SPC.value:
          rate, comp = _time(arch, encoder, int(t), int(spc))
          print(f"{encoder:8} {arch:15} {t:>4} {spc:>10} {rate:9.1f} {1000 / rate:8.2f} "
                f"{comp:9.2f}", flush=True)
          rows.append({"encoder": encoder, "arch": arch, "num_tasks": int(t),
                       "steps_per_call": int(spc), "examples_per_task": _BATCH.value,
                       "precision": _PRECISION.value,
                       "steps_per_s": rate, "ms_per_step": 1000 / rate,
                       "compile_s": comp})
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"backend": jax.default_backend(), "precision": _PRECISION.value,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
