r"""Scale-out benchmarks: the task axis at T = 1024, and many seeds in one program.

    python -m experiments.bench_mesh [--tasks=1024] [--steps=20]

Table 1 -- one train step of a multi-head MLP with T regression heads on shared
inputs (equal weighting, K = T), on a (data=1, task=D) mesh of D fake CPU
devices, D in 1, 2, 4, 8 (each D in a process of its own, ``XLA_FLAGS`` set
before jax is imported): ms/step, and per device the bytes of the step's
arguments (parameters, optimizer state, data) and its scratch memory, from
the compiled step's memory analysis. On one CPU the fake devices share the
same cores, so time does not improve with D; what the task axis buys is
per-device memory.

Table 2 -- seeds per second for ``num_seeds`` N in 1, 8, 32 as one vmapped
program, against a Python loop over N single-seed programs (the same step),
on the default device. Reference in the same script: a 1024^2 matmul's GFLOP/s.
"""

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_TASKS = flags.DEFINE_integer("tasks", 1024, "Number of tasks T (table 1).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed calls per row.")
_DEVICES = flags.DEFINE_integer("devices", 0, "Internal: run table 1's row for D devices.")
_SEEDS = flags.DEFINE_list("seeds", ["1", "8", "32"], "num_seeds values (table 2).")

B, D_IN, H, SPC = 64, 32, (64, 64), 5


def _problem(num_tasks: int):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mtljax import tasks  # pylint: disable=g-import-not-at-top
  from mtljax.data import specs  # pylint: disable=g-import-not-at-top
  from mtljax.data import task_data  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  n = 512
  cols = {"x": rng.normal(size=(n, D_IN)).astype(np.float32)}
  columns = []
  for t in range(num_tasks):
    cols[f"y{t}"] = (cols["x"] @ rng.normal(size=D_IN)).astype(np.float32)
    columns.append(specs.TaskColumn(tasks.Task(f"t{t}", "regression"), f"y{t}"))
  return task_data.build_task_data("bench", specs.DataSpec("x", tuple(columns)),
                                   {"train": cols, "test": cols})


def _step_fn(data, placement, steps_per_call=SPC):
  from mtljax import optim, steps, tasks  # pylint: disable=g-import-not-at-top
  from mtljax.data import sampling  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, (D_IN,), hidden=H)
  tx = optim.make_optimizer("adam", lr=1e-3)
  sampler = sampling.make_sampler(ts, sampling.task_probabilities("uniform", data.num_train),
                                  len(ts), B, shared_inputs=True)
  fn = steps.make_train_step(model, tx, "fixed", sampler, weights=tasks.task_weights(ts, None),
                             steps_per_call=steps_per_call, placement=placement)
  return model, tx, fn


def _time(step, state, data, calls):
  import jax  # pylint: disable=g-import-not-at-top
  state, _ = step(state, data)  # compile
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(calls):
    state, _ = step(state, data)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / calls, state


def _mesh_row(devices: int, num_tasks: int, calls: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from mtljax import sharding, steps  # pylint: disable=g-import-not-at-top
  data = _problem(num_tasks)
  placement = sharding.Placement(sharding.make_mesh(1, devices))
  model, tx, fn = _step_fn(data, placement)
  state = steps.init_train_state(model, tx, jax.random.key(0))
  step, state, train = sharding.prepare_train_step(fn, state, data.train, num_tasks, placement)
  mem = step.lower(state, train).compile().memory_analysis()
  sec, _ = _time(step, state, train, calls)
  return {"devices": devices, "ms_per_step": 1e3 * sec / SPC,
          "argument_mib_per_device": mem.argument_size_in_bytes / 2**20,
          "scratch_mib_per_device": mem.temp_size_in_bytes / 2**20,
          "params_mib_total": sum(x.nbytes for x in jax.tree.leaves(state.params)) / 2**20}


def _seeds_rows(seeds, calls: int) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mtljax import sharding, steps  # pylint: disable=g-import-not-at-top
  data = _problem(8)  # one device: the placement only names the (1 x 1) mesh
  placement = sharding.Placement(sharding.make_mesh())
  rows = []
  for n in seeds:
    model, tx, fn = _step_fn(data, placement)
    states = [steps.init_train_state(model, tx, jax.random.key(s + 1))._replace(
        rng=jax.random.key_data(jax.random.key(s))) for s in range(n)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
    # Placed before the loop with the step's shardings: one compilation each.
    data_sh = placement.data(data.train, len(data.taskset))
    train = sharding.place(data.train, data_sh)
    stacked_sh = placement.state(stacked, lead=1)
    vstep = sharding.jit_train_step(jax.vmap(fn, in_axes=(0, None)), stacked_sh, data_sh,
                                    placement)
    sec_v, _ = _time(vstep, sharding.place(stacked, stacked_sh), train, calls)
    one_sh = placement.state(states[0])
    step = sharding.jit_train_step(fn, one_sh, data_sh, placement)
    states = [sharding.place(st, one_sh) for st in states]
    _, states[0] = _time(step, states[0], train, 1)  # compile once
    assert vstep._cache_size() == 1  # pylint: disable=protected-access
    t0 = time.perf_counter()
    for _ in range(calls):
      states = [step(s, train)[0] for s in states]
    jax.block_until_ready(states)
    sec_loop = (time.perf_counter() - t0) / calls
    assert step._cache_size() == 1  # pylint: disable=protected-access
    rows.append({"num_seeds": n, "vmapped_seed_steps_per_s": n * SPC / sec_v,
                 "loop_seed_steps_per_s": n * SPC / sec_loop, "speedup": sec_loop / sec_v})
  return rows


def _matmul_gflops() -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  a = jnp.ones((1024, 1024), jnp.float32)
  mm = jax.jit(lambda a: a @ a)
  mm(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(20):
    mm(a).block_until_ready()
  return 2 * 1024**3 * 20 / (time.perf_counter() - t0) / 1e9


def main(argv):
  del argv
  if _DEVICES.value:  # a child: one row of table 1
    print(json.dumps(_mesh_row(_DEVICES.value, _TASKS.value, _STEPS.value)))
    return
  rows = []
  for d in (1, 2, 4, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "experiments.bench_mesh", f"--devices={d}",
                          f"--tasks={_TASKS.value}", f"--steps={_STEPS.value}"], env=env,
                         capture_output=True, text=True, check=True)
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  import jax  # pylint: disable=g-import-not-at-top
  print(f"jax {jax.__version__}, {jax.default_backend()}, matmul 1024^2: "
        f"{_matmul_gflops():.1f} GFLOP/s")
  print(f"\nTable 1: T = {_TASKS.value} heads, multi-head MLP {D_IN}-{H[0]}-{H[1]}, B = {B} "
        f"shared, K = T, equal weighting, mesh (data=1, task=D), {SPC} steps per call")
  print(f"{'D':>3} {'ms/step':>9} {'args MiB/dev':>13} {'scratch MiB/dev':>16} "
        f"{'params MiB total':>17}")
  for r in rows:
    print(f"{r['devices']:>3} {r['ms_per_step']:>9.2f} {r['argument_mib_per_device']:>13.2f} "
          f"{r['scratch_mib_per_device']:>16.2f} {r['params_mib_total']:>17.2f}")
  seeds = _seeds_rows([int(s) for s in _SEEDS.value], _STEPS.value)
  print(f"\nTable 2: seeds x steps per second, T = 8 heads, one device; vmapped "
        f"num_seeds vs a Python loop over seeds")
  print(f"{'N':>4} {'vmapped':>10} {'loop':>10} {'speedup':>8}")
  for r in seeds:
    print(f"{r['num_seeds']:>4} {r['vmapped_seed_steps_per_s']:>10.0f} "
          f"{r['loop_seed_steps_per_s']:>10.0f} {r['speedup']:>8.2f}")


if __name__ == "__main__":
  app.run(main)
