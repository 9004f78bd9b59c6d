"""The ResNet + DeepLab backbones as multi-task architectures
(mtljax/models/backbone_models.py) and batch-norm state in the train step:
running averages against a float64 numpy re-computation from torch's
definition, updated once per step whatever the objective or path, per-task
statistics moving only for the sampled tasks, eval mode reading the running
averages, and the bad settings refused before anything compiles."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from mtljax import errors
from mtljax import params as params_lib
from mtljax import steps
from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask

H, W, B = 16, 20, 4


def _taskset():
  return tasks.TaskSet((tasks.Task("segmentation", "segmentation", 3),
                        tasks.Task("depth", "depth"), tasks.Task("normal", "normals")))


def _data():
  rng = np.random.default_rng(0)

  def split(n):
    normal = rng.normal(size=(n, H, W, 3))
    return {"image": rng.uniform(size=(n, H, W, 3)).astype(np.float32),
            "label": rng.integers(-1, 3, size=(n, H, W)).astype(np.int32),
            "depth": rng.uniform(0.5, 3.0, size=(n, H, W, 1)).astype(np.float32),
            "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)
                       ).astype(np.float32)}
  spec = specs.DataSpec("image", (
      specs.TaskColumn(tasks.Task("segmentation", "segmentation", 3), "label"),
      specs.TaskColumn(tasks.Task("depth", "depth"), "depth"),
      specs.TaskColumn(tasks.Task("normal", "normals"), "normal")))
  return task_data.build_task_data("dense", spec, {"train": split(12), "test": split(5)})


@pytest.fixture(scope="module")
def setup():
  """The data, the model and its initial train state (equal weighting's; the
  methods below keep no state of their own), made by a program of its own so
  that the step programs take it as an argument."""
  data = _data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape,
                               encoder="resnet18")
  state = jax.jit(lambda: steps.init_train_state(model, optax.adam(1e-3), jax.random.key(0),
                                                 "fixed"))()
  return data, model, state


def _step(model, data, method, *, k=None, one_pass=None):
  ts = model.taskset
  sampler = sampling.make_sampler(ts, np.full(len(ts), 1 / len(ts)), k or len(ts), B,
                                  False, True)
  return steps.make_train_step(model, optax.adam(1e-3), method, sampler,
                               weights=np.ones(len(ts), np.float32), one_pass=one_pass)


def _np_conv(x, kernel, stride, pad):
  """float64 ``sum_{i,j,c} xp[b, s u + i, s v + j, c] K[i, j, c, f]``."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw = kernel.shape[:2]
  ho = (x.shape[1] + 2 * pad - kh) // stride + 1
  wo = (x.shape[2] + 2 * pad - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
  for i in range(kh):
    for j in range(kw):
      out += xp[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :] @ kernel[i, j]
  return out


@pytest.fixture(scope="module")
def one_step(setup):
  """One compiled program, from one state: a step of equal weighting, and
  one with one task per step; and the initial model's outputs in eval mode (with its running
  averages, and with them shifted), image by image, and in train mode."""
  data, model, state = setup
  fixed, one_task = _step(model, data, "fixed"), _step(model, data, "fixed", k=1)
  ids = np.arange(3, dtype=np.int32)

  @jax.jit
  def run(state, split, x):
    out = {"fixed": fixed(state, split)[0].model_state,
           "one_task": one_task(state, split)[0].model_state}
    other = jax.tree.map(lambda a: a + 0.5, state.model_state)

    def f(s, train, xs):
      return multitask.forward(model, state.params, xs, ids, s, train=train)[0]
    one_by_one = jax.vmap(lambda xi: f(state.model_state, False, xi[:, None]), in_axes=1,
                          out_axes=1)(x)
    outs = {"eval": f(state.model_state, False, x), "eval_other": f(other, False, x),
            "train": f(state.model_state, True, x), "train_other": f(other, True, x),
            "eval_one_by_one": jax.tree.map(lambda a: a[:, :, 0], one_by_one)}
    kernel = state.params["shared"]["trunk"]["stem"]["conv1"]["kernel"]
    return out, state.model_state, kernel, outs
  x = jnp.asarray(data.test["x"][0, :4])[None].repeat(3, 0)
  return jax.device_get(run(state, data.train, x))


def _np_stem_statistics(data, kernel):
  """float64 numpy: the stem convolution on the step's batch, its
  per-channel mean and unbiased variance (torch's BatchNorm2d)."""
  _, x, _, _ = helpers.step_batch(data, np.full(3, 1 / 3), seed=0, k=3, b=B,
                                  shared_inputs=True)
  h = _np_conv(x, kernel, 2, 3)
  n = h.shape[0] * h.shape[1] * h.shape[2]
  return h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2)) * n / (n - 1)


def test_one_step_updates_running_averages_once_from_the_losses_forward(setup, one_step):
  """* The stem's running mean and variance after equal weighting's step equal
    a float64 numpy computation of torch's update from the step's own batch
    (``0.9 * init + 0.1 * batch mean``, the variance unbiased);
  * with one task per step (``tasks_per_step=1``), only the sampled task's
    head statistics move; the others stay bitwise.
  """
  data, model, _ = setup
  got, initial, kernel, _ = one_step
  mean, var = _np_stem_statistics(data, kernel)
  bn = got["fixed"]["shared"]["trunk"]["stem"]["bn1"]
  np.testing.assert_allclose(bn["mean"], 0.1 * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(bn["var"], 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6)
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), got["fixed"], initial)
  assert all(jax.tree.leaves(changed))  # every statistic moved with every task sampled

  ts = model.taskset
  ids = helpers.step_task_ids(data, np.full(3, 1 / 3), seed=0, step=0, k=1)
  for t in range(len(ts)):
    g, row = ts.tasks[t].group, int(ts.local_index[t])
    moved = jax.tree.map(lambda a, b, r=row: bool(np.any(a[r] != b[r])),
                         got["one_task"]["tasks"]["heads"][g], initial["tasks"]["heads"][g])
    assert all(jax.tree.leaves(moved)) == (t == ids[0]), (t, ids)
    if t != ids[0]:
      assert not any(jax.tree.leaves(moved))


@pytest.mark.slow
def test_per_task_gradient_methods_update_running_averages_as_equal_weighting(setup):
  """PCGrad (per-task gradients of the shared trunk), MGDA-UB (gradients of
  the representation) and the per-slot path (each slot normalised with its
  own batch, the trunk's update the slots' mean: here every slot reads the
  same images) leave every running average (trunk and heads) equal to the
  one-pass equal-weighting step's: the statistics come from the one forward
  the losses come from, never from the per-task backward passes. (The fast
  test above checks the equal-weighting step against numpy.)"""
  data, model, state = setup
  fns = {"fixed": _step(model, data, "fixed"), "pcgrad": _step(model, data, "pcgrad"),
         "per_slot": _step(model, data, "fixed", one_pass=False),
         "mgda_ub": _step(model, data, "mgda_ub")}

  @jax.jit
  def run(state, split):
    return {name: fn(state, split)[0].model_state for name, fn in fns.items()}
  got = jax.device_get(run(state, data.train))
  for name in ("pcgrad", "per_slot", "mgda_ub"):
    helpers.assert_trees_close(got[name], got["fixed"], rtol=1e-5, atol=1e-6)


def test_eval_mode_reads_the_running_averages_and_train_mode_the_batch(setup, one_step):
  """Eval mode: outputs change with the running averages, and an image's
  prediction does not depend on the rest of its batch. Train mode: the
  running averages are not read (the batch's statistics are)."""
  model = setup[1]
  got = one_step[3]
  for g in model.taskset.groups:
    assert np.max(np.abs(got["eval"][g] - got["eval_other"][g])) > 1e-3
    np.testing.assert_array_equal(got["train"][g], got["train_other"][g])
    np.testing.assert_allclose(got["eval_one_by_one"][g], got["eval"][g], rtol=1e-4,
                               atol=1e-5)
    assert np.max(np.abs(got["train"][g] - got["eval"][g])) > 1e-3


def test_layer_groups_are_the_resnet_stages_by_name(setup):
  """Every parameter of both backbone architectures is in exactly one layer
  group, named by the ResNet's stages then the heads (what layer-wise rates
  and gradual unfreezing address)."""
  import re  # pylint: disable=g-import-not-at-top
  data, model, _ = setup
  indep = multitask.make_model("independent", data.taskset, data.input_shape,
                               encoder="resnet18")
  for m, prefix in ((model, "shared/trunk"), (indep, "tasks/trunk")):
    assert [n for n, _ in m.layer_groups] == ["stem", "layer1", "layer2", "layer3",
                                              "layer4", "heads"]
    names = [n for n, _ in params_lib.flatten_with_names(jax.eval_shape(
        m.init, jax.random.key(0)))]
    for n in names:
      hits = [g for g, rx in m.layer_groups if re.search(rx, n)]
      assert len(hits) == 1, (n, hits)
    assert any(n.startswith(f"{prefix}/layer3/") for n in names)
  assert indep.stateful and indep.encode is None and model.encode is not None


def test_group_norm_backbones_have_no_state():
  data = _data()
  model = multitask.make_model("multi_head", data.taskset, data.input_shape,
                               encoder="resnet18", normalization="group")
  assert not model.stateful and model.init_state is None
  state = jax.eval_shape(lambda: steps.init_train_state(
      model, optax.adam(1e-3), jax.random.key(0), "fixed"))
  assert state.model_state is None


@pytest.mark.parametrize("kwargs, message", [
    ({"arch": "mmoe"}, "arch='mmoe' does not take per-pixel features"),
    ({"heads": "shared"}, "heads='shared' is not offered"),
    ({"normalization": "layer"}, "normalization='layer' is not one of"),
    ({"output_stride": 4}, "output_stride=4 is not one of"),
    ({"conv_impl": "cudnn"}, "conv_impl='cudnn' is not one of"),
    ({"input_shape": (16, 20)}, r"needs RGB image inputs \[H, W, 3\]"),
    ({"classification": True}, "need one prediction per example"),
])
def test_bad_backbone_settings_are_named_before_anything_compiles(kwargs, message):
  ts = _taskset()
  if kwargs.pop("classification", False):
    ts = tasks.TaskSet(ts.tasks + (tasks.Task("scene", "classification", 4),))
  arch = kwargs.pop("arch", "multi_head")
  shape = kwargs.pop("input_shape", (H, W, 3))
  with pytest.raises(ValueError, match=message):
    multitask.make_model(arch, ts, shape, encoder="resnet18", **kwargs)


def test_a_weights_file_for_init_from_needs_a_resnet_encoder(tmp_path):
  from mtljax import build  # pylint: disable=g-import-not-at-top
  path = tmp_path / "w.pth"
  path.write_bytes(b"")
  config = helpers.small_sinusoids_config(init_from=str(path))
  with pytest.raises(errors.ConfigError, match=r"is a file: torchvision ResNet weights or a "
                     r"Hugging Face ViT, which initialise config.model.encoder one of "
                     r"\('resnet18'.*'vit'\)"):
    build.validate_config(config)
  config = helpers.small_sinusoids_config(init_from=str(tmp_path / "none.pth"))
  with pytest.raises(errors.ConfigError, match="is neither a run's directory nor a weights"):
    build.validate_config(config)


def test_a_state_without_the_models_statistics_is_refused(setup):
  """A train state built for another model (no batch statistics) is named
  when the step is traced, not read as an empty tree."""
  data, model, _ = setup
  state = jax.eval_shape(lambda: steps.init_train_state(
      model, optax.adam(1e-3), jax.random.key(0), "fixed"))._replace(model_state=None)
  with pytest.raises(ValueError, match="has model state .* the train state has none"):
    jax.eval_shape(_step(model, data, "fixed"), state, data.train)


def _scenes_resnet(tmp_path, **overrides):
  """The scenes ``resnet`` config on 16x20 scenes (40 train images), small."""
  from experiments.configs import scenes  # pylint: disable=g-import-not-at-top
  c = scenes.get_config("resnet")
  return helpers.with_overrides(c, {
      "data.builder_config": "h16_w20_n40_m10_s0", "data.data_dir": str(tmp_path / "data"),
      "sampling.examples_per_task": 8, "total_steps": 8, "steps_per_call": 2,
      "log_steps": 2, "eval_steps": 4, "checkpoint_steps": 4, "eval_batch_size": 10,
      **overrides})


@pytest.mark.slow
def test_a_resnet_scenes_run_resumes_bitwise_with_its_batch_statistics(tmp_path):
  """The scenes ``resnet`` config (dilated ResNet-18, DeepLab heads, batch
  norm): a run stopped after its first checkpoint and resumed equals an
  uninterrupted one bit for bit -- every logged number (the evaluations read
  the running averages), the final metrics and the whole final state, batch
  statistics included, which moved from their initial values."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  straight = train.train_and_evaluate(_scenes_resnet(tmp_path), str(tmp_path / "a"))
  train.train_and_evaluate(_scenes_resnet(tmp_path, total_steps=4), str(tmp_path / "b"))
  resumed = train.train_and_evaluate(_scenes_resnet(tmp_path), str(tmp_path / "b"))
  assert resumed["tasks"] == straight["tasks"]
  assert helpers.metrics_rows(tmp_path / "b") == helpers.metrics_rows(tmp_path / "a")
  from mtljax import build  # pylint: disable=g-import-not-at-top
  config = _scenes_resnet(tmp_path)
  fresh = build.build_run(config, build.data_from_config(config)).state
  a, b = (helpers.final_state(tmp_path / w, config, like=fresh) for w in "ab")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  stem = a.model_state["shared"]["trunk"]["stem"]["bn1"]
  assert np.all(np.asarray(stem["var"]) != 1.0) and int(a.step) == 8
  # Fine-tuning from the run (config.init_from) starts from its parameters and
  # its batch statistics, except those of the layers left fresh by dont_load.
  tuned = _scenes_resnet(tmp_path, init_from=str(tmp_path / "a"),
                         init_dont_load="tasks/heads/depth")
  state = build.build_run(tuned, build.data_from_config(tuned)).state
  for part in ("params", "model_state"):
    got = dict(params_lib.flatten_with_names(getattr(state, part)))
    want = dict(params_lib.flatten_with_names(getattr(a, part)))
    init = dict(params_lib.flatten_with_names(getattr(fresh, part)))
    assert set(got) == set(want) == set(init)
    for n, v in got.items():
      np.testing.assert_array_equal(
          v, init[n] if n.startswith("tasks/heads/depth") else want[n], err_msg=n)


@pytest.mark.slow
def test_a_torchvision_state_dict_initialises_the_trunk_through_init_from(tmp_path):
  """``config.init_from`` naming a torchvision ResNet-18 state dict (numpy-
  seeded values in torchvision's layout, as test_pretrained writes them): the
  shared trunk's parameters and batch statistics are the file's (conv weights
  OIHW -> HWIO, running averages into the model state), the heads fresh, and
  ``independent`` copies the trunk into every task's."""
  from mtljax import build  # pylint: disable=g-import-not-at-top
  from test_pretrained import fx  # pylint: disable=g-import-not-at-top
  with np.load(os.path.join(os.path.dirname(__file__), "data", "torchvision_resnet.npz")) as z:
    sd = fx.numpy_state_dict(fx.keys_shapes_of(z, "resnet18"))
  path = str(tmp_path / "resnet18.npz")
  np.savez(path, **{k: np.float32(v) if v.dtype == np.float64 else v for k, v in sd.items()})
  for arch, where in (("multi_head", lambda a: a), ("independent", lambda a: a[2])):
    config = _scenes_resnet(tmp_path, init_from=path, **{"model.arch": arch})
    state = build.build_run(config, build.data_from_config(config)).state
    trunk = "shared" if arch == "multi_head" else "tasks"
    p, s = state.params[trunk]["trunk"], state.model_state[trunk]["trunk"]
    np.testing.assert_array_equal(where(p["stem"]["conv1"]["kernel"]),
                                  sd["conv1.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(where(p["layer3"]["block1"]["bn2"]["scale"]),
                                  np.float32(sd["layer3.1.bn2.weight"]))
    np.testing.assert_array_equal(where(s["layer4"]["block0"]["downsample_bn"]["var"]),
                                  np.float32(sd["layer4.0.downsample.1.running_var"]))
  bad = _scenes_resnet(tmp_path, init_from=path, **{"model.normalization": "group"})
  with pytest.raises(errors.ConfigError, match="normalization must be 'batch'"):
    build.validate_config(bad)


@pytest.mark.slow
def test_batch_statistics_on_eight_devices_equal_one_device(tmp_path):
  """One step of the scenes ``resnet`` config on a data axis of 8 fake CPU
  devices (each holding one of the step's 8 images) against one device:
  batch norm's statistics are the global batch's (synchronised), so the
  running averages after the step equal the one-device run's to float32
  rounding (1e-6), the parameters equal within the gradients' float32
  rounding times the learning rate, the evaluation (which reads the
  averages) and the logged loss agree, and the step compiles once.

  One step, plain SGD: float32 gradients of a ResNet from scratch carry
  rounding of about 0.3 % (float64 shows it) that a different reduction order
  changes, and further steps amplify it through the next batch's statistics;
  Adam's first steps (``lr * sign(g)``) would turn the rounding of gradients
  that batch norm makes zero in exact arithmetic into differences of ``lr``."""
  import test_sharding  # pylint: disable=g-import-not-at-top
  lr = 0.05
  base = {"data.builder_config": "h16_w20_n40_m10_s0", "sampling.examples_per_task": 8,
          "total_steps": 1, "steps_per_call": 1, "log_steps": 1, "eval_steps": 1,
          "checkpoint_steps": 1, "eval_batch_size": 10, "optim.name": "sgd", "optim.lr": lr}

  def case(data):
    return {"name": "resnet", "kind": "train", "config": "scenes:resnet",
            "overrides": {**base, "data.data_dir": str(tmp_path / "data"),
                          "mesh.data": data, "mesh.task": 1}}
  ref = test_sharding._run_worker(tmp_path, "one", [case(1)], devices=1)
  out = test_sharding._run_worker(tmp_path, "eight", [case(8)], devices=8)
  (r1, a1), (r8, a8) = test_sharding._load(ref, "resnet"), test_sharding._load(out, "resnet")
  assert r1["devices"] == 1 and r8["devices"] == 8 and r8["compilations"] == 1
  assert sorted(a1) == sorted(a8) and any(k.startswith("model_state/shared/trunk/") for k in a1)
  for k in a1:
    if k.startswith("model_state/"):
      np.testing.assert_allclose(a8[k], a1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_allclose(a8[k], a1[k], rtol=0, atol=5e-3 * lr, err_msg=k)
  for m1, m8 in zip(r1["metrics"], r8["metrics"]):
    for k, v in m1.items():
      if isinstance(v, float) and (k.startswith("eval/") or k == "train/loss"):
        np.testing.assert_allclose(m8[k], v, rtol=1e-4, atol=1e-6, err_msg=k)


# ----------------------------------------------------------------------------
# SegNet and MTAN over SegNet as architectures.
# ----------------------------------------------------------------------------

_SEGNET = {"encoder": "segnet", "channels": (4, 8, 8, 8, 8)}


def test_segnet_architectures_partition_their_parameters_by_level_and_name_rows():
  """``multi_head`` (the MTAN code's split SegNet), ``mtan`` (its attention)
  and ``independent`` on the SegNet encoder: every parameter in exactly one
  layer group, input to output (encoder and decoder levels, MTAN's attention
  levels, heads); the per-task stacks (heads, MTAN's attention masks,
  independent's trunks) declared with one row per task. Traced, not compiled."""
  import re  # pylint: disable=g-import-not-at-top
  ts = _taskset()
  for arch, extra in (("multi_head", {}), ("mtan", {"tower": ()}), ("independent", {})):
    m = multitask.make_model(arch, ts, (32, 40, 3), **_SEGNET, **extra)
    assert m.stateful and (m.encode is None) == (arch != "multi_head")
    params = jax.eval_shape(m.init, jax.random.key(0))
    names = [n for n, _ in params_lib.flatten_with_names(params)]
    for n in names:
      assert len([g for g, rx in m.layer_groups if re.search(rx, n)]) == 1, (arch, n)
    groups = [g for g, _ in m.layer_groups]
    assert groups[0] == "encoder_0" and groups[-1] == "heads" and "decoder_0" in groups
    assert ("attention_encoder_0" in groups) == (arch == "mtan")
    for path, rows in m.task_rows.items():
      leaves = jax.tree.leaves(params_lib.get_path(params["tasks"], path))
      assert leaves and all(leaf.shape[0] == len(rows) for leaf in leaves), path
    assert any(p.startswith("attention/") for p in m.task_rows) == (arch == "mtan")


@pytest.mark.parametrize("arch, kwargs, message", [
    ("multi_head", {"channels": (4, 8)}, r"takes the widths of its 5 levels"),
    ("mtan", {}, r"mtan.tower=\(8,\): MTAN over SegNet has the MTAN code's heads"),
    ("cross_stitch", {}, r"it is built for \('multi_head', 'independent', 'mtan'\)"),
    ("multi_head", {"normalization": "group"}, "is not offered with it"),
    ("multi_head", {"input_shape": (16, 40, 3)}, "at least 32x32 pixels"),
])
def test_bad_segnet_settings_are_named_before_anything_compiles(arch, kwargs, message):
  shape = kwargs.pop("input_shape", (32, 40, 3))
  with pytest.raises(ValueError, match=message):
    multitask.make_model(arch, _taskset(), shape, **{**_SEGNET, **kwargs})


@pytest.mark.slow
def test_segnet_and_mtan_train_with_every_objective_family():
  """One step of each SegNet architecture with a loss weighting (uncertainty),
  a gradient combination (PCGrad, on MTAN: its shared SegNet and attention
  blocks), MGDA-UB on the split model's representation and a method with
  state after the update (FAMO; on ``independent``, which shares nothing for
  a gradient method to combine), all in one program: losses finite, the
  statistics moved, and the split model's ``encode``/``decode`` equal
  ``apply`` on shared inputs."""
  rng = np.random.default_rng(0)
  spec = specs.DataSpec("image", (
      specs.TaskColumn(tasks.Task("segmentation", "segmentation", 3), "label"),
      specs.TaskColumn(tasks.Task("depth", "depth"), "depth"),
      specs.TaskColumn(tasks.Task("normal", "normals"), "normal")))

  def split(n):
    normal = rng.normal(size=(n, 32, 40, 3))
    return {"image": rng.uniform(size=(n, 32, 40, 3)).astype(np.float32),
            "label": rng.integers(-1, 3, size=(n, 32, 40)).astype(np.int32),
            "depth": rng.uniform(0.5, 3.0, size=(n, 32, 40, 1)).astype(np.float32),
            "normal": (normal / np.linalg.norm(normal, axis=-1, keepdims=True)
                       ).astype(np.float32)}
  data = task_data.build_task_data("dense", spec, {"train": split(8), "test": split(2)})
  cases = {("multi_head", "uncertainty"), ("multi_head", "mgda_ub"), ("mtan", "pcgrad"),
           ("mtan", "famo"), ("independent", "famo")}
  models = {arch: multitask.make_model(arch, data.taskset, data.input_shape, **_SEGNET,
                                       **({"tower": ()} if arch == "mtan" else {}))
            for arch in ("multi_head", "mtan", "independent")}
  fns = {c: _step(models[c[0]], data, c[1]) for c in cases}
  ids = np.arange(3, dtype=np.int32)
  x = jnp.asarray(data.test["x"][0])

  @jax.jit
  def run(split):
    out = {}
    for (arch, method), fn in fns.items():
      m = models[arch]
      state = steps.init_train_state(m, optax.adam(1e-3), jax.random.key(0), method)
      new, meas = fn(state, split)
      out[arch, method] = (meas["loss"], new.model_state, state.model_state)
    eq = {}
    for arch in ("multi_head",):
      m = models[arch]
      p, s = m.init(jax.random.key(1)), m.init_state(jax.random.key(1))
      rep, _ = multitask.encoder(m, p["shared"], x, s["shared"], False)
      dec, _ = multitask.decoder(m, p["tasks"], rep, x, ids, s["tasks"], False)
      app, _ = multitask.forward(m, p, jnp.broadcast_to(x, (3,) + x.shape), ids, s, False)
      eq[arch] = (dec, app)
    return out, eq
  out, eq = jax.device_get(run(data.train))
  for case, (loss, new, old) in out.items():
    assert np.isfinite(loss), case
    moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), new, old)
    assert any(jax.tree.leaves(moved)), case
  for arch, (dec, app) in eq.items():
    for g in dec:
      np.testing.assert_allclose(dec[g], app[g], rtol=1e-4, atol=1e-5, err_msg=arch)
