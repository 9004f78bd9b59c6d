"""Backbone layers and models (issue 26) against float64 numpy written from
the definitions (torch's Conv2d / BatchNorm2d / GroupNorm / interpolate
documentation, torchvision's and LibMTL's model code), with small shapes and
one jitted program per thing under test."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax.models.backbones import layers

# ----------------------------------------------------------------------------
# numpy references


def np_conv(x, k, stride, dilation, pad):
  """float64 NHWC/HWIO convolution from the index formula: y[b, u, v, f] =
  sum_{i,j,c} xp[b, s*u + d*i, s*v + d*j, c] k[i, j, c, f]."""
  (sh, sw), (dh, dw) = stride, dilation
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  kh, kw = k.shape[:2]
  ho = (xp.shape[1] - dh * (kh - 1) - 1) // sh + 1
  wo = (xp.shape[2] - dw * (kw - 1) - 1) // sw + 1
  u, v = np.arange(ho), np.arange(wo)
  y = np.zeros((x.shape[0], ho, wo, k.shape[3]))
  for i in range(kh):
    for j in range(kw):
      rows, cols = sh * u + dh * i, sw * v + dw * j
      y += np.einsum("buvc,cf->buvf", xp[:, rows][:, :, cols], k[i, j])
  return y


def np_batchnorm_train(x, scale, bias, eps=1e-5):
  """torch BatchNorm2d in training: biased batch variance to normalise."""
  mu = x.mean((0, 1, 2))
  var = x.var((0, 1, 2))
  return (x - mu) / np.sqrt(var + eps) * scale + bias, mu, x.var((0, 1, 2), ddof=1)


def np_interp(x, size, align_corners):
  """torch's bilinear interpolate, per output pixel from its source coordinate."""
  def coords(n_in, n_out):
    o = np.arange(n_out)
    if align_corners:
      src = o * (n_in - 1) / (n_out - 1) if n_out > 1 else 0 * o
    else:
      src = np.clip((o + 0.5) * n_in / n_out - 0.5, 0, None)
    lo = np.floor(src).astype(int)
    lo = np.minimum(lo, n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), src - lo
  y0, y1, fy = coords(x.shape[1], size[0])
  x0, x1, fx = coords(x.shape[2], size[1])
  fy, fx = fy[None, :, None, None], fx[None, None, :, None]
  top = x[:, y0][:, :, x0] * (1 - fx) + x[:, y0][:, :, x1] * fx
  bot = x[:, y1][:, :, x0] * (1 - fx) + x[:, y1][:, :, x1] * fx
  return top * (1 - fy) + bot * fy


# ----------------------------------------------------------------------------
# convolution

CONV_CASES = [  # (kernel, stride, dilation, padding ((lo, hi), (lo, hi)))
    ((3, 3), (1, 1), (1, 1), ((1, 1), (1, 1))),
    ((3, 3), (2, 2), (2, 2), ((2, 2), (2, 2))),   # a dilated, strided 3x3
    ((7, 7), (2, 2), (1, 1), ((3, 3), (3, 3))),   # the ResNet stem
    ((1, 1), (2, 2), (1, 1), ((0, 0), (0, 0))),   # a downsample projection
    ((3, 2), (1, 2), (3, 1), ((0, 2), (1, 0))),   # uneven everything
]


@functools.lru_cache(maxsize=None)
def _conv_both(kernel_shape, stride, dilation, pad):
  """One program per case: both impls, their values and their VJPs."""
  def f(x, k, ct):
    outs = []
    for impl in ("im2col", "lax"):
      y, vjp = jax.vjp(lambda x, k: layers.conv2d(
          x, k, stride=stride, dilation=dilation, padding=pad, impl=impl), x, k)
      outs.append((y, vjp(ct)))
    return outs
  return jax.jit(f)


@pytest.mark.parametrize("kernel, stride, dilation, pad", CONV_CASES)
def test_conv_impls_match_numpy_and_each_others_gradients(kernel, stride, dilation, pad):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 9, 11, 3))
  k = rng.normal(size=kernel + (3, 4))
  want = np_conv(x, k, stride, dilation, pad)
  ct = rng.normal(size=want.shape)
  (y_i, g_i), (y_l, g_l) = _conv_both(kernel, stride, dilation, pad)(
      np.float32(x), np.float32(k), np.float32(ct))
  np.testing.assert_allclose(y_i, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y_l, want, rtol=1e-4, atol=1e-4)
  for a, b in zip(g_i, g_l):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  # the kernel's gradient is the correlation of x with the cotangent
  gk = np.zeros_like(k)
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  ho, wo = want.shape[1:3]
  for i in range(kernel[0]):
    for j in range(kernel[1]):
      rows = stride[0] * np.arange(ho) + dilation[0] * i
      cols = stride[1] * np.arange(wo) + dilation[1] * j
      gk[i, j] = np.einsum("buvc,buvf->cf", xp[:, rows][:, :, cols], ct)
  np.testing.assert_allclose(g_i[1], gk, rtol=1e-4, atol=1e-3)


def test_conv_impl_choice_and_bad_input():
  assert layers.resolve_conv_impl("auto", "cpu") == "im2col"
  assert layers.resolve_conv_impl("auto", "gpu") == "lax"
  assert layers.resolve_conv_impl("auto", "tpu") == "lax"
  assert layers.resolve_conv_impl("lax", "cpu") == "lax"
  with pytest.raises(ValueError, match="conv_impl must be one of"):
    layers.resolve_conv_impl("cudnn")
  x, k = np.zeros((1, 5, 5, 3), np.float32), np.zeros((3, 3, 4, 2), np.float32)
  with pytest.raises(ValueError, match="only groups=1"):
    layers.conv2d(x, k)
  with pytest.raises(ValueError, match="smaller than the dilated"):
    layers.conv2d(x, np.zeros((3, 3, 3, 2), np.float32), dilation=4)
  with pytest.raises(ValueError, match="stride must be a positive"):
    layers.conv2d(x, np.zeros((3, 3, 3, 2), np.float32), stride=0)
  with pytest.raises(ValueError, match="norm must be one of"):
    layers.norm_layer("layer")


def test_conv_module_default_padding_keeps_size_and_uses_torch_init():
  m = layers.Conv(64, 3, dilation=2)
  x = np.zeros((1, 6, 7, 8), np.float32)
  shapes = jax.eval_shape(m.init, jax.random.key(0), x)
  assert shapes["params"]["kernel"].shape == (3, 3, 8, 64)
  assert jax.eval_shape(m.apply, shapes, x).shape == (1, 6, 7, 64)
  # kaiming_normal_(mode="fan_out"): std sqrt(2 / (3*3*C_out)), with numpy draws' scale
  k = np.asarray(layers.torch_kaiming_normal_fan_out(jax.random.key(0), (3, 3, 256, 256)))
  assert abs(k.std() / np.sqrt(2 / (9 * 256)) - 1) < 0.01


# ----------------------------------------------------------------------------
# batch norm and group norm


class _BNNet(nn.Module):
  """Two batch norms in sequence, the second synchronised when axis_name is set."""
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train):
    h = layers.BatchNorm(axis_name=self.axis_name, name="bn0")(x, train)
    return layers.BatchNorm(axis_name=self.axis_name, name="bn1")(h * 2.0 + 1.0, train)


@functools.lru_cache(maxsize=None)
def _bn_programs():
  net = _BNNet()

  @jax.jit
  def train_two_steps(variables, x1, x2):
    y1, s1 = net.apply(variables, x1, True, mutable=["batch_stats"])
    y2, s2 = net.apply({**variables, **s1}, x2, True, mutable=["batch_stats"])
    ev = net.apply({**variables, **s2}, x1, False)
    return y1, y2, s2["batch_stats"], ev, s1["batch_stats"]

  sync = _BNNet(axis_name="data")

  @jax.jit
  def sync_step(variables, xs):  # xs [D, B, H, W, C]
    return jax.vmap(lambda x: sync.apply(variables, x, True, mutable=["batch_stats"]),
                    axis_name="data")(xs)

  return net, train_two_steps, sync_step


def _bn_variables(c, rng):
  p = {f"bn{i}": {"scale": np.float32(rng.uniform(0.5, 1.5, c)),
                  "bias": np.float32(rng.normal(size=c))} for i in range(2)}
  s = {f"bn{i}": {"mean": np.float32(rng.normal(size=c)),
                  "var": np.float32(rng.uniform(0.5, 2, c))} for i in range(2)}
  return {"params": p, "batch_stats": s}


def test_batchnorm_train_eval_and_running_averages_follow_torch():
  rng = np.random.default_rng(1)
  v = _bn_variables(3, rng)
  x1 = rng.normal(2.0, 3.0, size=(4, 3, 5, 3))
  x2 = rng.normal(-1.0, 0.5, size=(4, 3, 5, 3))
  _, train_two_steps, _ = _bn_programs()
  y1, y2, stats, ev, _ = train_two_steps(v, np.float32(x1), np.float32(x2))

  # torch.nn.BatchNorm2d docs: train mode normalises with the biased batch
  # variance; running = (1 - 0.1) running + 0.1 batch, the variance unbiased.
  p = {k: {a: np.float64(b) for a, b in d.items()} for k, d in v["params"].items()}
  ra = {k: {a: np.float64(b) for a, b in d.items()} for k, d in v["batch_stats"].items()}
  outs = []
  for x in (x1, x2):
    h = x
    for name, pre in (("bn0", lambda h: h), ("bn1", lambda h: h * 2.0 + 1.0)):
      h, mu, var_u = np_batchnorm_train(pre(h), p[name]["scale"], p[name]["bias"])
      ra[name]["mean"] = 0.9 * ra[name]["mean"] + 0.1 * mu
      ra[name]["var"] = 0.9 * ra[name]["var"] + 0.1 * var_u
    outs.append(h)
  np.testing.assert_allclose(y1, outs[0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y2, outs[1], rtol=1e-4, atol=1e-4)
  for name in ("bn0", "bn1"):
    for a in ("mean", "var"):
      np.testing.assert_allclose(stats[name][a], ra[name][a], rtol=1e-5, atol=1e-6)
  # eval mode: the running averages, not the batch's statistics
  h = x1
  for name, pre in (("bn0", lambda h: h), ("bn1", lambda h: h * 2.0 + 1.0)):
    h = ((pre(h) - ra[name]["mean"]) / np.sqrt(ra[name]["var"] + 1e-5)
         * p[name]["scale"] + p[name]["bias"])
  np.testing.assert_allclose(ev, h, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(ev) - np.asarray(y1)).max() > 0.1


def test_sync_batchnorm_under_vmap_equals_batchnorm_on_the_concatenated_batch():
  rng = np.random.default_rng(2)
  v = _bn_variables(3, rng)
  xs = np.float32(rng.normal(1.0, 2.0, size=(4, 2, 3, 5, 3)))  # 4 "devices" x 2 examples
  _, train_two_steps, sync_step = _bn_programs()
  ys, stats = sync_step(v, xs)
  y_all, _, _, _, s1 = train_two_steps(v, xs.reshape(8, 3, 5, 3), xs.reshape(8, 3, 5, 3))
  np.testing.assert_allclose(np.asarray(ys).reshape(8, 3, 5, 3), y_all, rtol=1e-5, atol=1e-5)
  # the running averages after one step, equal on every device and to the big batch's
  for name in ("bn0", "bn1"):
    for a in ("mean", "var"):
      got = np.asarray(stats["batch_stats"][name][a])
      np.testing.assert_allclose(got, np.broadcast_to(got[0], got.shape), rtol=1e-6)
      np.testing.assert_allclose(got[0], s1[name][a], rtol=1e-5, atol=1e-6)


def test_batchnorm_init_leaves_running_averages_at_zero_and_one():
  v = jax.jit(_BNNet().init, static_argnums=2)(jax.random.key(0), np.ones((2, 2, 2, 3), np.float32),
                                              True)
  np.testing.assert_array_equal(v["batch_stats"]["bn0"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["bn1"]["var"], np.ones(3))


def test_groupnorm_matches_torch_definition():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 4, 8)) * 3 + 1
  scale, bias = rng.uniform(0.5, 1.5, 8), rng.normal(size=8)
  gn = layers.GroupNorm(num_groups=4)
  got = jax.jit(gn.apply)({"params": {"scale": np.float32(scale), "bias": np.float32(bias)}},
                         np.float32(x))
  g = x.reshape(2, 3, 4, 4, 2)
  mu = g.mean((1, 2, 4), keepdims=True)
  var = g.var((1, 2, 4), keepdims=True)
  want = ((g - mu) / np.sqrt(var + 1e-5)).reshape(x.shape) * scale + bias
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="do not split into"):
    layers.GroupNorm(num_groups=3).init(jax.random.key(0), np.float32(x))


# ----------------------------------------------------------------------------
# resizing


@pytest.mark.parametrize("align_corners", [True, False])
def test_resize_bilinear_matches_torch_formula(align_corners):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(2, 4, 5, 2))
  x[1] = np.arange(4.0)[:, None, None]  # a linear ramp down the rows
  sizes = ((7, 11), (2, 3), (1, 1))
  outs = jax.jit(lambda x: [layers.resize_bilinear(x, s, align_corners=align_corners)
                            for s in sizes])(np.float32(x))
  for size, got in zip(sizes, outs):
    np.testing.assert_allclose(got, np_interp(x, size, align_corners), rtol=1e-5, atol=1e-5)
  if align_corners:  # the ramp is reproduced exactly, corners pinned
    np.testing.assert_allclose(outs[0][1, :, 3, 0], np.linspace(0, 3, 7), atol=1e-6)


# ----------------------------------------------------------------------------
# ResNet and the DeepLab head (their values against torchvision / LibMTL are in
# tests/test_pretrained.py)

from mtljax.models.backbones import resnet  # noqa: E402


@pytest.mark.parametrize("depth, width, n_params", [
    (18, 512, 11_689_512), (34, 512, 21_797_672), (50, 2048, 25_557_032)])
def test_resnet_stage_shapes_per_output_stride_and_torchvisions_parameter_counts(
    depth, width, n_params):
  """Stage shapes at output strides 8, 16, 32, and the parameter count (the
  same at every output stride) equal to torchvision's documented num_params
  (fc to 1000 classes; BN scale and shift counted, running statistics not)."""
  x = np.zeros((2, 64, 96, 3), np.float32)
  expansion = width // 512
  for os_ in (8, 16, 32):
    m = resnet.ResNet(depth, output_stride=os_, num_classes=1000)
    out, v = jax.eval_shape(functools.partial(m.init_with_output, train=False),
                            jax.random.key(0), x)
    want = {"stem": (16, 24, 64), "layer1": (16, 24, 64 * expansion),
            "layer2": (8, 12, 128 * expansion),
            "layer3": (64 // min(16, os_), 96 // min(16, os_), 256 * expansion),
            "layer4": (64 // os_, 96 // os_, width), "logits": (1000,)}
    assert {k: o.shape[1:] for k, o in out.items()} == want
    assert set(v) == {"params", "batch_stats"}
    assert sorted(v["params"]) == sorted(resnet.STAGES + ("fc",))
    assert sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"])) == n_params


def _fixture_script():
  import importlib.util
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "scripts", "make_torchvision_fixtures.py")
  spec = importlib.util.spec_from_file_location("make_torchvision_fixtures", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


class _FakeConv:
  """What LibMTL's _nostride_dilate reads and writes on a torch Conv2d."""

  def __init__(self, k, stride):
    self.kernel_size, self.stride = (k, k), (stride, stride)
    self.dilation, self.padding = (1, 1), ((k - 1) // 2,) * 2


_FakeConv.__name__ = "Conv2d"


@pytest.mark.parametrize("kind, blocks", [("basic", 2), ("basic", 6), ("bottleneck", 3)])
def test_stage_dilations_are_libmtls_nostride_dilate(kind, blocks):
  """LibMTL's own function (copied into the fixture script) applied to a
  torchvision stage's convolutions gives the dilations the model uses."""
  fx = _fixture_script()
  for dilate in (2, 4):
    convs = []  # per block, its 3x3 convolutions (basic: conv1, conv2; bottleneck: conv2)
    for i in range(blocks):
      s = 2 if i == 0 else 1
      block = ([_FakeConv(3, s), _FakeConv(3, 1)] if kind == "basic" else
               [_FakeConv(1, 1), _FakeConv(3, s), _FakeConv(1, 1)])
      if i == 0:
        block.append(_FakeConv(1, 2))  # downsample.0
      for c in block:
        fx._nostride_dilate(c, dilate)
      assert all(c.stride == (1, 1) for c in block)
      assert all(c.dilation == (1, 1) for c in block if c.kernel_size == (1, 1))
      convs.append(tuple(c.dilation[0] for c in block if c.kernel_size == (3, 3)))
      assert all(c.padding == c.dilation for c in block if c.kernel_size == (3, 3))
    assert resnet.stage_dilations(kind, blocks, dilate) == tuple(convs)


def test_resnet_init_and_options():
  # zero_init_residual: the last BN of a block starts at scale 0 (torchvision's option)
  cases = [("basic", "bn2", True), ("bottleneck", "bn3", True)]  # bn1: the default ones
  inits = jax.jit(lambda key, x: [resnet._Block(
      kind, 8, 2, (1, 1), downsample=True, zero_init_residual=zero, conv_impl="lax").init(
          key, x)["params"]
      for kind, _, zero in cases])(jax.random.key(0), np.zeros((1, 4, 4, 16), np.float32))
  for (kind, last, zero), v in zip(cases, inits):
    np.testing.assert_array_equal(v[last]["scale"], np.full(8 * resnet.EXPANSION[kind],
                                                            0.0 if zero else 1.0))
    np.testing.assert_array_equal(v["bn1"]["scale"], np.ones(8))
  # group norm: no batch statistics, the same parameter names
  g = jax.eval_shape(resnet.ResNet(50, norm="group").init, jax.random.key(0),
                     np.zeros((1, 32, 32, 3), np.float32))
  assert set(g) == {"params"} and set(g["params"]["stem"]["bn1"]) == {"scale", "bias"}
  x = np.zeros((1, 32, 32, 3), np.float32)
  for bad, match in ((dict(depth=101), "depth must be one of"),
                     (dict(output_stride=4), "output_stride must be one of"),
                     (dict(conv_impl="fft"), "conv_impl must be one of"),
                     (dict(norm="group", axis_name="data"), "no cross-device statistics")):
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(resnet.ResNet(**bad).init, jax.random.key(0), x)
  with pytest.raises(ValueError, match=r"images \[B, H, W, 3\]"):
    jax.eval_shape(resnet.ResNet(18).init, jax.random.key(0), x[..., :1])
  with pytest.raises(ValueError, match="more than one value per channel"):
    jax.eval_shape(functools.partial(resnet.DeepLabHead(3).init, train=True),
                   jax.random.key(0), x[:, :4, :4])
  with pytest.raises(ValueError, match="dropout must be in"):
    jax.eval_shape(resnet.DeepLabHead(3, dropout=1.0).init, jax.random.key(0), x)


@pytest.mark.slow
def test_im2col_and_lax_agree_on_a_dilated_resnet_with_head_values_and_gradients():
  """The whole ResNet-18 OS8 + ASPP head, both convolution implementations:
  train-mode outputs and new running averages, and eval-mode parameter
  gradients, equal up to float32 rounding. (Train-mode gradients are not
  compared: there XLA:CPU's convolution gradient of layer4's projection is
  4 % off the float64 one while im2col's is within 1e-5 --
  experiments/conv_grad_accuracy.py, docs/notes/backbones-resnet.md.)"""
  x = np.float32(np.random.default_rng(5).normal(size=(2, 40, 48, 3)))
  nets = {impl: (resnet.ResNet(18, output_stride=8, conv_impl=impl),
                 resnet.DeepLabHead(3, dropout=0.0, conv_impl=impl)) for impl in ("im2col", "lax")}
  net, head = nets["lax"]
  v = jax.jit(net.init)(jax.random.key(0), x)
  hv = jax.jit(head.init)(jax.random.key(1), np.zeros((2, 5, 6, 512), np.float32))

  def run(impl, p, hp):
    n, h = nets[impl]
    out, s = n.apply({**v, "params": p}, x, True, mutable=["batch_stats"])
    y, hs = h.apply({**hv, "params": hp}, out["layer4"], True, out_size=(40, 48),
                    mutable=["batch_stats"])
    out_e = n.apply({**v, "params": p}, x, False)
    y_e = h.apply({**hv, "params": hp}, out_e["layer4"], False, out_size=(40, 48))
    return jnp.mean(jnp.square(y_e)), (y, s, hs)

  res = {impl: jax.jit(jax.value_and_grad(functools.partial(run, impl), argnums=(0, 1),
                                          has_aux=True))(v["params"], hv["params"])
         for impl in nets}
  (l_i, aux_i), g_i = res["im2col"]
  (l_l, aux_l), g_l = res["lax"]
  rel = lambda a, b: float(np.abs(np.asarray(a) - b).max() / (np.abs(np.asarray(b)).max() + 1e-30))  # noqa: E731
  assert rel(l_i, l_l) < 1e-5
  assert max(jax.tree.leaves(jax.tree.map(rel, aux_i, aux_l))) < 1e-4
  assert max(jax.tree.leaves(jax.tree.map(rel, g_i, g_l))) < 1e-4
