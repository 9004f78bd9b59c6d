"""Toy data and independent references the tests share.

The references re-derive what a train step does from its documented random
streams and the definitions, with numpy indexing and one ``jax.grad`` per task
in a Python loop -- never with the step's own sampling, gathering or
linearisation code.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import jacobians
from mtljax import tasks
from mtljax.data import specs
from mtljax.data import task_data


def shared_input_data(n_train=64, n_test=30, seed=0):
  """Four tasks of three kinds (regression, 3-class, binary, 3-class) reading
  the same 5-d inputs: ``(spec, {"train": columns, "test": columns})``."""
  spec = specs.DataSpec("x", (
      specs.TaskColumn(tasks.Task("r", "regression"), "y"),
      specs.TaskColumn(tasks.Task("c", "classification", 3), "c"),
      specs.TaskColumn(tasks.Task("b", "binary"), "b"),
      specs.TaskColumn(tasks.Task("c2", "classification", 3), "c2")))
  rng = np.random.default_rng(seed)

  def split(n):
    x = rng.normal(size=(n, 5)).astype(np.float32)
    return {"x": x, "y": (3 * x[:, 0] + 10).astype(np.float32),
            "c": (x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1),
            "b": (x[:, 3] > 0).astype(np.int64), "c2": rng.integers(0, 3, n)}
  return spec, {"train": split(n_train), "test": split(n_test)}


def family_data(sizes_train, sizes_test):
  """One regression task per value of 'task', each with its own inputs and sizes."""
  spec = specs.DataSpec("x", (specs.TaskColumn(tasks.Task("s", "regression"), "y"),),
                        split_key="task")
  rng = np.random.default_rng(1)

  def split(sizes):
    task = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])
    x = rng.uniform(-3, 3, (len(task), 1)).astype(np.float32)
    y = ((task + 1) * np.sin(x[:, 0]) + task).astype(np.float32)
    return {"x": x, "y": y, "task": task}
  return spec, {"train": split(sizes_train), "test": split(sizes_test)}


def toy_data(**kwargs) -> task_data.MultiTaskData:
  return task_data.build_task_data("toy", *shared_input_data(**kwargs))


# ----------------------------------------------------------------------------
# The step's batch, re-derived.
# ----------------------------------------------------------------------------


def step_keys(seed: int, step: int):
  """``(r_tasks, r_examples, r_method)`` of a step: split(fold_in(key(seed), step), 3)."""
  return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), 3)


def step_task_ids(data, probs, *, seed: int, step: int, k: int) -> np.ndarray:
  """The step's task ids: with K = T (no replacement) every task, each group's
  tasks in consecutive slots; otherwise Gumbel top-k of ``log p`` (successive
  sampling without replacement)."""
  ts = data.taskset
  if k == len(ts):
    return np.concatenate([[i for i, t in enumerate(ts) if t.group == g] for g in ts.groups])
  r_tasks = step_keys(seed, step)[0]
  scores = np.log(np.asarray(probs, np.float64)) + np.asarray(
      jax.random.gumbel(r_tasks, (len(ts),)), np.float64)
  return np.argsort(-scores, kind="stable")[:k]


def step_batch(data, probs, *, seed: int, step: int = 0, k: int, b: int,
               shared_inputs: bool = False):
  """``(task_ids [K], x, ys {group: [K, B]}, r_method)`` of a step, gathered
  with numpy indexing. ``x`` is ``[B, ...]`` with shared inputs (one draw for
  every slot), else ``[K, B, ...]`` (slot k's examples drawn from
  ``fold_in(fold_in(r_examples, stream_id), occurrence)``)."""
  ts, split = data.taskset, jax.device_get(data.train)
  ids = step_task_ids(data, probs, seed=seed, step=step, k=k)
  _, r_examples, r_method = step_keys(seed, step)
  n = np.asarray(split["n"])
  if shared_inputs:
    idx = np.asarray(jax.random.randint(r_examples, (b,), 0, n[ids[0]]))
    rows = np.broadcast_to(idx, (k, b))
    x = np.asarray(split["x"])[np.asarray(split["source"])[ids[0]]][idx]
  else:
    rows = np.stack([np.asarray(jax.random.randint(
        jax.random.fold_in(jax.random.fold_in(r_examples, ts.stream_ids[t]),
                           int(np.sum(ids[:slot] == t))), (b,), 0, n[t]))
        for slot, t in enumerate(ids)])
    xs = np.asarray(split["x"])
    x = np.stack([xs[np.asarray(split["source"])[t]][rows[s]] for s, t in enumerate(ids)])
  ys = {}
  for g, yg in split["y"].items():
    yg = np.asarray(yg)
    ys[g] = np.stack([yg[min(ts.local_index[t], len(yg) - 1)][rows[s]]
                      for s, t in enumerate(ids)])
  return ids, x, ys, r_method


def batch(ids, x, ys, shared_inputs) -> jacobians.Batch:
  return jacobians.Batch(jnp.asarray(x), {g: jnp.asarray(y) for g, y in ys.items()},
                         np.asarray(ids, np.int32) if isinstance(ids, np.ndarray)
                         else ids, shared_inputs)


# ----------------------------------------------------------------------------
# Losses and gradients by definition.
# ----------------------------------------------------------------------------


def slot_loss(model, params, x, ys, ids, slot: int, shared_inputs: bool, state=None):
  """Slot ``slot``'s mean loss, the model run on that slot alone (a model with
  state: in train mode from ``state``)."""
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  ts = model.taskset
  t = int(ids[slot])
  xk = x if shared_inputs else x[slot]
  out = multitask.forward(model, params, jnp.asarray(xk)[None], jnp.array([t]), state,
                          train=True)[0][ts.tasks[t].group][0]
  return jnp.mean(tasks.example_loss(ts.tasks[t], out, jnp.asarray(ys[ts.tasks[t].group][slot])))


def per_task_grads(model, params, x, ys, ids, shared_inputs: bool, weights=None, state=None):
  """``(losses [K], [grad of w_k L_k for each slot])``: K separate ``jax.grad``
  calls, each on one slot's loss (a Python loop, compiled as one function;
  a model with state runs in train mode from ``state``)."""
  k = len(ids)
  w = np.ones(k) if weights is None else np.asarray(weights)[np.asarray(ids)]

  @jax.jit
  def ref(p):
    out = []
    for s in range(k):
      loss = slot_loss(model, p, x, ys, ids, s, shared_inputs, state)
      grad = jax.grad(lambda q, s=s: w[s] * slot_loss(model, q, x, ys, ids, s, shared_inputs,
                                                      state))(p)
      out.append((loss, grad))
    return out
  out = ref(params)
  return np.asarray([float(l) for l, _ in out]), [g for _, g in out]


def stack(trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def identity_linearization(losses) -> jacobians.Linearized:
  """A linearisation whose "shared parameter" gradient of ``sum_k c_k L_k`` is
  ``c`` itself: an objective's gradient then reads out ``d objective / d L``."""
  losses = jnp.asarray(losses, jnp.float32)
  k = losses.shape[0]
  eye = jnp.eye(k)
  return jacobians.Linearized(
      losses=losses, pullback=lambda c: {"shared": c, "tasks": {}},
      slot_grads=lambda c: (c[:, None] * eye, {}), rep_grads=None, rep_pullback=None,
      loss_at=lambda p: losses, one_pass=False)


def linear_linearization(losses, jac) -> jacobians.Linearized:
  """A linearisation with slot losses ``losses [K]`` and per-slot gradients
  ``jac [K, P]`` of a "shared parameter" vector (no task parameters)."""
  l = jnp.asarray(losses, jnp.float32)
  j = jnp.asarray(jac, jnp.float32)
  return jacobians.Linearized(
      losses=l, pullback=lambda c: {"shared": c @ j, "tasks": {}},
      slot_grads=lambda c: (c[:, None] * j, {}), rep_grads=None, rep_pullback=None,
      loss_at=lambda p: l, one_pass=False)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  for x, y in zip(la, lb):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def metrics_rows(workdir) -> list[dict]:
  """The rows of a run's ``metrics.jsonl``."""
  with open(os.path.join(str(workdir), "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------
# A small end-to-end run.
# ----------------------------------------------------------------------------


def small_sinusoids_config(**overrides):
  """8 sine tasks (4 sampled per step), a small multi-head MLP, 40 steps in
  calls of 5, a row every 10 steps, a checkpoint every 10; ``overrides`` by
  dotted key (``**{"optim.lr": 1e-2}``)."""
  from experiments.configs import sinusoids  # pylint: disable=g-import-not-at-top
  c = sinusoids.get_config("quick")
  c.model.arch, c.model.hidden = "multi_head", (16, 16)
  c.sampling.examples_per_task = 8
  c.total_steps, c.steps_per_call = 40, 5
  c.log_steps, c.eval_steps, c.checkpoint_steps = 10, 20, 10
  c.eval_batch_size = 64
  return with_overrides(c, overrides)


def with_overrides(config, overrides: dict):
  """``config`` with ``{"dotted.key": value}`` set in place (lists become
  tuples, as config fields hold them); returns it."""
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config


def arch_kwargs(arch: str, **kwargs) -> dict:
  """The keywords of ``kwargs`` that ``make_model(arch, ...)`` takes: the
  trunk's fields and ``arch``'s hyper-parameters (a test that builds every
  architecture from one set of settings; ``make_model`` refuses the others)."""
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  takes = set(multitask.TRUNK_FIELDS) | set(multitask.hyperparameters(arch))
  return {k: v for k, v in kwargs.items() if k in takes}


def final_state(workdir, config, like=None):
  """The latest checkpoint of ``workdir``, restored into the state a run of
  ``config`` builds (its data loaded as the run loads it), or into ``like``
  (such a state, built once for several workdirs)."""
  from mtljax import build  # pylint: disable=g-import-not-at-top
  from mtljax import checkpoint  # pylint: disable=g-import-not-at-top
  if like is None:
    like = build.build_run(config, build.data_from_config(config)).state
  manager = checkpoint.make_manager(str(workdir))
  try:
    return checkpoint.restore_latest(manager, like)
  finally:
    manager.close()
