"""Every architecture's ``apply`` against a float64 numpy forward pass written
from the definitions in :mod:`mtljax.models.multitask` and
:mod:`mtljax.models.encoders` (no mtljax code computes a reference).

Parameters are non-trivial: each leaf is its documented initial value plus
noise (in the layout of ``model.init``; one test perturbs the model's own
init), so MoE gates are not uniform, cross-stitch alphas are neither the
identity nor their init, multiplicative gates are not ones and biases are
non-zero. ``task_ids`` repeat tasks, come out of order and number more slots
than tasks; for each slot only the output of its task's group is compared (the
other groups' rows are meaningless by design). Shapes are tiny: the whole file
runs in seconds on CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import tasks
from mtljax.models import multitask

RTOL, ATOL = 1e-4, 1e-5

# Mixed kinds: two classification tasks share one group, regression has its own.
MIX3 = tasks.TaskSet((tasks.Task("a", "classification", 4), tasks.Task("r", "regression"),
                      tasks.Task("b", "classification", 4)))
IDS3 = np.array([2, 0, 2, 1, 0], np.int32)  # K=5 > T=3, repeats, out of order
# Every kind, and groups of sizes 2, 2, 1 interleaved in task order.
MIX5 = tasks.TaskSet((tasks.Task("a", "classification", 3), tasks.Task("r", "regression"),
                      tasks.Task("c", "binary"), tasks.Task("b", "classification", 3),
                      tasks.Task("s", "regression")))
IDS5 = np.array([3, 1, 4, 4, 0, 2, 1], np.int32)  # K=7 > T=5


# --------------------------------------------------------------------------
# Helpers: perturbed parameters and inputs.
# --------------------------------------------------------------------------


def _perturbed(params, seed=1, scale=0.3):
  """Adds N(0, scale^2) noise to every leaf (float32, as the model stores them)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  noisy = [jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32)
           for a in leaves]
  return jax.tree.unflatten(treedef, noisy)


def _random_like(model, init_diagonal=0.9, seed=1):
  """Random float32 parameters in the layout of ``model.init`` (its tree and
  shapes from ``jax.eval_shape``, so no initialiser runs: that is most of the
  run time of a small model on CPU). Each leaf is its documented initial value
  plus noise: kernels N(0, 1/fan_in), biases N(0, 0.3^2) (init: zeros),
  multiplicative gates 1 + N(0, 0.3^2) (init: ones), cross-stitch alphas
  init_diagonal on the diagonal and (1 - init_diagonal) / (T - 1) off it, + N(0, 0.1^2).
  MoE gate kernels are kernels (init: zeros), so the softmax is not uniform."""
  rng = np.random.default_rng(seed)
  n = len(model.taskset)

  def leaf(path, a):
    names = [k.key for k in path]
    z = rng.standard_normal(a.shape)
    if "stitch" in names:
      alpha = np.full((n, n), (1.0 - init_diagonal) / max(n - 1, 1))
      np.fill_diagonal(alpha, init_diagonal)
      v = alpha + 0.1 * z
    elif names[-1] == "z_gate":
      v = 1.0 + 0.3 * z
    elif names[-1] in ("z", "w"):  # DSelect-k static logits: some saturate, some not
      v = z
    elif names[-1] == "bias":
      v = 0.3 * z
    else:
      assert names[-1] in ("kernel", "z_kernel"), names
      conv = a.ndim >= 4 and any(k.startswith("conv_") for k in names)
      fan_in = int(np.prod(a.shape[-4:-1])) if conv else a.shape[-2]
      v = z / np.sqrt(fan_in)
    return jnp.asarray(v, jnp.float32)

  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _f64(params):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), params)


def _row(tree, i):
  """Row ``i`` of every leaf of a stacked (per-task or per-expert) subtree."""
  return jax.tree.map(lambda a: a[i], tree)


def _inputs(shape, k, b=3, seed=0):
  return np.random.default_rng(seed).standard_normal((k, b) + tuple(shape)).astype(np.float32)


def _build(arch, taskset, shape, ids, init=None, **kw):
  """Float64 copy of the float32 params, x, and the (jitted) JAX outputs.

  Params are random in the model's layout (:func:`_random_like`), or, given
  ``init`` (the model's own initial parameters), ``init`` plus noise."""
  model = multitask.make_model(arch, taskset, shape, **kw)
  if init is not None:
    params = _perturbed(init)
  else:
    params = _random_like(model, kw.get("init_diagonal", 0.9))
  x = _inputs(shape, len(ids))
  outs = jax.jit(model.apply)(params, jnp.asarray(x), jnp.asarray(ids))
  return _f64(params), x, outs


def _check(taskset, outs, ref, ids):
  """Slot k's output of its own task's group against ``ref[k]``; every group's
  output is ``[K, B, out_dim]``."""
  assert set(outs) == set(taskset.groups)
  for g in taskset.groups:
    assert outs[g].shape == (len(ids), ref[0].shape[0], taskset.group_task(g).out_dim), g
  for k, t in enumerate(ids):
    g = taskset.tasks[t].group
    np.testing.assert_allclose(np.asarray(outs[g][k]), ref[k], rtol=RTOL, atol=ATOL,
                               err_msg=f"slot {k}, task {taskset.names[t]}, group {g}")


# --------------------------------------------------------------------------
# Float64 numpy reference, from the definitions.
# --------------------------------------------------------------------------


def _relu(a):
  return np.maximum(a, 0.0)


def _dense(h, p):
  return h @ p["kernel"] + p["bias"]


def _cond_dense(h, p, mode, z):
  """Dense layer conditioned on the one-hot ``z [Z]`` (``mode`` None: plain)."""
  if mode is None:
    return _dense(h, p)
  zb = np.broadcast_to(z, h.shape[:-1] + z.shape)
  if mode == "concat":
    return np.concatenate([h, zb], axis=-1) @ p["kernel"] + p["bias"]
  if mode == "additive":
    return h @ p["kernel"] + p["bias"] + zb @ p["z_kernel"]
  assert mode == "multiplicative"
  return (h @ p["kernel"] + p["bias"]) * (zb @ p["z_gate"])


def _conv3x3_same(x, p):
  """Stride-1 SAME 3x3 cross-correlation on a zero-padded ``[B, H, W, C]``."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(1, 2))  # [B,H,W,C,3,3]
  return np.einsum("bhwcij,ijcf->bhwf", win, p["kernel"]) + p["bias"]


def _conv3x3_loops(x, p):
  """The same convolution as explicit loops over output pixels (used once, as a
  check of the sliding-window version)."""
  b, h, w, _ = x.shape
  k = p["kernel"]
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((b, h, w, k.shape[-1]))
  for i in range(h):
    for j in range(w):
      for di in range(3):
        for dj in range(3):
          out[:, i, j] += xp[:, i + di, j + dj] @ k[di, dj]
  return out + p["bias"]


def _maxpool2(h):
  """2x2 stride-2 max-pool (VALID: odd edges dropped) where the map is >= 2x2."""
  b, hh, ww, c = h.shape
  if hh < 2 or ww < 2:
    return h
  h = h[:, :hh // 2 * 2, :ww // 2 * 2]
  return h.reshape(b, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))


def _image(x):
  return x if x.ndim == 4 else x[..., None]  # [B, H, W] -> [B, H, W, 1]


def _trunk(p, x, encoder, hidden, channels=(), mode=None, cond_layers=(), z=None):
  """One encoder on ``x [B, ...]``: ``[B, F]``."""
  if encoder == "cnn":
    h = _image(x)
    for i in range(len(channels)):
      h = _maxpool2(_relu(_conv3x3_same(h, p[f"conv_{i}"])))
  else:
    h = x
  h = h.reshape(h.shape[0], -1)
  for l in range(len(hidden)):
    h = _relu(_cond_dense(h, p[f"layer_{l}"], mode if l in cond_layers else None, z))
  return h


def _head(params, taskset, t, feats):
  """Task ``t``'s linear head: per-task row when the group is stacked, else shared."""
  g = taskset.tasks[t].group
  if "heads" in params["tasks"]:
    return _dense(feats, _row(params["tasks"]["heads"][g], taskset.local_index[t]))
  return _dense(feats, params["shared"]["heads"][g])


def _softmax(a):
  e = np.exp(a - a.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _moe_ref(arch, p, taskset, x, ids, encoder, hidden, channels, num_experts, tower):
  out = []
  for xk, t in zip(x, ids):
    if arch == "shared_bottom":
      mix = _trunk(p["shared"]["trunk"], xk, encoder, hidden, channels)
    else:
      gate = (_row(p["tasks"]["gates"], t) if arch == "mmoe" else p["shared"]["gate"])
      g = _softmax(xk.reshape(xk.shape[0], -1) @ gate["kernel"] + gate["bias"])  # [B, E]
      mix = sum(g[:, e:e + 1] *
                _trunk(_row(p["shared"]["experts"], e), xk, encoder, hidden, channels)
                for e in range(num_experts))
    tp = _row(p["tasks"]["towers"], t)
    for l in range(len(tower)):
      mix = _relu(_dense(mix, tp[f"layer_{l}"]))
    out.append(_head(p, taskset, t, mix))
  return out


def _cross_stitch_ref(p, taskset, x, ids, encoder, hidden, channels):
  cols, alpha = p["tasks"]["trunk"], p["shared"]["stitch"]
  n = len(taskset)
  names = ([f"conv_{i}" for i in range(len(channels))] if encoder == "cnn" else []
           ) + [f"layer_{l}" for l in range(len(hidden))]
  out = []
  for xk, t in zip(x, ids):
    h0 = _image(xk) if encoder == "cnn" else xk.reshape(xk.shape[0], -1)
    hs = [h0] * n  # every column sees the slot's inputs
    for name in names:
      new = []
      for s in range(n):
        ps = _row(cols, s)[name]
        if name.startswith("conv"):
          new.append(_maxpool2(_relu(_conv3x3_same(hs[s], ps))))
        else:
          new.append(_relu(_dense(hs[s].reshape(hs[s].shape[0], -1), ps)))
      a = alpha[name]
      hs = [sum(a[u, s] * new[s] for s in range(n)) for u in range(n)]
    out.append(_head(p, taskset, t, hs[t].reshape(hs[t].shape[0], -1)))
  return out


# --------------------------------------------------------------------------
# Tests.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("arch, encoder, shape", [
    ("mmoe", "mlp", (5,)), ("omoe", "mlp", (5,)), ("mmoe", "cnn", (4, 4))])
def test_mixture_of_experts_matches_numpy_reference(arch, encoder, shape):
  """MMoE / OMoE: f_t(x) = sum_e softmax(flat(x) W_t + b_t)_e expert_e(x) (one
  shared gate for OMoE), then the task's ReLU tower, then its linear head."""
  kw = dict(encoder=encoder, hidden=(7, 6), channels=(3,), num_experts=3, tower=(5,))
  p, x, outs = _build(arch, MIX3, shape, IDS3, **kw)
  gate = p["tasks"]["gates"] if arch == "mmoe" else p["shared"]["gate"]
  assert gate["kernel"].shape[-1] == 3 and np.abs(gate["kernel"]).min() > 0
  if arch == "mmoe":  # per-task gates that really differ between tasks
    assert gate["kernel"].shape[0] == len(MIX3)
    assert not np.allclose(gate["kernel"][0], gate["kernel"][2])
  ref = _moe_ref(arch, p, MIX3, x, IDS3, encoder, kw["hidden"], kw["channels"], 3,
                 kw["tower"])
  _check(MIX3, outs, ref, IDS3)


@pytest.mark.parametrize("tower", [(5,), (5, 4)])
def test_shared_bottom_with_towers_matches_numpy_reference(tower):
  """shared_bottom: one shared MLP trunk, the task's ReLU tower, its linear head."""
  kw = dict(hidden=(7, 6), tower=tower)
  p, x, outs = _build("shared_bottom", MIX3, (5,), IDS3, **kw)
  assert set(p["tasks"]) == {"towers", "heads"}
  ref = _moe_ref("shared_bottom", p, MIX3, x, IDS3, "mlp", kw["hidden"], (), 1, tower)
  _check(MIX3, outs, ref, IDS3)


@pytest.mark.parametrize("encoder, shape, channels", [
    ("mlp", (5,), ()), ("cnn", (6, 6), (3, 2)), ("cnn", (6, 6, 2), (3,))])
def test_cross_stitch_matches_numpy_reference(encoder, shape, channels):
  """cross_stitch: all T columns run on each slot's inputs and are mixed after
  every layer (conv layers after ReLU and pooling) by h~_t = sum_t' alpha_tt' h_t';
  the slot reads its own task's column into its head."""
  kw = dict(encoder=encoder, hidden=(7, 6), channels=channels, init_diagonal=0.6)
  p, x, outs = _build("cross_stitch", MIX3, shape, IDS3, **kw)
  n_layers = len(channels) + 2
  assert len(p["shared"]["stitch"]) == n_layers
  init = 0.2 + 0.4 * np.eye(3)  # 0.6 on the diagonal, (1 - 0.6) / (T - 1) off it
  for a in p["shared"]["stitch"].values():  # neither the identity nor the init
    assert np.abs(a - np.eye(3)).min() > 0 and np.abs(a - init).max() > 0.05
  ref = _cross_stitch_ref(p, MIX3, x, IDS3, encoder, kw["hidden"], channels)
  _check(MIX3, outs, ref, IDS3)


def test_perturbed_mmoe_init_matches_numpy_reference():
  """From MMoE's own init (zero gates: uniform 1/E; zero biases) plus noise on
  every leaf, apply equals the reference. (The other tests draw parameters in
  the init's layout without running the initialisers, see _random_like.)"""
  kw = dict(hidden=(7, 6), num_experts=3, tower=(5,))
  init = multitask.make_model("mmoe", MIX3, (5,), **kw).init(jax.random.key(0))
  assert not np.asarray(init["tasks"]["gates"]["kernel"]).any()
  assert not any(np.asarray(leaf).any()
                 for path, leaf in jax.tree_util.tree_leaves_with_path(init)
                 if path[-1].key == "bias")
  p, x, outs = _build("mmoe", MIX3, (5,), IDS3, init=init, **kw)
  ref = _moe_ref("mmoe", p, MIX3, x, IDS3, "mlp", kw["hidden"], (), 3, kw["tower"])
  _check(MIX3, outs, ref, IDS3)


def test_numpy_reference_convolution_is_a_direct_convolution():
  """The sliding-window reference convolution equals explicit pixel loops."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 4, 3))
  p = {"kernel": rng.standard_normal((3, 3, 3, 2)), "bias": rng.standard_normal(2)}
  np.testing.assert_allclose(_conv3x3_same(x, p), _conv3x3_loops(x, p), rtol=1e-12,
                             atol=1e-12)
  # SAME zero padding: a one-hot input at a corner sees only part of the kernel.
  e = np.zeros((1, 3, 3, 1))
  e[0, 0, 0, 0] = 1.0
  k = {"kernel": np.arange(9.0).reshape(3, 3, 1, 1), "bias": np.zeros(1)}
  np.testing.assert_array_equal(_conv3x3_same(e, k)[0, :, :, 0],
                                [[4.0, 3.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize("shape, channels", [
    ((6, 6), (3, 4)),      # no channel axis; 6x6 -> 3x3 -> 1x1
    ((5, 7, 2), (3, 4)),   # odd sizes: pooling drops the last row / column
    ((4, 3), (2, 3, 2)),   # 4x3 -> 2x1, then maps under 2x2 are not pooled
])
def test_cnn_multi_head_matches_direct_convolution(shape, channels):
  """multi_head with the CNN trunk: 3x3 SAME conv + ReLU + 2x2 max-pool (where
  the map is >= 2x2), flatten, ReLU dense layers, per-task linear heads."""
  kw = dict(encoder="cnn", hidden=(6, 5), channels=channels)
  p, x, outs = _build("multi_head", MIX3, shape, IDS3, **kw)
  ref = []
  for xk, t in zip(x, IDS3):
    h = _image(xk.astype(np.float64))
    for i in range(len(channels)):
      h = _maxpool2(_relu(_conv3x3_loops(h, p["shared"]["trunk"][f"conv_{i}"])))
    h = h.reshape(h.shape[0], -1)
    for l in range(len(kw["hidden"])):
      h = _relu(_dense(h, p["shared"]["trunk"][f"layer_{l}"]))
    ref.append(_head(p, MIX3, t, h))
  _check(MIX3, outs, ref, IDS3)


@pytest.mark.parametrize("arch, heads, cond_layers", [
    ("concat", "per_task", (1,)), ("additive", "per_task", (0, 2)),
    ("multiplicative", "per_task", (1,)), ("concat", "auto", (0, 2)),
    ("additive", "auto", (1,)), ("multiplicative", "auto", (0, 2))])
def test_conditioned_archs_match_numpy_reference(arch, heads, cond_layers):
  """concat / additive / multiplicative conditioning on the one-hot task id at
  the chosen dense layers; heads per task (per_task) or one per group (auto)."""
  kw = dict(hidden=(7, 6, 5), cond_layers=cond_layers, heads=heads)
  p, x, outs = _build(arch, MIX5, (4,), IDS5, **kw)
  if heads == "auto":
    assert "heads" not in p["tasks"] and set(p["shared"]["heads"]) == set(MIX5.groups)
  else:
    assert "heads" not in p["shared"] and set(p["tasks"]["heads"]) == set(MIX5.groups)
  ref = []
  for xk, t in zip(x, IDS5):
    z = np.eye(len(MIX5))[t]
    h = _trunk(p["shared"]["trunk"], xk, "mlp", kw["hidden"], mode=arch,
               cond_layers=cond_layers, z=z)
    ref.append(_head(p, MIX5, t, h))
  _check(MIX5, outs, ref, IDS5)


def test_conditioned_cnn_matches_numpy_reference():
  """concat conditioning at the first dense layer after the (unconditioned) convs."""
  kw = dict(encoder="cnn", hidden=(6, 5), channels=(3,), cond_layers=(0,))
  p, x, outs = _build("concat", MIX3, (4, 4), IDS3, **kw)
  ref = []
  for xk, t in zip(x, IDS3):
    h = _trunk(p["shared"]["trunk"], xk, "cnn", kw["hidden"], (3,), "concat", (0,),
               np.eye(3)[t])
    ref.append(_head(p, MIX3, t, h))
  _check(MIX3, outs, ref, IDS3)


@pytest.mark.parametrize("arch, heads", [
    ("independent", "auto"), ("multi_head", "auto"), ("multi_head", "shared")])
def test_independent_and_multi_head_mlp_match_numpy_reference(arch, heads):
  """independent (the task's own trunk) and multi_head (one shared trunk), MLP,
  with classification, regression and binary groups all checked."""
  kw = dict(hidden=(7, 6), heads=heads)
  p, x, outs = _build(arch, MIX5, (2, 3), IDS5, **kw)
  assert {MIX5.tasks[t].group for t in IDS5} == {"classification3", "regression1",
                                                  "binary1"}
  ref = []
  for xk, t in zip(x, IDS5):
    trunk = _row(p["tasks"]["trunk"], t) if arch == "independent" else p["shared"]["trunk"]
    ref.append(_head(p, MIX5, t, _trunk(trunk, xk, "mlp", kw["hidden"])))
  _check(MIX5, outs, ref, IDS5)


# --------------------------------------------------------------------------
# CGC / PLE, DSelect-k, MTAN (mtljax/models/experts.py), from the papers.
# --------------------------------------------------------------------------


def _sigmoid(a):
  return 1.0 / (1.0 + np.exp(-a))


def _tower_head(p, taskset, t, h, tower):
  tp = _row(p["tasks"]["towers"], t)
  for l in range(len(tower)):
    h = _relu(_dense(h, tp[f"layer_{l}"]))
  return _head(p, taskset, t, h)


def _ple_ref(p, taskset, x, ids, encoder, hidden, channels, levels, level_hidden, tower):
  """Tang et al. 2020, eqs. 5-8: at level l task u's gate mixes the shared
  experts (on the shared path) and u's own (on u's path); the shared path's
  gate mixes every expert of the level; the last level has no shared gate."""
  n = len(taskset)
  e_s = p["shared"]["experts"]["level_0"][next(iter(p["shared"]["experts"]["level_0"]))][
      "kernel"].shape[0]
  out = []
  for xk, t in zip(x, ids):
    h_s, h_t = xk, [xk] * n
    for l in range(levels):
      name = f"level_{l}"

      def run(pe, h, l=l):
        if l == 0:
          return _trunk(pe, h, encoder, hidden, channels)
        return _trunk(pe, h, "mlp", level_hidden)
      shared_out = [run(_row(p["shared"]["experts"][name], e), h_s) for e in range(e_s)]
      own = [[] for _ in range(n)]
      if "experts" in p["tasks"]:
        te = p["tasks"]["experts"][name]
        e_t = jax.tree.leaves(te)[0].shape[1]
        own = [[run(_row(_row(te, u), e), h_t[u]) for e in range(e_t)] for u in range(n)]
      new = []
      for u in range(n):
        g = _row(p["tasks"]["gates"][name], u)
        w = _softmax(h_t[u].reshape(h_t[u].shape[0], -1) @ g["kernel"] + g["bias"])
        ex = shared_out + own[u]
        assert w.shape[1] == len(ex)
        new.append(sum(w[:, i:i + 1] * ex[i] for i in range(len(ex))))
      if l < levels - 1:
        g = p["shared"]["gate"][name]
        w = _softmax(h_s.reshape(h_s.shape[0], -1) @ g["kernel"] + g["bias"])
        ex = shared_out + [o for u in range(n) for o in own[u]]
        assert w.shape[1] == len(ex)
        h_s = sum(w[:, i:i + 1] * ex[i] for i in range(len(ex)))
      h_t = new
    out.append(_tower_head(p, taskset, t, h_t[t], tower))
  return out


def _smooth_step_ref(t, gamma):
  if t <= -gamma / 2:
    return 0.0
  if t >= gamma / 2:
    return 1.0
  return -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5


def _dselect_ref(z, w, num_experts, gamma):
  """Hazimeh et al. 2021, eqs. 2-4, with scalar loops: selector i's weight on
  expert e is prod_j (S(z_ij) if bit j of e else 1 - S(z_ij)), bits of e most
  significant first (``np.binary_repr``); the gate is sum_i softmax(w)_i r_i."""
  k, m = z.shape
  r = np.ones((k, num_experts))
  for i in range(k):
    for e in range(num_experts):
      bits = np.binary_repr(e, width=m) if m else ""
      for j in range(m):
        s = _smooth_step_ref(float(z[i, j]), gamma)
        r[i, e] *= s if bits[j] == "1" else 1.0 - s
  sw = np.exp(w - w.max()) / np.exp(w - w.max()).sum()
  return (sw[:, None] * r).sum(axis=0), r


def _dselect_moe_ref(p, taskset, x, ids, hidden, num_experts, k, gamma, per_example, tower):
  out = []
  for xk, t in zip(x, ids):
    g = _row(p["tasks"]["gates"], t)
    flat = xk.reshape(xk.shape[0], -1)
    if per_example:
      zs = (flat @ g["z"]["kernel"] + g["z"]["bias"]).reshape(len(flat), k, -1)
      ws = flat @ g["w"]["kernel"] + g["w"]["bias"]
      weights = np.stack([_dselect_ref(zs[b], ws[b], num_experts, gamma)[0]
                          for b in range(len(flat))])
    else:
      weights = np.broadcast_to(_dselect_ref(g["z"], g["w"], num_experts, gamma)[0],
                                (len(flat), num_experts))
    mix = sum(weights[:, e:e + 1] * _trunk(_row(p["shared"]["experts"], e), xk, "mlp", hidden)
              for e in range(num_experts))
    out.append(_tower_head(p, taskset, t, mix, tower))
  return out


def _mtan_ref(p, taskset, x, ids, encoder, hidden, channels, tower):
  """Liu et al. 2019, sec. 3.1: per layer j, a_t = sigmoid(A2 relu(A1 u)) with
  u = s_j (j = 0) or [s_j, p_{j-1}]; p_j = f_j(a_t * s_j), f_j shared."""
  names = ([f"conv_{i}" for i in range(len(channels))] if encoder == "cnn" else []
           ) + [f"layer_{l}" for l in range(len(hidden))]
  trunk, att_f = p["shared"]["trunk"], p["shared"]["att_f"]
  out = []
  for xk, t in zip(x, ids):
    b = xk.shape[0]
    h = _image(xk) if encoder == "cnn" else xk.reshape(b, -1)
    acts = []
    for n in names:
      if n.startswith("conv"):
        h = _relu(_conv3x3_same(h, trunk[n]))
        acts.append(h)
        h = _maxpool2(h)
      else:
        h = _relu(_dense(h.reshape(b, -1), trunk[n]))
        acts.append(h)
    att, prev = _row(p["tasks"]["attention"], t), None
    for j, n in enumerate(names):
      u = acts[j] if j == 0 else np.concatenate([acts[j], prev], axis=-1)
      a = _sigmoid(_dense(_relu(_dense(u, att[n]["a1"])), att[n]["a2"]))
      e = a * acts[j]
      conv = n.startswith("conv")
      if j == len(names) - 1:
        prev = _maxpool2(e).reshape(b, -1) if conv else e
      elif names[j + 1].startswith("conv"):
        prev = _maxpool2(_relu(_conv3x3_same(e, att_f[n])))
      else:
        prev = _relu(_dense((_maxpool2(e) if conv else e).reshape(b, -1), att_f[n]))
    out.append(_tower_head(p, taskset, t, prev, tower))
  return out


@pytest.mark.parametrize("arch, encoder, shape, levels, task_experts, level_hidden", [
    ("cgc", "mlp", (5,), 1, 2, (4,)), ("cgc", "cnn", (4, 4), 1, 1, (4,)),
    ("ple", "mlp", (5,), 2, 1, (4,)), ("ple", "mlp", (2, 3), 3, 2, (4,)),
    ("ple", "cnn", (4, 4), 2, 0, (4,)), ("ple", "cnn", (4, 4), 2, 1, (4, 3))])
def test_cgc_and_ple_match_numpy_reference(arch, encoder, shape, levels, task_experts,
                                           level_hidden):
  kw = dict(encoder=encoder, hidden=(6, 5), channels=(3,), num_experts=2,
            task_experts=task_experts, tower=(3,))
  if arch == "ple":  # cgc is one level: it takes neither
    kw.update(num_levels=levels, level_hidden=level_hidden)
  p, x, outs = _build(arch, MIX3, shape, IDS3, **kw)
  assert ("gate" in p["shared"]) == (levels > 1)
  assert ("experts" in p["tasks"]) == (task_experts > 0)
  ref = _ple_ref(p, MIX3, x, IDS3, encoder, kw["hidden"], kw["channels"], levels,
                 level_hidden, kw["tower"])
  _check(MIX3, outs, ref, IDS3)


def test_dselect_k_selector_matches_scalar_reference():
  """The vectorised smooth-step and selectors equal the scalar loops on logits
  on both sides of +-gamma/2 and at it, for E a power of 2 and not."""
  from mtljax.models import experts  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for e, k, gamma in ((8, 3, 1.0), (5, 2, 0.5), (2, 2, 2.0), (1, 1, 1.0)):
    m = int(np.ceil(np.log2(e))) if e > 1 else 0
    z = rng.standard_normal((k, m)) * gamma
    if m:
      z[0, 0] = gamma / 2  # the knots
      z[-1, -1] = -gamma / 2
    w = rng.standard_normal(k)
    want, want_r = _dselect_ref(z, w, e, gamma)
    got, got_r = experts.dselect_weights(jnp.asarray(z, jnp.float32), jnp.asarray(w, jnp.float32),
                                         num_experts=e, gamma=gamma)
    np.testing.assert_allclose(got_r, want_r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    ts = np.linspace(-gamma, gamma, 41)
    np.testing.assert_allclose(experts.smooth_step(jnp.asarray(ts, jnp.float32), gamma),
                               [_smooth_step_ref(t, gamma) for t in ts], atol=1e-6)


@pytest.mark.parametrize("per_example, num_experts", [(False, 3), (False, 4), (True, 4)])
def test_dselect_k_moe_matches_numpy_reference(per_example, num_experts):
  kw = dict(hidden=(6, 5), num_experts=num_experts, k=2, gamma=1.5, per_example=per_example,
            tower=(3,))
  p, x, outs = _build("dselect_k", MIX3, (5,), IDS3, **kw)
  ref = _dselect_moe_ref(p, MIX3, x, IDS3, kw["hidden"], num_experts, 2, 1.5, per_example,
                         kw["tower"])
  _check(MIX3, outs, ref, IDS3)


@pytest.mark.parametrize("encoder, shape, hidden, channels", [
    ("mlp", (5,), (6, 5), ()), ("mlp", (5,), (4,), ()), ("cnn", (6, 6), (5,), (3, 2)),
    ("cnn", (5, 4, 2), (), (3,))])
def test_mtan_matches_numpy_reference(encoder, shape, hidden, channels):
  kw = dict(encoder=encoder, hidden=hidden, channels=channels, tower=(3,))
  p, x, outs = _build("mtan", MIX3, shape, IDS3, **kw)
  ref = _mtan_ref(p, MIX3, x, IDS3, encoder, hidden, channels, kw["tower"])
  _check(MIX3, outs, ref, IDS3)
