"""SegNet and MTAN-over-SegNet (mtljax.models.backbones.segnet) against the
MTAN code's own torch models (outputs in train and eval mode, every running
statistic; fixture from scripts/make_segnet_fixtures.py), pooling with indices
and unpooling against a numpy re-statement of torch's loops (ties included),
the task-axis batch norm against numpy, parameter counts against the integers
the MTAN code gives, the first layer's running statistics against a numpy
convolution, batched MTAN branches against one-task branches, MTAN with masks
forced to 1 against the split model, heads against numpy convolutions.

Fast tier: the torch fixture's widths (4, 8, 8, 16, 16) at 32x64 with its
weights; one jitted program (both models in both modes, encode, decode and
the batched attention branches), module-scoped, shared by the tests (other sizes and widths by eval_shape: traced, not compiled). Slow tier:
gradients, and the paper's widths at 288x384.
"""

import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax.models.backbones import segnet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NYU = (("seg", "segmentation", 13), ("depth", "depth", 1), ("normal", "normals", 3))
TINY = (4, 8, 8, 16, 16)  # the torch fixture's widths (the MTAN code needs f_3 = f_4)
HW = (32, 64)
B = 2


# ---------------------------------------------------------------------------
# numpy references

def np_torch_maxpool(x):
  """torch's MaxPool2d(2, 2, return_indices=True) kernel as a loop: scan each
  window row-major, replace the running maximum on ``>`` only (so the first
  of tied maxima wins); indices flat into the H*W plane. x [N, H, W, C]."""
  n, h, w, c = x.shape
  out = np.zeros((n, h // 2, w // 2, c))
  idx = np.zeros((n, h // 2, w // 2, c), np.int64)
  for b in range(n):
    for i in range(h // 2):
      for j in range(w // 2):
        for ch in range(c):
          best, arg = -np.inf, -1
          for dy in range(2):
            for dx in range(2):
              v = x[b, 2 * i + dy, 2 * j + dx, ch]
              if v > best:
                best, arg = v, (2 * i + dy) * w + 2 * j + dx
          out[b, i, j, ch], idx[b, i, j, ch] = best, arg
  return out, idx


def np_torch_maxunpool(y, idx, out_hw):
  """torch's MaxUnpool2d(2, 2) with output_size: out.flat[idx] = y per plane."""
  n, _, _, c = y.shape
  out = np.zeros((n, out_hw[0] * out_hw[1], c))
  for b in range(n):
    for ch in range(c):
      out[b, idx[b, ..., ch].ravel(), ch] = y[b, ..., ch].ravel()
  return out.reshape(n, *out_hw, c)


def np_conv3x3(x, k, bias):
  """SAME 3x3 convolution (torch's padding=1) in float64: x [B, H, W, C], k [3, 3, C, F]."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1:3]
  out = np.zeros(x.shape[:3] + (k.shape[-1],))
  for i in range(3):
    for j in range(3):
      out += xp[:, i:i + h, j:j + w, :] @ k[i, j]
  return out + bias


def path_str(path):
  return "/".join(str(getattr(k, "key", k)) for k in path)


# ---------------------------------------------------------------------------
# Pooling and unpooling

@jax.jit
def _pool_program(x, up_w, down_w):
  pooled, idx = segnet.max_pool_with_indices(x)
  unpooled = segnet.max_unpool(pooled, idx, x.shape[1:3])
  g_pool = jax.grad(lambda x: jnp.sum(segnet.max_pool(x) * up_w))(x)
  g_unpool = jax.grad(lambda y: jnp.sum(segnet.max_unpool(y, idx, x.shape[1:3]) * down_w))(pooled)
  return pooled, idx, unpooled, g_pool, g_unpool


def test_pooling_with_indices_and_unpooling_follow_torchs_loops_ties_included():
  rng = np.random.RandomState(0)
  # Values in {0, 1, 2}: most windows hold tied maxima; odd H and W drop a row/column.
  x = rng.randint(0, 3, size=(2, 7, 9, 3)).astype(np.float64)
  up_w = rng.normal(size=(2, 3, 4, 3))
  down_w = rng.normal(size=(2, 7, 9, 3))
  pooled, idx, unpooled, g_pool, g_unpool = map(np.asarray, _pool_program(
      *(a.astype(np.float32) for a in (x, up_w, down_w))))
  want_pool, want_flat = np_torch_maxpool(x)
  np.testing.assert_array_equal(pooled, want_pool)
  i = np.arange(3)[None, :, None, None]
  j = np.arange(4)[None, None, :, None]
  flat = (2 * i + idx // 2) * 9 + 2 * j + idx % 2  # local window index -> torch's flat index
  np.testing.assert_array_equal(flat, want_flat)
  assert (want_flat != (2 * i * 9 + 2 * j)).any() and (idx == 0).any()  # ties were exercised
  n_tied = ((x[:, :6, :8].reshape(2, 3, 2, 4, 2, 3) == want_pool[:, :, None, :, None]).sum((2, 4)) > 1)
  assert n_tied.mean() > 0.3
  np.testing.assert_array_equal(unpooled, np_torch_maxunpool(want_pool, want_flat, (7, 9)))
  # Gradients: pooling's goes to the chosen (first) maximum only, as torch's.
  np.testing.assert_allclose(g_pool, np_torch_maxunpool(up_w, want_flat, (7, 9)), rtol=1e-6)
  want_g_unpool = np.take_along_axis(down_w.reshape(2, 63, 3), want_flat.reshape(2, 12, 3), 1)
  np.testing.assert_allclose(g_unpool, want_g_unpool.reshape(2, 3, 4, 3), rtol=1e-6)


# ---------------------------------------------------------------------------
# Task-axis batch norm

def _np_bn_train(x, scale, bias, red):
  mean = x.mean(red, keepdims=True)
  var = x.var(red, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


@pytest.fixture(scope="module")
def task_bn_program():
  mods = {"per_task": segnet.TaskBatchNorm(3),
          "sequential": segnet.TaskBatchNorm(3, per_task=False),
          "mean": segnet.TaskBatchNorm(3, per_task=False, shared_update="mean")}

  @jax.jit
  def run(variables, x):
    out = {}
    for k, m in mods.items():
      y, new = m.apply(variables[k], x, True, mutable=["batch_stats"])
      out[k] = (y, new["batch_stats"], m.apply(variables[k], x, False))
    return out
  return run


def test_task_batchnorm_per_task_and_shared_follow_torch_semantics(task_bn_program):
  rng = np.random.RandomState(1)
  t, c = 3, 4
  x = rng.normal(size=(t, 2, 3, 5, c)) * rng.uniform(0.5, 3, (t, 1, 1, 1, c)) + rng.normal(size=(t, 1, 1, 1, c))
  n = 2 * 3 * 5

  def var(shape):
    return {"params": {"scale": 1 + 0.1 * rng.normal(size=shape), "bias": 0.1 * rng.normal(size=shape)},
            "batch_stats": {"mean": 0.1 * rng.normal(size=shape), "var": rng.uniform(0.5, 1.5, shape)}}
  v = {"per_task": var((t, c)), "sequential": var((c,)), "mean": var((c,))}
  v["mean"] = v["sequential"]
  got = task_bn_program(jax.tree.map(lambda a: a.astype(np.float32), v), x.astype(np.float32))
  bm = x.mean((1, 2, 3))                       # [T, C] batch statistics per task
  bv = x.var((1, 2, 3)) * n / (n - 1)          # unbiased, as torch's running update
  red = (1, 2, 3)
  # Per task: own affine, own statistics.
  p, s = v["per_task"]["params"], v["per_task"]["batch_stats"]
  y, new, y_eval = got["per_task"]
  np.testing.assert_allclose(y, _np_bn_train(x, p["scale"][:, None, None, None], p["bias"][:, None, None, None], red),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["mean"], 0.9 * s["mean"] + 0.1 * bm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * s["var"] + 0.1 * bv, rtol=1e-5)
  e = lambda a: a[:, None, None, None]  # noqa: E731
  np.testing.assert_allclose(y_eval, (x - e(s["mean"])) / np.sqrt(e(s["var"]) + 1e-5) * e(p["scale"]) + e(p["bias"]),
                             rtol=1e-4, atol=1e-4)
  # Shared: each task normalised by its own batch, one affine; running statistics
  # as torch's module called once per task in order (a loop, written out).
  p, s = v["sequential"]["params"], v["sequential"]["batch_stats"]
  r_mean, r_var = s["mean"].copy(), s["var"].copy()
  for k in range(t):
    r_mean, r_var = 0.9 * r_mean + 0.1 * bm[k], 0.9 * r_var + 0.1 * bv[k]
  y, new, y_eval = got["sequential"]
  np.testing.assert_allclose(y, _np_bn_train(x, p["scale"], p["bias"], red), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(new["mean"], r_mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], r_var, rtol=1e-5)
  np.testing.assert_allclose(y_eval, (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"],
                             rtol=1e-4, atol=1e-4)
  y, new, _ = got["mean"]
  np.testing.assert_allclose(new["mean"], 0.9 * s["mean"] + 0.1 * bm.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new["var"], 0.9 * s["var"] + 0.1 * bv.mean(0), rtol=1e-5)


def test_task_batchnorm_synchronised_over_a_data_axis_equals_the_whole_batch():
  m = segnet.TaskBatchNorm(2, axis_name="data")
  plain = segnet.TaskBatchNorm(2)
  x = np.random.RandomState(2).normal(size=(2, 4, 3, 3, 5)).astype(np.float32)
  rng = np.random.RandomState(3)
  v = {"params": {"scale": rng.uniform(0.5, 1.5, (2, 5)).astype(np.float32),
                  "bias": rng.normal(size=(2, 5)).astype(np.float32)},
       "batch_stats": {"mean": np.zeros((2, 5), np.float32), "var": np.ones((2, 5), np.float32)}}

  @jax.jit
  def both(v, x):
    shards = x.reshape(2, 2, 2, 3, 3, 5).swapaxes(0, 1)  # [D, T, B/D, ...]
    ys, news = jax.vmap(lambda s: m.apply(v, s, True, mutable=["batch_stats"]), axis_name="data")(shards)
    y, new = plain.apply(v, x, True, mutable=["batch_stats"])
    return ys.swapaxes(0, 1).reshape(x.shape), jax.tree.map(lambda a: a[0], news), y, new
  ys, news, y, new = both(v, x)
  np.testing.assert_allclose(ys, y, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), news, new)


def test_xavier_normal_has_torchs_standard_deviation():
  # torch.nn.init.xavier_normal_: std = sqrt(2 / (fan_in + fan_out)), fans x receptive field.
  k = np.asarray(jax.jit(lambda key: segnet.xavier_normal(True)(key, (2, 3, 3, 64, 32)))(jax.random.key(3)))
  for row in k:
    assert abs(row.std() / np.sqrt(2 / (9 * 64 + 9 * 32)) - 1) < 0.03
    assert abs(row.mean()) < 0.003
  assert np.abs(k).max() > 3 * np.sqrt(2 / (9 * 64 + 9 * 32))  # untruncated (flax: 2 std)


# ---------------------------------------------------------------------------
# Parameter counts (eval_shape: no compile)

def _count(model):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), (288, 384, 3)))
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes["params"]))


def test_parameter_counts_are_the_mtan_codes():
  # Integers from the torch module definitions in lorenmt/mtan im2im_pred/
  # (count_parameters: conv weights + biases, BN weights + biases):
  # * model_segnet_single.py, 13-class semantic: 24,981,069 -- the constant the
  #   code divides by for its "REL" column.
  # * model_segnet_split.py (standard): shared SegNet 24,943,296 + heads
  #   (3x3 64->64 + 1x1 64->C) for C = 13, 1, 3: 25,055,188 with the code's 3
  #   logsigma parameters, 25,055,185 without (logsigma is a loss weighting here).
  # * model_segnet_mtan.py: 44,229,076 with logsigma, 44,229,073 without;
  #   44,229,076 / 24,981,069 = 1.77, the paper's MTAN row (Table 3, #P. 1.77).
  assert _count(segnet.make_segnet([NYU[0]], arch="split")) == 24_981_069
  assert _count(segnet.make_segnet(NYU, arch="split")) == 25_055_185
  assert _count(segnet.make_segnet(NYU, arch="mtan")) == 44_229_073
  assert round((44_229_073 + 3) / 24_981_069, 2) == 1.77


def test_layer_groups_partition_every_parameter_in_forward_order():
  for arch in segnet.ARCHS:
    model = segnet.make_segnet(NYU, arch=arch, widths=TINY)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), HW + (3,)))
    paths = [path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes["params"])]
    for p in paths:
      hits = [name for name, rx in model.layer_groups if re.fullmatch(rx, p)]
      assert len(hits) == 1, (p, hits)
    names = [n for n, _ in model.layer_groups]
    assert names[:10] == [f"encoder_{j}" for j in range(5)] + [f"decoder_{j}" for j in range(4, -1, -1)]
    assert names[-1] == "heads"
    assert len(names) == (21 if arch == "mtan" else 11)


def test_bad_input_is_one_line_naming_the_problem():
  cases = [
      (lambda: segnet.make_segnet([("d", "depth", 2)]), "depth head has 1 channel"),
      (lambda: segnet.make_segnet([("n", "normals", 1)]), "normals head has 3"),
      (lambda: segnet.make_segnet([("s", "segmentation", 1)]), ">= 2 classes"),
      (lambda: segnet.make_segnet([("c", "classification", 10)]), "no dense head"),
      (lambda: segnet.make_segnet([("a", "depth", 1), ("a", "normals", 3)]), "unique"),
      (lambda: segnet.make_segnet([]), "at least one task"),
      (lambda: segnet.make_segnet(NYU, arch="dense"), "arch must be one of"),
      (lambda: segnet.make_segnet(NYU, widths=(4, 8)), "5 positive integers"),
      (lambda: segnet.make_segnet(NYU, shared_update="last"), "shared_update"),
      (lambda: segnet.make_segnet(NYU, conv_impl="fft"), "conv_impl"),
      (lambda: segnet.make_segnet(NYU).init(jax.random.key(0), (16, 64, 3)), "at least 32x32"),
      (lambda: segnet.make_segnet(NYU).init(jax.random.key(0), (64, 64)), "[B, H, W, C]"),
      (lambda: jax.eval_shape(lambda: segnet.TaskBatchNorm(2).init(
          jax.random.key(0), jnp.zeros((2, 1, 1, 1, 3)), True)), "more than one value"),
  ]
  for f, text in cases:
    with pytest.raises(ValueError) as e:
      f()
    assert text in str(e.value) and "\n" not in str(e.value), str(e.value)


# ---------------------------------------------------------------------------
# The MTAN code itself (torch, float64; scripts/make_segnet_fixtures.py): its
# weights (numpy-seeded per state-dict key, so split's are MTAN's subset),
# input and outputs are the fast tier's model tests' data.

def _fixtures_module():
  spec = importlib.util.spec_from_file_location(
      "make_segnet_fixtures", os.path.join(ROOT, "scripts", "make_segnet_fixtures.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


_HEADS = {"pred_task1": "segmentation13", "pred_task2": "depth1", "pred_task3": "normals3"}
_BN = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


def torch_key_to_path(key):
  """A state-dict key of the MTAN code's SegNet -> (collection, path tuple,
  task row or None, kind of tensor). Read off the torch module definitions:
  ``encoder_block[j]`` is ``encoder_j/conv_0``; ``conv_block_enc[j]`` is
  ``conv_1`` (j < 2, one conv_layer) or ``conv_1``, ``conv_2`` (a Sequential of
  two); the decoder alike; ``encoder_att[t][j]`` is row t of
  ``attention/encoder_j_mask`` (Sequential: 0 conv, 1 BN, 3 conv, 4 BN);
  ``encoder_block_att[j]`` is ``attention/encoder_j_block``; ``pred_task<n>``
  the heads (0: 3x3 conv, 1: 1x1 conv)."""
  parts = key.split(".")
  leaf = parts[-1]
  coll = "batch_stats" if leaf.startswith("running") else "params"
  m = re.fullmatch(r"(encoder|decoder)_block\.(\d)\.(\d)\.\w+", key)
  if m:
    conv = ("shared", f"{m[1]}_{m[2]}", "conv_0")
    return coll, conv + (("kernel",) if leaf == "weight" and m[3] == "0" else
                         ("bias",) if m[3] == "0" else ("bn", _BN[leaf])), None
  m = re.fullmatch(r"conv_block_(enc|dec)\.(\d)\.(\d)(?:\.(\d))?\.\w+", key)
  if m:
    side = "encoder" if m[1] == "enc" else "decoder"
    i, sub = (1, m[3]) if m[4] is None else (int(m[3]) + 1, m[4])
    conv = ("shared", f"{side}_{m[2]}", f"conv_{i}")
    return coll, conv + (("kernel",) if leaf == "weight" and sub == "0" else
                         ("bias",) if sub == "0" else ("bn", _BN[leaf])), None
  m = re.fullmatch(r"(encoder|decoder)_att\.(\d)\.(\d)\.(\d)\.\w+", key)
  if m:
    base = ("tasks", "attention", f"{m[1]}_{m[3]}_mask")
    layer = {"0": "conv_0", "1": "bn_0", "3": "conv_1", "4": "bn_1"}[m[4]]
    if layer.startswith("conv"):
      return coll, base + (f"{layer}_{'kernel' if leaf == 'weight' else 'bias'}",), int(m[2])
    return coll, base + (layer, _BN[leaf]), int(m[2])
  m = re.fullmatch(r"(encoder|decoder)_block_att\.(\d)\.(\d)\.\w+", key)
  if m:
    base = ("tasks", "attention", f"{m[1]}_{m[2]}_block")
    return coll, base + (("kernel",) if leaf == "weight" and m[3] == "0" else
                         ("bias",) if m[3] == "0" else ("bn", _BN[leaf])), None
  m = re.fullmatch(r"(pred_task\d)\.(\d)\.\w+", key)
  assert m, key
  return coll, ("tasks", "heads", _HEADS[m[1]], f"conv_{m[2]}_{'kernel' if leaf == 'weight' else 'bias'}"), 0


def torch_to_variables(entries, shapes_tree):
  """``{key: array}`` of the torch state dict -> mtljax variables in
  ``shapes_tree``'s layout (conv weights OIHW -> HWIO, task rows stacked)."""
  flat = {}
  for key, value in entries.items():
    coll, path, row = torch_key_to_path(key)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)
    flat.setdefault((coll,) + path, {})[row] = value

  def build(path, s):
    rows = flat.pop(tuple(str(k.key) for k in path))
    if None in rows:
      a = rows[None]
    else:
      a = np.stack([rows[t] for t in range(len(rows))])
    assert a.shape == s.shape, (path, a.shape, s.shape)
    return a.astype(np.float32)
  out = jax.tree_util.tree_map_with_path(build, shapes_tree)
  assert not flat, sorted(flat)  # every torch entry used, every leaf filled
  return out



@pytest.fixture(scope="module")
def fx():
  mod = _fixtures_module()
  data = np.load(os.path.join(ROOT, "tests", "data", "segnet_mtan_torch.npz"))
  assert tuple(data["widths"]) == TINY and tuple(data["input_shape"]) == (B, 3) + HW
  return mod, data


@pytest.fixture(scope="module")
def mtan(fx):
  """The tiny MTAN and split models on the torch fixture's weights, and their
  jitted programs (one per mode and model, shared by the tests)."""
  mod, data = fx
  model = segnet.make_segnet(NYU, arch="mtan", widths=TINY, seg_log_softmax=True)
  split = segnet.make_segnet(NYU, arch="split", widths=TINY, seg_log_softmax=True)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), HW + (3,)))
  keys = [str(k) for k in data["mtan/keys"]]
  dims = [tuple(int(a) for a in str(s).split(",") if a) for s in data["mtan/shapes"]]
  v = torch_to_variables({k: mod.numpy_tensor(k, d) for k, d in zip(keys, dims)}, dict(shapes))
  att3 = segnet.MTANAttention(len(NYU), TINY)

  @jax.jit
  def forward(v, x):
    """Everything the tests run on one input, in one program: MTAN in train
    mode (``apply``; ``encode``, ``decode`` of its representation and the
    batched attention branches on it) and eval mode, the split model (on its
    variables inside MTAN's) in both modes. XLA's common-subexpression
    elimination shares what they compute alike (encode and decode within
    apply; the shared SegNet of split within MTAN's, in each mode), so this
    compiles in about the time of MTAN's two modes, where a program for each
    compiled the network again (and a worker ran several)."""
    out = model.apply(v, x, True)
    rep, s_enc = model.encode(v, x, True)
    att = {k: v[k]["tasks"]["attention"] for k in ("params", "batch_stats")}
    sv = _split_variables(v)
    return dict(train=out, encode=(rep, s_enc), decode=model.decode(v, rep, True),
                attention=att3.apply(att, rep, True, mutable=["batch_stats"]),
                eval=model.apply(v, x, False)[0],
                split=(split.apply(sv, x, False)[0], split.apply(sv, x, True)))
  programs = {k: (lambda v, x, k=k: forward(v, x)[k])
              for k in ("train", "encode", "decode", "attention", "eval")}
  programs["split"] = lambda sv, x: forward(_split_inside(sv, v), x)["split"]
  programs["all"] = forward
  return model, split, v, programs


@pytest.fixture(scope="module")
def images(fx):
  """[3, B, H, W, 3]: the torch fixture's input, then two more."""
  x = fx[0].numpy_input().transpose(0, 2, 3, 1)
  more = np.random.RandomState(5).normal(size=(2, B) + HW + (3,))
  return np.concatenate([x[None], more]).astype(np.float32)


def _split_inside(sv, v):
  """MTAN's variables ``v`` with the split model's ``sv`` in their place (the
  fixture's one program takes MTAN's and runs split on its subset)."""
  params = {"shared": sv["params"]["shared"],
            "tasks": {**v["params"]["tasks"], "heads": sv["params"]["tasks"]["heads"]}}
  return {"params": params, "batch_stats": {**v["batch_stats"], "shared": sv["batch_stats"]["shared"]}}


def _split_variables(v):
  """The split model's variables inside MTAN's: the shared SegNet and the heads."""
  return {"params": {"shared": v["params"]["shared"], "tasks": {"heads": v["params"]["tasks"]["heads"]}},
          "batch_stats": {"shared": v["batch_stats"]["shared"]}}


def test_forward_and_running_statistics_match_the_mtan_codes_torch_models(fx, mtan, images):
  _, data = fx
  model, split, v, run = mtan
  sv = _split_variables(v)
  got = {"mtan": (run["eval"](v, images[0]), run["train"](v, images[0])),
         "split": run["split"](sv, images[0])}
  st = fx[0].STRIDE
  for arch in segnet.ARCHS:
    out_eval, (out_train, new_stats) = got[arch]
    for name in ("seg", "depth", "normal"):
      for mode, out in (("eval", out_eval), ("train", out_train)):
        want = data[f"{arch}/{mode}/{name}"]
        np.testing.assert_allclose(np.asarray(out[name])[:, ::st, ::st], want, rtol=2e-4, atol=2e-4,
                                   err_msg=f"{arch} {mode} {name}")
    stats = {k[len(arch) + 7:]: data[k] for k in data.files if k.startswith(f"{arch}/stats/")}
    want = torch_to_variables(stats, {"batch_stats": jax.eval_shape(lambda: new_stats)})["batch_stats"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), new_stats, want)


def test_forward_shapes_per_task_and_unit_normals(mtan, images):
  model, split, v, run = mtan
  out, _ = run["train"](v, images[1])
  for o in (out, run["eval"](v, images[1])):
    assert {k: a.shape for k, a in o.items()} == {n: (B,) + HW + (c,) for n, _, c in NYU}
    np.testing.assert_allclose(np.linalg.norm(o["normal"], axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(np.exp(o["seg"]).sum(-1), 1, rtol=1e-5)  # log_softmax
    assert all(np.isfinite(a).all() for a in o.values())


def test_shapes_at_any_size_from_32_and_any_widths_without_compiling():
  # Odd sizes (40 -> 20 -> 10 -> 5 -> 2 -> 1; 80 -> ... -> 5 -> 2) and widths
  # with f_3 != f_4 (the code's MTAN cannot): traced with eval_shape.
  for arch, hw in (("mtan", (32, 40)), ("mtan", (64, 80)), ("split", (33, 35))):
    model = segnet.make_segnet(NYU, arch=arch, widths=(4, 6, 8, 10, 12))

    def f(model=model, hw=hw):
      v = model.init(jax.random.key(0), hw + (3,))
      return model.apply(v, jnp.zeros((B,) + hw + (3,)), True)
    out, _ = jax.eval_shape(f)
    assert {k: a.shape for k, a in out.items()} == {n: (B,) + hw + (c,) for n, _, c in NYU}


def test_train_mode_uses_the_batch_and_eval_mode_the_running_statistics(mtan, images):
  model, split, v, run = mtan
  x0, x1, x2 = images
  pair_a = np.stack([x0[0], x1[0]])
  pair_b = np.stack([x0[0], x2[0]])
  # Eval: example 0's outputs do not depend on the rest of the batch.
  ea, eb = run["eval"](v, pair_a), run["eval"](v, pair_b)
  for k in ea:
    np.testing.assert_allclose(np.asarray(ea[k])[0], np.asarray(eb[k])[0], rtol=1e-5, atol=1e-6)
  # Train: they do (batch statistics), and differ from eval's.
  ta, new = run["train"](v, pair_a)
  tb, _ = run["train"](v, pair_b)
  ta, tb, ea = (np.asarray(o["depth"])[0] for o in (ta, tb, ea))
  assert not np.allclose(ta, tb, atol=1e-3)
  assert not np.allclose(ta, ea, atol=1e-3)
  # The first layer's running statistics: torch's update from a numpy convolution.
  p = v["params"]["shared"]["encoder_0"]["conv_0"]
  s = v["batch_stats"]["shared"]["encoder_0"]["conv_0"]["bn"]
  z = np_conv3x3(np.asarray(pair_a, np.float64), np.asarray(p["kernel"], np.float64), np.asarray(p["bias"]))
  n = z[..., 0].size
  got = new["shared"]["encoder_0"]["conv_0"]["bn"]
  np.testing.assert_allclose(got["mean"], 0.9 * np.asarray(s["mean"]) + 0.1 * z.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(got["var"], 0.9 * np.asarray(s["var"]) + 0.1 * z.var((0, 1, 2)) * n / (n - 1), rtol=1e-4)
  # Every running statistic moved.
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), new, v["batch_stats"])
  assert all(jax.tree.leaves(moved))


def test_mtan_with_attention_masks_forced_to_one_is_the_split_model(mtan, images):
  # With every mask = 1 the attended features are the shared features (the
  # decoder's last mask multiplies d_0), so each head reads d_0 as in split;
  # and split's heads are numpy convolutions of d_0.
  model, split, v, run = mtan
  sv = _split_variables(v)
  assert jax.tree.structure(sv) == jax.tree.structure(
      jax.eval_shape(lambda: split.init(jax.random.key(0), HW + (3,))))

  def force(path, a):  # the masks' last BN: scale 0, shift 50 -> sigmoid(50) = 1.0 in float32
    p = path_str(path)
    if re.search(r"_mask/bn_1/scale$", p):
      return np.zeros_like(a)
    if re.search(r"_mask/bn_1/bias$", p):
      return np.full_like(a, 50.0)
    return a
  forced = {"params": jax.tree_util.tree_map_with_path(force, v["params"]), "batch_stats": v["batch_stats"]}
  out, new = run["train"](forced, images[1])
  _, (out_split, new_split) = run["split"](sv, images[1])
  for k in out:
    np.testing.assert_allclose(out[k], out_split[k], rtol=1e-4, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new["shared"], new_split["shared"])
  d0 = np.asarray(run["encode"](v, images[1])[0]["d"][0], np.float64)
  h = v["params"]["tasks"]["heads"]["depth1"]
  z = np_conv3x3(d0, h["conv_0_kernel"][0].astype(np.float64), h["conv_0_bias"][0])
  np.testing.assert_allclose(out_split["depth"], z @ h["conv_1_kernel"][0, 0, 0] + h["conv_1_bias"][0],
                             rtol=1e-4, atol=1e-4)
  # Not vacuous: the model's own masks change the outputs.
  out_own, _ = run["train"](v, images[1])
  assert not np.allclose(out_own["seg"], out_split["seg"], atol=1e-3)


def test_heads_of_one_kind_are_stacked_and_read_their_own_rows():
  # Two depth tasks around a segmentation task: group depth1 stacks rows
  # (d1, d2) = task rows (0, 2). On a shared [B, H, W, C] input (split: one
  # convolution with the kernels concatenated) and on per-task [T, B, H, W, C]
  # input (MTAN: rows gathered), against numpy convolutions.
  specs = tuple(segnet.HeadSpec(*s) for s in (("d1", "depth", 1), ("s", "segmentation", 3),
                                               ("d2", "depth", 1)))
  heads = segnet.Heads(specs, normalize_normals=False)
  rng = np.random.RandomState(8)
  shared = rng.normal(size=(B, 5, 6, 4)).astype(np.float32)
  per_task = rng.normal(size=(3, B, 5, 6, 4)).astype(np.float32)
  shapes = jax.eval_shape(lambda: heads.init(jax.random.key(0), shared))
  params = jax.tree.map(lambda s: rng.normal(0, 0.5, s.shape).astype(np.float32), shapes)
  out_shared, out_task = jax.jit(lambda p: (heads.apply(p, shared), heads.apply(p, per_task)))(params)
  h = params["params"]
  for name, group, r, t in (("d1", "depth1", 0, 0), ("s", "segmentation3", 0, 1), ("d2", "depth1", 1, 2)):
    g = h[group]
    for out, x in ((out_shared, shared), (out_task, per_task[t])):
      z = np_conv3x3(x.astype(np.float64), g["conv_0_kernel"][r].astype(np.float64), g["conv_0_bias"][r])
      np.testing.assert_allclose(out[name], z @ g["conv_1_kernel"][r, 0, 0] + g["conv_1_bias"][r],
                                 rtol=1e-4, atol=1e-4, err_msg=name)


def test_batched_attention_branches_equal_one_task_branches_run_alone(mtan, images):
  # All tasks' branches in one batched computation == each task's branch alone
  # (row t of the stacked parameters); the shared blocks' running statistics ==
  # torch's, the one-task module applied to the tasks in order.
  model, split, v, run = mtan
  # The batched branches (MTANAttention(3) on the attention variables) run in
  # the fixture's program, on the representation it encodes.
  both = run["all"](v, images[2])
  rep = both["encode"][0]
  a3, new3 = both["attention"]
  att = {k: v[k]["tasks"]["attention"] for k in ("params", "batch_stats")}
  t_all = len(NYU)
  run1 = jax.jit(lambda a, r: segnet.MTANAttention(1, TINY).apply(a, r, True, mutable=["batch_stats"]))

  def row(t, stats_now):
    def pick(path, a):
      return np.asarray(a)[t:t + 1] if "_mask/" in path_str(path) else a
    return {"params": jax.tree_util.tree_map_with_path(pick, att["params"]),
            "batch_stats": jax.tree_util.tree_map_with_path(pick, stats_now)}
  stats_now = att["batch_stats"]
  for t in range(t_all):
    a1, new1 = run1(row(t, stats_now), rep)
    np.testing.assert_allclose(np.asarray(a1)[0], np.asarray(a3)[t], rtol=1e-4, atol=1e-5)
    # Chain the shared blocks' statistics through the tasks, torch's order.
    stats_now = jax.tree_util.tree_map_with_path(
        lambda path, s, n: n if "_block/" in path_str(path) else s, stats_now, new1["batch_stats"])
    masks = {k: s for k, s in new3["batch_stats"].items() if k.endswith("_mask")}
    mine = {k: s for k, s in new1["batch_stats"].items() if k.endswith("_mask")}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a)[t:t + 1], b, rtol=1e-5, atol=1e-6),
                 masks, mine)
  blocks = lambda s: {k: x for k, x in s.items() if k.endswith("_block")}  # noqa: E731
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               blocks(new3["batch_stats"]), blocks(stats_now))


def test_encode_then_decode_is_apply(mtan, images):
  model, split, v, run = mtan
  # encode, decode (of encode's representation) and apply, all three in the
  # fixture's program.
  both = run["all"](v, images[0])
  rep, s_enc = both["encode"]
  out, s_dec = both["decode"]
  want, new = both["train"]
  for k in want:
    np.testing.assert_allclose(out[k], want[k], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s_enc["shared"], new["shared"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s_dec["tasks"], new["tasks"])
  assert set(rep) == {"e0", "e1", "u", "d"} and rep["d"][0].shape == (B,) + HW + (TINY[0],)


@pytest.mark.slow
def test_gradients_are_finite_and_nonzero_except_where_batch_norm_cancels_them(mtan, images):
  model, split, v, run = mtan
  w = {n: np.random.RandomState(7).normal(size=(B,) + HW + (c,)).astype(np.float32) for n, _, c in NYU}

  def loss(p):
    out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, images[2], True)
    return sum(jnp.sum(out[k] * w[k]) for k in w)
  g = jax.jit(jax.grad(loss))(v["params"])
  flat = {path_str(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(g)}
  # A conv bias feeding a batch norm has gradient 0 in train mode (the norm
  # subtracts the batch mean); every other parameter moves the loss.
  before_bn = re.compile(r"(conv_\d+|_block)/bias$|_mask/conv_\d_bias$")
  for p, a in flat.items():
    assert np.isfinite(a).all(), p
    if before_bn.search(p):
      kernel = flat[p[:-len("bias")] + "kernel"]
      assert np.abs(a).max() < 1e-3 * np.abs(kernel).max(), p
    else:
      assert (np.abs(a) > 0).mean() > 0.5, p
  assert len(flat) > 150


# ---------------------------------------------------------------------------
# Slow tier: the paper's widths at 288x384.

@pytest.mark.slow
@pytest.mark.parametrize("arch", segnet.ARCHS)
def test_full_width_forward_at_288x384_and_init_as_torch(arch):
  model = segnet.make_segnet(NYU, arch=arch)

  @jax.jit
  def init_and_train_forward(key, x):  # one program: init, then a train-mode forward
    v = model.init(key, (288, 384, 3))
    return v, model.apply(v, x, True)
  x = np.random.RandomState(0).normal(size=(1, 288, 384, 3)).astype(np.float32)
  v, (out, new) = init_and_train_forward(jax.random.key(0), x)
  assert sum(a.size for a in jax.tree.leaves(v["params"])) == (25_055_185 if arch == "split" else 44_229_073)
  k = np.asarray(v["params"]["shared"]["encoder_3"]["conv_1"]["kernel"])  # [3, 3, 512, 512]
  assert abs(k.std() / np.sqrt(2 / (2 * 9 * 512)) - 1) < 0.01
  assert all(np.all(np.asarray(a) == 0) for p, a in jax.tree_util.tree_leaves_with_path(v["params"])
             if path_str(p).endswith("/bias") and "/bn/" not in path_str(p))
  assert {k: a.shape for k, a in out.items()} == {n: (1, 288, 384, c) for n, _, c in NYU}
  assert all(np.isfinite(np.asarray(a)).all() for a in out.values())
  np.testing.assert_allclose(np.linalg.norm(out["normal"], axis=-1), 1, rtol=1e-5)
  assert jax.tree.structure(new) == jax.tree.structure(v["batch_stats"])
