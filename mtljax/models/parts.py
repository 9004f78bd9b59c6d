"""What every architecture is built from: the checked architecture description
(:class:`ArchSpec`) and its parts (:class:`Parts`: the trunk module, linear
heads, per-task towers, per-task random keys, layer groups).

:func:`mtljax.models.multitask.make_model` checks its arguments into an
:class:`ArchSpec`, makes the :class:`Parts` and hands them to an architecture's
constructor (:mod:`mtljax.models.shared_trunk`,
:mod:`mtljax.models.per_task_trunks`, :mod:`mtljax.models.mixtures`,
:mod:`mtljax.models.experts`), which returns the fields of a
:class:`mtljax.models.multitask.Model`. Per-task parameters of task ``t`` are
initialised from ``fold_in(rng, stream_ids[t])`` (:meth:`Parts.per_task_keys`),
so a subset run gets the same initial values.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import encoders


@dataclasses.dataclass(frozen=True)
class ArchSpec:
  """A checked architecture description (everything ``make_model`` takes)."""
  arch: str
  input_shape: tuple[int, ...]
  encoder: str
  hidden: tuple[int, ...]
  channels: tuple[int, ...]
  cond_layers: tuple[int, ...]
  per_task_heads: bool
  soft_lambda: float
  soft_norm: str
  soft_layers: str
  stitch_init: float
  num_experts: int
  tower: tuple[int, ...]
  task_experts: int = 1
  num_levels: int = 1
  level_hidden: tuple[int, ...] = ()
  dselect_k: int = 2
  dselect_gamma: float = 1.0
  dselect_per_example: bool = False
  dselect_entropy_reg: float = 0.0

  @property
  def conditioned(self) -> bool:
    return self.arch in encoders.COND_MODES

  @property
  def layer_names(self) -> tuple[str, ...]:
    convs = [f"conv_{i}" for i in range(len(self.channels))] if self.encoder == "cnn" else []
    return tuple(convs + [f"layer_{j}" for j in range(len(self.hidden))])


class Parts:
  """The flax modules and sizes of one architecture, its heads, towers and
  per-task keys: what the architecture constructors build a model from."""

  def __init__(self, spec: ArchSpec, taskset: tasks_lib.TaskSet):
    self.spec, self.taskset = spec, taskset
    self.num_tasks = len(taskset)
    mode = spec.arch if spec.conditioned else None
    self.trunk = (encoders.MLP(spec.hidden, mode, spec.cond_layers) if spec.encoder == "mlp"
                  else encoders.CNN(spec.channels, spec.hidden, mode, spec.cond_layers))
    self.x_example = jnp.zeros((1,) + spec.input_shape, jnp.float32)
    self.z_example = (jnp.zeros((self.num_tasks,), jnp.float32) if spec.conditioned
                      else None)
    self.trunk_dim = jax.eval_shape(
        lambda: self.trunk_apply(self.trunk_init(jax.random.key(0)), self.x_example,
                                 self.z_example)).shape[-1]
    self.stream_ids = jnp.asarray(taskset.stream_ids, jnp.int32)
    self.local_index = jnp.asarray(taskset.local_index)

  @property
  def heads_home(self) -> str:
    """Where the heads live: ``tasks`` (a row per task) or ``shared`` (one
    head per task group)."""
    return "tasks" if self.spec.per_task_heads else "shared"

  def trunk_init(self, rng):
    return self.trunk.init(rng, self.x_example, self.z_example)["params"]

  def trunk_apply(self, p, x, z=None):
    return self.trunk.apply({"params": p}, x, z)

  def per_task_keys(self, rng, members) -> jax.Array:
    """Keys ``fold_in(rng, stream_id)`` of the tasks ``members``."""
    return jax.vmap(lambda s: jax.random.fold_in(rng, s))(self.stream_ids[members])

  def all_task_keys(self, rng) -> jax.Array:
    return self.per_task_keys(rng, np.arange(self.num_tasks))

  # --- heads -----------------------------------------------------------------

  def heads_init(self, rng, feat_dim: int) -> dict:
    """``{group: {"kernel", "bias"}}``: per-task stacks ``[T_g, ...]`` or one
    head per group."""
    ts, out = self.taskset, {}

    def one(key, out_dim):
      k = jax.random.normal(key, (feat_dim, out_dim), jnp.float32) / np.sqrt(feat_dim)
      return {"kernel": k, "bias": jnp.zeros((out_dim,), jnp.float32)}
    for gi, g in enumerate(ts.groups):
      dim = ts.group_task(g).out_dim
      if self.spec.per_task_heads:  # keyed by stream id only, so subsets init alike
        out[g] = jax.vmap(lambda k, d=dim: one(k, d))(
            self.per_task_keys(rng, ts.group_members(g)))
      else:
        out[g] = one(jax.random.fold_in(rng, gi), dim)
    return out

  def heads_apply(self, head_params, feats, task_ids) -> dict:
    """``{group: [K, B, out]}`` from per-slot ``feats [K, B, F]`` or from
    ``feats [B, F]`` read by every slot (one matmul for all slots' heads)."""
    outs, k = {}, task_ids.shape[0]
    slices = tasks_lib.static_group_slices(self.taskset, task_ids)
    if slices is not None and self.spec.per_task_heads:
      return self._static_heads(head_params, feats, task_ids, slices)
    for g in self.taskset.groups:
      hp = head_params[g]
      if self.spec.per_task_heads:
        rows = jnp.clip(self.local_index[task_ids], 0, hp["kernel"].shape[0] - 1)
        hp = jax.tree.map(lambda a: a[rows], hp)
        spec = "kbf,kfo->kbo" if feats.ndim == 3 else "bf,kfo->kbo"
        outs[g] = jnp.einsum(spec, feats, hp["kernel"]) + hp["bias"][:, None]
      else:
        out = feats @ hp["kernel"] + hp["bias"]
        outs[g] = out if feats.ndim == 3 else jnp.broadcast_to(out, (k,) + out.shape)
    return outs

  def head_kernels(self, head_params, task_ids) -> dict:
    """``{group: [K, F, out]}``: each slot's kernel of the group's per-task heads
    (a clipped row for slots outside the group, as :meth:`heads_apply` reads)."""
    out = {}
    for g in self.taskset.groups:
      kernel = head_params[g]["kernel"]
      out[g] = kernel[jnp.clip(self.local_index[task_ids], 0, kernel.shape[0] - 1)]
    return out

  def _static_heads(self, head_params, feats, task_ids, slices) -> dict:
    """Per-task heads on a static slot layout: each group's heads run on its
    own slots only; the other slots' rows are zero (never read by the loss)."""
    outs, k = {}, task_ids.shape[0]
    for g, sl in slices.items():
      hp = head_params[g]
      rows = self.taskset.local_index[task_ids[sl]]
      if not np.array_equal(rows, np.arange(hp["kernel"].shape[0])):
        hp = jax.tree.map(lambda a, r=rows: a[r], hp)
      f = feats[sl] if feats.ndim == 3 else feats
      spec = "kbf,kfo->kbo" if feats.ndim == 3 else "bf,kfo->kbo"
      out = jnp.einsum(spec, f, hp["kernel"]) + hp["bias"][:, None]
      outs[g] = jnp.pad(out, ((sl.start, k - sl.stop), (0, 0), (0, 0)))
    return outs

  def head_rows(self) -> dict[str, np.ndarray]:
    if not self.spec.per_task_heads:
      return {}
    return {f"heads/{g}": self.taskset.group_members(g) for g in self.taskset.groups}

  # --- towers ----------------------------------------------------------------

  def towers_init(self, rng, in_dim: int):
    """Per-task ReLU towers of widths ``spec.tower`` on ``[B, in_dim]``
    features, stacked ``[T, ...]``; None without a tower."""
    if not self.spec.tower:
      return None
    mod, f_example = encoders.MLP(self.spec.tower), jnp.zeros((1, in_dim), jnp.float32)
    return jax.vmap(lambda r: mod.init(r, f_example)["params"])(self.all_task_keys(rng))

  def towers_apply(self, towers, h, task_ids, h_axis):
    """Slot k's tower on ``h`` (``[K, B, F]`` with ``h_axis=0``, or ``[B, F]``
    read by every slot with ``h_axis=None``): ``[K, B, F']`` (``h`` unchanged
    without a tower)."""
    if not self.spec.tower:
      return h
    mod = encoders.MLP(self.spec.tower)
    tp = jax.tree.map(lambda a: a[task_ids], towers)
    return jax.vmap(lambda p, a: mod.apply({"params": p}, a), in_axes=(0, h_axis))(tp, h)

  def tower_groups(self) -> list[tuple[str, str]]:
    return [(f"tower_{j}", rf"^tasks/towers/layer_{j}/") for j in range(len(self.spec.tower))]

  def feat_dim(self, in_dim: int) -> int:
    """The heads' input width after the towers."""
    return self.spec.tower[-1] if self.spec.tower else in_dim

  # --- layer groups ----------------------------------------------------------

  def layer_groups(self, trunk_prefixes: str, extra: Sequence[tuple[str, str]] = ()
                   ) -> tuple[tuple[str, str], ...]:
    """Trunk layers (under ``trunk_prefixes``, a regex alternative such as
    ``shared/trunk``), then ``extra`` groups, then the heads."""
    groups = [(n, rf"^({trunk_prefixes})/{n}(/|$)") for n in self.spec.layer_names]
    return tuple(groups) + tuple(extra) + (("heads", r"^(shared|tasks)/heads/"),)

