"""Bundled data sets, loading into per-task arrays, catalog data, bad input."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtljax.data import builders
from mtljax.data import generators
from mtljax.data import loading
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.data import tfds_access

# ---------------------------------------------------------------------------
# multi_digits
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_splits(data_dir):
  features, arrays = loading.read_splits("multi_digits", data_dir=data_dir,
                                         builder_config="n600_m200_s3")
  return features, arrays


def test_multi_digits_shapes_and_label_ranges(digits_splits):
  _, arrays = digits_splits
  for split, n in (("train", 600), ("test", 200)):
    a = arrays[split]
    assert a["image"].shape == (n, 12, 16) and a["image"].dtype == np.float32
    assert a["image"].min() >= 0.0 and a["image"].max() <= 1.0
    for key in ("left_label", "right_label"):
      assert a[key].shape == (n,)
      assert set(np.unique(a[key])) <= set(range(10))
    assert np.all(a["left_source"] != a["right_source"])  # two different images


def test_multi_digits_train_test_disjoint_by_source_image(digits_splits):
  _, arrays = digits_splits
  train = set(arrays["train"]["left_source"]) | set(arrays["train"]["right_source"])
  test = set(arrays["test"]["left_source"]) | set(arrays["test"]["right_source"])
  assert train and test and not train & test
  # All ten digit classes appear on both sides of the split.
  for split in ("train", "test"):
    assert len(np.unique(arrays[split]["left_label"])) == 10


def test_multi_digits_canvas_is_the_overlay_of_its_two_sources(digits_splits):
  """Each canvas equals max(left image placed, right image placed) for offsets
  within the documented ranges, and the labels are the sources' digits."""
  from sklearn import datasets as sk
  digits = sk.load_digits()
  images = digits.images / 16.0
  _, arrays = digits_splits
  a = arrays["test"]
  for i in range(25):
    left, right = images[a["left_source"][i]], images[a["right_source"][i]]
    assert a["left_label"][i] == digits.target[a["left_source"][i]]
    assert a["right_label"][i] == digits.target[a["right_source"][i]]
    found = False
    for ly in range(0, 5):
      for lx in range(0, 4):
        pl = np.zeros((12, 16)); pl[ly:ly + 8, lx:lx + 8] = left
        for ry in range(0, 5):
          for rx in range(5, 9):
            pr = np.zeros((12, 16)); pr[ry:ry + 8, rx:rx + 8] = right
            if np.allclose(np.maximum(pl, pr), a["image"][i], atol=1e-6):
              found = True
    assert found, f"example {i} is not an overlay of its sources"


def test_multi_digits_is_deterministic(tmp_path, digits_splits):
  _, first = digits_splits
  _, again = loading.read_splits("multi_digits", data_dir=str(tmp_path),
                                 builder_config="n600_m200_s3")
  for split in ("train", "test"):
    order1 = np.lexsort((first[split]["right_source"], first[split]["left_source"]))
    order2 = np.lexsort((again[split]["right_source"], again[split]["left_source"]))
    for key in first[split]:
      np.testing.assert_array_equal(first[split][key][order1], again[split][key][order2])


def test_multi_digits_seed_changes_the_data():
  a = generators.make_multi_digits(0, 50, 10)
  b = generators.make_multi_digits(1, 50, 10)
  assert not np.array_equal(a["train"]["image"], b["train"]["image"])


# ---------------------------------------------------------------------------
# mmoe_synthetic and sinusoids: generators against their definitions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_mmoe_weight_vectors_have_cosine_p(p):
  d = generators.make_mmoe_synthetic(p, seed=0, num_train=10, num_test=10, dim=20,
                                     scale=2.5)
  w1, w2 = d["params"]["w1"], d["params"]["w2"]
  np.testing.assert_allclose(np.linalg.norm(w1), 2.5, rtol=1e-10)
  np.testing.assert_allclose(np.linalg.norm(w2), 2.5, rtol=1e-10)
  np.testing.assert_allclose(w1 @ w2 / 2.5 ** 2, p, atol=1e-10)


def test_mmoe_labels_follow_the_paper_formula_and_correlation_orders():
  corr = {}
  for p in (1.0, 0.8, 0.5, 0.0):
    d = generators.make_mmoe_synthetic(p, seed=0, num_train=4000, num_test=10,
                                       noise_std=0.0)
    x = d["train"]["x"].astype(np.float64)
    pr = d["params"]
    for key, w in (("y1", pr["w1"]), ("y2", pr["w2"])):
      wx = x @ w
      want = wx + sum(np.sin(a * wx + b) for a, b in zip(pr["alpha"], pr["beta"]))
      np.testing.assert_allclose(d["train"][key], want, rtol=1e-4, atol=1e-4)
    corr[p] = np.corrcoef(d["train"]["y1"], d["train"]["y2"])[0, 1]
  np.testing.assert_allclose(corr[1.0], 1.0, atol=1e-6)
  assert corr[1.0] > corr[0.8] > corr[0.5] > corr[0.0]


def test_fixed_sines_are_shared_by_every_data_seed_and_the_labels_use_them():
  alpha, beta = np.random.default_rng([2, 3]).normal(size=(2, 10))  # mmoe_sines' draw
  sets = [generators.make_mmoe_synthetic(0.5, seed, 50, 10, noise_std=0.0, sines_seed=2)
          for seed in (0, 1)]
  for d in sets:
    np.testing.assert_array_equal(d["params"]["alpha"], alpha)
    np.testing.assert_array_equal(d["params"]["beta"], beta)
    wx = d["train"]["x"].astype(np.float64) @ d["params"]["w1"]
    want = wx + np.sin(np.outer(wx, alpha) + beta).sum(axis=1)
    np.testing.assert_allclose(d["train"]["y1"], want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(sets[0]["params"]["w1"], sets[1]["params"]["w1"])  # data differ
  # Without sines_seed each data seed draws its own (the earlier protocol).
  old = [generators.make_mmoe_synthetic(0.5, seed, 50, 10)["params"]["alpha"] for seed in (0, 1)]
  assert not np.allclose(old[0], old[1])
  config = builders.MmoeSynthetic.config_from_name("p0.5_n50_m10_s1_a2")
  assert (config.seed, config.sines_seed, config.num_train) == (1, 2, 50)
  assert builders.MmoeSynthetic.config_from_name("p0.5_n50_m10_s1").sines_seed is None


def test_sinusoids_follow_definition():
  d = generators.make_sinusoids(seed=0, num_tasks=30, train_per_task=7, test_per_task=5)
  a, ph = d["params"]["amplitude"], d["params"]["phase"]
  assert np.all((a >= 0.1) & (a <= 5.0)) and np.all((ph >= 0) & (ph <= np.pi))
  tr = d["train"]
  assert tr["x"].shape == (210, 1) and np.all(np.abs(tr["x"]) <= 5.0)
  want = a[tr["task"]] * np.sin(tr["x"][:, 0] - ph[tr["task"]])
  np.testing.assert_allclose(tr["y"], want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Layout of per-task arrays
# ---------------------------------------------------------------------------


def test_shared_input_tasks_share_one_source(data_dir):
  data = loading.load("multi_digits", builder_config="n600_m200_s3", data_dir=data_dir)
  assert data.taskset.names == ("left", "right")
  assert data.train["x"].shape == (1, 600, 12, 16)
  np.testing.assert_array_equal(data.train["source"], [0, 0])
  np.testing.assert_array_equal(data.train["n"], [600, 600])
  assert data.train["y"]["classification10"].shape == (2, 600)


def test_family_tasks_get_own_sources_and_normalised_labels(data_dir):
  data = loading.load("sinusoids", builder_config="t5_n30_m40_s0", data_dir=data_dir)
  assert data.taskset.names == tuple(f"sine_{i:02d}" for i in range(5))
  assert data.train["x"].shape == (5, 30, 1)
  np.testing.assert_array_equal(data.train["source"], np.arange(5))
  y = data.train["y"]["regression1"]
  np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=1), 1.0, atol=1e-5)
  # Statistics are the raw train labels' mean and std.
  _, raw = loading.read_splits("sinusoids", builder_config="t5_n30_m40_s0",
                               data_dir=data_dir)
  for t in range(5):
    yt = raw["train"]["y"][raw["train"]["task"] == t]
    np.testing.assert_allclose(data.label_mean[t], yt.mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.label_std[t], yt.std(), rtol=1e-5)


def test_task_selection_and_max_examples(data_dir):
  data = loading.load("multi_digits", builder_config="n600_m200_s3", data_dir=data_dir,
                      task_names=("right",), max_train_examples=100)
  assert data.taskset.names == ("right",) and data.taskset.stream_ids == (1,)
  assert data.train["x"].shape == (1, 100, 12, 16)
  with pytest.raises(ValueError, match=r"unknown task\(s\) \['middle'\]"):
    loading.load("multi_digits", builder_config="n600_m200_s3", data_dir=data_dir,
                 task_names=("middle",))


def _toy_spec():
  from mtljax import tasks
  return specs.DataSpec("x", (specs.TaskColumn(tasks.Task("r", "regression"), "y"),
                              specs.TaskColumn(tasks.Task("c", "classification", 3), "c")))


def _toy_arrays(n=8, y=None, c=None, x=None):
  rng = np.random.default_rng(0)
  split = {"x": rng.normal(size=(n, 4)).astype(np.float32) if x is None else x,
           "y": rng.normal(size=n).astype(np.float32) if y is None else y,
           "c": rng.integers(0, 3, n) if c is None else c}
  return {"train": split, "test": dict(split)}


def test_nan_labels_raise_naming_the_task():
  y = np.ones(8, np.float32); y[3] = np.nan
  with pytest.raises(ValueError, match=r"task 'r': 1 NaN or infinite label\(s\), the first at example 3"):
    task_data.build_task_data("toy", _toy_spec(), _toy_arrays(y=y))


def test_out_of_range_class_labels_raise():
  with pytest.raises(ValueError, match=r"task 'c': labels must be in \[0, 3\).*first outside: "
                     r"example 3, label 3"):
    task_data.build_task_data("toy", _toy_spec(), _toy_arrays(c=np.array([0, 1, 2, 3] * 2)))


def test_mismatched_input_and_label_lengths_raise():
  arrays = _toy_arrays()
  arrays["train"]["y"] = arrays["train"]["y"][:5]
  with pytest.raises(ValueError, match="8 inputs but 5 labels"):
    task_data.build_task_data("toy", _toy_spec(), arrays)


def test_nan_inputs_raise():
  x = np.zeros((8, 4), np.float32); x[0, 0] = np.nan
  with pytest.raises(ValueError, match="inputs contain NaN"):
    task_data.build_task_data("toy", _toy_spec(), _toy_arrays(x=x))


def test_unknown_builder_config_raises():
  with pytest.raises(ValueError, match="multi_digits: unknown builder config 'huge'"):
    loading.load("multi_digits", builder_config="huge")
  with pytest.raises(ValueError, match=r"p must be in \[-1, 1\]"):
    loading.load("mmoe_synthetic", builder_config="p1.5")


# ---------------------------------------------------------------------------
# Catalog data sets (offline): mock data, missing data, unknown names
# ---------------------------------------------------------------------------


def test_catalog_dataset_loads_through_the_same_code_with_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=12):
    data = loading.load("mnist", data_dir=str(tmp_path))
  assert data.taskset.names == ("label",)
  assert data.taskset.tasks[0].kind == "classification"
  assert data.taskset.tasks[0].num_classes == 10
  assert data.input_shape == (28, 28, 1)
  assert data.train["x"].shape == (1, 12, 28, 28, 1)
  assert 0.0 <= data.train["x"].min() and data.train["x"].max() <= 1.0  # uint8 / 255


def test_missing_catalog_dataset_offline_is_a_clear_error(tmp_path):
  with pytest.raises(tfds_access.DataNotAvailableError,
                     match=r"'mnist' \(split 'train'\) is not prepared.*tfds build mnist"):
    loading.load("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="^name='no_such_data_set_xyz'"):
    loading.load("no_such_data_set_xyz", data_dir=str(tmp_path))
