"""The arithmetic of the objectives that keep state across steps or transform
the per-task gradients themselves (GradVac, GradDrop, DB-MTL, STCH, GLS,
ExcessMTL, MoCo): pure, jittable functions of arrays, with no knowledge of the
train step. :mod:`mtljax.objectives` turns each into an ``Objective``.

Conventions: ``K`` slots (sampled tasks, ``task_ids [K]``), ``T`` tasks. Slot
gradients are ``[K, ...]`` pytrees (row k is ``w_k grad L_k``); per-task state
is ``[T, ...]``, placed by task id, and only the sampled tasks' rows move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax import gradients

_EPS = 1e-8  # the reference implementations' guard in norms and ratios


# ----------------------------------------------------------------------------
# Helpers over [K, ...] / [T, ...] pytrees.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# GradVac (Wang et al. 2021), in coefficient space.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# GradDrop (Chen et al. 2020).
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# DB-MTL (Lin et al. 2023) and MoCo (Fernando et al. 2023): tracked gradients.
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# ExcessMTL (He et al. 2024).
# ----------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------
# Scalarisations of the losses: STCH (Lin et al. 2024) and GLS (Chennupati 2019).
# ----------------------------------------------------------------------------


def stch_terms(losses: jax.Array, nadir: jax.Array, weights: jax.Array) -> jax.Array:
  """``w_k log(L_k / z_k)``, ``-inf`` for a slot of weight 0 (it does not compete)."""
  live = weights > 0
  return jnp.where(live, weights * jnp.log(jnp.where(live, losses, nadir) / nadir + 1e-20),
                   -jnp.inf)


def stch_softmax(x: jax.Array, mu: float) -> jax.Array:
  """``softmax(x / mu)`` over the finite terms of :func:`stch_terms` (0 for a
  slot of weight 0; all 0 when every slot has weight 0)."""
  live = jnp.isfinite(x)
  p = jax.nn.softmax(jnp.where(jnp.any(live), x, 0.0) / mu)
  return jnp.where(live, p, 0.0)


def live_count(weights: jax.Array) -> jax.Array:
  """The number of slots of weight > 0 (at least 1): the ``K`` of GLS's and
  STCH's normalisations, so that a slot of weight 0 (unlabelled, or a task
  not trained) changes neither."""
  return jnp.maximum(jnp.sum(weights > 0), 1).astype(weights.dtype)


def stch_value(losses: jax.Array, nadir: jax.Array, weights: jax.Array, *,
               mu: float) -> jax.Array:
  """``K (mu logsumexp_k(w_k log(L_k / z_k) / mu) + c)`` over the ``K`` slots
  of weight > 0 (0 when there is none), ``c = stop_gradient(max_k w_k
  log(L_k / z_k))``: the authors' MTL code's value (log losses, nadir ``z``
  from the warm-up; ``K`` their ``task_num``) plus ``K c``, their max-shift
  added back, so the value is the smooth Tchebycheff function itself
  (``-> K max_k`` as ``mu -> 0``); the gradient is theirs exactly."""
  x = stch_terms(losses, nadir, weights)
  live = weights > 0
  any_live = jnp.any(live)
  top = jax.lax.stop_gradient(jnp.where(any_live, jnp.max(x), 0.0))
  s = jnp.sum(jnp.where(live, jnp.exp((jnp.where(live, x, top) - top) / mu), 0.0))
  value = mu * jnp.log(jnp.where(any_live, s, 1.0)) + top
  return jnp.where(any_live, live_count(weights) * value, 0.0)


def gls_value(losses: jax.Array, weights: jax.Array) -> jax.Array:
  """``prod_k L_k^(w_k / K)`` over the ``K`` slots of weight > 0 (the
  geometric mean of their losses for unit weights; 1 if there is none), in
  logs."""
  logs = jnp.log(jnp.where(weights > 0, losses, 1.0))
  return jnp.exp(jnp.sum(weights * logs) / live_count(weights))
