"""A Vision Transformer encoder (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words"; issue 26) in the layout of Hugging Face's ``ViTModel``, so that
``google/vit-*`` checkpoints import one tensor per parameter
(:func:`mtljax.pretrained.vit_variables`).

The forward, the paper's equations 1-4 with HF's choices where they differ:

* eq. 1: ``z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos``. The patch
  embedding ``E`` is HF's ``Conv2d(kernel=stride=patch)``, written as one
  matmul over the non-overlapping ``P x P x C`` patches (row-major over the
  patch grid, each patch flattened in ``(row, column, channel)`` order), with
  a bias (the paper's ``E`` has none; HF's and big_vision's convolution has one).
* eq. 2-3 (pre-LN blocks): ``z' = MSA(LN_before(z)) + z``,
  ``z = MLP(LN_after(z')) + z'``; MSA with per-head scaled dot-product
  attention (scale ``1/sqrt(D/heads)``), query/key/value/output projections
  with biases; MLP ``dense(mlp_dim) -> GELU -> dense(D)``; GELU is the exact
  erf form (HF's ``hidden_act="gelu"``, the original JAX code's
  ``nn.gelu(approximate=False)``).
* eq. 4: ``y = LN(z_L^0)``: the final layer norm's output at the class token
  is the representation (``[B, width]``). HF's ``pooler`` (``tanh(dense(.))``
  of that token) is not part of the encoder: the paper's fine-tuning replaces
  the pre-training head's hidden layer by one linear layer
  (``ViTForImageClassification`` reads ``LN(z_L^0)`` too), and here the
  per-task heads are that layer. A pooler in a checkpoint is ignored.

Layer norms use torch's two-pass variance and HF's ``layer_norm_eps``
(``1e-12`` by default; the original JAX ViT uses ``1e-6``: set ``eps``).
Dropout is not applied (the model interface has no dropout key;
``hidden_dropout_prob`` of HF's configs is 0.0 for ViT anyway).

Parameter tree (the layer groups of fine-tuning, input to output):
``embeddings/{patch/{kernel [P*P*C, D], bias}, cls_token [1, 1, D],
position_embeddings [1, N+1, D]}``, ``layer_{i}/{layernorm_before,
query, key, value, output, layernorm_after, mlp_in, mlp_out}`` (Dense
kernels ``[in, out]``), ``norm/{scale, bias}``.

Initialisation from scratch follows big_vision's ViT: Xavier-uniform
kernels with zero biases, the class token zero, the position embeddings
``N(0, 1/D)``, the patch embedding LeCun-normal (flax's convolution default).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def patchify(x, patch: int):
  """``[B, H, W, C]`` -> ``[B, (H/P)*(W/P), P*P*C]``: the non-overlapping
  patches, row-major over the grid, each flattened ``(row, column, channel)``."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // patch, patch, w // patch, patch, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class Embeddings(nn.Module):
  """Eq. 1: patch embedding, class token, learned position embeddings."""
  width: int
  patch: int

  @nn.compact
  def __call__(self, x):
    p = patchify(x, self.patch)
    tokens = nn.Dense(self.width, name="patch")(p)
    cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.width))
    pos = self.param("position_embeddings", nn.initializers.normal(self.width ** -0.5),
                     (1, p.shape[1] + 1, self.width))
    cls = jnp.broadcast_to(cls.astype(tokens.dtype), (tokens.shape[0], 1, self.width))
    return jnp.concatenate([cls, tokens], axis=1) + pos


def _dense(features, name):
  return nn.Dense(features, kernel_init=nn.initializers.xavier_uniform(), name=name)


def _layer_norm(eps, name):
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, name=name)


class Block(nn.Module):
  """Eqs. 2-3: one pre-LN transformer block."""
  width: int
  heads: int
  mlp_dim: int
  eps: float

  @nn.compact
  def __call__(self, z):
    b, n, d = z.shape
    hd = d // self.heads
    h = _layer_norm(self.eps, "layernorm_before")(z)

    def split(t):  # [B, N, D] -> [B, heads, N, hd]
      return t.reshape(b, n, self.heads, hd).transpose(0, 2, 1, 3)
    q, k, v = (split(_dense(d, name)(h)) for name in ("query", "key", "value"))
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
    att = jax.nn.softmax(logits, axis=-1)
    o = jnp.einsum("bhqk,bhkd->bhqd", att, v).transpose(0, 2, 1, 3).reshape(b, n, d)
    z = _dense(d, "output")(o) + z
    h = _layer_norm(self.eps, "layernorm_after")(z)
    h = jax.nn.gelu(_dense(self.mlp_dim, "mlp_in")(h), approximate=False)
    return _dense(d, "mlp_out")(h) + z


class ViT(nn.Module):
  """The encoder (module docstring): images ``[B, H, W, C]`` (or ``[B, H, W]``:
  one channel) -> ``LN(z_L^0)`` ``[B, width]``; with ``tokens=True`` every
  token's final-norm output ``[B, N+1, width]`` (HF's ``last_hidden_state``).
  ``z`` (a task descriptor) is refused: the ViT is not conditioned."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch: int
  eps: float  # (the defaults: mtljax.models.parts.Trunk's vit_* fields)

  @nn.compact
  def __call__(self, x, z=None, tokens: bool = False):
    if z is not None:
      raise ValueError("the ViT encoder is not conditioned on a task descriptor.")
    if x.ndim == 3:
      x = x[..., None]
    h = Embeddings(self.width, self.patch, name="embeddings")(x)
    for i in range(self.depth):
      h = Block(self.width, self.heads, self.mlp_dim, self.eps, name=f"layer_{i}")(h)
    h = _layer_norm(self.eps, "norm")(h)
    return h if tokens else h[:, 0]


def layer_names(depth: int) -> tuple[str, ...]:
  """The parameter groups, input to output."""
  return ("embeddings",) + tuple(f"layer_{i}" for i in range(depth)) + ("norm",)


# ----------------------------------------------------------------------------
# Position embeddings for another image size (fine-tuning at a new resolution).
# ----------------------------------------------------------------------------

BICUBIC_A = -0.75  # torch's (and PIL's) cubic convolution coefficient


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """``[n_out, n_in]`` float64 weights of torch's 1-D bicubic resize
  (``interpolate(mode="bicubic", align_corners=False)`` given ``size``, no
  antialiasing): output ``i`` reads ``s = (i + 0.5) n_in / n_out - 0.5``
  with Keys' cubic convolution (``a = -0.75``) on the four inputs
  ``floor(s) - 1 .. floor(s) + 2``, clamped to the border (an index outside
  repeats the edge). ``n_in == n_out`` is the identity."""
  a = BICUBIC_A

  def near(t):  # |t| <= 1
    return ((a + 2) * t - (a + 3)) * t * t + 1

  def far(t):   # 1 < |t| < 2
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
  m = np.zeros((n_out, n_in))
  for i in range(n_out):
    s = (i + 0.5) * n_in / n_out - 0.5
    f = int(np.floor(s))
    t = s - f
    for k, w in zip((f - 1, f, f + 1, f + 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      m[i, min(max(k, 0), n_in - 1)] += w
  return m


def resample_position_embeddings(pos, src_grid, dst_grid) -> np.ndarray:
  """Position embeddings ``[1, 1 + h w, D]`` of a ``src_grid = (h, w)``
  patch grid, resized to ``dst_grid = (h', w')`` as Hugging Face's
  ``ViTEmbeddings.interpolate_pos_encoding`` and timm's
  ``resample_abs_pos_embed`` do (the ViT paper's "2D interpolation of the
  pre-trained position embeddings"): the class token's row kept, the patch
  rows as an ``h x w`` image of ``D`` channels resized bicubically
  (:func:`bicubic_matrix`, in float64 here; the result in ``pos``' dtype).
  Done once when the checkpoint is loaded (timm's and big_vision's way);
  the resized embeddings are then parameters like any other."""
  pos = np.asarray(pos)
  (h, w), (h2, w2) = tuple(src_grid), tuple(dst_grid)
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[1] != 1 + h * w:
    raise ValueError(f"position embeddings of shape {pos.shape} are not [1, 1 + {h}*{w}, D] "
                     f"for a {h}x{w} patch grid")
  grid = pos[0, 1:].astype(np.float64).reshape(h, w, -1)
  out = np.einsum("ih,hwd,jw->ijd", bicubic_matrix(h, h2), grid, bicubic_matrix(w, w2))
  rows = np.concatenate([pos[0, :1].astype(np.float64), out.reshape(h2 * w2, -1)])
  return rows[None].astype(pos.dtype)
