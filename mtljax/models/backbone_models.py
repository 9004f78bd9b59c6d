"""The dense backbones as multi-task architectures: a ResNet trunk
(:class:`mtljax.models.backbones.ResNet`, LibMTL's ``resnet_dilated`` at
``output_stride`` 8 by default) with one DeepLab ASPP head per task
(:class:`mtljax.models.backbones.DeepLabHead`), the prediction resized to the
input's size with bilinear ``align_corners=True`` as LibMTL's trainer does.
``encoder="resnet18" | "resnet34" | "resnet50"`` (``config.model.encoder``)
with

* ``multi_head``: one shared ResNet (``shared/trunk/<stage>``) and per-task
  heads (``tasks/heads/<group>``, stacked ``[T_g, ...]``): LibMTL's NYUv2
  default, hard parameter sharing with DeepLabV3 heads. The trunk is
  task-independent: ``encode`` runs it once on the batch (its ``layer4``
  features are the representation MGDA-UB differentiates), ``decode`` runs
  the sampled tasks' heads.
* ``independent``: one ResNet per task (``tasks/trunk``, stacked ``[T, ...]``)
  and its head: the single-task baselines.
* ``mtan``: LibMTL's MTAN over the ResNet stages (:func:`resnet_mtan`):
  per-task attention masks after each stage, blocks shared between stages.
* ``cross_stitch``: LibMTL's cross-stitch over the ResNet stages
  (:func:`resnet_cross_stitch`): one ResNet per task, stitch units after
  ``layer1..3``.
* ``ltb``: LibMTL's Learning to Branch over the ResNet stages
  (:func:`resnet_ltb`): one ResNet per task, each column's input to
  ``layer1..4`` drawn from one parent column (:mod:`mtljax.models.branching`).

Batch norm (torch's semantics, :class:`mtljax.models.backbones.BatchNorm`)
keeps its running averages in the model state (:attr:`Model.init_state`,
``{"shared": {"trunk": ...}, "tasks": {"heads": {group: [T_g, ...]}}}`` and
``tasks/trunk`` ``[T, ...]`` for ``independent``), never in the parameters:

* train mode normalises with the batch's statistics and returns the updated
  running averages; eval mode reads them;
* the shared trunk's averages are updated once per step, from the forward the
  losses come from (:mod:`mtljax.jacobians`); on the per-slot path (distinct
  examples per slot) each slot is normalised with its own batch's statistics
  and the trunk's update is the mean of the slots' updates;
* per-task statistics (the heads', ``independent``'s trunks) move only for
  the tasks in the step's slots (a task in two slots: the mean of the two),
  :func:`scatter_rows`;
* under a mesh the step is one global program (``jit`` over sharded arrays),
  so a batch statistic is taken over the global batch: synchronised batch
  norm, by construction (one device equals eight: tested).

``normalization="group"`` (GroupNorm, 32 groups) has no state: the model is then
stateless. ``conv_impl`` chooses the convolution (im2col on CPU, ``lax`` on
GPU/TPU by default; :func:`mtljax.models.backbones.resolve_conv_impl`).

The ASPP's dropout (0.5 in LibMTL) is not applied: the model interface has
no dropout key yet (BUILD_NOTES.md, issue 26's open items).

Layer groups, input to output: the ResNet stages ``stem``, ``layer1`` ..
``layer4`` (so layer-wise learning rates and gradual unfreezing address them
by name; MTAN's masks and blocks, cross-stitch's units, in the group of the
stage they follow), then ``heads``.
"""

from __future__ import annotations

import types
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import branching
from mtljax.models import parts as parts_lib
from mtljax.models.backbones import layers
from mtljax.models.backbones import resnet
from mtljax.models.backbones import segnet

# encoder name -> ResNet depth.
RESNETS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


def _modules(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet):
  """The ResNet and, per task group, its DeepLab head module."""
  net = resnet.ResNet(depth=RESNETS[trunk.encoder], output_stride=trunk.output_stride,
                      norm=trunk.normalization, conv_impl=trunk.conv_impl)
  heads = {g: resnet.DeepLabHead(taskset.group_task(g).out_dim, dropout=0.0,
                                 norm=trunk.normalization, conv_impl=trunk.conv_impl)
           for g in taskset.groups}
  return net, heads


def _split(variables) -> tuple[dict, dict]:
  """flax ``variables`` -> (params, batch_stats) (``{}`` without batch norm)."""
  return variables["params"], variables.get("batch_stats", {})


class _Backbone:
  """The ResNet trunk and per-task DeepLab heads, as pure functions of
  parameters and batch statistics (module docstring)."""

  def __init__(self, trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
               input_shape: Sequence[int]):
    if len(input_shape) != 3 or input_shape[-1] != 3:
      raise ValueError(f"encoder={trunk.encoder!r} reads RGB images [H, W, 3]; the input "
                       f"shape is {tuple(input_shape)}.")
    self.taskset, self.trunk = taskset, trunk
    self.net, self.heads = _modules(trunk, taskset)
    # The same network stage by stage (each applies to params[stage]).
    self.stages = resnet.stage_modules(RESNETS[trunk.encoder], trunk.output_stride,
                                       norm=trunk.normalization, conv_impl=trunk.conv_impl)
    self.size = tuple(int(s) for s in input_shape[:2])
    # Batch norm needs more than one value per channel in train mode: a batch of
    # 2 images. (Init runs in eval mode and reads no statistic.)
    self.x_example = jnp.zeros((2,) + tuple(input_shape), jnp.float32)
    self.stateful = trunk.normalization == "batch"
    self.stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
    self.local_index = jnp.asarray(taskset.local_index)
    feats = jax.eval_shape(lambda: self.net.apply(
        self.net.init(jax.random.key(0), self.x_example), self.x_example)["layer4"])
    self.f_example = jnp.zeros(feats.shape, feats.dtype)

  # --- init ------------------------------------------------------------------

  def trunk_variables(self, rng) -> tuple[dict, dict]:
    return _split(self.net.init(rng, self.x_example))

  def head_variables(self, rng, group: str) -> tuple[dict, dict]:
    """A group's heads, stacked over its tasks, keyed by stream id (a subset
    run initialises alike)."""
    members = self.taskset.group_members(group)
    keys = jax.vmap(lambda s: jax.random.fold_in(rng, s))(self.stream_ids[members])
    return jax.vmap(lambda k: _split(self.heads[group].init(k, self.f_example)))(keys)

  def all_heads(self, rng) -> tuple[dict, dict]:
    params, stats = {}, {}
    for g in self.taskset.groups:
      params[g], stats[g] = self.head_variables(rng, g)
    return params, stats

  def per_task_trunks(self, rng) -> tuple[dict, dict]:
    """One ResNet and head per task: ``({"trunk": [T, ...], "heads": ...}``
    parameters, the same of statistics); trunk ``t`` from its stream id."""
    r_trunk, r_heads = jax.random.split(rng)
    keys = jax.vmap(lambda s: jax.random.fold_in(r_trunk, s))(self.stream_ids)
    tp, ts_ = jax.vmap(self.trunk_variables)(keys)
    hp, hs = self.all_heads(r_heads)
    return {"trunk": tp, "heads": hp}, {"trunk": ts_, "heads": hs}

  # --- apply -----------------------------------------------------------------

  def run(self, module, p, s, *args, train: bool, **kwargs):
    """``(module's output, its new batch statistics)`` on ``args``: train
    mode updates the statistics ``s``, eval mode reads them (without batch
    norm ``s`` is ``{}`` and comes back as it is)."""
    v = {"params": p, "batch_stats": s} if self.stateful else {"params": p}
    if train and self.stateful:
      out, new = module.apply(v, *args, train=True, mutable=["batch_stats"], **kwargs)
      return out, new["batch_stats"]
    return module.apply(v, *args, train=False, **kwargs), s

  def trunk_apply(self, p, s, x, train: bool):
    """``(layer4 features, new stats)`` of one trunk on ``x [B, H, W, 3]``."""
    out, s = self.run(self.net, p, s, x, train=train)
    return out["layer4"], s

  def stage_apply(self, name: str, p, s, h, train: bool, **kwargs):
    """``(output, new stats)`` of the trunk's stage ``name`` (its parameters
    ``p[name]``, statistics ``s[name]``) on ``h``."""
    return self.run(self.stages[name], p[name], s[name] if self.stateful else {}, h,
                    train=train, **kwargs)

  def head_apply(self, group: str, p, s, feats, train: bool):
    """``(outputs [B, H, W, out], new stats)`` of one head on ``feats``."""
    return self.run(self.heads[group], p, s, feats, train=train, out_size=self.size)

  def heads_apply(self, head_params, head_stats, feats, task_ids, train: bool,
                  per_slot: bool):
    """``({group: [K, B, H, W, out]}, new head stats)``: slot k's task's head
    on ``feats`` (``[K, B, h, w, C]`` with ``per_slot``, else ``[B, h, w, C]``
    read by every slot). With a static slot layout each group's heads run on
    its own slots only (the others' rows are zero: never read); else every
    group's head runs on every slot, and only the slots of the group update
    its statistics."""
    k = task_ids.shape[0]
    slices = tasks_lib.static_group_slices(self.taskset, task_ids)
    outs, new_stats = {}, {}
    for gi, g in enumerate(self.taskset.groups):
      sl = slices[g] if slices is not None else slice(0, k)
      if sl.stop <= sl.start:
        outs[g] = None
        new_stats[g] = head_stats[g]
        continue
      ids = task_ids[sl]
      rows = jnp.clip(self.local_index[ids], 0, len(self.taskset.group_members(g)) - 1)
      hp = jax.tree.map(lambda a: a[rows], head_params[g])
      hs = jax.tree.map(lambda a: a[rows], head_stats[g])
      f = feats[sl] if per_slot else feats
      out, st = jax.vmap(lambda p, s, ff: self.head_apply(g, p, s, ff, train),
                         in_axes=(0, 0, 0 if per_slot else None))(hp, hs, f)
      in_group = jnp.asarray(self.taskset.group_of_task)[ids] == gi
      new_stats[g] = scatter_rows(head_stats[g], st, rows, in_group) if train else head_stats[g]
      if slices is not None:
        out = jnp.pad(out, ((sl.start, k - sl.stop),) + ((0, 0),) * (out.ndim - 1))
      outs[g] = out
    shape = None
    for o in outs.values():
      if o is not None:
        shape = o.shape[:-1]
    for g in self.taskset.groups:
      if outs[g] is None:  # a group with no slot this step: zeros, never read
        outs[g] = jnp.zeros(shape + (self.taskset.group_task(g).out_dim,), jnp.float32)
    return outs, new_stats


def scatter_rows(old, new, rows, valid):
  """Per-task stats ``old [R, ...]`` with row ``rows[k]`` set to the mean of
  the valid slots' ``new [K, ...]`` that map to it; other rows bitwise."""
  num = jax.tree.leaves(old)[0].shape[0] if jax.tree.leaves(old) else 0
  seg = jnp.where(valid, rows, num)  # out of range: dropped

  def one(o, n):
    total = jax.ops.segment_sum(n.astype(jnp.float32), seg, num)
    count = jax.ops.segment_sum(valid.astype(jnp.float32), seg, num)
    shape = (-1,) + (1,) * (o.ndim - 1)
    mean = total / jnp.maximum(count, 1.0).reshape(shape)
    return jnp.where((count > 0).reshape(shape), mean.astype(o.dtype), o)
  return jax.tree.map(one, old, new)


def per_slot(one, args, state, train: bool):
  """``one(*slot's args) -> (outputs, new shared stats)`` run on every slot
  (``vmap`` over the leading axis of ``args``, each slot with its own batch
  statistics): ``(outputs [K, ...], the slots' mean of the new statistics)``
  in train mode, ``state`` unchanged in eval mode (module docstring)."""
  outs, st = jax.vmap(one)(*args)
  return outs, (jax.tree.map(lambda a: jnp.mean(a, axis=0), st) if train else state)


def _rows(tree, ids):
  return jax.tree.map(lambda a: a[ids], tree)


def _stage_groups(prefix: str) -> tuple[tuple[str, str], ...]:
  return tuple((s, rf"^{prefix}/{s}/") for s in resnet.STAGES) + (
      ("heads", r"^tasks/heads/"),)


def build(arch: str, trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
          input_shape: Sequence[int], hparams=None) -> dict:
  """The Model fields of ``arch`` on the backbone ``trunk.encoder``
  (``hparams``: ``cross_stitch``'s, which sets the stitch units' init, or
  ``ltb``'s)."""
  if trunk.encoder in parts_lib.SEGNETS:
    return segnet_model(arch, trunk, taskset, input_shape)
  if arch == "cross_stitch":
    return resnet_cross_stitch(trunk, taskset, input_shape, hparams.init_diagonal,
                               hparams.ones_init)
  if arch == "ltb":
    return resnet_ltb(trunk, taskset, input_shape, hparams)
  return {"multi_head": resnet_multi_head, "independent": resnet_independent,
          "mtan": resnet_mtan}[arch](trunk, taskset, input_shape)


def resnet_multi_head(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
                      input_shape: Sequence[int]) -> dict:
  """One shared ResNet, per-task DeepLab heads: the Model fields."""
  bb = _Backbone(trunk, taskset, input_shape)

  def init_all(rng):
    r_trunk, r_heads = jax.random.split(rng)
    tp, ts_ = bb.trunk_variables(r_trunk)
    hp, hs = bb.all_heads(r_heads)
    return ({"shared": {"trunk": tp}, "tasks": {"heads": hp}},
            {"shared": {"trunk": ts_}, "tasks": {"heads": hs}})

  def encode(shared, x, state=None, train=False):
    feats, st = bb.trunk_apply(shared["trunk"], state["trunk"], x, train)
    return feats, {"trunk": st}

  def decode(task_params, rep, x, task_ids, state=None, train=False):
    del x
    outs, hs = bb.heads_apply(task_params["heads"], state["heads"], rep, task_ids, train,
                              per_slot=False)
    return outs, {"heads": hs}

  def apply(params, x, task_ids, state=None, train=False):
    # Per slot: each slot's own batch statistics; the trunk's update is the
    # slots' mean (module docstring).
    feats, trunk_state = per_slot(
        lambda xk: bb.trunk_apply(params["shared"]["trunk"], state["shared"]["trunk"], xk,
                                  train), (x,), state["shared"]["trunk"], train)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], feats,
                              task_ids, train, per_slot=True)
    return outs, {"shared": {"trunk": trunk_state}, "tasks": {"heads": hs}}

  return _fields(bb, init_all, apply, encode, decode,
                 {f"heads/{g}": taskset.group_members(g) for g in taskset.groups},
                 _stage_groups("shared/trunk"))


def resnet_independent(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
                       input_shape: Sequence[int]) -> dict:
  """One ResNet and DeepLab head per task: the Model fields."""
  bb = _Backbone(trunk, taskset, input_shape)
  num = len(taskset)

  def init_all(rng):
    tasks_p, tasks_s = bb.per_task_trunks(rng)
    return {"shared": {}, "tasks": tasks_p}, {"shared": {}, "tasks": tasks_s}

  def apply(params, x, task_ids, state=None, train=False):
    tp = jax.tree.map(lambda a: a[task_ids], params["tasks"]["trunk"])
    ts_ = jax.tree.map(lambda a: a[task_ids], state["tasks"]["trunk"])
    feats, st = jax.vmap(lambda p, s, xk: bb.trunk_apply(p, s, xk, train))(tp, ts_, x)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], feats,
                              task_ids, train, per_slot=True)
    trunks = state["tasks"]["trunk"]
    if train:
      trunks = scatter_rows(trunks, st, task_ids, jnp.ones(task_ids.shape, bool))
    return outs, {"shared": {}, "tasks": {"trunk": trunks, "heads": hs}}

  rows = {"trunk": np.arange(num, dtype=np.int32),
          **{f"heads/{g}": taskset.group_members(g) for g in taskset.groups}}
  return _fields(bb, init_all, apply, None, None, rows, _stage_groups("tasks/trunk"))


# ----------------------------------------------------------------------------
# MTAN and cross-stitch over ResNet stages (LibMTL's architecture/MTAN.py and
# architecture/Cross_stitch.py on its ResNet encoders).
# ----------------------------------------------------------------------------


class AttentionMask(nn.Module):
  """LibMTL's ``MTAN._att_layer``: a 1x1 convolution (with bias) to ``mid``
  channels, norm, ReLU, a 1x1 convolution (with bias) to ``out``, norm,
  sigmoid. Built outside LibMTL's ResNet, its convolutions keep torch's
  default init (U(+-1/sqrt(fan_in)) for kernel and bias)."""
  mid: int
  out: int
  norm: str = "batch"
  conv_impl: str = "auto"

  @nn.compact
  def __call__(self, x, train: bool = False):
    make_norm = layers.norm_layer(self.norm)
    h = x
    for i, f in enumerate((self.mid, self.out)):
      h = layers.Conv(f, 1, use_bias=True, conv_impl=self.conv_impl,
                      kernel_init=resnet.torch_default_init((0, 1, 2)),
                      bias_init=resnet._bias_init(h.shape[-1]),  # pylint: disable=protected-access
                      name=f"conv{i + 1}")(h)
      h = make_norm(name=f"bn{i + 1}")(h, train)
      h = nn.relu(h) if i == 0 else nn.sigmoid(h)
    return h


# The stages a stitch unit follows (LibMTL's Cross_stitch: after layer1..3;
# layer4's features go to the heads unmixed).
STITCHED = ("layer1", "layer2", "layer3")


def _max_pool2(h):
  """torch's ``MaxPool2d(2, 2)``: windows 2x2, stride 2, the remainder dropped."""
  return nn.max_pool(h, (2, 2), strides=(2, 2))


def resnet_mtan(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
                input_shape: Sequence[int], internals: bool = False):
  """MTAN over ResNet stages, LibMTL's ``_transform_resnet_MTAN``: the
  Model fields.

  The shared ResNet (``shared/trunk/<stage>``) runs as usual; stage ``i``
  (``layer1..4``) gives ``pre_i`` (its blocks but the last: LibMTL's
  ``layer[:-1]``) and ``out_i`` (after its last block). Task ``t``'s
  attended feature ``a`` follows it:

  * ``layer1``: ``a = mask_1^t(pre_1) * out_1``;
  * ``layer2..4``: ``a = mask_i^t(concat(pre_i, a)) * out_i``, ``a`` first
    max-pooled 2x2 when its size is not ``pre_i``'s (undilated stages);
  * after ``layer1..3``: ``a = block_i(a)``, a ResNet block (basic or
    bottleneck as the trunk's; stride 1, its 1x1 projection to
    ``layer_{i+1}``'s width) -- after ``layer1`` also max-pooled 2x2;

  the mask ``mask_i^t`` is :class:`AttentionMask` (1x1 conv to ``C_i /
  expansion``, norm, ReLU, 1x1 conv to ``C_i``, norm, sigmoid; ``C_i`` the
  stage's output width). Task ``t``'s DeepLab head reads its ``a`` after
  ``layer4``.

  Parameters: the masks per task, ``tasks/attention/<stage>`` stacked
  ``[T, ...]`` (init per stream id); the blocks, one set for every task as in
  LibMTL, at ``shared/attention/<stage>`` (the block after that stage).
  State: the masks' statistics per task (``tasks/attention``, only the
  slots' tasks' rows move, :func:`scatter_rows`), the blocks' and the trunk's
  shared (the slots' mean). Each slot runs the trunk and its own task's
  attention branch (LibMTL runs every task's branch on every forward; here a
  task that is not sampled neither runs nor moves). No ``encode``: the
  blocks are shared parameters read by the per-task part (as ``mtan`` on
  SegNet). Layer groups: ``stem``, ``layer1..4`` (each with its masks and
  the block after it), ``heads``.

  With ``internals``: ``(fields, namespace)``, the namespace holding
  ``trunk_stages(p, s, x, train)`` and ``attend(feats, mask params, mask
  stats, block params, block stats, train, taps=None)`` (``taps``: a dict
  that receives each stage's attended feature ``a_<stage>`` before and
  after its block and pooling), for tests."""
  bb = _Backbone(trunk, taskset, input_shape)
  kind, _ = resnet.DEPTHS[RESNETS[trunk.encoder]]
  exp = resnet.EXPANSION[kind]
  widths = [64 * exp, 128 * exp, 256 * exp, 512 * exp]
  names = resnet.STAGES[1:]
  common = dict(norm=trunk.normalization, conv_impl=trunk.conv_impl)
  masks = {n: AttentionMask(widths[i] // exp, widths[i], **common) for i, n in enumerate(names)}
  blocks = {n: resnet._Block(kind, widths[i + 1] // exp, 1,  # pylint: disable=protected-access
                             (1, 1) if kind == "basic" else (1,), True,
                             kernel_init=resnet.torch_default_init((0, 1, 2)), **common)
            for i, n in enumerate(names[:-1])}

  def trunk_stages(p, s, x, train):
    """``({stage: (out, pre)}, new trunk stats)`` of the shared ResNet."""
    h, new_stem = bb.stage_apply("stem", p, s, x, train)
    feats, new = {}, {"stem": new_stem}
    for n in names:
      (h, pre), new[n] = bb.stage_apply(n, p, s, h, train, penultimate=True)
      feats[n] = (h, pre)
    return feats, (new if bb.stateful else s)

  def attend(feats, mp, ms, bp, bs, train, taps=None):
    """``(task's attended layer4 feature, new mask stats, new block stats)``."""
    a, new_m, new_b = None, {}, {}
    taps = {} if taps is None else taps
    for i, n in enumerate(names):
      out, pre = feats[n]
      if i > 0 and a.shape[1:3] != pre.shape[1:3]:
        a = _max_pool2(a)
      m, new_m[n] = bb.run(masks[n], mp[n], ms.get(n, {}), pre if i == 0 else
                           jnp.concatenate([pre, a], axis=-1), train=train)
      a = taps[f"masked_{n}"] = m * out
      if n in blocks:
        a, new_b[n] = bb.run(blocks[n], bp[n], bs.get(n, {}), a, train=train)
      if i == 0:
        a = _max_pool2(a)
      taps[f"a_{n}"] = a
    return a, (new_m if bb.stateful else ms), (new_b if bb.stateful else bs)

  # Stage sizes: the attended feature must meet each stage's size after at
  # most one pooling (torch would fail at the concatenation otherwise).
  shapes = jax.eval_shape(lambda: trunk_stages(
      bb.trunk_variables(jax.random.key(0))[0], bb.trunk_variables(jax.random.key(0))[1],
      bb.x_example, False)[0])
  size = None
  for i, n in enumerate(names):
    pre = tuple(shapes[n][1].shape[1:3])
    if i > 0 and size != pre:
      size = (size[0] // 2, size[1] // 2)
    if i > 0 and size != pre:
      raise ValueError(f"arch='mtan' with encoder={trunk.encoder!r}: the input shape "
                       f"{tuple(input_shape)} gives {n} features of {pre[0]}x{pre[1]} that "
                       f"the attention path ({size[0]}x{size[1]}) cannot meet by 2x2 pooling; "
                       "use a height and width divisible by 32.")
    size = tuple(shapes[n][0].shape[1:3])
    if i == 0:
      size = (size[0] // 2, size[1] // 2)

  def init_masks(key):
    p, s = {}, {}
    for i, (n, k) in enumerate(zip(names, jax.random.split(key, len(names)))):
      c = widths[i] * (1 if i == 0 else 2)
      x = jnp.zeros(shapes[n][1].shape[:3] + (c,), jnp.float32)
      p[n], s[n] = _split(masks[n].init(k, x))
    return p, s

  def init_blocks(key):
    p, s = {}, {}
    for n, k in zip(blocks, jax.random.split(key, len(blocks))):
      p[n], s[n] = _split(blocks[n].init(k, jnp.zeros(shapes[n][0].shape, jnp.float32)))
    return p, s

  def init_all(rng):
    r_trunk, r_heads, r_masks, r_blocks = jax.random.split(rng, 4)
    tp, ts_ = bb.trunk_variables(r_trunk)
    hp, hs = bb.all_heads(r_heads)
    keys = jax.vmap(lambda i: jax.random.fold_in(r_masks, i))(bb.stream_ids)
    mp, ms = jax.vmap(init_masks)(keys)
    bp, bs = init_blocks(r_blocks)
    return ({"shared": {"trunk": tp, "attention": bp}, "tasks": {"attention": mp, "heads": hp}},
            {"shared": {"trunk": ts_, "attention": bs}, "tasks": {"attention": ms, "heads": hs}})

  def apply(params, x, task_ids, state=None, train=False):
    ids = jnp.asarray(task_ids)
    sh_p, sh_s = params["shared"], state["shared"]

    def one(xk, mp, ms):
      feats, trunk_st = trunk_stages(sh_p["trunk"], sh_s["trunk"], xk, train)
      a, new_m, new_b = attend(feats, mp, ms, sh_p["attention"], sh_s["attention"], train)
      return (a, new_m), {"trunk": trunk_st, "attention": new_b}
    (reps, new_m), shared = per_slot(
        one, (x, _rows(params["tasks"]["attention"], ids),
              _rows(state["tasks"]["attention"], ids)), sh_s, train)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], reps, ids,
                              train, per_slot=True)
    att = state["tasks"]["attention"]
    if train:
      att = scatter_rows(att, new_m, ids, jnp.ones(ids.shape, bool))
    return outs, {"shared": shared, "tasks": {"attention": att, "heads": hs}}

  rows = {"attention": np.arange(len(taskset), dtype=np.int32),
          **{f"heads/{g}": taskset.group_members(g) for g in taskset.groups}}
  groups = (("stem", r"^shared/trunk/stem/"),) + tuple(
      (n, rf"^(shared/trunk|shared/attention|tasks/attention)/{n}/") for n in names) + (
      ("heads", r"^tasks/heads/"),)
  fields = _fields(bb, init_all, apply, None, None, rows, groups)
  if internals:
    return fields, types.SimpleNamespace(trunk_stages=trunk_stages, attend=attend, bb=bb)
  return fields


def stitch_init(num_tasks: int, diagonal: float, ones: bool = False):
  """A ``[T, T]`` stitch unit at init: ``diagonal`` on the diagonal and
  ``(1 - diagonal) / (T - 1)`` elsewhere (rows summing to one, the paper's
  convex init; one task: ``[[1]]``), or every entry 1 with ``ones``
  (LibMTL's)."""
  if ones:
    return jnp.ones((num_tasks, num_tasks), jnp.float32)
  off = (1.0 - diagonal) / max(num_tasks - 1, 1)
  alpha = jnp.full((num_tasks, num_tasks), off, jnp.float32)
  return alpha.at[jnp.diag_indices(num_tasks)].set(diagonal if num_tasks > 1 else 1.0)


def resnet_cross_stitch(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
                        input_shape: Sequence[int], init_diagonal: float,
                        ones_init: bool = False, internals: bool = False):
  """Cross-stitch over ResNet stages, LibMTL's ``_transform_resnet_cross``:
  one ResNet per task (``tasks/trunk``, stacked ``[T, ...]``, init per stream
  id), every column on the slot's images, the columns' outputs after
  ``layer1``, ``layer2`` and ``layer3`` mixed by a learned stitch unit
  ``alpha [T, T]`` (``shared/stitch/<stage>``): column ``t`` continues from
  ``sum_s alpha[t, s] h_s``. Task ``t``'s DeepLab head reads column ``t``'s
  ``layer4``. LibMTL initialises ``alpha`` to ones (``ones_init``); the
  default here is the paper's convex rows (``init_diagonal`` 0.9, the rest
  ``0.1 / (T - 1)``), as on the small encoders.

  Every column runs on every forward (the stitch needs them all), so every
  task's trunk statistics move each step (the slots' mean); the heads' only
  for the slots' tasks. No ``encode`` (no task-independent part). Layer
  groups: ``stem``, ``layer1..4`` (each with the stitch after it), ``heads``.

  With ``internals``: ``(fields, namespace)``, the namespace holding
  ``columns(trunk params, trunk stats, stitch, x, train, taps=None)``
  (``taps`` receives each stage's columns ``[T, B, ...]`` before and after its
  stitch) and the stage modules, for tests."""
  bb = _Backbone(trunk, taskset, input_shape)
  num = len(taskset)

  def init_all(rng):
    tasks_p, tasks_s = bb.per_task_trunks(rng)
    return ({"shared": {"stitch": {n: stitch_init(num, init_diagonal, ones_init)
                                   for n in STITCHED}}, "tasks": tasks_p},
            {"shared": {}, "tasks": tasks_s})

  def columns(cols, col_stats, alpha, xk, train, taps=None):
    return resnet_columns(bb, cols, col_stats, alpha, xk, train, taps)

  def apply(params, x, task_ids, state=None, train=False):
    ids = jnp.asarray(task_ids)

    def one(xk, t):
      h, st = resnet_columns(bb, params["tasks"]["trunk"], state["tasks"]["trunk"],
                             params["shared"]["stitch"], xk, train)
      return h[t], st
    feats, trunks = per_slot(one, (x, ids), state["tasks"]["trunk"], train)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], feats, ids,
                              train, per_slot=True)
    return outs, {"shared": {}, "tasks": {"trunk": trunks, "heads": hs}}

  rows = {"trunk": np.arange(num, dtype=np.int32),
          **{f"heads/{g}": taskset.group_members(g) for g in taskset.groups}}
  groups = tuple((n, rf"^(tasks/trunk/{n}/|shared/stitch/{n}$)") for n in resnet.STAGES) + (
      ("heads", r"^tasks/heads/"),)
  fields = _fields(bb, init_all, apply, None, None, rows, groups)
  if internals:
    return fields, types.SimpleNamespace(columns=columns, bb=bb)
  return fields


def resnet_columns(bb: _Backbone, cols, col_stats, mixes: dict, xk, train: bool, taps=None):
  """Every task's ResNet column (``cols``, stacked ``[T, ...]``) on one slot's
  images ``xk``, the columns' outputs after stage ``n`` mixed by ``mixes[n]
  [T, T]`` (column ``t`` continues from ``sum_s mixes[n][t, s] h_s``; stages
  not in ``mixes`` unmixed): ``(layer4 features [T, B, h, w, C], new stats)``.
  ``taps`` (a dict) receives each stage's columns before (``<stage>``) and
  after (``<stage>_stitched``) its mix."""
  h, new = xk, {}
  taps = {} if taps is None else taps
  for n in resnet.STAGES:
    h, new[n] = jax.vmap(lambda p, s, a, n=n: bb.stage_apply(n, p, s, a, train),
                         in_axes=(0, 0, None if n == "stem" else 0))(cols, col_stats, h)
    taps[f"{n}"] = h
    if n in mixes:
      h = taps[f"{n}_stitched"] = jnp.einsum("ts,s...->t...", mixes[n].astype(h.dtype), h)
  return h, (new if bb.stateful else col_stats)


# The stages whose outputs Learning to Branch routes (LibMTL's alpha[1..4]:
# the inputs of layer1..layer4).
BRANCHED = ("stem", "layer1", "layer2", "layer3")


def resnet_ltb(trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
               input_shape: Sequence[int], hp: branching.LTBHParams) -> dict:
  """Learning to Branch over ResNet stages, LibMTL's ``_transform_resnet_ltb``
  (:mod:`mtljax.models.branching`): one ResNet per task (``tasks/trunk``,
  stacked ``[T, ...]``, stem included), every column on the slot's images,
  column ``t``'s input to ``layer1..layer4`` drawn from one parent column's
  output of the stage before (``shared/branch/<stage>``, ``[T, T]`` logits,
  for ``stem`` .. ``layer3``), task ``t``'s DeepLab head on column ``t``'s
  ``layer4``. The model state holds the sampler (``shared/branch``) and the
  batch statistics as ``cross_stitch``'s (every column's trunk statistics
  move each step, the heads' for the slots' tasks); with GroupNorm only the
  sampler. No ``encode``. Layer groups: ``stem``, ``layer1..4`` (each with
  the routing of its outputs), ``heads``."""
  bb = _Backbone(trunk, taskset, input_shape)
  num = len(taskset)

  def init_all(rng):
    tasks_p, tasks_s = bb.per_task_trunks(rng)
    return ({"shared": {"branch": branching.logits_init(num, BRANCHED)}, "tasks": tasks_p},
            {"shared": {"branch": branching.sampler_init(rng)}, "tasks": tasks_s})

  def apply(params, x, task_ids, state=None, train=False):
    ids = jnp.asarray(task_ids)
    alpha, sampler = branching.routing(params["shared"]["branch"], state["shared"]["branch"],
                                       hp, train)

    def one(xk, t):
      h, st = resnet_columns(bb, params["tasks"]["trunk"], state["tasks"]["trunk"], alpha,
                             xk, train)
      return h[t], st
    feats, trunks = per_slot(one, (x, ids), state["tasks"]["trunk"], train)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], feats, ids,
                              train, per_slot=True)
    return outs, {"shared": {"branch": sampler}, "tasks": {"trunk": trunks, "heads": hs}}

  rows = {"trunk": np.arange(num, dtype=np.int32),
          **{f"heads/{g}": taskset.group_members(g) for g in taskset.groups}}
  groups = tuple((n, rf"^(tasks/trunk/{n}/|shared/branch/{n}$)") for n in resnet.STAGES) + (
      ("heads", r"^tasks/heads/"),)
  return {"init": lambda rng: init_all(rng)[0], "init_state": lambda rng: init_all(rng)[1],
          "apply": apply, "task_rows": rows, "layer_groups": groups}


def _fields(bb: _Backbone, init_all, apply, encode, decode, task_rows, groups) -> dict:
  """The Model fields; stateless functions when ``normalization`` has no state."""
  if not bb.stateful:
    empty = jax.eval_shape(lambda: init_all(jax.random.key(0))[1])

    def no_state():
      return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), empty)

    def bind(f):
      return None if f is None else (lambda *a: f(*a, state=no_state(), train=False)[0])
    return {"init": lambda rng: init_all(rng)[0], "apply": bind(apply), "task_rows": task_rows,
            "layer_groups": groups, "encode": bind(encode), "decode": bind(decode)}
  out = {"init": lambda rng: init_all(rng)[0], "init_state": lambda rng: init_all(rng)[1],
         "apply": apply, "task_rows": task_rows, "layer_groups": groups}
  if encode is not None:
    out.update(encode=encode, decode=decode)
  return out



# ----------------------------------------------------------------------------
# SegNet and MTAN over SegNet (the MTAN paper's models).
# ----------------------------------------------------------------------------


def _by_group(taskset: tasks_lib.TaskSet, outs: dict, task_ids) -> dict:
  """``{group: [K, B, ...]}``: slot k's task's output from the per-task
  outputs ``{name: [B, ...]}`` (a clipped row of the group for slots of
  another group, as the linear heads do: never read)."""
  out = {}
  for g in taskset.groups:
    members = taskset.group_members(g)
    stacked = jnp.stack([outs[taskset.names[t]] for t in members])
    rows = jnp.clip(jnp.asarray(taskset.local_index)[task_ids], 0, len(members) - 1)
    out[g] = stacked[rows]
  return out


def segnet_model(arch: str, trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
                 input_shape: Sequence[int]) -> dict:
  """SegNet (:mod:`mtljax.models.backbones.segnet`, widths ``trunk.channels``)
  as ``multi_head`` (the MTAN code's "split": the shared encoder-decoder and
  per-task heads), ``mtan`` (the MTAN paper's attention over it) or
  ``independent`` (one SegNet per task: the code's single-task baselines).

  The task part runs every task's branch on every forward, as the MTAN code
  does, and slot k reads its task's output: MTAN's attention statistics move
  for every task each step (their parameters only for the sampled tasks, by
  the optimizer's per-task rows). MTAN's attention blocks are shared
  parameters read by the per-task part, so ``mtan`` has no ``encode`` (as on
  the small encoders). Per-task initial values come from one key, not one
  per task's stream id (a subset run's heads start elsewhere)."""
  net = segnet.make_segnet(taskset.tasks, arch="mtan" if arch == "mtan" else "split",
                           widths=trunk.channels, conv_impl=trunk.conv_impl)
  shape = tuple(int(s) for s in input_shape)

  def variables(params, state):
    return {"params": params, "batch_stats": state}

  def init_one(rng):
    v = net.init(rng, shape)
    stats = v.get("batch_stats", {})
    return v["params"], {"shared": stats.get("shared", {}), "tasks": stats.get("tasks", {})}

  def encode(shared, x, state=None, train=False):
    rep, st = net.encode(variables({"shared": shared}, {"shared": state}), x, train)
    return rep, st["shared"]

  def task_part(task_params, rep, task_ids, state, train):
    outs, st = net.decode(variables({"tasks": task_params}, {"tasks": state}), rep, train)
    return _by_group(taskset, outs, task_ids), st.get("tasks", {})

  def decode(task_params, rep, x, task_ids, state=None, train=False):
    del x
    return task_part(task_params, rep, task_ids, state, train)

  def slot(p, st, xk, t, train):
    """One slot: the shared part, then every task's branch; slot ``t``'s
    outputs and the new statistics."""
    rep, sh = encode(p["shared"], xk, st["shared"], train)
    outs, ts_ = task_part(p["tasks"], rep, t[None], st["tasks"], train)
    return jax.tree.map(lambda a: a[0], outs), {"shared": sh, "tasks": ts_}

  if arch == "multi_head":
    def apply(params, x, task_ids, state=None, train=False):
      # Per slot (its own batch statistics); every slot runs every task's
      # head and reads its own; the statistics' update is the slots' mean.
      return per_slot(lambda xk, t: slot(params, state, xk, t, train),
                      (x, jnp.asarray(task_ids)), state, train)

    return {"init": lambda rng: init_one(rng)[0], "init_state": lambda rng: init_one(rng)[1],
            "apply": apply, "encode": encode, "decode": decode,
            "task_rows": {f"heads/{g}": taskset.group_members(g) for g in taskset.groups},
            "layer_groups": tuple((n, "^" + rx) for n, rx in net.layer_groups)}

  if arch == "mtan":
    # The attention's convolution blocks are one set for every task (the
    # code's): shared parameters (shared/attention/*_block) that the per-task
    # part reads, so MTAN has no task-independent part (as mtan on the small
    # encoders): every slot runs the network, the gradient methods see the
    # blocks as shared. The per-task masks stay task stacks.
    def to_mtljax(tree):
      att = tree["tasks"].get("attention", {})
      shared = {**tree["shared"],
                "attention": {k: v for k, v in att.items() if k.endswith("_block")}}
      tasks = {**tree["tasks"],
               "attention": {k: v for k, v in att.items() if not k.endswith("_block")}}
      return {"shared": shared, "tasks": tasks}

    def to_net(tree):
      shared = {k: v for k, v in tree["shared"].items() if k != "attention"}
      tasks = {**tree["tasks"],
               "attention": {**tree["tasks"].get("attention", {}),
                             **tree["shared"].get("attention", {})}}
      return {"shared": shared, "tasks": tasks}

    def init_mtan(rng):
      p, st = init_one(rng)
      return to_mtljax(p), to_mtljax(st)

    def apply_mtan(params, x, task_ids, state=None, train=False):
      p, st0 = to_net(params), to_net(state)
      outs, st = per_slot(lambda xk, t: slot(p, st0, xk, t, train),
                          (x, jnp.asarray(task_ids)), st0, train)
      return outs, (to_mtljax(st) if train else state)

    abstract = jax.eval_shape(lambda: init_mtan(jax.random.key(0))[0])
    rows = {f"heads/{g}": taskset.group_members(g) for g in taskset.groups}
    rows.update({f"attention/{name}": np.arange(len(taskset), dtype=np.int32)
                 for name in abstract["tasks"]["attention"]})
    groups = tuple((n, "^" + (rx.replace("tasks/attention/", "(shared|tasks)/attention/")))
                   for n, rx in net.layer_groups)
    return {"init": lambda rng: init_mtan(rng)[0], "init_state": lambda rng: init_mtan(rng)[1],
            "apply": apply_mtan, "task_rows": rows, "layer_groups": groups}

  # independent: one SegNet per task (stacked tasks/trunk), the heads as the split model's.
  stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)

  def init_indep(rng):
    r_trunk, r_heads = jax.random.split(rng)
    keys = jax.vmap(lambda s: jax.random.fold_in(r_trunk, s))(stream_ids)
    trunks, trunk_stats = jax.vmap(lambda k: init_one(k))(keys)
    heads, head_stats = init_one(r_heads)
    return ({"shared": {}, "tasks": {"trunk": trunks["shared"], **heads["tasks"]}},
            {"shared": {}, "tasks": {"trunk": trunk_stats["shared"], **head_stats["tasks"]}})

  def apply_indep(params, x, task_ids, state=None, train=False):
    tp = params["tasks"]
    heads = {k: v for k, v in tp.items() if k != "trunk"}
    head_state = {k: v for k, v in state["tasks"].items() if k != "trunk"}

    def one(xk, t):
      p = jax.tree.map(lambda a: a[t], tp["trunk"])
      s = jax.tree.map(lambda a: a[t], state["tasks"]["trunk"])
      rep, st = encode(p, xk, s, train)
      outs, _ = task_part(heads, rep, t[None], head_state, train)
      return jax.tree.map(lambda a: a[0], outs), st
    ids = jnp.asarray(task_ids)
    outs, st = jax.vmap(one)(x, ids)
    trunks = state["tasks"]["trunk"]
    if train:
      trunks = scatter_rows(trunks, st, ids, jnp.ones(ids.shape, bool))
    return outs, {"shared": {}, "tasks": {"trunk": trunks, **head_state}}

  rows = {"trunk": np.arange(len(taskset), dtype=np.int32),
          **{f"heads/{g}": taskset.group_members(g) for g in taskset.groups}}
  groups = tuple((n, "^" + rx.replace("shared/", "tasks/trunk/", 1))
                 for n, rx in net.layer_groups)
  return {"init": lambda rng: init_indep(rng)[0], "init_state": lambda rng: init_indep(rng)[1],
          "apply": apply_indep, "task_rows": rows, "layer_groups": groups}
