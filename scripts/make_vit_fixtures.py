"""Writes the Hugging Face ViT fixtures of ``tests/test_vit.py`` (issue 26).

torch and transformers are not dependencies of mtljax; this script runs once,
in a virtual environment outside the project that has them::

  /work/peers/torch/bin/pip install torch transformers safetensors
  /work/peers/torch/bin/python scripts/make_vit_fixtures.py

It builds a tiny random ``transformers.ViTModel`` (:data:`CONFIG`: width 16,
2 layers, 2 heads, MLP 32, patch 4, 8x8 RGB images, with the pooler), gives
every parameter a value from a numpy seed with a scale that makes each
layer matter (HF's own init, N(0, 0.02) with unit layer norms, leaves the
blocks close to the identity), and writes under ``tests/data/vit_tiny/`` (KBs):

* ``model.safetensors`` and ``config.json``: ``model.save_pretrained(...)``
  (the float32 weights, in the layout transformers writes: the Hub's
  ``embeddings.* / encoder.layer.{i}.* / layernorm.* / pooler.*``);
* ``outputs.npz``: the float64 forward of the same weights (``model.double()``,
  eval mode) on :func:`numpy_input`: ``pixel_values`` (NCHW, float32 values),
  ``last_hidden_state`` ``[B, N+1, D]``, ``pooler_output`` ``[B, D]``, and
  ``keys`` (the file's key names, in order), ``transformers_version``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

CONFIG = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
              image_size=8, patch_size=4, num_channels=3, hidden_act="gelu",
              layer_norm_eps=1e-12, qkv_bias=True, hidden_dropout_prob=0.0,
              attention_probs_dropout_prob=0.0)
BATCH = 2
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                   "vit_tiny")


def numpy_input(batch: int = BATCH) -> np.ndarray:
  """The fixture's pixel values, NCHW float32."""
  c, s = CONFIG["num_channels"], CONFIG["image_size"]
  return np.random.default_rng(1).normal(size=(batch, c, s, s)).astype(np.float32)


def numpy_value(name: str, shape, rng) -> np.ndarray:
  """A parameter's fixture value: layer-norm scales 1 + N(0, 0.2^2), every
  other tensor N(0, s^2) with s = 1/sqrt(fan_in) for matrices (0.5 for
  vectors, the class token and position embeddings)."""
  if "layernorm" in name and name.endswith("weight"):
    return (1.0 + 0.2 * rng.normal(size=shape)).astype(np.float32)
  vector = len(shape) == 1 or name.endswith(("cls_token", "position_embeddings"))
  scale = 0.5 if vector else 1.0 / np.sqrt(np.prod(shape[1:]))
  return (scale * rng.normal(size=shape)).astype(np.float32)


def main() -> int:
  import torch
  import transformers

  torch.manual_seed(0)
  model = transformers.ViTModel(transformers.ViTConfig(**CONFIG), add_pooling_layer=True).eval()
  rng = np.random.default_rng(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.from_numpy(numpy_value(name, tuple(p.shape), rng)))
  os.makedirs(OUT, exist_ok=True)
  model.save_pretrained(OUT, safe_serialization=True)
  from safetensors.numpy import load_file
  keys = list(load_file(os.path.join(OUT, "model.safetensors")))
  x = numpy_input()
  m64 = model.double()
  with torch.no_grad():
    out = m64(pixel_values=torch.from_numpy(x).double())
  np.savez(os.path.join(OUT, "outputs.npz"), pixel_values=x,
           last_hidden_state=out.last_hidden_state.numpy(),
           pooler_output=out.pooler_output.numpy(), keys=np.array(keys),
           transformers_version=np.array(transformers.__version__))
  with open(os.path.join(OUT, "config.json")) as f:
    cfg = json.load(f)
  print(f"wrote {OUT}: {len(keys)} tensors, transformers {transformers.__version__}, "
        f"config {sorted(cfg)}")
  print("\n".join(keys))
  return 0


if __name__ == "__main__":
  sys.exit(main())
