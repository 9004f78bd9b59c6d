"""Examples labelled for only some tasks (missing labels).

References: a float64 numpy re-computation of one step's per-slot losses
(means over each slot's labelled examples) and of its gradients (hand
back-propagation through the one-hidden-layer multi-head network), numpy means
and standard deviations over the labelled labels, numpy metric means over the
labelled test examples, the run without a mask (bitwise), and the device path
(for the host pipeline's batches and evaluation).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import helpers
from mtljax import objectives
from mtljax import steps
from mtljax import tasks
from mtljax.data import loading
from mtljax.data import pipeline
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.models import multitask

_MASKED = ("y", "c", "b")  # columns given a "<label>_mask" feature; c2 uses -1 alone


def _partial_arrays(n_train=48, n_test=40, seed=0, missing=0.4, rare_b=False):
  """``helpers.shared_input_data`` with labels missing: the regression label
  NaN where its mask is False, the classification label ``c`` -1 where its mask
  is False, ``b``'s labels kept but masked, ``c2`` -1 without a mask feature.
  ``rare_b``: task b labelled on only 4 train examples."""
  spec, arrays = helpers.shared_input_data(n_train, n_test, seed)
  rng = np.random.default_rng(seed + 10)
  for split, cols in arrays.items():
    for key in _MASKED + ("c2",):
      keep = rng.random(len(cols[key])) >= missing
      if key == "b" and rare_b and split == "train":
        keep = np.zeros(len(keep), bool)
        keep[:4] = True
      if key in _MASKED:
        cols[key + "_mask"] = keep
      if key == "y":
        cols[key] = np.where(keep, cols[key], np.nan).astype(np.float32)
      elif key in ("c", "c2"):
        cols[key] = np.where(keep, cols[key], -1)
  return spec, arrays


def _partial_data(**kw):
  return task_data.build_task_data("partial", *_partial_arrays(**kw))


def _labelled(kind, y):
  y = np.asarray(y)
  return ~np.isnan(y) if kind == "regression" else y >= 0


# ----------------------------------------------------------------------------
# Loading: the mask, the checks, the label statistics.
# ----------------------------------------------------------------------------


def test_layout_marks_missing_labels_and_statistics_use_labelled_only():
  spec, arrays = _partial_arrays()
  data = task_data.build_task_data("partial", spec, arrays)
  ts = data.taskset
  for split in ("train", "test"):
    cols, lay = arrays[split], data.split(split)
    for t, key in zip(ts, ("y", "c", "b", "c2")):
      i = ts.index(t.name)
      got = lay["y"][t.group][ts.local_index[i]][:lay["n"][i]]
      keep = cols[key + "_mask"] if key in _MASKED else cols[key] >= 0
      np.testing.assert_array_equal(tasks.label_mask(t, got), keep)
      if t.kind != "regression":
        np.testing.assert_array_equal(got[keep], cols[key][keep])
        assert np.all(got[~keep] == -1)
  # Regression statistics: the train split's labelled labels only (float64).
  y = arrays["train"]["y"][arrays["train"]["y_mask"]].astype(np.float64)
  r = ts.index("r")
  np.testing.assert_allclose(data.label_mean[r], y.mean(), rtol=1e-6)
  np.testing.assert_allclose(data.label_std[r], y.std(), rtol=1e-5)
  got = data.test["y"]["regression1"][0][:data.test["n"][r]]
  keep = arrays["test"]["y_mask"]
  np.testing.assert_allclose(got[keep], (arrays["test"]["y"][keep] - y.mean()) / y.std(),
                             rtol=1e-5, atol=1e-5)
  # The several-process formula (summed counts and sums) gives the same statistics.
  summed = task_data.build_task_data("partial", spec, arrays, reduce_sums=lambda a: a)
  np.testing.assert_allclose(summed.label_mean, data.label_mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(summed.label_std, data.label_std, rtol=1e-5)
  np.testing.assert_array_equal(summed.num_train, data.train["n"])


def test_family_tasks_take_their_rows_of_the_mask():
  spec, arrays = helpers.family_data([20, 30, 25], [10, 10, 10])
  for cols in arrays.values():
    keep = np.arange(len(cols["y"])) % 3 != 0
    cols["y_mask"], cols["y"] = keep, np.where(keep, cols["y"], np.nan).astype(np.float32)
  data = task_data.build_task_data("family", spec, arrays)
  tr = arrays["train"]
  for i, t in enumerate(data.taskset):
    sel = tr["task"] == i
    got = data.train["y"]["regression1"][i][:data.train["n"][i]]
    np.testing.assert_array_equal(tasks.label_mask(t, got), tr["y_mask"][sel])
    y = tr["y"][sel][tr["y_mask"][sel]].astype(np.float64)
    np.testing.assert_allclose(data.label_mean[i], y.mean(), rtol=1e-6)
    np.testing.assert_allclose(data.label_std[i], y.std(), rtol=1e-5)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["train"].update(y_mask=np.ones(48, bool)), "NaN or infinite label"),
    (lambda c: c["train"].pop("y_mask"), "NaN or infinite label"),
    (lambda c: c["train"]["c2"].__setitem__(3, -2), "labels must be in [0, 3)"),
    (lambda c: c["test"].update(c_mask=np.zeros(40, bool)), "task 'c' has no labelled"),
    (lambda c: c["train"].update(b_mask=np.ones(5, bool)), "'b_mask' has shape (5,)"),
])
def test_bad_labels_raise_naming_the_problem(edit, message):
  spec, arrays = _partial_arrays()
  edit(arrays)
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")
                     .replace(")", r"\)")):
    task_data.build_task_data("partial", spec, arrays)


def test_mask_features_are_no_catalog_tasks():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(2,), dtype=np.float32),
      "label": tfds.features.ClassLabel(num_classes=3),
      "label_mask": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "smiling": tfds.features.Tensor(shape=(), dtype=np.bool_)})
  spec = specs.catalog_spec(features, "image", ())
  assert [c.label_key for c in spec.columns] == ["label", "smiling"]
  assert specs.mask_keys(spec, specs.flatten_features(features)) == ["label_mask"]


# ----------------------------------------------------------------------------
# One step against a float64 hand computation.
# ----------------------------------------------------------------------------


def _model(ts, input_shape, seed=0):
  model = multitask.make_model("multi_head", ts, input_shape, hidden=(6,))
  p = model.init(jax.random.key(seed))
  leaves, treedef = jax.tree.flatten(p)
  # numpy noise: an eager jax.random draw compiles a program per leaf shape.
  rng = np.random.default_rng(seed + 1)
  return model, jax.tree.unflatten(treedef, [
      jnp.asarray(np.asarray(a) + 0.3 * rng.standard_normal(a.shape), jnp.float32)
      for a in leaves])


def _hand_step(params, x, ys, ids, ts, w):
  """Per-slot losses (mean over the slot's labelled examples, 0 with none) and
  the gradient of ``sum_k w_t L_k`` in float64, by hand back-propagation
  through ``relu(x W + b)`` and each slot's linear head (shared inputs)."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  trunk, heads = p["shared"]["trunk"]["layer_0"], p["tasks"]["heads"]
  x = np.asarray(x, np.float64)
  pre = x @ trunk["kernel"] + trunk["bias"]
  h = np.maximum(pre, 0.0)
  grads = jax.tree.map(np.zeros_like, p)
  gh = grads["tasks"]["heads"]
  dh = np.zeros_like(h)
  losses = []
  for k, t in enumerate(ids):
    task, r = ts.tasks[t], ts.local_index[t]
    kern, bias = heads[task.group]["kernel"][r], heads[task.group]["bias"][r]
    out = h @ kern + bias
    y = np.asarray(ys[task.group][k], np.float64)
    lab = _labelled(task.kind, y)
    y = np.where(lab, y, 0.0)
    if task.kind == "regression":
      loss, dout = (out[:, 0] - y) ** 2, 2 * (out - y[:, None])
    elif task.kind == "binary":
      z = out[:, 0]
      loss = np.logaddexp(0.0, z) - y * z
      dout = (1 / (1 + np.exp(-z)) - y)[:, None]
    else:
      logz = np.log(np.sum(np.exp(out - out.max(1, keepdims=True)), 1)) + out.max(1)
      onehot = np.eye(task.num_classes)[y.astype(int)]
      loss = logz - np.sum(out * onehot, 1)
      dout = np.exp(out - logz[:, None]) - onehot
    n = max(int(lab.sum()), 1)
    losses.append(float(np.sum(loss[lab]) / n))
    dout = dout * lab[:, None] * w[t] / n
    gh[task.group]["kernel"][r] += h.T @ dout
    gh[task.group]["bias"][r] += dout.sum(0)
    dh += dout @ kern.T
  dpre = dh * (pre > 0)
  grads["shared"]["trunk"]["layer_0"] = {"kernel": x.T @ dpre, "bias": dpre.sum(0)}
  return np.asarray(losses), grads


def _fully_unlabelled_step(data, b, task, seed, steps_=40):
  """A step index whose batch leaves ``task``'s slot with no label and every
  other slot with one (shared inputs, every task in every step)."""
  ts = data.taskset
  probs = np.full(len(ts), 1 / len(ts))
  for s in range(steps_):
    ids, x, ys, _ = helpers.step_batch(data, probs, seed=seed, step=s, k=len(ts), b=b,
                                       shared_inputs=True)
    lab = [bool(np.any(_labelled(ts.tasks[t].kind, ys[ts.tasks[t].group][k])))
           for k, t in enumerate(ids)]
    if all(lab[k] == (t != ts.index(task)) for k, t in enumerate(ids)):
      return s, ids, x, ys
  raise AssertionError("no such step in the first steps")


def test_step_losses_and_gradients_equal_hand_computation_with_mask():
  data = _partial_data(rare_b=True)
  ts = data.taskset
  b, seed = 8, 3
  step, ids, x, ys = _fully_unlabelled_step(data, b, "b", seed)
  model, params = _model(ts, data.input_shape)
  w = np.array([1.0, 2.0, 0.5, 1.5], np.float32)
  tx = optax.sgd(1.0)
  train_step = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(ts, np.full(4, 0.25), 4, b, shared_inputs=True),
      weights=w, seed=seed))
  state = steps.init_train_state(model, tx, jax.random.key(0))
  state = state._replace(params=params, step=jnp.asarray(step, jnp.int32))
  new, meas = train_step(state, jax.tree.map(jnp.asarray, data.train))
  losses, grads = _hand_step(params, x, ys, ids, ts, w)
  per_task = np.zeros(4)
  per_task[ids] = losses
  np.testing.assert_allclose(meas["task_loss_sum"], per_task, rtol=1e-5, atol=1e-6)
  assert losses[list(ids).index(ts.index("b"))] == 0.0
  np.testing.assert_array_equal(meas["task_count"], [1, 1, 0, 1])  # b's slot: no label
  np.testing.assert_allclose(meas["loss"], np.sum(w[ids] * losses), rtol=1e-5)
  want = jax.tree.map(lambda p_, g: np.asarray(p_, np.float64) - g, params, grads)
  helpers.assert_trees_close(new.params, want, rtol=1e-5, atol=1e-6)
  # The unlabelled task's head rows are untouched (not even by a zero update).
  heads, old = new.params["tasks"]["heads"]["binary1"], params["tasks"]["heads"]["binary1"]
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(heads[leaf], old[leaf])


def test_masked_mean_is_the_mean_bitwise_when_everything_is_labelled():
  """Without missing labels the masked losses and their gradients are
  exactly the plain means (the loss before masks existed)."""
  data = helpers.toy_data()
  ts = data.taskset
  model, params = _model(ts, data.input_shape)
  ids, x, ys, _ = helpers.step_batch(data, np.full(4, 0.25), seed=1, k=4, b=16,
                                     shared_inputs=False)
  ys = {g: jnp.asarray(y) for g, y in ys.items()}
  x, ids = jnp.asarray(x), jnp.asarray(ids, jnp.int32)

  def plain(p):
    outs, group_of = model.apply(p, x, ids), jnp.asarray(ts.group_of_task)[ids]
    out = jnp.zeros(ids.shape, jnp.float32)
    for gi, g in enumerate(ts.groups):
      out = out + jnp.where(group_of == gi, tasks.example_loss(
          ts.group_task(g), outs[g], ys[g]).mean(axis=1), 0.0)
    return out

  def masked(p):
    return tasks.slot_losses(ts, model.apply(p, x, ids), ys, ids)
  c = jnp.arange(1.0, 5.0)
  np.testing.assert_array_equal(jax.jit(plain)(params), jax.jit(masked)(params))
  ga = jax.jit(jax.grad(lambda q: jnp.sum(c * plain(q))))(params)
  gb = jax.jit(jax.grad(lambda q: jnp.sum(c * masked(q))))(params)
  for a, b_ in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_array_equal(a, b_)


def test_all_ones_mask_run_equals_run_without_mask_bitwise():
  spec, arrays = helpers.shared_input_data(48, 30)
  masked = {s: {**cols, **{k + "_mask": np.ones(len(cols[k]), bool) for k in ("y", "c", "b")}}
            for s, cols in arrays.items()}
  runs = []
  for a in (arrays, masked):
    data = task_data.build_task_data("toy", spec, a)
    model, params = _model(data.taskset, data.input_shape)
    tx = optax.adam(1e-2)
    step = jax.jit(steps.make_train_step(
        model, tx, "dwa", sampling.make_sampler(data.taskset, np.full(4, 0.25), 3, 8),
        weights=np.ones(4), steps_per_call=5, seed=2))
    state = steps.init_train_state(model, tx, jax.random.key(0), "dwa")
    state = state._replace(params=params)
    train = jax.tree.map(jnp.asarray, data.train)
    for _ in range(2):
      state, meas = step(state, train)
    runs.append((state, meas))
  for a, b_ in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(a, b_)


# ----------------------------------------------------------------------------
# Every objective with a fully unlabelled slot.
# ----------------------------------------------------------------------------


# The fast tier: a plain weighting, FAMO's normalisation over the slots, and
# a Gram method with a solver; every other method in the slow tier.
_FAST_METHODS = ("fixed", "famo", "nash_mtl")


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=() if m in _FAST_METHODS else (pytest.mark.slow,))
    for m in objectives.methods()])
def test_every_objective_updates_finitely_with_one_fully_unlabelled_slot(method):
  """Zero loss and zero gradient in the unlabelled slot: every method's update
  is finite, the unlabelled task's head and its optimizer rows stay, the
  labelled tasks' heads move."""
  data = _partial_data()
  ts = data.taskset
  model, params = _model(ts, data.input_shape)
  k, b = 4, 6
  order = ts.grouped_order
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, 5)).astype(np.float32)
  ys = {"regression1": rng.normal(size=(k, b)).astype(np.float32),
        "classification3": rng.integers(0, 3, (k, b)).astype(np.int32),
        "binary1": rng.integers(0, 2, (k, b)).astype(np.int32)}
  unl = ts.index("c2")
  ys["classification3"][list(order).index(unl)] = -1  # c2's slot: every label missing
  ys["regression1"][0, :2] = np.nan                     # and some missing elsewhere
  batch = {"task_ids": order, "x": x, "y": ys}
  row = ts.local_index[unl]
  tx = optax.adam(1e-2)
  objective = objectives.make_objective(method, len(ts))
  draws = objective.draws
  if draws > 1:  # MoDo, SDMGrad: the same examples in each of the three draws' slots
    batch = {"task_ids": np.tile(order, draws),
             "x": np.broadcast_to(x, (draws * k,) + x.shape),
             "y": {g: np.tile(v, (draws, 1)) for g, v in ys.items()}}
  train_step = jax.jit(steps.make_train_step(
      model, tx, objective, sampling.make_sampler(ts, np.full(4, 0.25), k, b, shared_inputs=True,
                                                  draws=draws),
      weights=np.ones(4), host_batches=True))
  state = steps.init_train_state(model, tx, jax.random.key(0), objective)
  # Adam's zero moments fit any values.
  state = state._replace(params={"shared": params["shared"],
                                 "tasks": {**state.params["tasks"], **params["tasks"]}})
  new, meas = train_step(state, jax.tree.map(jnp.asarray, batch))
  assert int(meas["nonfinite_steps"]) == 0
  for leaf in jax.tree.leaves((new.params, new.opt_state, new.objective_state, meas)):
    assert np.all(np.isfinite(np.asarray(leaf, np.float64)))
  assert float(meas["task_loss_sum"][unl]) == 0.0 and float(meas["task_count"][unl]) == 0
  heads, old = new.params["tasks"]["heads"], params["tasks"]["heads"]
  for leaf in ("kernel", "bias"):  # the unlabelled task's head and Adam rows: unchanged
    np.testing.assert_array_equal(heads["classification3"][leaf][row],
                                  old["classification3"][leaf][row])
  rows = 0
  for (path, after), before in zip(jax.tree_util.tree_flatten_with_path(new.opt_state)[0],
                                   jax.tree.leaves(state.opt_state)):
    if "classification3" in jax.tree_util.keystr(path) and np.ndim(after) >= 1:
      np.testing.assert_array_equal(after[row], before[row])  # Adam's moments of the row
      rows += 1
  assert rows >= 4
  moved = [t for t in ts.names if t != "c2" and not np.array_equal(
      heads[ts.tasks[ts.index(t)].group]["kernel"][ts.local_index[ts.index(t)]],
      old[ts.tasks[ts.index(t)].group]["kernel"][ts.local_index[ts.index(t)]])]
  assert moved  # (min_max moves only the worst task's head)


def test_tag_affinity_leaves_out_pairs_with_an_unlabelled_slot():
  data = helpers.toy_data()
  ts = data.taskset
  model, params = _model(ts, data.input_shape)
  rng = np.random.default_rng(1)
  ys = {"regression1": rng.normal(size=(4, 6)).astype(np.float32),
        "classification3": rng.integers(0, 3, (4, 6)).astype(np.int32),
        "binary1": rng.integers(0, 2, (4, 6)).astype(np.int32)}
  order = ts.grouped_order
  unl = ts.index("b")
  ys["binary1"][list(order).index(unl)] = -1
  batch = {"task_ids": order, "x": rng.normal(size=(6, 5)).astype(np.float32), "y": ys}
  tx = optax.sgd(0.1)
  step = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(ts, np.full(4, 0.25), 4, 6, shared_inputs=True),
      weights=np.ones(4), host_batches=True, tag_lr=0.1))
  state = steps.init_train_state(model, tx, jax.random.key(0))
  _, meas = step(state._replace(params=params), jax.tree.map(jnp.asarray, batch))
  want = np.ones((4, 4))
  want[unl, :] = want[:, unl] = 0.0
  np.testing.assert_array_equal(meas["tag_count"], want)
  assert np.all(np.isfinite(meas["tag_sum"])) and not np.any(meas["tag_sum"][unl])
  assert np.any(meas["tag_sum"][want > 0])


# ----------------------------------------------------------------------------
# Metrics over labelled examples; the host pipeline equals the device path.
# ----------------------------------------------------------------------------


def test_eval_metrics_are_means_over_labelled_examples():
  data = _partial_data()
  ts = data.taskset
  model, params = _model(ts, data.input_shape)
  test = data.test
  n = int(test["n"][0])
  ev = jax.jit(steps.make_eval_step(model, label_mean=data.label_mean,
                                    label_std=data.label_std, num_examples=n, batch_size=16))
  got = steps.eval_metrics(ts, ev(params, jax.tree.map(jnp.asarray, test)))
  x = jnp.asarray(test["x"][0][:n])
  for i, t in enumerate(ts):
    out = np.asarray(model.apply(params, x[None], jnp.array([i], jnp.int32))[t.group][0],
                     np.float64)
    y = np.asarray(test["y"][t.group][ts.local_index[i]][:n], np.float64)
    lab = _labelled(t.kind, y)
    out, y = out[lab], y[lab]
    if t.kind == "regression":
      err = (out[:, 0] - y) * data.label_std[i]
      want = {"loss": np.mean((out[:, 0] - y) ** 2), "mse": np.mean(err ** 2),
              "mae": np.mean(np.abs(err))}
    elif t.kind == "binary":
      want = {"accuracy": np.mean((out[:, 0] > 0) == (y > 0)),
              "loss": np.mean(np.logaddexp(0, out[:, 0]) - y * out[:, 0])}
    else:
      logz = np.log(np.exp(out).sum(1))
      want = {"accuracy": np.mean(out.argmax(1) == y),
              "loss": np.mean(logz - out[np.arange(len(y)), y.astype(int)])}
    for key, value in want.items():
      np.testing.assert_allclose(got[t.name][key], value, rtol=2e-5, atol=1e-6,
                                 err_msg=f"{t.name}/{key}")


def _features(arrays):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  cols = arrays["train"]
  return tfds.features.FeaturesDict({
      k: tfds.features.Tensor(shape=np.shape(v)[1:], dtype=np.asarray(v).dtype)
      for k, v in cols.items()})


def test_host_pipeline_equals_device_path_with_missing_labels():
  spec, arrays = _partial_arrays()
  device = task_data.build_task_data("partial", spec, arrays)
  sources = {s: [{k: v[i] for k, v in cols.items()} for i in range(len(cols["x"]))]
             for s, cols in arrays.items()}
  host = pipeline.load("partial", sources=sources, features=_features(arrays), spec=spec)
  ts = device.taskset
  for split in ("train", "test"):
    for g, y in device.split(split)["y"].items():
      np.testing.assert_array_equal(host.split(split)["y"][g], y)  # NaN where missing
  np.testing.assert_array_equal(host.label_mean, device.label_mean)
  sampler = sampling.make_sampler(ts, sampling.task_probabilities("uniform", device.num_train),
                                  3, 6, False, False)
  batches = pipeline.Batches(host, sampler, 7)
  on_device = jax.tree.map(jnp.asarray, device.train)
  for call in (0, 5):
    got = batches.call(call)
    r_tasks, r_examples, _ = sampling.step_keys(jax.random.key(7), call)
    want = steps.sample_batch(sampler, on_device, r_tasks, r_examples)
    np.testing.assert_array_equal(got["x"], np.asarray(want.x))
    for g in want.ys:
      np.testing.assert_array_equal(got["y"][g], np.asarray(want.ys[g]))
  # Evaluation: the host's chunks add up to the device's sums and counts.
  model, params = _model(ts, device.input_shape)
  kw = dict(label_mean=device.label_mean, label_std=device.label_std)
  dev = steps.make_eval_step(model, num_examples=device.test["x"].shape[1], batch_size=16,
                             **kw)(params, jax.tree.map(jnp.asarray, device.test))
  chunk_step = jax.jit(steps.make_chunk_eval_step(model, **kw))
  acc = steps.eval_zeros(ts)
  for chunk in pipeline.eval_chunks(host, "test", 16):
    acc = jax.tree.map(jnp.add, acc, chunk_step(params, chunk))
  np.testing.assert_array_equal(acc["count"], dev["count"])
  helpers.assert_trees_close(acc["sums"], dev["sums"], rtol=1e-5, atol=1e-5)


def test_drop_labels_misses_the_fraction_asked_for():
  from mtljax.data import generators  # pylint: disable=g-import-not-at-top
  y = np.arange(4000) % 10
  out = generators.drop_labels({"label": y, "x": y}, ("label",), 0.3,
                               np.random.default_rng(0))
  m = out["label_mask"]
  # Binomial(4000, 0.7): 3 standard deviations are 0.022.
  assert abs(m.mean() - 0.7) < 0.022
  np.testing.assert_array_equal(out["label"][m], y[m])
  assert np.all(out["label"][~m] == -1) and out["x"] is y
  with pytest.raises(ValueError, match=r"in \[0, 1\)"):
    generators.drop_labels({"label": y}, ("label",), 1.0, np.random.default_rng(0))


@pytest.mark.slow
def test_multi_digits_with_missing_labels_runs_from_the_config(tmp_path):
  """The bundled ``multi_digits`` with 40% of train labels missing, end to
  end from the config: the masks reach the step (per-task train losses are
  means over labelled examples, every slot of a 64-example batch has some)
  and the evaluation counts every (fully labelled) test example."""
  from experiments.configs import multi_digits  # pylint: disable=g-import-not-at-top
  from mtljax import train  # pylint: disable=g-import-not-at-top
  config = helpers.with_overrides(multi_digits.get_config("quick"), {
      "data.builder_config": "n300_m60_s0_miss0.4", "total_steps": 20, "steps_per_call": 5,
      "log_steps": 10, "eval_steps": 20, "checkpoint_steps": 20})
  summary = train.train_and_evaluate(config, str(tmp_path))
  rows = helpers.metrics_rows(tmp_path)
  evals = [r for r in rows if "eval/left/accuracy" in r]
  assert evals and all(np.isfinite(v) for r in rows for v in r.values()
                       if isinstance(v, float))
  assert 0.0 <= evals[-1]["eval/left/accuracy"] <= 1.0
  assert summary["train_step_compilations"] == 1
  data = loading.load("multi_digits", builder_config="n300_m60_s0_miss0.4")
  for g, y in data.train["y"].items():
    frac = 1 - np.mean(tasks.label_mask(data.taskset.group_task(g), y))
    assert 0.33 < frac < 0.47  # 40% of 600 labels: 3 standard deviations 0.06
