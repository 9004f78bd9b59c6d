"""The ViT encoder and its Hugging Face import (issue 26).

References:

* the forward against a float64 numpy re-computation written from the
  paper's equations 1-4 (Dosovitskiy et al. 2021), on random weights and a
  non-square one-channel image (the bundled task's layout);
* the import against Hugging Face ``transformers.ViTModel``'s float64 outputs,
  stored by ``scripts/make_vit_fixtures.py`` (``tests/data/vit_tiny``: a tiny
  random model as ``model.safetensors`` + ``config.json``, its outputs on
  fixed inputs), and live when torch and transformers import (not in CI);
* bad checkpoints: one-line errors naming the keys / fields;
* fine-tuning addresses the layer groups by name: a frozen ``embeddings``
  group is bitwise unchanged after a step, every other parameter moves;
* slow: the bundled patch-classification config (``multi_digits.py:vit_quick``)
  beats chance, and a run initialised from an HF-layout file with the trunk
  frozen (a linear probe) keeps the file's values bitwise.

Compile requests of the fast tier: 3 (the two forwards and one train step).
"""

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest
from scipy.special import erf

from experiments.configs import multi_digits
from mtljax import build
from mtljax import optim
from mtljax import params as params_lib
from mtljax import pretrained
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.errors import CheckpointError, ConfigError
from mtljax.models import multitask
from mtljax.models.backbones import vit

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "vit_tiny")
WEIGHTS = os.path.join(DATA, "model.safetensors")


# ----------------------------------------------------------------------------
# the paper's equations in float64 numpy


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _lin(x, p):
  return x @ p["kernel"] + p["bias"]


def numpy_vit(params, x, heads, patch, eps):
  """Eqs. 1-4 over mtljax's parameter tree (float64): ``(tokens [B, N+1, D],
  y = LN(z_L^0) [B, D])``. The patch embedding is written as the
  convolution it is (a sum over each patch's pixels with the kernel read as
  ``[P, P, C, D]``), not as mtljax's reshape."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  if x.ndim == 3:
    x = x[..., None]
  b, h, w, c = x.shape
  e = p["embeddings"]
  d = e["cls_token"].shape[-1]
  kern = e["patch"]["kernel"].reshape(patch, patch, c, d)
  gh, gw = h // patch, w // patch
  emb = np.zeros((b, gh * gw, d))
  for i in range(gh):
    for j in range(gw):
      cell = x[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch, :]
      emb[:, i * gw + j] = np.einsum("bpqc,pqcd->bd", cell, kern) + e["patch"]["bias"]
  z = np.concatenate([np.broadcast_to(e["cls_token"], (b, 1, d)), emb], 1)
  z = z + e["position_embeddings"]                                        # eq. 1
  layer = 0
  while f"layer_{layer}" in p:
    lp = p[f"layer_{layer}"]
    hn = _ln(z, lp["layernorm_before"], eps)
    hd = d // heads
    out = np.zeros_like(z)
    for k in range(heads):  # MSA: per head softmax(q k^T / sqrt(D_h)) v
      sl = slice(k * hd, (k + 1) * hd)
      q, kk, v = (_lin(hn, lp[n])[..., sl] for n in ("query", "key", "value"))
      a = q @ kk.transpose(0, 2, 1) / np.sqrt(hd)
      a = np.exp(a - a.max(-1, keepdims=True))
      out[..., sl] = (a / a.sum(-1, keepdims=True)) @ v
    z = _lin(out, lp["output"]) + z                                       # eq. 2
    m = _lin(_ln(z, lp["layernorm_after"], eps), lp["mlp_in"])
    m = 0.5 * m * (1 + erf(m / np.sqrt(2)))  # exact GELU
    z = _lin(m, lp["mlp_out"]) + z                                        # eq. 3
    layer += 1
  tokens = _ln(z, p["norm"], eps)
  return tokens, tokens[:, 0]                                             # eq. 4


def test_forward_matches_the_papers_equations_on_a_non_square_gray_image():
  net = vit.ViT(width=8, depth=2, heads=2, mlp_dim=12, patch=4, eps=1e-6)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 8, 12)).astype(np.float32)
  shapes = jax.eval_shape(lambda: net.init(jax.random.key(0), x))["params"]
  params = jax.tree.map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)
  assert params["embeddings"]["position_embeddings"].shape == (1, 7, 8)  # 2 x 3 patches + cls
  got_tokens, got_y = jax.jit(lambda p, a: (net.apply({"params": p}, a, tokens=True),
                                            net.apply({"params": p}, a)))(params, x)
  ref_tokens, ref_y = numpy_vit(params, x, heads=2, patch=4, eps=1e-6)
  np.testing.assert_allclose(got_tokens, ref_tokens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got_y, ref_y, rtol=1e-5, atol=1e-5)
  assert tuple(vit.layer_names(2)) == ("embeddings", "layer_0", "layer_1", "norm")
  assert list(params) == list(vit.layer_names(2))


# ----------------------------------------------------------------------------
# Hugging Face


@pytest.fixture(scope="module")
def hf():
  """The fixture's stored outputs, the imported variables and mtljax's forward."""
  with np.load(os.path.join(DATA, "outputs.npz")) as z:
    ref = {k: z[k] for k in z.files}
  v, cfg = pretrained.import_hf_vit(WEIGHTS)
  net = vit.ViT(cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
                cfg["intermediate_size"], cfg["patch_size"], cfg["layer_norm_eps"])
  x = ref["pixel_values"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
  tokens, y = jax.jit(lambda p, a: (net.apply(p, a, tokens=True), net.apply(p, a)))(v, x)
  return {"ref": ref, "v": v, "cfg": cfg, "x": x, "tokens": np.asarray(tokens),
          "y": np.asarray(y)}


def test_fixture_config_and_keys(hf):
  cfg = hf["cfg"]
  assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"],
          cfg["intermediate_size"], cfg["patch_size"], cfg["image_size"]) == (16, 2, 2, 32, 4,
                                                                               (8, 8))
  keys = set(hf["ref"]["keys"].tolist())
  assert "encoder.layer.1.attention.attention.query.weight" in keys and "pooler.dense.weight" in keys
  # every encoder tensor is used once: 40 keys = 38 encoder + 2 pooler
  assert sum(np.size(a) for a in jax.tree.leaves(hf["v"])) == sum(
      np.size(a) for k, a in pretrained.read_state_dict(WEIGHTS).items()
      if not k.startswith("pooler."))


def test_import_matches_hugging_face_outputs(hf):
  ref = hf["ref"]["last_hidden_state"]
  np.testing.assert_allclose(hf["tokens"], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  np.testing.assert_allclose(hf["y"], ref[:, 0], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
  # and the paper's equations on the imported weights agree with both
  np_tokens, _ = numpy_vit(hf["v"]["params"], hf["x"], heads=2, patch=4, eps=1e-12)
  np.testing.assert_allclose(np_tokens, ref, rtol=1e-9, atol=1e-9)


def test_live_hugging_face_when_transformers_is_importable(hf):
  """With torch and transformers in the test process (not in CI) the stored
  reference is recomputed from the files and compared."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = transformers.ViTModel.from_pretrained(DATA).double().eval()
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(hf["ref"]["pixel_values"]).double())
  np.testing.assert_allclose(out.last_hidden_state.numpy(), hf["ref"]["last_hidden_state"],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(hf["tokens"], out.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# bad checkpoints


def _variant(tmp_path, sd, config=None, name="w.npz"):
  """``sd`` as an .npz with the fixture's config.json (or ``config``) beside it."""
  np.savez(tmp_path / name, **sd)
  if config is not False:
    with open(os.path.join(DATA, "config.json")) as f:
      cj = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
      json.dump({**cj, **(config or {})}, f)
  return str(tmp_path / name)


def _one_line(excinfo):
  msg = str(excinfo.value)
  assert "\n" not in msg
  return msg


def test_bad_checkpoints_give_one_line_errors(tmp_path):
  sd = pretrained.read_state_dict(WEIGHTS)
  cases = [
      ({k: v for k, v in sd.items() if k != "encoder.layer.1.output.dense.bias"}, None,
       "does not match: 1 missing: encoder.layer.1.output.dense.bias"),
      ({**sd, "layernorm.weight": np.ones(17, np.float32)}, None,
       r"1 shape mismatches: layernorm.weight \(17,\) \(expected \(16,\)\)"),
      ({**sd, "encoder.layer.2.extra.weight": np.ones(3, np.float32)}, None,
       "1 unused: encoder.layer.2.extra.weight"),
      (sd, {"hidden_act": "relu"}, "hidden_act='relu'; the ViT encoder uses the exact GELU"),
      (sd, {"model_type": "bert"}, "model_type='bert', not 'vit'"),
      (sd, {"patch_size": [4, 2]}, "patch_size=\\[4, 2\\] is not square"),
      (sd, {"num_hidden_layers": 3}, "16 missing: encoder.layer.2.layernorm_before.weight"),
  ]
  for i, (bad, cfg, match) in enumerate(cases):
    d = tmp_path / str(i)
    d.mkdir()
    with pytest.raises(CheckpointError, match=match) as e:
      pretrained.import_hf_vit(_variant(d, bad, cfg))
    assert _one_line(e).startswith(str(d)), e.value
  # without config.json: sizes from the shapes, the heads must be given
  d = tmp_path / "noconfig"
  d.mkdir()
  path = _variant(d, sd, config=False)
  with pytest.raises(CheckpointError, match="number of attention heads is not in the") as e:
    pretrained.import_hf_vit(path)
  _one_line(e)
  v, cfg = pretrained.import_hf_vit(path, heads=2)
  assert cfg["image_size"] == (8, 8) and cfg["num_hidden_layers"] == 2
  jax.tree.map(np.testing.assert_array_equal, v, pretrained.import_hf_vit(WEIGHTS)[0])


def test_prefixed_checkpoint_with_a_classifier_imports_the_same_encoder(tmp_path):
  """ViTForImageClassification's layout: keys under ``vit.``, a classifier
  (and a masked-image-modelling mask token): the same encoder."""
  sd = pretrained.read_state_dict(WEIGHTS)
  prefixed = {"vit." + k: v for k, v in sd.items() if not k.startswith("pooler.")}
  prefixed["classifier.weight"] = np.zeros((10, 16), np.float32)
  prefixed["classifier.bias"] = np.zeros((10,), np.float32)
  prefixed["vit.embeddings.mask_token"] = np.zeros((1, 1, 16), np.float32)
  v, _ = pretrained.import_hf_vit(_variant(tmp_path, prefixed))
  jax.tree.map(np.testing.assert_array_equal, v, pretrained.import_hf_vit(WEIGHTS)[0])


# ----------------------------------------------------------------------------
# the config: init_from, sizes, grid


def _fixture_config(**sizes):
  c = multi_digits.get_config("vit_quick")
  c.model.update(dict(patch_size=4, vit_width=16, vit_depth=2, vit_heads=2, vit_mlp_dim=32,
                      vit_eps=1e-12))
  c.model.update(sizes)
  c.init_from = WEIGHTS
  return c


def test_read_source_places_the_encoder_in_the_shared_trunk():
  tree, step = build.read_source(_fixture_config())
  assert step == 0 and tree["model_state"] is None
  jax.tree.map(np.testing.assert_array_equal, tree["params"]["shared"]["trunk"],
               pretrained.import_hf_vit(WEIGHTS)[0]["params"])


def test_read_source_refuses_other_sizes_in_one_line():
  with pytest.raises(ConfigError) as e:
    build.read_source(_fixture_config(vit_width=32, vit_eps=1e-6))
  msg = _one_line(e)
  assert "config.init_from" in msg and "is a ViT of other sizes" in msg
  assert "config.model.vit_width=32 (checkpoint hidden_size=16)" in msg
  assert "config.model.vit_eps=1e-06 (checkpoint layer_norm_eps=1e-12)" in msg


def test_a_weights_file_with_another_encoder_is_refused():
  c = _fixture_config()
  c.model.encoder = "cnn"
  with pytest.raises(ConfigError, match="torchvision ResNet weights or a Hugging Face ViT"):
    build.validate_config(c)


def _np_torch_bicubic(img, out_hw):
  """float64 numpy, pixel by pixel, of torch's ``upsample_bicubic2d``
  (``align_corners=False``, given the output size, no antialiasing): output
  (i, j) reads source ``s = (i + 0.5) * in / out - 0.5`` per axis, the 4 x 4
  inputs around ``floor(s)`` clamped to the border, each weighted by Keys'
  cubic convolution with ``A = -0.75`` of its distance to ``s``."""
  a = -0.75

  def kernel(x):
    x = abs(x)
    if x <= 1:
      return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
      return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0
  h, w, d = img.shape
  ho, wo = out_hw
  out = np.zeros((ho, wo, d))
  for i in range(ho):
    sy = (i + 0.5) * h / ho - 0.5
    for j in range(wo):
      sx = (j + 0.5) * w / wo - 0.5
      for y in range(int(np.floor(sy)) - 1, int(np.floor(sy)) + 3):
        for x in range(int(np.floor(sx)) - 1, int(np.floor(sx)) + 3):
          out[i, j] += (kernel(sy - y) * kernel(sx - x) *
                        img[min(max(y, 0), h - 1), min(max(x, 0), w - 1)])
  return out


@pytest.mark.parametrize("src, dst", [((2, 2), (3, 4)), ((4, 3), (2, 5)), ((3, 3), (3, 3)),
                                      ((14, 14), (24, 24))])
def test_position_embeddings_resize_as_torchs_bicubic(src, dst):
  """The class token's row kept, the patch rows resized as torch's bicubic
  (Hugging Face's ``interpolate_pos_encoding``, timm's ``resample_abs_pos_embed``)
  against the pixel-by-pixel numpy definition; the same grid is the identity
  and a constant field stays constant (the weights sum to 1)."""
  from mtljax.models.backbones import vit as vit_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 1 + src[0] * src[1], 3)).astype(np.float32)
  got = vit_lib.resample_position_embeddings(pos, src, dst)
  assert got.shape == (1, 1 + dst[0] * dst[1], 3) and got.dtype == np.float32
  np.testing.assert_array_equal(got[0, 0], pos[0, 0])
  want = _np_torch_bicubic(pos[0, 1:].astype(np.float64).reshape(*src, 3), dst)
  np.testing.assert_allclose(got[0, 1:].reshape(*dst, 3), want, rtol=1e-6, atol=1e-6)
  if src == dst:
    np.testing.assert_array_equal(got, pos)
  const = np.full((1, 1 + src[0] * src[1], 2), 0.7, np.float32)
  np.testing.assert_allclose(vit_lib.resample_position_embeddings(const, src, dst), 0.7,
                             rtol=1e-6)
  with pytest.raises(ValueError, match=r"not \[1, 1 \+ 2\*2, D\] for a 2x2 patch grid"):
    vit_lib.resample_position_embeddings(pos[:, :3], (2, 2), dst)


def test_torchs_own_bicubic_when_torch_is_importable():
  """Live against ``torch.nn.functional.interpolate`` (skipped in CI: torch
  is not a dependency)."""
  torch = pytest.importorskip("torch")
  from mtljax.models.backbones import vit as vit_lib  # pylint: disable=g-import-not-at-top
  pos = np.random.default_rng(1).normal(size=(1, 1 + 4 * 3, 5)).astype(np.float32)
  t = torch.from_numpy(pos[:, 1:].reshape(1, 4, 3, 5)).permute(0, 3, 1, 2)
  want = torch.nn.functional.interpolate(t, size=(6, 7), mode="bicubic", align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(1, 42, 5).numpy()
  got = vit_lib.resample_position_embeddings(pos, (4, 3), (6, 7))
  np.testing.assert_allclose(got[:, 1:], want, rtol=1e-5, atol=1e-6)


def _small_hf_vit_file(tmp_path, image_size, json_image_size):
  """A one-layer, width-16 ViT of gray images with patch 4 written in Hugging
  Face's layout (``vit.npz`` of numpy-seeded tensors, ``config.json`` with
  ``image_size`` as ``json_image_size``), and the ``multi_digits:vit_quick``
  config of its sizes initialised from it: ``(cfg, state dict, config)``."""
  cfg = {**pretrained.VIT_CONFIG_DEFAULTS, "hidden_size": 16, "num_hidden_layers": 1,
         "num_attention_heads": 2, "intermediate_size": 16, "patch_size": 4,
         "image_size": tuple(image_size), "num_channels": 1}
  rng = np.random.default_rng(0)
  sd = {k: (0.3 * rng.normal(size=shape)).astype(np.float32)
        for k, (_, _, shape, _) in pretrained._vit_table(cfg, "").items()}  # pylint: disable=protected-access
  np.savez(tmp_path / "vit.npz", **sd)
  with open(tmp_path / "config.json", "w") as f:
    json.dump({**cfg, "image_size": json_image_size, "model_type": "vit"}, f)
  c = multi_digits.get_config("vit_quick")
  c.model.update(dict(vit_width=16, vit_depth=1, vit_heads=2, vit_mlp_dim=16))
  c.init_from = str(tmp_path / "vit.npz")
  return cfg, sd, c


def test_a_vit_file_for_another_image_size_loads_with_resized_position_embeddings(tmp_path):
  """A Hugging Face file of 8x8 gray images (a 2x2 patch grid of 4 pixels)
  initialising the ViT of the bundled 12x16 digits (a 3x4 grid): every
  parameter is the file's except the position embeddings, which are the
  file's resized to 3x4 (numpy, torch's bicubic); the class token's row is
  the file's."""
  cfg, sd, c = _small_hf_vit_file(tmp_path, (8, 8), 8)
  data = build.data_from_config(c)
  assert tuple(data.input_shape[:2]) == (12, 16)
  trunk = build.build_run(c, data).state.params["shared"]["trunk"]
  want = dict(params_lib.flatten_with_names(pretrained.vit_variables(sd, cfg)["params"]))
  pos = sd["embeddings.position_embeddings"]
  got = dict(params_lib.flatten_with_names(trunk))
  assert set(got) == set(want)
  for name, value in got.items():
    if name == "embeddings/position_embeddings":
      assert value.shape == (1, 13, 16)
      np.testing.assert_array_equal(value[0, 0], pos[0, 0])
      np.testing.assert_allclose(
          value[0, 1:].reshape(3, 4, 16),
          _np_torch_bicubic(pos[0, 1:].astype(np.float64).reshape(2, 2, 16), (3, 4)),
          rtol=1e-6, atol=1e-6)
    else:
      np.testing.assert_array_equal(value, want[name], err_msg=name)


# ----------------------------------------------------------------------------
# models, groups, fine-tuning


def _image_data():
  spec = specs.DataSpec("x", (specs.TaskColumn(tasks.Task("a", "classification", 3), "a"),
                              specs.TaskColumn(tasks.Task("b", "binary"), "b")))
  rng = np.random.default_rng(0)

  def split(n):
    x = rng.normal(size=(n, 4, 8)).astype(np.float32)
    return {"x": x, "a": rng.integers(0, 3, n), "b": (x[:, 0, 0] > 0).astype(np.int64)}
  return task_data.build_task_data("img", spec, {"train": split(32), "test": split(8)})


_SMALL = dict(encoder="vit", patch_size=4, vit_width=8, vit_depth=2, vit_heads=2, vit_mlp_dim=8)


def test_layer_groups_name_the_blocks_and_cover_every_parameter():
  data = _image_data()
  for arch, home in (("multi_head", "shared/trunk"), ("independent", "tasks/trunk")):
    model = multitask.make_model(arch, data.taskset, data.input_shape, **_SMALL)
    assert [n for n, _ in model.layer_groups] == ["embeddings", "layer_0", "layer_1", "norm",
                                                  "heads"]
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    names = [n for n, _ in params_lib.flatten_with_names(shapes)]
    for name in names:
      hits = [g for g, rx in model.layer_groups if re.search(rx, name)]
      assert len(hits) == 1, (name, hits)
      assert name.startswith(home) or hits == ["heads"], name
    optim.check_layer_groups(model.layer_groups, names)
  # layer-wise decay and gradual unfreezing generated over those groups
  c = multi_digits.get_config("vit_quick")
  c.optim.layerwise_decay, c.optim.unfreeze_every = 0.5, 3
  rules = build.rules_from_config(c, model.layer_groups, names)
  assert [r.lr_mult for r in rules] == [0.5 ** k for k in (4, 3, 2, 1, 0)]
  assert [r.unfreeze_at for r in rules] == [12, 9, 6, 3, 0]
  assert [r.pattern for r in rules] == [rx for _, rx in model.layer_groups]


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="mmoe"), "arch='mmoe' is not built for encoder='vit'"),
    (dict(vit_heads=3), "vit_width=8 is not a multiple of vit_heads=3"),
    (dict(patch_size=3), "multiples of patch_size=3"),
    (dict(vit_eps=0.0), "vit_eps must be > 0"),
])
def test_bad_vit_settings_are_refused(kwargs, match):
  data = _image_data()
  arch = kwargs.pop("arch", "multi_head")
  with pytest.raises(ValueError, match=match):
    multitask.make_model(arch, data.taskset, data.input_shape, **{**_SMALL, **kwargs})


def test_freezing_the_embeddings_group_by_name_leaves_it_bitwise_unchanged():
  data = _image_data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape,
                               **{**_SMALL, "vit_depth": 1})
  tx = optim.make_ruled_optimizer("adam", optim.parse_rules("trunk/embeddings/:frozen;.*:"),
                                  lr=1e-2, total_steps=10)
  step = steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train), 2, 8),
      weights=np.ones(len(data.taskset)), seed=0)

  @jax.jit
  def init_and_step(key, train):
    state = steps.init_train_state(model, tx, key)
    return state.params, step(state, train)[0].params
  before, after = init_and_step(jax.random.key(0), data.train)
  before, after = (dict(params_lib.flatten_with_names(t)) for t in (before, after))
  for name in before:
    same = np.asarray(before[name]).tobytes() == np.asarray(after[name]).tobytes()
    assert same == name.startswith("shared/trunk/embeddings/"), name


# ----------------------------------------------------------------------------
# slow: end to end


@pytest.mark.slow
def test_vit_quick_patch_classification_beats_chance(tmp_path):
  """``multi_digits.py:vit_quick`` (1,000 steps): measured 0.47 / 0.64 test
  accuracy (left / right; chance 0.1) on 2 CPU cores; the check is > 0.3."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  c = multi_digits.get_config("vit_quick")
  c.plots = False
  summary = train.train_and_evaluate(c, str(tmp_path))
  for task in ("left", "right"):
    assert summary["tasks"][task]["accuracy"] > 0.3, summary["tasks"]
  assert summary["train_step_compilations"] == 1


@pytest.mark.slow
def test_linear_probe_from_a_hugging_face_file_keeps_its_values(tmp_path):
  """A run initialised from an HF-layout file of the bundled task's sizes
  (12x16 gray images, patch 4: ``image_size`` [12, 16] in config.json) with
  the trunk frozen by rules: the trunk after training is the file's, bitwise,
  and the heads have moved."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  cfg, sd, c = _small_hf_vit_file(tmp_path, (12, 16), [12, 16])
  expected = pretrained.vit_variables(sd, cfg)["params"]
  c.optim.rules = "heads/:;.*:frozen"
  c.total_steps = c.checkpoint_steps = c.eval_steps = c.log_steps = 20
  c.optim.schedule = "constant"
  c.plots = False
  work = tmp_path / "run"
  summary = train.train_and_evaluate(c, str(work))
  assert summary["init_from"]["step"] == 0
  state = helpers.final_state(work, c)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
               state.params["shared"]["trunk"], expected)
  fresh = build.build_run(c, build.data_from_config(c)).state.params  # loads the file too
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params["tasks"]),
                                                    jax.tree.leaves(fresh["tasks"]))]
  assert all(moved)
  shutil.rmtree(work)
