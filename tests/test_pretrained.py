"""Pretrained import (issue 26): the torch-free state-dict reader on real
torch.save / safetensors files, the torchvision -> mtljax mapping and its
errors, and mtljax's ResNets against torchvision's float64 forward.

The torchvision outputs are fixtures written by
``scripts/make_torchvision_fixtures.py`` in a venv with torch (torch is not
installable here): every weight, running statistic and input is drawn from a
numpy seed by functions of that script, which the tests import and call to
regenerate the same arrays (checked by a digest), write them as a state-dict
file, import it and run mtljax's forward. Agreement is measured as
``max|mtljax - torch| / max|torch|`` per output, required below 1e-5; the
forwards use ``conv_impl="lax"`` (cheap to compile here; the im2col path is
compared with it in tests/test_backbones.py)."""

import functools
import importlib.util
import os
import zipfile

import jax
import numpy as np
import pytest

from mtljax import pretrained
from mtljax.errors import CheckpointError
from mtljax.models.backbones.resnet import DeepLabHead, ResNet

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(_ROOT, "tests", "data")
TOL = 1e-5


def _load_script():
  path = os.path.join(_ROOT, "scripts", "make_torchvision_fixtures.py")
  spec = importlib.util.spec_from_file_location("make_torchvision_fixtures", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


fx = _load_script()


@pytest.fixture(scope="module")
def outputs():
  with np.load(os.path.join(DATA, "torchvision_resnet.npz")) as z:
    return {k: z[k] for k in z.files}


def _rel(got, want):
  return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _case_state_dict(outputs, name, tmp_path):
  """The numpy-seeded state dict of ``name`` (its digest checked against the
  fixture's), written to an .npz and read back through the importer."""
  sd = fx.numpy_state_dict(fx.keys_shapes_of(outputs, name))
  x = fx.numpy_input(fx.CASES[name][3])
  assert fx.digest(sd, x) == str(outputs[f"{name}/digest"]), (
      "numpy draws differ from the fixture's: regenerate it with "
      "scripts/make_torchvision_fixtures.py")
  path = str(tmp_path / f"{name}.npz")
  np.savez(path, **{k: np.float32(v) if v.dtype == np.float64 else v for k, v in sd.items()})
  return pretrained.read_state_dict(path), np.float32(x.transpose(0, 2, 3, 1))


@functools.lru_cache(maxsize=None)
def _forward(depth, output_stride, head):
  """One jitted eval forward per architecture: stage features, logits and
  (with ``head``) LibMTL's head upsampled to the input with align_corners."""
  net = ResNet(depth, output_stride=output_stride, num_classes=fx.NUM_CLASSES, conv_impl="lax")
  dl = DeepLabHead(fx.HEAD_OUT, conv_impl="lax")

  @jax.jit
  def f(v, hv, x):
    out = net.apply(v, x, False)
    if head:
      out["head"] = dl.apply(hv, out["layer4"], False, out_size=x.shape[1:3])
    return out
  return f


def _compare_case(outputs, name, tmp_path):
  _, depth, dilate, _, head = fx.CASES[name]
  sd, x = _case_state_dict(outputs, name, tmp_path)
  v = pretrained.resnet_variables(sd, depth, fc="load", prefix="")  if not head else \
      pretrained.resnet_variables({k: a for k, a in sd.items() if not k.startswith("head.")},
                                  depth, fc="load")
  hv = pretrained.deeplab_head_variables(sd, prefix="head.") if head else {}
  out = _forward(depth, dilate or 32, head)(v, hv, x)
  for k in fx.STAGES + ("logits",) + (("head",) if head else ()):
    got = np.asarray(out[k], np.float64)
    if k in fx.STAGES:
      got = got @ fx.projection(got.shape[-1])
    assert got.shape == outputs[f"{name}/{k}"].shape, k
    assert _rel(got, outputs[f"{name}/{k}"]) < TOL, (name, k, _rel(got, outputs[f"{name}/{k}"]))
  return sd, x, v, hv


# ----------------------------------------------------------------------------
# the reader


@pytest.mark.parametrize("fname", ["tiny_state_dict.pt", "tiny_state_dict_legacy.pt",
                                   "tiny_state_dict.safetensors"])
def test_reader_returns_torchs_tensors_from_real_files(fname):
  want = np.load(os.path.join(DATA, "tiny_state_dict_values.npz"))
  sd = pretrained.read_state_dict(os.path.join(DATA, fname))
  assert sorted(sd) == sorted(want.files)
  for k in want.files:
    assert sd[k].shape == want[k].shape, k
    np.testing.assert_array_equal(np.asarray(sd[k]).astype(want[k].dtype), want[k], err_msg=k)
  assert str(sd["bf16"].dtype) == "bfloat16" and sd["half"].dtype == np.float16
  assert sd["bn.num_batches_tracked"].dtype == np.int64 and sd["mask"].dtype == bool
  if fname.endswith(".pt"):  # torch's file order is the state dict's order
    assert list(sd) == list(want.files)


def test_reader_refuses_bad_files_in_one_line_naming_them(tmp_path):
  good = open(os.path.join(DATA, "tiny_state_dict.pt"), "rb").read()
  safe = open(os.path.join(DATA, "tiny_state_dict.safetensors"), "rb").read()
  (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
  (tmp_path / "noise.pth").write_bytes(b"\x00\x01 not a checkpoint" * 10)
  (tmp_path / "short.safetensors").write_bytes(safe[:-20])
  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as z:  # its pickle asks for os.system
    z.writestr("evil/data.pkl", b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85R.")
  for name, match in (("truncated.pt", "cannot read it as a state dict"),
                      ("noise.pth", "cannot read it as a state dict|not a torch.save file"),
                      ("short.safetensors", "truncated"),
                      ("evil.pt", r"needs os\.system .* save model\.state_dict\(\)"),
                      ("absent.pth", "no such weights file")):
    with pytest.raises(CheckpointError, match=match) as e:
      pretrained.read_state_dict(str(tmp_path / name))
    assert str(e.value).startswith(str(tmp_path / name)) and "\n" not in str(e.value), e.value


# ----------------------------------------------------------------------------
# the mapping


def _resnet18_sd(outputs):
  return dict(_resnet18_sd_cached(tuple(fx.keys_shapes_of(outputs, "resnet18"))))


@functools.lru_cache(maxsize=1)
def _resnet18_sd_cached(keys_shapes):
  return {k: np.float32(v) for k, v in fx.numpy_state_dict(keys_shapes).items()}


def test_mapping_layout_and_fc_options(outputs):
  sd = _resnet18_sd(outputs)
  v = pretrained.resnet_variables(sd, 18, fc="load")
  np.testing.assert_array_equal(v["params"]["stem"]["conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["layer2"]["block0"]["downsample_conv"]["kernel"][0, 0],
                                sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(v["batch_stats"]["layer4"]["block1"]["bn2"]["var"],
                                sd["layer4.1.bn2.running_var"])
  np.testing.assert_array_equal(v["params"]["fc"]["kernel"], sd["fc.weight"].T)
  # the tree is the model's, at any output stride
  for os_ in (8, 32):
    shapes = jax.eval_shape(ResNet(18, output_stride=os_, num_classes=10).init,
                            jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32))
    assert jax.tree.structure(shapes) == jax.tree.structure(v)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(np.shape, v)
  # fc="ignore": an fc in the file is dropped, a missing one is fine
  no_fc = {k: a for k, a in sd.items() if not k.startswith("fc.")}
  for d in (sd, no_fc):
    assert "fc" not in pretrained.resnet_variables(d, 18)["params"]
  with pytest.raises(CheckpointError, match=r"1 missing: fc.weight.*fc.bias|2 missing: fc"):
    pretrained.resnet_variables(no_fc, 18, fc="load")
  with pytest.raises(ValueError, match="fc must be one of"):
    pretrained.resnet_variables(sd, 18, fc="maybe")


def test_mapping_lists_missing_unused_and_mismatched_keys_in_one_line(outputs):
  sd = _resnet18_sd(outputs)
  del sd["layer3.1.bn1.running_var"]
  sd["layer1.0.conv1.weight"] = sd["layer1.0.conv1.weight"][:, :, :1]
  sd["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(CheckpointError) as e:
    pretrained.resnet_variables(sd, 18, what="w.pth")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("w.pth (torchvision ResNet-18) does not match")
  assert "1 missing: layer3.1.bn1.running_var" in msg
  assert "1 shape mismatches: layer1.0.conv1.weight (64, 64, 1, 3) (expected (64, 64, 3, 3))" in msg
  assert "1 unused: extra.weight" in msg
  # a ResNet-18 file given as ResNet-50: many keys, the lists cut at 8
  with pytest.raises(CheckpointError, match=r"165 missing: .* and 157 more; 23 shape mismatches"):
    pretrained.resnet_variables(_resnet18_sd(outputs), 50)
  # the LibMTL layout: the encoder under a prefix, the rest ignored
  pre = {f"encoder.{k}": a for k, a in _resnet18_sd(outputs).items()}
  pre["decoders.segmentation.4.bias"] = np.zeros(3, np.float32)
  assert "layer4" in pretrained.resnet_variables(pre, 18, prefix="encoder.")["params"]


# ----------------------------------------------------------------------------
# against torchvision


def test_resnet18_forward_matches_torchvision(outputs, tmp_path):
  _compare_case(outputs, "resnet18", tmp_path)


def test_dilated_resnet18_and_libmtl_head_match_torch_in_eval_and_train(outputs, tmp_path):
  """LibMTL's resnet_dilated (OS 8) ResNet-18 + DeepLabHead in eval mode, and
  one train-mode forward (batch statistics; dropout off as in the fixture)
  with the running averages it leaves, against torch's."""
  name = "resnet18_os8_aspp"
  sd, x, v, hv = _compare_case(outputs, name, tmp_path)
  net = ResNet(18, output_stride=8, num_classes=fx.NUM_CLASSES, conv_impl="lax")
  dl = DeepLabHead(fx.HEAD_OUT, dropout=0.0, conv_impl="lax")

  @jax.jit
  def train(v, hv, x):
    out, s = net.apply(v, x, True, mutable=["batch_stats"])
    y, hs = dl.apply(hv, out["layer4"], True, out_size=x.shape[1:3], mutable=["batch_stats"])
    return y, s["batch_stats"], hs["batch_stats"]
  y, s, hs = train(v, hv, x)
  # 5e-5, not 1e-5: normalising by the statistics of tiny batches (2 values per
  # channel in the pooling branch's BN) amplifies float32 rounding; the same
  # forward in float64 (jax_enable_x64) is within 3.4e-8 of torch's, float32
  # 1.3e-5 (measured; docs/notes/backbones-resnet.md).
  assert _rel(y, outputs[f"{name}/train_head"]) < 5e-5
  where = {"bn1": (s, ("stem", "bn1")), "layer3.0.bn1": (s, ("layer3", "block0", "bn1")),
           "layer4.1.bn2": (s, ("layer4", "block1", "bn2")),
           "head.0.convs.4.2": (hs, ("pool_bn",)), "head.0.project.1": (hs, ("project_bn",)),
           "head.2": (hs, ("head_bn",))}
  assert set(where) == set(fx.TRAIN_STATS)
  for bn, (tree, path) in where.items():
    node = tree
    for p in path:
      node = node[p]
    for ours, theirs in (("mean", "running_mean"), ("var", "running_var")):
      want = outputs[f"{name}/train_stats/{bn}/{theirs}"]
      assert _rel(node[ours], want) < 5e-5, (bn, ours, _rel(node[ours], want))


def test_deeplab_head_matches_libmtl_on_a_map_its_dilations_reach(outputs):
  """LibMTL's head alone on a 26x26 map (the 12- and 24-dilated branches read
  off-centre pixels), upsampled to 31x37 with align_corners=True."""
  shape, size = fx.ASPP_CASE
  sd = {k: np.float32(a) for k, a in
        fx.numpy_state_dict(fx.keys_shapes_of(outputs, "aspp")).items()}
  x = fx._rng(fx.SEED, "aspp_input").normal(size=shape)
  assert fx.digest(fx.numpy_state_dict(fx.keys_shapes_of(outputs, "aspp")), x) == str(
      outputs["aspp/digest"])
  hv = pretrained.deeplab_head_variables(sd, prefix="head.")
  y = jax.jit(lambda hv, x: DeepLabHead(fx.HEAD_OUT, conv_impl="lax").apply(
      hv, x, False, out_size=size))(hv, np.float32(x.transpose(0, 2, 3, 1)))
  assert _rel(y, outputs["aspp/head"]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "resnet50_os8"])
def test_resnet50_forward_matches_torchvision(outputs, tmp_path, name):
  _compare_case(outputs, name, tmp_path)


def test_live_torchvision_when_torch_is_importable(outputs, tmp_path):
  """With torch in the test process (not in CI), the fixture's reference is
  recomputed live and compared with the stored one and with mtljax's."""
  torch = pytest.importorskip("torch")
  pytest.importorskip("torchvision")
  model, head, _, sd, shape = fx.build_torch_case(torch, "resnet18")
  with torch.no_grad():
    live = fx.torch_forward(torch, model, head, torch.from_numpy(fx.numpy_input(shape)))
  np.testing.assert_allclose(live["logits"].numpy(), outputs["resnet18/logits"], rtol=1e-5,
                             atol=1e-6)
  _compare_case(outputs, "resnet18", tmp_path)


# ----------------------------------------------------------------------------
# export


@pytest.mark.parametrize("name", ["weights.msgpack", "orbax_dir"])
def test_export_round_trips_bitwise(outputs, tmp_path, name):
  v = pretrained.resnet_variables(_resnet18_sd(outputs), 18)
  path = str(tmp_path / name)
  pretrained.export_variables(v, path)
  back = pretrained.load_exported(path)
  assert jax.tree.structure(back) == jax.tree.structure(v)
  jax.tree.map(np.testing.assert_array_equal, back, v)
  if not name.endswith(".msgpack"):
    with pytest.raises(CheckpointError, match="exists"):
      pretrained.export_variables(v, path)
