"""Every Gram-based method in float32 on hard Jacobians (tests/hard_jacobians.py:
Gaussian rows, near-opposite pairs, one row 100x the others, both, nearly
collinear rows; T in {2, 3, 5, 8}, P in {10, 50}) against float64 numpy
references written from each paper, and each method's optimality condition.

The library reads the float32 Gram matrix ``G32 G32^T`` (as the train step
does); the directions it returns are compared with the float64 references by
cosine, ``d = beta G`` in float64.

Run as a script for the summary table of BUILD_NOTES (worst cosine, wrong
results, non-descent MGDA directions, false ``converged``), optionally on
another version of mtljax/gradients.py:
``.venv/bin/python tests/test_hard_jacobians.py [path/to/gradients.py|-] [n per cell]``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hard_jacobians  # noqa: E402
import test_gradients  # noqa: E402  (CAGrad's exact float64 dual)

from mtljax import gradients  # noqa: E402

COS_MIN = 0.999
N_PER_CELL = 4


# ---------------------------------------------------------------------------
# float64 references, from the papers' definitions (on G, not on the Gram).
# ---------------------------------------------------------------------------


def ref_mgda(g):
  """Min-norm point of the convex hull of the rows (Sener & Koltun 2018): the
  KKT system on every support, least squares (singular supports allowed)."""
  return test_gradients._np_min_norm(g) @ g  # pylint: disable=protected-access


def ref_dual_cone(g, u, reg_eps=1e-4):
  """``w G`` for ``w = argmin_{v >= u} v^T (K / tr K + reg I) v`` (Quinton & Rey
  2024, Prop. 1; TorchJD's normalisation), as the NNLS problem
  ``min_{p >= 0} ||A (u + p)||``, ``A = [G^T / sqrt(tr K); sqrt(reg) I]``."""
  t = len(g)
  a = np.concatenate([g.T / np.linalg.norm(g), np.sqrt(reg_eps) * np.eye(t)])
  p, _ = optimize.nnls(a, -a @ u, maxiter=50 * t)
  return (u + p) @ g


def ref_upgrad(g, reg_eps=1e-4):
  t = len(g)
  return sum(ref_dual_cone(g, np.eye(t)[i] / t, reg_eps) for i in range(t))


def ref_dualproj(g, reg_eps=1e-4):
  return ref_dual_cone(g, np.full(len(g), 1.0 / len(g)), reg_eps)


def ref_config(g):
  """ConFIG (Liu et al. 2024, Eq. 2 with the code's ProjectionLength)."""
  units = g / np.linalg.norm(g, axis=1, keepdims=True)
  best = np.linalg.pinv(units) @ np.ones(len(g))
  unit = best / np.linalg.norm(best)
  return np.sum(g @ unit) * unit


def ref_imtl_g(g):
  """IMTL-G (Liu et al. 2021), the paper's closed form."""
  u = g / np.linalg.norm(g, axis=1, keepdims=True)
  dd, uu = g[0] - g[1:], u[0] - u[1:]
  alpha = g[0] @ uu.T @ np.linalg.inv(dd @ uu.T)
  return np.concatenate([[1 - alpha.sum()], alpha]) @ g


def ref_alpha_fair(g, alpha):
  """``w > 0`` with ``(K w)_i = w_i^{-1/alpha}``, by scipy's least_squares as the
  FairGrad code does (tight tolerances); None when its residual is not ~0
  (no solution: a Pareto-stationary point)."""
  k = g @ g.T
  s = np.trace(k) / len(g)
  kn = k / s
  res = optimize.least_squares(lambda x: kn @ x - x ** (-1.0 / alpha),
                               np.ones(len(g)) / len(g), bounds=(0, np.inf),
                               xtol=1e-15, ftol=1e-15, gtol=1e-15, max_nfev=10_000)
  w = res.x * s ** (-alpha / (alpha + 1.0))
  if np.max(np.abs((k @ w) * w ** (1.0 / alpha) - 1.0)) > 1e-6:
    return None
  return w @ g


def _scaled(d, s):
  return None if d is None else s * d


def ref_aligned(g):
  """Aligned-MTL (Senushkin et al. 2023): ``d = 1^T B G``,
  ``B = sigma_min V L^{-1/2} V^T`` over the numerically non-null eigenpairs."""
  lam, v = np.linalg.eigh(g @ g.T)
  keep = lam > lam.max() * len(g) * np.finfo(np.float64).eps
  lam, v = lam[keep], v[:, keep]
  return (np.sqrt(lam.min()) * (v / np.sqrt(lam)) @ v.T).sum(0) @ g


def ref_cagrad(g, c=0.5):
  """CAGrad (Liu et al. 2021): ``d = (g0 + c ||g0|| g_w / ||g_w||) / (1 + c^2)``
  with ``w`` the dual's exact minimiser over the simplex (the face enumeration
  of test_gradients, certified by its Frank-Wolfe gap)."""
  w, _ = test_gradients._cagrad_dual_exact(g, c)
  return test_gradients._cagrad_direction(g, w, c) / (1 + c * c)


# name -> library call on the float32 rows ``g [T, P]`` (through their Gram
# ``K``, as the train step's ``accumulate`` path, or, for the ``*_rows``
# variants, with the rows' triangular factor, as its default Jacobian path).
def _lib(mod):
  """``{name: fn(k, r)}``: the library's weights from the float32 Gram ``k``
  and, for the ``*_rows`` variants, the rows' factor ``r``
  (:func:`_prepare`)."""
  def rows(fn, **hp):
    return lambda k, r: fn(k, r, **hp)
  return {
      "mgda": lambda k, r: mod.mgda_weights(k),
      "mgda_active_set": lambda k, r: mod.mgda_weights(k, exact_up_to=0),
      "upgrad": lambda k, r: mod.upgrad_weights(k),
      "dualproj": lambda k, r: mod.dualproj_weights(k),
      "upgrad_exact": lambda k, r: mod.upgrad_weights(k, reg_eps=0.0),
      "dualproj_exact": lambda k, r: mod.dualproj_weights(k, reg_eps=0.0),
      "config": lambda k, r: mod.config_weights(k),
      "imtl_g": lambda k, r: mod.imtl_g_weights(k),
      "nash_mtl": lambda k, r: mod.nash_mtl_weights(k),
      "fairgrad": lambda k, r: mod.fairgrad_weights(k),
      "aligned_mtl": lambda k, r: mod.aligned_mtl_weights(k),
      "cagrad": lambda k, r: mod.cagrad_weights(k),
      "cagrad_fista": lambda k, r: mod.cagrad_weights(k, exact_up_to=0),
      "config_rows": rows(getattr(mod, "config_weights", None)),
      "imtl_g_rows": rows(getattr(mod, "imtl_g_weights", None)),
      "aligned_mtl_rows": rows(getattr(mod, "aligned_mtl_weights", None)),
  }


@functools.lru_cache(maxsize=None)
def _prepare(mod):
  """``g [N, T, P] -> (K [N, T, T], R [N, T, T])``: the library's Gram of the
  rows (what the train step hands a method) and their :func:`cosine_factor`
  (zeros where ``mod`` has none). One compilation per shape, shared by every
  method, so a method compiles once per T, not per (T, P)."""
  def one(g):
    factor = (mod.cosine_factor(g) if hasattr(mod, "cosine_factor")
              else jnp.zeros((g.shape[0],) * 2, jnp.float32))
    return mod.gram(g), factor
  return jax.jit(jax.vmap(one))


def _apply(fn, mod, g):
  """``fn(k, r)`` vmapped over the Jacobians ``g [N, T, P]``."""
  k, r = _prepare(mod)(g)
  return fn(k, r)


REFERENCES = {
    "mgda": ref_mgda, "mgda_active_set": ref_mgda,
    "upgrad": ref_upgrad, "dualproj": ref_dualproj,
    "upgrad_exact": functools.partial(ref_upgrad, reg_eps=0.0),
    "dualproj_exact": functools.partial(ref_dualproj, reg_eps=0.0),
    "config": ref_config, "imtl_g": ref_imtl_g,
    "nash_mtl": functools.partial(ref_alpha_fair, alpha=1.0),
    "fairgrad": lambda g: _scaled(ref_alpha_fair(g, 2.0), len(g)),  # the code's n_tasks
    "aligned_mtl": ref_aligned, "cagrad": ref_cagrad, "cagrad_fista": ref_cagrad,
    "config_rows": ref_config, "imtl_g_rows": ref_imtl_g, "aligned_mtl_rows": ref_aligned,
}
ROWS_VARIANTS = ("config_rows", "imtl_g_rows", "aligned_mtl_rows")


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-300))


@functools.lru_cache(maxsize=None)
def _jacobians_by_t():
  """``{(T, P): [(label, g [T, P])]}`` of the generator's cells."""
  out = {}
  for (kind, t, p), batch in hard_jacobians.hard_jacobians(N_PER_CELL).items():
    for g in batch:
      out.setdefault((t, p), []).append(((kind, t, p), g))
  return out


@functools.lru_cache(maxsize=None)
def run_method(name, mod=gradients):
  """``[(label, g, beta float64, info)]`` for every hard Jacobian: the library
  on the float32 rows (their Gram, or the Gram and the rows' factor), vmapped
  over the Jacobians of one shape (one compilation per T)."""
  fn = jax.jit(jax.vmap(_lib(mod)[name]))
  rows = []
  for items in _jacobians_by_t().values():
    # Cast in numpy: jnp.asarray(float64, float32) compiles a convert per shape.
    g32 = jnp.asarray(np.stack([g for _, g in items]).astype(np.float32))
    beta, info = jax.tree.map(np.asarray, _apply(fn, mod, g32))
    for i, (label, g) in enumerate(items):
      rows.append((label, g, beta[i].astype(np.float64), jax.tree.map(lambda x: x[i], info)))
  return rows


def _available(mod, name):
  if name in ROWS_VARIANTS and not hasattr(mod, "cosine_factor"):
    return False
  base = name[:-len("_rows")] if name in ROWS_VARIANTS else name
  return hasattr(mod, {"mgda_active_set": "mgda", "upgrad_exact": "upgrad",
                       "dualproj_exact": "dualproj", "cagrad_fista": "cagrad"}.get(base, base) + "_weights")


@functools.lru_cache(maxsize=None)
def _reference(name, shape):
  return [REFERENCES[name](g) for _, g in _jacobians_by_t()[shape]]


def summarise(name, mod=gradients):
  """Worst cosine, number below COS_MIN, false ``converged`` (converged but below
  COS_MIN, or for MGDA not a common descent direction), for MGDA the number
  of non-descent directions, and (``norm_wrong``, ``norm_false_converged``)
  the same for the norm of ``d`` off the reference's by more than 1 %;
  ``kinds``: the kinds of the Jacobians below COS_MIN or flagged."""
  rows = run_method(name, mod)
  refs = [r for shape in _jacobians_by_t() for r in _reference(name, shape)]
  cosines, wrong, false_conv, non_descent, skipped, flagged = [], 0, 0, 0, 0, 0
  norm_wrong, norm_false, kinds = 0, 0, set()
  for (label, g, beta, info), d_ref in zip(rows, refs):
    d = beta @ g
    conv = bool(info.get("converged", True))
    flagged += not conv
    norms = np.linalg.norm(g, axis=1)
    bad_descent = False
    if name.startswith("mgda") or name.endswith("_exact"):
      bad_descent = bool(np.any(g @ d < -1e-5 * norms * norms.max()))
      non_descent += bad_descent
    if d_ref is None or np.linalg.norm(d_ref) < 1e-6 * norms.max():
      skipped += 1  # no solution / zero direction: only flags and descent count
      false_conv += conv and d_ref is None and name in ("nash_mtl", "fairgrad")
      continue
    cos = _cos(d, d_ref)
    cosines.append(cos)
    wrong += cos < COS_MIN
    false_conv += conv and (cos < COS_MIN or bad_descent)
    off = abs(np.linalg.norm(d) / np.linalg.norm(d_ref) - 1.0) > 1e-2
    norm_wrong += off
    norm_false += conv and off
    if cos < COS_MIN or off or not conv:
      kinds.add(label[0])
  return {"worst_cos": min(cosines), "wrong": wrong, "false_converged": false_conv,
          "non_descent": non_descent, "not_converged": flagged, "n": len(rows),
          "no_reference": skipped, "norm_wrong": norm_wrong,
          "norm_false_converged": norm_false, "kinds": sorted(kinds)}


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------

ACCURATE = ["mgda", "mgda_active_set", "upgrad", "dualproj", "upgrad_exact",
            "dualproj_exact", "nash_mtl", "fairgrad", "cagrad",
            "config_rows", "aligned_mtl_rows"]


@pytest.mark.parametrize("name", ACCURATE)
def test_matches_the_float64_reference_on_hard_jacobians(name):
  """Direction (cosine >= COS_MIN) and norm (to 1 %) on every hard Jacobian,
  and ``converged`` false only where there is no solution (Nash-MTL,
  FairGrad at Pareto-stationary rows) or where it is (never wrongly). ConFIG
  and Aligned-MTL from the rows' factor (the train step's default Jacobian
  path) are exact on all five kinds, nearly collinear rows included."""
  s = summarise(name)
  assert s["wrong"] == 0 and s["false_converged"] == 0 and s["non_descent"] == 0, s
  assert s["worst_cos"] >= COS_MIN, s
  assert s["norm_false_converged"] == 0, s
  if name in ROWS_VARIANTS:
    assert s["not_converged"] == 0 and s["norm_wrong"] == 0, s


def test_imtl_g_from_the_rows_is_exact_but_on_nearly_collinear_rows():
  """IMTL-G from the rows' factor matches the float64 closed form (direction and
  norm, converged) on Gaussian rows, near-opposite pairs and 100x norms; on
  nearly collinear rows the normalisation ``sum(alpha) = 1`` (not ``C``) is
  beyond float32 -- its first-order error estimate (``info["sensitivity"]``)
  flags those, and no flagged-as-converged result is wrong."""
  s = summarise("imtl_g_rows")
  assert s["kinds"] == ["collinear"], s
  assert s["false_converged"] == 0 and s["norm_false_converged"] == 0, s



@pytest.mark.parametrize("name", ["imtl_g", "aligned_mtl", "cagrad_fista", "config",
                                  "imtl_g_rows"])
def test_accurate_or_flagged_on_hard_jacobians(name):
  """Where float32 cannot resolve the system these methods solve from a Gram
  matrix (the ``accumulate`` path; IMTL-G and ConFIG: the cosine matrix's
  condition; Aligned-MTL: eigenvalues near rounding level; CAGrad's FISTA,
  used beyond ``exact_up_to``: its dual's gap stalls at float32 rounding with
  a 100x row) the result may be wrong, but then ``converged`` says so."""
  s = summarise(name)
  assert s["false_converged"] == 0 and s["norm_false_converged"] == 0, s




@jax.jit
@jax.vmap
def _prepare_x64(g):
  """The float64 Gram and factor (one program per shape, shared by the
  methods of the x64 test)."""
  return gradients.gram(g), gradients.cosine_factor(g)


@pytest.mark.parametrize("name", ["aligned_mtl", "config", "imtl_g"])
def test_float64_gradients_under_x64_resolve_every_hard_jacobian(name):
  """Under ``jax_enable_x64`` the Gram of float64 gradients is float64
  (:func:`gradients.gram`) and the methods float32 cannot resolve on these
  inputs match the float64 reference everywhere; Aligned-MTL's flag, relative
  to the dtype's precision, says so (IMTL-G's and ConFIG's ``max_cond`` are
  absolute, sized for float32)."""
  with jax.enable_x64(True):
    fn = jax.jit(jax.vmap(_lib(gradients)[name]))
    for (t, _), items in _jacobians_by_t().items():
      if t not in (3, 8):  # two task counts: each is a float64 compilation
        continue
      g64 = np.stack([g for _, g in items])
      # The Gram's dtype from the traced function (run eagerly, its ops would
      # each compile a program).
      assert jax.eval_shape(gradients.gram, jnp.asarray(g64[0])).dtype == jnp.float64
      k, r = _prepare_x64(jnp.asarray(g64))
      beta, info = jax.tree.map(np.asarray, fn(k, r))
      assert name != "aligned_mtl" or np.all(info["converged"])
      for (label, g), b in zip(items, beta):
        assert _cos(b @ g, REFERENCES[name](g)) >= 1 - 1e-6, label


def _kkt_violation(name, g, beta, info):
  """The method's own optimality condition in float64 on the returned weights,
  as a relative violation (0 when it holds exactly)."""
  k = g @ g.T
  norms = np.linalg.norm(g, axis=1)
  d = beta @ g
  if name.startswith("mgda"):   # (K a)_i >= a^T K a on the simplex
    return max(0.0, np.max((beta @ k @ beta - k @ beta) / (norms * norms.max())))
  if name in ("upgrad_exact", "dualproj_exact"):   # G d >= 0
    return max(0.0, np.max(-(g @ d) / (norms * norms.max())))
  if name == "config":   # equal cosines
    cos = g @ d / (norms * np.linalg.norm(d))
    return np.ptp(cos)
  if name == "fairgrad":   # (K w)_i = w_i^{-1/2}, w = beta / T, beyond float32 rounding
    w = beta / len(g)
    rounding = 16 * np.finfo(np.float32).eps * (np.abs(k) @ w) * np.sqrt(w)
    return np.max(np.abs((k @ w) * np.sqrt(w) - 1.0) - rounding)
  if name == "cagrad":
    # Strong duality (Liu et al. 2021): d = g0 + rho g_w / ||g_w|| lies on the
    # sphere ||d - g0|| = rho and min_i g_i . d = F(w) exactly at the optimum
    # (min_i g_i . d(w) <= F* <= F(w) for any w), relative to ||g0|| max_i ||g_i||
    # and to rho, beyond what the float32 Gram resolves of ||g0|| and ||g_w||
    # (both small differences of large rows on near-opposite pairs).
    c = 0.5
    g0 = g.mean(0)
    rho = c * np.linalg.norm(g0)
    d_raw = (1 + c * c) * d   # the default rescale=1
    w = np.asarray(info["w"], np.float64)
    f = test_gradients._cagrad_dual(g, c)[0]
    duality = (f(w) - np.min(g @ d_raw)) / (np.linalg.norm(g0) * norms.max())
    eps = 16 * np.finfo(np.float32).eps
    rounding = eps * ((np.abs(w) @ norms) ** 2 / np.linalg.norm(w @ g) ** 2
                      + norms.mean() ** 2 / np.linalg.norm(g0) ** 2)
    return max(duality, abs(np.linalg.norm(d_raw - g0) - rho) / rho - rounding)
  raise KeyError(name)


@pytest.mark.parametrize("name, bound", [
    ("mgda", 1e-5), ("mgda_active_set", 1e-5), ("upgrad_exact", 1e-5), ("dualproj_exact", 1e-5),
    ("config", 1e-3), ("fairgrad", 1e-3), ("cagrad", 1e-4)])
def test_optimality_conditions_on_hard_jacobians(name, bound):
  """Where the library says ``converged`` (always, for MGDA and CAGrad's exact
  path) its result meets the method's own optimality condition (ConFIG: equal
  cosines; CAGrad: strong duality)."""
  for label, g, beta, info in run_method(name):
    conv = bool(info.get("converged", True))
    if name.startswith("mgda") or name == "cagrad":
      assert conv, label
    if conv:
      assert _kkt_violation(name, g, beta, info) <= bound, (label, _kkt_violation(
          name, g, beta, info))


def _load(path):
  spec = importlib.util.spec_from_file_location("gradients_under_test", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


if __name__ == "__main__":
  module = _load(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else gradients
  if len(sys.argv) > 2:  # Jacobians per (kind, T, P) cell
    N_PER_CELL = int(sys.argv[2])
  for method in REFERENCES:
    if _available(module, method):
      print(method, summarise(method, module), flush=True)
    else:
      print(method, "absent")
