"""Expert families and task attention: CGC / PLE, DSelect-k gates, MTAN.

The architectures here (``cgc``, ``ple``, ``mtan``: their hyper-parameter
dataclasses and build functions, recorded in
:data:`mtljax.models.multitask.REGISTRY`) are built from their
:class:`~mtljax.models.parts.Parts` (trunk, towers, heads, per-task keys); this
module reads no config and imports no other architecture code (the mixtures,
:mod:`mtljax.models.mixtures`, take their gates from here, ``dselect_k``'s
hyper-parameters live there).

* ``cgc`` / ``ple`` (Tang et al., RecSys 2020, "Progressive Layered
  Extraction"): at level ``l`` there are ``num_experts`` shared experts
  (``shared/experts/level_l``, stacked ``[E_s, ...]``) and ``task_experts``
  experts per task (``tasks/experts/level_l``, ``[T, E_t, ...]``). Task ``t``'s
  gate (``tasks/gates/level_l``, a softmax of a linear map of the task's input
  at that level) mixes the shared experts and its own,
  ``h_t^l = sum_e softmax(h_t^{l-1} W_t^l + b_t^l)_e [S^l; O_t^l]_e``; the
  shared path's gate (``shared/gate/level_l``) mixes every expert of the level,
  ``h_s^l = sum_e softmax(h_s^{l-1} W_s^l + b_s^l)_e [S^l; O_1^l; ...; O_T^l]_e``.
  Shared experts read ``h_s^{l-1}``, task ``t``'s experts ``h_t^{l-1}``
  (``h^{-1} = x``, gates on the flattened input). The last level has no shared
  gate; ``h_t^{L-1}`` goes to the task's tower and head. Level 0's experts are
  the configured encoder (mlp or cnn); levels >= 1 are ReLU MLPs of widths
  ``level_hidden``. ``cgc`` is one level. Gates start at zero (uniform).
  Unlike LibMTL's PLE (whose shared experts run on each task's path and which
  has no shared gate), this is the paper's: every level > 0 of the shared path
  reads every task's experts of the level before, so ``ple`` with more than one
  level has no task-independent part and a slot computes every task's path.
  Cross-task experts: at every level but the last, task ``t``'s experts
  (``tasks/experts/level_l``, ``l < L-1``) feed the shared gate, hence every
  task's later levels, so they act as shared parameters stored in per-task
  rows. :mod:`mtljax.jacobians` treats them as per-task parameters: they get
  ``sum_k c_k grad L_k`` through ``task_grads`` (every slot's loss, not only
  task ``t``'s) and are left out of the per-slot gradients and the Gram
  matrix that the gradient methods (MGDA, PCGrad, ...) resolve; when ``t`` is
  not sampled in a step the optimizer freezes its rows, these experts
  included, although the sampled tasks read them.
* ``dselect_k`` (Hazimeh et al., NeurIPS 2021): MMoE's experts with DSelect-k
  gates. A gate has ``k`` single-expert selectors: selector ``i`` puts
  ``r_i(e) = prod_j [b_ej S(z_ij) + (1 - b_ej)(1 - S(z_ij))]`` on expert ``e``
  (``b_e`` its ``m = ceil(log2 E)``-bit binary code, most significant bit
  first; ``S`` the smooth-step of width ``gamma``), and the gate's weights are
  ``sum_i softmax(w)_i r_i``. Static gates (default; the paper's task-only
  conditioning): ``tasks/gates/{z [T, k, m], w [T, k]}``; per-example gates
  (``per_example``): ``z`` and ``w`` are linear maps of the flattened
  input. Initialised as the official code: ``z ~ U(-gamma/100, gamma/100)``,
  ``w ~ U(-0.05, 0.05)``. Static gates carry the model penalty
  ``entropy_reg * sum H(r_i)`` and, when ``E`` is not a power of 2, the official
  code's reachability term ``sum_i 1 / sum_e r_i(e)``.
* ``mtan`` (Liu et al., CVPR 2019): the shared encoder (``shared/trunk``) with,
  for each task, an attention module per trunk layer (conv block or dense
  layer) ``j``: ``a_t^j = sigmoid(A2(relu(A1(u))))`` with ``u = s^j`` at ``j = 0``
  and ``u = [s^j, p_t^{j-1}]`` after (``s^j`` the shared layer's output before
  pooling; ``A1``, ``A2`` 1x1 convolutions, i.e. dense maps over channels,
  ``tasks/attention/<layer>/a1|a2``), the attended features ``e_t^j = a_t^j * s^j``
  and ``p_t^j = f^j(e_t^j)`` with the shared ``f^j`` (``shared/att_f/<layer>``: a
  3x3 conv to the next block's channels then the encoder's pooling; a dense
  layer into the first dense layer's width; a dense layer between dense
  layers). The last layer's ``p`` is its (pooled, flattened) attended features,
  read by the task's tower and head. No batch norm (mtljax has none). The
  shared trunk's activations are task-independent, but ``f^j`` (shared
  parameters) runs on task-attended features, so the per-task part reads shared
  parameters: MTAN has no ``encode`` / ``decode`` and every slot runs the trunk.
  Layer group ``j`` holds trunk layer ``j``, its attention modules and
  ``f^{j-1}`` (which produces layer ``j``'s attention input ``p^{j-1}``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtljax import tasks as tasks_lib
from mtljax.models import backbone_models
from mtljax.models import encoders
from mtljax.models import parts as parts_lib

_ENTROPY_EPS = 1e-6  # the official code's log(r + 1e-6)


# ----------------------------------------------------------------------------
# Gates: softmax (MMoE / OMoE / CGC / PLE) and DSelect-k.
# ----------------------------------------------------------------------------


class Gate:
  """A gate: ``init(rng) -> params`` and ``gate(params, h [B, ...]) -> [B, E]``
  (non-negative weights over the experts)."""

  def __init__(self, init: Callable, weights: Callable):
    self.init, self._weights = init, weights

  def __call__(self, params, h):
    return self._weights(params, h)


def softmax_gate(num_experts: int, in_dim: int) -> Gate:
  """``softmax(flat(h) W + b)``; initialised at zero (uniform ``1/E``)."""
  def init(rng):
    del rng
    return {"kernel": jnp.zeros((in_dim, num_experts), jnp.float32),
            "bias": jnp.zeros((num_experts,), jnp.float32)}

  def weights(p, h):
    return jax.nn.softmax(h.reshape(h.shape[0], -1) @ p["kernel"] + p["bias"], axis=-1)
  return Gate(init, weights)


def smooth_step(t, gamma: float):
  """``S(t)``: 0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, else
  ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` (Hazimeh et al. 2021, eq. 1)."""
  cubic = -2.0 / gamma ** 3 * t ** 3 + 3.0 / (2.0 * gamma) * t + 0.5
  return jnp.where(t <= -gamma / 2, 0.0, jnp.where(t >= gamma / 2, 1.0, cubic))


def binary_codes(num_experts: int) -> np.ndarray:
  """``[E, ceil(log2 E)]`` bool: row ``e`` is ``e`` in binary, most significant bit first."""
  m = math.ceil(math.log2(num_experts)) if num_experts > 1 else 0
  return ((np.arange(num_experts)[:, None] >> np.arange(m - 1, -1, -1)[None, :]) & 1
          ).astype(bool)


def dselect_weights(z, w, *, num_experts: int, gamma: float):
  """DSelect-k's expert weights from selector logits.

  Args:
    z: ``[..., k, m]`` binary-encoding logits, ``m = ceil(log2 num_experts)``.
    w: ``[..., k]`` selector logits.
    num_experts: E.
    gamma: the smooth-step width.

  Returns:
    ``(weights [..., E], selectors [..., k, E])``: selector ``i``'s weights
    ``r_i(e) = prod_j (b_ej S(z_ij) + (1 - b_ej)(1 - S(z_ij)))`` and the gate
    ``sum_i softmax(w)_i r_i``. Each ``r_i`` sums to one when E is a power of 2
    and is one-hot once every ``|z_ij| >= gamma / 2``, so the gate then has at
    most k non-zeros.
  """
  codes = jnp.asarray(binary_codes(num_experts))                    # [E, m]
  s = smooth_step(z, gamma)[..., None, :]                           # [..., k, 1, m]
  selectors = jnp.prod(jnp.where(codes, s, 1.0 - s), axis=-1)        # [..., k, E]
  weights = jnp.sum(jax.nn.softmax(w, axis=-1)[..., None] * selectors, axis=-2)
  return weights, selectors


def dselect_gate(num_experts: int, k: int, gamma: float, per_example: bool,
                 in_dim: int) -> Gate:
  """A DSelect-k gate over ``num_experts`` experts with ``k`` selectors and
  smooth-step width ``gamma``, static (``{"z": [k, m], "w": [k]}``) or
  ``per_example`` (``{"z": {"kernel" [D, k m], "bias"}, "w": {"kernel" [D, k],
  "bias"}}`` on ``in_dim = D`` flattened inputs)."""
  e = num_experts
  m = binary_codes(e).shape[1]

  def uniform(key, shape, bound):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

  def init(rng):
    r = jax.random.split(rng, 4)
    zb, wb = gamma / 100.0, 0.05
    if not per_example:
      return {"z": uniform(r[0], (k, m), zb), "w": uniform(r[1], (k,), wb)}
    return {"z": {"kernel": uniform(r[0], (in_dim, k * m), zb),
                  "bias": uniform(r[1], (k * m,), zb)},
            "w": {"kernel": uniform(r[2], (in_dim, k), wb), "bias": uniform(r[3], (k,), wb)}}

  def weights(p, h):
    b = h.shape[0]
    if not per_example:
      g, _ = dselect_weights(p["z"], p["w"], num_experts=e, gamma=gamma)
      return jnp.broadcast_to(g, (b, e))
    hf = h.reshape(b, -1)
    z = (hf @ p["z"]["kernel"] + p["z"]["bias"]).reshape(b, k, m)
    g, _ = dselect_weights(z, hf @ p["w"]["kernel"] + p["w"]["bias"], num_experts=e,
                           gamma=gamma)
    return g
  return Gate(init, weights)


def dselect_penalty(num_experts: int, gamma: float, entropy_reg: float) -> Callable | None:
  """Static gates' regularisers over every task's gate: ``entropy_reg * sum_i
  H(r_i)`` (``H(r) = -sum_e r_e log(r_e + 1e-6)``) and, when E is not a power
  of 2, ``sum_i 1 / sum_e r_i(e)`` (keeps mass on reachable experts); None
  when both are off."""
  e, reg = num_experts, entropy_reg
  reachability = e & (e - 1) != 0
  if reg == 0 and not reachability:
    return None

  def penalty(params):
    g = params["tasks"]["gates"]
    _, r = dselect_weights(g["z"], g["w"], num_experts=e, gamma=gamma)
    out = reg * -jnp.sum(r * jnp.log(r + _ENTROPY_EPS))
    if reachability:
      out = out + jnp.sum(1.0 / jnp.sum(r, axis=-1))
    return out
  return penalty


def _gather(tree, rows):
  return jax.tree.map(lambda a: a[rows], tree)


# ----------------------------------------------------------------------------
# CGC and PLE.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CGCHParams:
  """``cgc`` (``config.model.cgc.*``): one extraction level.

  Attributes:
    num_experts: the shared experts, each a trunk.
    task_experts: each task's own experts (0: none; then CGC is MMoE).
    tower: the per-task ReLU towers' widths.
  """
  num_experts: int = 8
  task_experts: int = 1
  tower: tuple[int, ...] = (8,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> CGCHParams:
    del trunk
    return dataclasses.replace(
        self, num_experts=parts_lib.at_least(f"{arch}.num_experts", self.num_experts, 1),
        task_experts=parts_lib.at_least(f"{arch}.task_experts", self.task_experts, 0),
        tower=parts_lib.checked_tower(arch, self.tower))


@dataclasses.dataclass(frozen=True)
class PLEHParams:
  """``ple`` (``config.model.ple.*``): CGC's levels stacked, a shared gate
  between them.

  Attributes:
    num_experts: the shared experts per level (level 0's are trunks).
    task_experts: each task's own experts per level.
    num_levels: the extraction levels (1: CGC).
    level_hidden: the widths of the experts at levels >= 1, ReLU MLPs (``()``:
      one layer of the trunk's last width, ``hidden[-1]``).
    tower: the per-task ReLU towers' widths.
  """
  num_experts: int = 8
  task_experts: int = 1
  num_levels: int = 2
  level_hidden: tuple[int, ...] = ()
  tower: tuple[int, ...] = (8,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> PLEHParams:
    """Checked, with ``level_hidden`` resolved (``()``: ``hidden[-1:]``)."""
    levels = parts_lib.at_least(f"{arch}.num_levels", self.num_levels, 1)
    level_hidden = parts_lib.positive_ints(f"{arch}.level_hidden", self.level_hidden)
    if levels > 1 and not (level_hidden or trunk.hidden):
      raise ValueError(f"{arch}.num_levels={levels} needs {arch}.level_hidden (or hidden, "
                       "whose last width is the default).")
    cgc = CGCHParams(self.num_experts, self.task_experts, self.tower).checked(arch, trunk)
    return PLEHParams(cgc.num_experts, cgc.task_experts, levels,
                      level_hidden or tuple(trunk.hidden[-1:]), cgc.tower)


@dataclasses.dataclass(frozen=True)
class MTANHParams:
  """``mtan`` (``config.model.mtan.*``); it needs at least one trunk layer.

  Attributes:
    tower: the per-task ReLU towers' widths after the attended features.
  """
  tower: tuple[int, ...] = (8,)

  def checked(self, arch: str, trunk: parts_lib.Trunk) -> MTANHParams:
    if not trunk.layer_names:
      raise ValueError(f"arch {arch!r} with encoder {trunk.encoder!r} needs at least one "
                       "trunk layer to attend (hidden / channels are empty).")
    return dataclasses.replace(self, tower=parts_lib.checked_tower(arch, self.tower))


def cgc(arch: str, trunk: parts_lib.Trunk, hparams: CGCHParams, taskset: tasks_lib.TaskSet,
        input_shape: Sequence[int]) -> dict:
  """``cgc``: PLE's one level; the :class:`~mtljax.models.multitask.Model` fields."""
  del arch
  one_level = PLEHParams(hparams.num_experts, hparams.task_experts, 1,
                         tuple(trunk.hidden[-1:]), hparams.tower)
  return ple_model(parts_lib.Parts(trunk, taskset, input_shape, tower=hparams.tower),
                   one_level)


def ple(arch: str, trunk: parts_lib.Trunk, hparams: PLEHParams, taskset: tasks_lib.TaskSet,
        input_shape: Sequence[int]) -> dict:
  """``ple``: the :class:`~mtljax.models.multitask.Model` fields."""
  del arch
  return ple_model(parts_lib.Parts(trunk, taskset, input_shape, tower=hparams.tower), hparams)


def mtan(arch: str, trunk: parts_lib.Trunk, hparams: MTANHParams, taskset: tasks_lib.TaskSet,
         input_shape: Sequence[int]) -> dict:
  """``mtan``: the :class:`~mtljax.models.multitask.Model` fields (on the
  SegNet encoder: the MTAN paper's model; on a ResNet encoder: LibMTL's
  attention over the ResNet stages; :mod:`mtljax.models.backbone_models`)."""
  if trunk.encoder in parts_lib.BACKBONES:
    if hparams.tower:
      which = ("MTAN over SegNet has the MTAN code's heads" if trunk.encoder in parts_lib.SEGNETS
               else "MTAN over ResNet stages has LibMTL's DeepLab heads")
      raise ValueError(f"mtan.tower={hparams.tower}: {which}, no tower; leave mtan.tower "
                       "empty.")
    return backbone_models.build(arch, trunk, taskset, input_shape)
  return mtan_model(parts_lib.Parts(trunk, taskset, input_shape, tower=hparams.tower))


def ple_model(parts: parts_lib.Parts, hparams: PLEHParams) -> dict:
  """``hparams.num_levels`` levels (1: ``cgc``; ``level_hidden`` resolved):
  see the module docstring.

  With ``num_levels >= 2`` and ``task_experts > 0``, task ``t``'s experts at
  levels ``l < L-1`` are read by every task (through the shared gate ``h_s^l``)
  but live in the per-task rows ``tasks/experts/level_l [T, ...]``: the
  gradient methods see them as task parameters (``task_grads``, the gradient
  of ``sum_k c_k L_k``; not in the Gram matrix they resolve), and they are
  frozen in steps where ``t`` is not sampled although other tasks use them.
  Set ``task_experts=0`` (or ``num_levels=1``, CGC) for a model whose every
  cross-task parameter is shared.
  """
  num_tasks, level_hidden = parts.num_tasks, hparams.level_hidden
  levels, e_s, e_t = hparams.num_levels, hparams.num_experts, hparams.task_experts
  dims = [parts.trunk_dim] + [level_hidden[-1] if level_hidden else 0] * (levels - 1)
  gate_in = [int(np.prod(parts.input_shape))] + dims[:-1]
  task_gates = [softmax_gate(e_s + e_t, gate_in[l]) for l in range(levels)]
  shared_gates = [softmax_gate(e_s + num_tasks * e_t, gate_in[l]) for l in range(levels - 1)]
  expert_init, expert_apply = _level_experts(parts, level_hidden, dims)

  def init(rng):
    r_trunk, r_heads, r_extra = jax.random.split(rng, 3)
    shared = {"experts": {}, "gate": {}}
    tp = {"experts": {}, "gates": {}}
    for l in range(levels):
      name, (r_s, r_t) = f"level_{l}", jax.random.split(jax.random.fold_in(r_trunk, l))
      shared["experts"][name] = jax.vmap(lambda r, l=l: expert_init(l, r))(
          jax.random.split(r_s, e_s))
      if e_t:  # per task from its stream key, then one key per expert
        tp["experts"][name] = jax.vmap(lambda r, l=l: jax.vmap(
            lambda q: expert_init(l, q))(jax.random.split(r, e_t)))(parts.all_task_keys(r_t))
      tp["gates"][name] = jax.vmap(task_gates[l].init)(parts.all_task_keys(r_extra))
      if l < levels - 1:
        shared["gate"][name] = shared_gates[l].init(r_extra)
    shared = {k: v for k, v in shared.items() if v}
    tp = {k: v for k, v in tp.items() if v}
    if parts.tower:
      tp["towers"] = parts.towers_init(r_extra, dims[-1])
    params = {"shared": shared, "tasks": tp}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.feat_dim(dims[-1]))
    return params

  def paths(shared, tp, x, rows, s0=None):
    """The task paths ``h_r^{L-1}`` of the task rows ``rows [R]`` on one
    input ``x [B, ...]``: ``[R, B, F]``. With more than one level ``rows`` must
    be every task in order (the shared gates read every task's experts).
    ``s0``: level 0's shared expert outputs, if already computed."""
    h_s, h_t = x, None  # h_t None: every row reads x (level 0)
    for l in range(levels):
      name = f"level_{l}"
      s_out = (s0 if l == 0 and s0 is not None else
               jax.vmap(lambda p, l=l: expert_apply(l, p, h_s))(shared["experts"][name]))
      outs = jnp.broadcast_to(s_out, (len(rows),) + s_out.shape)     # [R, E_s, B, F]
      if e_t:
        ep = _gather(tp["experts"][name], rows)

        def own(pr, h, l=l):
          return jax.vmap(lambda p: expert_apply(l, p, h))(pr)      # [E_t, B, F]
        o_t = (jax.vmap(own, in_axes=(0, None))(ep, x) if h_t is None
               else jax.vmap(own)(ep, h_t))
        outs = jnp.concatenate([outs, o_t], axis=1)                  # [R, E_s + E_t, B, F]
      gates = _gather(tp["gates"][name], rows)
      mix = lambda g, h, o, l=l: jnp.einsum("be,ebf->bf", task_gates[l](g, h), o)
      new_t = (jax.vmap(mix, in_axes=(0, None, 0))(gates, x, outs) if h_t is None
               else jax.vmap(mix)(gates, h_t, outs))                 # [R, B, F]
      if l < levels - 1:
        every = jnp.concatenate([s_out, outs[:, e_s:].reshape((-1,) + s_out.shape[1:])])
        h_s = jnp.einsum("be,ebf->bf", shared_gates[l](shared["gate"][name], h_s), every)
      h_t = new_t
    return h_t

  def slot_features(params, xk, t):
    if levels == 1:
      return paths(params["shared"], params["tasks"], xk, t[None])[0]
    return paths(params["shared"], params["tasks"], xk, np.arange(num_tasks))[t]

  def apply(params, x, task_ids):
    feats = jax.vmap(lambda xk, t: slot_features(params, xk, t))(x, task_ids)  # [K, B, F]
    h = parts.towers_apply(params["tasks"].get("towers"), feats, task_ids, 0)
    return parts.heads_apply(params[parts.heads_home]["heads"], h, task_ids)

  def encode(shared, x):
    return jax.vmap(lambda p: parts.trunk_apply(p, x))(shared["experts"]["level_0"])

  def decode(task_params, rep, x, task_ids):
    feats = paths({"experts": {}}, task_params, x, task_ids, s0=rep)
    h = parts.towers_apply(task_params.get("towers"), feats, task_ids, 0)
    return parts.heads_apply(task_params["heads"], h, task_ids)

  out = {"init": init, "apply": apply, "task_rows": _ple_task_rows(parts, e_t),
         "layer_groups": _ple_layer_groups(parts, levels, level_hidden)}
  if levels > 1 or not parts.per_task_heads:
    return out  # the shared path reads every task's experts / the heads are shared
  return {**out, "encode": encode, "decode": decode}


def _level_experts(parts: parts_lib.Parts, level_hidden: tuple[int, ...], dims: list[int]):
  """``(init(l, rng), apply(l, params, h))`` of one expert at level ``l``: the
  configured encoder at level 0, ReLU layers of widths ``level_hidden`` on the
  level before's ``dims[l - 1]`` features after."""
  mlp = encoders.MLP(level_hidden)

  def expert_init(l, rng):
    if l == 0:
      return parts.trunk_init(rng)
    return mlp.init(rng, jnp.zeros((1, dims[l - 1]), jnp.float32))["params"]

  def expert_apply(l, p, h):
    return parts.trunk_apply(p, h) if l == 0 else mlp.apply({"params": p}, h)
  return expert_init, expert_apply


def _ple_task_rows(parts: parts_lib.Parts, task_experts: int) -> dict[str, np.ndarray]:
  """The per-task stacks of ``cgc`` / ``ple``: gates, task experts (when
  ``task_experts > 0``), towers (with a tower) and per-task heads."""
  rows = {k: np.arange(parts.num_tasks, dtype=np.int32)
          for k in ("gates",) + (("experts",) if task_experts else ()) +
          (("towers",) if parts.tower else ())}
  rows.update(parts.head_rows())
  return rows


def _ple_layer_groups(parts: parts_lib.Parts, levels: int, level_hidden: tuple[int, ...]
                      ) -> tuple[tuple[str, str], ...]:
  """Level 0's expert layers, then per level its expert layers (levels >= 1)
  and its gates, then the towers and heads."""
  extra = []
  for l in range(levels):
    if l:
      extra += [(f"level_{l}/layer_{j}", rf"^(shared|tasks)/experts/level_{l}/layer_{j}/")
                for j in range(len(level_hidden))]
    extra.append(("gates" if levels == 1 else f"gates_{l}",
                  rf"^(tasks/gates|shared/gate)/level_{l}/"))
  return parts.layer_groups("shared/experts/level_0|tasks/experts/level_0",
                            extra + parts.tower_groups())


# ----------------------------------------------------------------------------
# MTAN.
# ----------------------------------------------------------------------------


def _pool(h):
  """The CNN encoder's 2x2 max-pool where the map is at least 2x2."""
  if h.shape[1] >= 2 and h.shape[2] >= 2:
    return nn.max_pool(h, (2, 2), strides=(2, 2))
  return h


def _dense(p, h):
  return h @ p["kernel"] + p["bias"]


def mtan_model(parts: parts_lib.Parts) -> dict:
  """``mtan``: see the module docstring."""
  num_tasks, encoder = parts.num_tasks, parts.trunk.encoder
  names = parts.layer_names
  widths = (list(parts.trunk.channels) if encoder == "cnn" else []) + list(parts.trunk.hidden)
  is_conv = [n.startswith("conv") for n in names]
  last = len(names) - 1

  def shared_acts(trunk, x):
    """Each trunk layer's output ``s^j`` (conv: after ReLU, before pooling)."""
    h = x if encoder == "mlp" or x.ndim == 4 else x[..., None]
    if encoder == "mlp":
      h = h.reshape(h.shape[0], -1)
    acts = []
    for j, n in enumerate(names):
      if is_conv[j]:
        h = nn.relu(encoders.PatchConv(widths[j], 3).apply({"params": trunk[n]}, h))
        acts.append(h)
        h = _pool(h)
      else:
        h = nn.relu(_dense(trunk[n], h.reshape(h.shape[0], -1)))
        acts.append(h)
    return acts

  def f_apply(j, p, e):
    """``p^j = f^j(e^j)``: the next layer's input shape, or the features."""
    if j == last:
      return _pool(e).reshape(e.shape[0], -1) if is_conv[j] else e
    if is_conv[j + 1]:
      return _pool(nn.relu(encoders.PatchConv(widths[j + 1], 3).apply({"params": p}, e)))
    flat = _pool(e).reshape(e.shape[0], -1) if is_conv[j] else e
    return nn.relu(_dense(p, flat))

  def attended(shared, att, x):
    """Task features ``p^{L-1}`` of one task (``att``: its attention rows): ``[B, F]``."""
    acts, p = shared_acts(shared["trunk"], x), None
    for j, n in enumerate(names):
      u = acts[j] if j == 0 else jnp.concatenate([acts[j], p], axis=-1)
      a = jax.nn.sigmoid(_dense(att[n]["a2"], nn.relu(_dense(att[n]["a1"], u))))
      p = f_apply(j, shared["att_f"].get(n), a * acts[j])
    return p

  def init(rng):
    r_trunk, r_heads, r_extra = jax.random.split(rng, 3)
    trunk = parts.trunk_init(r_trunk)
    acts = jax.eval_shape(lambda: shared_acts(trunk, parts.x_example))
    att_f, r_f = {}, jax.random.fold_in(r_extra, 1)
    for j, n in enumerate(names[:-1]):
      e = jnp.zeros(acts[j].shape, jnp.float32)
      if is_conv[j + 1]:
        att_f[n] = encoders.PatchConv(widths[j + 1], 3).init(jax.random.fold_in(r_f, j),
                                                             e)["params"]
      else:
        flat = _pool(e).reshape(1, -1) if is_conv[j] else e
        att_f[n] = encoders.CondDense(widths[j + 1]).init(jax.random.fold_in(r_f, j),
                                                          flat)["params"]

    def one_task(key):
      out = {}
      for j, n in enumerate(names):
        k1, k2 = jax.random.split(jax.random.fold_in(key, j))
        u = jnp.zeros((1, widths[j] * (1 if j == 0 else 2)), jnp.float32)
        d1 = encoders.CondDense(widths[j]).init(k1, u)["params"]
        d2 = encoders.CondDense(widths[j]).init(k2, jnp.zeros((1, widths[j])))["params"]
        out[n] = {"a1": d1, "a2": d2}
      return out
    tp = {"attention": jax.vmap(one_task)(parts.all_task_keys(jax.random.fold_in(r_extra, 2)))}
    if parts.tower:
      tp["towers"] = parts.towers_init(r_extra, parts.trunk_dim)
    params = {"shared": {"trunk": trunk, "att_f": att_f}, "tasks": tp}
    params[parts.heads_home]["heads"] = parts.heads_init(r_heads, parts.feat_dim(
        parts.trunk_dim))
    return params

  def apply(params, x, task_ids):
    att = _gather(params["tasks"]["attention"], task_ids)
    feats = jax.vmap(lambda xk, a: attended(params["shared"], a, xk))(x, att)  # [K, B, F]
    h = parts.towers_apply(params["tasks"].get("towers"), feats, task_ids, 0)
    return parts.heads_apply(params[parts.heads_home]["heads"], h, task_ids)

  rows = {"attention": np.arange(num_tasks, dtype=np.int32), **parts.head_rows()}
  if parts.tower:
    rows["towers"] = np.arange(num_tasks, dtype=np.int32)
  # f^j produces layer j+1's attention input (and, for a conv block, is a conv
  # at layer j+1's width), so shared/att_f/<layer j> is in layer j+1's group.
  groups = parts.layer_groups("shared/trunk|tasks/attention", parts.tower_groups())
  groups = tuple((g, rf"{rx}|^shared/att_f/{names[i - 1]}(/|$)" if 0 < i < len(names) else rx)
                 for i, (g, rx) in enumerate(groups))
  return {"init": init, "apply": apply, "task_rows": rows, "layer_groups": groups}
