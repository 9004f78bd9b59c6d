"""docs/DESIGN.md's "How to add" examples run as written, and do what the text says.

The ```python blocks are executed in order in one scope (as the page says);
then the objects they built are checked against independent computations:
the data layout against the arrays by hand (normalised regression labels, the
label rows per group), the TFDS-registered data set against the in-memory one,
the architecture's ``decode(encode(x))`` against ``apply`` and a float64
re-computation, its layer groups against its parameters, its heads'
initialisation against a subset model's, the scale-invariant objective's value
and weights against ``sum log L`` and ``1 / L`` of the step's own per-task
losses, the unit-norm weights against ``1 / ||g_k||`` in float64 on gradients
whose norms differ 5000-fold, and the trained models against chance.
"""

import io
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import gradients
from mtljax import optim
from mtljax import params as params_lib
from mtljax import steps
from mtljax.data import builders
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.models import multitask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DESIGN = os.path.join(ROOT, "docs", "DESIGN.md")


def _blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", open(DESIGN).read(), re.S)


def test_design_names_no_file_outside_the_repository():
  text = open(DESIGN).read()
  assert "../shared" not in text
  for link in re.findall(r"\]\(([^)#]+)\)", text):
    assert os.path.exists(os.path.join(ROOT, "docs", link)), link


def _check_registered_method():
  """While the example's gradient method is registered: it is read wherever a
  method name is (the objectives, their hyper-parameters, the config, --list,
  the toy, the public direction)."""
  from experiments import main  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from mtljax import objectives, toy  # pylint: disable=g-import-not-at-top
  assert "unit_norm" in objectives.methods() and "unit_norm" in toy.toy_methods()
  assert objectives.hyperparameters("unit_norm") == {"eps": 1e-12}
  assert common.base_config().objective.unit_norm.eps == 1e-12
  listed = io.StringIO()
  main.print_catalog(listed)
  assert "unit_norm    eps=1e-12" in listed.getvalue()
  assert objectives.make_objective("unit_norm", 3, eps=1e-3).hparams["eps"] == 1e-3
  g = np.array([[3.0, 4.0], [0.0, 2.0]], np.float32)
  d, _, _ = gradients.direction("unit_norm", jnp.asarray(g))
  np.testing.assert_allclose(d, [0.6, 1.8], rtol=1e-6)


def _check_registered_architecture(scope):
  """While the example's architecture is registered: it is read wherever an
  architecture name is (the names, its hyper-parameters, the config, --list,
  make_model's keywords and checks, the config's path to a model)."""
  from experiments import main  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  from mtljax import build  # pylint: disable=g-import-not-at-top
  data = scope["data"]
  assert "tanh_multi_head" in multitask.archs()
  assert multitask.hyperparameters("tanh_multi_head") == {"width": 16}
  config = common.base_config()
  assert config.model.tanh_multi_head.width == 16
  listed = io.StringIO()
  main.print_catalog(listed)
  assert "\n  tanh_multi_head width=16\n" in listed.getvalue()
  config.model.arch, config.model.tanh_multi_head.width = "tanh_multi_head", 8
  model = build.model_from_config(config, data.taskset, data.input_shape)
  assert model.init(jax.random.key(0))["shared"]["trunk"]["kernel"].shape == (4, 8)
  with pytest.raises(ValueError, match=r"^config.model: tanh_multi_head.width must be an "
                                       r"integer >= 1, got 0."):
    config.model.tanh_multi_head.width = 0
    build.model_from_config(config, data.taskset, data.input_shape)
  with pytest.raises(ValueError, match=r"^tanh_multi_head: unknown hyper-parameter\(s\) "
                                       r"\['depth'\]; it takes \['width'\]"):
    multitask.make_model("tanh_multi_head", data.taskset, data.input_shape, depth=2)


def _run_examples():
  blocks = _blocks()
  assert len(blocks) == 4, "task (arrays, TFDS), architecture, objective"
  registries = (builders.BUNDLED, specs.BUNDLED_SPECS, gradients.REGISTRY, multitask.REGISTRY)
  saved = [dict(r) for r in registries]
  out = {}
  try:
    for i, code in enumerate(blocks):
      exec(compile(code, f"DESIGN.md[python block {i}]", "exec"), out)  # pylint: disable=exec-used
    _check_registered_method()
    _check_registered_architecture(out)
    return out
  finally:  # the examples register a data set, an architecture and a gradient
    # method: later tests see the shipped ones only
    for r, s in zip(registries, saved):
      r.clear()
      r.update(s)


def _check_task_example(scope):
  data, arrays = scope["data"], scope["arrays"]
  assert data.taskset.names == ("price", "up", "kind")
  price = arrays["train"]["price"].astype(np.float64)
  mean, sd = price.mean(), price.std()
  np.testing.assert_allclose(data.label_mean[0], mean, rtol=1e-6)
  np.testing.assert_allclose(data.label_std[0], sd, rtol=1e-6)
  for split in ("train", "test"):
    layout, cols = data.split(split), arrays[split]
    np.testing.assert_array_equal(layout["x"][0], cols["x"])  # one source, stored once
    assert layout["source"].tolist() == [0, 0, 0]
    for i, (t, key) in enumerate(zip(data.taskset, ("price", "up", "kind"))):
      row = layout["y"][t.group][data.taskset.local_index[i]]
      want = (cols[key] - mean) / sd if t.kind == "regression" else cols[key]
      np.testing.assert_allclose(row, want, rtol=1e-5, atol=1e-6)
  # The TFDS builder registered at run time reads back the same tasks and
  # examples (TFDS stores them in its own order: match them by input).
  tfds_data = scope["data_from_tfds"]
  assert tfds_data.taskset == data.taskset
  np.testing.assert_allclose(tfds_data.label_mean, data.label_mean, rtol=1e-5)
  for split in ("train", "test"):
    a, b = tfds_data.split(split), data.split(split)
    order_a, order_b = (np.lexsort(s["x"][0].T) for s in (a, b))
    np.testing.assert_array_equal(a["x"][0][order_a], b["x"][0][order_b])
    for g in data.taskset.groups:
      np.testing.assert_allclose(a["y"][g][:, order_a], b["y"][g][:, order_b], rtol=1e-5,
                                 atol=1e-6)


def _check_architecture_example(scope):
  model, data = scope["model"], scope["data"]
  params = model.init(jax.random.key(3))
  names = [n for n, _ in params_lib.flatten_with_names(params)]
  optim.check_layer_groups(model.layer_groups, names)
  x = jnp.asarray(data.train["x"][0, :8])
  ids = jnp.asarray([2, 0, 1], jnp.int32)
  direct = model.apply(params, jnp.broadcast_to(x, (3,) + x.shape), ids)
  one_pass = model.decode(params["tasks"], model.encode(params["shared"], x), x, ids)
  for g in data.taskset.groups:
    np.testing.assert_allclose(direct[g], one_pass[g], rtol=1e-6, atol=1e-6)
  # A task's head starts from its own stream: a subset's model starts it alike.
  sub = scope["tanh_multi_head"]("tanh_multi_head", multitask.Trunk(), scope["TanhHParams"](),
                                 data.taskset.subset(["kind"]), data.input_shape)
  sub_heads = sub["init"](jax.random.key(3))["tasks"]["heads"]["classification3"]
  np.testing.assert_array_equal(sub_heads["kernel"][0],
                                params["tasks"]["heads"]["classification3"]["kernel"][0])
  # Each slot's output is its own task's head on tanh(x W), in float64.
  w = np.asarray(params["shared"]["trunk"]["kernel"], np.float64)
  h = np.tanh(np.asarray(x, np.float64) @ w)
  for slot, t in enumerate(ids.tolist()):
    task = data.taskset.tasks[t]
    hp = params["tasks"]["heads"][task.group]
    r = data.taskset.local_index[t]
    want = h @ np.asarray(hp["kernel"][r], np.float64) + np.asarray(hp["bias"][r])
    np.testing.assert_allclose(direct[task.group][slot], want, rtol=1e-5, atol=1e-5)


def _check_objective_examples(scope):
  data, model, tx = scope["data"], scope["model"], scope["tx"]
  # SI: one step's value is sum_k log L_k of that step's per-task losses, and
  # the weight it logs for task k is 1 / L_k (w = 1).
  si = scope["scale_invariant"](len(data.taskset))
  step = jax.jit(steps.make_train_step(
      model, tx, si, sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train), 3, 64,
          shared_inputs=True),
      weights=np.ones(3, np.float32)))
  state = steps.init_train_state(model, tx, jax.random.key(0), si)
  for _ in range(3):
    state, m = step(state, data.train)
    losses = np.asarray(m["task_loss_sum"], np.float64)
    assert np.asarray(m["task_count"]).tolist() == [1, 1, 1]
    np.testing.assert_allclose(float(m["loss"]), np.sum(np.log(losses)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["objective_lambda_sum"], 1.0 / losses, rtol=1e-5)
  # Unit-norm weights: beta_k = 1 / ||g_k|| on rows whose norms differ 5000-fold.
  g = np.array([[1e-2, 0.0, 0.0], [0.0, 3.0, 4.0], [-30.0, 40.0, 1e-3]], np.float64)
  beta, _ = scope["unit_norm_weights"](jnp.asarray(g @ g.T, jnp.float32))
  np.testing.assert_allclose(beta, 1.0 / np.linalg.norm(g, axis=1), rtol=1e-5)
  d = gradients.combine(beta, jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(d, (g / np.linalg.norm(g, axis=1)[:, None]).sum(0), rtol=1e-4)
  # Both trained models beat chance clearly on the easy tasks (MSE of a
  # constant predictor: var(price) = 4; chance accuracies 0.5 and 1/3).
  for name, metrics in scope["results"].items():
    assert metrics["price"]["mse"] < 0.5, (name, metrics)
    assert metrics["up"]["accuracy"] > 0.85, (name, metrics)
    assert metrics["kind"]["accuracy"] > 0.65, (name, metrics)  # majority class: 0.5


@pytest.mark.slow
def test_design_examples_run_and_do_what_the_text_says():
  scope = _run_examples()  # one test: the examples build on each other (one scope)
  _check_task_example(scope)
  _check_architecture_example(scope)
  _check_objective_examples(scope)
