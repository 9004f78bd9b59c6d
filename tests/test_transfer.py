"""Transfer learning: optimizer rules, schedules, freezing, loading, L2-SP."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mtljax import checkpoint
from mtljax import optim
from mtljax import params as params_lib
from mtljax import schedules
from mtljax import steps
from mtljax import train
from mtljax import transfer
from mtljax.data import loading
from mtljax.data import sampling
from mtljax.models import multitask

import helpers


def _model(encoder="mlp"):
  data = loading.build_task_data("toy", *helpers.shared_input_data())
  if encoder == "cnn":  # 5 inputs as a 1 x 5 image
    data.train["x"] = data.train["x"].reshape(data.train["x"].shape[:2] + (1, 5))
    data.test["x"] = data.test["x"].reshape(data.test["x"].shape[:2] + (1, 5))
    data.input_shape = (1, 5)
  model = multitask.make_model("multi_head", data.taskset, data.input_shape, encoder=encoder,
                               hidden=(16, 8), channels=(4, 6))
  return data, model


def _steps(model, data, tx, n, seed=3, state=None, **kwargs):
  fn = jax.jit(steps.make_train_step(
      model, tx, task_probs=sampling.task_probabilities("uniform", data.num_train),
      weights=np.ones(len(data.taskset)), tasks_per_step=4, examples_per_task=16, seed=seed,
      **kwargs))
  state = state or steps.init_train_state(model, tx, jax.random.key(0))
  history = [state]
  for _ in range(n):
    state, _ = fn(state, data.train)
    history.append(state)
  return history


def _ruled(rules, name="adam", lr=1e-2, total_steps=100, **kwargs):
  return optim.make_ruled_optimizer(name, optim.parse_rules(rules), lr=lr,
                                    total_steps=total_steps, **kwargs)


def _named(tree):
  return dict(params_lib.flatten_with_names(tree))


def test_frozen_parameters_are_bitwise_unchanged_and_carry_no_state():
  data, model = _model()
  tx = _ruled("heads/:;.*:frozen")  # a linear probe
  hist = _steps(model, data, tx, 30)
  first, last = _named(hist[0]["params"]), _named(hist[-1]["params"])
  for name in first:
    if name.startswith("shared/trunk/"):
      assert first[name].tobytes() == last[name].tobytes(), name
    else:
      assert not np.array_equal(first[name], last[name]), name
  # The frozen group (rule 1) holds no optimizer state at all.
  shared_state = hist[-1]["opt_state"]["shared"].inner_states
  assert jax.tree.leaves(shared_state["rule1"]) == []
  head_state = jax.tree.leaves(hist[-1]["opt_state"]["tasks"])
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


def test_realised_learning_rates_equal_the_multipliers():
  """SGD: each group's update is exactly -lr * lr_mult * gradient."""
  data, model = _model()
  mults = {"trunk/layer_0/": 0.25, "trunk/layer_1/": 3.0, ".*": 1.0}
  tx = _ruled(";".join(f"{k}:lr_mult={v}" for k, v in mults.items()), name="sgd", lr=0.1)
  hist = _steps(model, data, tx, 1, seed=11)
  p0 = hist[0]["params"]
  # The reference gradient of the same batch, from the plain optimizer.
  plain = _steps(model, data, optax.sgd(1.0), 1, seed=11)
  grad = jax.tree.map(lambda a, b: a - b, p0, plain[1]["params"])
  got = jax.tree.map(lambda a, b: a - b, p0, hist[1]["params"])
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
  hist = _steps(model, data, tx, 1, seed=2)
  plain = _steps(model, data, optax.sgd(1.0), 1, seed=2)
  p0 = hist[0]["params"]
  for name, g in _named(jax.tree.map(lambda a, b: a - b, p0, plain[1]["params"])).items():
    depth = next(i for i, (_, rx) in enumerate(groups) if re.search(rx, name))
    want = 0.1 * (1 / 2.6) ** (4 - depth) * g
    got = _named(p0)[name] - _named(hist[1]["params"])[name]
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
  named = [_named(h["params"]) for h in hist]
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
  other = loading.build_task_data("toy", *helpers.shared_input_data())
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
  c.total_steps = c.eval_steps = c.checkpoint_steps = 100
  c.transfer.shots = (1, 0)
  c.transfer.strategies = ("scratch", "lp_ft", "l2sp")
  c.transfer.finetune_steps = 50
  c.transfer.probe_steps = 50
  out = exp.run(c, str(tmp_path))
  assert set(out["results"]) == {"scratch", "lp_ft", "l2sp"}
  for by_shots in out["results"].values():
    assert set(by_shots) == {"1", "all"} and all(0 <= a <= 1 for a in by_shots.values())
  assert (tmp_path / "transfer_digits.png").stat().st_size > 0
  # LP-FT's second stage started from the probe's run, head included.
  ft = __import__("json").loads(
      (tmp_path / "shots_1" / "lp_ft" / "finetune" / "summary.json").read_text())
  assert ft["init_from"]["from"].endswith("probe") and ft["init_from"]["fresh_dont_load"] == []
  assert "tasks/heads/classification5/kernel" in ft["init_from"]["loaded"]
  # L2-SP logged its penalty.
  last = (tmp_path / "shots_1" / "l2sp" / "metrics.jsonl").read_text().splitlines()[-1]
  assert __import__("json").loads(last)["train/penalty"] > 0


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
  tx = _ruled("trunk/layer_0/:wd_mult=0;.*:wd_mult=2", name="adamw", lr=lr,
              weight_decay=wd)
  hist = _steps(model, data, tx, 1, seed=4)
  plain = _steps(model, data, optax.sgd(1.0), 1, seed=4)
  p0 = hist[0]["params"]
  grad = _named(jax.tree.map(lambda a, b: a - b, p0, plain[1]["params"]))
  for name, p in _named(p0).items():
    decay = 0.0 if "trunk/layer_0/" in name else 2 * wd
    ref = optax.adamw(lr, weight_decay=decay)
    u, _ = ref.update(grad[name], ref.init(p), p)
    np.testing.assert_allclose(_named(hist[1]["params"])[name], p + u, rtol=1e-5, atol=1e-6)


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
