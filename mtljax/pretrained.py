"""Pretrained weights: torchvision ResNet state dicts into mtljax's ResNet
variables and Hugging Face ViT checkpoints into mtljax's ViT (issue 26), read
without torch, and an export back to flax msgpack or Orbax.

Interface
---------
* :func:`read_state_dict(path)` -> ``{key: numpy array}`` in the file's order,
  from a ``torch.save`` file (``.pth`` / ``.pt`` / ``.bin``: the zip format of
  torch >= 1.6, or the older magic-number pickle stream that e.g. the original
  ``resnet50-19c8e357.pth`` that LibMTL downloads uses), a ``.safetensors`` file or an
  ``.npz``. A torch file is unpickled by a restricted unpickler that knows
  only ``collections.OrderedDict``, torch's tensor-rebuild functions and its
  storage types (no code from the file runs): each tensor becomes a numpy
  array from its storage bytes, offset, size and strides (views sharing a
  storage come out as copies); bfloat16 as ``ml_dtypes.bfloat16``.
* :func:`resnet_variables(state_dict, depth, fc="ignore", prefix="")` ->
  ``{"params", "batch_stats"}`` for
  ``mtljax.models.backbones.resnet.ResNet(depth=...)`` at any output stride,
  with ``norm="batch"``.
* :func:`deeplab_head_variables(state_dict, prefix)` -> the same for a
  LibMTL ``DeepLabHead`` (``DeepLabHead`` here).
* :func:`import_torchvision_resnet(path, depth, fc="ignore", prefix="")`:
  :func:`read_state_dict` then :func:`resnet_variables`.
* :func:`import_hf_vit(path, heads=None)` -> ``(variables, cfg)``: a Hugging
  Face ``ViTModel`` (or ``ViTForImageClassification``: keys under ``vit.``)
  state dict into :class:`mtljax.models.backbones.vit.ViT`'s ``params``, its
  sizes from the ``config.json`` beside the file or the tensors' shapes
  (:func:`vit_config`, :func:`vit_variables`; the mapping is in
  :func:`_vit_table`: ``embeddings.*`` -> ``embeddings/*``, the patch
  convolution ``[D, C, P, P]`` -> a kernel ``[P*P*C, D]`` over patches
  flattened (row, column, channel), ``encoder.layer.{i}.attention.attention.
  {query,key,value}`` / ``attention.output.dense`` / ``intermediate.dense`` /
  ``output.dense`` / ``layernorm_{before,after}`` -> ``layer_{i}/{query,key,
  value,output,mlp_in,mlp_out,layernorm_before,layernorm_after}`` (linear
  weights transposed), ``layernorm`` -> ``norm``; ``pooler.*``,
  ``classifier.*`` and ``embeddings.mask_token`` ignored; the same missing /
  mismatched / unused report).
* :func:`export_variables(variables, path)` / :func:`load_exported(path)`:
  ``*.msgpack`` -> flax's msgpack serialisation of the tree (one file),
  anything else -> an Orbax ``StandardCheckpointer`` directory.

Mapping
-------
torchvision names -> the parameter tree's (``block{i}`` for the ``i``-th block
of a stage; ``stem`` holds ``conv1`` / ``bn1``):

==================================  =============================================
``conv1.weight``                    ``params/stem/conv1/kernel``
``bn1.{weight,bias}``               ``params/stem/bn1/{scale,bias}``
``bn1.{running_mean,running_var}``  ``batch_stats/stem/bn1/{mean,var}``
``layerS.i.convK.weight``           ``params/layerS/block{i}/convK/kernel``
``layerS.i.downsample.0.weight``    ``params/layerS/block{i}/downsample_conv/kernel``
``layerS.i.downsample.1.*``         ``.../block{i}/downsample_bn/*``
``fc.weight`` / ``fc.bias``         ``params/fc/kernel`` (transposed) / ``bias``
==================================  =============================================

Convolution weights are ``OIHW`` in torch and ``HWIO`` here
(``transpose(2, 3, 1, 0)``); a linear weight ``[out, in]`` becomes the kernel
``[in, out]``. ``num_batches_tracked`` is not used (the momentum is fixed at
torch's 0.1, so torch does not read it either). Every key of the model must
be in the file with its shape and every key of the file must be used, else a
:class:`~mtljax.errors.CheckpointError` lists the missing keys, the unused
keys and the shape mismatches in one line. ``fc``: ``"ignore"`` (the dense
backbones: an ``fc`` in the file is dropped, a missing one is fine) or
``"load"`` (it must be there; the model needs ``num_classes`` = its rows).
``prefix`` selects a sub-module's keys (``"encoder."`` of a LibMTL model).
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from mtljax.errors import CheckpointError
from mtljax.models.backbones.resnet import DEPTHS, EXPANSION

# torch's storage classes -> numpy dtypes
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
FC_MODES = ("ignore", "load")


# ----------------------------------------------------------------------------
# reading


class _Storage:
  """A storage named in the pickle; its bytes are read when first used."""

  def __init__(self, dtype, key, numel, read):
    self.dtype, self.key, self.numel, self._read, self._array = dtype, key, numel, read, None

  @property
  def array(self) -> np.ndarray:
    if self._array is None:
      self._array = self._read(self)
    return self._array


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused
  size, stride = tuple(int(a) for a in size), tuple(int(a) for a in stride)
  arr = storage.array
  if any(s < 0 for s in size) or any(s < 0 for s in stride):
    raise CheckpointError(f"tensor with a negative size or stride {size} {stride}")
  if int(np.prod(size)) == 0:
    return np.zeros(size, arr.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if offset < 0 or last >= arr.size:
    raise CheckpointError(f"tensor of size {size} at offset {offset} runs past its storage "
                          f"of {arr.size} elements (a truncated file?)")
  if not size:  # as_strided would return shape (1,) for a scalar
    return np.array(arr[offset])
  view = np.lib.stride_tricks.as_strided(
      arr[offset:], shape=size, strides=tuple(s * arr.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad=None, backward_hooks=None, *unused):
  del requires_grad, backward_hooks, unused
  return data


class _StorageType:
  def __init__(self, name):
    self.name = name


class _Unpickler(pickle.Unpickler):
  """Knows only what a state dict of tensors needs; anything else (a pickled
  ``nn.Module``, arbitrary callables) is refused."""

  def __init__(self, file, load_storage, what):
    super().__init__(file)
    self._load_storage, self._what = load_storage, what

  def find_class(self, module, name):
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
      return _rebuild_tensor
    if module == "torch._utils" and name in ("_rebuild_parameter",
                                             "_rebuild_parameter_with_state"):
      return _rebuild_parameter
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise CheckpointError(
        f"{self._what}: the file needs {module}.{name} to load, which is not part of a "
        "state dict of tensors; save model.state_dict() (not the model) and try again")

  def persistent_load(self, pid):
    return self._load_storage(pid)


def _storage_dtype(storage_type, what):
  if isinstance(storage_type, _StorageType):
    return np.dtype(_STORAGE_DTYPES[storage_type.name])
  raise CheckpointError(f"{what}: unknown storage type {storage_type!r}")


def _read_torch_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise CheckpointError(f"{path}: a zip file but not one torch.save wrote "
                            f"(no single */data.pkl among {len(names)} entries)")
    root = pkl[0][:-len("data.pkl")]
    big = (z.read(root + "byteorder").decode().strip() == "big"
           if root + "byteorder" in names else False)
    cache: dict[str, _Storage] = {}

    def read(st: _Storage) -> np.ndarray:
      name = f"{root}data/{st.key}"
      if name not in names:
        raise CheckpointError(f"{path}: storage {st.key} is missing from the archive")
      raw = z.read(name)
      dt = st.dtype.newbyteorder(">") if big else st.dtype
      if len(raw) < st.numel * dt.itemsize:
        raise CheckpointError(f"{path}: storage {st.key} has {len(raw)} bytes, "
                              f"{st.numel * dt.itemsize} expected (a truncated file?)")
      return np.frombuffer(raw, dt, count=st.numel).astype(st.dtype)

    def load_storage(pid):
      if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise CheckpointError(f"{path}: unknown persistent id {pid!r:.60}")
      _, storage_type, key, _location, numel = pid[:5]
      if key not in cache:
        cache[key] = _Storage(_storage_dtype(storage_type, path), str(key), int(numel), read)
      return cache[key]

    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), load_storage, path).load()
    for st in cache.values():  # read the bytes while the archive is open
      st.array  # noqa: B018
  return obj


def _read_torch_legacy(path: str) -> Any:
  """The pre-1.6 ``torch.save`` stream: pickles of the magic number, the
  protocol version and system info, the object (storages as persistent
  ids), the list of storage keys, then per key an 8-byte element count and
  the raw little-endian bytes."""
  with open(path, "rb") as f:
    def small():
      return _Unpickler(f, lambda pid: None, path).load()
    if small() != _LEGACY_MAGIC:
      raise CheckpointError(f"{path}: not a torch.save file (neither the zip format nor the "
                            "legacy magic number; a tar archive from torch < 0.4?)")
    small()  # protocol version
    sys_info = small()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
      raise CheckpointError(f"{path}: a big-endian legacy torch file is not supported")
    storages: dict[str, _Storage] = {}
    views = []

    def load_storage(pid):
      if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
        raise CheckpointError(f"{path}: unknown persistent id {pid!r:.60}")
      _, storage_type, key, _location, numel, view_metadata = pid
      key = str(key)
      if key not in storages:
        storages[key] = _Storage(_storage_dtype(storage_type, path), key, int(numel), None)
      if view_metadata is not None:  # (view key, offset, size) of an old storage view
        view_key, off, size = view_metadata
        v = _Storage(storages[key].dtype, str(view_key), int(size), None)
        views.append((v, storages[key], int(off)))
        return v
      return storages[key]

    # tensors are rebuilt after the bytes are read: defer with lazy storages
    pending = []

    def deferred_rebuild(storage, offset, size, stride, *unused):
      box = [storage, offset, size, stride]
      pending.append(box)
      return box

    class _Lazy(_Unpickler):
      def find_class(self, module, name):
        fn = super().find_class(module, name)
        return deferred_rebuild if fn is _rebuild_tensor else fn

    obj = _Lazy(f, load_storage, path).load()
    keys = small()
    for key in keys:
      (numel,) = struct.unpack("<q", f.read(8))
      st = storages[str(key)]
      raw = f.read(numel * st.dtype.itemsize)
      if len(raw) < numel * st.dtype.itemsize:
        raise CheckpointError(f"{path}: storage {key} is truncated")
      st._array = np.frombuffer(raw, st.dtype).copy()
    for v, base, off in views:
      v._array = base.array[off:off + v.numel]

  def resolve(o):
    if isinstance(o, list) and len(o) == 4 and isinstance(o[0], _Storage) and any(
        o is p for p in pending):
      return _rebuild_tensor(*o)
    if isinstance(o, dict):
      return type(o)((k, resolve(v)) for k, v in o.items())
    return o
  return resolve(obj)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    try:
      header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
      raise CheckpointError(f"{path}: the safetensors header is not JSON ({e})") from None
    data = f.read()
  out = {}
  for k, meta in header.items():
    if k == "__metadata__":
      continue
    if meta["dtype"] not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {k} has dtype {meta['dtype']}, not supported")
    dt = np.dtype(_SAFETENSORS_DTYPES[meta["dtype"]])
    a, b = meta["data_offsets"]
    shape = tuple(meta["shape"])
    if b > len(data) or b - a != int(np.prod(shape)) * dt.itemsize:
      raise CheckpointError(f"{path}: tensor {k}'s bytes [{a}, {b}) do not fit its shape "
                            f"{shape} or the file (a truncated file?)")
    out[k] = np.frombuffer(data[a:b], dt.newbyteorder("<")).astype(dt).reshape(shape)
  return out


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """``{key: array}`` from a torch.save file, a .safetensors file or an .npz
  (the module docstring); a :class:`CheckpointError` naming the file for
  anything else."""
  if not os.path.isfile(path):
    raise CheckpointError(f"{path}: no such weights file")
  try:
    if path.endswith(".safetensors"):
      sd = _read_safetensors(path)
    elif path.endswith(".npz"):
      with np.load(path, allow_pickle=False) as z:
        sd = {k: z[k] for k in z.files}
    elif zipfile.is_zipfile(path):
      sd = _read_torch_zip(path)
    else:
      sd = _read_torch_legacy(path)
  except CheckpointError:
    raise
  except (OSError, ValueError, EOFError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile,
          struct.error, TypeError) as e:
    raise CheckpointError(f"{path}: cannot read it as a state dict "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                          ) from None
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]  # a checkpoint dict that holds the state dict
  if not isinstance(sd, dict) or not all(isinstance(v, np.ndarray) for v in sd.values()):
    raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict of tensors")
  return dict(sd)


# ----------------------------------------------------------------------------
# mapping

_BN = (("weight", "params", "scale"), ("bias", "params", "bias"),
       ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def _conv(t: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(t.transpose(2, 3, 1, 0))


def _resnet_table(depth: int, fc_shape: tuple[int, int] | None):
  """torch key -> (collection, path, expected torch shape, transform)."""
  if depth not in DEPTHS:
    raise ValueError(f"depth must be one of {tuple(DEPTHS)}, got {depth!r}")
  kind, counts = DEPTHS[depth]
  table = {}

  def conv(tk, path, o, i, k):
    table[tk + ".weight"] = ("params", path + ("kernel",), (o, i, k, k), _conv)

  def bn(tk, path, c):
    for t, coll, leaf in _BN:
      table[f"{tk}.{t}"] = (coll, path + (leaf,), (c,), None)

  conv("conv1", ("stem", "conv1"), 64, 3, 7)
  bn("bn1", ("stem", "bn1"), 64)
  in_ch = 64
  for s, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
    out_ch = planes * EXPANSION[kind]
    for i in range(n):
      tk, path = f"layer{s + 1}.{i}", (f"layer{s + 1}", f"block{i}")
      cin = in_ch if i == 0 else out_ch
      if kind == "basic":
        convs = ((planes, cin, 3), (planes, planes, 3))
      else:
        convs = ((planes, cin, 1), (planes, planes, 3), (out_ch, planes, 1))
      for j, (o, ci, k) in enumerate(convs):
        conv(f"{tk}.conv{j + 1}", path + (f"conv{j + 1}",), o, ci, k)
        bn(f"{tk}.bn{j + 1}", path + (f"bn{j + 1}",), o)
      if i == 0 and (s > 0 or in_ch != out_ch):
        conv(f"{tk}.downsample.0", path + ("downsample_conv",), out_ch, in_ch, 1)
        bn(f"{tk}.downsample.1", path + ("downsample_bn",), out_ch)
    in_ch = out_ch
  if fc_shape is not None:
    table["fc.weight"] = ("params", ("fc", "kernel"), fc_shape, lambda t: np.ascontiguousarray(t.T))
    table["fc.bias"] = ("params", ("fc", "bias"), fc_shape[:1], None)
  return table


def _head_table(sd_shapes: dict[str, tuple], prefix: str):
  """LibMTL ``DeepLabHead`` keys (``0.convs.k...``, ``0.project.*``, ``1``,
  ``2``, ``4``) -> the parameter tree of ``DeepLabHead``; channel counts read
  from the file's ``0.convs.0.0.weight`` and ``4.weight``."""
  p = prefix
  k0 = sd_shapes.get(p + "0.convs.0.0.weight")
  kc = sd_shapes.get(p + "4.weight")
  if k0 is None or kc is None:
    raise CheckpointError(f"no DeepLabHead under prefix {prefix!r}: "
                          f"{p}0.convs.0.0.weight or {p}4.weight is missing")
  c, cin, nout = k0[0], k0[1], kc[0]
  table = {}

  def conv(tk, name, o, i, k):
    table[p + tk + ".weight"] = ("params", (name, "kernel"), (o, i, k, k), _conv)

  def bn(tk, name, ch):
    for t, coll, leaf in _BN:
      table[f"{p}{tk}.{t}"] = (coll, (name, leaf), (ch,), None)

  conv("0.convs.0.0", "branch0_conv", c, cin, 1)
  bn("0.convs.0.1", "branch0_bn", c)
  for r in (1, 2, 3):
    conv(f"0.convs.{r}.0", f"branch{r}_conv", c, cin, 3)
    bn(f"0.convs.{r}.1", f"branch{r}_bn", c)
  conv("0.convs.4.1", "pool_conv", c, cin, 1)
  bn("0.convs.4.2", "pool_bn", c)
  conv("0.project.0", "project_conv", c, 5 * c, 1)
  bn("0.project.1", "project_bn", c)
  conv("1", "head_conv", c, c, 3)
  bn("2", "head_bn", c)
  conv("4", "classifier", nout, c, 1)
  table[p + "4.bias"] = ("params", ("classifier", "bias"), (nout,), None)
  return table


def _apply_table(sd: dict[str, np.ndarray], table, prefix: str, ignore, what: str):
  missing = [k for k in table if k not in sd]
  mismatched = [f"{k} {tuple(sd[k].shape)} (expected {table[k][2]})" for k in table
                if k in sd and tuple(sd[k].shape) != tuple(table[k][2])]
  unused = [k for k in sd if k.startswith(prefix) and k not in table and not ignore(k)]
  if missing or mismatched or unused:
    parts = []
    for name, ks in (("missing", missing), ("shape mismatches", mismatched), ("unused", unused)):
      if ks:
        more = f" and {len(ks) - 8} more" if len(ks) > 8 else ""
        parts.append(f"{len(ks)} {name}: {', '.join(ks[:8])}{more}")
    raise CheckpointError(f"{what} does not match: " + "; ".join(parts))
  out: dict = {"params": {}, "batch_stats": {}}
  for k, (coll, path, _, fn) in table.items():
    node = out[coll]
    for part in path[:-1]:
      node = node.setdefault(part, {})
    v = np.asarray(sd[k])
    if v.dtype == ml_dtypes.bfloat16 or v.dtype == np.float16 or v.dtype == np.float64:
      v = v.astype(np.float32)
    node[path[-1]] = fn(v) if fn else np.array(v)
  return out


def resnet_variables(state_dict: dict[str, np.ndarray], depth: int, *, fc: str = "ignore",
                     prefix: str = "", what: str = "the state dict") -> dict:
  """``{"params", "batch_stats"}`` of ``ResNet(depth)`` (``norm="batch"``)
  from a torchvision state dict (the module docstring's mapping and checks)."""
  if fc not in FC_MODES:
    raise ValueError(f"fc must be one of {FC_MODES}, got {fc!r}")
  sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  fc_shape = None
  if fc == "load":  # the file's classes; a missing fc is reported as missing
    w = sd.get("fc.weight")
    fc_shape = tuple(w.shape) if w is not None and w.ndim == 2 else (-1, -1)
  table = _resnet_table(depth, fc_shape)

  def ignore(k):
    return k.endswith(".num_batches_tracked") or (fc == "ignore" and k in ("fc.weight", "fc.bias"))
  return _apply_table(sd, table, "", ignore, f"{what} (torchvision ResNet-{depth})")


def deeplab_head_variables(state_dict: dict[str, np.ndarray], prefix: str = "",
                           what: str = "the state dict") -> dict:
  """``{"params", "batch_stats"}`` of ``DeepLabHead`` from a LibMTL
  ``DeepLabHead`` state dict (keys under ``prefix``)."""
  table = _head_table({k: tuple(v.shape) for k, v in state_dict.items()}, prefix)
  return _apply_table(state_dict, table, prefix, lambda k: k.endswith(".num_batches_tracked"),
                      f"{what} (LibMTL DeepLabHead under {prefix!r})")


def import_torchvision_resnet(path: str, depth: int, *, fc: str = "ignore",
                              prefix: str = "") -> dict:
  """:func:`read_state_dict` + :func:`resnet_variables`; errors name ``path``."""
  return resnet_variables(read_state_dict(path), depth, fc=fc, prefix=prefix, what=path)


# ----------------------------------------------------------------------------
# Hugging Face ViT

# config.json keys of a ViT -> what the model needs; the defaults are
# transformers' ViTConfig's (used for a key config.json lacks).
VIT_CONFIG_DEFAULTS = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 3072, "patch_size": 16, "image_size": 224,
                       "num_channels": 3, "layer_norm_eps": 1e-12, "hidden_act": "gelu",
                       "qkv_bias": True}
# Keys that are not the encoder's: HF's pooler (tanh(dense(cls))) and a
# ViTForImageClassification's classifier (the per-task heads replace both;
# mtljax.models.backbones.vit explains why), and the mask token of masked
# image modelling (pre-training only).
VIT_IGNORED = ("pooler.", "classifier.", "embeddings.mask_token")


def _vit_prefix(keys) -> str:
  """``"vit."`` when the encoder's keys carry it (ViTForImageClassification,
  ViTForMaskedImageModeling), else ``""``."""
  return "vit." if any(k.startswith("vit.embeddings.") for k in keys) else ""


def vit_config(state_dict: dict[str, np.ndarray], config_json: dict | None = None, *,
               heads: int | None = None, what: str = "the state dict") -> dict:
  """The ViT's sizes (the keys of :data:`VIT_CONFIG_DEFAULTS`, ``image_size``
  as ``(height, width)``): from
  ``config_json`` (HF's ``config.json``) when given, else inferred from the
  tensors' shapes (the number of heads is not in them: ``heads`` must be
  given; ``layer_norm_eps`` is then HF's default, 1e-12). Raises a one-line
  :class:`CheckpointError` for a config that is not a ViT's, an activation
  other than exact GELU, a non-square patch, or a state dict with no
  ViT embeddings."""
  p = _vit_prefix(state_dict)
  if config_json is not None:
    kind = config_json.get("model_type", "vit")
    if kind != "vit":
      raise CheckpointError(f"{what}: config.json has model_type={kind!r}, not 'vit'")
    cfg = {k: config_json.get(k, d) for k, d in VIT_CONFIG_DEFAULTS.items()}
    patch = cfg["patch_size"]
    if isinstance(patch, (list, tuple)):
      if len(set(patch)) != 1:
        raise CheckpointError(f"{what}: config.json's patch_size={patch} is not square; only "
                              "square patches are supported")
      cfg["patch_size"] = patch[0]
    size = cfg["image_size"]
    cfg["image_size"] = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
  else:
    cls = state_dict.get(p + "embeddings.cls_token")
    proj = state_dict.get(p + "embeddings.patch_embeddings.projection.weight")
    pos = state_dict.get(p + "embeddings.position_embeddings")
    mlp = state_dict.get(p + "encoder.layer.0.intermediate.dense.weight")
    absent = [n for n, v in (("embeddings.cls_token", cls), ("embeddings.patch_embeddings."
                             "projection.weight", proj), ("embeddings.position_embeddings", pos),
                             ("encoder.layer.0.intermediate.dense.weight", mlp)) if v is None]
    if absent:
      raise CheckpointError(f"{what}: not a Hugging Face ViT state dict (no {p}{absent[0]}) and "
                            "no config.json beside it")
    if heads is None:
      raise CheckpointError(f"{what}: the number of attention heads is not in the tensors' "
                            "shapes; put the checkpoint's config.json beside it")
    grid = int(round(np.sqrt(pos.shape[1] - 1)))
    if grid * grid != pos.shape[1] - 1:
      raise CheckpointError(f"{what}: position embeddings for {pos.shape[1] - 1} patches, not a "
                            "square grid; put the checkpoint's config.json (its image_size) "
                            "beside it")
    layers = 0
    while f"{p}encoder.layer.{layers}.layernorm_before.weight" in state_dict:
      layers += 1
    cfg = {**VIT_CONFIG_DEFAULTS, "hidden_size": int(cls.shape[-1]), "num_hidden_layers": layers,
           "num_attention_heads": int(heads), "intermediate_size": int(mlp.shape[0]),
           "patch_size": int(proj.shape[-1]),
           "image_size": (grid * int(proj.shape[-1]),) * 2,
           "num_channels": int(proj.shape[1])}
  if cfg["hidden_act"] != "gelu":
    raise CheckpointError(f"{what}: hidden_act={cfg['hidden_act']!r}; the ViT encoder uses the "
                          "exact GELU ('gelu') only")
  if cfg["hidden_size"] % cfg["num_attention_heads"]:
    raise CheckpointError(f"{what}: hidden_size={cfg['hidden_size']} is not a multiple of "
                          f"num_attention_heads={cfg['num_attention_heads']}")
  return cfg


def _vit_table(cfg: dict, prefix: str):
  """HF ViTModel key -> (collection, path, expected torch shape, transform)."""
  d, m, pz, c = (cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"],
                 cfg["num_channels"])
  n = (cfg["image_size"][0] // pz) * (cfg["image_size"][1] // pz)
  table = {}

  def linear(tk, path, o, i, bias=True):
    table[f"{prefix}{tk}.weight"] = ("params", path + ("kernel",), (o, i),
                                     lambda t: np.ascontiguousarray(t.T))
    if bias:
      table[f"{prefix}{tk}.bias"] = ("params", path + ("bias",), (o,), None)

  def norm(tk, path):
    table[f"{prefix}{tk}.weight"] = ("params", path + ("scale",), (d,), None)
    table[f"{prefix}{tk}.bias"] = ("params", path + ("bias",), (d,), None)

  emb = ("embeddings",)
  table[prefix + "embeddings.cls_token"] = ("params", emb + ("cls_token",), (1, 1, d), None)
  table[prefix + "embeddings.position_embeddings"] = (
      "params", emb + ("position_embeddings",), (1, n + 1, d), None)
  # The patch convolution [D, C, P, P] as a matmul over patches flattened
  # (row, column, channel): kernel [P*P*C, D].
  table[prefix + "embeddings.patch_embeddings.projection.weight"] = (
      "params", emb + ("patch", "kernel"), (d, c, pz, pz),
      lambda t: np.ascontiguousarray(t.transpose(2, 3, 1, 0).reshape(-1, t.shape[0])))
  table[prefix + "embeddings.patch_embeddings.projection.bias"] = (
      "params", emb + ("patch", "bias"), (d,), None)
  for i in range(cfg["num_hidden_layers"]):
    tk, path = f"encoder.layer.{i}", (f"layer_{i}",)
    norm(tk + ".layernorm_before", path + ("layernorm_before",))
    for name in ("query", "key", "value"):
      linear(f"{tk}.attention.attention.{name}", path + (name,), d, d, bias=cfg["qkv_bias"])
    linear(tk + ".attention.output.dense", path + ("output",), d, d)
    norm(tk + ".layernorm_after", path + ("layernorm_after",))
    linear(tk + ".intermediate.dense", path + ("mlp_in",), m, d)
    linear(tk + ".output.dense", path + ("mlp_out",), d, m)
  norm("layernorm", ("norm",))
  return table


def vit_variables(state_dict: dict[str, np.ndarray], cfg: dict, *,
                  what: str = "the state dict") -> dict:
  """``{"params"}`` of :class:`mtljax.models.backbones.vit.ViT` with the sizes
  ``cfg`` (:func:`vit_config`) from a Hugging Face ``ViTModel`` state dict
  (keys optionally under ``vit.``; ``pooler.*``, ``classifier.*`` and
  ``embeddings.mask_token`` are not the encoder's and are ignored). Every key
  of the encoder must be in the file with its shape and every other key of
  the file must be one of those ignored, else one :class:`CheckpointError` line lists the missing, the
  mismatched and the unused keys."""
  if not cfg["qkv_bias"]:
    raise CheckpointError(f"{what}: qkv_bias=False; the ViT encoder has query/key/value biases")
  p = _vit_prefix(state_dict)
  table = _vit_table(cfg, p)

  def ignore(k):
    return k[len(p):].startswith(VIT_IGNORED) or k.startswith(VIT_IGNORED)
  out = _apply_table(state_dict, table, "", ignore, f"{what} (Hugging Face ViT)")
  return {"params": out["params"]}


def read_vit_config_json(path: str) -> dict | None:
  """The ``config.json`` beside the weights file ``path`` (None when absent)."""
  cj = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if not os.path.isfile(cj):
    return None
  try:
    with open(cj) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{cj}: cannot read it as JSON ({e})") from None
  if not isinstance(out, dict):
    raise CheckpointError(f"{cj}: holds a {type(out).__name__}, not a config object")
  return out


def import_hf_vit(path: str, *, heads: int | None = None) -> tuple[dict, dict]:
  """``(variables, cfg)``: :func:`read_state_dict` of ``path``, the sizes from
  the ``config.json`` beside it (or its shapes, with ``heads``;
  :func:`vit_config`), then :func:`vit_variables`; errors name ``path``."""
  sd = read_state_dict(path)
  cfg = vit_config(sd, read_vit_config_json(path), heads=heads, what=path)
  return vit_variables(sd, cfg, what=path), cfg


# ----------------------------------------------------------------------------
# export


def export_variables(variables, path: str) -> None:
  """Writes ``variables`` (a pytree of arrays): ``*.msgpack`` as one flax
  msgpack file, any other path as an Orbax checkpoint directory (which must
  not exist)."""
  import jax
  host = jax.tree.map(np.asarray, variables)
  if path.endswith(".msgpack"):
    from flax import serialization
    with open(path, "wb") as f:
      f.write(serialization.msgpack_serialize(host))
    return
  import orbax.checkpoint as ocp
  if os.path.exists(path):
    raise CheckpointError(f"{path}: exists; export into a new directory")
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.abspath(path), host)


def load_exported(path: str) -> dict:
  """The tree :func:`export_variables` wrote (numpy arrays)."""
  if path.endswith(".msgpack"):
    from flax import serialization
    with open(path, "rb") as f:
      return serialization.msgpack_restore(f.read())
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    import jax
    return jax.tree.map(np.asarray, ckpt.restore(os.path.abspath(path)))
