"""Methods that keep state across steps or transform the per-task gradients
themselves: GradVac, GradDrop, DB-MTL, MoCo, ExcessMTL, IMTL, the trimmed mean,
CR-MOGM -- their arithmetic
(pure, jittable functions of arrays with no knowledge of the train step) and
their objectives.

Conventions: ``K`` slots (sampled tasks, ``task_ids [K]``), ``T`` tasks. Slot
gradients are ``[K, ...]`` pytrees (row k is ``w_k grad L_k``); per-task state
is ``[T, ...]``, placed by task id, and only the sampled tasks' rows move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax import gradients
from mtljax import jacobians
from mtljax.objectives import gram
from mtljax.objectives.base import Inputs, Objective, Result, check_hparam, unbound_state


_EPS = 1e-8  # the reference implementations' guard in norms and ratios


# Helpers over [K, ...] / [T, ...] pytrees.


def row_norms(tree) -> jax.Array:
  """``[N]``: the Euclidean norm of each row of a pytree with leading axis N."""
  return jnp.sqrt(jnp.maximum(jnp.diag(gradients.gram(tree)), 0.0))


def scale_rows(scale: jax.Array, tree):
  """Row n of every leaf times ``scale[n]``."""
  return jax.tree.map(
      lambda a: a * scale.astype(a.dtype).reshape((-1,) + (1,) * (a.ndim - 1)), tree)


def task_mean_rows(rows, task_ids: jax.Array, num_tasks: int, valid: jax.Array):
  """``([T, ...] mean of each task's valid slot rows, active [T] bool)``;
  duplicate slots of one task (sampling with replacement) are averaged; slots
  with ``valid [K]`` False (weight 0: no labelled example, or a zero task
  weight) count as not sampled."""
  count = jax.ops.segment_sum(valid.astype(jnp.float32), task_ids, num_tasks)
  rows = scale_rows(valid.astype(jnp.float32), rows)
  mean = jax.tree.map(lambda a: jax.ops.segment_sum(a, task_ids, num_tasks), rows)
  return scale_rows(1.0 / jnp.maximum(count, 1.0), mean), count > 0


def where_rows(mask: jax.Array, new, old):
  """Rows of ``new`` where ``mask [N]``, else those of ``old``."""
  return jax.tree.map(
      lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old)


def zeros_rows(num: int, shared):
  """``[num, ...]`` float32 zeros shaped like every leaf of ``shared`` (arrays
  or ``jax.ShapeDtypeStruct``)."""
  return jax.tree.map(lambda s: jnp.zeros((num,) + tuple(s.shape), jnp.float32), shared)


# GradVac (Wang et al. 2021), in coefficient space.


def gradvac_coefficients(k: jax.Array, targets: jax.Array, orders: jax.Array):
  """GradVac's adjusted gradients ``g_i' = sum_j C_ij g_j`` from the Gram matrix.

  For each slot i, visiting the other slots j in ``orders[i]`` (i itself is
  skipped): ``rho = cos(g_i', g_j)``; if ``rho < phi = targets[i, j]``,
  ``g_i' += g_j ||g_i'|| (phi sqrt(1 - rho^2) - rho sqrt(1 - phi^2)) /
  (||g_j|| sqrt(1 - phi^2))`` (Wang et al. 2021, eq. 3; afterwards
  ``cos(g_i', g_j) = phi``). Worked in the cosine basis ``u_j = g_j / ||g_j||``
  (rows of any norms are equally well conditioned) and rescaled.

  Args:
    k: ``[K, K]`` Gram matrix; targets: ``[K, K]`` the target cosines
      ``phi`` of each ordered slot pair; orders: ``[K, K]`` int, row i a
      permutation of the slots.
  Returns:
    ``(C [K, K], rho [K, K])``: ``rho[i, j]`` the cosine met at the visit
    (``rho[i, i] = 1``), for the EMA of the targets.
  """
  n = k.shape[0]
  norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  live = norms > 0
  inv = jnp.where(live, 1.0 / jnp.where(live, norms, 1.0), 0.0)
  cos = k * inv[:, None] * inv[None, :]                 # cosines; 0 rows for zero gradients
  phi = jnp.clip(targets, -1.0, 1.0)

  def one_slot(i, order):
    def visit(carry, j):
      c, rho_row = carry
      size = jnp.sqrt(jnp.maximum(c @ cos @ c, 0.0))      # ||g_i'|| in the u basis
      rho = (c @ cos[:, j]) / (size + _EPS)
      p = phi[i, j]
      w = size * (p * jnp.sqrt(jnp.maximum(1.0 - rho * rho, 0.0))
                  - rho * jnp.sqrt(jnp.maximum(1.0 - p * p, 0.0))) / (
                      jnp.sqrt(jnp.maximum(1.0 - p * p, 0.0)) + _EPS)
      adjust = (j != i) & live[j] & live[i] & (rho < p)
      c = c.at[j].add(jnp.where(adjust, w, 0.0))
      rho_row = rho_row.at[j].set(jnp.where(j == i, 1.0, rho))
      return (c, rho_row), None
    init = (jax.nn.one_hot(i, n, dtype=k.dtype), jnp.zeros((n,), k.dtype))
    (c, rho_row), _ = jax.lax.scan(visit, init, order)
    return c, rho_row

  c_u, rho = jax.vmap(one_slot)(jnp.arange(n), orders)
  return norms[:, None] * c_u * inv[None, :], rho       # back to the g basis


def gradvac_targets(phi: jax.Array, rho: jax.Array, task_ids: jax.Array,
                    valid: jax.Array, beta: float) -> jax.Array:
  """``phi [T, T] <- (1 - beta) phi + beta rho`` on the sampled ordered task
  pairs (slot pairs ``i != j``, both ``valid [K]``; several slot pairs of one
  task pair, from sampling with replacement, contribute their mean cosine)."""
  num_tasks = phi.shape[0]
  n = task_ids.shape[0]
  both = (valid[:, None] & valid[None, :]).astype(phi.dtype)
  off = (1.0 - jnp.eye(n, dtype=phi.dtype)) * both
  pair = (task_ids[:, None], task_ids[None, :])
  total = jnp.zeros((num_tasks, num_tasks), phi.dtype).at[pair].add(
      (rho * off).astype(phi.dtype))
  count = jnp.zeros((num_tasks, num_tasks), phi.dtype).at[pair].add(off)
  mean = total / jnp.maximum(count, 1.0)
  return jnp.where(count > 0, (1.0 - beta) * phi + beta * mean, phi)


# GradDrop (Chen et al. 2020).


def graddrop_cotangent(dz, rng: jax.Array, *, leak: float = 0.0):
  """GradDrop's representation gradient from the per-slot ``dz`` (a pytree
  with ``[K, ...]`` leaves), Chen et al. 2020, Algorithm 1 per element (every
  coordinate of every leaf, batch included, has its own purity and draw; not
  LibMTL's batch-separated ``sum_b sign(Z) dZ`` form; one key per leaf, split
  from ``rng`` in leaf order):

  ``P = (1 + sum_k dz_k / sum_k |dz_k|) / 2`` per coordinate,
  ``U ~ Uniform(0, 1)``, ``M_k = [P > U][dz_k > 0] + [P < U][dz_k < 0]``,
  returns ``sum_k (leak + (1 - leak) M_k) dz_k`` (no slot axis).
  """
  leaves, treedef = jax.tree.flatten(dz)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for key, g in zip(keys, leaves):
    p = 0.5 * (1.0 + g.sum(0) / (jnp.abs(g).sum(0) + 1e-7))
    u = jax.random.uniform(key, p.shape, p.dtype)
    m = ((p > u)[None] & (g > 0)) | ((p < u)[None] & (g < 0))
    out.append(jnp.sum(g * (leak + (1.0 - leak) * m.astype(g.dtype)), axis=0))
  return jax.tree.unflatten(treedef, out)


# DB-MTL (Lin et al. 2023) and MoCo (Fernando et al. 2023): tracked gradients.


def decayed(rate: float, sigma: float, count: jax.Array) -> jax.Array:
  """``rate / count^sigma`` (``count >= 1``), the step-size schedules of
  DB-MTL's and MoCo's reference code."""
  return rate / jnp.maximum(count, 1.0) ** sigma


def track(buffer, rows, rate: jax.Array, active: jax.Array):
  """``buffer <- buffer - rate (buffer - rows)`` on the active rows (``rate [T]``)."""
  new = jax.tree.map(lambda b, g: b - rate.reshape((-1,) + (1,) * (b.ndim - 1)) * (b - g),
                     buffer, rows)
  return where_rows(active, new, buffer)


def db_mtl_weights(buffer, active: jax.Array) -> jax.Array:
  """``alpha_t = max_s ||m_s|| / (||m_t|| + 1e-8)`` over the active tasks
  (0 elsewhere): each tracked gradient scaled to the largest norm."""
  norms = row_norms(buffer)
  top = jnp.max(jnp.where(active, norms, 0.0))
  return jnp.where(active, top / (norms + _EPS), 0.0)


def moco_lambda(lam: jax.Array, ky: jax.Array, rate: jax.Array, active: jax.Array, *,
                rho: float, simplex: str) -> jax.Array:
  """MoCo's weights over the ``active [T]`` tasks (those with an estimate:
  sampled with weight > 0 at least once): ``lambda <- Pi(lambda - gamma_n
  (Y Y^T + rho I) lambda)``, ``Pi`` the Euclidean projection onto the simplex
  of the active tasks (the paper) or a softmax over them (LibMTL's code),
  ``ky = Y Y^T [T, T]``.

  A task never active has ``y_t = 0``, which would pull ``lambda`` onto it and
  shrink ``d = Y^T lambda``; it is left out: the step starts from ``lambda``
  restricted to the active tasks and renormalised to sum 1 (a newly active
  task enters with the value the caller gives it: MoCo's ``1 / T``), and its
  weight is 0.

  Returns ``[T]``: the new weights, 0 off the active tasks (all 0 if none is).
  """
  base = jnp.where(active, lam, 0.0)
  total = jnp.sum(base)
  uniform = active / jnp.maximum(jnp.sum(active), 1)
  base = jnp.where(total > 0, base / jnp.where(total > 0, total, 1.0), uniform)
  step = base - rate * ((ky + rho * jnp.eye(lam.shape[0], dtype=ky.dtype)) @ base)
  some = jnp.any(active)
  if simplex == "project":
    # Entries below every active one stay out of the projection's support, so
    # this is the projection onto the active tasks' simplex.
    low = jnp.where(some, jnp.min(jnp.where(active, step, jnp.inf)) - 1.0, 0.0)
    new = gradients.project_simplex(jnp.where(active, step, low))
  else:
    new = jax.nn.softmax(jnp.where(active | ~some, step, -jnp.inf))
  return jnp.where(active, new, 0.0)


# ExcessMTL (He et al. 2024).


def excess_risks(grad_sq_sum, rows) -> jax.Array:
  """``[N]``: ``g_n^T diag(1 / sqrt(S_n + 1e-7)) g_n``, the excess-risk
  estimate with the AdaGrad-style diagonal Hessian ``sqrt(S_n)``,
  ``S_n`` the running sum of squared gradients (already including ``g_n``)."""
  per_leaf = jax.tree.map(
      lambda s, g: jnp.sum((g * g / jnp.sqrt(s + 1e-7)).reshape(g.shape[0], -1), axis=1),
      grad_sq_sum, rows)
  return sum(jax.tree.leaves(per_leaf))


def excess_weights(weights: jax.Array, risk: jax.Array, initial: jax.Array,
                   active: jax.Array, step_size: float) -> jax.Array:
  """The exponentiated-gradient step ``w_t <- w_t exp(eta r_t / r_t^0)`` on the
  active tasks, then ``w <- T w / sum w`` (in logs: a softmax, so large
  ratios never overflow)."""
  ratio = risk / jnp.where(initial > 0, initial, 1.0)
  logits = jnp.log(weights) + jnp.where(active, step_size * ratio, 0.0)
  return weights.shape[0] * jax.nn.softmax(logits)


# The coordinate-wise trimmed mean (Yin et al. 2018; TorchJD's TrimmedMean).


def trimmed_mean_rows(rows, present: jax.Array, trim_number: int):
  """The coordinate-wise trimmed mean of the present rows of a pytree with
  leading axis K: per coordinate, the ``p`` present values (``present [K]``)
  ranked, the ``trim`` smallest and ``trim`` largest dropped, the other
  ``p - 2 trim`` averaged (Yin et al. 2018, Option II; TorchJD's
  ``TrimmedMean``). ``trim = trim_number`` when ``p >= 2 trim_number + 1``,
  else the most that leaves one value, ``(p - 1) // 2`` (the median of the
  present values; absent rows -- weight 0, no labelled example -- are left
  out, not counted as zeros).

  No sort: each value's rank among its coordinate's present values is the
  count of those below it (equal values: the lower row index ranks first),
  accumulated by a ``lax.scan`` over the K rows -- ``O(K^2)`` comparisons per
  coordinate, elementwise, which for a handful of task slots is several
  times faster on CPU than sorting along the slot axis.

  Returns ``(mean, share [K])``: the mean has no slot axis; ``share_k`` is the
  fraction of all coordinates' kept values that came from row k (each kept
  value weighs ``1 / (p - 2 trim)``), summing to 1 over the rows (0 when no
  row is present): the slot weights the step logs.
  """
  p = jnp.sum(present.astype(jnp.int32))
  trim = jnp.minimum(trim_number, jnp.maximum(p - 1, 0) // 2)
  kept = jnp.maximum(p - 2 * trim, 1)
  leaves, treedef = jax.tree.flatten(rows)
  n = leaves[0].shape[0]
  index = jnp.arange(n)
  out, counts, size = [], jnp.zeros((n,), jnp.float32), 0
  for a in leaves:
    flat = a.reshape(n, -1)

    def below(rank, row):          # row j's value below (or tied, j first) each value
      aj, pj, j = row
      lower = (aj[None] < flat) | ((aj[None] == flat) & (j < index)[:, None])
      return rank + (lower & pj).astype(jnp.int32), None
    rank, _ = jax.lax.scan(below, jnp.zeros(flat.shape, jnp.int32), (flat, present, index))
    keep = present[:, None] & (rank >= trim) & (rank < p - trim)
    out.append((jnp.sum(jnp.where(keep, flat, 0.0), axis=0) / kept.astype(a.dtype)
                ).reshape(a.shape[1:]))
    counts = counts + jnp.sum(keep, axis=1).astype(jnp.float32)
    size += flat.shape[1]
  share = counts / (kept.astype(jnp.float32) * size)
  return jax.tree.unflatten(treedef, out), share


# Family 4: methods that keep state across steps or transform the per-task
# gradients themselves (their arithmetic above).


def _slot_result(lin, inp, num_tasks, k, beta, shared, g_tasks, state, extra=None,
                 info=None, total=None) -> Result:
  """A gradient method's :class:`Result` with the Gram measurements of ``k``
  and per-slot weights ``beta``."""
  w = inp.weights[inp.task_ids]
  meas = gram.gram_measurements(k, beta, info or {}, inp.task_ids, num_tasks)
  return Result(jnp.sum(w * lin.losses) if total is None else total,
                {"shared": shared, "tasks": g_tasks}, state, {**meas, **(extra or {})})


def gradvac(num_tasks: int, *, beta: float = 0.01) -> Objective:
  """Gradient Vaccine (Wang et al. 2021): each slot's gradient is moved towards
  the target cosine ``phi`` with every other slot's (visited in a random order,
  :func:`mtljax.gradvac_coefficients`); ``d`` is the sum of the adjusted
  gradients; the targets ``phi [T, T]`` (state ``targets``, placed by task id,
  init 0) track the met cosines by an EMA with rate ``beta`` (the paper's 1e-2;
  LibMTL's default is 0.5). One target per task pair (the paper's whole-model
  granularity)."""
  check_hparam("gradvac", 0 < beta <= 1, f"beta must be in (0, 1], got {beta}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids = inp.task_ids
    g, g_tasks = lin.slot_grads(inp.weights[ids])
    k = gradients.gram(g)
    phi = inp.state["targets"][ids[:, None], ids[None, :]]
    c, rho = gradvac_coefficients(k, phi, gradients.pcgrad_orders(inp.rng, ids.shape[0]))
    coef = c.sum(axis=0)
    state = {"targets": gradvac_targets(inp.state["targets"], rho, ids,
                                                inp.weights[ids] > 0, beta)}
    return _slot_result(lin, inp, num_tasks, k, coef, gradients.combine(coef, g), g_tasks,
                        state)

  return Objective("gradvac", "slots", grads_fn,
                   init_state=lambda: {"targets": jnp.zeros((num_tasks, num_tasks), jnp.float32)},
                   hparams={"beta": beta})


def graddrop(num_tasks: int, *, leak: float = 0.0) -> Objective:
  """Gradient sign dropout (Chen et al. 2020) on the shared representation:
  the per-slot ``dZ`` are masked by sign purity per element of ``Z``, batch
  included (Algorithm 1 as written; not LibMTL's batch-separated form, whose
  purity is of ``sum_b sign(Z) dZ`` per feature;
  :func:`mtljax.graddrop_cotangent`, uniform draws from the step's
  key) and their sum is back-propagated once through the trunk; ``leak`` in
  [0, 1] (the paper's and LibMTL's 0) keeps that fraction of a dropped gradient.
  Needs shared inputs and an architecture with a task-independent part."""
  check_hparam("graddrop", 0 <= leak <= 1, f"leak must be in [0, 1], got {leak}")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    dz, g_tasks = lin.rep_grads(inp.weights[inp.task_ids])      # [K, ...]
    shared = lin.rep_pullback(graddrop_cotangent(dz, inp.rng, leak=leak))
    k = gradients.gram(dz)
    return _slot_result(lin, inp, num_tasks, k, jnp.ones_like(lin.losses), shared,
                        g_tasks, inp.state)

  return Objective("graddrop", "representation", grads_fn, hparams={"leak": leak})


def db_mtl(num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0) -> Objective:
  """Dual-balancing MTL (Lin et al. 2023; LibMTL's ``DB_MTL``): per-slot
  gradients of ``w_k log(L_k + 1e-8)``; each task's EMA
  ``m_t <- g_t + beta / n_t^beta_sigma (m_t - g_t)`` (``n_t`` the times task t
  was sampled; state ``grads [T, ...shared]``); ``d = sum_t alpha_t m_t`` over the
  sampled tasks with ``alpha_t = max_s ||m_s|| / ||m_t||``. Task parameters get
  the gradient of ``sum_k w_k log L_k``. Bind with :func:`bind_shared`."""
  check_hparam("db_mtl", 0 <= beta < 1 and beta_sigma >= 0,
         f"beta must be in [0, 1) and beta_sigma >= 0, got {beta}, {beta_sigma}")

  def init(shared):
    return {"grads": zeros_rows(num_tasks, shared),
            "count": jnp.zeros((num_tasks,), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    g, g_tasks = lin.slot_grads(w / (lin.losses + 1e-8))          # w_k grad log L_k
    rows, active = task_mean_rows(g, ids, num_tasks, w > 0)
    count = inp.state["count"] + active
    keep = decayed(beta, beta_sigma, count)
    buf = track(inp.state["grads"], rows, 1.0 - keep, active)
    alpha = db_mtl_weights(buf, active)
    total = jnp.sum(w * jnp.log(lin.losses + 1e-8))
    return _slot_result(lin, inp, num_tasks, gradients.gram(g), alpha[ids],
                        gradients.combine(alpha, buf), g_tasks,
                        {"grads": buf, "count": count}, total=total)

  return Objective("db_mtl", "slots", grads_fn, init_state=unbound_state("db_mtl"),
                   init_shared_state=init, hparams={"beta": beta, "beta_sigma": beta_sigma})


def moco(num_tasks: int, *, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
         gamma_sigma: float = 0.5, rho: float = 0.0, simplex: str = "project") -> Objective:
  """MoCo (Fernando et al. 2023; LibMTL's ``MoCo``, from the authors' code):
  rows ``g_k / ||g_k|| * w_k L_k``; tracked estimates
  ``y_t <- y_t - beta / n_t^beta_sigma (y_t - g_t)`` (state ``y [T, ...shared]``);
  ``lambda <- Pi(lambda - gamma / n^gamma_sigma (Y Y^T + rho I) lambda)`` with
  ``Pi`` the projection onto the simplex (``simplex="project"``, the paper) or
  a softmax (``"softmax"``, LibMTL); ``d = Y^T lambda`` over the tasks sampled
  with weight > 0 at least once (an unsampled task's estimate is its last; a
  task never active -- zero weight, never sampled or never labelled -- has no
  estimate and is left out of ``lambda`` (weight 0 in state ``lambda``;
  :func:`mtljax.moco_lambda`), so with weights ``[1, 1, 0]`` MoCo is
  the 2-task MoCo; a task first active later enters the step with ``1 / T``
  and the others' weights, renormalised). Bind with :func:`bind_shared`."""
  check_hparam("moco", beta > 0 and gamma > 0 and beta_sigma >= 0 and gamma_sigma >= 0 and rho >= 0,
         f"beta, gamma must be > 0 and beta_sigma, gamma_sigma, rho >= 0, got {beta}, "
         f"{gamma}, {beta_sigma}, {gamma_sigma}, {rho}")
  check_hparam("moco", simplex in ("project", "softmax"),
         f"simplex={simplex!r} is not one of ('project', 'softmax')")

  def init(shared):
    return {"y": zeros_rows(num_tasks, shared),
            "lambda": jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32),
            "count": jnp.zeros((num_tasks,), jnp.float32), "steps": jnp.zeros((), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w, st = inp.task_ids, inp.weights[inp.task_ids], inp.state
    g, g_tasks = lin.slot_grads(w)
    k = gradients.gram(g)
    norms = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
    rows, active = task_mean_rows(
        scale_rows(w * lin.losses / (norms + 1e-8), g), ids, num_tasks, w > 0)
    count, steps = st["count"] + active, st["steps"] + 1.0
    y = track(st["y"], rows, decayed(beta, beta_sigma, count), active)
    known = count > 0
    entering = known & (st["count"] == 0)        # joins with the initial 1 / T
    lam = moco_lambda(jnp.where(entering, 1.0 / num_tasks, st["lambda"]),
                              gradients.gram(y), decayed(gamma, gamma_sigma, steps),
                              known, rho=rho, simplex=simplex)
    state = {"y": y, "lambda": lam, "count": count, "steps": steps}
    return _slot_result(lin, inp, num_tasks, k, lam[ids], gradients.combine(lam, y),
                        g_tasks, state, {"objective_lambda_sum": lam})

  return Objective("moco", "slots", grads_fn, init_state=unbound_state("moco"),
                   init_shared_state=init,
                   hparams={"beta": beta, "beta_sigma": beta_sigma, "gamma": gamma,
                            "gamma_sigma": gamma_sigma, "rho": rho, "simplex": simplex})


def excess_mtl(num_tasks: int, *, step_size: float = 1e-2) -> Objective:
  """ExcessMTL (He et al. 2024, the authors' ``ExcessMTL.py``): per task the
  running sum of squared gradients ``S_t`` (state ``grad_sq_sum [T, ...shared]``),
  the excess-risk estimate ``r_t = g_t^T diag(1 / sqrt(S_t)) g_t``
  (:func:`mtljax.excess_risks`), relative to the task's first
  ``r_t^0``; the loss weights take the exponentiated-gradient step
  ``lambda_t <- lambda_t exp(step_size r_t / r_t^0)`` (sampled tasks, from
  the sampling after their first with ``r_t > 0`` -- a zero gradient gives no
  reference; then ``sum lambda = T``) and the objective is
  ``sum_k lambda_t w_k L_k`` with the updated weights. Bind with
  :func:`bind_shared`."""
  check_hparam("excess_mtl", step_size > 0, f"step_size must be > 0, got {step_size}")

  def init(shared):
    return {"grad_sq_sum": zeros_rows(num_tasks, shared),
            "initial_risk": jnp.zeros((num_tasks,), jnp.float32),
            "seen": jnp.zeros((num_tasks,), bool),
            "loss_weights": jnp.ones((num_tasks,), jnp.float32)}

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w, st = inp.task_ids, inp.weights[inp.task_ids], inp.state
    g, _ = lin.slot_grads(w)
    rows, active = task_mean_rows(g, ids, num_tasks, w > 0)
    sq = where_rows(active, jax.tree.map(lambda s, r: s + r * r, st["grad_sq_sum"],
                                                 rows), st["grad_sq_sum"])
    risk = excess_risks(sq, rows)
    first = active & (risk > 0) & ~st["seen"]      # a zero first risk is no reference
    initial = jnp.where(first, risk, st["initial_risk"])
    lam = excess_weights(st["loss_weights"], risk, initial, active & st["seen"],
                                 step_size)
    state = {"grad_sq_sum": sq, "initial_risk": initial, "seen": st["seen"] | first,
             "loss_weights": lam}
    coef = lam[ids]
    return _slot_result(lin, inp, num_tasks, gradients.gram(g), coef,
                        gradients.combine(coef, g), lin.pullback(w * coef)["tasks"], state,
                        {"objective_lambda_sum": lam},
                        total=jnp.sum(w * coef * lin.losses))

  return Objective("excess_mtl", "slots", grads_fn, init_state=unbound_state("excess_mtl"),
                   init_shared_state=init, hparams={"step_size": step_size})


def imtl(num_tasks: int, **hp) -> Objective:
  """IMTL (Liu et al. 2021) in full: IMTL-L's learned scales ``s`` (a per-task
  parameter at ``tasks/imtl/log_scale``, init 0) turn each loss into
  ``e^s L - s`` (the scales' gradient ``e^s w L - w``); IMTL-G's weights
  (:func:`mtljax.gradients.imtl_g_weights`; ``hp`` are its hyper-parameters,
  defaults included) combine the per-slot gradients of the scaled losses
  ``w_k e^{s_t} grad L_k``; task parameters get the gradient of
  ``sum_k w_k e^{s_t} L_k``."""
  imtl_g = gradients.REGISTRY["imtl_g"]
  hp = {**imtl_g.hparams, **hp}
  weights = imtl_g.bind(**hp)

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w = inp.task_ids, inp.weights[inp.task_ids]
    s = inp.params["log_scale"]
    scale = jnp.exp(s[ids])
    g, g_tasks = lin.slot_grads(w * scale)
    k = gradients.gram(g)
    alpha, info = weights(k, inp.rng, gradients.cosine_factor(g))
    g_s = jax.ops.segment_sum(w * (scale * lin.losses - 1.0), ids, num_tasks)
    return _slot_result(lin, inp, num_tasks, k, alpha, gradients.combine(alpha, g),
                        {**g_tasks, "imtl": {"log_scale": g_s}}, inp.state,
                        {"objective_lambda_sum": jnp.exp(s)}, info=info,
                        total=jnp.sum(w * (scale * lin.losses - s[ids])))

  return Objective("imtl", "slots", grads_fn,
                   init_params=lambda: {"log_scale": jnp.zeros((num_tasks,), jnp.float32)},
                   hparams=dict(hp))


def trimmed_mean(num_tasks: int, *, trim_number: int = 1) -> Objective:
  """The coordinate-wise trimmed mean (Yin et al. 2018; TorchJD's
  ``TrimmedMean``) of the per-slot gradients ``w_k grad L_k``: per
  coordinate of every shared leaf, the ``trim_number`` largest and smallest
  values dropped and the rest averaged (a mean, TorchJD's scale;
  :func:`trimmed_mean_rows`). Not a function of the Gram matrix, so it reads
  the rows (``needs="slots"``, the Jacobian path only). Needs
  ``2 trim_number + 1`` slots per step (TorchJD's check); a step with fewer
  *present* slots (weight 0: no labelled example) trims fewer, down to the
  median of the present ones. TorchJD has no default ``trim_number``: 1 here
  (its tests' value). Logged slot weights: each slot's share of the kept
  values."""
  if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
    raise ValueError(f"trimmed_mean: trim_number must be an integer >= 0, got "
                     f"{trim_number!r}.")

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    w = inp.weights[inp.task_ids]
    g, g_tasks = lin.slot_grads(w)
    shared, share = trimmed_mean_rows(g, w > 0, trim_number)
    return _slot_result(lin, inp, num_tasks, gradients.gram(g), share, shared, g_tasks,
                        inp.state)

  return Objective("trimmed_mean", "slots", grads_fn, hparams={"trim_number": trim_number},
                   min_slots=2 * trim_number + 1)


def cr_mogm(num_tasks: int, *, alpha: float = 0.9, iters: int = 300, tol: float = 1e-5,
            exact_up_to: int = 10) -> Objective:
  """CR-MOGM (Zhou et al. 2022) on MGDA, in TorchJD's form
  (``CRMOGMWeighting(MGDAWeighting())``): MGDA's weights ``lambda_hat`` of the
  step (on the present slots, :func:`mtljax.objectives.without_absent_slots`;
  ``iters``, ``tol``, ``exact_up_to`` are MGDA's) smoothed across steps,
  ``lambda_t <- alpha lambda_t + (1 - alpha) lambda_hat_t`` (state
  ``lambda [T]``, placed by task id), a task's first step starting from its
  ``lambda_hat`` (TorchJD's ``lambda_0 = lambda_hat_1``: the first step is
  MGDA's); ``d = sum_k lambda_{t_k} g_k``. Only the tasks with a present slot
  move (their ``lambda_hat`` is their slots' summed MGDA weight; duplicate
  slots split their task's weight equally); the others keep theirs. With
  every task in every step (the paper's and TorchJD's setting) the weights
  stay on the simplex; with task sampling a step's weights need not sum to 1.
  ``alpha`` in [0, 1] (TorchJD's default 0.9 and check; 0 is MGDA, 1 keeps
  the first weights)."""
  check_hparam("cr_mogm", 0 <= alpha <= 1, f"alpha must be in [0, 1], got {alpha}")
  mgda_hp = {"iters": iters, "tol": tol, "exact_up_to": exact_up_to}
  weights = gram.without_absent_slots(gradients.REGISTRY["mgda"].bind(**mgda_hp))

  def grads_fn(lin: jacobians.Linearized, inp: Inputs) -> Result:
    ids, w, st = inp.task_ids, inp.weights[inp.task_ids], inp.state
    present = w > 0
    g, g_tasks = lin.slot_grads(w)
    k = gradients.gram(g)
    lam_hat, info = weights(k, inp.rng, present)                    # [K], 0 off present
    hat = jax.ops.segment_sum(lam_hat, ids, num_tasks)
    count = jax.ops.segment_sum(present.astype(jnp.float32), ids, num_tasks)
    active = count > 0
    prev = jnp.where(st["seen"], st["lambda"], hat)
    lam = jnp.where(active, alpha * prev + (1.0 - alpha) * hat, st["lambda"])
    beta = jnp.where(present, lam[ids] / jnp.maximum(count[ids], 1.0), 0.0)
    state = {"lambda": lam, "seen": st["seen"] | active}
    return _slot_result(lin, inp, num_tasks, k, beta, gradients.combine(beta, g), g_tasks,
                        state, {"objective_lambda_sum": lam}, info=info)

  return Objective("cr_mogm", "slots", grads_fn,
                   init_state=lambda: {"lambda": jnp.zeros((num_tasks,), jnp.float32),
                                       "seen": jnp.zeros((num_tasks,), bool)},
                   hparams={"alpha": alpha, **mgda_hp})
