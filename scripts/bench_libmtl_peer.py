"""LibMTL's NYUv2 HPS step on CPU, for experiments/bench_libmtl.py (issue 26).

Runs in a virtual environment outside the project with torch, torchvision and
LibMTL (``pip install LibMTL --no-deps`` next to torch; never in
requirements.txt). The model is LibMTL's ``examples/nyu`` set-up: encoder
``resnet_dilated('resnet50')`` (LibMTL.model), one DeepLab head per task
(LibMTL's ``aspp.py`` is torchvision's ``DeepLabHead``: ASPP(12, 24, 36), 3x3
conv, BN, ReLU, 1x1 conv), predictions resized to the image with bilinear
``align_corners=True`` (``process_preds``), the example's losses (cross-entropy
ignoring -1; L1 over depth != 0; 1 - cosine over normals != 0), Adam 1e-4, the
trainer's inner loop (``zero_grad``, ``model.backward(losses, **weight_args)``,
``optimizer.step``) on a fixed batch. ``--weighting`` EW | PCGrad | MGDA.

    python scripts/bench_libmtl_peer.py --weighting=EW --size=144x192 --batch=2 --steps=3

Prints one JSON line per timed step: ``{"weighting", "ms"}``.
"""

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

# LibMTL 1.1.5 (PyPI) imports torchvision.models.utils, which torchvision
# removed in 0.13: give it torch.hub's function under the old name.
import sys  # noqa: E402
import types  # noqa: E402
_shim = types.ModuleType("torchvision.models.utils")
_shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
sys.modules.setdefault("torchvision.models.utils", _shim)

# LibMTL 1.1.5 was written for torch 1.x, whose zero_grad() zeroed the
# gradients; torch 2's sets them to None, and LibMTL's gradient methods
# (PCGrad's _reset_grad) then write into a None gradient. Restore torch 1.x's
# default for this process.
_zero_grad = torch.nn.Module.zero_grad
torch.nn.Module.zero_grad = lambda self, set_to_none=False: _zero_grad(self, set_to_none)
from LibMTL.architecture import HPS  # noqa: E402
from LibMTL.model import resnet_dilated  # noqa: E402
from LibMTL import weighting as weighting_lib  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--weighting", default="EW")
  ap.add_argument("--size", default="144x192")
  ap.add_argument("--batch", type=int, default=2)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--threads", type=int, default=1)
  a = ap.parse_args()
  torch.set_num_threads(a.threads)
  torch.manual_seed(0)
  h, w = (int(v) for v in a.size.split("x"))
  tasks = {"segmentation": 13, "depth": 1, "normal": 3}
  decoders = torch.nn.ModuleDict({t: DeepLabHead(2048, c) for t, c in tasks.items()})

  class Model(HPS, getattr(weighting_lib, a.weighting)):
    def __init__(self):
      super().__init__(task_name=list(tasks), encoder_class=lambda: resnet_dilated(
          "resnet50", pretrained=False), decoders=decoders, rep_grad=False, multi_input=False,
                       device=torch.device("cpu"))
      self.init_param()
  model = Model()
  model.train()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-5)
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.normal(size=(a.batch, 3, h, w)), dtype=torch.float32)
  seg = torch.tensor(rng.integers(-1, 13, (a.batch, h, w)), dtype=torch.long)
  depth = torch.tensor(rng.uniform(0.5, 10, (a.batch, 1, h, w)), dtype=torch.float32)
  normal = torch.tensor(rng.normal(size=(a.batch, 3, h, w)), dtype=torch.float32)
  normal = normal / normal.norm(dim=1, keepdim=True)
  weight_args = {"EW": {}, "PCGrad": {}, "MGDA": {"mgda_gn": "none"}}[a.weighting]

  def losses_of(preds):
    preds = {t: F.interpolate(p, (h, w), mode="bilinear", align_corners=True)
             for t, p in preds.items()}
    l_seg = F.cross_entropy(preds["segmentation"], seg, ignore_index=-1)
    mask = (depth != 0).float()
    l_depth = torch.sum(torch.abs(preds["depth"] - depth) * mask) / torch.sum(mask)
    pn = preds["normal"] / preds["normal"].norm(p=2, dim=1, keepdim=True)
    nmask = (torch.sum(normal, dim=1) != 0).float().unsqueeze(1)
    l_normal = 1 - torch.sum((pn * normal) * nmask) / torch.sum(nmask)
    return torch.stack([l_seg, l_depth, l_normal])

  def step():
    preds = model(x)
    losses = losses_of(preds)
    opt.zero_grad(set_to_none=False)
    model.backward(losses, **weight_args)
    opt.step()
  for _ in range(a.warmup):
    step()
  for _ in range(a.steps):
    t = time.perf_counter()
    step()
    print(json.dumps({"weighting": a.weighting, "ms": (time.perf_counter() - t) * 1e3}),
          flush=True)


if __name__ == "__main__":
  main()
