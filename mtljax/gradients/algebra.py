"""Gram and cosine algebra of a set of gradient rows.

The rows are any objectives' gradients: ``G [T, D]`` or a pytree whose leaves
have a leading row axis (tasks, task slots, or single examples). ``K = G G^T``
is summed over leaves without materialising the concatenated Jacobian;
:func:`cosine_gram` and :func:`cosine_factor` give the scale-free forms the
solvers work on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Gram matrices and directions for matrices or pytrees of task gradients.


def gram(grads) -> jax.Array:
  """``K = G G^T`` ``[T, T]`` for ``G [T, D]`` or a pytree with task axis 0; in
  float32, or float64 when the gradients are (``jax_enable_x64``)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("gram: no gradients.")
  t = leaves[0].shape[0]
  # float32 at least; float64 for float64 gradients (under jax_enable_x64).
  dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
  k = jnp.zeros((t, t), dtype)
  for leaf in leaves:
    if leaf.shape[0] != t:
      raise ValueError(f"gram: leaves disagree on the task axis ({leaf.shape[0]} vs {t}).")
    flat = leaf.reshape(t, -1).astype(dtype)
    k = k + flat @ flat.T
  return k


def combine(beta: jax.Array, grads):
  """``sum_j beta_j g_j`` for a matrix or pytree of task gradients."""
  return jax.tree.map(lambda g: jnp.tensordot(beta.astype(g.dtype), g, axes=1), grads)


def cosine_gram(k: jax.Array):
  """``(C, n)`` with ``K = diag(n) C diag(n)``: ``n [T]`` the gradients' norms
  and ``C [T, T]`` their cosines, unit diagonal (a zero gradient gets ``C_ii = 1``
  and zeros off the diagonal). The methods below solve their small systems on
  ``C`` and rescale: its entries are of order one whatever the norms, so rows
  whose norms differ by 100x cost no float32 precision."""
  n = jnp.sqrt(jnp.maximum(jnp.diag(k), 0.0))
  pos = n > jnp.finfo(k.dtype).tiny ** 0.5
  inv = jnp.where(pos, 1.0 / jnp.where(pos, n, 1.0), 0.0)
  eye = jnp.eye(k.shape[0], dtype=bool)
  return jnp.where(eye, 1.0, k * inv[:, None] * inv[None, :]), n


def rounding_level(a: jax.Array, x: jax.Array) -> jax.Array:
  """``16 eps (|A| |x|)``: the float rounding level of ``A x``, per entry."""
  return 16.0 * jnp.finfo(a.dtype).eps * (jnp.abs(a) @ jnp.abs(x))


def cosine_factor(grads) -> jax.Array:
  """``R [T, T]`` with ``C = R^T R`` for the cosine matrix ``C`` of the rows
  (:func:`cosine_gram`, a zero row's ``C_ii = 1`` included): the triangular
  factor of a Householder QR of the unit rows, ``U^T = Q R`` (``[D, T]``, zero
  rows padded in when ``D < T``).

  The spectral methods (IMTL-G, ConFIG, Aligned-MTL) take it as ``factor`` on
  the Jacobian path, where the rows are held: the eigenpairs of ``C`` then come
  from ``R``'s one-sided Jacobi rotations (:func:`jacobi_factor_eigh`), whose
  condition is ``cond(R) = sqrt(cond(C))``. Forming ``C`` (or ``K``) first
  squares it: float32 loses every eigenvalue of ``C`` below ~``1e-7``, e.g. the
  difference of two nearly opposite or nearly collinear gradients, which the
  factor keeps down to ~``1e-14``. Costs one QR of ``[D, T]`` (as the Gram,
  ``O(D T^2)``) and a copy of the rows.

  ``grads``: ``[T, D]`` or a pytree with task axis 0; float32 at least,
  float64 for float64 rows (as :func:`gram`)."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError("cosine_factor: no gradients.")
  t = leaves[0].shape[0]
  dtype = jnp.result_type(jnp.float32, *(leaf.dtype for leaf in leaves))
  flat = jnp.concatenate([leaf.reshape(t, -1).astype(dtype) for leaf in leaves], axis=1)
  if flat.shape[1] < t:
    flat = jnp.pad(flat, ((0, 0), (0, t - flat.shape[1])))
  n = jnp.linalg.norm(flat, axis=1)
  pos = n > jnp.finfo(dtype).tiny ** 0.5
  u = flat * jnp.where(pos, 1.0 / jnp.where(pos, n, 1.0), 0.0)[:, None]
  r = jnp.linalg.qr(u.T, mode="r")                     # [T, T]; zero rows: zero columns
  # A zero row's C_ii = 1 (as cosine_gram): the rows of diag(1 - pos) below R.
  return jnp.concatenate([r, jnp.diag((~pos).astype(dtype))], axis=0)


def check_factor(factor, t: int, name: str):
  if factor is not None and (factor.ndim != 2 or factor.shape[1] != t):
    raise ValueError(f"{name}: factor must be [M, {t}] (cosine_factor of the rows), "
                     f"got shape {factor.shape}.")


# Methods: weights from the Gram matrix.


def support_masks(t: int, empty: bool = False) -> np.ndarray:
  """``[2^T - 1, T]`` bool: every non-empty subset of the tasks (``empty``:
  the empty one too, first: ``[2^T, T]``)."""
  m = np.arange(0 if empty else 1, 2 ** t)[:, None]
  return ((m >> np.arange(t)[None, :]) & 1).astype(bool)
