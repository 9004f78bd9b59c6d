"""Dense task kinds in the task system: groups, per-slot losses over the valid
pixels of each slot's batch (against float64 numpy written from the published
reductions), the per-task layout of dense labels, and their checks."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import errors
from mtljax import tasks
from mtljax.data import specs
from mtljax.data import task_data

H, W, C = 4, 5, 3


def _taskset():
  return tasks.TaskSet((tasks.Task("segmentation", "segmentation", C),
                        tasks.Task("depth", "depth"), tasks.Task("normal", "normals")))


def test_dense_kinds_have_their_heads_metrics_and_groups():
  ts = _taskset()
  assert ts.groups == ("segmentation3", "depth1", "normals3")
  assert [t.out_dim for t in ts] == [C, 1, 3]
  assert all(t.dense for t in ts) and not tasks.Task("r", "regression").dense
  assert ts.tasks[0].metric_names == ("loss", "miou", "pix_acc")
  assert ts.tasks[2].metric_names[-1] == "within_30"
  for t in ts:  # every metric declares its direction (Delta_m)
    assert all(m in tasks.METRIC_DIRECTIONS for m in t.metric_names)
  assert [t.label_dtype for t in ts] == [np.int32, np.float32, np.float32]
  with pytest.raises(ValueError, match="segmentation needs num_classes >= 2"):
    tasks.Task("s", "segmentation", 1)
  with pytest.raises(ValueError, match="split sums"):
    tasks.example_metrics(ts.tasks[1], jnp.zeros((1, H, W, 1)), jnp.zeros((1, H, W, 1)),
                          0.0, 1.0)


def _labels(rng, k, b, H=H, W=W):  # pylint: disable=invalid-name
  """Labels of ``k`` slots of ``b`` images (``H x W``) with missing pixels
  and one image of slot 0 without any valid pixel."""
  seg = rng.integers(-1, C, (k, b, H, W)).astype(np.int32)
  seg[0, 1] = -1
  depth = rng.uniform(0.5, 3.0, (k, b, H, W, 1)).astype(np.float32)
  depth[rng.random((k, b, H, W)) < 0.3] = 0.0
  depth[0, 1] = 0.0
  n = rng.normal(size=(k, b, H, W, 3))
  n /= np.linalg.norm(n, axis=-1, keepdims=True)
  n[rng.random((k, b, H, W)) < 0.3] = 0.0
  n[0, 1] = 0.0
  return {"segmentation3": seg, "depth1": depth, "normals3": n.astype(np.float32)}


def _numpy_slot_losses(outs, ys, ids, ts):
  """Float64, from the published reductions: each slot's mean over the valid
  pixels of its whole batch (CE ignoring -1; L1 where depth != 0; 1 - cos
  where the normal is not all-zero)."""
  out = []
  for k, t in enumerate(ids):
    g = ts.tasks[t].group
    o, y = np.asarray(outs[g][k], np.float64), ys[g][k]
    if ts.tasks[t].kind == "segmentation":
      m = o.max(-1, keepdims=True)
      lse = (m + np.log(np.exp(o - m).sum(-1, keepdims=True)))[..., 0]
      valid = y >= 0
      per = lse - np.take_along_axis(o, np.maximum(y, 0)[..., None], -1)[..., 0]
    elif ts.tasks[t].kind == "depth":
      valid = y[..., 0] != 0
      per = np.abs(o[..., 0] - y[..., 0])
    else:
      valid = np.any(y != 0, -1)
      p = o / np.linalg.norm(o, axis=-1, keepdims=True)
      gt = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-30)
      per = 1 - np.sum(p * gt, -1)
    out.append(per[valid].sum() / max(valid.sum(), 1))
  return np.array(out)


def test_slot_losses_average_over_every_valid_pixel_of_each_slots_batch():
  """Static and traced slot layouts, one compiled program: slot k's loss is
  the float64 mean over its batch's valid pixels (an image with none adds
  nothing; it is not a mean of per-image means), and the slot masks mark an
  image with no valid pixel unlabelled."""
  ts = _taskset()
  rng = np.random.default_rng(0)
  k, b = 3, 2
  ys = _labels(rng, k, b)
  outs = {g: rng.normal(size=(k, b, H, W, ts.group_task(g).out_dim)).astype(np.float32)
          for g in ts.groups}
  static = np.array([0, 1, 2], np.int32)
  traced = np.array([2, 0, 1], np.int32)
  ys_traced = {g: ys[g][np.argsort(np.argsort(traced))] for g in ts.groups}

  @jax.jit
  def both(outs, ys, ys_traced, ids):
    return (tasks.slot_losses(ts, outs, ys, static),
            tasks.slot_losses(ts, outs, ys_traced, ids),
            tasks.slot_masks(ts, ys, static))
  got_static, got_traced, masks = both(outs, ys, ys_traced, traced)
  np.testing.assert_allclose(got_static, _numpy_slot_losses(outs, ys, static, ts), rtol=1e-5)
  np.testing.assert_allclose(got_traced, _numpy_slot_losses(outs, ys_traced, traced, ts),
                             rtol=1e-5)
  assert not masks[0, 1] and masks[0, 0] and masks[1:].all()


def _dense_spec():
  return specs.DataSpec("image", (
      specs.TaskColumn(tasks.Task("segmentation", "segmentation", C), "label"),
      specs.TaskColumn(tasks.Task("depth", "depth"), "depth"),
      specs.TaskColumn(tasks.Task("normal", "normals"), "normal")))


def _dense_split(rng, n):
  y = _labels(rng, 1, n)
  return {"image": rng.uniform(size=(n, H, W, 3)).astype(np.float32),
          "label": y["segmentation3"][0], "depth": y["depth1"][0], "normal": y["normals3"][0]}


def test_dense_labels_keep_their_pixels_in_the_per_task_layout():
  rng = np.random.default_rng(1)
  arrays = {"train": _dense_split(rng, 6), "test": _dense_split(rng, 3)}
  arrays["train"]["depth_mask"] = np.array([1, 1, 0, 1, 1, 1], bool)  # image 2 unlabelled
  data = task_data.build_task_data("dense", _dense_spec(), arrays)
  assert data.input_shape == (H, W, 3) and data.train["x"].shape == (1, 6, H, W, 3)
  assert data.train["y"]["segmentation3"].shape == (1, 6, H, W)
  assert data.train["y"]["depth1"].shape == (1, 6, H, W, 1)
  assert data.train["y"]["normals3"].shape == (1, 6, H, W, 3)
  np.testing.assert_array_equal(data.train["y"]["segmentation3"][0], arrays["train"]["label"])
  np.testing.assert_array_equal(data.test["y"]["normals3"][0], arrays["test"]["normal"])
  depth = data.train["y"]["depth1"][0]
  assert np.all(depth[2] == 0)  # the unlabelled image: every pixel missing
  np.testing.assert_array_equal(np.delete(depth, 2, 0), np.delete(arrays["train"]["depth"], 2, 0))
  # No normalisation of dense labels (regression only).
  np.testing.assert_array_equal(data.label_mean, 0) and np.testing.assert_array_equal(
      data.label_std, 1)


@pytest.mark.parametrize("field, value, match", [
    ("label", 3, r"task 'segmentation', example 4: segmentation label 3 outside \[-1, 3\)"),
    ("depth", np.nan, r"task 'depth', example 4: depth holds NaN"),
    ("depth", -1.0, r"task 'depth', example 4: depth holds negative"),
    ("normal", 2.0, r"task 'normal', example 4: normals must be unit"),
])
def test_bad_dense_labels_name_the_example(field, value, match):
  rng = np.random.default_rng(2)
  arrays = {"train": _dense_split(rng, 6), "test": _dense_split(rng, 3)}
  arrays["train"][field][4, 1, 2] = value
  with pytest.raises(errors.DataError, match=match):
    task_data.build_task_data("dense", _dense_spec(), arrays)


def _nyuv2_config(root, data_dir, pipeline):
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  c = common.base_config()
  c.data.name, c.data.root, c.data.data_dir = "nyuv2_mtan", str(root), str(data_dir)
  c.data.pipeline = pipeline
  return c


def test_nyuv2_files_load_as_three_dense_tasks_on_the_device_and_the_host_pipeline(tmp_path):
  """Mock files in MTAN's layout, through the config: the device layout holds
  the files' labels (segmentation, depth, normal, as LibMTL names the tasks),
  and the host pipeline holds the same labels with the records' indices, its
  reader giving the files' images."""
  from test_dense_files import write_nyuv2  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  written = write_nyuv2(str(tmp_path / "nyu"), counts=(("train", 3), ("val", 2)))
  device = build.data_from_config(_nyuv2_config(tmp_path / "nyu", tmp_path / "d", "device"))
  assert device.taskset.names == ("segmentation", "depth", "normal")
  assert [t.kind for t in device.taskset] == ["segmentation", "depth", "normals"]
  assert device.taskset.tasks[0].num_classes == 13
  for i in range(3):
    np.testing.assert_array_equal(device.train["x"][0, i], written["train", i]["image"])
    np.testing.assert_array_equal(device.train["y"]["segmentation13"][0, i],
                                  written["train", i]["label"].astype(np.int32))
    np.testing.assert_array_equal(device.train["y"]["normals3"][0, i],
                                  written["train", i]["normal"])
  np.testing.assert_array_equal(device.test["y"]["depth1"][0, 1], written["val", 1]["depth"])
  host = build.data_from_config(_nyuv2_config(tmp_path / "nyu", tmp_path / "d", "host"))
  assert host.readers is not None and host.taskset == device.taskset
  for split in ("train", "test"):
    for g in device.taskset.groups:
      np.testing.assert_array_equal(host.split(split)["y"][g], device.split(split)["y"][g])
    records = host.split(split)["records"]
    np.testing.assert_array_equal(host.readers[split].inputs(records[0]),
                                  device.split(split)["x"][0])


def test_files_data_set_needs_its_root_and_options_only_apply_to_it(tmp_path):
  from mtljax import build  # pylint: disable=g-import-not-at-top
  c = _nyuv2_config("", tmp_path / "d", "auto")
  with pytest.raises(errors.ConfigError, match="config.data.root is empty"):
    build.validate_config(c)
  c.data.root = str(tmp_path / "nowhere")
  with pytest.raises(errors.DataError, match="nowhere"):
    build.data_from_config(c)
  c.data.name = "multi_digits"
  with pytest.raises(errors.ConfigError, match="config.data.root=.* applies to the data sets "
                                               "of preprocessed files"):
    build.validate_config(c)


def _np_dense_metrics(kind, out, y, c=C):
  """Float64 numpy, from the definitions: mIoU over classes present in the
  ground truth or the prediction and pixel accuracy; depth abs/rel error over
  valid pixels; normal angles' mean, median and fractions under 11.25, 22.5,
  30 degrees; the loss over every valid pixel."""
  out = np.asarray(out, np.float64)
  if kind == "segmentation":
    valid = y >= 0
    pred, gt = out.argmax(-1)[valid], y[valid]
    conf = np.zeros((c, c))
    np.add.at(conf, (gt, pred), 1)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    m = out.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(out - m).sum(-1, keepdims=True)))[..., 0]
    loss = (lse - np.take_along_axis(out, np.maximum(y, 0)[..., None], -1)[..., 0])[valid]
    return {"loss": loss.mean(), "miou": np.mean((np.diag(conf) / np.where(union > 0, union, 1))
                                                 [union > 0]),
            "pix_acc": np.trace(conf) / conf.sum()}
  if kind == "depth":
    valid = y[..., 0] != 0
    err = np.abs(out[..., 0] - y[..., 0])[valid]
    return {"loss": err.mean(), "abs_err": err.mean(), "rel_err": (err / y[..., 0][valid]).mean()}
  y = np.asarray(y, np.float64)
  valid = np.any(y != 0, -1)
  # A zero prediction (dead ReLU features, zero bias) has no direction: cosine 0.
  p = out / np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-300)
  g = y / np.maximum(np.linalg.norm(y, axis=-1, keepdims=True), 1e-300)
  cos = np.clip(np.sum(p * g, -1), -1, 1)[valid]
  deg = np.degrees(np.arccos(cos))
  return {"loss": (1 - cos).mean(), "mean_angle": deg.mean(), "median_angle": np.median(deg),
          "within_11_25": np.mean(deg < 11.25), "within_22_5": np.mean(deg < 22.5),
          "within_30": np.mean(deg < 30)}


def test_eval_step_gives_each_dense_tasks_split_metrics_over_uneven_chunks():
  """A fully convolutional multi_head's eval step over 7 test images in chunks
  of 3 (3 + 3 + 1): every dense metric and the pixel loss equal a float64
  numpy computation over the whole split from the model's own outputs (the
  median from the histogram, within its stated bound); with shared inputs
  (the trunk once per chunk) the sums are the same."""
  from mtljax import steps  # pylint: disable=g-import-not-at-top
  from mtljax.dense import metrics as dense_metrics  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(3)
  arrays = {"train": _dense_split(rng, 6), "test": _dense_split(rng, 7)}
  data = task_data.build_task_data("dense", _dense_spec(), arrays)
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, encoder="fcn",
                               channels=(6,), hidden=(5,))
  params = model.init(jax.random.key(0))
  ev = steps.make_eval_step(model, label_mean=data.label_mean, label_std=data.label_std,
                            num_examples=7, batch_size=3)
  ev_shared = steps.make_eval_step(model, label_mean=data.label_mean,
                                   label_std=data.label_std, num_examples=7, batch_size=3,
                                   shared_inputs=True)
  ids = np.arange(3, dtype=np.int32)

  @jax.jit
  def both(params, split, x):
    return (ev(params, split), ev_shared(params, split),
            model.apply(params, x[None].repeat(3, 0), ids))
  acc, acc_shared, outs = both(params, jax.device_put(data.test), data.test["x"][0])
  # Shared inputs: the trunk once per chunk, then each task's head -- the same sums.
  for a, b in zip(jax.tree.leaves(acc), jax.tree.leaves(acc_shared)):
    np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                               rtol=1e-5, atol=1e-4)
  got = steps.eval_metrics(data.taskset, acc)
  np.testing.assert_array_equal(acc["count"], [6, 6, 6])  # image 1 has no valid pixel
  for t in data.taskset:
    y = data.test["y"][t.group][0]
    want = _np_dense_metrics(t.kind, outs[t.group][data.taskset.index(t.name)], y)
    assert set(got[t.name]) == set(t.metric_names)
    for k, v in want.items():
      tol = dense_metrics.median_bound() if k == "median_angle" else 1e-5 * max(1, abs(v))
      assert abs(got[t.name][k] - v) <= tol + 1e-5, (t.name, k, got[t.name][k], v)


@pytest.mark.slow
def test_scenes_config_trains_reports_every_dense_metric_delta_m_and_draws_examples(tmp_path):
  """The scenes config end to end on small scenes (16x20, 40 images), with
  single-task baselines: the summary holds the nine NYUv2-style metrics and
  each task's loss, Δm is over every metric with its declared direction
  (recomputed here from the summary's own numbers, both averages), and the
  run draws its example grid."""
  from experiments.configs import scenes  # pylint: disable=g-import-not-at-top
  from mtljax import train  # pylint: disable=g-import-not-at-top
  c = scenes.get_config("quick")
  c.data.builder_config = "h16_w20_n40_m10_s0"
  c.total_steps, c.steps_per_call, c.log_steps = 20, 10, 10
  c.eval_steps = c.checkpoint_steps = 20
  c.baselines, c.baselines_cache = True, str(tmp_path / "cache")
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  got = summary["tasks"]
  assert set(got) == {"segmentation", "depth", "normal"}
  assert set(got["normal"]) == {"loss", "mean_angle", "median_angle", "within_11_25",
                                "within_22_5", "within_30"}
  assert 0 <= got["segmentation"]["miou"] <= 1 and 0 <= got["segmentation"]["pix_acc"] <= 1
  base = summary["delta_m"]["baselines"]
  metrics = {t: {k: v for k, v in m.items() if k != "loss"} for t, m in got.items()}
  terms = [100 * (1 if tasks.METRIC_DIRECTIONS[k] == "higher" else -1) * (v - base[t][k])
           / abs(base[t][k]) for t, ms in metrics.items() for k, v in ms.items()]
  assert len(terms) == 9
  per_task = np.mean([np.mean([100 * (1 if tasks.METRIC_DIRECTIONS[k] == "higher" else -1)
                               * (v - base[t][k]) / abs(base[t][k]) for k, v in ms.items()])
                      for t, ms in metrics.items()])
  assert summary["delta_m"]["value"] == pytest.approx(per_task, rel=1e-6)
  assert summary["delta_m"]["value_per_metric"] == pytest.approx(np.mean(terms), rel=1e-6)
  assert (tmp_path / "run" / "dense_examples.png").stat().st_size > 0


def test_dense_configs_validate_and_need_their_files_root():
  from experiments.configs import cityscapes, nyuv2, scenes  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  for variant in scenes.VARIANTS:
    build.validate_config(scenes.get_config(variant))
  for module in (nyuv2, cityscapes):
    c = module.get_config()
    with pytest.raises(errors.ConfigError, match="config.data.root is empty"):
      build.validate_config(c)
    c.data.root = "/data/somewhere"
    build.validate_config(c)
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
      module.get_config("fast")
  with pytest.raises(ValueError, match="unknown variant 'fast'"):
    scenes.get_config("fast")


_SCENES_CLI = ["--config=experiments/configs/scenes.py:quick",
               "--config.data.builder_config=h16_w20_n40_m10_s0", "--config.total_steps=300",
               "--config.steps_per_call=5", "--config.log_steps=10", "--config.eval_steps=100",
               "--config.checkpoint_steps=20", "--config.plots=False",
               "--config.tensorboard=False", "--config.data.augment=scale_crop,flip"]


def _scenes_run(workdir, data_dir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  return subprocess.Popen([sys.executable, "-m", "experiments.main", *_SCENES_CLI,
                           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}"],
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_dense_run_killed_with_sigkill_resumes_bitwise(tmp_path):
  """The scenes config through the command line, with the scale-crop and
  flip augmentation: SIGKILL after the first checkpoints, the same command
  again, and every logged number, the final metrics and the whole final state
  equal an uninterrupted run's bits."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  from test_faults import _assert_bitwise, _final_state  # pylint: disable=g-import-not-at-top
  from experiments.configs import scenes  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  data_dir, straight, killed = tmp_path / "data", tmp_path / "a", tmp_path / "b"
  proc = _scenes_run(straight, data_dir)
  assert proc.wait(timeout=600) == 0, proc.stderr.read()[-3000:]
  proc = _scenes_run(killed, data_dir)
  ckpts, deadline = killed / "checkpoints", time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(d.isdigit() and int(d) >= 60 for d in os.listdir(ckpts)):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  proc = _scenes_run(killed, data_dir)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "Resumed from" in err, err[-3000:]
  assert helpers.metrics_rows(killed) == helpers.metrics_rows(straight)
  with open(killed / "summary.json") as f, open(straight / "summary.json") as g:
    import json  # pylint: disable=g-import-not-at-top
    assert json.load(f)["tasks"] == json.load(g)["tasks"]
  c = scenes.get_config("quick")
  c.data.builder_config, c.data.data_dir = "h16_w20_n40_m10_s0", str(data_dir)
  c.data.augment = "scale_crop,flip"
  like = build.build_run(c, build.data_from_config(c)).state
  _assert_bitwise(_final_state(killed, like), _final_state(straight, like))


def test_the_train_step_augments_each_image_with_its_labels_for_every_slot():
  """``augment='scale_crop,flip'``: the step's losses equal the model's
  losses on the batch augmented here, image by image with the library's
  window (checked against numpy in test_dense_augment) drawn from
  ``fold_in(r_examples, AUGMENT_STREAM)``: every slot's labels of an image
  take that image's window (depth divided by its scale, normals' x negated
  when flipped). A data set without dense labels is refused."""
  from mtljax import steps  # pylint: disable=g-import-not-at-top
  from mtljax.data import sampling  # pylint: disable=g-import-not-at-top
  from mtljax.dense import augment  # pylint: disable=g-import-not-at-top
  from mtljax.models import multitask  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  h, w, b = 8, 10, 6

  def split(n):
    y = _labels(rng, 1, n, h, w)
    return {"image": rng.uniform(size=(n, h, w, 3)).astype(np.float32),
            "label": y["segmentation3"][0], "depth": y["depth1"][0], "normal": y["normals3"][0]}
  data = task_data.build_task_data("dense", _dense_spec(), {"train": split(9), "test": split(2)})
  ts = data.taskset
  model = multitask.make_model("multi_head", ts, data.input_shape, encoder="fcn",
                               channels=(4,), hidden=(4,))
  sampler = sampling.make_sampler(ts, np.full(3, 1 / 3), 3, b, False, True)
  step = steps.make_train_step(model, optax.adam(1e-3), "fixed", sampler,
                               weights=np.ones(3, np.float32),
                               augment=steps.dense_augmenter(ts, "scale_crop,flip"))
  params = model.init(jax.random.key(0))
  state = steps.init_train_state(model, optax.adam(1e-3), jax.random.key(0), "fixed")
  ids, x, ys, _ = helpers.step_batch(data, np.full(3, 1 / 3), seed=0, k=3, b=b,
                                     shared_inputs=True)
  key = jax.random.fold_in(helpers.step_keys(0, 0)[1], steps.AUGMENT_STREAM)
  fields = {"segmentation3": "label", "depth1": "depth", "normals3": "normal"}
  xa, ya = np.zeros_like(x), {g: np.zeros_like(v) for g, v in ys.items()}
  scales_used = []
  for i, k in enumerate(jax.random.split(key, b)):
    win = augment.draw_window(k, (h, w))
    scales_used.append((int(win.scale), bool(win.flip)))
    for slot in range(3):
      ex = {"image": x[i], **{fields[g]: ys[g][slot, i] for g in ys}}
      out = augment.apply_window(ex, win)
      xa[i] = out["image"]
      for g in ys:
        ya[g][slot, i] = out[fields[g]]
  assert len(set(scales_used)) > 1  # the windows differ: something to check

  @jax.jit
  def run(state, split, xa, ya):
    _, meas = step(state, split)
    want = tasks.slot_losses(ts, model.apply(params, jnp.broadcast_to(xa, (3,) + xa.shape),
                                             jnp.asarray(ids)), ya, jnp.asarray(ids))
    return meas["task_loss_sum"], want
  got, want = run(state, data.train, xa, ya)
  np.testing.assert_allclose(np.asarray(got)[ids], np.asarray(want), rtol=1e-5)
  plain = tasks.TaskSet((tasks.Task("y", "regression"),))
  with pytest.raises(ValueError, match=r"crops and flips images with their per-pixel labels"):
    steps.dense_augmenter(plain, "flip")


@pytest.mark.slow
def test_the_cityscapes_config_trains_on_mock_files_through_both_pipelines(tmp_path):
  """The Cityscapes config end to end on files in MTAN's preprocessed layout
  (128x256 images, ``label_7`` int64 with -1 ignored, inverse depth with 0
  missing), narrowed in width, steps and batch only: every valid pixel is
  class 3 and inverse depth 0.1, so after training the split-exact metrics
  are pixel accuracy 1, mIoU 1 (one class, in the ground truth and the
  prediction) and a depth error under half of predicting 0; the host pipeline's run reads the
  same records and gives the device run's numbers."""
  from experiments.configs import cityscapes  # pylint: disable=g-import-not-at-top
  from mtljax import train  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  from test_dense_files import CITY_H, CITY_W  # pylint: disable=g-import-not-at-top
  root, rng = tmp_path / "cityscapes", np.random.default_rng(0)
  for sub, n in (("train", 12), ("val", 4)):
    for field in ("image", "depth", "label_7"):
      os.makedirs(root / sub / field)
    for i in range(n):
      hole = rng.random((CITY_H, CITY_W)) < 0.1
      depth = np.where(rng.random((CITY_H, CITY_W)) < 0.1, 0.0, 0.1)[..., None]
      np.save(root / sub / "image" / f"{i}.npy",
              rng.random((CITY_H, CITY_W, 3)).astype(np.float32))
      np.save(root / sub / "depth" / f"{i}.npy", depth.astype(np.float32))
      np.save(root / sub / "label_7" / f"{i}.npy", np.where(hole, -1, 3).astype(np.int64))
  summaries = {}
  for kind in ("device", "host"):
    config = helpers.with_overrides(cityscapes.get_config(), {
        "data.root": str(root), "data.data_dir": str(tmp_path / "tfds"),
        "data.pipeline": kind, "model.channels": (8, 8), "model.hidden": (8,),
        "optim.lr": 1e-2, "sampling.examples_per_task": 4, "total_steps": 60,
        "steps_per_call": 20, "log_steps": 20, "eval_steps": 60, "checkpoint_steps": 60,
        "eval_batch_size": 4, "tensorboard": False, "plots": False})
    summaries[kind] = summary = train.train_and_evaluate(config, str(tmp_path / kind))
    assert summary["data_pipeline"]["pipeline"] == kind
  tasks_ = summaries["device"]["tasks"]
  assert list(tasks_) == ["segmentation", "depth"]
  assert tasks_["segmentation"]["pix_acc"] == 1.0 and tasks_["segmentation"]["miou"] == 1.0
  # Predicting 0 errs by 0.1 (the first 10 steps' training loss: 0.11);
  # 60 steps bring it to about 0.023 with this seed.
  assert tasks_["depth"]["abs_err"] < 0.05, tasks_["depth"]
  for name, metrics in tasks_.items():
    for metric, value in metrics.items():
      np.testing.assert_allclose(summaries["host"]["tasks"][name][metric], value, rtol=1e-5,
                                 err_msg=f"{name}.{metric}")
  assert helpers.metrics_rows(tmp_path / "host")[-1]["step"] == 60
