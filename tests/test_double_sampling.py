"""MoDo (Chen et al. 2023) and SDMGrad (Xiao et al. 2023): their updates
against float64 numpy references written from the papers' equations, on hard
Jacobians (rows 100x apart in norm, near-opposite pairs), over several steps
and with task sampling; the independent draws a step reads (the documented
keys, recomputed; independent and each distributed like one draw); one train
step of each against per-slot ``jax.grad`` on the three re-derived batches;
and the bad inputs, refused before tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hard_jacobians
import helpers
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask
from mtljax.objectives import double_sampling

D = double_sampling.DRAWS


# ---------------------------------------------------------------------------
# float64 references.
# ---------------------------------------------------------------------------


def _np_project(v):
  """Euclidean projection onto the probability simplex (Duchi et al. 2008)."""
  u = np.sort(v)[::-1]
  css = np.cumsum(u)
  rho = np.nonzero(u * np.arange(1, len(v) + 1) > css - 1.0)[0][-1]
  return np.maximum(v - (css[rho] - 1.0) / (rho + 1.0), 0.0)


def _np_modo_paper(lam, j1, j2, j3, gamma, rho):
  """MoDo, Algorithm 1 (every task, ``J_d [T, P]``):
  ``lambda' = Pi(lambda - gamma (J_1 J_2^T lambda + rho lambda))``,
  ``d = J_3^T lambda'``."""
  lam = _np_project(lam - gamma * (j1 @ (j2.T @ lam) + rho * lam))
  return lam, j3.T @ lam


def _np_sdmgrad_paper(w, j1, j2, j3, lamda, niter, lr, momentum):
  """SDMGrad, Algorithm 1 with the authors' normalisation and SGD (every
  task): ``niter`` projected heavy-ball steps on ``1/2 |G w + lamda g0|^2``
  with ``grad = G_1 G_2^T w + lamda G_1 g_{0,2}`` (the Gram divided by the
  squared mean row norm), then ``d = (G_3^T w + lamda g_{0,3}) / (1 + lamda)``."""
  gg = j1 @ j2.T
  scale = np.mean(np.sqrt(np.maximum(np.diag(gg), 0.0)))
  gg = gg / (scale ** 2 + 1e-8)
  gg0 = gg.mean(axis=1)
  buf = None
  for _ in range(niter):
    grad = gg @ w + lamda * gg0
    buf = grad if buf is None else momentum * buf + grad
    w = _np_project(w - lr * buf)
  return w, (j3.T @ w + lamda * j3.mean(axis=0)) / (1.0 + lamda)


def _np_sampled(method, state, ids, rows, valid, num_tasks, **hp):
  """Either method with task sampling (the module's extension, float64): per
  draw the mean of each task's valid rows; ``S`` the tasks with one in every
  draw; the weights on ``S`` renormalised, updated by the paper's rule on
  ``S``'s rows, used for the direction and stored scaled back to their mass."""
  k = len(ids) // D
  means, act = [], []
  for d in range(D):
    sl = slice(d * k, (d + 1) * k)
    r = np.zeros((num_tasks, rows.shape[1]))
    c = np.zeros(num_tasks)
    for i, ok, row in zip(ids[sl], valid[sl], rows[sl]):
      if ok:
        r[i] += row
        c[i] += 1
    means.append(r / np.maximum(c, 1)[:, None])
    act.append(c > 0)
  s = np.flatnonzero(np.all(act, axis=0))
  mass = state[s].sum()
  v = state[s] / mass if mass > 0 else np.full(len(s), 1.0 / len(s))
  j1, j2, j3 = (m[s] for m in means)
  if method == "modo":
    v, d = _np_modo_paper(v, j1, j2, j3, **hp)
  else:
    v, d = _np_sdmgrad_paper(v, j1, j2, j3, **hp)
  new = state.copy()
  new[s] = mass * v
  return new, d


# ---------------------------------------------------------------------------
# The objectives on given rows (a linear "model"), over steps.
# ---------------------------------------------------------------------------


def _draw_rows(kind, t, seed, noise=0.3):
  """``[D T, 10]``: three draws of one hard Jacobian, each the expected rows
  plus noise of ``noise`` times the row's own norm (the draws' rows differ
  as mini-batch gradients do; the 100x norms and near-opposite pairs stay)."""
  base = hard_jacobians.hard_jacobian_batch(kind, t, 10, 1, seed)[0]
  rng = np.random.default_rng(seed)
  size = np.linalg.norm(base, axis=1, keepdims=True) / np.sqrt(10)
  return np.concatenate([base + noise * size * rng.normal(size=base.shape)
                         for _ in range(D)])


def _run(obj, seq, weights):
  """``obj.gradients`` over ``seq`` of ``(task_ids [D K], jac [D K, P])``
  (one compiled program); returns ``[(shared gradient, Result)]``."""
  state = obj.init_state()

  @jax.jit
  def fn(ids, jac, st):
    lin = helpers.linear_linearization(jnp.ones(ids.shape, jnp.float32), jac)
    return obj.gradients(lin, objectives.Inputs(ids, jnp.asarray(weights), st, {},
                                                jax.random.key(0)))
  out = []
  for ids, jac in seq:
    res = fn(jnp.asarray(ids, jnp.int32), jnp.asarray(jac, jnp.float32), state)
    state = res.state
    out.append((np.asarray(res.grads["shared"], np.float64), res))
  return out


_KINDS = ("opposite_100x", "norms_100x", "opposite", "gaussian")
_EVERY = [(np.tile(np.arange(4), D), _draw_rows(kind, 4, n)) for n, kind in enumerate(_KINDS)]
_HP = {"modo": [{"gamma": 1e-3, "rho": 0.1}, {"gamma": 1e-6, "rho": 0.0},
                {"gamma": 1e-5, "rho": 10.0}],
       "sdmgrad": [{"lamda": 0.3, "niter": 20, "lr": 10.0, "momentum": 0.5},
                   {"lamda": 0.0, "niter": 20, "lr": 0.05, "momentum": 0.5},
                   {"lamda": 3.0, "niter": 5, "lr": 1.0, "momentum": 0.0}]}


def _make(method, hp):
  if method == "modo":
    return objectives.make_objective("modo", 4 if "num_tasks" not in hp else hp["num_tasks"],
                                     gamma=hp["gamma"], rho=hp["rho"])
  return objectives.make_objective(
      "sdmgrad", 4 if "num_tasks" not in hp else hp["num_tasks"], lamda=hp["lamda"],
      niter=hp["niter"], w_lr=hp["lr"], w_momentum=hp["momentum"])


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_every_task_steps_follow_the_papers_update(method):
  """K = T = 4 over four steps of hard Jacobians (norms 100x apart,
  near-opposite pairs): the weights (state and logged) and the direction
  follow the paper's recurrence in float64, for the defaults and for
  settings with interior weights."""
  for hp in _HP[method]:
    out = _run(_make(method, hp), _EVERY, np.ones(4, np.float32))
    lam = np.full(4, 0.25)
    for n, ((d, res), (_, rows)) in enumerate(zip(out, _EVERY)):
      j1, j2, j3 = rows[:4], rows[4:8], rows[8:]
      if method == "modo":
        lam, want = _np_modo_paper(lam, j1, j2, j3, hp["gamma"], hp["rho"])
      else:
        lam, want = _np_sdmgrad_paper(lam, j1, j2, j3, hp["lamda"], hp["niter"], hp["lr"],
                                      hp["momentum"])
      key = "lambda" if method == "modo" else "w"
      msg = f"{method} {hp} step {n}"
      np.testing.assert_allclose(res.state[key], lam, atol=3e-5, err_msg=msg)
      np.testing.assert_allclose(res.measurements["objective_lambda_sum"], lam, atol=3e-5)
      np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4 * np.linalg.norm(want),
                                 err_msg=msg)
      assert abs(float(np.sum(res.state[key])) - 1.0) < 1e-5


def test_the_weights_move_off_the_start_only_when_the_draws_say_so():
  """A sanity anchor independent of the reference: with every draw's rows
  equal and orthogonal of equal norm, MoDo's ``J J^T`` is a multiple of I,
  so from ``1 / T`` the weights stay uniform (the step is along the
  simplex's normal), and SDMGrad's ``w`` stays uniform too (its gradient
  ``c w + lamda c / T`` is constant across tasks)."""
  rows = np.tile(3.0 * np.eye(4, 10), (D, 1))
  seq = [(np.tile(np.arange(4), D), rows)] * 2
  for method in ("modo", "sdmgrad"):
    out = _run(objectives.make_objective(method, 4), seq, np.ones(4, np.float32))
    key = "lambda" if method == "modo" else "w"
    for d, res in out:
      np.testing.assert_allclose(res.state[key], np.full(4, 0.25), atol=1e-6)
      np.testing.assert_allclose(d, 0.25 * rows[8:].sum(0), atol=1e-5)


# Five tasks, three slots a step (sampled with replacement: task 1 twice in
# step 1), task 4 of weight 0 (never in S), task 3 first in step 2.
_W5 = np.array([1.0, 2.0, 0.5, 1.0, 0.0], np.float32)
_SAMPLED = [(np.tile([0, 1, 4], D), _draw_rows("opposite_100x", 3, 11)),
            (np.tile([2, 1, 1], D), _draw_rows("norms_100x", 3, 12)),
            (np.tile([3, 0, 2], D), _draw_rows("opposite", 3, 13)),
            (np.tile([1, 3, 0], D), _draw_rows("gaussian", 3, 14))]


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_sampled_tasks_follow_the_restricted_update(method):
  """With task sampling: only the step's tasks move, their weights
  renormalised, updated and stored back at their mass (the whole stays on
  the simplex), duplicate slots averaged, a weight-0 task left out; rows are
  ``w_k g_k``."""
  hp = dict(_HP[method][1], num_tasks=5)
  out = _run(_make(method, hp), _SAMPLED, _W5)
  del hp["num_tasks"]
  state = np.full(5, 0.2)
  key = "lambda" if method == "modo" else "w"
  for n, ((d, res), (ids, jac)) in enumerate(zip(out, _SAMPLED)):
    rows = _W5[ids][:, None].astype(np.float64) * jac
    state, want = _np_sampled(method, state, ids, rows, _W5[ids] > 0, 5, **hp)
    np.testing.assert_allclose(res.state[key], state, atol=3e-5, err_msg=f"step {n}")
    np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-4 * np.linalg.norm(want),
                               err_msg=f"step {n}")
    assert abs(float(np.sum(res.state[key])) - 1.0) < 1e-5
  assert float(out[0][1].state[key][3]) == pytest.approx(0.2)  # task 3 not yet sampled
  assert float(out[-1][1].state[key][4]) == pytest.approx(0.2)  # weight 0: never moves


# ---------------------------------------------------------------------------
# The independent draws.
# ---------------------------------------------------------------------------


def _draw_key(r_examples, d):
  if d == 0:
    return r_examples
  return jax.random.fold_in(jax.random.fold_in(r_examples, sampling.DRAW_STREAM), d)


def _np_draws(data, ids, seed, step, b, shared):
  """``(x, ys)`` of the three draws, re-derived: draw d's slot k reads the
  examples of ``fold_in(fold_in(key_d, stream), occurrence)`` (one ``[B]``
  draw of ``key_d`` for every slot with shared inputs), gathered with numpy."""
  ts, split = data.taskset, jax.device_get(data.train)
  _, r_examples, _ = helpers.step_keys(seed, step)
  n, src, xs = np.asarray(split["n"]), np.asarray(split["source"]), np.asarray(split["x"])
  rows = []
  for d in range(D):
    key = _draw_key(r_examples, d)
    if shared:
      idx = np.asarray(jax.random.randint(key, (b,), 0, n[ids[0]]))
      rows += [idx] * len(ids)
    else:
      rows += [np.asarray(jax.random.randint(
          jax.random.fold_in(jax.random.fold_in(key, ts.stream_ids[t]),
                             int(np.sum(ids[:s] == t))), (b,), 0, n[t]))
               for s, t in enumerate(ids)]
  all_ids = np.tile(ids, D)
  x = np.stack([xs[src[t]][r] for t, r in zip(all_ids, rows)])
  ys = {g: np.stack([np.asarray(yg)[min(ts.local_index[t], len(yg) - 1)][r]
                     for t, r in zip(all_ids, rows)]) for g, yg in split["y"].items()}
  return all_ids, x, ys


@pytest.mark.parametrize("k, shared", [(3, False), (4, True)])
def test_the_step_reads_three_draws_of_its_tasks_from_the_documented_keys(k, shared):
  """``sample_batch`` with ``draws=3``: the step's K tasks once (the
  single-draw step's), repeated per draw; draw 0 is the single-draw batch,
  draws 1 and 2 come from their own keys (recomputed here) and differ."""
  data = helpers.toy_data()
  probs = np.full(4, 0.25)
  sampler = sampling.make_sampler(data.taskset, probs, k, 6, shared_inputs=shared, draws=3)
  r_tasks, r_examples, _ = helpers.step_keys(3, 5)
  got = jax.jit(lambda tr, a, b: steps.sample_batch(sampler, tr, a, b))(
      data.train, r_tasks, r_examples)
  ids = helpers.step_task_ids(data, probs, seed=3, step=5, k=k)
  want_ids, x, ys = _np_draws(data, ids, 3, 5, 6, shared)
  assert not got.shared
  np.testing.assert_array_equal(np.asarray(got.task_ids), want_ids)
  np.testing.assert_array_equal(np.asarray(got.x), x)
  for g in ys:
    np.testing.assert_array_equal(np.asarray(got.ys[g]), ys[g])
  one_ids, one_x, _, _ = helpers.step_batch(data, probs, seed=3, step=5, k=k, b=6,
                                            shared_inputs=shared)
  np.testing.assert_array_equal(want_ids[:k], one_ids)
  np.testing.assert_array_equal(x[:k], one_x if not shared else np.broadcast_to(
      one_x, (k,) + one_x.shape))
  assert not np.array_equal(x[:k], x[k:2 * k]) and not np.array_equal(x[k:2 * k], x[2 * k:])


def test_draws_are_independent_and_each_distributed_like_one_draw():
  """Over 4,000 steps (one program), with 5 examples per task: each draw's
  example indices are uniform (chi-square against 1/5 per index), the pairs
  (draw a, draw b) at the same position are uniform over the 25 pairs (so
  the draws are independent), and the task ids are the same in every draw."""
  data = helpers.toy_data(n_train=5)
  sampler = sampling.make_sampler(data.taskset, np.full(4, 0.25), 2, 4, draws=3)
  n = jnp.asarray(data.train["n"])

  @jax.jit
  def draws(steps_):
    def one(s):
      r_tasks, r_examples, _ = sampling.step_keys(jax.random.key(0), s)
      return sampling.sample_draws(sampler, n, r_tasks, r_examples)
    return jax.vmap(one)(steps_)
  ids, idx = (np.asarray(a) for a in draws(jnp.arange(4000)))
  ids, idx = ids.reshape(4000, D, 2), idx.reshape(4000, D, 2, 4)
  assert np.all(ids == ids[:, :1])
  # chi-square bounds at p = 1e-4 (4 and 24 degrees of freedom): 23.5 and 57.0.
  for d in range(D):
    counts = np.bincount(idx[:, d].ravel(), minlength=5)
    expect = idx[:, d].size / 5
    assert np.sum((counts - expect) ** 2 / expect) < 23.5, (d, counts)
  for a, b in ((0, 1), (0, 2), (1, 2)):
    pairs = np.bincount((5 * idx[:, a] + idx[:, b]).ravel(), minlength=25)
    expect = idx[:, a].size / 25
    assert np.sum((pairs - expect) ** 2 / expect) < 57.0, (a, b, pairs)


# ---------------------------------------------------------------------------
# A train step of each.
# ---------------------------------------------------------------------------


def test_one_train_step_of_each_against_per_slot_gradients_of_the_three_draws():
  """One program runs a step of each method (K = T = 4, SGD lr 1, unequal
  weights): the shared parameters move by the float64 reference direction
  over ``jax.grad`` per slot of the three re-derived batches, the task
  parameters by draw 3's weighted-sum gradient, and the weights are the
  reference's."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  probs = np.full(4, 0.25)
  hp = {"modo": {"gamma": 0.05, "rho": 0.1}, "sdmgrad": {}}
  objs = [objectives.make_objective(m, 4, **hp[m]) for m in ("modo", "sdmgrad")]
  sampler = sampling.make_sampler(data.taskset, probs, 4, 16, draws=3)
  fns = [steps.make_train_step(model, tx, o, sampler, weights=weights, seed=5) for o in objs]
  states = [steps.init_train_state(model, tx, jax.random.key(0), o) for o in objs]
  outs = jax.jit(lambda sts, tr: [f(s, tr) for f, s in zip(fns, sts)])(states, data.train)

  ids = helpers.step_task_ids(data, probs, seed=5, step=0, k=4)
  all_ids, x, ys = _np_draws(data, ids, 5, 0, 16, False)
  p = states[0].params
  _, grads = helpers.per_task_grads(model, p, x, ys, all_ids, False, weights)
  rows = np.stack([np.concatenate([np.asarray(a, np.float64).ravel()
                                   for a in jax.tree.leaves(g["shared"])]) for g in grads])
  # Rows by task id (the slots hold the grouped order).
  by_task = [rows[d * 4:(d + 1) * 4][np.argsort(ids)] for d in range(D)]
  lam, want_modo = _np_modo_paper(np.full(4, 0.25), *by_task, 0.05, 0.1)
  w, want_sdm = _np_sdmgrad_paper(np.full(4, 0.25), *by_task, 0.3, 20, 10.0, 0.5)
  plain = jax.tree.map(lambda *r: sum(np.asarray(a) for a in r), *[g["tasks"] for g in grads[8:]])
  for (new, meas), want, st, key in zip(outs, (want_modo, want_sdm), (lam, w),
                                        ("lambda", "w")):
    moved = np.concatenate([(np.asarray(a) - np.asarray(b)).astype(np.float64).ravel()
                            for a, b in zip(jax.tree.leaves(p["shared"]),
                                            jax.tree.leaves(new.params["shared"]))])
    np.testing.assert_allclose(moved, want, rtol=1e-3, atol=1e-5 * np.abs(want).max(),
                               err_msg=key)
    np.testing.assert_allclose(np.asarray(new.objective_state[key]), st, atol=1e-4)
    helpers.assert_trees_close(new.params["tasks"],
                               jax.tree.map(lambda a, g: np.asarray(a) - g, p["tasks"], plain))
    assert np.isfinite(float(meas["loss"]))
    np.testing.assert_array_equal(np.asarray(meas["task_count"]), np.full(4, 3.0))


# ---------------------------------------------------------------------------
# Bad inputs, before tracing; the catalog.
# ---------------------------------------------------------------------------


def test_bad_inputs_are_refused_before_tracing():
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  one = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8)
  many = {m: objectives.make_objective(m, 4).draws for m in objectives.methods()}
  many = {m: d for m, d in many.items() if d > 1}   # every method with draws > 1
  assert many == {"modo": 3, "sdmgrad": 3, "auto_lambda": 2, "moml": 3, "forum": 2}
  for method, draws in many.items():
    with pytest.raises(ValueError, match=rf"objective.method='{method}' reads {draws} "
                                         r"independent mini-batch\(es\) .* the sampler draws 1: "
                                         rf"make it with sampling.make_sampler\(\.\.\., "
                                         rf"draws={draws}\)"):
      steps.make_train_step(model, tx, method, one, weights=np.ones(4))
  three = sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=3)
  with pytest.raises(ValueError, match=r"objective.method='fixed' reads 1 independent"):
    steps.make_train_step(model, tx, "fixed", three, weights=np.ones(4))
  with pytest.raises(ValueError, match=r"tag_lr > 0 .*'sdmgrad' reads 3 draws"):
    steps.make_train_step(model, tx, "sdmgrad", three, weights=np.ones(4), tag_lr=0.1)
  with pytest.raises(ValueError, match=r"draws must be an integer >= 1, got 0"):
    sampling.make_sampler(data.taskset, np.full(4, 0.25), 4, 8, draws=0)
  for method, hp, msg in (("modo", {"gamma": 0.0}, r"modo: gamma must be > 0"),
                          ("modo", {"rho": -1.0}, r"rho >= 0"),
                          ("sdmgrad", {"lamda": -0.1}, r"sdmgrad: lamda must be >= 0"),
                          ("sdmgrad", {"w_momentum": 1.0}, r"w_momentum in \[0, 1\)"),
                          ("sdmgrad", {"niter": 0}, r"niter must be an integer >= 1")):
    with pytest.raises(ValueError, match=msg):
      objectives.make_objective(method, 4, **hp)


def test_the_methods_are_listed_configured_benchmarked_and_on_the_toy():
  from experiments import bench_objectives  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from mtljax import toy  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert c.objective.modo.to_dict() == {"gamma": 1e-3, "rho": 0.1}
  assert c.objective.sdmgrad.to_dict() == {"lamda": 0.3, "niter": 20, "w_lr": 10.0,
                                           "w_momentum": 0.5}
  assert objectives.make_objective("modo", 3).draws == 3
  assert {"modo", "sdmgrad"} <= set(toy.toy_methods())
  listed = bench_objectives._METHODS.default  # pylint: disable=protected-access
  assert {"modo+shared", "sdmgrad+shared"} <= set(listed)
