"""The benchmark problem shared by experiments/bench_objectives.py and
experiments/bench_step_scaling.py: T tasks on one shared input x in R^64 (half
regression, half 10-class), MLP 64 -> 256 -> 256 with linear heads, B = 256,
K = T, Adam 1e-3, 10 steps per call -- as an mtljax step (``mtljax_step``) and
as the plain-JAX references (``plain_step``)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mtljax import gradients
from mtljax import objectives
from mtljax import optim
from mtljax import precision
from mtljax import sharding
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask

SPC = 10  # steps per call


@functools.cache
def _placement():
  """Every device along ``data`` (one CPU device here)."""
  return sharding.Placement(sharding.make_mesh())
B, D, H = 256, 64, 256


def bench_data(num_tasks: int, n: int = 4096) -> task_data.MultiTaskData:
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, D)).astype(np.float32)
  cols, columns = {"x": x}, []
  for t in range(num_tasks):
    if t % 2 == 0:
      cols[f"y{t}"] = (x @ rng.normal(size=D)).astype(np.float32)
      columns.append(specs.TaskColumn(tasks.Task(f"reg{t}", "regression"), f"y{t}"))
    else:
      cols[f"y{t}"] = np.argmax(x @ rng.normal(size=(D, 10)), axis=1)
      columns.append(specs.TaskColumn(tasks.Task(f"cls{t}", "classification", 10),
                                      f"y{t}"))
  return task_data.build_task_data("bench", specs.DataSpec("x", tuple(columns)),
                                   {"train": cols, "test": cols})


def parse_entry(entry: str):
  """``(method, gram_path, shared_inputs, slot_backwards)`` of a method row.
  ``method`` may carry string hyper-parameters as ``NAME#key=value[#...]``
  (e.g. ``auto_lambda#meta_grad=finite_difference``; :func:`method_hparams`)."""
  rest, _, backwards = entry.partition("/")
  shared = rest.endswith("+shared")
  method, _, path = rest.removesuffix("+shared").partition("@")
  return method, path or "jacobian", shared or method == "mgda_ub", backwards or "auto"


def method_hparams(method: str) -> tuple[str, dict]:
  """``NAME#key=value#...`` -> ``(NAME, {key: value})`` (string values)."""
  name, *pairs = method.split("#")
  bad = [p for p in pairs if "=" not in p]
  if bad:
    raise ValueError(f"method entry {method!r}: hyper-parameters are key=value, got {bad}.")
  return name, dict(p.split("=", 1) for p in pairs)


def mtljax_step(entry: str, data, compute: str = "float32"):
  """The entry's step, its model computing in ``compute`` (:mod:`mtljax.precision`)."""
  method, gram_path, shared, backwards = parse_entry(entry)
  method, hparams = method_hparams(method)
  ts = data.taskset
  model = precision.mixed(multitask.make_model("multi_head", ts, (D,), hidden=(H, H)), compute)
  tx = optim.make_optimizer("adam", lr=1e-3)
  obj = objectives.make_objective(method, len(ts), gram_path=gram_path, **hparams)
  sampler = sampling.make_sampler(ts, sampling.task_probabilities("uniform", data.num_train),
                                  len(ts), B, shared_inputs=shared, draws=obj.draws)
  fn = steps.make_train_step(
      model, tx, obj, sampler, weights=tasks.task_weights(ts, None), steps_per_call=SPC,
      slot_backwards=backwards, placement=_placement())
  state = steps.init_train_state(model, tx, jax.random.key(0), obj)
  return sharding.prepare_train_step(fn, state, data.train, len(ts), _placement())


# ----------------------------------------------------------------------------
# The plain-JAX references.
# ----------------------------------------------------------------------------


def _plain_params(num_tasks: int):
  ks = jax.random.split(jax.random.key(0), 4)
  t_reg, t_cls = (num_tasks + 1) // 2, num_tasks // 2
  return {"w0": jax.random.normal(ks[0], (D, H)) / 8, "b0": jnp.zeros(H),
          "w1": jax.random.normal(ks[1], (H, H)) / 16, "b1": jnp.zeros(H),
          "hr": jax.random.normal(ks[2], (t_reg, H, 1)) / 16, "hrb": jnp.zeros((t_reg, 1)),
          "hc": jax.random.normal(ks[3], (t_cls, H, 10)) / 16,
          "hcb": jnp.zeros((t_cls, 10))}


def _trunk(p, x):
  h = jax.nn.relu(x @ p["w0"] + p["b0"])
  return jax.nn.relu(h @ p["w1"] + p["b1"])


def _reg_loss(h, k, b, y):
  return jnp.mean((h @ k[:, 0] + b[0] - y) ** 2)


def _cls_loss(h, k, b, y):
  out = h @ k + b
  return jnp.mean(jax.nn.logsumexp(out, -1) - jnp.take_along_axis(out, y[:, None], -1)[:, 0])


def _plain_batch(data, key):
  x, n = data["x"][0], data["n"][0]
  idx = jax.random.randint(key, (B,), 0, n)
  return x[idx], data["y"]["regression1"][:, idx], data["y"]["classification10"][:, idx]


def plain_step(entry: str, data):
  """The reference rows: a flat model, Adam, steps in lax.scan."""
  num_tasks = len(data.taskset)
  params = _plain_params(num_tasks)
  tx = optax.adam(1e-3)
  per_task = entry.startswith("plain:per-task:")
  if per_task:
    method = gradients.get(entry.split(":")[2])

  def equal_grads(p, x, yr, yc, key):
    def loss(p):
      h = _trunk(p, x)
      lr = jax.vmap(_reg_loss, (None, 0, 0, 0))(h, p["hr"], p["hrb"], yr)
      lc = jax.vmap(_cls_loss, (None, 0, 0, 0))(h, p["hc"], p["hcb"], yc)
      return lr.sum() + lc.sum()
    return jax.grad(loss)(p)

  def per_task_grads(p, x, yr, yc, key):
    shared = {k: p[k] for k in ("w0", "b0", "w1", "b1")}

    def task_grad(loss_fn):
      return jax.vmap(jax.grad(lambda sh, k, b, y: loss_fn(_trunk(sh, x), k, b, y),
                               argnums=(0, 1, 2)), (None, 0, 0, 0))
    gr_sh, gr_k, gr_b = task_grad(_reg_loss)(shared, p["hr"], p["hrb"], yr)
    gc_sh, gc_k, gc_b = task_grad(_cls_loss)(shared, p["hc"], p["hcb"], yc)
    g = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), gr_sh, gc_sh)   # [T, ...]
    k = gradients.gram(g)
    beta, _ = method(k, rng=key)
    return {**gradients.combine(beta, g), "hr": gr_k, "hrb": gr_b, "hc": gc_k, "hcb": gc_b}

  grads_fn = per_task_grads if per_task else equal_grads

  def run(state, data):
    def one(carry, _):
      p, o, step = carry
      key = jax.random.fold_in(jax.random.key(1), step)
      x, yr, yc = _plain_batch(data, key)
      g = grads_fn(p, x, yr, yc, key)
      upd, o = tx.update(g, o, p)
      return (optax.apply_updates(p, upd), o, step + 1), None
    state, _ = jax.lax.scan(one, state, None, length=SPC)
    return state, {}

  state = (params, tx.init(params), jnp.zeros((), jnp.int32))
  return jax.jit(run, donate_argnums=(0,)), jax.device_put(state), jax.device_put(data.train)
