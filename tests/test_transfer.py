"""Transfer learning: optimizer rules, schedules, freezing, loading, L2-SP."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import build
from mtljax import checkpoint
from mtljax import optim
from mtljax import params as params_lib
from mtljax import schedules
from mtljax import steps
from mtljax import train
from mtljax import transfer
from mtljax.data import sampling
from mtljax.data import task_data
from mtljax.models import multitask

import helpers


def _model(encoder="mlp"):
  data = task_data.build_task_data("toy", *helpers.shared_input_data())
  if encoder == "cnn":  # 5 inputs as a 1 x 5 image
    data.train["x"] = data.train["x"].reshape(data.train["x"].shape[:2] + (1, 5))
    data.test["x"] = data.test["x"].reshape(data.test["x"].shape[:2] + (1, 5))
    data.input_shape = (1, 5)
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, encoder=encoder,
                               hidden=(16, 8), channels=(4, 6))
  return data, model


def _steps(model, data, tx, n, seed=3, state=None, **kwargs):
  fn = jax.jit(steps.make_train_step(
      model, tx, "fixed", sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train), 4, 16),
      weights=np.ones(len(data.taskset)), seed=seed, **kwargs))
  state = state or steps.init_train_state(model, tx, jax.random.key(0))
  history = [state]
  for _ in range(n):
    state, _ = fn(state, data.train)
    history.append(state)
  return history


def _first_steps(model, data, txs, seed):
  """The parameters after one step of each optimizer in ``txs`` from the same
  initial state (the state of ``_steps``: init key 0, the step's ``seed``):
  ``(params_0, [params_1 per optimizer])``. One compiled program: the states
  share every field but the optimizer state (one parameter of the program),
  so XLA's common-subexpression elimination computes the batch draw, the
  forward pass and the gradient once for all of them; each optimizer's
  update is its own. The same numbers as ``_steps(model, data, tx, 1, seed)``
  per optimizer (the multi-step path: test_frozen_parameters_... and
  test_gradual_unfreezing_unfreezes_...)."""
  sampler = sampling.make_sampler(
      data.taskset, sampling.task_probabilities("uniform", data.num_train), 4, 16)
  fns = [steps.make_train_step(model, tx, "fixed", sampler, weights=np.ones(len(data.taskset)),
                               seed=seed) for tx in txs]
  states = [steps.init_train_state(model, tx, jax.random.key(0)) for tx in txs]
  base = states[0]
  for s in states[1:]:  # the same initial parameters whatever the optimizer
    helpers.assert_trees_close(s.params, base.params, rtol=0, atol=0)

  @jax.jit
  def step(base, opt_states, train):
    return [fn(base._replace(opt_state=o), train)[0].params for fn, o in zip(fns, opt_states)]
  return base.params, step(base, [s.opt_state for s in states], data.train)


def _ruled(rules, name="adam", lr=1e-2, total_steps=100, **kwargs):
  return optim.make_ruled_optimizer(name, optim.parse_rules(rules), lr=lr,
                                    total_steps=total_steps, **kwargs)


def _named(tree):
  return dict(params_lib.flatten_with_names(tree))


def test_frozen_parameters_are_bitwise_unchanged_and_carry_no_state():
  data, model = _model()
  tx = _ruled("heads/:;.*:frozen")  # a linear probe
  hist = _steps(model, data, tx, 30)
  first, last = _named(hist[0].params), _named(hist[-1].params)
  for name in first:
    if name.startswith("shared/trunk/"):
      assert first[name].tobytes() == last[name].tobytes(), name
    else:
      assert not np.array_equal(first[name], last[name]), name
  # The frozen group (rule 1) holds no optimizer state at all.
  shared_state = hist[-1].opt_state["shared"].inner_states
  assert jax.tree.leaves(shared_state["rule1"]) == []
  head_state = jax.tree.leaves(hist[-1].opt_state["tasks"])
  assert head_state  # the trained heads keep their Adam moments


def test_unmatched_parameters_raise_listing_them():
  data, model = _model()
  tx = _ruled("trunk/layer_0/:lr_mult=0.1")
  with pytest.raises(ValueError, match=r"shared/trunk/layer_1/bias.*match no rule"):
    steps.init_train_state(model, tx, jax.random.key(0))


@pytest.mark.parametrize("spec, match", [
    ("heads/:lr=2", r"unknown setting\(s\) \['lr'\]"),
    ("heads/:lr_mult", "is not key=value"),
    ("(:lr_mult=1", "bad regex"),
    (".*:schedule=cyclic", "schedule 'cyclic' is not one of"),
])
def test_bad_rules_raise(spec, match):
  with pytest.raises(ValueError, match=match):
    optim.parse_rules(spec)


_SEED_11_MULTS = {"trunk/layer_0/": 0.25, "trunk/layer_1/": 3.0, ".*": 1.0}
_SEED_11_ADAMW = (1e-2, 0.1)  # lr, weight decay


def _seed_11_first_steps(model, data):
  """``_first_steps`` (seed 11) of the optimizers of the next two tests: SGD
  with test_realised_...'s multipliers, plain SGD(1) (the reference gradient),
  and AdamW with test_weight_decay_...'s decay multipliers: one program for
  both tests (a persistent-cache hit for the second on another worker)."""
  lr, wd = _SEED_11_ADAMW
  return _first_steps(model, data, [
      _ruled(";".join(f"{k}:lr_mult={v}" for k, v in _SEED_11_MULTS.items()), name="sgd",
             lr=0.1),
      optax.sgd(1.0),
      _ruled("trunk/layer_0/:wd_mult=0;.*:wd_mult=2", name="adamw", lr=lr, weight_decay=wd)],
      seed=11)


def test_realised_learning_rates_equal_the_multipliers():
  """SGD: each group's update is exactly -lr * lr_mult * gradient."""
  data, model = _model()
  mults = {"trunk/layer_0/": 0.25, "trunk/layer_1/": 3.0, ".*": 1.0}
  p0, (ruled, plain, _) = _seed_11_first_steps(model, data)
  assert mults == _SEED_11_MULTS
  # The reference gradient of the same batch, from the plain optimizer.
  grad = jax.tree.map(lambda a, b: a - b, p0, plain)
  got = jax.tree.map(lambda a, b: a - b, p0, ruled)
  for name, g in _named(grad).items():
    m = next(v for k, v in mults.items() if re.search(k, name))
    np.testing.assert_allclose(_named(got)[name], 0.1 * m * g, rtol=1e-4, atol=2e-7)  # float32 p - p_new


def test_layerwise_decay_factors_are_exact_per_layer():
  data, model = _model("cnn")
  groups = model.layer_groups
  assert [g for g, _ in groups] == ["conv_0", "conv_1", "layer_0", "layer_1", "heads"]
  rules = optim.layerwise_decay_rules(groups, optim.ULMFIT_DECAY)
  assert [r.lr_mult for r in rules] == [(1 / 2.6) ** k for k in (4, 3, 2, 1, 0)]
  tx = optim.make_ruled_optimizer("sgd", rules, lr=0.1, total_steps=10)
  # The ruled step and the plain reference step in one program (see _first_steps).
  p0, (ruled, plain) = _first_steps(model, data, [tx, optax.sgd(1.0)], seed=2)
  for name, g in _named(jax.tree.map(lambda a, b: a - b, p0, plain)).items():
    depth = next(i for i, (_, rx) in enumerate(groups) if re.search(rx, name))
    want = 0.1 * (1 / 2.6) ** (4 - depth) * g
    got = _named(p0)[name] - _named(ruled)[name]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-7)


def test_gradual_unfreezing_unfreezes_groups_from_the_top_with_fresh_adam_state():
  data, model = _model()
  groups = model.layer_groups
  assert [g for g, _ in groups] == ["layer_0", "layer_1", "heads"]
  every, lr = 3, 1e-2
  rules = optim.gradual_unfreezing_rules(groups, every)
  assert [r.unfreeze_at for r in rules] == [6, 3, 0]
  tx = optim.make_ruled_optimizer("adam", rules, lr=lr, total_steps=20)
  hist = _steps(model, data, tx, 9)
  named = [_named(h.params) for h in hist]
  for name in named[0]:
    group = next(i for i, (_, rx) in enumerate(groups) if re.search(rx, name))
    start = rules[group].unfreeze_at
    for t in range(9):  # step t + 1 moves the parameter iff t >= start
      moved = named[t + 1][name].tobytes() != named[t][name].tobytes()
      assert moved == (t >= start), (name, t, start)
    if start:  # Adam's first step from a fresh state: |update| = lr (|g| >> eps)
      first = np.abs(named[start + 1][name] - named[start][name])
      np.testing.assert_allclose(first[first > 0], lr, rtol=1e-3)


def test_slanted_triangular_matches_ulmfit_equation_3():
  total, cut_frac, ratio, lr = 200, 0.1, 32.0, 0.01
  f = schedules.make_schedule("slanted_triangular", lr, total, cut_frac=cut_frac, ratio=ratio)
  cut = int(np.floor(total * cut_frac))
  for t in (0, 5, 19, 20, 21, 100, 199):
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    np.testing.assert_allclose(float(f(t)), lr * (1 + p * (ratio - 1)) / ratio, rtol=1e-6)
  g = schedules.make_schedule("warmup_cosine", lr, total, warmup_steps=10, end_lr_factor=0.1)
  np.testing.assert_allclose([float(g(0)), float(g(10)), float(g(200))], [0, lr, 0.1 * lr],
                             rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(float(g(105)), 0.1 * lr + 0.9 * lr * 0.5, rtol=1e-5)


def test_load_params_leaves_exactly_the_dont_load_matches_fresh():
  data, model = _model()
  source = model.init(jax.random.key(1))
  fresh = model.init(jax.random.key(2))
  loaded, report = checkpoint.load_params(fresh, source, [r"heads/"])
  s, f, l = _named(source), _named(fresh), _named(loaded)
  for name in l:
    want = f[name] if "heads/" in name else s[name]
    np.testing.assert_array_equal(l[name], want)
  assert sorted(report["fresh_dont_load"]) == sorted(n for n in l if "heads/" in n)
  assert sorted(report["loaded"]) == sorted(n for n in l if "heads/" not in n)
  # A model with other head sizes: a clear error unless the heads are skipped.
  other = task_data.build_task_data("toy", *helpers.shared_input_data())
  small = multitask.make_model("multi_head", other.taskset.subset(["r", "c"]),
                               other.input_shape, hidden=(16, 8))
  target = small.init(jax.random.key(3))
  with pytest.raises(ValueError, match=r"shape mismatch for tasks/heads/.*checkpoint \(2,"):
    checkpoint.load_params(target, source)
  _, report = checkpoint.load_params(target, source, [r"heads/"])
  assert report["unused"] == ["tasks/heads/binary1/bias", "tasks/heads/binary1/kernel"]
  assert all("trunk" in n for n in report["loaded"])


def test_l2sp_penalty_and_gradient_match_float64():
  rng = np.random.default_rng(0)
  w = {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=4)}
  w0 = {"a": rng.normal(size=(3, 2)), "b": np.zeros(4)}
  mask = {"a": True, "b": False}
  alpha, beta = 0.3, 0.05
  pen = transfer.l2sp_penalty(mask, alpha, beta)
  f32 = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t)
  val, grad = jax.value_and_grad(pen)(f32(w), f32(w0))
  want = 0.5 * alpha * np.sum((w["a"] - w0["a"]) ** 2) + 0.5 * beta * np.sum(w["b"] ** 2)
  np.testing.assert_allclose(val, want, rtol=1e-5)
  np.testing.assert_allclose(grad["a"], alpha * (w["a"] - w0["a"]), rtol=1e-5)
  np.testing.assert_allclose(grad["b"], beta * w["b"], rtol=1e-5)


# ---------------------------------------------------------------------------
# End to end: pretrain, then fine-tune from the checkpoint only.
# ---------------------------------------------------------------------------


def _digits_config(tmp_path, classes, steps):
  from experiments.configs import transfer_digits  # pylint: disable=g-import-not-at-top
  c = transfer_digits.get_config("quick")
  del c["transfer"], c["experiment"]
  c.data.data_dir = str(tmp_path / "data")  # private: the test deletes the source data
  c.data.builder_config = f"c{classes}"
  c.total_steps = c.eval_steps = c.checkpoint_steps = c.log_steps = steps
  c.steps_per_call = steps
  c.plots = False  # a run's figures are tests/test_report.py's; about 1 s a run here
  return c


@pytest.mark.slow
def test_linear_probe_from_a_checkpoint_without_the_source_data(tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  pre = _digits_config(tmp_path, "01234", 100)
  train.train_and_evaluate(pre, str(tmp_path / "pre"))
  shutil.rmtree(tmp_path / "data" / "digits" / "c01234")  # the source data is gone
  c = transfer.apply_strategy(_digits_config(tmp_path, "56789", 60), "linear_probe",
                              source=str(tmp_path / "pre"))
  out = train.train_and_evaluate(c, str(tmp_path / "probe"))
  rep = out["init_from"]
  assert sorted(rep["fresh_dont_load"]) == ["tasks/heads/classification5/bias",
                                            "tasks/heads/classification5/kernel"]
  assert all(n.startswith("shared/trunk/") for n in rep["loaded"]) and len(rep["loaded"]) == 4
  assert out["tasks"]["digit"]["accuracy"] > 0.3  # chance 0.2: the probe learned
  before, _ = checkpoint.read_params(str(tmp_path / "pre"))
  after, _ = checkpoint.read_params(str(tmp_path / "probe"))
  for name, leaf in _named(before["shared"]).items():  # frozen trunk: bitwise equal
    assert np.asarray(leaf).tobytes() == np.asarray(_named(after["shared"])[name]).tobytes()
  # Three classes: the head is another path (classification3), reported fresh.
  c = _digits_config(tmp_path, "567", 20)
  c.init_from = str(tmp_path / "pre")
  rep = train.train_and_evaluate(c, str(tmp_path / "three"))["init_from"]
  assert rep["fresh_missing"] == ["tasks/heads/classification3/bias",
                                  "tasks/heads/classification3/kernel"]
  assert rep["unused"] == ["tasks/heads/classification5/bias",
                           "tasks/heads/classification5/kernel"]
  # A trunk of another width cannot be loaded: a clear error naming the paths.
  c.model.hidden = (32,)
  with pytest.raises(ValueError, match=r"shape mismatch for shared/trunk/layer_0/bias: "
                                       r"checkpoint \(64,\), model \(32,\)"):
    train.train_and_evaluate(c, str(tmp_path / "bad"))


@pytest.mark.slow
def test_transfer_digits_experiment_writes_results_per_strategy_and_shots(tmp_path):
  from experiments import transfer_digits as exp  # pylint: disable=g-import-not-at-top
  from experiments.configs import transfer_digits  # pylint: disable=g-import-not-at-top
  c = transfer_digits.get_config("quick")
  # An MLP body instead of the config's CNN: 13 train steps are compiled here
  # (pretraining, and per shot count CV x 2, scratch, the probe, LP-FT's
  # fine-tuning, L2-SP), each about a third cheaper without the convolution.
  # What is checked is the experiment's bookkeeping, recounted from the saved
  # parameters; the CNN's transfer path: test_linear_probe_from_a_checkpoint_...
  c.model.encoder = "mlp"
  c.plots = False  # each run's curves.png (not the experiment's figure, checked below)
  c.total_steps = c.eval_steps = c.checkpoint_steps = 100
  c.transfer.shots = (1, 0)
  c.transfer.strategies = ("scratch", "lp_ft", "l2sp")
  c.transfer.finetune_steps = 50
  c.transfer.probe_steps = 50
  c.transfer.l2sp_cv_folds, c.transfer.l2sp_cv_grid = 2, "l2sp_alpha=0,300"
  out = exp.run(c, str(tmp_path))
  assert set(out["results"]) == {"scratch", "lp_ft", "l2sp"}
  # Each result is the test accuracy of that run's final parameters, recounted
  # here: argmax of the logits on every digits 5-9 test image vs its label.
  for shots in (1, 0):
    fc = exp.finetune_config(c, shots)
    data = build.data_from_config(fc)
    model = build.model_from_config(fc, data.taskset, data.input_shape)
    test, (group,) = data.test, data.taskset.groups
    n = int(test["n"][0])
    x = np.asarray(test["x"][test["source"][0]][:n])
    labels = np.asarray(test["y"][group][0][:n])
    assert n > 100 and len(np.unique(labels)) == 5
    for strategy, by_shots in out["results"].items():
      assert set(by_shots) == {"1", "all"}
      run_dir = tmp_path / f"shots_{exp.shots_key(shots)}" / strategy
      params, step = checkpoint.read_params(
          str(run_dir / "finetune" if strategy == "lp_ft" else run_dir))
      assert step == c.transfer.finetune_steps
      logits = np.asarray(model.apply(params, x[None], jnp.zeros((1,), jnp.int32))[group][0])
      want = np.mean(np.argmax(logits, axis=-1) == labels)
      np.testing.assert_allclose(by_shots[exp.shots_key(shots)], want, rtol=1e-6,
                                 err_msg=f"{strategy}, shots {shots}")
  assert (tmp_path / "transfer_digits.png").stat().st_size > 0
  # LP-FT's second stage started from the probe's run, head included.
  ft = __import__("json").loads(
      (tmp_path / "shots_1" / "lp_ft" / "finetune" / "summary.json").read_text())
  assert ft["init_from"]["from"].endswith("probe") and ft["init_from"]["fresh_dont_load"] == []
  assert "tasks/heads/classification5/kernel" in ft["init_from"]["loaded"]
  # Decoupled L2-SP ran with the alpha of the lower cross-validation score (two
  # folds of the train images); the distances are the final bodies' from the
  # pretrained one.
  source, _ = checkpoint.read_params(str(tmp_path / "pretrain"))
  for shots in ("1", "all"):
    sel = out["l2sp_cv"][shots]
    assert [p["l2sp_alpha"] for p in sel["points"]] == [0, 300]
    best = min(sel["points"], key=lambda p: p["score"])
    assert sel["alpha"] == best["l2sp_alpha"] and sel["beta"] == 0.01
    cfg = __import__("json").loads(
        (tmp_path / f"shots_{shots}" / "l2sp" / "summary.json").read_text())["config"]
    assert (cfg["l2sp_alpha"], cfg["l2sp_beta"], cfg["l2sp_mode"]) == (
        sel["alpha"], 0.01, "decoupled")
    for strategy in ("lp_ft", "l2sp"):
      run_dir = tmp_path / f"shots_{shots}" / strategy
      final, _ = checkpoint.read_params(str(run_dir / "finetune" if strategy == "lp_ft"
                                            else run_dir))
      np.testing.assert_allclose(out["distance"][strategy][shots],
                                 transfer.body_distance(final, source), rtol=1e-12)
      assert out["distance"][strategy][shots] > 0


def test_shared_parameters_initialise_every_row_of_a_per_task_stack():
  data, model = _model()
  source = model.init(jax.random.key(1))  # multi_head: shared/trunk
  indep = multitask.make_model("independent", data.taskset, data.input_shape, hidden=(16, 8))
  target = indep.init(jax.random.key(2))  # tasks/trunk [T, ...]
  loaded, report = checkpoint.load_params(target, source, [r"heads/"])
  for name, leaf in _named(loaded["tasks"]["trunk"]).items():
    want = _named(source["shared"]["trunk"])[name]
    for row in range(len(data.taskset)):
      np.testing.assert_array_equal(leaf[row], want)
  assert sorted(report["broadcast"]) == sorted(
      "tasks/trunk/" + n for n in _named(source["shared"]["trunk"]))
  assert report["unused"] == []


def test_canvas_digits_place_the_same_images_on_a_multi_digits_canvas():
  from mtljax.data import generators  # pylint: disable=g-import-not-at-top
  plain = generators.make_digits("56789", 5, 0)
  canvas = generators.make_digits("56789", 5, 0, canvas=True)
  assert canvas["train"]["image"].shape[1:] == generators.CANVAS_SHAPE
  np.testing.assert_array_equal(plain["train"]["label"], canvas["train"]["label"])
  # Every canvas holds exactly its 8x8 source image somewhere.
  for img, src in zip(canvas["train"]["image"], plain["train"]["image"]):
    found = any(np.array_equal(img[r:r + 8, c:c + 8], src) and img.sum() == src.sum()
                for r in range(5) for c in range(9))
    assert found


@pytest.mark.slow
def test_transfer_sinusoids_records_a_curve_per_strategy_and_k(tmp_path):
  from experiments import transfer_sinusoids as exp  # pylint: disable=g-import-not-at-top
  from experiments.configs import transfer_sinusoids  # pylint: disable=g-import-not-at-top
  c = transfer_sinusoids.get_config("quick")
  c.data.builder_config = "t10_n50_m50_s0"
  c.total_steps = c.eval_steps = c.checkpoint_steps = c.log_steps = 200
  c.transfer.shots = (5,)
  c.transfer.target_tasks = 3
  c.transfer.strategies = ("scratch", "linear_probe", "lp_ft")
  c.transfer.record_steps, c.transfer.probe_steps = 6, 3
  c.plots = False  # each run's curves.png (not the experiment's figure, checked below)
  out = exp.run(c, str(tmp_path))
  curves = out["results"]["5"]
  assert set(curves) == {"scratch", "linear_probe", "lp_ft"}
  assert all(len(v) == 7 and np.all(np.isfinite(v)) for v in curves.values())
  # Fine-tuning strategies start from the same pretrained network (head re-initialised
  # the same way); LP-FT's first 3 steps are the linear probe's.
  assert curves["linear_probe"][0] == curves["lp_ft"][0]
  np.testing.assert_allclose(curves["linear_probe"][:4], curves["lp_ft"][:4], rtol=1e-6)
  assert (tmp_path / "transfer_sinusoids.png").stat().st_size > 0


def test_weight_decay_multiplier_per_group_matches_optax_adamw():
  """Group A: wd x0 (plain Adam); group B: wd x2 -- each equal to optax.adamw
  with that decay on the same gradients."""
  data, model = _model()
  lr, wd = 1e-2, 0.1
  assert _SEED_11_ADAMW == (lr, wd)
  # seed 11: the batch of test_realised_learning_rates_equal_the_multipliers;
  # the AdamW step ("trunk/layer_0/:wd_mult=0;.*:wd_mult=2") and the plain-SGD
  # reference step are in the program compiled there (_seed_11_first_steps).
  p0, (_, plain, adamw) = _seed_11_first_steps(model, data)
  grad = jax.tree.map(lambda a, b: a - b, p0, plain)
  # optax.adamw with each group's decay, applied to the whole tree at once (its
  # update is leaf by leaf: the same per-leaf numbers as one call per leaf, in
  # one compiled program per decay instead of an eager op per leaf shape).
  ref_updates = {}
  for decay in (0.0, 2 * wd):
    ref = optax.adamw(lr, weight_decay=decay)
    ref_updates[decay] = _named(jax.jit(lambda g, p, ref=ref: ref.update(g, ref.init(p), p)[0])(
        grad, p0))
  for name, p in _named(p0).items():
    decay = 0.0 if "trunk/layer_0/" in name else 2 * wd
    u = ref_updates[decay][name]
    np.testing.assert_allclose(_named(adamw)[name], p + u, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_partitioned_optimizer_state_resumes_bitwise(tmp_path):
  """A preempted run with parameter groups and gradual unfreezing (partition,
  masked and delayed states in the checkpoint) equals an uninterrupted one."""
  from experiments.configs import multi_digits  # pylint: disable=g-import-not-at-top
  c = multi_digits.get_config("quick")
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.total_steps, c.checkpoint_steps, c.eval_steps, c.log_steps = 200, 100, 200, 100
  c.optim.rules = "heads/:lr_mult=2"
  c.optim.unfreeze_every = 50
  c.plots = False  # a run's figures are tests/test_report.py's; about 1 s a run here

  def stop(step, meas):
    del meas
    if step >= 150:
      raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(c, str(tmp_path / "a"), callbacks=[stop])
  resumed = train.train_and_evaluate(c, str(tmp_path / "a"))
  straight = train.train_and_evaluate(c, str(tmp_path / "b"))
  assert resumed["resumed_from_step"] == 100
  assert resumed["tasks"] == straight["tasks"]


# ---------------------------------------------------------------------------
# Fine-tuning strategies through the config (issue 14): a saved source
# checkpoint, transfer.apply_strategy, build.build_run, and every step's update
# against a reference (float64 numpy from the definitions, teacher-forced: each
# step's reference starts from the run's own parameters at that step).
# ---------------------------------------------------------------------------


class _Finetune:
  """Toy data (4 tasks, 3 layer groups: layer_0, layer_1, heads), a base config
  (SGD, lr 0.1, every task every step, 16 examples per task), a source
  checkpoint and the reference gradient of any step's batch."""

  def __init__(self, root):
    from experiments.configs import common  # pylint: disable=g-import-not-at-top
    self.data = helpers.toy_data()
    c = common.base_config()
    c.data.name = "toy"
    c.model.hidden = (16, 8)
    c.sampling.examples_per_task = 16
    c.optim.name, c.optim.lr = "sgd", 0.1
    c.steps_per_call = c.log_steps = c.eval_steps = c.checkpoint_steps = 1
    c.total_steps = 10  # the schedules' T
    self.config = c
    self._runs = {}
    self.model = build.model_from_config(c, self.data.taskset, self.data.input_shape)
    # The source (a pretrained stand-in): another initialisation, every leaf
    # (biases too) moved off its initial value.
    rng = np.random.default_rng(11)
    self.source = jax.tree.map(
        lambda x: (np.asarray(x) + 0.1 * rng.normal(size=x.shape)).astype(np.float32),
        jax.device_get(self.model.init(jax.random.key(11))))
    self.source_dir = str(root / "source")
    manager = checkpoint.make_manager(self.source_dir)
    checkpoint.save(manager, 5, {"step": jnp.asarray(5, jnp.int32), "params": self.source})
    manager.close()
    # The parameters a run starts from without init_from (the fresh ones).
    self.fresh = jax.device_get(build.build_run(
        transfer.apply_strategy(c, "scratch", source=""), self.data).state.params)
    self.num_tasks = len(self.data.taskset)
    self.probs = sampling.task_probabilities("uniform", self.data.num_train)
    self.ids = helpers.step_task_ids(self.data, self.probs, seed=c.seed, step=0,
                                     k=self.num_tasks)
    model, ids = self.model, self.ids

    @jax.jit
    def grad(params, x, ys):  # sum_k L_k, each slot's loss on its own: K jax.grad terms
      return jax.grad(lambda p: sum(helpers.slot_loss(model, p, x, ys, ids, s, False)
                                    for s in range(len(ids))))(params)
    self._grad = grad
    self.grad(self.fresh, 0)  # compiled here, not in the first test using it

  def grad(self, params, step):
    """``{name: float64 gradient}`` of step ``step``'s batch (numpy indexing) at ``params``."""
    ids, x, ys, _ = helpers.step_batch(self.data, self.probs, seed=self.config.seed,
                                       step=step, k=self.num_tasks, b=16)
    np.testing.assert_array_equal(ids, self.ids)  # every task, in the same slots
    g = self._grad(params, jnp.asarray(x), {k: jnp.asarray(v) for k, v in ys.items()})
    return {n: np.asarray(v, np.float64) for n, v in _named(g).items()}

  def run(self, config, n):
    """``(run, [state_0, ..., state_n], [measurements_1, ...])``. A config run
    before for as many steps (another test's identical run) is not run again:
    the same result, read only by the tests."""
    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), n)
    if key not in self._runs:
      self._runs[key] = self._run(config, n)
    return self._runs[key]

  def _run(self, config, n):
    run = build.build_run(config, self.data)
    fn = jax.jit(run.train_fn)
    hist, meas = [run.state], []
    for _ in range(n):
      state, m = fn(hist[-1], self.data.train)
      hist.append(state)
      meas.append(m)
    return run, hist, meas


@pytest.fixture(scope="module")
def ft(tmp_path_factory):
  return _Finetune(tmp_path_factory.mktemp("finetune"))


def _copy(config):
  return type(config)(config.to_dict())


def _depth(groups, name):
  """0-based index of the one layer group ``name`` is in (input side first)."""
  (depth,) = [i for i, (_, rx) in enumerate(groups) if re.search(rx, name)]
  return depth


def _check_updates(ft, hist, want, rtol=1e-4, atol=1e-6):
  """Step t's update of every parameter equals ``want(t, name, g)`` (g: the
  reference gradient at the run's parameters of step t); None: bitwise unchanged."""
  for t in range(len(hist) - 1):
    grads = ft.grad(hist[t].params, t)
    before, after = _named(hist[t].params), _named(hist[t + 1].params)
    for name, g in grads.items():
      expected = want(t, name, g)
      if expected is None:
        assert np.asarray(before[name]).tobytes() == np.asarray(after[name]).tobytes(), \
            (name, t)
      else:
        got = np.asarray(after[name], np.float64) - np.asarray(before[name], np.float64)
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol,
                                   err_msg=f"{name}, step {t}")


def _check_loaded(ft, params, head_loaded):
  """The trunk equals the source; the head the source's or a fresh one's."""
  source, fresh = _named(ft.source), _named(ft.fresh)
  for name, leaf in _named(params).items():
    from_source = head_loaded or "heads/" not in name
    want = source[name] if from_source else fresh[name]
    np.testing.assert_array_equal(leaf, want, err_msg=name)
    if not from_source:
      assert not np.array_equal(leaf, source[name]), name


# The fast tier runs the head x3 variants (the strategy's rules plus the head rule).
@pytest.mark.parametrize("strategy, head_lr_mult", [
    pytest.param("full_ft", 1.0, marks=pytest.mark.slow), ("full_ft", 3.0),
    pytest.param("layerwise_decay", 1.0, marks=pytest.mark.slow), ("layerwise_decay", 3.0),
    ("head_kept", 1.0)])
def test_strategy_updates_are_lr_times_the_strategys_multiplier(ft, strategy, head_lr_mult):
  """SGD, 2 steps: each parameter's update is -lr * m * gradient, m by the
  strategy's definition over model.layer_groups (layer-wise: decay^(L - l),
  l = 1 at the input; the head rule: head_lr_mult), and the run starts from the
  source (with a fresh head unless head_kept)."""
  c = transfer.apply_strategy(ft.config, strategy, source=ft.source_dir,
                              head_lr_mult=head_lr_mult)
  run, hist, _ = ft.run(c, 2)
  groups = run.model.layer_groups
  assert [g for g, _ in groups] == ["layer_0", "layer_1", "heads"]
  _check_loaded(ft, hist[0].params, head_loaded=strategy == "head_kept")
  fresh_head = sorted(n for n in _named(ft.source) if "heads/" in n)
  assert sorted(run.init_report["fresh_dont_load"]) == (
      [] if strategy == "head_kept" else fresh_head)
  decay = 1 / 2.6 if strategy == "layerwise_decay" else 1.0

  def want(t, name, g):
    del t
    depth = _depth(groups, name)
    m = head_lr_mult if "heads/" in name else decay ** (len(groups) - 1 - depth)
    return -0.1 * m * g
  _check_updates(ft, hist, want)


def _adam(lr, b1=0.9, b2=0.999, eps=1e-8):
  """Per-parameter Adam in float64, its state created at a parameter's first update."""
  state = {}

  def step(name, g):
    m, v, k = state.get(name, (0.0, 0.0, 0))
    m, v, k = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g, k + 1
    state[name] = (m, v, k)
    return -lr * (m / (1 - b1 ** k)) / (np.sqrt(v / (1 - b2 ** k)) + eps)
  return step


def test_gradual_unfreezing_strategy_unfreezes_from_the_top_with_fresh_adam_state(ft):
  """unfreeze_every=2: heads train from step 0, layer_1 from 2, layer_0 from 4;
  a group is bitwise unchanged before and follows Adam started fresh at its
  unfreezing step after."""
  c = transfer.apply_strategy(ft.config, "gradual_unfreezing", source=ft.source_dir,
                              unfreeze_every=2)
  c.optim.name, c.optim.lr = "adam", 1e-2
  c.optim.eps = 1e-4  # float32 round-off in a tiny gradient cannot swing g / sqrt(v)
  run, hist, _ = ft.run(c, 6)
  _check_loaded(ft, hist[0].params, head_loaded=False)
  groups, adam = run.model.layer_groups, _adam(1e-2, eps=1e-4)

  def want(t, name, g):
    start = 2 * (len(groups) - 1 - _depth(groups, name))
    return adam(name, g) if t >= start else None
  _check_updates(ft, hist, want, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("depth", [1, pytest.param(2, marks=pytest.mark.slow)])  # 1: fast
def test_frozen_depth_freezes_the_groups_nearest_the_input(ft, depth):
  """config.optim.frozen_depth=D (Adam, 3 steps): the first D layer groups are
  bitwise unchanged and hold no optimizer state; the rest follow Adam."""
  c = transfer.apply_strategy(ft.config, "full_ft", source=ft.source_dir)
  c.optim.name, c.optim.lr, c.optim.eps, c.optim.frozen_depth = "adam", 1e-2, 1e-4, depth
  run, hist, _ = ft.run(c, 3)
  groups, adam = run.model.layer_groups, _adam(1e-2, eps=1e-4)
  frozen = {n for n in _named(ft.source) if _depth(groups, n) < depth}
  assert frozen and len(frozen) == 2 * depth  # kernel and bias per frozen layer
  _check_updates(ft, hist, lambda t, n, g: None if n in frozen else adam(n, g),
                 rtol=1e-3, atol=1e-6)
  # Adam's state: two moments per trained element and nothing for frozen ones.
  moments = sum(x.size for x in jax.tree.leaves(hist[-1].opt_state)
                if jnp.issubdtype(x.dtype, jnp.floating))
  trained = sum(np.size(v) for n, v in _named(ft.source).items() if n not in frozen)
  assert moments == 2 * trained


def test_per_rule_schedules_give_the_schedule_formulas_per_step(ft):
  """SGD over the whole schedule (T=10 steps): heads warmup_cosine x2, layer_0
  slanted_triangular, layer_1 the config's constant; update_t = -lr_t g_t with
  lr_t written out from the formulas in mtljax/schedules.py."""
  c = transfer.apply_strategy(ft.config, "full_ft", source=ft.source_dir)
  c.optim.rules = ("heads/:schedule=warmup_cosine,lr_mult=2;"
                   "layer_0/:schedule=slanted_triangular;.*:")
  c.optim.warmup_steps, c.optim.end_lr_factor = 3, 0.1
  c.optim.stlr_cut_frac, c.optim.stlr_ratio = 0.2, 8.0
  total, lr = 10, 0.1
  assert c.total_steps == total
  _, hist, _ = ft.run(c, total)

  def warmup_cosine(t, peak, warmup=3, end=0.1):
    if t < warmup:
      return peak * t / warmup
    return end * peak + (1 - end) * peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) /
                                                               (total - warmup)))

  def stlr(t, peak, cut_frac=0.2, ratio=8.0):
    cut = int(np.floor(total * cut_frac))
    p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
    return peak * (1 + p * (ratio - 1)) / ratio

  def want(t, name, g):
    if "heads/" in name:
      rate = warmup_cosine(t, 2 * lr)
    elif "layer_0/" in name:
      rate = stlr(t, lr)
    else:
      rate = lr
    return None if rate == 0 else -rate * g  # step 0 of the warm-up: no update at all
  _check_updates(ft, hist, want)
  # The formulas' own values at a few steps (the schedule is not constant).
  np.testing.assert_allclose([warmup_cosine(t, 1.0) for t in (0, 3, 10)], [0, 1, 0.1])
  np.testing.assert_allclose([stlr(t, 1.0) for t in (0, 2, 10)], [1 / 8, 1, 1 / 8])


def test_gradual_unfreezing_keeps_layerwise_decay_multipliers(ft):
  """layerwise_decay=0.5 with unfreeze_every=2 (SGD, 6 steps): group l is bitwise
  unchanged before step 2 (L - l) and moves by -lr 0.5^(L - l) g from then on."""
  base = _copy(ft.config)
  base.optim.layerwise_decay = 0.5
  c = transfer.apply_strategy(base, "gradual_unfreezing", source=ft.source_dir,
                              unfreeze_every=2)
  assert c.optim.layerwise_decay == 0.5 and c.optim.unfreeze_every == 2
  run, hist, _ = ft.run(c, 6)
  groups = run.model.layer_groups

  def want(t, name, g):
    above = len(groups) - 1 - _depth(groups, name)  # L - l
    return -0.1 * 0.5 ** above * g if t >= 2 * above else None
  _check_updates(ft, hist, want)


def test_sgd_momentum_follows_the_heavy_ball_recursion(ft):
  """momentum 0.9 with a head rule (x3), 4 SGD steps: v_t = 0.9 v_{t-1} + g_t,
  update_t = -lr m v_t (m = 3 on the head, 1 elsewhere; float64 numpy, v_0 = 0)."""
  c = transfer.apply_strategy(ft.config, "full_ft", source=ft.source_dir, head_lr_mult=3.0)
  c.optim.momentum = 0.9
  _, hist, _ = ft.run(c, 4)
  velocity = {}

  def want(t, name, g):
    del t
    velocity[name] = 0.9 * velocity.get(name, 0.0) + g
    return -0.1 * (3.0 if "heads/" in name else 1.0) * velocity[name]
  _check_updates(ft, hist, want)


def test_l2sp_adds_alpha_pull_to_loaded_and_beta_decay_to_fresh_parameters(ft):
  """L2-SP (SGD, 3 steps, alpha 0.5, beta 0.2; the head and layer_1's bias
  fresh): every step's update is -lr (g + alpha (w - w0)) on loaded leaves and
  -lr (g + beta w) on fresh ones, g the loss gradient alone (the update of the
  run without L2-SP: test_strategy_updates_are_lr_times_the_strategys_multiplier);
  the logged penalty is its float64 value; the anchor w0 is the loaded
  parameters; loaded_mask marks exactly the loaded leaves."""
  base = _copy(ft.config)
  base.l2sp_alpha, base.l2sp_beta, base.l2sp_mode = 0.5, 0.2, "coupled"
  c = transfer.apply_strategy(base, "l2sp", source=ft.source_dir)
  c.init_dont_load = r"heads/;trunk/layer_1/bias"
  alpha, beta, lr = c.l2sp_alpha, c.l2sp_beta, c.optim.lr
  assert (alpha, beta) == (0.5, 0.2)
  run, hist, meas = ft.run(c, 3)
  fresh_names = {n for n in _named(ft.source) if "heads/" in n or n.endswith("layer_1/bias")}
  assert len(fresh_names) == 7  # 3 heads (kernel, bias) and one bias
  mask = _named(checkpoint.loaded_mask(hist[0].params, run.init_report))
  assert all(type(m) is bool for m in mask.values())  # pylint: disable=unidiomatic-typecheck
  assert {n for n, m in mask.items() if not m} == fresh_names
  p0, source, fresh = _named(hist[0].params), _named(ft.source), _named(ft.fresh)
  for name, loaded in mask.items():  # the mask's True leaves are the source's values
    np.testing.assert_array_equal(p0[name], source[name] if loaded else fresh[name])
  anchor = {n: np.asarray(v, np.float64) for n, v in _named(hist[0].anchor).items()}
  for name in p0:
    np.testing.assert_array_equal(anchor[name], p0[name])
    np.testing.assert_array_equal(_named(hist[-1].anchor)[name], p0[name])
  w_moved = []

  def want(t, name, g):
    w = np.asarray(_named(hist[t].params)[name], np.float64)
    if mask[name]:
      w_moved.append(np.any(w != anchor[name]))
      return -lr * (g + alpha * (w - anchor[name]))
    return -lr * (g + beta * w)
  _check_updates(ft, hist, want, atol=2e-7)
  assert any(w_moved)  # the pull was not 0 throughout (it is at step 0: w = w0)
  for t in range(3):
    w = {n: np.asarray(v, np.float64) for n, v in _named(hist[t].params).items()}
    penalty = sum(0.5 * alpha * np.sum((w[n] - anchor[n]) ** 2) if mask[n]
                  else 0.5 * beta * np.sum(w[n] ** 2) for n in w)
    np.testing.assert_allclose(float(meas[t]["penalty"]), penalty, rtol=1e-5)


def test_l2sp_leaves_the_objectives_own_parameters_alone(ft):
  """With uncertainty weighting, ``tasks/uncertainty/log_var`` is the
  objective's, not the model's: the L2-SP penalty (logged each step) is the
  formula over the model's parameters only, although log sigma^2 has moved."""
  base = _copy(ft.config)
  base.l2sp_alpha, base.l2sp_beta, base.l2sp_mode = 0.5, 0.2, "coupled"
  base.objective.method = "uncertainty"
  c = transfer.apply_strategy(base, "l2sp", source=ft.source_dir)
  run, hist, meas = ft.run(c, 2)
  mask = _named(checkpoint.loaded_mask(hist[0].params, run.init_report))
  anchor = {n: np.asarray(v, np.float64) for n, v in _named(hist[0].anchor).items()}
  w = {n: np.asarray(v, np.float64) for n, v in _named(hist[1].params).items()}
  assert np.any(w["tasks/uncertainty/log_var"] != 0.0)  # moved in step 1
  penalty = sum(0.5 * 0.5 * np.sum((w[n] - anchor[n]) ** 2) if mask[n]
                else 0.5 * 0.2 * np.sum(w[n] ** 2)
                for n in w if not n.startswith("tasks/uncertainty/"))
  np.testing.assert_allclose(float(meas[1]["penalty"]), penalty, rtol=1e-5)


@pytest.mark.parametrize("head_lr_mult", [1.0, 3.0])
def test_decoupled_l2sp_is_adams_update_minus_lr_times_the_pull(ft, head_lr_mult):
  """Decoupled L2-SP (Adam, 3 steps, alpha 0.5, beta 0.2; the head and
  layer_1's bias fresh), float64 by hand: Adam's update of the loss gradient
  alone (m, v from g; bias-corrected) minus lr m (alpha (w - w0)) on loaded
  leaves and lr m beta w on fresh ones, m the head's lr multiplier (1 on the
  body); the penalty is not in the loss (no anchor in the state, none logged);
  w0 is the loaded values."""
  base = _copy(ft.config)
  base.optim.name = "adam"
  base.l2sp_alpha, base.l2sp_beta, base.l2sp_mode = 0.5, 0.2, "decoupled"
  c = transfer.apply_strategy(base, "l2sp", source=ft.source_dir, head_lr_mult=head_lr_mult)
  c.init_dont_load = r"heads/;trunk/layer_1/bias"
  lr, (b1, b2, eps) = c.optim.lr, (c.optim.b1, c.optim.b2, c.optim.eps)
  run, hist, meas = ft.run(c, 3)
  assert hist[0].anchor is None and "penalty" not in meas[0]
  mask = _named(checkpoint.loaded_mask(hist[0].params, run.init_report))
  assert sum(not m for m in mask.values()) == 7
  w0 = {n: np.asarray(v, np.float64) for n, v in _named(hist[0].params).items()}
  source = _named(ft.source)
  for name, loaded in mask.items():
    if loaded:
      np.testing.assert_array_equal(w0[name], source[name])
  moments = {}

  def want(t, name, g):
    m, v = moments.get(name, (0.0, 0.0))
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
    moments[name] = (m, v)
    adam = (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    w = np.asarray(_named(hist[t].params)[name], np.float64)
    pull = 0.5 * (w - w0[name]) if mask[name] else 0.2 * w
    rate = lr * (head_lr_mult if "heads/" in name else 1.0)
    return -rate * (adam + pull)
  pulls = []

  def want_and_record(t, name, g):
    out = want(t, name, g)
    w = np.asarray(_named(hist[t].params)[name], np.float64)
    pulls.append(np.max(np.abs(lr * (0.5 * (w - w0[name]) if mask[name] else 0.2 * w))))
    return out
  _check_updates(ft, hist, want_and_record, rtol=2e-4, atol=1e-6)
  assert max(pulls) > 1e-3  # far above the tolerance: the check sees the pull


def test_decoupled_l2sp_rejects_parameters_missing_from_the_checkpoint(ft, tmp_path):
  """A parameter neither loaded nor matched by init_dont_load would be pulled
  toward its random initial value: a clear error instead."""
  trunk_only = {"shared": ft.source["shared"], "tasks": {}}
  src = str(tmp_path / "trunk_only")
  manager = checkpoint.make_manager(src)
  checkpoint.save(manager, 1, {"step": jnp.asarray(1, jnp.int32), "params": trunk_only})
  manager.close()
  base = _copy(ft.config)
  base.l2sp_alpha, base.l2sp_beta = 0.5, 0.2
  c = transfer.apply_strategy(base, "l2sp", source=src)
  c.init_dont_load = ""
  with pytest.raises(ValueError, match=r"not in the checkpoint: add them to config.init_dont_load"):
    build.build_run(c, ft.data)
  c.l2sp_mode = "sgd"
  with pytest.raises(ValueError, match="l2sp_mode"):
    build.validate_config(c)


def test_body_distance_is_the_float64_norm_over_the_body():
  """Heads are left out; a per-task stack is measured against the source's
  shared copy, every row; parameters the source lacks are left out."""
  rng = np.random.default_rng(2)
  src = {"shared": {"trunk": {"k": rng.normal(size=(3, 2))}},
         "tasks": {"heads": {"k": rng.normal(size=(2, 4))}}}
  params = {"tasks": {"trunk": {"k": rng.normal(size=(5, 3, 2))},
                      "heads": {"k": rng.normal(size=(2, 4))},
                      "extra": {"b": rng.normal(size=3)}}}
  want = np.sqrt(np.sum((params["tasks"]["trunk"]["k"] - src["shared"]["trunk"]["k"]) ** 2))
  assert transfer.body_distance(params, src) == pytest.approx(want, rel=1e-12)
  same = {"shared": {"trunk": {"k": src["shared"]["trunk"]["k"] + 0.5}}}
  assert transfer.body_distance(same, src) == pytest.approx(np.sqrt(6 * 0.25), rel=1e-12)


def test_l2sp_strategies_and_cv_config():
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  base = common.base_config()
  c = transfer.apply_strategy(base, "l2sp", source="/src")
  assert (c.l2sp_alpha, c.l2sp_beta, c.l2sp_mode) == (0.01, 0.01, "decoupled")
  c = transfer.apply_strategy(base, "l2sp_coupled", source="/src")
  assert (c.l2sp_alpha, c.l2sp_beta, c.l2sp_mode) == (0.01, 0.01, "coupled")
  base.l2sp_alpha = 3.0  # a set value is kept, beta included (0 stays 0)
  c = transfer.apply_strategy(base, "l2sp", source="/src")
  assert (c.l2sp_alpha, c.l2sp_beta) == (3.0, 0.0)
  cvc = transfer.l2sp_cv_config(c, folds=3, grid="l2sp_alpha=0,1;l2sp_beta=0", metric="mse")
  assert (cvc.cv.folds, cvc.cv.grid, cvc.cv.metric, tuple(cvc.cv.steps)) == (
      3, "l2sp_alpha=0,1;l2sp_beta=0", "mse", (c.total_steps,))
  with pytest.raises(ValueError, match="folds >= 2"):
    transfer.l2sp_cv_config(c, folds=1, grid="l2sp_alpha=0,1", metric="mse")
  with pytest.raises(ValueError, match="must set l2sp_alpha and/or l2sp_beta only"):
    transfer.l2sp_cv_config(c, folds=3, grid="optim.lr=0.1,1", metric="mse")


def test_decoupled_and_coupled_l2sp_coincide_under_plain_sgd(ft):
  """Without momentum SGD's update is -lr (g + penalty gradient) either way:
  the decoupled form is the paper's update there (3 steps, alpha 0.5, beta 0.2)."""
  base = _copy(ft.config)
  base.l2sp_alpha, base.l2sp_beta = 0.5, 0.2
  runs = {}
  for mode in ("coupled", "decoupled"):
    base.l2sp_mode = mode
    c = transfer.apply_strategy(base, "l2sp", source=ft.source_dir)
    # The head and layer_1's bias fresh (beta's decay on them, alpha's pull on
    # the rest): the coupled run is then test_l2sp_adds_alpha_pull_...'s own,
    # shared with it (one compiled step, one run).
    c.init_dont_load = r"heads/;trunk/layer_1/bias"
    runs[mode] = ft.run(c, 3)[1]
  for t in range(1, 4):
    got, want = _named(runs["decoupled"][t].params), _named(runs["coupled"][t].params)
    for name in want:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
  moved = _named(runs["decoupled"][3].params)
  assert any(np.any(moved[n] != v) for n, v in _named(runs["decoupled"][0].params).items())
