"""Krum and Multi-Krum (Blanchard et al. 2017; TorchJD's ``Krum``): a Byzantine-
robust choice among the rows, from their pairwise distances, which the Gram
matrix (or the rows' cosine factor) alone gives."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtljax.gradients import algebra


def _check_int(name: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")


def krum_min_rows(*, n_byzantine: int = 0, n_selected: int = 1) -> int:
  """The fewest rows Krum takes: ``n_byzantine + 3`` (at least one neighbour
  besides the row itself is scored, ``n - f - 2 >= 1``) and ``n_selected``
  (TorchJD's ``KrumWeighting`` checks both)."""
  _check_int("krum.n_byzantine", n_byzantine, 0)
  _check_int("krum.n_selected", n_selected, 1)
  return max(n_byzantine + 3, n_selected)


def pairwise_sq_distances(k: jax.Array, factor: jax.Array | None = None) -> jax.Array:
  """``D [T, T]``, ``D_ij = ||g_i - g_j||^2``, from ``K`` (and the rows' cosine
  factor, when given).

  Written ``(n_i - n_j)^2 + n_i n_j ||u_i - u_j||^2`` (``u`` the unit rows,
  ``n`` the norms): the norm difference is exact in floats, and the unit rows'
  distance comes from the factor's columns (``C = R^T R``, so
  ``||u_i - u_j|| = ||R e_i - R e_j||``) to relative accuracy, or else as
  ``2 (1 - C_ij)``, absolute accuracy ``eps``; then symmetrised, so that two
  rows each other's nearest score exactly alike. The plain form
  ``K_ii + K_jj - 2 K_ij`` loses every digit of the distance of two nearly
  equal rows (and of a row to one 100x its norm, ``eps`` of ``10^4``)."""
  c, n = algebra.cosine_gram(k)
  if factor is None:
    unit = 2.0 * jnp.maximum(1.0 - c, 0.0)
  else:
    r = factor.astype(k.dtype)
    diff = r[:, :, None] - r[:, None, :]                     # [M, T, T]
    unit = jnp.sum(diff * diff, axis=0)
  d = (n[:, None] - n[None, :]) ** 2 + n[:, None] * n[None, :] * unit
  d = 0.5 * (d + d.T)          # exactly symmetric: a tie in exact arithmetic stays one
  return jnp.where(jnp.eye(k.shape[0], dtype=bool), 0.0, jnp.maximum(d, 0.0))


def krum_weights(k: jax.Array, factor: jax.Array | None = None,
                 present: jax.Array | None = None, *, n_byzantine: int = 0,
                 n_selected: int = 1):
  """Krum and Multi-Krum (Blanchard et al. 2017, Definition 1 and sec. 5):
  row ``i``'s score is ``s_i = sum_{i -> j} ||g_i - g_j||^2`` over its
  ``T - f - 2`` nearest other rows (``f = n_byzantine``; a duplicate of
  ``g_i`` is a neighbour at distance 0); the ``m = n_selected`` rows of
  lowest score are averaged, ``beta = 1/m`` on them (ties go to the lower
  index). ``m = 1`` is Krum: the one row of lowest score.

  The paper's squared distances (TorchJD sums the distances themselves, not
  squared; BUILD_NOTES.md). TorchJD has no default ``n_byzantine``: here 0 --
  no task is an adversary in multi-task learning -- which scores each row by
  its ``T - 2`` nearest others. Needs ``T >= f + 3`` and ``T >= m``
  (TorchJD's checks; the paper's guarantee asks for ``T > 2f + 2``, which this
  does not enforce).

  Absent rows (``present``; the train step's slots of weight 0 or with no
  labelled example, whose rows are zero): Krum runs on the ``p`` present rows
  alone -- an absent row is neither scored nor anyone's neighbour, and gets
  weight 0. When fewer rows are present than the bounds ask, ``f`` and ``m``
  shrink for that step as the trimmed mean's trim does: ``f_p = min(f,
  max(p - 3, 0))`` (each row scored by ``max(p - f_p - 2, 0)`` neighbours)
  and ``m_p = min(m, p)``; no present row, ``beta = 0``.

  Args:
    k: ``[T, T]`` Gram matrix; factor: ``None`` or :func:`cosine_factor` of
      the rows (the train step's Jacobian path), which resolves the distances
      of nearly equal rows (:func:`pairwise_sq_distances`).
    present: ``None`` (every row) or ``[T]`` bool, the rows taking part.
    n_byzantine: ``f``, the rows that may be adversarial (>= 0).
    n_selected: ``m``, the rows averaged (>= 1; Multi-Krum for m > 1).
  Returns:
    ``beta [T]`` (``1/m`` on the selected rows), ``info`` with the ``scores [T]``
    (``+inf`` for an absent row).
  """
  t = k.shape[0]
  need = krum_min_rows(n_byzantine=n_byzantine, n_selected=n_selected)
  algebra.check_factor(factor, t, "krum")
  if t < need:
    raise ValueError(f"krum needs at least {need} rows (n_byzantine + 3 = {n_byzantine + 3} "
                     f"and n_selected = {n_selected}), got {t}.")
  if present is not None and jnp.shape(present) != (t,):
    raise ValueError(f"krum: present must have shape ({t},), got {jnp.shape(present)}.")
  d = pairwise_sq_distances(k, factor)
  eye = jnp.eye(t, dtype=bool)
  if present is None:
    d = jnp.where(eye, jnp.inf, d)                          # a row is not its own neighbour
    scores = jnp.sum(jnp.sort(d, axis=1)[:, :t - n_byzantine - 2], axis=1)
    chosen = jnp.argsort(scores, stable=True)[:n_selected]
    beta = jnp.zeros((t,), k.dtype).at[chosen].set(1.0 / n_selected)
    return beta, {"scores": scores}
  present = jnp.asarray(present, bool)
  p = jnp.sum(present.astype(jnp.int32))
  f_p = jnp.minimum(n_byzantine, jnp.maximum(p - 3, 0))
  q = jnp.maximum(p - f_p - 2, 0)                           # neighbours scored
  d = jnp.where(eye | ~present[None, :], jnp.inf, d)        # absent: no one's neighbour
  nearest = jnp.sort(d, axis=1)
  scores = jnp.sum(jnp.where(jnp.arange(t)[None, :] < q, nearest, 0.0), axis=1)
  scores = jnp.where(present, scores, jnp.inf)              # absent: never a candidate
  m_p = jnp.minimum(n_selected, p)
  order = jnp.argsort(scores, stable=True)
  share = jnp.where(jnp.arange(t) < m_p, 1.0 / jnp.maximum(m_p, 1), 0.0).astype(k.dtype)
  beta = jnp.zeros((t,), k.dtype).at[order].set(share)
  return beta, {"scores": scores}
