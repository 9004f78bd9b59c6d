"""Mixtures: ``mmoe`` (experts, a softmax gate per task), ``omoe`` (one gate
shared by every task), ``dselect_k`` (MMoE's experts with DSelect-k gates,
:mod:`mtljax.models.experts`) and ``shared_bottom`` (one shared trunk), each
followed by per-task towers and heads; see :mod:`mtljax.models.multitask`."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import experts
from mtljax.models import parts as parts_lib


@dataclasses.dataclass(frozen=True)
class MixtureHParams:
  """``mmoe`` / ``omoe`` (``config.model.<arch>.*``).

  Attributes:
    num_experts: the experts, each a trunk (``shared/experts``, stacked).
    tower: the per-task ReLU towers' widths between the mixture and the heads.
  """
  num_experts: int = 8
  tower: tuple[int, ...] = (8,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> MixtureHParams:
    del trunk
    return dataclasses.replace(
        self, num_experts=parts_lib.at_least(f"{arch}.num_experts", self.num_experts, 1),
        tower=parts_lib.checked_tower(arch, self.tower))


@dataclasses.dataclass(frozen=True)
class SharedBottomHParams:
  """``shared_bottom`` (``config.model.shared_bottom.*``).

  Attributes:
    tower: the per-task ReLU towers' widths between the trunk and the heads.
  """
  tower: tuple[int, ...] = (8,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> SharedBottomHParams:
    del trunk
    return dataclasses.replace(self, tower=parts_lib.checked_tower(arch, self.tower))


@dataclasses.dataclass(frozen=True)
class DSelectKHParams:
  """``dselect_k`` (``config.model.dselect_k.*``; the gates are
  :func:`mtljax.models.experts.dselect_gate`).

  Attributes:
    num_experts: the experts, each a trunk.
    tower: the per-task ReLU towers' widths.
    k: the selectors per gate, in [1, num_experts]: at most k experts per task
      once the smooth-step saturates.
    gamma: the smooth-step's width, > 0.
    per_example: the gates read the (flattened) input; else one static gate per
      task (the paper's task-only conditioning).
    entropy_reg: the weight of the selectors' entropy, a model penalty (static
      gates only).
  """
  num_experts: int = 8
  tower: tuple[int, ...] = (8,)
  k: int = 2
  gamma: float = 1.0
  per_example: bool = False
  entropy_reg: float = 0.0

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> DSelectKHParams:
    del trunk
    e = parts_lib.at_least(f"{arch}.num_experts", self.num_experts, 1)
    k = parts_lib.at_least(f"{arch}.k", self.k, 1)
    if k > e:
      raise ValueError(f"{arch}.k must be in [1, num_experts={e}], got {self.k}.")
    gamma = parts_lib.finite_number(f"{arch}.gamma", self.gamma)
    if gamma <= 0:
      raise ValueError(f"{arch}.gamma must be a finite number > 0, got {self.gamma}.")
    reg = parts_lib.finite_number(f"{arch}.entropy_reg", self.entropy_reg)
    if reg < 0:
      raise ValueError(f"{arch}.entropy_reg must be >= 0, got {self.entropy_reg}.")
    if not isinstance(self.per_example, (bool, np.bool_)):
      raise ValueError(f"{arch}.per_example must be True or False, got {self.per_example!r}.")
    if self.per_example and (reg > 0 or e & (e - 1) != 0):
      raise ValueError(
          f"{arch}.per_example=True: the entropy regulariser (entropy_reg={reg}) and the "
          f"reachability term of num_experts={e} (not a power of 2) read the batch, which a "
          "model penalty cannot; use static gates or entropy_reg=0 with a power of 2.")
    return dataclasses.replace(self, num_experts=e, tower=parts_lib.checked_tower(
        arch, self.tower), k=k, gamma=gamma, per_example=bool(self.per_example),
                               entropy_reg=reg)


def mixture(arch: str, trunk: parts_lib.Trunk,
            hparams: MixtureHParams | SharedBottomHParams | DSelectKHParams,
            taskset: tasks_lib.TaskSet, input_shape: Sequence[int]) -> dict:
  """``mmoe``, ``omoe``, ``shared_bottom`` or ``dselect_k``: the
  :class:`~mtljax.models.multitask.Model` fields."""
  parts = parts_lib.Parts(trunk, taskset, input_shape, tower=hparams.tower)
  num_tasks, tower = parts.num_tasks, parts.tower
  in_dim = int(np.prod(parts.input_shape))
  per_task_gates = arch in ("mmoe", "dselect_k")
  num_experts = 1 if arch == "shared_bottom" else hparams.num_experts
  gate_weights = (experts.dselect_gate(num_experts, hparams.k, hparams.gamma,
                                       hparams.per_example, in_dim) if arch == "dselect_k"
                  else experts.softmax_gate(num_experts, in_dim))

  def init(rng):
    r_trunk, r_heads, r_extra = jax.random.split(rng, 3)
    shared, task_params = {}, {}
    if arch == "shared_bottom":
      shared["trunk"] = parts.trunk_init(r_trunk)
    else:
      shared["experts"] = jax.vmap(parts.trunk_init)(
          jax.random.split(r_trunk, num_experts))
    if per_task_gates:  # keyed by stream id (dselect_k's gates are random)
      task_params["gates"] = jax.vmap(gate_weights.init)(
          parts.all_task_keys(jax.random.fold_in(r_extra, 1)))
    elif arch == "omoe":
      shared["gate"] = gate_weights.init(r_extra)
    if tower:
      task_params["towers"] = parts.towers_init(r_extra, parts.trunk_dim)
    params = {"shared": shared, "tasks": task_params}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.feat_dim(
        parts.trunk_dim))
    return params

  def gated(gate, x, experts_out):
    """``sum_e g(x)_e experts[e]``: ``[B, F]``."""
    return jnp.einsum("be,ebf->bf", gate_weights(gate, x), experts_out)

  def encode(shared, x):
    if arch == "shared_bottom":
      return parts.trunk_apply(shared["trunk"], x)                         # [B, F]
    experts_out = jax.vmap(lambda p: parts.trunk_apply(p, x))(shared["experts"])  # [E, B, F]
    return experts_out if per_task_gates else gated(shared["gate"], x, experts_out)

  def per_task(task_params, heads, rep, x, task_ids):
    h, h_axis = rep, None                       # [B, F] for every slot, or per slot
    if per_task_gates:
      gates = jax.tree.map(lambda a: a[task_ids], task_params["gates"])
      h, h_axis = jax.vmap(lambda g: gated(g, x, rep))(gates), 0           # [K, B, F]
    h = parts.towers_apply(task_params.get("towers"), h, task_ids, h_axis)  # [K, B, F']
    return parts.heads_apply(heads, h, task_ids)

  def apply(params, x, task_ids):
    heads = params[parts.heads_home]["heads"]
    outs = jax.vmap(lambda xk, t: per_task(params["tasks"], heads, encode(params["shared"], xk),
                                           xk, t[None]))(x, task_ids)
    return {g: o[:, 0] for g, o in outs.items()}

  def decode(task_params, rep, x, task_ids):
    return per_task(task_params, task_params["heads"], rep, x, task_ids)

  rows = {"towers": np.arange(num_tasks, dtype=np.int32)} if tower else {}
  if per_task_gates:
    rows["gates"] = np.arange(num_tasks, dtype=np.int32)
  rows.update(parts.head_rows())
  extra = [] if arch == "shared_bottom" else [("gates", r"^(tasks/gates|shared/gate)/")]
  out = {"init": init, "apply": apply, "task_rows": rows,
         "layer_groups": parts.layer_groups("shared/trunk|shared/experts",
                                            extra + parts.tower_groups())}
  if arch == "dselect_k" and not hparams.per_example:
    out["penalty"] = experts.dselect_penalty(num_experts, hparams.gamma, hparams.entropy_reg)
  if not parts.per_task_heads:  # the per-task part would read shared heads: per slot
    return out
  return {**out, "encode": encode, "decode": decode}
