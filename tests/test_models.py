"""Architectures: conditioning equivalences, parameter layout, and the vmapped
per-task loss against a float64 numpy loop over tasks."""

import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from mtljax import params as params_lib
from mtljax import tasks
from mtljax.models import multitask

CLS3 = tasks.TaskSet(tuple(tasks.Task(f"t{i}", "classification", 10) for i in range(3)))
MIXED = tasks.TaskSet((tasks.Task("a", "classification", 10), tasks.Task("r", "regression"),
                       tasks.Task("b", "classification", 10), tasks.Task("c", "binary")))


def _x(shape, k=3, b=5, seed=0):
  """Standard normal inputs ``[k, b, *shape]``, drawn with numpy: an eager
  jax.random draw compiles a program per shape (about 0.5 s each)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal((k, b) + shape, np.float32))


def _params(model, seed):
  """Parameters of ``model.init``'s tree and shapes (its ``eval_shape``:
  nothing compiled) with numpy values of the scale of an init: kernels (ndim
  >= 2) N(0, 1 / fan_in), every other leaf N(0, 0.1^2). For the tests where
  the values only need to be generic: eager ``model.init`` compiles a random
  program per new leaf shape (about 0.5 s each; an architecture has several),
  and a jitted one per architecture compiles more. ``model.init`` itself runs
  in test_keyword_form_..., test_multiplicative_gating_closed_forms,
  test_shared_heads_work_for_every_architecture and the training tests.
  Not where an init's values are what a check reads (cross_stitch's stitch
  units start symmetric in the tasks; gates start at one or uniform)."""
  rng = np.random.default_rng(seed)

  def leaf(a):
    if len(a.shape) >= 2:
      fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) == 4 else a.shape[-2]
      scale = 1 / np.sqrt(fan_in)
    else:
      scale = 0.1
    return jnp.asarray(np.float32(scale) * rng.standard_normal(a.shape, np.float32))
  return jax.tree.map(leaf, jax.eval_shape(model.init, jax.random.key(0)))


def _concat_to_additive(params, cond_layers):
  """Splits each conditioned layer's concat kernel [D + Z, F] into the additive
  layout: kernel [D, F] (input rows) and z_kernel [Z, F] (descriptor rows)."""
  trunk = dict(params["shared"]["trunk"])
  z_dim = len(CLS3)
  for l in cond_layers:
    layer = dict(trunk[f"layer_{l}"])
    k = layer["kernel"]
    layer["kernel"], layer["z_kernel"] = k[:-z_dim], k[-z_dim:]
    trunk[f"layer_{l}"] = layer
  return {"shared": {**params["shared"], "trunk": trunk}, "tasks": params["tasks"]}


@pytest.mark.parametrize("encoder, shape, layers", [
    ("mlp", (6,), (0,)), ("mlp", (6,), (0, 1)), ("cnn", (8, 8), (1,))])
def test_concat_and_additive_conditioning_are_the_same_function(encoder, shape, layers):
  kw = dict(encoder=encoder, hidden=(16, 8), channels=(4,), cond_layers=layers)
  concat = multitask.make_model("concat", CLS3, shape, **kw)
  additive = multitask.make_model("additive", CLS3, shape, **kw)
  p_concat = _params(concat, 0)
  p_add = _concat_to_additive(p_concat, layers)
  # Same tree as additive's own init: the mapping is a re-labelling of parameters.
  shapes = jax.eval_shape(additive.init, jax.random.key(1))
  assert jax.tree.structure(p_add) == jax.tree.structure(shapes)
  assert jax.tree.map(jnp.shape, p_add) == jax.tree.map(lambda a: a.shape, shapes)
  x, ids = _x(shape), jnp.array([0, 2, 1])
  # The three forward passes in one program (op by op, each op compiles its own).
  out_c, out_a, other = jax.jit(lambda pc, pa, x, i, j: (
      concat.apply(pc, x, i)["classification10"], additive.apply(pa, x, i)["classification10"],
      concat.apply(pc, x, j)["classification10"]))(p_concat, p_add, x, ids, jnp.array([1, 0, 2]))
  np.testing.assert_allclose(out_c, out_a, rtol=1e-5, atol=1e-5)
  # And the conditioning does something: the same inputs, another task, other outputs.
  assert not np.allclose(out_c, other, atol=1e-3)


@pytest.mark.slow
def test_architectures_differ_from_each_other():
  x, ids = _x((6,)), jnp.array([0, 1, 2])
  outs, trees = {}, {}
  for arch in multitask.archs():
    m = multitask.make_model(arch, CLS3, (6,),
                             **helpers.arch_kwargs(arch, hidden=(16, 8), cond_layers=(0,)))
    p = m.init(jax.random.key(0))
    trees[arch] = {n: a.shape for n, a in params_lib.flatten_with_names(p)}
    state = m.init_state(jax.random.key(0)) if m.stateful else None
    outs[arch] = np.asarray(multitask.forward(m, p, x, ids, state)[0]["classification10"])
  for a, b in itertools.combinations(multitask.archs(), 2):
    # Equal at init by design: soft is independent plus a penalty; MMoE's
    # per-task gates and OMoE's one gate all start uniform (zero logits).
    if {a, b} in ({"independent", "soft"}, {"mmoe", "omoe"}):
      np.testing.assert_array_equal(outs[a], outs[b])
      continue
    assert not np.allclose(outs[a], outs[b], atol=1e-4), (a, b)
  # Where parameters live: the lecture's sharing spectrum.
  t = trees
  assert not any(n.startswith("shared/") for n in t["independent"])
  assert t["independent"]["tasks/trunk/layer_0/kernel"] == (3, 6, 16)
  assert t["multi_head"]["shared/trunk/layer_0/kernel"] == (6, 16)
  assert t["multi_head"]["tasks/heads/classification10/kernel"] == (3, 8, 10)
  assert not any(n.startswith("tasks/") for n in t["concat"])
  assert t["concat"]["shared/trunk/layer_0/kernel"] == (6 + 3, 16)
  assert t["additive"]["shared/trunk/layer_0/z_kernel"] == (3, 16)
  assert t["multiplicative"]["shared/trunk/layer_0/z_gate"] == (3, 16)
  assert t["concat"]["shared/heads/classification10/kernel"] == (8, 10)


def test_multiplicative_gating_closed_forms():
  mult = multitask.make_model("multiplicative", CLS3, (6,), hidden=(16,), cond_layers=(0,))
  plain = multitask.make_model("multi_head", CLS3, (6,), hidden=(16,), heads="shared")
  p = mult.init(jax.random.key(0))
  x, ids = _x((6,)), jnp.array([0, 1, 2])
  # Gates start at one: the network equals the unconditioned one.
  p_plain = jax.tree.map(lambda a: a, p)
  del p_plain["shared"]["trunk"]["layer_0"]["z_gate"]
  np.testing.assert_allclose(mult.apply(p, x, ids)["classification10"],
                             plain.apply(p_plain, x, ids)["classification10"], atol=1e-6)
  # Closing every unit of task 1 leaves only its head's bias.
  gate = p["shared"]["trunk"]["layer_0"]["z_gate"].at[1].set(0.0)
  p["shared"]["trunk"]["layer_0"]["z_gate"] = gate
  p["shared"]["heads"]["classification10"]["bias"] = jnp.arange(10.0)
  out = mult.apply(p, x, ids)["classification10"]
  np.testing.assert_allclose(out[1], np.broadcast_to(np.arange(10.0), (5, 10)), atol=1e-6)
  assert not np.allclose(out[0], out[1])


# ---------------------------------------------------------------------------
# Vmapped per-task loss == float64 numpy loop over tasks
# ---------------------------------------------------------------------------


def _np_mlp(layers, x):
  h = x.reshape(x.shape[0], -1).astype(np.float64)
  for l in range(len(layers)):
    h = np.maximum(h @ np.float64(layers[f"layer_{l}"]["kernel"])
                   + np.float64(layers[f"layer_{l}"]["bias"]), 0.0)
  return h


def _np_loss(task, out, y):
  if task.kind == "classification":
    m = out.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(out - m).sum(-1, keepdims=True)))[:, 0]
    return np.mean(lse - out[np.arange(len(y)), y.astype(int)])
  if task.kind == "binary":
    z = out[:, 0]
    return np.mean(np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0) - y * z)
  return np.mean((out[:, 0] - y) ** 2)


def _random_labels(ts, task_ids, b, rng):
  ys = {}
  for g in ts.groups:
    t = ts.group_task(g)
    if t.kind == "regression":
      ys[g] = rng.normal(size=(len(task_ids), b)).astype(np.float32)
    else:
      ys[g] = rng.integers(0, 2 if t.kind == "binary" else t.num_classes,
                           (len(task_ids), b)).astype(np.int32)
  return ys


@pytest.mark.parametrize("arch", ["independent", "multi_head", "concat"])
def test_vmapped_slot_losses_equal_float64_numpy_loop(arch):
  ts = MIXED
  model = multitask.make_model(arch, ts, (5,),
                               **helpers.arch_kwargs(arch, hidden=(12, 7), cond_layers=(0,)))
  p = jax.device_get(_params(model, 3))
  task_ids = np.array([3, 0, 2, 1, 0], np.int32)  # every group, one task twice
  rng = np.random.default_rng(0)
  x = rng.normal(size=(len(task_ids), 9, 5)).astype(np.float32)
  ys = _random_labels(ts, task_ids, 9, rng)
  got = np.asarray(jax.jit(lambda p, x, ys, i: tasks.slot_losses(ts, model.apply(p, x, i), ys, i))(
      p, jnp.asarray(x), jax.tree.map(jnp.asarray, ys), jnp.asarray(task_ids)))

  want = []
  for k, t in enumerate(task_ids):  # the reference: one task at a time
    task = ts.tasks[t]
    if arch == "independent":
      trunk = jax.tree.map(lambda a: a[t], p["tasks"]["trunk"])
      h = _np_mlp(trunk, x[k])
    elif arch == "concat":
      z = np.zeros((9, len(ts))); z[:, t] = 1.0
      trunk = p["shared"]["trunk"]
      h = np.maximum(np.concatenate([x[k], z], 1) @ np.float64(trunk["layer_0"]["kernel"])
                     + trunk["layer_0"]["bias"], 0)
      h = np.maximum(h @ np.float64(trunk["layer_1"]["kernel"]) + trunk["layer_1"]["bias"], 0)
    else:
      h = _np_mlp(p["shared"]["trunk"], x[k])
    if arch == "concat":
      head = p["shared"]["heads"][task.group]
    else:
      row = int(ts.local_index[t])
      head = jax.tree.map(lambda a: a[row], p["tasks"]["heads"][task.group])
    out = h @ np.float64(head["kernel"]) + np.float64(head["bias"])
    want.append(_np_loss(task, out, ys[task.group][k].astype(np.float64)))
  np.testing.assert_allclose(got, np.array(want), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(arch="mixture"), "^arch='mixture' is not one of"),
    (dict(arch="multi_head", encoder="transformer"), "^encoder='transformer' is not one of"),
    (dict(arch="multi_head", heads="some"), "^heads='some' is not one of"),
    (dict(arch="concat", cond_layers=(2,)), r"^concat.cond_layers=\(2,\): layer\(s\) \[2\]"),
    (dict(arch="concat", cond_layers=()), "^concat.cond_layers is empty"),
    (dict(arch="multi_head", encoder="cnn"), "needs image inputs"),
    (dict(arch="multi_head", hidden=(8, 0)), r"^hidden must be positive integers, got \(8, 0\)"),
    (dict(arch="multi_head", num_experts=2),
     r"^multi_head: unknown hyper-parameter\(s\) \['num_experts'\]; it takes none"),
    (dict(arch="mmoe", experts=2), r"^mmoe: unknown hyper-parameter\(s\) \['experts'\]; it "
     r"takes \['num_experts', 'tower'\] \(and the trunk's"),
])
def test_bad_model_config_raises_before_compiling(kwargs, match):
  with pytest.raises(ValueError, match=match):
    multitask.make_model(kwargs.pop("arch"), CLS3, (6,), **{"hidden": (8, 8), **kwargs})


def test_keyword_form_is_the_dataclasses_and_overrides_them():
  """``make_model("mmoe", ..., hidden=(8,), num_experts=3)`` builds what
  ``trunk=Trunk(hidden=(8,)), hparams=MixtureHParams(num_experts=3)`` builds,
  keywords override the objects, and another architecture's dataclass (or a
  dataclass for an architecture that takes none) is refused."""
  from mtljax.models import mixtures, parts  # pylint: disable=g-import-not-at-top
  want = multitask.make_model("mmoe", MIXED, (5,), hidden=(8,), num_experts=3)
  assert multitask.hyperparameters("mmoe") == {"num_experts": 8, "tower": (8,)}
  for model in (
      multitask.make_model("mmoe", MIXED, (5,), trunk=parts.Trunk(hidden=(8,)),
                           hparams=mixtures.MixtureHParams(num_experts=3)),
      multitask.make_model("mmoe", MIXED, (5,), trunk=parts.Trunk(hidden=(4,)),
                           hparams=mixtures.MixtureHParams(num_experts=2), hidden=(8,),
                           num_experts=3)):
    helpers.assert_trees_close(model.init(jax.random.key(0)), want.init(jax.random.key(0)),
                               rtol=0, atol=0)
    assert model.layer_groups == want.layer_groups
  with pytest.raises(ValueError, match="^hparams for arch 'mmoe' must be a MixtureHParams, "
                                       "got DSelectKHParams"):
    multitask.make_model("mmoe", MIXED, (5,), hparams=mixtures.DSelectKHParams())
  with pytest.raises(ValueError, match="takes no hyper-parameters"):
    multitask.make_model("multi_head", MIXED, (5,), hparams=mixtures.MixtureHParams())


def test_the_registry_is_the_config_and_refuses_malformed_records():
  """``config.model.<arch>`` is generated from each record's dataclass (its
  defaults), the trunk's fields sit at ``config.model.*``; a record whose
  dataclass clashes with the trunk, lacks defaults or a check is refused."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  m = common.base_config().model
  for arch in multitask.archs():
    want = multitask.hyperparameters(arch)
    assert (m[arch].to_dict() if want else m.get(arch, None)) == (want or None), arch
  assert {k: m[k] for k in multitask.TRUNK_FIELDS} == multitask.trunk_defaults()

  @dataclasses.dataclass(frozen=True)
  class Clash:
    hidden: tuple = ()
    def checked(self, arch, trunk):
      return self

  @dataclasses.dataclass(frozen=True)
  class NoDefault:
    width: int
    def checked(self, arch, trunk):
      return self

  @dataclasses.dataclass
  class NotFrozen:
    width: int = 1
    def checked(self, arch, trunk):
      return self
  for cls, match in ((Clash, r"\['hidden'\] are the trunk's"), (NoDefault, r"\['width'\] have no"),
                     (NotFrozen, "must be a frozen dataclass")):
    with pytest.raises(ValueError, match=match):
      multitask.Architecture("new", lambda *a: {}, cls)
  with pytest.raises(ValueError, match="'hidden': the name is a config.model key"):
    multitask.Architecture("hidden", lambda *a: {})
  with pytest.raises(ValueError, match="'mmoe' exists"):
    multitask.register(multitask.Architecture("mmoe", lambda *a: {}))


@pytest.mark.parametrize("k, c_in, c_out", [(3, 1, 4), (3, 5, 2), (5, 3, 3), (2, 2, 3)])
def test_patch_conv_equals_xla_same_convolution(k, c_in, c_out):
  from mtljax.models import encoders
  rng = np.random.default_rng(0)  # numpy draws: no random program per shape
  x = jnp.asarray(rng.standard_normal((2, 7, 9, c_in), np.float32))
  conv = encoders.PatchConv(c_out, k)
  # Generic parameters of conv.init's shapes: kernel N(0, 1 / fan_in), a non-zero bias.
  shapes = jax.eval_shape(conv.init, jax.random.key(1), x)
  assert jax.tree.map(lambda a: a.shape, shapes) == {
      "params": {"kernel": (k, k, c_in, c_out), "bias": (c_out,)}}
  p = {"params": {
      "kernel": jnp.asarray(rng.standard_normal((k, k, c_in, c_out), np.float32)
                            / np.float32(np.sqrt(k * k * c_in))),
      "bias": jnp.asarray(np.float32(0.1) + rng.standard_normal(c_out, np.float32))}}
  # PatchConv and XLA's convolution in one program (op by op, each op compiles its own).
  got, want = jax.jit(lambda p, x: (conv.apply(p, x), jax.lax.conv_general_dilated(
      x, p["params"]["kernel"], (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["params"]["bias"]))(p, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# The task-independent part (encode / decode) and the static slot layout.
# ---------------------------------------------------------------------------

_SPLIT = [("multi_head", "auto"), ("multi_head", "shared"), ("mmoe", "auto"),
          ("omoe", "auto"), ("shared_bottom", "auto"), ("cgc", "auto"), ("dselect_k", "auto")]


@pytest.mark.parametrize("arch, heads", _SPLIT)
def test_decode_of_encode_is_apply_on_shared_inputs(arch, heads):
  """``decode(tasks, encode(shared, x), x, ids) == apply(params, [x] * K, ids)``,
  for traced task ids and for a static (numpy) slot layout."""
  model = multitask.make_model(arch, MIXED, (5,), **helpers.arch_kwargs(
      arch, hidden=(12, 7), heads=heads, num_experts=3, tower=(4,)))
  # Parameters and x from numpy (no eager random program per leaf shape): an
  # init's scale plus noise (gates, zero at init, are not uniform).
  p = _params(model, 3)
  rng = np.random.default_rng(1)
  p = jax.tree.map(lambda a: jnp.asarray(
      np.asarray(a) + np.float32(0.2) * rng.standard_normal(a.shape, np.float32)), p)
  x = jnp.asarray(rng.standard_normal((9, 5), np.float32))
  layouts = (jnp.array([3, 0, 2, 1, 0]), MIXED.grouped_order)  # traced ids; a static layout

  def both(p, traced):  # per layout: (apply on [x] * K, traced ids; decode of encode)
    return [(model.apply(p, jnp.broadcast_to(x, (len(ids),) + x.shape), i),
             model.decode(p["tasks"], model.encode(p["shared"], x), x, ids))
            for ids, i in zip(layouts, traced)]
  # One program for the four (each alone compiles its own).
  outs = jax.jit(both)(p, [jnp.asarray(ids) for ids in layouts])
  for ids, (want, got) in zip(layouts, outs):
    for k, t in enumerate(np.asarray(ids)):  # the rows each slot's task reads
      g = MIXED.tasks[t].group
      np.testing.assert_allclose(got[g][k], want[g][k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["independent", "concat", "soft", "cross_stitch", "ple",
                                  "mtan", "ltb"])
def test_archs_without_a_task_independent_part_have_no_encode(arch):
  model = multitask.make_model(arch, MIXED, (5,), hidden=(6, 4))
  assert model.encode is None and model.decode is None


@pytest.mark.parametrize("arch", ["independent", "multi_head", "mmoe"])
def test_static_slot_layout_gives_the_same_losses_as_traced_ids(arch):
  """With every task in every step the step uses the static, group-contiguous
  layout ``grouped_order``; heads and losses then run per group on its own
  slots -- the losses must equal the masked computation on the same ids."""
  ts = MIXED
  model = multitask.make_model(arch, ts, (5,), **helpers.arch_kwargs(
      arch, hidden=(12, 7), num_experts=3, tower=(4,)))
  p = _params(model, 3)
  ids = ts.grouped_order
  np.testing.assert_array_equal(ids, [0, 2, 1, 3])  # classification10 tasks first
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 9, 5)).astype(np.float32))
  ys = jax.tree.map(jnp.asarray, _random_labels(ts, ids, 9, rng))
  # Both in one program: ``ids`` (numpy) is static there, ``i`` traced.
  static, traced = jax.jit(lambda p, x, ys, i: (
      tasks.slot_losses(ts, model.apply(p, x, ids), ys, ids),
      tasks.slot_losses(ts, model.apply(p, x, i), ys, i)))(p, x, ys, jnp.asarray(ids))
  np.testing.assert_allclose(static, traced, rtol=1e-6)
  assert tasks.static_group_slices(ts, np.array([0, 1, 2, 3])) is None  # interleaved


# Each architecture's layer groups, input to output (layer-wise rules use them).
_GROUPS = {
    "independent": ["conv_0", "layer_0", "layer_1", "heads"],
    "multi_head": ["conv_0", "layer_0", "layer_1", "heads"],
    "concat": ["conv_0", "layer_0", "layer_1", "heads"],
    "additive": ["conv_0", "layer_0", "layer_1", "heads"],
    "multiplicative": ["conv_0", "layer_0", "layer_1", "heads"],
    "soft": ["conv_0", "layer_0", "layer_1", "heads"],
    "cross_stitch": ["conv_0", "layer_0", "layer_1", "heads"],
    "mmoe": ["conv_0", "layer_0", "layer_1", "gates", "tower_0", "heads"],
    "omoe": ["conv_0", "layer_0", "layer_1", "gates", "tower_0", "heads"],
    "shared_bottom": ["conv_0", "layer_0", "layer_1", "tower_0", "heads"],
    "cgc": ["conv_0", "layer_0", "layer_1", "gates", "tower_0", "heads"],
    "ple": ["conv_0", "layer_0", "layer_1", "gates_0", "level_1/layer_0", "gates_1",
            "tower_0", "heads"],
    "dselect_k": ["conv_0", "layer_0", "layer_1", "gates", "tower_0", "heads"],
    "mtan": ["conv_0", "layer_0", "layer_1", "tower_0", "heads"],
    "ltb": ["conv_0", "layer_0", "layer_1", "heads"],
}


@pytest.mark.parametrize("arch", multitask.archs())
def test_every_parameter_is_in_exactly_one_layer_group(arch):
  model = multitask.make_model(arch, MIXED, (6, 6), **helpers.arch_kwargs(
      arch, encoder="cnn", channels=(3,), hidden=(5, 4), num_experts=2, tower=(3,),
      cond_layers=(1,)))
  assert [g for g, _ in model.layer_groups] == _GROUPS[arch]
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  names = [n for n, _ in params_lib.flatten_with_names(shapes)]
  members = {g: [n for n in names if re.search(rx, n)] for g, rx in model.layer_groups}
  for n in names:
    assert sum(n in m for m in members.values()) == 1, n
  assert all(members.values()), members
  # The experts' layers are in the trunk layer groups (not the top group).
  if arch in ("mmoe", "omoe", "dselect_k"):
    assert "shared/experts/layer_1/kernel" in members["layer_1"]
  if arch in ("cgc", "ple"):  # shared and task experts of level 0 in the trunk groups
    assert {"shared/experts/level_0/layer_1/kernel",
            "tasks/experts/level_0/layer_1/kernel"} <= set(members["layer_1"])
  if arch == "ple":
    assert "shared/gate/level_0/kernel" in members["gates_0"]
    assert "tasks/experts/level_1/layer_0/kernel" in members["level_1/layer_0"]
  if arch == "mtan":  # a layer's attention modules, and the f producing its attention input
    assert set(members["conv_0"]) == {
        "shared/trunk/conv_0/kernel", "shared/trunk/conv_0/bias"} | {
        f"tasks/attention/conv_0/{a}/{v}" for a in ("a1", "a2") for v in ("kernel", "bias")}
    assert {"tasks/attention/layer_0/a1/kernel", "shared/att_f/conv_0/kernel",
            "shared/trunk/layer_0/kernel"} <= set(members["layer_0"])
    assert {"tasks/attention/layer_1/a2/bias", "shared/att_f/layer_0/kernel",
            "shared/att_f/layer_0/bias"} <= set(members["layer_1"])
  if arch == "cross_stitch":
    assert "shared/stitch/layer_0" in members["layer_0"]
  if arch == "ltb":  # a layer's routing logits (of its outputs) in its group; none after the last
    assert "shared/branch/layer_0" in members["layer_0"]
    assert not any(n.startswith("shared/branch/layer_1") for n in names)


@pytest.mark.parametrize("arch", multitask.archs())
def test_shared_heads_work_for_every_architecture(arch):
  """``heads="shared"``: one head per task group at ``shared/heads/<group>``
  for every arch; tasks "a" and "b" (one group) then differ only through
  their per-task parameters -- copying a's rows into b's makes their outputs
  equal -- and a train state (with per-task optimizer rows) builds."""
  from mtljax import optim, steps  # pylint: disable=g-import-not-at-top
  model = multitask.make_model(arch, MIXED, (5,), **helpers.arch_kwargs(
      arch, hidden=(6, 4), heads="shared", num_experts=2, tower=(3,), cond_layers=(0,)))
  # The init's values: cross_stitch's stitch units start symmetric in the
  # tasks, so a's and b's outputs are equal only from there.
  p = model.init(jax.random.key(0))
  assert "heads" not in p["tasks"]
  assert p["shared"]["heads"]["classification10"]["kernel"].ndim == 2  # no task axis
  a, b = MIXED.index("a"), MIXED.index("b")
  for stack, rows in model.task_rows.items():
    node = p["tasks"]
    *parents, leaf = stack.split("/")
    for part in parents:
      node = node[part]
    node[leaf] = jax.tree.map(lambda v: v.at[list(rows).index(b)].set(v[list(rows).index(a)]),
                              node[leaf])
  x = jnp.broadcast_to(_x((5,), k=1, b=7, seed=1)[0], (2, 7, 5))
  state = model.init_state(jax.random.key(0)) if model.stateful else None
  out = multitask.forward(model, p, x, jnp.array([a, b]), state)[0]["classification10"]
  if arch not in ("concat", "additive", "multiplicative"):  # those read the task id
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6, atol=1e-6)
  tx = optim.make_optimizer("adam", lr=1e-3)
  # The state's tree, traced without running it (its init's programs are the
  # ones above; its optimizer init's one-op programs are not compiled; the
  # training tests run init_train_state).
  state = jax.eval_shape(lambda r: steps.init_train_state(model, tx, r), jax.random.key(0))
  assert set(state.opt_state["tasks"]) == {s.split("/")[0] for s in model.task_rows}
