"""Writes the torchvision fixtures of ``tests/test_pretrained.py`` (issue 26).

torch is not a dependency of mtljax and cannot be installed in its CI (the
Linux torch on PyPI is the CUDA build, gigabytes). This script runs once, in
a virtual environment outside the project that has torch, torchvision and
safetensors::

  python3.11 -m venv /work/peers/torch
  /work/peers/torch/bin/pip install torch torchvision safetensors
  /work/peers/torch/bin/python scripts/make_torchvision_fixtures.py

and writes, under ``tests/data/`` (KBs):

* ``torchvision_resnet.npz``: for each case in :data:`CASES`, the state dict's
  key names and shapes, a digest of the numpy-seeded weights and input, and
  torchvision's float64 eval-mode outputs on that input: the logits and a fixed
  random projection (:func:`projection`) of each stage's features (the stage
  tensors themselves would be hundreds of KB); ``aspp``: LibMTL's head alone on
  a 26x26 feature map (:data:`ASPP_CASE`). The dilated case adds LibMTL's
  ``DeepLabHead`` (copied below from LibMTL ``examples/nyu/aspp.py``) on
  ``layer4``, upsampled as LibMTL's trainer does, in eval mode, and one
  train-mode step (dropout off) with the batch-norm running averages after it.
* ``tiny_state_dict.pt`` (torch's zip format), ``tiny_state_dict_legacy.pt``
  (the pre-1.6 format) and ``tiny_state_dict.safetensors``: a small real state
  dict with float32/float16/bfloat16/int64/bool tensors, a transposed view and
  a slice sharing a storage at an offset; ``tiny_state_dict_values.npz`` holds
  the values the reader must return.

Every weight, running statistic and input comes from a numpy seed
(:func:`numpy_state_dict`, :func:`numpy_input`), so the test regenerates the
same arrays without torch, writes them in a state-dict file and runs mtljax's
import and forward on them. This module imports torch only in :func:`main`.
"""

from __future__ import annotations

import collections
import hashlib
import os
import sys
import zlib

import numpy as np

SEED = 2026
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data")
PROJ_DIM = 4
STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")

# name -> (torchvision constructor, depth, LibMTL dilate scale or None, input [B, C, H, W],
#          with LibMTL's DeepLabHead(num_classes=3))
CASES = {
    "resnet18": ("resnet18", 18, None, (2, 3, 33, 33), False),
    "resnet50": ("resnet50", 50, None, (1, 3, 33, 33), False),
    "resnet18_os8_aspp": ("resnet18", 18, 8, (2, 3, 17, 17), True),
    "resnet50_os8": ("resnet50", 50, 8, (1, 3, 17, 17), False),
}
NUM_CLASSES = 10
HEAD_OUT = 3
TRAIN_STATS = ("bn1", "layer3.0.bn1", "layer4.1.bn2", "head.0.convs.4.2", "head.0.project.1",
               "head.2")


def _rng(seed: int, key: str) -> np.random.Generator:
  return np.random.default_rng([seed, zlib.crc32(key.encode())])


def numpy_tensor(key: str, shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
  """The numpy-seeded value of state-dict entry ``key`` (float64, int64 for
  ``num_batches_tracked``): convolutions N(0, 2/fan_out) as torchvision's
  init, BN scales U(0.5, 1.5), shifts N(0, 0.1), running means N(0, 0.2),
  running variances U(0.5, 2) (non-trivial statistics), linear layers
  N(0, 1/fan_in), biases N(0, 0.1)."""
  r = _rng(seed, key)
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.asarray(int(r.integers(1, 100)), np.int64)
  if leaf == "running_mean":
    return r.normal(0, 0.2, shape)
  if leaf == "running_var":
    return r.uniform(0.5, 2.0, shape)
  if len(shape) == 4:
    return r.normal(0, np.sqrt(2.0 / (shape[0] * shape[2] * shape[3])), shape)
  if len(shape) == 2:
    return r.normal(0, 1 / np.sqrt(shape[1]), shape)
  if leaf == "weight":  # a norm's scale
    return r.uniform(0.5, 1.5, shape)
  return r.normal(0, 0.1, shape)


def numpy_state_dict(keys_shapes, seed: int = SEED) -> "collections.OrderedDict[str, np.ndarray]":
  return collections.OrderedDict(
      (k, numpy_tensor(k, tuple(s), seed)) for k, s in keys_shapes)


def keys_shapes_of(npz, name: str) -> list[tuple[str, tuple[int, ...]]]:
  """The (key, shape)s of case ``name`` stored in the fixture ``npz``."""
  return [(str(k), tuple(int(a) for a in str(s).split(",") if a))
          for k, s in zip(npz[f"{name}/keys"], npz[f"{name}/shapes"])]


def numpy_input(shape: tuple[int, ...], seed: int = SEED) -> np.ndarray:
  """The NCHW input of a case: N(0, 1), float64."""
  return _rng(seed, "input").normal(size=shape)


def projection(channels: int, seed: int = SEED) -> np.ndarray:
  """``[channels, PROJ_DIM]`` N(0, 1/channels): a stage's features are stored
  as ``features @ projection``."""
  return _rng(seed, f"projection{channels}").normal(0, 1 / np.sqrt(channels), (channels, PROJ_DIM))


def digest(sd, x) -> str:
  h = hashlib.sha256()
  for k, v in sd.items():
    h.update(k.encode())
    h.update(np.ascontiguousarray(v).tobytes())
  h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()


def tiny_values() -> "collections.OrderedDict[str, np.ndarray]":
  r = np.random.default_rng(SEED)
  return collections.OrderedDict([
      ("conv.weight", np.float32(r.normal(size=(4, 3, 3, 3)))),
      ("conv.bias", np.float32(r.normal(size=4))),
      ("bn.running_var", np.float32(r.uniform(0.5, 2, 4))),
      ("bn.num_batches_tracked", np.asarray(7, np.int64)),
      ("half", np.float16(r.normal(size=(2, 3)))),
      ("bf16", np.float32(r.normal(size=(5,)))),  # rounded to bfloat16 by torch below
      ("ints", r.integers(-5, 5, size=(3, 2)).astype(np.int64)),
      ("mask", r.integers(0, 2, size=(4,)).astype(bool)),
      ("base", np.float32(r.normal(size=(3, 4)))),
  ])


# --- LibMTL examples/nyu/aspp.py (MIT licence), copied as the reference -----

def _libmtl_head(torch, in_channels, num_classes):
  nn, F = torch.nn, torch.nn.functional

  class ASPPConv(nn.Sequential):
    def __init__(self, in_channels, out_channels, dilation):
      super().__init__(
          nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation, bias=False),
          nn.BatchNorm2d(out_channels), nn.ReLU())

  class ASPPPooling(nn.Sequential):
    def __init__(self, in_channels, out_channels):
      super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                       nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x):
      size = x.shape[-2:]
      x = super().forward(x)
      return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

  class ASPP(nn.Module):
    def __init__(self, in_channels, atrous_rates):
      super().__init__()
      out_channels = 256
      modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                               nn.BatchNorm2d(out_channels), nn.ReLU())]
      for rate in atrous_rates:
        modules.append(ASPPConv(in_channels, out_channels, rate))
      modules.append(ASPPPooling(in_channels, out_channels))
      self.convs = nn.ModuleList(modules)
      self.project = nn.Sequential(nn.Conv2d(5 * out_channels, out_channels, 1, bias=False),
                                   nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x):
      return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))

  return nn.Sequential(ASPP(in_channels, [12, 24, 36]),
                       nn.Conv2d(256, 256, 3, padding=1, bias=False),
                       nn.BatchNorm2d(256), nn.ReLU(), nn.Conv2d(256, num_classes, 1))


# --- LibMTL LibMTL/model/resnet_dilated.py, ResnetDilated._nostride_dilate ---

def _nostride_dilate(m, dilate):
  if m.__class__.__name__.find("Conv") != -1:
    if m.stride == (2, 2):
      m.stride = (1, 1)
      if m.kernel_size == (3, 3):
        m.dilation = (dilate // 2, dilate // 2)
        m.padding = (dilate // 2, dilate // 2)
    elif m.kernel_size == (3, 3):
      m.dilation = (dilate, dilate)
      m.padding = (dilate, dilate)


def build_torch_case(torch, name):
  """(model, head or None) of case ``name`` in float64 with numpy-seeded
  weights and statistics, eval mode; also the state dict's (key, shape)s."""
  import functools
  import torchvision
  ctor, _, dilate, shape, with_head = CASES[name]
  model = getattr(torchvision.models, ctor)(num_classes=NUM_CLASSES)
  if dilate == 8:
    model.layer3.apply(functools.partial(_nostride_dilate, dilate=2))
    model.layer4.apply(functools.partial(_nostride_dilate, dilate=4))
  elif dilate == 16:
    model.layer4.apply(functools.partial(_nostride_dilate, dilate=2))
  full = torch.nn.Module()
  full.add_module("backbone", model)
  head = None
  if with_head:
    head = _libmtl_head(torch, model.fc.in_features, HEAD_OUT)
    full.add_module("head", head)
  # keys as the user's files have them: the backbone's unprefixed, the head's under "head."
  sd_t = collections.OrderedDict(
      (k.replace("backbone.", "", 1), v) for k, v in full.state_dict().items())
  keys_shapes = [(k, tuple(v.shape)) for k, v in sd_t.items()]
  sd = numpy_state_dict(keys_shapes)
  model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()
                         if not k.startswith("head.")})
  if head is not None:
    head.load_state_dict({k[5:]: torch.from_numpy(np.asarray(v)) for k, v in sd.items()
                          if k.startswith("head.")})
  full.double().eval()
  return model, head, keys_shapes, sd, shape


def torch_forward(torch, model, head, x):
  """Stage features, logits and (with a head) the upsampled head output, NCHW float64."""
  F = torch.nn.functional
  out = {}
  h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
  out["stem"] = h
  for s in STAGES[1:]:
    h = getattr(model, s)(h)
    out[s] = h
  out["logits"] = model.fc(torch.flatten(model.avgpool(h), 1))
  if not model.training:  # (a second train-mode pass would update the BN statistics again)
    assert torch.allclose(model(x), out["logits"]), "the staged forward differs from model(x)"
  if head is not None:
    out["head"] = F.interpolate(head(h), x.shape[-2:], mode="bilinear", align_corners=True)
  return out


def case_arrays(torch, name):
  model, head, keys_shapes, sd, shape = build_torch_case(torch, name)
  x = numpy_input(shape)
  res = {f"{name}/keys": np.array([k for k, _ in keys_shapes]),
         f"{name}/shapes": np.array(
             [",".join(map(str, s)) for _, s in keys_shapes]),
         f"{name}/digest": np.array(digest(sd, x))}
  with torch.no_grad():
    out = torch_forward(torch, model, head, torch.from_numpy(x))
  for k, v in out.items():
    v = v.numpy()
    if v.ndim == 4:  # NCHW -> NHWC
      v = v.transpose(0, 2, 3, 1)
      if k != "head":
        v = v @ projection(v.shape[-1])
    res[f"{name}/{k}"] = np.float32(v)
  if head is not None:  # one train-mode step, dropout off
    head[0].project[3].p = 0.0
    model.train()
    head.train()
    with torch.no_grad():
      out = torch_forward(torch, model, head, torch.from_numpy(x))
    res[f"{name}/train_head"] = np.float32(out["head"].numpy().transpose(0, 2, 3, 1))
    named = dict(model.named_modules())
    named.update({f"head.{k}": m for k, m in head.named_modules()})
    for bn in TRAIN_STATS:
      for a in ("running_mean", "running_var"):
        res[f"{name}/train_stats/{bn}/{a}"] = np.float32(getattr(named[bn], a).numpy())
  return res


# LibMTL's DeepLabHead alone on a feature map large enough for its dilated
# branches (rates 12, 24 reach off-centre pixels of a 26x26 map), upsampled to
# an odd size with align_corners=True: (features [B, C, H, W], output size)
ASPP_CASE = ((1, 8, 26, 26), (31, 37))


def aspp_arrays(torch):
  F = torch.nn.functional
  (shape, size) = ASPP_CASE
  head = _libmtl_head(torch, shape[1], HEAD_OUT)
  keys_shapes = [(f"head.{k}", tuple(v.shape)) for k, v in head.state_dict().items()]
  sd = numpy_state_dict(keys_shapes)
  head.load_state_dict({k[5:]: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})
  head.double().eval()
  x = _rng(SEED, "aspp_input").normal(size=shape)
  with torch.no_grad():
    y = F.interpolate(head(torch.from_numpy(x)), size, mode="bilinear", align_corners=True)
  return {"aspp/keys": np.array([k for k, _ in keys_shapes]),
          "aspp/shapes": np.array([",".join(map(str, s)) for _, s in keys_shapes]),
          "aspp/digest": np.array(digest(sd, x)),
          "aspp/head": np.float32(y.numpy().transpose(0, 2, 3, 1))}


def write_tiny(torch):
  from safetensors.torch import save_file
  vals = tiny_values()
  sd = collections.OrderedDict()
  for k, v in vals.items():
    sd[k] = torch.from_numpy(np.array(v, order="C"))  # (ascontiguousarray makes 0-d 1-d)
  sd["bf16"] = sd["bf16"].to(torch.bfloat16)
  vals["bf16"] = sd["bf16"].float().numpy()
  base = sd["base"]
  sd["base_t"] = base.t()            # a transposed view of base's storage
  sd["base_row"] = base[1, 1:]       # a slice at an offset of the same storage
  vals["base_t"] = vals["base"].T
  vals["base_row"] = vals["base"][1, 1:]
  torch.save(sd, os.path.join(OUT, "tiny_state_dict.pt"))
  torch.save(sd, os.path.join(OUT, "tiny_state_dict_legacy.pt"),
             _use_new_zipfile_serialization=False)
  save_file({k: v.contiguous().clone() for k, v in sd.items()},
            os.path.join(OUT, "tiny_state_dict.safetensors"))
  np.savez(os.path.join(OUT, "tiny_state_dict_values.npz"), **vals)


def main(argv):
  import torch
  torch.set_num_threads(2)
  os.makedirs(OUT, exist_ok=True)
  write_tiny(torch)
  res = aspp_arrays(torch)
  for name in (argv or CASES):
    res.update(case_arrays(torch, name))
    print(name, "done")
  res["versions"] = np.array(f"torch {torch.__version__}, numpy {np.__version__}")
  np.savez_compressed(os.path.join(OUT, "torchvision_resnet.npz"), **res)


if __name__ == "__main__":
  main(sys.argv[1:])
