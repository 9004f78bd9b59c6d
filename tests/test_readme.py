"""The README's notebook example runs as written (on a smaller data config), and
its numbers are what the README says: each call's ``measurements`` are sums
over the call's steps (``loss`` the sum of every step's ``sum_k w_k L_k``,
``task_loss_sum / task_count`` each task's mean loss over the call), checked
against the same steps run one call per step."""

import os
import re

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_code() -> str:
  text = open(os.path.join(ROOT, "README.md")).read()
  (code,) = re.findall(r"```python\n(.*?)```", text, re.S)
  for arg in ("steps_per_call=50", "tasks_per_step=2", "examples_per_task=64",
              "shared_inputs=True", "jax.random.key(0)"):
    assert arg in code, f"the README example changed ({arg}); update this test"
  return code.replace('"n3000_m600_s0"', '"n600_m200_s0"')


@pytest.mark.slow
def test_readme_notebook_example_runs_and_its_numbers_are_sums_over_a_call():
  from mtljax import steps  # pylint: disable=g-import-not-at-top
  from mtljax import tasks
  from mtljax.data import sampling
  code, n = re.subn(r"range\(4\)", "range(3)", _readme_code())
  assert n == 1
  scope = {}
  exec(compile(code, "README.md", "exec"), scope)  # pylint: disable=exec-used
  before = scope["state"]
  assert int(before.step) == 150
  # The README's fourth call, and the same 50 steps one per call.
  state, measurements = scope["step"](before, scope["data"].train)
  assert int(state.step) == 200
  data = scope["data"]
  single = jax.jit(steps.make_train_step(
      scope["model"], scope["tx"], scope["objective"], sampling.make_sampler(
          data.taskset, sampling.task_probabilities("uniform", data.num_train),
          tasks_per_step=2, examples_per_task=64, shared_inputs=True),
      weights=tasks.task_weights(data.taskset, None), steps_per_call=1))
  s, losses, task_losses = before, [], []
  for _ in range(50):
    s, m = single(s, data.train)
    losses.append(float(m["loss"]))
    task_losses.append(np.asarray(m["task_loss_sum"], np.float64))
    # One step's loss is sum_k w_k L_k over its slots (w = 1, both tasks sampled).
    np.testing.assert_allclose(losses[-1], task_losses[-1].sum(), rtol=1e-6)
  assert int(s.step) == 200
  counts = measurements["task_count"]
  assert counts.tolist() == [50.0, 50.0]  # K = T = 2: both tasks every step
  np.testing.assert_allclose(float(measurements["loss"]), np.sum(losses), rtol=1e-4)
  np.testing.assert_allclose(measurements["task_loss_sum"] / counts,
                             np.mean(task_losses, axis=0), rtol=1e-4)
