"""Catalog data sets as tasks (offline: ``tfds.testing.mock_data``): CelebA's
attributes on shared inputs, MNIST + Fashion-MNIST on their own inputs,
Omniglot's alphabets as a family with a held-out test split; and what is
refused from the config and the data's metadata before any record is read."""

import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

import helpers
from experiments.configs import celeba as celeba_config
from experiments.configs import mnist_fashion as mnist_fashion_config
from experiments.configs import omniglot as omniglot_config
from mtljax import build
from mtljax.data import loading
from mtljax.data import sampling

ATTRS = ("attributes/Male", "attributes/Smiling", "attributes/Young")


def _catalog_config(tmp_path, **overrides):
  """The small sinusoids config on a catalog data set, device path."""
  base = {"data.builder_config": "", "data.data_dir": str(tmp_path),
          "data.pipeline": "device", "data.download": False, "sampling.tasks_per_step": 0}
  return helpers.small_sinusoids_config(**{**base, **overrides})


class _Counting:
  """A data source that counts the records read from it."""

  def __init__(self, records):
    self.records, self.reads = records, 0

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    self.reads += 1
    return self.records[i]


def _mnist_like(n, seed):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
           "label": np.int64(rng.integers(0, 10))} for _ in range(n)]


# ----------------------------------------------------------------------------
# CelebA: attributes as binary tasks on one input source.
# ----------------------------------------------------------------------------


def test_celeba_attributes_named_in_the_config_are_binary_tasks_on_shared_inputs(tmp_path):
  config = _catalog_config(tmp_path, **{
      "data.name": "celeb_a", "data.labels": {k: "binary" for k in ATTRS},
      "sampling.shared_inputs": True})
  with tfds.testing.mock_data(num_examples=10):
    data = build.data_from_config(config)
    records = {s: list(tfds.data_source("celeb_a", split=s, data_dir=str(tmp_path)))
               for s in ("train", "test")}
    spec = loading.spec_for("celeb_a", tfds.builder("celeb_a").info.features)
  # In the data set's feature order (a config's mapping has none).
  assert data.taskset.names == ("attributes.Male", "attributes.Smiling", "attributes.Young")
  assert [t.kind for t in data.taskset] == ["binary"] * 3
  for split in ("train", "test"):
    layout = data.split(split)
    np.testing.assert_array_equal(layout["source"], [0, 0, 0])  # one copy of the faces
    images = np.stack([r["image"] for r in records[split]]).astype(np.float64) / 255.0
    np.testing.assert_allclose(layout["x"][0], images, rtol=1e-6)
    want = np.asarray([[r["attributes"][k.split("/")[1]] for r in records[split]]
                       for k in ATTRS], np.int32)
    np.testing.assert_array_equal(layout["y"]["binary1"], want)
  sampling.check_shared_inputs(data.train, data.taskset.names)
  # Without named labels: every bool feature, i.e. the 40 attributes (not the
  # integer landmarks, not the image).
  with tfds.testing.mock_data(num_examples=1):
    attributes = tfds.builder("celeb_a").info.features["attributes"].keys()
  assert {c.task.name for c in spec.columns} == {f"attributes.{a}" for a in attributes}
  assert len(spec.columns) == 40 and {c.task.kind for c in spec.columns} == {"binary"}


# ----------------------------------------------------------------------------
# MNIST + Fashion-MNIST: a task set drawn from two data sets.
# ----------------------------------------------------------------------------


def test_two_data_sets_give_two_tasks_each_on_its_own_inputs(tmp_path):
  made = {(name, split): _mnist_like(n, seed) for seed, (name, split, n) in enumerate(
      [("mnist", "train", 9), ("mnist", "test", 4), ("fashion_mnist", "train", 7),
       ("fashion_mnist", "test", 5)])}
  config = mnist_fashion_config.get_config("quick")
  helpers.with_overrides(config, {"data.data_dir": str(tmp_path), "data.download": False})
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split: made[(self.name, split)]):
    data = build.data_from_config(config)
  assert data.taskset.names == ("mnist_label", "fashion_mnist_label")
  assert [(t.kind, t.num_classes) for t in data.taskset] == [("classification", 10)] * 2
  for split, sizes in (("train", (9, 7)), ("test", (4, 5))):
    layout = data.split(split)
    np.testing.assert_array_equal(layout["source"], [0, 1])
    np.testing.assert_array_equal(layout["n"], sizes)
    for row, name in enumerate(("mnist", "fashion_mnist")):
      recs = made[(name, split)]
      n = len(recs)
      np.testing.assert_allclose(layout["x"][row, :n],
                                 np.stack([r["image"] for r in recs]) / 255.0, rtol=1e-6)
      np.testing.assert_array_equal(layout["y"]["classification10"][row, :n],
                                    [r["label"] for r in recs])
  with pytest.raises(ValueError, match="shared_inputs"):  # two sources: no shared batch
    sampling.check_shared_inputs(data.train, data.taskset.names)


# ----------------------------------------------------------------------------
# Omniglot: alphabets as tasks (a family), a held-out test split.
# ----------------------------------------------------------------------------


def _omniglot_records():
  """60 records of three alphabets (3, 7, 11) with 5, 6 and 4 characters;
  record i's image is filled with i."""
  alphabet = np.repeat([3, 7, 11], [20, 24, 16])
  chars = {3: 5, 7: 6, 11: 4}
  return [{"image": np.full((105, 105, 3), i, np.uint8), "alphabet": np.int64(a),
           "alphabet_char_id": np.int64(i % chars[a]), "label": np.int64(0)}
          for i, a in enumerate(alphabet)]


@pytest.mark.parametrize("kind", ["device", "host"])
def test_omniglot_alphabets_are_tasks_with_a_held_out_split(tmp_path, kind):
  records = _omniglot_records()
  asked = []

  def source(self, split):
    asked.append((self.name, split))
    return records
  config = omniglot_config.get_config("quick")
  helpers.with_overrides(config, {"data.data_dir": str(tmp_path), "data.download": False,
                                  "data.pipeline": kind, "sampling.tasks_per_step": 2})
  with tfds.testing.mock_data(as_data_source_fn=source):
    data = build.data_from_config(config)
  assert asked == [("omniglot", "train+test")]  # one TFDS split read, the test split carved
  # The held-out records: a seeded permutation's first 20% (split_seed 0).
  test_ids = np.sort(np.random.default_rng(0).permutation(60)[:12])
  train_ids = np.setdiff1d(np.arange(60), test_ids)
  assert data.taskset.names == ("alphabet_03", "alphabet_07", "alphabet_11")
  alphabet = np.asarray([r["alphabet"] for r in records])
  chars = np.asarray([r["alphabet_char_id"] for r in records])
  k = int(chars[train_ids].max()) + 1  # one class count for the family: train max + 1
  assert {(t.kind, t.num_classes) for t in data.taskset} == {("classification", k)}
  for split, ids in (("train", train_ids), ("test", test_ids)):
    layout = data.split(split)
    for t, a in enumerate((3, 7, 11)):
      want = ids[alphabet[ids] == a]  # this alphabet's records of the split, in order
      n = layout["n"][t]
      assert n == len(want)
      if kind == "device":
        x = layout["x"][layout["source"][t], :n]
      else:
        x = data.readers[split].inputs(layout["records"][layout["source"][t], :n])
      np.testing.assert_allclose(x[:, 0, 0, 0], want / 255.0, rtol=1e-6)
      np.testing.assert_array_equal(layout["y"][f"classification{k}"][t, :n], chars[want])


# ----------------------------------------------------------------------------
# The configs.
# ----------------------------------------------------------------------------


def test_the_catalog_configs_validate_and_name_their_tasks(tmp_path):
  for module in (celeba_config, mnist_fashion_config, omniglot_config):
    for variant in module.VARIANTS:
      build.validate_config(module.get_config(variant))
  config = celeba_config.get_config("quick")
  helpers.with_overrides(config, {"data.data_dir": str(tmp_path), "data.download": False,
                                  "data.pipeline": "device", "data.max_train_examples": 3})
  with tfds.testing.mock_data(num_examples=5):
    data = build.data_from_config(config)
  assert len(data.taskset) == 40 and {t.kind for t in data.taskset} == {"binary"}
  np.testing.assert_array_equal(data.train["n"], [3] * 40)


# ----------------------------------------------------------------------------
# Refused before any record is read.
# ----------------------------------------------------------------------------


def test_an_unknown_data_set_name_is_mtljax_s_one_line_first(tmp_path):
  config = _catalog_config(tmp_path, **{"data.name": "celeba"})
  build.validate_config(config)  # (a name is checked against the catalog when loading)
  with pytest.raises(ValueError) as e:
    build.data_from_config(config)
  assert str(e.value) == (
      "config.data.name='celeba' is neither a bundled data set (digits, exam, "
      "mmoe_synthetic, multi_digits, sinusoids) nor a TFDS catalog data set; did you mean "
      "'celeb_a', 'celeb_a_hq', 'voxceleb'?")
  assert e.value.__cause__ is None and e.value.__suppress_context__  # no catalog dump
  with pytest.raises(ValueError, match=re.escape(
      "config.data.name='no_such_set_xyz' is neither a bundled data set (digits, exam, "
      "mmoe_synthetic, multi_digits, sinusoids) nor a TFDS catalog data set "
      "(tfds.list_builders() lists the catalog).")):
    loading.load("no_such_set_xyz", data_dir=str(tmp_path))


def test_too_many_tasks_per_step_fail_before_a_record_is_read(tmp_path):
  source = _Counting(_mnist_like(6, 0))
  cases = [
      ({"data.name": "celeb_a", "data.labels": {k: "binary" for k in ATTRS},
        "sampling.tasks_per_step": 5},
       "config.sampling.tasks_per_step=5 must be in [1, 3] (or 0 = all tasks) when sampling "
       "tasks without replacement: data set 'celeb_a' has at most 3 tasks (3 label "
       "features)."),
      ({"data.name": "mnist+fashion_mnist", "sampling.tasks_per_step": 3},
       "config.sampling.tasks_per_step=3 must be in [1, 2] (or 0 = all tasks) when sampling "
       "tasks without replacement: data set 'mnist+fashion_mnist' has at most 2 tasks "
       "(mnist: 1 label feature; fashion_mnist: 1 label feature)."),
      ({"data.name": "omniglot", "data.family": "alphabet",
        "data.labels": {"alphabet_char_id": "classification"}, "sampling.tasks_per_step": 51},
       "config.sampling.tasks_per_step=51 must be in [1, 50] (or 0 = all tasks) when "
       "sampling tasks without replacement: data set 'omniglot' has at most 50 tasks "
       "(family feature 'alphabet' has 50 values)."),
      ({"data.name": "celeb_a", "data.tasks": ("attributes.Smile",)},
       "config.data.tasks: unknown task(s) ['attributes.Smile'] for data set 'celeb_a'"),
  ]
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split: source):
    for overrides, message in cases:
      config = _catalog_config(tmp_path, **overrides)
      build.validate_config(config)
      with pytest.raises(ValueError, match="^" + re.escape(message)):
        build.data_from_config(config)
  assert source.reads == 0


def test_too_many_tasks_of_a_bundled_data_set_fail_before_it_is_generated(tmp_path):
  config = helpers.small_sinusoids_config(**{
      "data.name": "multi_digits", "data.builder_config": "n60_m20_s0",
      "data.data_dir": str(tmp_path), "sampling.tasks_per_step": 3})
  build.validate_config(config)
  with pytest.raises(ValueError, match=re.escape(
      "config.sampling.tasks_per_step=3 must be in [1, 2] (or 0 = all tasks) when sampling "
      "tasks without replacement: data set 'multi_digits' has at most 2 tasks (2 label "
      "features).")):
    build.data_from_config(config)
  config = helpers.small_sinusoids_config(**{"data.data_dir": str(tmp_path),
                                             "sampling.tasks_per_step": 9})
  with pytest.raises(ValueError, match=re.escape(
      "data set 'sinusoids' has at most 8 tasks (builder config 't8_n50_m50_s0').")):
    build.data_from_config(config)
  assert os.listdir(tmp_path) == []  # nothing generated
  config = helpers.small_sinusoids_config(**{"data.tasks": ("sine_00", "sine_01"),
                                             "sampling.tasks_per_step": 3})
  with pytest.raises(ValueError, match=re.escape(
      "config.sampling.tasks_per_step=3 must be in [1, 2] (or 0 = all tasks) when sampling "
      "tasks without replacement: config.data.tasks keeps 2.")):
    build.validate_config(config)


def test_an_empty_split_is_one_line_naming_data_set_and_split(tmp_path):
  config = helpers.small_sinusoids_config(**{
      "data.name": "multi_digits", "data.builder_config": "n0_m10_s0",
      "data.data_dir": str(tmp_path), "sampling.tasks_per_step": 0})
  with pytest.raises(ValueError) as e:
    build.data_from_config(config)
  assert str(e.value) == ("config.data.builder_config='n0_m10_s0': data set 'multi_digits', "
                          "split 'train' has no examples (num_train=0).")
  assert os.listdir(tmp_path) == []
  made = {"train": _mnist_like(5, 0), "test": []}
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split: made[split]):
    with pytest.raises(ValueError) as e:
      build.data_from_config(_catalog_config(tmp_path, **{"data.name": "mnist"}))
  assert str(e.value) == ("config.data.test_split='test': data set 'mnist', split 'test' "
                          "has no examples.")

  class EmptySplitBuilder:  # what TFDS raises writing an empty split we did not foresee
    builder_config = type("Config", (), {"name": "c0"})()

    def download_and_prepare(self):
      raise AssertionError('Failed to finalize writing of split "test": No examples were '
                           "yielded.")
  with pytest.raises(ValueError) as e:
    loading._prepare(EmptySplitBuilder(), "digits")  # pylint: disable=protected-access
  assert str(e.value) == ("config.data.builder_config='c0': data set 'digits', split 'test' "
                          "has no examples.")


@pytest.mark.parametrize("overrides, message", [
    ({"data.labels": {"label": "multiclass"}},
     "config.data.labels['label']='multiclass' is not one of ('auto', 'classification', "
     "'binary', 'regression')."),
    ({"data.test_fraction": 1.0},
     "config.data.test_fraction must be in [0, 1) (0 = the data set's own test split), "
     "got 1.0."),
    ({"data.test_fraction": 0.2},
     "config.data.test_fraction=0.2 holds out part of config.data.train_split as the test "
     "split: set config.data.test_split='' (it is 'test')."),
    ({"data.test_split": ""},
     "config.data.test_split must be a TFDS split string such as 'test' (or '' with "
     "config.data.test_fraction > 0), got ''."),
    ({"data.train_split": ""},
     "config.data.train_split must be a TFDS split string such as 'train' or 'train+test', "
     "got ''."),
    ({"data.name": "mnist+fashion_mnist", "data.pipeline": "host"},
     "config.data.pipeline='host' reads one data set's records; "
     "config.data.name='mnist+fashion_mnist' joins 2: use 'device' or 'auto'."),
    ({"data.name": "mnist+mnist"}, "config.data.name='mnist+mnist' names a data set twice."),
    ({"data.tasks": ("sine_00", "sine_00")},
     "config.data.tasks must be distinct task names (() = all), got ('sine_00', 'sine_00')."),
    ({"sampling.task_sampler": "temperature", "sampling.temperature": 0.0},
     "config.sampling.temperature must be a finite number > 0 (1 = proportional), got 0.0."),
    ({"model.soft_norm": "l1"},
     "config.model.soft_norm='l1' is not one of ('squared', 'l2')."),
    ({"model.hidden": (16, 0)}, "config.model.hidden must be positive integers, got (16, 0)."),
    ({"optim.b1": 1.0}, "config.optim.b1 must be a number in [0, 1), got 1.0."),
    ({"optim.eps": 0.0}, "config.optim.eps must be a number in (0, inf), got 0.0."),
    ({"optim.momentum": -0.5}, "config.optim.momentum must be a number in [0, 1), got -0.5."),
    ({"optim.weight_decay": -1e-4},
     "config.optim.weight_decay must be a number in [0, inf), got -0.0001."),
    ({"optim.stlr_cut_frac": 0.0},
     "config.optim.stlr_cut_frac must be a number in (0, 1), got 0.0."),
    ({"optim.stlr_ratio": 0.5}, "config.optim.stlr_ratio must be a number in [1, inf), got 0.5."),
    ({"optim.warmup_steps": -1}, "config.optim.warmup_steps must be an integer >= 0, got -1."),
    ({"cv.folds": 1}, "config.cv.folds must be 0 (off) or an integer >= 2, got 1."),
    ({"cv.folds": 3, "cv.metric": "f1"},
     "config.cv.metric='f1' is not one of ('accuracy', 'loss', 'mae', 'mse')."),
    ({"cv.folds": 3, "cv.lr": (1e-3, -1.0)},
     "config.cv.lr must be positive numbers (() = config.optim.lr), got (0.001, -1.0)."),
])
def test_bad_config_values_are_refused_with_the_allowed_values(overrides, message):
  config = helpers.small_sinusoids_config(**overrides)
  with pytest.raises(ValueError) as e:
    build.validate_config(config)
  assert str(e.value) == message


def test_label_kinds_the_features_cannot_have_are_refused(tmp_path):
  with tfds.testing.mock_data(num_examples=1):
    celeb = tfds.builder("celeb_a", data_dir=str(tmp_path)).info.features
    omniglot = tfds.builder("omniglot", data_dir=str(tmp_path)).info.features
  cases = [
      (celeb, {"labels": {"attributes/Smiling": "regression"}},
       "config.data.labels: feature 'attributes/Smiling' (scalar bool) cannot be a "
       "'regression' label (binary: a scalar bool, integer or 2-class label; classification: "
       "a class label or scalar integer; regression: a scalar number)."),
      (celeb, {"labels": {"attributes/Smile": "binary"}},
       "config.data.labels: 'attributes/Smile' is not a feature; features are ["),
      (omniglot, {"labels": {"alphabet_char_id": "auto"}},
       "config.data.labels: feature 'alphabet_char_id' (scalar int64) needs its kind named: "
       "one of "
       "('classification', 'binary', 'regression')."),
      (omniglot, {"labels": {"alphabet_char_id": "classification", "label": "auto"},
                  "family": "alphabet"},
       "config.data.family='alphabet': config.data.labels must name exactly one label "
       "feature (every family task's), got ['alphabet_char_id', 'label']."),
      (omniglot, {"labels": {"label": "auto"}, "family": "image"},
       "config.data.family='image' must be a scalar integer feature; features are ["),
      (omniglot, {"labels": {"label": "auto"}, "input_key": "img"},
       "config.data.input_key='img' is not a feature of this data set; features are ["),
  ]
  for features, kwargs, message in cases:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      loading.catalog_spec(features, kwargs.get("input_key", "image"), kwargs["labels"],
                           kwargs.get("family", ""))


def test_a_catalog_data_set_not_prepared_offline_fails_in_seconds_saying_how(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(loading, "NETWORK_PROBE", ("127.0.0.1", 9))  # refused: "offline"
  with pytest.raises(loading.DataNotAvailableError) as e:
    build.data_from_config(_catalog_config(tmp_path, **{"data.name": "mnist",
                                                        "data.download": True}))
  assert str(e.value).startswith(
      f"TFDS data set 'mnist' (split 'train') is not prepared in data_dir='{tmp_path}' and "
      "could not be downloaded. On a machine with network run `tfds build mnist "
      "--file_format=array_record --data_dir=DIR` (or set config.data.download=True "
      "there), copy DIR here and pass --config.data.data_dir=DIR. (ConnectionError: no "
      "network: 127.0.0.1:9 not reachable within 5 s")


@pytest.mark.slow
def test_a_run_on_two_data_sets_trains_each_task_on_its_own_labels(tmp_path):
  """Fashion-MNIST's stand-in has one class only (learnable in a few steps),
  MNIST's has random labels on random images (not learnable): the run's test
  accuracy is 1 on the first and near chance on the second, so each task is
  trained and evaluated on its own data set."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  made = {}
  for seed, split, n in ((0, "train", 200), (1, "test", 100)):
    made[("mnist", split)] = _mnist_like(n, seed)
    made[("fashion_mnist", split)] = [dict(r, label=np.int64(3))
                                      for r in _mnist_like(n, seed + 10)]
  config = mnist_fashion_config.get_config("quick")
  helpers.with_overrides(config, {
      "data.data_dir": str(tmp_path / "data"), "data.download": False,
      "model.encoder": "mlp", "model.hidden": (16,), "optim.lr": 1e-2,
      "sampling.examples_per_task": 16, "total_steps": 40, "steps_per_call": 20,
      "log_steps": 20, "eval_steps": 40, "checkpoint_steps": 40, "eval_batch_size": 100,
      "tensorboard": False, "plots": False})
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split: made[(self.name, split)]):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  tasks = summary["tasks"]
  assert set(tasks) == {"mnist_label", "fashion_mnist_label"}
  assert tasks["fashion_mnist_label"]["accuracy"] == 1.0
  # 100 random labels of 10 classes: accuracy ~ Binomial(100, 0.1) / 100.
  assert tasks["mnist_label"]["accuracy"] < 0.3
