"""Learning to Branch (``ltb``, :mod:`mtljax.models.branching`): the
straight-through Gumbel-softmax against a float64 numpy reference, the law of
the drawn parents (a chi-square test at a fixed seed), LibMTL's temperature
and warm-up schedule written out in numpy, the model's forward as the tree
path it draws (a plain per-task network assembled from the chosen parents'
layers), and the train step: one architecture per step for every slot, the
logits frozen during the warm-up, the clock in the checkpointed state."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.models import branching
from mtljax.models import multitask

import helpers

HP = branching.LTBHParams()


# --- the Gumbel-softmax -------------------------------------------------------


def _np_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


# Hard logits: rows 100x apart in scale, a near tie, one dominant parent.
LOGITS = np.array([[8.0, -8.0, 0.0], [1e-3, 0.0, -1e-3], [0.05, 0.1, 30.0]])
# The law test's: a skewed row, a near tie, a dominant parent (each cell's
# expected count over 4,000 draws above 30).
LAW = np.array([[2.0, -1.0, 0.0], [1e-3, 0.0, -1e-3], [0.0, 0.1, 3.0]])


def test_gumbel_softmax_matches_float64_reference_forward_and_gradient():
  """``y_soft = softmax((l + g) / tau)``; hard: forward ``onehot(argmax(l + g))``
  exactly, gradient ``y_soft``'s, i.e. ``J^T c`` with ``J = (diag(s) - s s^T) /
  tau``; soft: ``y_soft`` and the same gradient. Three temperatures of
  LibMTL's schedule (10, 1, 0.707), noise drawn with numpy."""
  rng = np.random.default_rng(0)
  taus = np.array([10.0, 1.0, 0.70710678])
  g = -np.log(-np.log(rng.uniform(size=(3,) + LOGITS.shape)))
  c = rng.normal(size=(3,) + LOGITS.shape) * np.array([1.0, 100.0, 0.01])[:, None]

  def one(lg, gg, tau, cc, hard):
    f = lambda l: jnp.sum(cc * branching.gumbel_softmax(l, gg, tau, hard))  # noqa: E731
    return branching.gumbel_softmax(lg, gg, tau, hard), jax.grad(f)(lg)
  args = (jnp.asarray(np.broadcast_to(LOGITS, g.shape), jnp.float32),
          jnp.asarray(g, jnp.float32), jnp.asarray(taus, jnp.float32), jnp.asarray(c, jnp.float32))
  (yh, gh), (ys, gs) = jax.device_get(jax.jit(lambda *a: (
      jax.vmap(lambda *b: one(*b, True))(*a), jax.vmap(lambda *b: one(*b, False))(*a)))(*args))
  for i, tau in enumerate(taus):
    s = _np_softmax((LOGITS + g[i]) / tau)
    want_grad = np.einsum("rj,rjk->rk", c[i], (np.einsum("rj,jk->rjk", s, np.eye(3))
                                               - np.einsum("rj,rk->rjk", s, s)) / tau)
    hard = np.eye(3)[np.argmax(LOGITS + g[i], axis=-1)]
    np.testing.assert_allclose(yh[i], hard, atol=1e-6)
    np.testing.assert_allclose(ys[i], s, rtol=1e-5, atol=1e-7)
    scale = np.abs(want_grad).max()
    np.testing.assert_allclose(gh[i], want_grad, rtol=1e-4, atol=1e-5 * scale)
    np.testing.assert_allclose(gs[i], want_grad, rtol=1e-4, atol=1e-5 * scale)


# --- the routing: the law of the draws, the schedule, eval ---------------------


def _sampler(count, seed=0):
  s = branching.sampler_init(jax.random.key(seed))
  return {"key": s["key"], "count": jnp.asarray(count, jnp.int32)}


def test_drawn_parents_follow_softmax_of_the_logits_whatever_the_temperature():
  """4,000 training forwards after the warm-up: each child's parent
  frequencies match ``softmax(logits[child])`` (chi-square, 2 degrees of
  freedom, below its 0.001 quantile 13.8 for every row; the seed is fixed);
  the hard draws are the same at another temperature (the forward's law is
  ``softmax(logits)``, LibMTL's ``hard=True``); the two layers' draws are
  independent (their agreement rate is ``sum_p P(p)^2``, not 1); each draw is
  one-hot; bf16 logits draw as their float32 values."""
  n, start = 4000, HP.warmup_epochs * HP.epoch_steps
  logits = {"a": jnp.asarray(LAW, jnp.float32), "b": jnp.asarray(LAW, jnp.float32)}
  cold = dataclasses.replace(HP, tau0=0.1)

  @jax.jit
  def draws(counts):
    def one(c):
      return (branching.routing(logits, _sampler(c), HP, True)[0],
              branching.routing(logits, _sampler(c), cold, True)[0])
    return jax.vmap(one)(counts)
  warm, cold_draws = jax.device_get(draws(jnp.arange(start, start + n)))
  p = _np_softmax(LAW)
  assert (n * p).min() > 30  # every cell's expected count: the chi-square approximation holds
  for name in ("a", "b"):
    y = warm[name]
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-6)
    assert set(np.unique(np.round(y, 5))) <= {0.0, 1.0}
    np.testing.assert_array_equal(np.argmax(y, -1), np.argmax(cold_draws[name], -1))
    freq = y.sum(0)                                       # [child, parent] counts
    expected = n * p
    chi2 = ((freq - expected) ** 2 / np.maximum(expected, 1e-12)).sum(-1)
    assert np.all(chi2 < 13.8), chi2
  # Logits in bfloat16 (mixed precision casts the parameters) are read in
  # float32: the same draws as their float32 values.
  lb = {k: v.astype(jnp.bfloat16) for k, v in logits.items()}
  same = jax.device_get(jax.jit(jax.vmap(lambda c: (
      branching.routing(lb, _sampler(c), HP, True)[0],
      branching.routing({k: v.astype(jnp.float32) for k, v in lb.items()}, _sampler(c), HP,
                        True)[0])))(jnp.arange(start, start + 200)))
  for name in ("a", "b"):
    assert same[0][name].dtype == np.float32
    np.testing.assert_array_equal(same[0][name], same[1][name])
  agree = np.mean(np.argmax(warm["a"], -1) == np.argmax(warm["b"], -1), axis=0)
  np.testing.assert_allclose(agree, (p ** 2).sum(-1), atol=0.03)
  assert agree[1] < 0.5   # the near-uniform child: ~1/3, not 1


def test_schedule_warm_up_and_eval_are_libmtls():
  """LibMTL over E = 200 epochs of 3 steps: ``tau = (E / 20) / sqrt(epoch + 1)``
  and the warm-up while ``epoch < E / 100`` (numpy, every count to the end);
  in the warm-up every child reads the sum of its parents (``"mean"``: their
  mean) and the logits get no gradient; after it they do; eval reads each
  child's most probable parent and leaves the clock, train advances it by one
  and keeps the key."""
  e_total, steps_per_epoch = 200, 3
  hp = branching.LTBHParams(tau0=e_total / 20, epoch_steps=steps_per_epoch,
                            warmup_epochs=int(np.ceil(e_total / 100)))
  counts = np.arange(e_total * steps_per_epoch)
  epoch = counts // steps_per_epoch
  taus, warms = jax.device_get(jax.jit(lambda c: (branching.temperature(c, hp),
                                                  branching.warming_up(c, hp)))(counts))
  np.testing.assert_allclose(taus, (e_total / 20) / np.sqrt(epoch + 1), rtol=1e-6)
  np.testing.assert_array_equal(warms, epoch < e_total / 100)
  assert warms.sum() == 6 and np.isclose(taus[6], 10 / np.sqrt(3))

  logits = {"layer_0": jnp.asarray(LOGITS, jnp.float32)}

  @jax.jit
  def run(lg):
    def total(l, count, h, train):
      a, _ = branching.routing({"layer_0": l}, _sampler(count), h, train)
      return jnp.sum(a["layer_0"] * jnp.arange(9.0).reshape(3, 3))
    mean_hp = dataclasses.replace(hp, warmup_mix="mean")
    out = {}
    for name, count, h in (("warm", 5, hp), ("warm_mean", 5, mean_hp), ("after", 6, hp)):
      out[name] = (branching.routing(lg, _sampler(count), h, True),
                   jax.grad(total)(lg["layer_0"], count, h, True))
    out["eval"] = branching.routing(lg, _sampler(7), hp, False)
    out["eval_warm"] = branching.routing(lg, _sampler(2), hp, False)
    return out
  out = jax.device_get(run(logits))
  (a, new), grad = out["warm"]
  np.testing.assert_array_equal(a["layer_0"], np.ones((3, 3)))
  np.testing.assert_array_equal(grad, 0.0)
  assert int(new["count"]) == 6
  np.testing.assert_array_equal(new["key"], np.asarray(_sampler(0)["key"]))
  np.testing.assert_allclose(out["warm_mean"][0][0]["layer_0"], np.full((3, 3), 1 / 3))
  assert np.abs(out["after"][1]).max() > 1e-3           # the logits learn after it
  a, new = out["eval"]
  np.testing.assert_array_equal(a["layer_0"], np.eye(3)[np.argmax(LOGITS, -1)])
  assert int(new["count"]) == 7
  np.testing.assert_array_equal(out["eval_warm"][0]["layer_0"], np.ones((3, 3)))


# --- the model ------------------------------------------------------------------


MIX3 = tasks.TaskSet((tasks.Task("a", "classification", 4), tasks.Task("r", "regression"),
                      tasks.Task("b", "classification", 4)))


def _path(alpha: dict, names, t: int) -> dict:
  """The columns task ``t``'s prediction flows through, layer by layer: its
  own at the last layer, each layer's parent below (one-hot routing)."""
  cols, child = {}, t
  for i in range(len(names) - 1, -1, -1):
    cols[names[i]] = child
    if i > 0:
      child = int(np.argmax(alpha[names[i - 1]][child]))
  return cols


@pytest.mark.parametrize("encoder, shape, channels", [("mlp", (5,), ()),
                                                      ("cnn", (6, 6), (3,))])
def test_forward_is_the_drawn_tree_path_of_plain_columns(encoder, shape, channels):
  """After the warm-up a training forward equals, for each slot of task t,
  an ``independent`` network whose layer l is the parameters of the column
  that t's path goes through at l (the drawn parents, read back with
  :func:`branching.routing` from the same state); eval mode the same with
  the most probable parents. (The warm-up's routing, the sum of the parents,
  is checked on :func:`branching.routing` above; the columns' mix of a
  routing is the einsum cross-stitch's numpy reference checks.)"""
  kw = dict(encoder=encoder, hidden=(7, 6), channels=channels)
  ltb = multitask.make_model("ltb", MIX3, shape, **kw)
  ind = multitask.make_model("independent", MIX3, shape, **kw)
  names = [g for g, _ in ltb.layer_groups if g != "heads"]
  rng = np.random.default_rng(3)
  params, state = jax.device_get(jax.jit(lambda k: (ltb.init(k), ltb.init_state(k)))(
      jax.random.key(0)))
  assert sorted(params["shared"]["branch"]) == sorted(names[:-1])
  params["shared"]["branch"] = {n: (rng.normal(size=(3, 3)) * 2).astype(np.float32)
                                for n in params["shared"]["branch"]}
  state["shared"]["branch"]["count"] = np.int32(HP.warmup_epochs * HP.epoch_steps + 17)
  x = rng.normal(size=(5, 4) + shape).astype(np.float32)
  ids = np.asarray([2, 0, 1, 2, 0], np.int32)

  def assembled(alpha):
    """Per slot: ``independent``'s parameters whose slot-task column is the
    path's layers (the other columns: the ltb model's own), stacked."""
    out = []
    for t in ids:
      path = _path(alpha, names, int(t))
      trunk = {n: jax.tree.map(np.copy, params["tasks"]["trunk"][n]) for n in names}
      for n, c in path.items():
        trunk[n] = jax.tree.map(lambda a, b, c=c, t=t: _set_row(a, t, b[c]), trunk[n],
                                params["tasks"]["trunk"][n])
      out.append({"shared": {}, "tasks": {"trunk": trunk, "heads": params["tasks"]["heads"]}})
    return jax.tree.map(lambda *a: np.stack(a), *out)

  @jax.jit
  def run(p, s):
    return {train: (multitask.forward(ltb, p, x, ids, s, train=train),
                    branching.routing(p["shared"]["branch"], s["shared"]["branch"], HP,
                                      train)[0]) for train in (True, False)}
  out = jax.device_get(run(params, state))
  refs = jax.device_get(jax.jit(lambda ps: {
      train: jax.vmap(lambda p, xk, t: ind.apply(p, xk[None], t[None]))(ps[train], x, ids)
      for train in (True, False)})({train: assembled(out[train][1]) for train in (True, False)}))
  for train in (True, False):
    (outs, new_state), alpha = out[train]
    assert int(new_state["shared"]["branch"]["count"]) == int(
        state["shared"]["branch"]["count"]) + train
    for k, t in enumerate(ids):
      g = MIX3.tasks[t].group
      np.testing.assert_allclose(outs[g][k], refs[train][g][k, 0], rtol=1e-5, atol=1e-6)
  paths = [_path(out[True][1], names, int(t)) for t in ids]
  assert any(len(set(p.values())) > 1 for p in paths)        # a path that branches


def _set_row(a, t, row):
  a = a.copy()
  a[t] = row
  return a


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": (8,)}, r"ltb routes the columns between trunk layers and needs at least two"),
    ({"tau0": 0.0}, r"ltb.tau0 must be > 0"),
    ({"epoch_steps": 0}, r"ltb.epoch_steps must be >= 1"),
    ({"warmup_mix": "max"}, r"ltb.warmup_mix='max' is not one of \('sum', 'mean'\)"),
    ({"hard": "yes"}, r"ltb.hard must be True or False"),
])
def test_bad_settings_are_named(kwargs, message):
  with pytest.raises(ValueError, match=message):
    multitask.make_model("ltb", MIX3, (5,), **kwargs)


# --- the train step -------------------------------------------------------------


def test_the_step_draws_one_architecture_per_step_and_freezes_logits_in_the_warm_up():
  """Toy data, 4 tasks, K = 3 slots of distinct examples, one warm-up epoch
  of 2 steps: ``fixed`` (one backward) and ``mgda`` (per-slot gradients) for
  4 steps each, in one program. The clock counts the steps; the logits do not
  move in the warm-up and do after; the loss the step reports at step 3
  equals the losses of a forward with the architecture re-drawn from the
  step's state (so the losses and every slot's gradient read that one draw)."""
  data = helpers.toy_data()
  ts = data.taskset
  hp = dict(epoch_steps=2, warmup_epochs=1)
  model = multitask.make_model("ltb", ts, data.input_shape, hidden=(8, 6), **hp)
  tx = optax.adam(1e-2)
  sampler = sampling.make_sampler(ts, sampling.task_probabilities("uniform", data.num_train),
                                  3, 8)
  fns = {m: steps.make_train_step(model, tx, m, sampler, weights=np.ones(4), seed=5)
         for m in ("fixed", "mgda")}

  @jax.jit
  def run(split):
    out = {}
    for m, fn in fns.items():
      state = steps.init_train_state(model, tx, jax.random.key(0), m)
      trail, meas = [state], []
      for _ in range(4):
        state, mm = fn(state, split)
        trail.append(state)
        meas.append(mm)
      out[m] = ([(s.params, s.model_state) for s in trail], meas)
    return out
  out = jax.device_get(run(data.train))
  same = lambda a, b: all(np.array_equal(u, v) for u, v in zip(  # noqa: E731
      jax.tree.leaves(a), jax.tree.leaves(b)))
  for m, (trail, meas) in out.items():
    counts = [int(s["shared"]["branch"]["count"]) for _, s in trail]
    assert counts == [0, 1, 2, 3, 4], m
    branch = [p["shared"]["branch"] for p, _ in trail]
    assert same(branch[0], branch[2]), m                      # warm-up: frozen
    assert not same(branch[2], branch[4]), m                  # then they learn
    assert all(np.isfinite(mm["loss"]) for mm in meas), m
    assert not same(trail[0][0]["tasks"], trail[2][0]["tasks"]), m
    # Step 3 (after the warm-up): the step's batch re-derived, the model run
    # once from the step's parameters and state; the per-task loss sums agree.
    params3, state3 = trail[3]
    ids, x, ys, _ = helpers.step_batch(
        data, sampling.task_probabilities("uniform", data.num_train), seed=5, step=3, k=3,
        b=8)
    losses = jax.device_get(jax.jit(lambda p, s: tasks.slot_losses(
        ts, multitask.forward(model, p, x, ids, s, train=True)[0], ys, ids))(params3, state3))
    want = np.zeros(len(ts))
    np.add.at(want, ids, losses)
    np.testing.assert_allclose(meas[3]["task_loss_sum"], want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_an_interrupted_ltb_run_resumes_bitwise(tmp_path):
  """multi_digits with ``ltb`` (MLP of two layers, 5-step epochs, one warm-up
  epoch), 60 steps in calls of 10, checkpoints at 20/40/60: stopped after the
  checkpoint at 20 and rerun, it ends with the bits of the uninterrupted run
  (parameters, Adam's moments, the sampler's key and clock), and the clock
  counts every step; a run started from it (``init_from``) loads the logits
  but not the sampler."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  from test_experiments import (  # pylint: disable=g-import-not-at-top
      _Preempted, _assert_bitwise_equal, _fresh_state, _restore, _small_digits_config)

  def config():
    c = _small_digits_config()
    c.model.arch, c.model.encoder, c.model.hidden = "ltb", "mlp", (32, 16)
    c.model.ltb.epoch_steps, c.model.ltb.warmup_epochs = 5, 1
    c.total_steps, c.steps_per_call = 60, 10
    c.log_steps = c.eval_steps = c.checkpoint_steps = 20
    return c
  straight, interrupted = str(tmp_path / "a"), str(tmp_path / "b")
  train.train_and_evaluate(config(), straight)

  def preempt(step, _):
    if step == 30:
      raise _Preempted()
  with pytest.raises(_Preempted):
    train.train_and_evaluate(config(), interrupted, callbacks=[preempt])
  summary = train.train_and_evaluate(config(), interrupted)
  assert summary["resumed_from_step"] == 20 and summary["step"] == 60
  assert helpers.metrics_rows(interrupted) == helpers.metrics_rows(straight)
  fresh = _fresh_state(config())
  final_a, final_b = _restore(straight, fresh), _restore(interrupted, fresh)
  _assert_bitwise_equal(final_b, final_a)
  assert int(final_a.model_state["shared"]["branch"]["count"]) == 60
  assert not np.array_equal(final_a.params["shared"]["branch"]["layer_0"],
                            fresh.params["shared"]["branch"]["layer_0"])
  # Fine-tuning from it (init_from): the logits load, the sampler does not --
  # the new run has its own key and starts its clock (warm-up included) at 0.
  from mtljax import build  # pylint: disable=g-import-not-at-top
  c = config()
  c.init_from, c.seed = straight, c.seed + 1
  tuned = build.build_run(c, build.data_from_config(c)).state
  np.testing.assert_array_equal(tuned.params["shared"]["branch"]["layer_0"],
                                final_a.params["shared"]["branch"]["layer_0"])
  assert int(tuned.model_state["shared"]["branch"]["count"]) == 0
  assert not np.array_equal(tuned.model_state["shared"]["branch"]["key"],
                            final_a.model_state["shared"]["branch"]["key"])
