"""Many seeds in one program (``config.num_seeds``): N seeds trained as one
vmapped step equal N separate runs, and the reported mean and standard error
are those of the per-seed values."""


import numpy as np
import pytest

import helpers
from mtljax import train


def _small(**overrides):  # 20 steps
  return helpers.small_sinusoids_config(**{"total_steps": 20, **overrides})


def _logged(caplog, start: str) -> list[str]:
  return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def test_three_seeds_in_one_program_equal_three_runs(tmp_path, caplog):
  with caplog.at_level("INFO", logger="mtljax"):
    seeds = train.train_and_evaluate(_small(num_seeds=3, seed=4), str(tmp_path / "n"))
  logged = (_logged(caplog, "Parameters:"), _logged(caplog, "Final test metrics"))
  caplog.clear()
  assert seeds["train_step_compilations"] == 1 and seeds["num_seeds"] == 3
  assert seeds["per_seed"]["seeds"] == [4, 5, 6]
  with caplog.at_level("INFO", logger="mtljax"):
    singles = [train.train_and_evaluate(_small(seed=s), str(tmp_path / f"s{s}"))
               for s in (4, 5, 6)]
  # The console: "Parameters:" counts one model (a one-seed run's count), and
  # the final table is mean ± s.e. with the number of seeds.
  one = _logged(caplog, "Parameters:")[0]
  assert logged[0] == [one[:-1] + "; 3 seeds train 3 such models."]
  table = logged[1][0].splitlines()
  assert table[0] == "Final test metrics (mean ± s.e. over n=3 seeds):"
  for task, ms in seeds["tasks"].items():
    row = next(line.split() for line in table[2:] if line.split()[0] == task)
    want = [f"{ms[m]:.4f} ± {seeds['tasks_se'][task][m]:.4f}" for m in sorted(ms)]
    assert [" ".join(row[i:i + 3]) for i in range(1, len(row), 3)] == want
  assert _logged(caplog, "Final test metrics")[0].startswith("Final test metrics:\n")
  for i, single in enumerate(singles):
    for task, ms in single["tasks"].items():
      for m, v in ms.items():
        np.testing.assert_allclose(seeds["per_seed"]["tasks"][i][task][m], v, rtol=1e-4,
                                   err_msg=f"seed {4 + i} {task} {m}")
  # The mean and standard error are those of the per-seed values (float64 numpy).
  for task, ms in seeds["tasks"].items():
    for m in ms:
      vals = np.array([t[task][m] for t in seeds["per_seed"]["tasks"]], np.float64)
      np.testing.assert_allclose(seeds["tasks"][task][m], vals.mean(), rtol=1e-12)
      np.testing.assert_allclose(seeds["tasks_se"][task][m],
                                 vals.std(ddof=1) / np.sqrt(3), rtol=1e-12)
  # metrics.jsonl rows: the mean, KEY/se and per_seed lists, per seed equal to the runs.
  rows = helpers.metrics_rows(str(tmp_path / "n"))
  single_rows = [helpers.metrics_rows(str(tmp_path / f"s{s}")) for s in (4, 5, 6)]
  for r, row in enumerate(rows):
    for key, per in row["per_seed"].items():
      want = [single_rows[i][r].get(key) for i in range(3)]  # None: task not sampled
      assert [v is None for v in per] == [v is None for v in want], key
      got = [v for v in per if v is not None]
      np.testing.assert_allclose(got, [v for v in want if v is not None], rtol=1e-4,
                                 err_msg=key)
      np.testing.assert_allclose(row[key], np.mean(got), rtol=1e-12)
  # The seeds differ from one another (different init and sampling streams).
  losses = rows[-1]["per_seed"]["train/loss"]
  assert len(set(losses)) == 3


def test_seeds_resume_bitwise_after_an_interruption(tmp_path):
  class Stop(Exception):
    pass

  def stop(step, _):
    if step == 15:
      raise Stop()
  straight = train.train_and_evaluate(_small(num_seeds=2), str(tmp_path / "a"))
  with pytest.raises(Stop):
    train.train_and_evaluate(_small(num_seeds=2), str(tmp_path / "b"), callbacks=[stop])
  resumed = train.train_and_evaluate(_small(num_seeds=2), str(tmp_path / "b"))
  assert resumed["resumed_from_step"] == 10
  assert helpers.metrics_rows(str(tmp_path / "a")) == helpers.metrics_rows(str(tmp_path / "b"))
  assert resumed["per_seed"] == straight["per_seed"]


def test_bad_num_seeds_is_named_before_loading(tmp_path):
  with pytest.raises(ValueError, match="config.num_seeds must be a positive integer, got 0"):
    train.train_and_evaluate(_small(num_seeds=0), str(tmp_path))


@pytest.mark.slow
def test_delta_m_is_paired_by_seed_against_the_baselines(tmp_path):
  c = _small(num_seeds=2, baselines=True, baselines_cache=str(tmp_path / "cache"))
  summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  dm = summary["delta_m"]
  assert len(dm["per_seed"]) == 2
  np.testing.assert_allclose(dm["mean_over_seeds"], np.mean(dm["per_seed"]), rtol=1e-12)
  np.testing.assert_allclose(dm["se"], np.std(dm["per_seed"], ddof=1) / np.sqrt(2),
                             rtol=1e-12)
  # Each seed's value is Delta_m of that seed's metrics against that seed's baselines.
  from mtljax import measure  # pylint: disable=g-import-not-at-top
  base = measure.single_task_baseline_summary(c, train.train_and_evaluate)
  for i in range(2):
    want, _ = measure.delta_m(summary["per_seed"]["tasks"][i], base["per_seed"]["tasks"][i])
    np.testing.assert_allclose(dm["per_seed"][i], want, rtol=1e-12)
