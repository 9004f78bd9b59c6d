r"""The dense-backbone train step (issues 26 and 27): LibMTL's NYUv2 model --
a dilated ResNet (output stride 8) shared by three dense tasks (13-class
segmentation, depth, normals), one DeepLab ASPP head per task, batch norm --
trained by mtljax's compiled step with equal weighting and per-task gradient
methods, against a plain JAX step of the same model (``jax.value_and_grad``
of the summed losses, batch statistics, Adam; one ``jit``).

Per method: milliseconds per step (median over interleaved rounds of the
mean of ``--calls`` calls), the ratio to the plain step (machine-independent),
and XLA's memory analysis of the compiled step (``temp``: the live
intermediates' peak, what rematerialisation would cut; ``args``: parameters,
optimizer state, the split; from ``compiled.memory_analysis()`` of this
backend's buffer assignment, so an accelerator's differs a little).

    python -m experiments.bench_dense_step                       # ResNet-18, 64x80, B=4
    python -m experiments.bench_dense_step --encoder=resnet50 --size=288x384 \
        --batch=8 --memory_only                                  # the issue's memory table
    python -m experiments.bench_dense_step --json=out.json --precision=bfloat16

Methods: ``fixed`` (one backward), ``pcgrad`` (per-task gradients of the
shared trunk: T trunk backwards through one linearisation), ``mgda_ub``
(per-task gradients of the representation, one trunk backward).
"""

from __future__ import annotations

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax import objectives
from mtljax import precision as precision_lib
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask

_ENCODER = flags.DEFINE_string("encoder", "resnet18",
                               "resnet18 | resnet34 | resnet50 | segnet (MTAN's widths) | "
                               "fcn (a tiny stand-in: the device check's CPU mode)")
_SIZE = flags.DEFINE_string("size", "64x80", "HxW of the images.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images per step (every task labels them).")
_METHODS = flags.DEFINE_list("methods", ["fixed", "pcgrad", "mgda_ub"], "Objectives.")
_CALLS = flags.DEFINE_integer("calls", 5, "Calls per timed round.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds.")
_PRECISION = flags.DEFINE_string("precision", "float32", "float32 | bfloat16")
_MEMORY_ONLY = flags.DEFINE_bool("memory_only", False, "Compile and report memory; no timing.")
_JSON = flags.DEFINE_string("json", "", "Write the rows here.")

CLASSES = 13


def dense_data(h: int, w: int, n: int) -> task_data.MultiTaskData:
  """``n`` random NYUv2-like examples (13 classes, depth, unit normals)."""
  rng = np.random.default_rng(0)
  normal = rng.normal(size=(n, h, w, 3))
  arrays = {"image": rng.normal(size=(n, h, w, 3)).astype(np.float32),
            "label": rng.integers(-1, CLASSES, (n, h, w)).astype(np.int32),
            "depth": rng.uniform(0.5, 10.0, (n, h, w, 1)).astype(np.float32),
            "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)
                       ).astype(np.float32)}
  spec = specs.DataSpec("image", (
      specs.TaskColumn(tasks.Task("segmentation", "segmentation", CLASSES), "label"),
      specs.TaskColumn(tasks.Task("depth", "depth"), "depth"),
      specs.TaskColumn(tasks.Task("normal", "normals"), "normal")))
  small = {k: v[:2] for k, v in arrays.items()}
  return task_data.build_task_data("bench_dense", spec, {"train": arrays, "test": small})


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  get = lambda name: int(getattr(m, name, 0) or 0)  # noqa: E731
  return {"temp_mib": get("temp_size_in_bytes") / 2**20,
          "args_mib": get("argument_size_in_bytes") / 2**20,
          "out_mib": get("output_size_in_bytes") / 2**20}


def build(model, data, method: str, batch: int):
  """mtljax's step, its initial state and the split, compiled."""
  ts = data.taskset
  sampler = sampling.make_sampler(ts, np.full(len(ts), 1 / len(ts)), len(ts), batch,
                                  False, True,
                                  draws=objectives.make_objective(method, len(ts)).draws)
  tx = optax.adam(1e-4)
  fn = steps.make_train_step(model, tx, method, sampler, weights=np.ones(len(ts), np.float32))
  state = jax.jit(lambda: steps.init_train_state(model, tx, jax.random.key(0), method))()
  split = jax.device_put(data.train)
  step = jax.jit(fn, donate_argnums=0)
  compiled = step.lower(state, split).compile()
  return compiled, state, split


def plain(model, data, batch: int):
  """The plain JAX step of the same model: value_and_grad of the summed
  slot losses on a fixed batch (the trunk once, every task's head on its
  features; batch statistics), Adam, the new statistics."""
  ts = data.taskset
  ids = np.arange(len(ts), dtype=np.int32)
  x, ys = sampling.gather_shared_batch(
      jax.device_put(data.train), {"local_index": jnp.asarray(ts.local_index)}, ids,
      jnp.arange(batch))
  tx = optax.adam(1e-4)

  def step(carry):
    params, opt, ms = carry

    def loss(p):
      if model.encode is None:  # every slot runs the whole model
        outs, new = multitask.forward(model, p, jnp.broadcast_to(x, (len(ts),) + x.shape),
                                      ids, ms, train=True)
      else:  # the trunk once, then every task's head: what one writes by hand
        sh, tk = (None, None) if ms is None else (ms["shared"], ms["tasks"])
        rep, new_sh = multitask.encoder(model, p["shared"], x, sh, train=True)
        outs, new_tk = multitask.decoder(model, p["tasks"], rep, x, ids, tk, train=True)
        new = None if ms is None else {"shared": new_sh, "tasks": new_tk}
      return jnp.sum(tasks.slot_losses(ts, outs, ys, ids)), new
    (_, new), g = jax.value_and_grad(loss, has_aux=True)(params)
    upd, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, upd), opt, new
  init = jax.jit(lambda: (model.init(jax.random.key(0)), None, None if not model.stateful
                          else model.init_state(jax.random.key(0))))()
  init = (init[0], jax.jit(tx.init)(init[0]), init[2])
  compiled = jax.jit(step, donate_argnums=0).lower(init).compile()
  return compiled, init


def timed(call, state, calls: int):
  state = call(state)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(calls):
    state = call(state)
  jax.block_until_ready(state)
  return (time.perf_counter() - t) / calls * 1e3, state


def main(argv):
  del argv
  h, w = (int(v) for v in _SIZE.value.lower().split("x"))
  data = dense_data(h, w, max(2 * _BATCH.value, 4))
  extra = {"fcn": {"channels": (8,), "hidden": (8,)},
           "segnet": {"channels": (64, 128, 256, 512, 512)}}.get(_ENCODER.value, {})
  model = multitask.make_model("multi_head", data.taskset, data.input_shape,
                               encoder=_ENCODER.value, **extra)
  model = precision_lib.mixed(model, _PRECISION.value)
  entries = {}
  t0 = time.perf_counter()
  compiled, init = plain(model, data, _BATCH.value)
  entries["plain"] = {"call": compiled, "state": init, "memory": memory(compiled),
                      "compile_s": time.perf_counter() - t0}
  for method in _METHODS.value:
    t0 = time.perf_counter()
    compiled, state, split = build(model, data, method, _BATCH.value)
    entries[method] = {"call": (lambda c, sp: (lambda s: c(s, sp)[0]))(compiled, split),
                       "state": state, "memory": memory(compiled),
                       "compile_s": time.perf_counter() - t0}
  times = {k: [] for k in entries}
  if not _MEMORY_ONLY.value:
    for _ in range(_ROUNDS.value):
      for name, e in entries.items():
        ms, e["state"] = timed(e["call"], e["state"], _CALLS.value)
        times[name].append(ms)
  rows = []
  ref = statistics.median(times["plain"]) if times["plain"] else None
  print(f"{_ENCODER.value} multi_head x3 dense tasks, {h}x{w}, B={_BATCH.value}, "
        f"{_PRECISION.value}, {jax.devices()[0].device_kind}")
  print(f"{'step':10} {'ms/step':>9} {'x plain':>8} {'temp MiB':>9} {'args MiB':>9} "
        f"{'compile s':>9}")
  for name, e in entries.items():
    ms = statistics.median(times[name]) if times[name] else None
    row = {"entry": f"{_ENCODER.value} {h}x{w} B={_BATCH.value} {name}", "method": name,
           "ms_per_step": ms, "ratio_to_plain": (ms / ref) if ms and ref else None,
           "precision": _PRECISION.value, **{k: round(v, 2) for k, v in e["memory"].items()},
           "compile_s": round(e["compile_s"], 2)}
    rows.append(row)
    shown = (f"{ms:9.2f} {ms / ref:8.2f}" if ms else f"{'-':>9} {'-':>8}")
    print(f"{name:10} {shown} {row['temp_mib']:9.1f} {row['args_mib']:9.1f} "
          f"{row['compile_s']:9.1f}")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
