"""MTAN and cross-stitch over ResNet stages (LibMTL's ``architecture/MTAN.py``
and ``architecture/Cross_stitch.py``; mtljax/models/backbone_models.py):

* MTAN's attention path (every stage's mask, the shared blocks between
  stages, the poolings, the concatenation) against a float64 numpy
  re-computation of LibMTL's ``_transform_resnet_MTAN.forward`` from the
  shared ResNet's stage features, in train mode (batch statistics), and the
  masks' running averages against torch's update; only the slots' tasks'
  rows of the masks' statistics move;
* cross-stitch's units against a float64 numpy mix of the columns' stage
  outputs, the stitched features feeding the next stage, layer4 unmixed;
  LibMTL's and the paper's initial units;
* Learning to Branch over the stages (LibMTL's ``architecture/LTB.py``):
  after the warm-up a training forward is, for each slot, the plain ResNet
  (``independent``'s column) assembled from the stages of the columns its
  task's drawn tree path goes through;
* the layer groups by stage name, the task rows, the bad settings named
  before anything compiles; one train step of each (a gradient method on
  MTAN, a loss weighting on cross-stitch) in one program; the other norm,
  convolution and objectives (and LTB's step) in the slow tier."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import params as params_lib
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import backbone_models
from mtljax.models import branching
from mtljax.models import multitask
from mtljax.models import parts
from test_backbone_models import _np_conv

# 32x32 at output stride 16: stem 8x8, layer1 8x8, layer2 4x4, layer3 2x2
# (the attention path pooled to meet it), layer4 2x2 (dilated: not pooled).
# lax convolutions: the smaller program to compile (im2col: the slow tier).
H = W = 32
B = 2
STAGES = ("layer1", "layer2", "layer3", "layer4")
SETTINGS = dict(encoder="resnet18", output_stride=16, conv_impl="lax")


def _taskset():
  """Three tasks of one group: one head program per apply (the heads are
  DeepLab's, tested elsewhere)."""
  return tasks.TaskSet(tuple(tasks.Task(n, "depth") for n in ("near", "mid", "far")))


def _trunk(**kw):
  return parts.Trunk(**{**SETTINGS, **kw}).checked()


def _draw(tree, rng, stats=False):
  """numpy values for an abstract tree: kernels N(0, 1/fan_in), biases and
  BN shifts N(0, 0.1^2), BN scales 1 + N(0, 0.1^2); with ``stats`` running
  means N(0, 0.1^2) and variances 0.5 + |N(0, 1)|."""
  def one(path, a):
    name = jax.tree_util.keystr(path)
    if stats:
      v = rng.normal(size=a.shape)
      return (np.abs(v) + 0.5 if "var" in name else 0.1 * v).astype(np.float32)
    if "kernel" in name:
      fan_in = int(np.prod(a.shape[-4:-1])) if len(a.shape) >= 4 else a.shape[-2]
      return (rng.normal(size=a.shape) / np.sqrt(fan_in)).astype(np.float32)
    return ((1.0 if "scale" in name else 0.0) + 0.1 * rng.normal(size=a.shape)
            ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, tree)


@pytest.fixture(scope="module")
def ref():
  """One program: MTAN's and cross-stitch's internals and MTAN's ``apply``
  (train mode, slots on two different image batches, tasks ``[2, 0]``), the
  parameters and running averages drawn with numpy (the stitch units
  ``0.6 I + U(0, 0.3)``)."""
  ts = _taskset()
  shape = (H, W, 3)
  mtan, mtan_ns = backbone_models.resnet_mtan(_trunk(), ts, shape, internals=True)
  cross, cross_ns = backbone_models.resnet_cross_stitch(_trunk(), ts, shape, 0.9,
                                                        internals=True)
  rng = np.random.default_rng(0)
  key = jax.random.key(0)
  p = _draw(jax.eval_shape(mtan["init"], key), rng)
  s = _draw(jax.eval_shape(mtan["init_state"], key), rng, stats=True)
  pc = _draw(jax.eval_shape(cross["init"], key), rng)
  pc["shared"]["stitch"] = {n: (np.eye(3) * 0.6 + rng.uniform(0, 0.3, (3, 3))).astype(
      np.float32) for n in backbone_models.STITCHED}
  sc = _draw(jax.eval_shape(cross["init_state"], key), rng, stats=True)
  x = rng.uniform(size=(2, B, H, W, 3)).astype(np.float32)
  ids = np.array([2, 0], np.int32)
  row = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731

  @jax.jit
  def run(p, s, pc, sc, x):
    feats, _ = mtan_ns.trunk_stages(p["shared"]["trunk"], s["shared"]["trunk"], x[0], True)
    taps = {}
    a, new_m, _ = mtan_ns.attend(feats, row(p["tasks"]["attention"], 2),
                                 row(s["tasks"]["attention"], 2), p["shared"]["attention"],
                                 s["shared"]["attention"], True, taps)
    head = mtan_ns.bb.head_apply("depth1", row(p["tasks"]["heads"]["depth1"], 2),
                                 row(s["tasks"]["heads"]["depth1"], 2), a, True)[0]
    outs, new_state = mtan["apply"](p, x, ids, s, True)
    out_m = dict(feats=feats, taps=taps, a=a, head=head, outs=outs, new_state=new_state)

    ctaps = {}
    h, new_c = cross_ns.columns(pc["tasks"]["trunk"], sc["tasks"]["trunk"],
                                pc["shared"]["stitch"], x[0], True, ctaps)
    nxt = cross_ns.bb.stage_apply("layer2", row(pc["tasks"]["trunk"], 1),
                                  row(sc["tasks"]["trunk"], 1), ctaps["layer1_stitched"][1],
                                  True)[0]
    out_c = dict(taps=ctaps, h=h, next=nxt, new_state=new_c)
    return out_m, out_c
  out_m, out_c = jax.device_get(run(p, s, pc, sc, x))
  out_m.update(params=p, state=s)
  out_c.update(params=pc, state=sc)
  return dict(mtan=out_m, cross=out_c, x=x, ids=ids)


# --- float64 numpy: LibMTL's forward ------------------------------------------


def _bn(h, p):
  """torch's BatchNorm2d in train mode: ``(y, batch mean, unbiased variance)``."""
  mu = h.mean(axis=(0, 1, 2))
  var = h.var(axis=(0, 1, 2))
  n = h.shape[0] * h.shape[1] * h.shape[2]
  y = (h - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]
  return y, mu, var * n / (n - 1)


def _pool(a):
  """``MaxPool2d(2, 2)``: the odd row / column dropped."""
  b, h, w, c = a.shape
  return a[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _basic_block(a, p):
  """LibMTL's ``BasicBlock(in, planes, downsample=conv1x1 + BN)``, stride 1."""
  f = lambda k: np.asarray(k, np.float64)  # noqa: E731
  h = np.maximum(_bn(_np_conv(a, f(p["conv1"]["kernel"]), 1, 1), p["bn1"])[0], 0)
  h = _bn(_np_conv(h, f(p["conv2"]["kernel"]), 1, 1), p["bn2"])[0]
  sc = _bn(_np_conv(a, f(p["downsample_conv"]["kernel"]), 1, 0), p["downsample_bn"])[0]
  return np.maximum(h + sc, 0)


def _np_mtan(feats, masks, blocks):
  """``_transform_resnet_MTAN.forward`` for one task from the shared stage
  features ``{stage: (out, pre)}``: ``({stage: a after the stage}, {stage:
  the mask's first BN's batch mean})``."""
  f = lambda t: jax.tree.map(lambda v: np.asarray(v, np.float64), t)  # noqa: E731
  a, got, means = None, {}, {}
  for i, n in enumerate(STAGES):
    out, pre = (np.asarray(v, np.float64) for v in feats[n])
    if i == 0:
      inp = pre
    else:
      if a.shape[1:3] != pre.shape[1:3]:
        a = _pool(a)
      inp = np.concatenate([pre, a], axis=-1)
    m = f(masks[n])
    h = inp @ m["conv1"]["kernel"][0, 0] + m["conv1"]["bias"]
    h, means[n], _ = _bn(h, m["bn1"])
    h = np.maximum(h, 0) @ m["conv2"]["kernel"][0, 0] + m["conv2"]["bias"]
    a = 1 / (1 + np.exp(-_bn(h, m["bn2"])[0])) * out
    if i < 3:
      a = _basic_block(a, f(blocks[n]))
    if i == 0:
      a = _pool(a)
    got[n] = a
  return got, means


def test_mtan_attention_path_is_libmtls_forward(ref):
  """Task 2's attended features after every stage (mask, product, shared
  block, pooling) equal LibMTL's forward in float64 from the trunk's stage
  features; its head reads the layer4 one; ``apply``'s slot 0 (task 2 on the
  same images) is that head's output."""
  m = ref["mtan"]
  row = lambda tree: jax.tree.map(lambda a: a[2], tree)  # noqa: E731
  got, _ = _np_mtan(m["feats"], row(m["params"]["tasks"]["attention"]),
                    m["params"]["shared"]["attention"])
  assert m["taps"]["a_layer2"].shape[1:3] == (4, 4)  # pooled after layer1
  assert m["feats"]["layer3"][1].shape[1:3] == (2, 2)  # ... and before layer3
  for n in STAGES:
    np.testing.assert_allclose(m["taps"][f"a_{n}"], got[n], rtol=1e-4, atol=2e-5, err_msg=n)
  np.testing.assert_allclose(m["a"], got["layer4"], rtol=1e-4, atol=2e-5)
  np.testing.assert_allclose(m["outs"]["depth1"][0], m["head"], rtol=1e-4, atol=2e-5)
  # The mask really gates: a sigmoid in (0, 1) times the last block's output.
  out4 = np.asarray(m["feats"]["layer4"][0])
  ratio = m["taps"]["masked_layer4"][out4 > 1e-3] / out4[out4 > 1e-3]
  assert 0 < ratio.min() and ratio.max() < 1 and ratio.std() > 1e-2


def test_mtan_masks_running_averages_move_for_the_slots_tasks_only(ref):
  """The masks' statistics are per task: the rows of the slots' tasks (2 and
  0) follow torch's update (``0.9 old + 0.1 batch mean``; row 2 from slot
  0's images, against numpy), task 1's row stays bitwise; the shared
  blocks' and trunk's statistics move."""
  m = ref["mtan"]
  row = lambda tree: jax.tree.map(lambda a: a[2], tree)  # noqa: E731
  _, means = _np_mtan(m["feats"], row(m["params"]["tasks"]["attention"]),
                      m["params"]["shared"]["attention"])
  old, new = m["state"]["tasks"]["attention"], m["new_state"]["tasks"]["attention"]
  for n in STAGES:
    np.testing.assert_allclose(new[n]["bn1"]["mean"][2],
                               0.9 * old[n]["bn1"]["mean"][2] + 0.1 * means[n],
                               rtol=1e-4, atol=1e-6, err_msg=n)
    for leaf_old, leaf_new in zip(jax.tree.leaves(old[n]), jax.tree.leaves(new[n])):
      np.testing.assert_array_equal(leaf_new[1], leaf_old[1])
      assert np.all(leaf_new[[0, 2]] != leaf_old[[0, 2]])
  for part in ("trunk", "attention"):
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), m["new_state"]["shared"][part],
                         m["state"]["shared"][part])
    assert all(jax.tree.leaves(moved)), part


def test_cross_stitch_units_mix_the_columns_after_layer1_to_layer3(ref):
  """After layer1..3 each column continues from ``sum_s alpha[t, s] h_s``
  (float64 numpy mix of the columns' stage outputs); the stem and layer4 are
  not stitched; the next stage reads the mixed features; every column's
  statistics move (every column runs on the images). The initial units: the
  paper's 0.9 / 0.05 rows, LibMTL's ones."""
  c = ref["cross"]
  alpha = c["params"]["shared"]["stitch"]
  assert set(c["taps"]) == {"stem", *STAGES, "layer1_stitched", "layer2_stitched",
                            "layer3_stitched"}
  for n in ("layer1", "layer2", "layer3"):
    mixed = np.einsum("ts,s...->t...", alpha[n].astype(np.float64),
                      np.asarray(c["taps"][n], np.float64))
    np.testing.assert_allclose(c["taps"][f"{n}_stitched"], mixed, rtol=1e-5, atol=1e-6)
  assert np.max(np.abs(c["taps"]["layer1_stitched"] - c["taps"]["layer1"])) > 1e-2
  np.testing.assert_allclose(c["next"], c["taps"]["layer2"][1], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(c["h"], c["taps"]["layer4"])
  moved = jax.tree.map(lambda a, b: np.all(np.any((a != b).reshape(3, -1), axis=1)),
                       c["new_state"], c["state"]["tasks"]["trunk"])
  assert all(jax.tree.leaves(moved))
  paper = np.full((3, 3), 0.05, np.float32)
  np.fill_diagonal(paper, 0.9)
  got = jax.device_get(jax.jit(lambda: (backbone_models.stitch_init(3, 0.9),
                                        backbone_models.stitch_init(3, 0.9, True)))())
  np.testing.assert_allclose(got[0], paper, rtol=1e-6)
  np.testing.assert_array_equal(got[1], np.ones((3, 3), np.float32))


def test_ltb_forward_is_the_plain_resnet_along_the_drawn_tree_path():
  """LTB after its warm-up, train mode, slots of tasks ``[2, 0]`` on two image
  batches: slot k's prediction equals ``independent``'s for task t whose
  ResNet is assembled stage by stage from the columns t's path goes through
  (layer4: t; below each stage, the parent drawn for the column above,
  read back with :func:`branching.routing` from the same state), with t's
  DeepLab head; the routed stages are stem..layer3 (LibMTL's
  ``alpha[1..4]``) and the clock moved by one."""
  ts = _taskset()
  shape = (H, W, 3)
  hp = branching.LTBHParams()
  ltb = backbone_models.resnet_ltb(_trunk(), ts, shape, hp)
  ind = multitask.make_model("independent", ts, shape, **SETTINGS)
  rng = np.random.default_rng(4)
  key = jax.random.key(0)
  p = _draw(jax.eval_shape(ltb["init"], key), rng)
  assert sorted(p["shared"]["branch"]) == sorted(backbone_models.BRANCHED)
  p["shared"]["branch"] = {n: (2 * rng.normal(size=(3, 3))).astype(np.float32)
                           for n in backbone_models.BRANCHED}
  abstract = jax.eval_shape(ltb["init_state"], key)
  s = {"shared": {"branch": {"key": np.asarray(jax.random.key_data(jax.random.key(7))),
                             "count": np.int32(hp.warmup_epochs * hp.epoch_steps + 3)}},
       "tasks": _draw(abstract["tasks"], rng, stats=True)}
  x = rng.uniform(size=(2, B, H, W, 3)).astype(np.float32)
  ids = np.array([2, 0], np.int32)
  alpha = jax.device_get(jax.jit(lambda p, s: branching.routing(
      p["shared"]["branch"], s["shared"]["branch"], hp, True)[0])(p, s))
  names = ("stem",) + STAGES
  trunks, own = [], []
  for t in ids:
    col, path = int(t), {}
    for i in range(len(names) - 1, -1, -1):
      path[names[i]] = col
      if i > 0:
        col = int(np.argmax(alpha[names[i - 1]][col]))
    own.append(path)
    trunks.append({n: jax.tree.map(lambda a, c=c: a[c], p["tasks"]["trunk"][n])
                   for n, c in path.items()})
  assert any(len(set(path.values())) > 1 for path in own)  # a path that branches

  @jax.jit
  def run(p, s, trunks, x):
    outs, new = ltb["apply"](p, x, ids, s, True)
    want = []
    for k, t in enumerate(ids):
      trunk_p = jax.tree.map(lambda a, b, t=t: a.at[t].set(b), p["tasks"]["trunk"], trunks[k])
      pi = {"shared": {}, "tasks": {"trunk": trunk_p, "heads": p["tasks"]["heads"]}}
      si = {"shared": {}, "tasks": s["tasks"]}
      want.append(ind.apply(pi, x[k][None], np.array([t]), state=si, train=True)[0])
    return outs, new, want
  outs, new, want = jax.device_get(run(p, s, trunks, x))
  for k in range(len(ids)):
    # float32 through 18 layers with batch statistics of 2 images: a few
    # elements differ by ~2e-5 with another summation order.
    np.testing.assert_allclose(outs["depth1"][k], want[k]["depth1"][0], rtol=1e-3, atol=1e-4)
  assert int(new["shared"]["branch"]["count"]) == int(s["shared"]["branch"]["count"]) + 1


def test_layer_groups_are_the_stages_by_name_and_task_rows_stack_tasks():
  """Every parameter of both in exactly one group, ``stem, layer1..4,
  heads``; MTAN's masks and the block after a stage in that stage's group,
  the stitch after a stage in its group; the per-task stacks have one row per
  task. Traced, not compiled."""
  ts = _taskset()
  for arch, kw in (("mtan", {"tower": ()}), ("cross_stitch", {}), ("ltb", {})):
    m = multitask.make_model(arch, ts, (H, W, 3), **SETTINGS, **kw)
    assert [g for g, _ in m.layer_groups] == ["stem", *STAGES, "heads"]
    assert m.stateful and m.encode is None
    params = jax.eval_shape(m.init, jax.random.key(0))
    for n, _ in params_lib.flatten_with_names(params):
      hits = [g for g, rx in m.layer_groups if re.search(rx, n)]
      assert len(hits) == 1, (arch, n, hits)
      if "attention/" in n or "stitch/" in n or "branch/" in n:
        assert hits[0] == n.split("/")[2], (n, hits)
    for path, rows in m.task_rows.items():
      leaves = jax.tree.leaves(params_lib.get_path(params["tasks"], path))
      assert leaves and all(leaf.shape[0] == len(rows) == 3 for leaf in leaves), path
    state = jax.eval_shape(m.init_state, jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, B, H, W, 3), jnp.float32)
    outs, new = jax.eval_shape(lambda p, s, x: m.apply(p, x, jnp.array([2, 0]), s, True),
                               params, state, x)
    assert outs["depth1"].shape == (2, B, H, W, 1)
    assert jax.tree.structure(new) == jax.tree.structure(state)
  assert "tasks/attention/layer1/conv1/kernel" in [
      n for n, _ in params_lib.flatten_with_names(jax.eval_shape(
          multitask.make_model("mtan", ts, (H, W, 3), **SETTINGS, tower=()).init,
          jax.random.key(0)))]


@pytest.mark.parametrize("arch, kwargs, message", [
    ("mtan", {}, r"mtan.tower=\(8,\): MTAN over ResNet stages has LibMTL's DeepLab heads"),
    ("mtan", {"tower": (), "input_shape": (16, 20, 3)},
     r"input shape \(16, 20, 3\) gives layer2 features of 2x3 .* cannot meet by 2x2 pooling"),
    ("mmoe", {}, r"it is built for \('multi_head', 'independent', 'mtan', 'cross_stitch', "
                 r"'ltb'\)"),
    ("cross_stitch", {"ones_init": "yes"}, "cross_stitch.ones_init must be True or False"),
])
def test_bad_settings_are_named_before_anything_compiles(arch, kwargs, message):
  shape = kwargs.pop("input_shape", (H, W, 3))
  with pytest.raises(ValueError, match=message):
    multitask.make_model(arch, _taskset(), shape, **{**SETTINGS, **kwargs})


# --- the train step ---------------------------------------------------------


def _data():
  rng = np.random.default_rng(1)
  spec = specs.DataSpec("image", tuple(specs.TaskColumn(t, t.name) for t in _taskset()))

  def split(n):
    return {"image": rng.uniform(size=(n, H, W, 3)).astype(np.float32),
            **{t.name: rng.uniform(0.5, 3.0, size=(n, H, W, 1)).astype(np.float32)
               for t in _taskset()}}
  return task_data.build_task_data("dense", spec, {"train": split(6), "test": split(2)})


def _train(cases, trace_only=False, **settings):
  """One program: a step of each ``(arch, method)`` from its initial state;
  ``{case: (loss, new params, old params, new state, old state)}`` (with
  ``trace_only`` their shapes: traced, not compiled)."""
  data = _data()
  ts = data.taskset
  own = {"mtan": {"tower": ()}, "ltb": {"warmup_epochs": 0}}  # ltb: its logits learn at once
  models = {a: multitask.make_model(a, ts, data.input_shape, **{**SETTINGS, **settings},
                                    **own.get(a, {}))
            for a, _ in cases}
  sampler = sampling.make_sampler(ts, np.full(3, 1 / 3), 3, B, False, True)
  fns = {c: steps.make_train_step(models[c[0]], optax.adam(1e-3), c[1], sampler,
                                  weights=np.ones(3, np.float32)) for c in cases}

  def run(split):
    out = {}
    for (arch, method), fn in fns.items():
      state = steps.init_train_state(models[arch], optax.adam(1e-3), jax.random.key(0),
                                     method)
      new, meas = fn(state, split)
      out[arch, method] = (meas["loss"], new.params, state.params, new.model_state,
                           state.model_state)
    return out
  if trace_only:
    return jax.eval_shape(run, data.train)
  return jax.device_get(jax.jit(run)(data.train))


def _check_trained(out):
  for case, (loss, new_p, old_p, new_s, old_s) in out.items():
    assert np.isfinite(loss), case
    for part in ("shared", "tasks"):
      moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), new_p[part], old_p[part])
      assert all(jax.tree.leaves(moved)), (case, part)
    if new_s is not None:
      moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), new_s, old_s)
      assert any(jax.tree.leaves(moved)), case


CASES = {("mtan", "pcgrad"), ("cross_stitch", "uncertainty")}


def test_the_step_traces_with_a_gradient_method_and_a_loss_weighting():
  """PCGrad on MTAN, uncertainty weighting on cross-stitch: the steps trace
  (not compiled: the compiled step is ~50-90 s of XLA on this CPU, the slow
  tier's), a scalar loss, the parameters and state keep their shapes."""
  for case, (loss, new_p, old_p, new_s, old_s) in _train(CASES | {("ltb", "pcgrad")},
                                                          trace_only=True).items():
    assert loss.shape == (), case
    assert jax.tree.map(lambda a: a.shape, new_p) == jax.tree.map(lambda a: a.shape, old_p)
    assert jax.tree.map(lambda a: a.shape, new_s) == jax.tree.map(lambda a: a.shape, old_s)


@pytest.mark.slow
def test_mtan_and_cross_stitch_train_with_a_gradient_method_and_a_loss_weighting():
  """One step each in one program: PCGrad on MTAN (its shared trunk and
  attention blocks combined), uncertainty weighting on cross-stitch: the
  loss finite, every shared and per-task parameter (all tasks sampled) and
  the statistics moved."""
  _check_trained(_train(CASES))


@pytest.mark.slow
def test_group_norm_lax_convolutions_and_more_objectives():
  """Group norm (no state), im2col convolutions (the rest of the file runs
  ``lax``) at output stride 8: MTAN with FAMO (a loss weighting with state),
  cross-stitch with CAGrad (a gradient method), LTB with MGDA (its sampler
  the only state: group norm has none), one program."""
  _check_trained(_train({("mtan", "famo"), ("cross_stitch", "cagrad"), ("ltb", "mgda")},
                        normalization="group", conv_impl="im2col", output_stride=8))
