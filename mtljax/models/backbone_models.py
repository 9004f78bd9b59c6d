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
by name), then ``heads``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import parts as parts_lib
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

  # --- apply -----------------------------------------------------------------

  def trunk_apply(self, p, s, x, train: bool):
    """``(layer4 features, new stats)`` of one trunk on ``x [B, H, W, 3]``."""
    v = {"params": p, "batch_stats": s} if self.stateful else {"params": p}
    if train and self.stateful:
      out, new = self.net.apply(v, x, True, mutable=["batch_stats"])
      return out["layer4"], new["batch_stats"]
    return self.net.apply(v, x, False)["layer4"], s

  def head_apply(self, group: str, p, s, feats, train: bool):
    """``(outputs [B, H, W, out], new stats)`` of one head on ``feats``."""
    head = self.heads[group]
    v = {"params": p, "batch_stats": s} if self.stateful else {"params": p}
    if train and self.stateful:
      out, new = head.apply(v, feats, True, self.size, mutable=["batch_stats"])
      return out, new["batch_stats"]
    return head.apply(v, feats, False, self.size), s

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


def _stage_groups(prefix: str) -> tuple[tuple[str, str], ...]:
  return tuple((s, rf"^{prefix}/{s}/") for s in resnet.STAGES) + (
      ("heads", r"^tasks/heads/"),)


def build(arch: str, trunk: parts_lib.Trunk, taskset: tasks_lib.TaskSet,
          input_shape: Sequence[int]) -> dict:
  """The Model fields of ``arch`` on the backbone ``trunk.encoder``."""
  if trunk.encoder in parts_lib.SEGNETS:
    return segnet_model(arch, trunk, taskset, input_shape)
  return {"multi_head": resnet_multi_head,
          "independent": resnet_independent}[arch](trunk, taskset, input_shape)


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
    feats, st = jax.vmap(lambda xk: bb.trunk_apply(params["shared"]["trunk"],
                                                   state["shared"]["trunk"], xk, train))(x)
    outs, hs = bb.heads_apply(params["tasks"]["heads"], state["tasks"]["heads"], feats,
                              task_ids, train, per_slot=True)
    trunk_state = (jax.tree.map(lambda a: jnp.mean(a, axis=0), st) if train
                   else state["shared"]["trunk"])
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
    r_trunk, r_heads = jax.random.split(rng)
    keys = jax.vmap(lambda s: jax.random.fold_in(r_trunk, s))(bb.stream_ids)
    tp, ts_ = jax.vmap(bb.trunk_variables)(keys)
    hp, hs = bb.all_heads(r_heads)
    return ({"shared": {}, "tasks": {"trunk": tp, "heads": hp}},
            {"shared": {}, "tasks": {"trunk": ts_, "heads": hs}})

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

  if arch == "multi_head":
    def apply(params, x, task_ids, state=None, train=False):
      # Per slot (its own batch statistics); every slot runs every task's
      # head and reads its own; the statistics' update is the slots' mean.
      def one(xk, t):
        rep, sh = encode(params["shared"], xk, state["shared"], train)
        outs, ts_ = task_part(params["tasks"], rep, t[None], state["tasks"], train)
        return jax.tree.map(lambda a: a[0], outs), {"shared": sh, "tasks": ts_}
      outs, st = jax.vmap(one)(x, jnp.asarray(task_ids))
      return outs, (jax.tree.map(lambda a: jnp.mean(a, axis=0), st) if train else state)

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

      def one(xk, t):
        rep, sh = encode(p["shared"], xk, st0["shared"], train)
        outs, ts_ = task_part(p["tasks"], rep, t[None], st0["tasks"], train)
        return jax.tree.map(lambda a: a[0], outs), {"shared": sh, "tasks": ts_}
      outs, st = jax.vmap(one)(x, jnp.asarray(task_ids))
      if not train:
        return outs, state
      return outs, to_mtljax(jax.tree.map(lambda a: jnp.mean(a, axis=0), st))

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
