"""Krum, the coordinate-wise trimmed mean and CR-MOGM (issue 29, TorchJD's
``Krum``, ``TrimmedMean`` and ``CRMOGMWeighting``) against float64 numpy
references written from the papers (Blanchard et al. 2017, Yin et al. 2018,
Zhou et al. 2022 in TorchJD's form), on hard Jacobians (norms 100x apart,
near-opposite and nearly collinear rows) and on inputs with exact ties; each
compiled once per shape for all its cases; then all three in one train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hard_jacobians
import helpers
import test_gradients  # its float64 min-norm point (MGDA's reference)
from mtljax import gradients
from mtljax import objectives
from mtljax import optim
from mtljax import steps
from mtljax.data import sampling
from mtljax.models import multitask
from mtljax.objectives import stateful

_np_min_norm = test_gradients._np_min_norm  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Krum.
# ---------------------------------------------------------------------------

# (n_byzantine, n_selected) per T: TorchJD's bound T >= f + 3 and T >= m, at
# the edge (f = T - 3: one neighbour scored; m = T: every row) and inside.
_KRUM_HP = {3: ((0, 1), (0, 3), (0, 2)), 5: ((0, 1), (1, 2), (2, 1), (1, 5)),
            8: ((0, 1), (2, 3), (5, 1), (3, 8))}


def _np_krum(g, f, m):
  """Blanchard et al. 2017, Definition 1 (float64): ``s_i`` the sum of the
  squared distances to the ``T - f - 2`` nearest other rows; the ``m`` rows
  of lowest score, the lower index first among equal scores."""
  t = len(g)
  d = ((g[:, None, :] - g[None, :, :]) ** 2).sum(-1)
  scores = np.array([np.sort(np.delete(d[i], i))[:t - f - 2].sum() for i in range(t)])
  chosen = sorted(range(t), key=lambda i: (scores[i], i))[:m]
  beta = np.zeros(t)
  beta[chosen] = 1.0 / m
  return beta, scores


def _krum_cases(t):
  """``[n, T, 10]`` float64: every kind of the hard generator (4 each), plus
  exact ties: orthonormal rows (every distance 2), a row and its duplicate
  (scored alike), and two rows at equal distance from a central one."""
  gs = [hard_jacobians.hard_jacobian_batch(kind, t, 10, 4, seed=3) for kind in
        hard_jacobians.KINDS]
  ties = np.zeros((3, t, 10))
  ties[0, :, :t] = 3.0 * np.eye(t)
  rng = np.random.default_rng(t)
  ties[1] = rng.normal(size=(t, 10))
  ties[1, 1] = ties[1, 0]
  ties[2] = rng.normal(size=(t, 10))
  ties[2, 0] = 0.0
  ties[2, 2] = -ties[2, 1]
  return np.concatenate(gs + [ties])


def _krum_outputs(t):
  """Every case x hyper-parameter pair in one program: the weights on the
  train step's Jacobian path (with the rows' factor) and on its accumulate
  path (the Gram only)."""
  def one(g):
    k, r = gradients.gram(g), gradients.cosine_factor(g)
    return {hp: (gradients.krum_weights(k, r, n_byzantine=hp[0], n_selected=hp[1]),
                 gradients.krum_weights(k, n_byzantine=hp[0], n_selected=hp[1]))
            for hp in _KRUM_HP[t]}
  gs = _krum_cases(t)
  return gs, jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(jnp.asarray(gs, jnp.float32)))


@pytest.mark.parametrize("t", sorted(_KRUM_HP))
def test_krum_matches_the_papers_scores_and_choice(t):
  """The scores to float32 accuracy (relative ~1e-5 of the largest on the
  factor's path; the Gram's ``2 (1 - C_ij)`` is absolute ~1e-7 per unit
  distance), and the chosen rows are the reference's wherever the m-th and
  (m+1)-th lowest scores are apart by more than that; where they are not (a
  near tie), the chosen rows' float64 scores are within it of the m lowest.
  Exact ties (orthonormal rows; two rows each other's nearest) go to the
  lowest indices."""
  gs, out = _krum_outputs(t)
  exact = [0]
  for (f, m), ((beta_r, info_r), (beta_k, info_k)) in out.items():
    for n, g in enumerate(gs):
      want, scores = _np_krum(g, f, m)
      scale = scores.max()
      for beta, info, tol in ((beta_r, info_r, 1e-5), (beta_k, info_k, 1e-5)):
        np.testing.assert_allclose(info["scores"][n], scores, rtol=1e-4, atol=tol * scale,
                                   err_msg=f"T={t} f={f} m={m} case {n}")
        assert np.isclose(beta[n].sum(), 1.0)
        assert set(np.unique(beta[n])) <= {0.0, np.float32(1.0 / m)}
        # The scores within rounding of the m-th lowest: if they are equal in
        # float64 (an exact tie, e.g. two rows each other's nearest with f =
        # T - 3, or none besides it), the choice is the reference's, lower
        # indices first; otherwise any of them may be chosen.
        band = np.abs(scores - np.sort(scores)[m - 1]) <= 2 * tol * scale
        if np.ptp(scores[band]) == 0:
          np.testing.assert_array_equal(beta[n] > 0, want > 0,
                                        err_msg=f"T={t} f={f} m={m} case {n}")
          exact[0] += 1
        else:
          assert scores[beta[n] > 0].max() <= np.sort(scores)[m - 1] + 2 * tol * scale
      if n == len(gs) - 3:                  # orthonormal rows: every score equal
        np.testing.assert_array_equal(beta_r[n] > 0, np.arange(t) < m)
        np.testing.assert_array_equal(beta_k[n], beta_r[n])
  # Most choices are checked exactly (the rest: near ties of distinct scores).
  assert exact[0] >= 0.75 * 2 * len(gs) * len(out), exact[0]


def test_krum_resists_outliers_and_is_the_mean_when_every_row_is_chosen():
  """Five rows near a common gradient and two far away (f = 2, Blanchard et
  al.'s setting): Krum picks one of the five, Multi-Krum with m = 3 three of
  them; with m = T the direction is the mean of the rows."""
  rng = np.random.default_rng(0)
  g = rng.normal(size=(7, 12)) * 0.1 + rng.normal(size=12)
  g[5] = 100.0 * rng.normal(size=12)
  g[6] = -g[0] * 50.0
  fn = jax.jit(lambda g: [gradients.krum(g, n_byzantine=2, n_selected=m)[:2] for m in (1, 3, 7)])
  (_, b1), (_, b3), (d7, b7) = fn(jnp.asarray(g, jnp.float32))
  assert np.asarray(b1)[5:].sum() == 0 and np.asarray(b3)[5:].sum() == 0
  assert np.count_nonzero(np.asarray(b3)) == 3
  np.testing.assert_allclose(d7, g.mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(b7, np.full(7, 1.0 / 7), rtol=1e-6)


def _np_krum_present(g, present, f, m):
  """Krum on the present rows alone (float64), as ``krum_weights`` documents
  it: the bounds shrink to the ``p`` present rows (``f_p = min(f, max(p - 3,
  0))`` rows may be adversarial, ``max(p - f_p - 2, 0)`` neighbours scored,
  ``m_p = min(m, p)`` rows averaged); absent rows weigh 0 and score inf."""
  idx = np.flatnonzero(present)
  p = len(idx)
  beta, scores = np.zeros(len(g)), np.full(len(g), np.inf)
  if p == 0:
    return beta, scores
  f_p, m_p = min(f, max(p - 3, 0)), min(m, p)
  sub = g[idx]
  d = ((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)
  q = max(p - f_p - 2, 0)
  scores[idx] = [np.sort(np.delete(d[i], i))[:q].sum() for i in range(p)]
  chosen = sorted(idx, key=lambda i: (scores[i], i))[:m_p]
  beta[chosen] = 1.0 / m_p
  return beta, scores


# Present masks of T = 6 rows: all, one absent (first, middle, last), three
# absent (p = 3 < f + 3 for f = 1), five absent (p = 1), none present.
_MASKS = np.array([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1], [1, 1, 0, 1, 1, 1],
                   [1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 0, 1], [0, 0, 0, 1, 0, 0],
                   [0, 0, 0, 0, 0, 0]], bool)
_KRUM_PRESENT_HP = ((0, 1), (1, 1), (1, 2), (0, 3))


def test_krum_leaves_absent_rows_out_and_shrinks_its_bounds_to_the_present_ones():
  """Absent rows (zero, as the train step's slots of weight 0 are) are
  neither candidates nor neighbours: the weights and the present rows' scores
  are the float64 reference's on the present rows alone, on every hard kind
  (norms 100x apart, near-opposite rows) and for masks from all present to
  none; with fewer present rows than ``f + 3`` or ``m``, the shrunken bounds.
  Without absent rows the masked and unmasked forms choose alike. One
  program for every case, mask and hyper-parameter pair (both Gram paths)."""
  gs = np.concatenate([hard_jacobians.hard_jacobian_batch(kind, 6, 10, 2, seed=7)
                       for kind in hard_jacobians.KINDS])            # [10, 6, 10]
  rows = gs[:, None] * _MASKS[None, :, :, None]                      # [10, 7, 6, 10]

  def one(g, present):
    k, r = gradients.gram(g), gradients.cosine_factor(g)
    return {hp: (gradients.krum_weights(k, r, present, n_byzantine=hp[0], n_selected=hp[1]),
                 gradients.krum_weights(k, None, present, n_byzantine=hp[0],
                                        n_selected=hp[1]),
                 gradients.krum_weights(k, r, n_byzantine=hp[0], n_selected=hp[1])[0])
            for hp in _KRUM_PRESENT_HP}
  masks = np.broadcast_to(_MASKS, rows.shape[:3])
  out = jax.tree.map(np.asarray, jax.jit(jax.vmap(jax.vmap(one)))(
      jnp.asarray(rows, jnp.float32), jnp.asarray(masks)))
  checked = 0
  for (f, m), ((beta_r, info_r), (beta_k, info_k), plain) in out.items():
    for n in range(len(gs)):
      for j, present in enumerate(_MASKS):
        g = rows[n, j]
        want, scores = _np_krum_present(g, present, f, m)
        where = f"f={f} m={m} case {n} mask {j}"
        for beta, info in ((beta_r, info_r), (beta_k, info_k)):
          b, sc = beta[n, j], info["scores"][n, j]
          assert np.all(b[~present] == 0.0) and np.all(np.isinf(sc[~present])), where
          if not present.any():
            assert np.all(b == 0.0), where
            continue
          scale = max(scores[present].max(), 1e-30)
          np.testing.assert_allclose(sc[present], scores[present], rtol=1e-4,
                                     atol=1e-5 * scale, err_msg=where)
          m_p = min(m, present.sum())
          np.testing.assert_allclose(b.sum(), 1.0, rtol=1e-6, err_msg=where)
          assert np.count_nonzero(b) == m_p, where
          # As in the unmasked test: the choice is the reference's unless the
          # m_p-th and (m_p+1)-th lowest scores are within rounding.
          ranked = np.sort(scores[present])
          band = np.abs(scores - ranked[m_p - 1]) <= 2e-5 * scale
          if np.ptp(scores[band & present]) == 0:
            np.testing.assert_array_equal(b > 0, want > 0, err_msg=where)
            checked += 1
          else:
            assert scores[b > 0].max() <= ranked[m_p - 1] + 2e-5 * scale, where
        if present.all():
          np.testing.assert_array_equal(beta_r[n, j] > 0, plain[n, j] > 0, err_msg=where)
  assert checked >= 0.75 * 2 * len(gs) * (len(_MASKS) - 1) * len(out), checked


def _eye(n):
  """A numpy Gram (``jnp.eye`` would compile four one-op programs per n)."""
  return np.eye(n, dtype=np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: gradients.krum_weights(_eye(4), n_byzantine=-1), r"krum.n_byzantine must be"),
    (lambda: gradients.krum_weights(_eye(4), n_selected=0), r"krum.n_selected must be"),
    (lambda: gradients.krum_weights(_eye(4), n_byzantine=1.5), r"krum.n_byzantine must be"),
    (lambda: gradients.krum_weights(_eye(3), n_byzantine=1),
     r"krum needs at least 4 rows \(n_byzantine \+ 3 = 4 and n_selected = 1\), got 3"),
    (lambda: gradients.krum_weights(_eye(3), n_selected=4), r"krum needs at least 4 rows"),
    (lambda: objectives.make_objective("krum", 4, n_selected=True), r"krum.n_selected must be"),
    (lambda: objectives.make_objective("trimmed_mean", 4, trim_number=-1),
     r"trimmed_mean: trim_number must be an integer >= 0, got -1"),
    (lambda: objectives.make_objective("cr_mogm", 4, alpha=1.5),
     r"cr_mogm: alpha must be in \[0, 1\], got 1.5"),
    (lambda: objectives.make_objective("cr_mogm", 4, tol=1.0), r"mgda.tol must be in"),
])
def test_bad_hyperparameters_are_refused_before_tracing(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("method, hp, need", [
    ("krum", {"n_byzantine": 1}, 4), ("krum", {"n_selected": 5}, 5),
    ("trimmed_mean", {"trim_number": 2}, 5)])
def test_the_step_refuses_too_few_slots_before_tracing(method, hp, need):
  """Krum scores ``T - f - 2 >= 1`` neighbours and averages ``m <= T`` rows;
  the trimmed mean keeps ``T - 2 trim >= 1`` values (TorchJD's checks): with
  3 task slots per step the step is refused when it is built, naming the
  setting, and so is a config that says so (before any data loads)."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  obj = objectives.make_objective(method, 4, **hp)
  assert obj.min_slots == need
  with pytest.raises(ValueError, match=rf"objective.method='{method}' .* needs at least "
                                       rf"{need} task slots per step, got "
                                       r"sampling.tasks_per_step=3"):
    steps.make_train_step(model, optim.make_optimizer("sgd", lr=1.0), obj,
                          sampling.make_sampler(data.taskset, np.full(4, 0.25), 3, 8),
                          weights=np.ones(4))
  from mtljax import build  # pylint: disable=g-import-not-at-top
  from mtljax import errors  # pylint: disable=g-import-not-at-top
  c = helpers.small_sinusoids_config()
  c.objective.method = method
  c.objective[method].update(hp)
  c.sampling.tasks_per_step = 3
  with pytest.raises(errors.ConfigError, match=rf"config.objective.method='{method}' .* needs "
                                               rf"at least {need} task slots per step, got "
                                               r"config.sampling.tasks_per_step=3\."):
    build.validate_config(c)
  c.sampling.tasks_per_step = 0                      # all tasks: 3 named
  c.data.tasks = ("sine_00", "sine_01", "sine_02")
  with pytest.raises(errors.ConfigError, match=r"tasks_per_step=0 \(all 3 of config.data"):
    build.validate_config(c)
  c.objective.method = "krum"
  c.objective.krum.n_byzantine = -2
  with pytest.raises(errors.ConfigError, match=r"config.objective.krum.n_byzantine must be an "
                                               r"integer >= 0, got -2"):
    build.validate_config(c)


# ---------------------------------------------------------------------------
# The trimmed mean.
# ---------------------------------------------------------------------------


def _np_trimmed_mean(g, present, trim_number):
  """Yin et al. 2018 (Option II) per coordinate on the present rows (float64):
  sort, drop ``trim`` from each end, average; ``trim`` lowered to
  ``(p - 1) // 2`` when fewer than ``2 trim + 1`` rows are present. The share
  of each row among the kept values, ties in a coordinate broken by row index."""
  rows = np.flatnonzero(present)
  p = len(rows)
  trim = min(trim_number, (p - 1) // 2)
  kept = p - 2 * trim
  order = rows[np.argsort(g[rows], axis=0, kind="stable")]         # [p, D]
  keep = order[trim:p - trim]
  mean = np.take_along_axis(g, keep, axis=0).sum(0) / kept
  share = np.bincount(keep.ravel(), minlength=len(g)) / (kept * g.shape[1])
  return mean, share


def _trim_cases(t):
  """``[n, T, 10]``: the hard kinds (2 each) and integer rows with many ties."""
  gs = [hard_jacobians.hard_jacobian_batch(kind, t, 10, 2, seed=5)
        for kind in hard_jacobians.KINDS]
  ints = np.random.default_rng(t).integers(-2, 3, size=(3, t, 10)).astype(np.float64)
  return np.concatenate(gs + [ints])


@pytest.mark.parametrize("t", [3, 5, 8])
def test_trimmed_mean_matches_the_coordinate_wise_reference(t):
  """Every trim from 0 to the most T allows, with every row present and with
  the last one or two absent (fewer trimmed where too few are left), in one
  program per T; and a pytree of rows gives the matrix's mean and shares."""
  gs = _trim_cases(t)
  trims = range(0, (t - 1) // 2 + 1)
  masks = np.ones((3, t), bool)
  masks[1, -1] = False
  masks[2, -2:] = False

  def one(g):
    tree = {"a": g[:, :4].reshape(t, 2, 2), "b": g[:, 4:]}
    return {(tr, i): (stateful.trimmed_mean_rows(g, jnp.asarray(mask), tr),
                      stateful.trimmed_mean_rows(tree, jnp.asarray(mask), tr))
            for tr in trims for i, mask in enumerate(masks)}
  out = jax.tree.map(np.asarray, jax.jit(jax.vmap(one))(jnp.asarray(gs, jnp.float32)))
  for (tr, i), ((mean, share), (tree_mean, tree_share)) in out.items():
    for n, g in enumerate(gs):
      want, want_share = _np_trimmed_mean(g, masks[i], tr)
      scale = np.abs(g).max()
      np.testing.assert_allclose(mean[n], want, rtol=1e-5, atol=1e-6 * scale,
                                 err_msg=f"T={t} trim={tr} mask={i} case {n}")
      if n >= len(gs) - 3:                  # integer rows: the ties break as the reference's
        np.testing.assert_allclose(share[n], want_share, rtol=1e-6, atol=1e-7)
      np.testing.assert_allclose(share[n].sum(), 1.0, rtol=1e-6)
      np.testing.assert_allclose(np.r_[tree_mean["a"][n].ravel(), tree_mean["b"][n]],
                                 mean[n], rtol=1e-6, atol=1e-7 * scale)
      np.testing.assert_allclose(tree_share[n], share[n], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# The objectives over steps, on a linear "model" (the rows given).
# ---------------------------------------------------------------------------


_linear_lin = helpers.linear_linearization


def _run(obj, seq, weights):
  """``obj.gradients`` over ``seq`` of ``(task_ids, losses, jac)`` (one
  compiled program); returns ``[(shared gradient, Result, state)]``."""
  state = obj.init_state()

  @jax.jit
  def fn(ids, l, jac, st, n):
    # The step's key and ``after_update`` in the same program (run eagerly,
    # each of their ops would compile a program of its own).
    res = obj.gradients(_linear_lin(l, jac), objectives.Inputs(
        ids, jnp.asarray(weights), st, {}, jax.random.key(n)))
    return res, obj.after_update(res.state, l, ids, None)
  out = []
  for n, (ids, l, jac) in enumerate(seq):
    res, state = fn(jnp.asarray(ids), jnp.asarray(l, jnp.float32),
                    jnp.asarray(jac, jnp.float32), state, np.int32(n))
    out.append((np.asarray(res.grads["shared"], np.float64), res, state))
  return out


def _jac(seed, t, kind):
  return hard_jacobians.hard_jacobian_batch(kind, t, 10, 1, seed)[0]


# Five tasks, four slots a step: task sampling, a duplicate slot (task 1 twice
# in step 2), a slot of weight 0 (task 4, weight 0) in steps 1 and 3, and a
# task (3) first seen in step 3.
_W = np.array([1.0, 2.0, 0.5, 1.0, 0.0], np.float32)
_SEQ = [([0, 1, 2, 4], [1.0, 0.5, 2.0, 0.7], _jac(1, 4, "opposite_100x")),
        ([2, 1, 0, 1], [0.7, 0.4, 1.2, 0.4], _jac(2, 4, "norms_100x")),
        ([4, 3, 1, 0], [0.3, 0.9, 1.1, 0.8], _jac(3, 4, "opposite")),
        ([3, 2, 0, 1], [0.5, 0.6, 0.9, 1.0], _jac(4, 4, "gaussian"))]


def _np_cr_mogm(seq, weights, alpha, num_tasks):
  """CR-MOGM on MGDA, TorchJD's recurrence (float64), per task: ``lambda_hat``
  the min-norm weights of the present rows (summed over a task's slots),
  ``lambda <- alpha lambda + (1 - alpha) lambda_hat`` on the tasks with a
  present slot, from ``lambda_hat`` at a task's first; the slots share
  their task's weight equally."""
  lam, seen, out = np.zeros(num_tasks), np.zeros(num_tasks, bool), []
  for ids, _, jac in seq:
    ids = np.asarray(ids)
    rows = weights[ids][:, None] * jac
    present = weights[ids] > 0
    hat_slots = np.zeros(len(ids))
    hat_slots[present] = _np_min_norm(rows[present])
    hat = np.bincount(ids, hat_slots, minlength=num_tasks)
    count = np.bincount(ids, present, minlength=num_tasks)
    active = count > 0
    prev = np.where(seen, lam, hat)
    lam = np.where(active, alpha * prev + (1 - alpha) * hat, lam)
    seen |= active
    beta = np.where(present, lam[ids] / np.maximum(count[ids], 1), 0.0)
    out.append((beta @ rows, lam.copy(), beta))
  return out


@pytest.mark.parametrize("alpha", [0.9, 0.0])
def test_cr_mogm_smooths_mgda_weights_over_steps(alpha):
  """Four steps with sampling, a duplicate slot, weight-0 slots and a task
  first seen late: the direction, the per-task weights ``lambda`` (state and
  measurement) and the logged slot weights follow the float64 recurrence; with
  ``alpha = 0`` every step is MGDA on the present rows."""
  out = _run(objectives.make_objective("cr_mogm", 5, alpha=alpha), _SEQ, _W)
  ref = _np_cr_mogm(_SEQ, _W, alpha, 5)
  for n, ((d, res, state), (want, lam, beta)) in enumerate(zip(out, ref)):
    np.testing.assert_allclose(state["lambda"], lam, atol=2e-4, err_msg=f"step {n}")
    np.testing.assert_allclose(res.measurements["objective_lambda_sum"], lam, atol=2e-4)
    np.testing.assert_allclose(res.measurements["grad_weight_sum"],
                               np.bincount(_SEQ[n][0], beta, minlength=5), atol=2e-4)
    np.testing.assert_allclose(d, want, rtol=1e-3, atol=1e-3 * np.linalg.norm(want))
    assert bool(res.measurements["solver_failures"] == 0)
  assert np.all(np.asarray(out[1][2]["seen"]) == [True, True, True, False, False])
  assert float(out[-1][2]["lambda"][4]) == 0.0            # weight 0: never active


def test_trimmed_mean_objective_over_steps_with_absent_slots():
  """The step's direction is the trimmed mean of the present rows ``w_k g_k``
  (a weight-0 slot left out: with 3 present of 4, trim 1 keeps the median),
  the logged weights the rows' shares of the kept values."""
  out = _run(objectives.make_objective("trimmed_mean", 5), _SEQ, _W)
  for n, ((d, res, _), (ids, _, jac)) in enumerate(zip(out, _SEQ)):
    w = _W[np.asarray(ids)]
    want, share = _np_trimmed_mean(w[:, None] * jac, w > 0, 1)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-6 * np.abs(jac).max(),
                               err_msg=f"step {n}")
    np.testing.assert_allclose(res.measurements["grad_weight_sum"],
                               np.bincount(ids, share, minlength=5), atol=1e-6)


# ---------------------------------------------------------------------------
# In the train step, and where methods are listed.
# ---------------------------------------------------------------------------


def test_the_three_methods_in_one_train_step():
  """One program runs a step of each (K = T = 4, SGD lr 1, unequal weights)
  from the same parameters and batch: the shared parameters move by the
  float64 reference direction over the per-task gradients (``jax.grad`` per
  slot), the task parameters by the weighted sum's gradient, and CR-MOGM's
  first ``lambda`` is the float64 min-norm point. A fourth step runs Krum with
  one sampled task at weight 0: its zero row is left out (Krum on the three
  present rows, not a zero row that could be chosen or be a neighbour)."""
  data = helpers.toy_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, hidden=(8,))
  tx = optim.make_optimizer("sgd", lr=1.0)
  weights = np.array([1.0, 2.0, 0.5, 1.0], np.float32)
  probs = np.full(4, 0.25)
  ids, x, ys, _ = helpers.step_batch(data, probs, seed=5, k=4, b=16)
  dropped = int(ids[np.argmax([np.sum(ids == t) for t in ids])])   # a sampled task
  weights0 = weights.copy()
  weights0[dropped] = 0.0
  methods = ("krum", "trimmed_mean", "cr_mogm", "krum")
  fns, states = [], []
  for i, m in enumerate(methods):
    obj = objectives.make_objective(m, 4)
    fns.append(steps.make_train_step(model, tx, obj,
                                     sampling.make_sampler(data.taskset, probs, 4, 16),
                                     weights=weights0 if i == 3 else weights, seed=5))
    states.append(steps.init_train_state(model, tx, jax.random.key(0), obj))
  outs = jax.jit(lambda sts, train: [f(s, train) for f, s in zip(fns, sts)])(states, data.train)

  p = states[0].params
  _, grads = helpers.per_task_grads(model, p, x, ys, ids, False, weights)
  leaves = [jax.tree.leaves(g["shared"]) for g in grads]
  rows = np.stack([np.concatenate([np.asarray(a, np.float64).ravel() for a in l])
                   for l in leaves])
  # The weight-0 step's rows: w0_k grad L_k = (w0_k / w_k) (w_k grad L_k).
  ratio = weights0[ids] / weights[ids]
  rows0 = rows * ratio[:, None]
  present = weights0[ids] > 0
  assert 0 < present.sum() < 4
  mgda = _np_min_norm(rows)
  want = [_np_krum(rows, 0, 1)[0] @ rows, _np_trimmed_mean(rows, np.ones(4, bool), 1)[0],
          mgda @ rows, _np_krum_present(rows0, present, 0, 1)[0] @ rows0]
  # Krum on the three present rows differs from Krum on four with a zero row.
  assert not np.allclose(want[3], _np_krum(rows0, 0, 1)[0] @ rows0)
  # In float32 numpy: the same IEEE sums and differences as jnp's, no compiles.
  def plain(r):
    return jax.tree.map(lambda *a: sum(np.float32(c) * np.asarray(b) for c, b in zip(r, a)),
                        *[g["tasks"] for g in grads])
  for i, (m, (new, meas)) in enumerate(zip(methods, outs)):
    moved = np.concatenate([(np.asarray(a) - np.asarray(b)).astype(np.float64).ravel()
                            for a, b in zip(jax.tree.leaves(p["shared"]),
                                            jax.tree.leaves(new.params["shared"]))])
    np.testing.assert_allclose(moved, want[i], rtol=1e-3, atol=1e-5 * np.abs(want[i]).max(),
                               err_msg=m)
    helpers.assert_trees_close(
        new.params["tasks"],
        jax.tree.map(lambda a, g: np.asarray(a) - g, p["tasks"],
                     plain(ratio if i == 3 else np.ones(4))))
    assert np.all(np.isfinite(np.asarray(meas["grad_weight_sum"]))), m
  np.testing.assert_allclose(np.asarray(outs[2][0].objective_state["lambda"])[ids], mgda,
                             atol=2e-4)


def test_the_methods_are_listed_configured_and_benchmarked():
  """Every name is an objective method with its hyper-parameters in the
  config (TorchJD's defaults where it has them); Krum is a Gram method
  (public function, toy excluded: two rows are too few); CR-MOGM's MGDA
  settings are MGDA's defaults; the objectives benchmark lists all three."""
  from experiments import bench_objectives  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from mtljax import toy  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  assert {"krum", "trimmed_mean", "cr_mogm"} <= set(objectives.methods())
  assert c.objective.krum.to_dict() == {"n_byzantine": 0, "n_selected": 1}
  assert c.objective.trimmed_mean.to_dict() == {"trim_number": 1}
  assert c.objective.cr_mogm.to_dict() == {"alpha": 0.9, **gradients.REGISTRY["mgda"].hparams}
  assert "krum" in gradients.REGISTRY and callable(gradients.krum)
  assert gradients.REGISTRY["krum"].rows_needed({"n_byzantine": 2}) == 5
  assert "krum" not in toy.toy_methods() and "mgda" in toy.toy_methods()
  listed = bench_objectives._METHODS.default  # pylint: disable=protected-access
  assert {"krum+shared", "trimmed_mean+shared", "cr_mogm+shared"} <= set(listed)
