r"""The driver of ``scripts/device_check.sh``: the device and versions, the
three step benchmarks in float32 and bfloat16 (``bench_objectives``,
``bench_train_step``, and ``bench_dense_step``: LibMTL's NYUv2 model,
ResNet-50 dilated + three DeepLab heads at 288x384, B = 8, with equal
weighting, PCGrad and MGDA-UB against a plain JAX step, and XLA's memory
analysis of each; a tiny FCN stand-in on CPU), XLA's cost analysis of the
steps against an H100's peak, one JSON file and a short table.

    python -m experiments.device_check [--tiny] [--out=device_check.json]

Sizes: full on an accelerator; ``--tiny`` (the default when the backend is
the CPU) gives every benchmark a few small configurations, so the check runs
on CPU in CI and cannot rot.

The benchmarks run as processes of their own (``experiments.bench_objectives``,
``experiments.bench_train_step`` and ``experiments.bench_dense_step`` with
``--json``); their rows are copied into the report under ``benchmarks``.

Cost analysis (``cost_analysis``): for each step -- the default experiment's
(``experiments/configs/multi_digits.py``, its train step as the loop compiles
it, ``steps_per_call`` steps per call) and the benchmarks' -- the compiled
program's ``flops`` and ``bytes accessed`` as XLA counts them for *this*
backend (``jax.jit(f).lower(...).compile().cost_analysis()``) of a program
of one step: XLA counts a ``while`` loop's body once, whatever its trip count,
so the programs of ``steps_per_call > 1`` (``lax.scan``) would be undercounted
by that factor; each step here is built with one step per call. From them, per step, the lower bounds on an H100 SXM
(:data:`H100`): ``flops / 67 TFLOP/s`` (float32 on CUDA cores), ``flops / 989
TFLOP/s`` (dense bfloat16 on tensor cores), ``bytes / 3.35 TB/s`` (HBM3), and
the roofline bound ``max(compute, memory)`` in float32. These are bounds, not
predictions: a small step is bound by kernel launches and per-op latency (some
microseconds per kernel), which the counts do not see, and the bytes XLA
counts on CPU are those of the CPU's fusions (a GPU's fusions differ; rerun
there for its own counts -- the script does when it runs on a GPU).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

_TINY = flags.DEFINE_bool("tiny", None, "Tiny sizes (default: when the backend is the CPU).")
_OUT = flags.DEFINE_string("out", "device_check.json", "The JSON report.")
_DEFAULT = flags.DEFINE_bool("default_experiment", True,
                             "Include the default experiment's step in the cost analysis "
                             "(builds its bundled data on first use).")

PRECISIONS = ("float32", "bfloat16")  # every benchmark runs in both (mtljax/precision.py)

# H100 SXM5 peaks (NVIDIA's data sheet; dense, no sparsity).
H100 = {"name": "H100 SXM5", "fp32_flops": 67e12, "bf16_flops": 989e12, "hbm_bytes": 3.35e12}

# What each mode runs: the benchmarks' command-line flags.
SIZES = {
    "tiny": {
        "bench_objectives": ["--num_tasks=2", "--rounds=1", "--calls=2",
                             "--methods=pcgrad+shared"],
        "bench_train_step": ["--encoders=mlp", "--archs=multi_head", "--num_tasks=2",
                             "--steps=20", "--steps_per_call=5", "--examples_per_task=16"],
        "bench_dense_step": ["--encoder=fcn", "--size=16x20", "--batch=2", "--calls=2",
                             "--rounds=1", "--methods=fixed"],
        "objective_costs": ("pcgrad+shared",),
        "objective_tasks": 2,
    },
    "full": {
        "bench_objectives": ["--num_tasks=4", "--rounds=3", "--calls=10",
                             "--methods=plain:equal,fixed,fixed+shared,pcgrad+shared,"
                             "cagrad+shared,mgda+shared,nash_mtl+shared,famo+shared,"
                             "mgda@accumulate+shared,pcgrad+shared/vmap,"
                             "plain:per-task:pcgrad,plain:per-task:mgda"],
        "bench_train_step": ["--encoders=mlp,cnn", "--archs=multi_head,mtan",
                             "--num_tasks=8", "--steps=200", "--steps_per_call=1,50"],
        "bench_dense_step": ["--encoder=resnet50", "--size=288x384", "--batch=8",
                             "--calls=5", "--rounds=3", "--methods=fixed,pcgrad,mgda_ub"],
        "objective_costs": ("fixed+shared", "pcgrad+shared", "mgda@accumulate+shared"),
        "objective_tasks": 4,
    },
}


def environment() -> dict:
  """The device(s) and the versions."""
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  out = {"backend": jax.default_backend(), "device_count": len(devices),
         "device_kind": devices[0].device_kind, "devices": [str(d) for d in devices],
         "python": platform.python_version(), "platform": platform.platform(),
         "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                      "flax": flax.__version__, "optax": optax.__version__,
                      "orbax-checkpoint": getattr(ocp, "__version__", "?"),
                      "numpy": np.__version__}}
  stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
  if stats and "bytes_limit" in stats:
    out["memory_gib"] = round(stats["bytes_limit"] / 2**30, 2)
  return out


def run_benchmark(module: str, args: list[str], path: str) -> tuple[list[dict], float]:
  """``python -m experiments.MODULE ARGS --json=PATH`` (its table printed as
  it goes); its rows and wall seconds."""
  t0 = time.perf_counter()
  cmd = [sys.executable, "-m", f"experiments.{module}", *args, f"--json={path}"]
  print(f"\n$ {' '.join(cmd)}", flush=True)
  subprocess.run(cmd, check=True)
  with open(path) as f:
    return json.load(f)["rows"], time.perf_counter() - t0


def cost(compiled) -> dict:
  """XLA's flops and bytes accessed of a one-step program, and the H100 bounds."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per program
    ca = ca[0]
  flops = float(ca.get("flops", 0.0))
  nbytes = float(ca.get("bytes accessed", 0.0))
  t_fp32, t_bf16 = flops / H100["fp32_flops"], flops / H100["bf16_flops"]
  t_mem = nbytes / H100["hbm_bytes"]
  return {"flops_per_step": flops, "bytes_per_step": nbytes,
          "flops_per_byte": flops / nbytes if nbytes else None,
          "h100_us_fp32_compute": 1e6 * t_fp32, "h100_us_bf16_compute": 1e6 * t_bf16,
          "h100_us_memory": 1e6 * t_mem,
          "h100_us_roofline_fp32": 1e6 * max(t_fp32, t_mem),
          "h100_steps_per_s_bound_fp32": 1.0 / max(t_fp32, t_mem, 1e-12)}


def objective_costs(entries, num_tasks: int) -> list[dict]:
  """The cost of ``bench_objectives``' steps (its problem, :mod:`experiments.bench_common`)."""
  from experiments import bench_common as bc  # pylint: disable=g-import-not-at-top
  data = bc.bench_data(num_tasks)
  rows, spc = [], bc.SPC
  bc.SPC = 1  # one step per program (see the module's docstring)
  try:
    for entry in entries:
      step, state, d = bc.mtljax_step(entry, data)
      rows.append({"step": f"bench_objectives {entry} T={num_tasks} B={bc.B}",
                   **cost(step.lower(state, d).compile())})
  finally:
    bc.SPC = spc
  return rows


def train_step_costs(tiny: bool) -> list[dict]:
  """The cost of ``bench_train_step``'s step (multi_head, T = 2, one step per
  call; the MLP, and the CNN unless tiny), built as that benchmark builds it."""
  from mtljax import optim, sharding, steps, tasks  # pylint: disable=g-import-not-at-top
  from mtljax.data import sampling, specs, task_data  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  rows = []
  batch = 16 if tiny else 64
  for encoder in ("mlp",) if tiny else ("mlp", "cnn"):
    shape = (12, 16) if encoder == "cnn" else (64,)
    rng = np.random.default_rng(0)
    cols = {"x": rng.normal(size=(256,) + shape).astype(np.float32)}
    columns = []
    for t in range(2):
      cols[f"y{t}"] = rng.integers(0, 10, 256)
      columns.append(specs.TaskColumn(tasks.Task(f"t{t}", "classification", 10), f"y{t}"))
    data = task_data.build_task_data("bench", specs.DataSpec("x", tuple(columns)),
                                     {"train": cols, "test": cols})
    model = multitask.make_model("multi_head", data.taskset, shape, encoder=encoder,
                                 hidden=(128,) if encoder == "cnn" else (256, 256),
                                 channels=(16, 32))
    tx = optim.make_optimizer("adam", lr=1e-3)
    placement = sharding.Placement(sharding.make_mesh())
    sampler = sampling.make_sampler(
        data.taskset, sampling.task_probabilities("uniform", data.num_train), 2, batch)
    fn = steps.make_train_step(model, tx, "fixed", sampler,
                               weights=tasks.task_weights(data.taskset, None),
                               placement=placement)
    step, state, d = sharding.prepare_train_step(
        fn, steps.init_train_state(model, tx, jax.random.key(0)), data.train, 2, placement)
    rows.append({"step": f"bench_train_step {encoder} multi_head T=2 B={batch}",
                 **cost(step.lower(state, d).compile())})
  return rows


def default_experiment_cost(compute: str = "float32") -> dict:
  """The cost of the default experiment's step (``scripts/run_default.sh``:
  multi_digits, CNN, multi_head), compiled as the loop compiles it (with one
  step per call: see the module's docstring)."""
  from experiments.configs import multi_digits  # pylint: disable=g-import-not-at-top
  from mtljax import build, train  # pylint: disable=g-import-not-at-top
  config = multi_digits.get_config()
  config.steps_per_call, config.precision = 1, compute
  data = build.data_from_config(config)
  run = build.build_run(config, data)
  feed = train.DeviceFeed(config, data, run)
  guard = train.initial_guard(len(data.taskset), run.num_seeds)
  compiled = feed.train_step.lower((run.state, guard), feed.next()).compile()
  return {"step": f"default experiment {compute} (multi_digits, {config.model.encoder}, "
                  f"{config.model.arch}, B={config.sampling.examples_per_task})",
          **cost(compiled)}


def table(report: dict) -> str:
  """The short table: benchmarks' steps/s, then the cost analysis."""
  lines = [f"device_check: {report['device_kind']} x{report['device_count']} "
           f"({report['backend']}), jax {report['versions']['jax']}, mode {report['mode']}"]
  lines.append(f"{'benchmark row':52} {'ms/step':>9} {'steps/s':>9}")
  for name, rows in report["benchmarks"].items():
    for r in rows:
      label = r.get("entry") or (f"{r['encoder']} {r['arch']} T={r['num_tasks']} "
                                 f"spc={r['steps_per_call']}")
      if r.get("ms_per_step"):
        lines.append(f"{name[6:] + ' ' + label:52} {r['ms_per_step']:9.3f} "
                     f"{1000 / r['ms_per_step']:9.1f}")
  lines.append(f"{'cost analysis, per step':52} {'MFLOP':>9} {'MB':>9} {'H100 us':>9}")
  for r in report["cost_analysis"]:
    lines.append(f"{r['step'][:52]:52} {r['flops_per_step'] / 1e6:9.2f} "
                 f"{r['bytes_per_step'] / 1e6:9.2f} {r['h100_us_roofline_fp32']:9.3f}")
  return "\n".join(lines)


def main(argv):
  del argv
  t0 = time.perf_counter()
  env = environment()
  tiny = _TINY.value if _TINY.value is not None else env["backend"] == "cpu"
  mode = "tiny" if tiny else "full"
  sizes = SIZES[mode]
  print(json.dumps(env, indent=2), flush=True)
  out_dir = os.path.dirname(os.path.abspath(_OUT.value))
  os.makedirs(out_dir, exist_ok=True)
  report = {**env, "mode": mode, "h100_peaks": H100, "benchmarks": {}, "wall_s": {}}
  for bench in ("bench_objectives", "bench_train_step", "bench_dense_step"):
    for p in PRECISIONS:
      path = os.path.join(out_dir, f".{bench}.json")
      rows, wall = run_benchmark(bench, sizes[bench] + [f"--precision={p}"], path)
      os.remove(path)
      report["benchmarks"][f"{bench}:{p}"], report["wall_s"][f"{bench}:{p}"] = rows, round(wall, 2)
  t1 = time.perf_counter()
  costs = objective_costs(sizes["objective_costs"], sizes["objective_tasks"])
  costs += train_step_costs(tiny)
  if _DEFAULT.value:
    costs += [default_experiment_cost(p) for p in PRECISIONS]
  report["cost_analysis"] = costs
  report["wall_s"]["cost_analysis"] = round(time.perf_counter() - t1, 2)
  report["wall_s"]["total"] = round(time.perf_counter() - t0, 2)
  with open(_OUT.value, "w") as f:
    json.dump(report, f, indent=2)
  print("\n" + table(report))
  print(f"\nwrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
