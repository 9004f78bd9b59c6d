"""Catalog data sets as tasks (offline: ``tfds.testing.mock_data``): CelebA's
attributes on shared inputs, MNIST + Fashion-MNIST on their own inputs,
Omniglot's alphabets as a family with a held-out test split; and what is
refused from the config and the data's metadata before any record is read."""

import json
import os
import re
import socket
import subprocess
import sys
import threading

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
from mtljax import tasks as tasks_lib
from mtljax.data import specs
from mtljax.data import task_data
from mtljax.data import tfds_access
from mtljax import train

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


class TinyCatalog(tfds.core.GeneratorBasedBuilder):
  """A real (not mocked) catalog-style data set: 20 train and 10 test
  records, prepared in array_record like a downloaded catalog data set."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(2,), dtype=np.float32),
        "label": tfds.features.ClassLabel(num_classes=2)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(20), "test": self._generate_examples(10)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": np.full((2,), i, np.float32), "label": i % 2}


@pytest.fixture(scope="module")
def tiny_catalog(tmp_path_factory):
  """A data_dir where ``tiny_catalog`` is prepared."""
  path = tmp_path_factory.mktemp("tiny_catalog")
  tfds.disable_progress_bar()
  TinyCatalog(data_dir=str(path), file_format="array_record").download_and_prepare()
  return path


@pytest.fixture
def offline(monkeypatch):
  """The network probe refused (never an outside address): a download fails."""
  monkeypatch.setattr(tfds_access, "NETWORK_PROBE", ("127.0.0.1", 9))


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
  assert data.taskset.names == ("alphabet_03", "alphabet_07", "alphabet_11")
  alphabet = np.asarray([r["alphabet"] for r in records])
  chars = np.asarray([r["alphabet_char_id"] for r in records])
  ids = {}
  for split in ("train", "test"):  # record i's image is filled with i: which records each holds
    layout = data.split(split)
    per_task = []
    for t in range(3):
      n = layout["n"][t]
      if kind == "device":
        x = layout["x"][layout["source"][t], :n]
      else:
        x = data.readers[split].inputs(layout["records"][layout["source"][t], :n])
      per_task.append(np.rint(np.asarray(x)[:, 0, 0, 0] * 255).astype(int))
    ids[split] = per_task
  k = int(chars[np.concatenate(ids["train"])].max()) + 1  # the family's count: train max + 1
  assert {(t.kind, t.num_classes) for t in data.taskset} == {("classification", k)}
  for split in ("train", "test"):
    for t, a in enumerate((3, 7, 11)):
      got = ids[split][t]
      assert len(got) > 0 and np.all(alphabet[got] == a)  # every alphabet in both splits
      assert np.all(np.diff(got) > 0)  # in record order
      np.testing.assert_array_equal(data.split(split)["y"][f"classification{k}"][t, :len(got)],
                                    chars[got])
  train, test = (np.concatenate(ids[s]) for s in ("train", "test"))
  assert len(test) == 12 and len(train) == 48  # round(0.2 * 60) held out
  assert not set(train) & set(test) and set(train) | set(test) == set(range(60))


def test_hold_out_is_a_seeded_disjoint_cover_and_never_leaves_train_empty():
  records = list(range(10))
  held = tfds_access.hold_out(records, 0.3, seed=0)
  # Pinned (written down once): seed 0's three held-out records of ten.
  assert list(held["test"]) == [2, 4, 6]
  assert list(held["train"]) == [0, 1, 3, 5, 7, 8, 9]
  other = tfds_access.hold_out(records, 0.3, seed=1)
  assert list(other["test"]) != [2, 4, 6] and len(other["test"]) == 3  # the seed matters
  assert sorted(list(other["test"]) + list(other["train"])) == records
  assert len(tfds_access.hold_out(records, 0.01, seed=0)["test"]) == 1  # at least one
  with pytest.raises(ValueError) as e:
    tfds_access.hold_out([0, 1], 0.8, seed=0)  # round(1.6) = 2: nothing left to train on
  assert str(e.value) == ("test_fraction=0.8 holds out 2 of the train split's 2 "
                          "record(s): none would be left to train on.")


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
      "mmoe_synthetic, multi_digits, scenes, sinusoids), a data set of preprocessed files "
      "(nyuv2_mtan, cityscapes_mtan) nor a TFDS catalog data set; did you mean "
      "'celeb_a', 'celeb_a_hq', 'voxceleb'?")
  assert e.value.__cause__ is None and e.value.__suppress_context__  # no catalog dump
  with pytest.raises(ValueError, match=re.escape(
      "name='no_such_set_xyz' is neither a bundled data set (digits, exam, "
      "mmoe_synthetic, multi_digits, scenes, sinusoids), a data set of preprocessed files "
      "(nyuv2_mtan, cityscapes_mtan) nor a TFDS catalog data set "
      "(tfds.list_builders() lists the catalog).")):
    loading.load("no_such_set_xyz", data_dir=str(tmp_path))


def test_a_bundled_builder_config_under_a_catalog_name_is_one_line_naming_its_owner(tmp_path):
  # The multi_digits config with only the name changed: its builder config is
  # multi_digits', and mnist has none. One line, exit 2, nothing downloaded.
  data_dir = tmp_path / "data"
  r = subprocess.run(
      [sys.executable, "-m", "experiments.main",
       "--config=experiments/configs/multi_digits.py:quick", f"--workdir={tmp_path / 'w'}",
       "--config.data.name=mnist", f"--config.data.data_dir={data_dir}"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
      text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr == ("error: config.data.builder_config='n3000_m600_s0' belongs to the bundled "
                      "data set 'multi_digits', not to 'mnist' (which has no builder configs): "
                      "set builder_config=''.\n")
  assert not data_dir.exists() or not os.listdir(data_dir)
  # A catalog data set with builder configs names a few of them; its own pass.
  names = [c.name for c in tfds.builder_cls("cifar10_corrupted").BUILDER_CONFIGS]
  with pytest.raises(ValueError) as e:
    tfds_access.check_name("cifar10_corrupted", "zzz")
  assert str(e.value) == (
      "builder_config='zzz' is not a builder config of 'cifar10_corrupted' (whose builder "
      f"configs are {', '.join(map(repr, names[:5]))}, ... ({len(names)} in all)): set "
      "builder_config='' or one of them.")
  tfds_access.check_name("cifar10_corrupted", names[-1])


def test_celeba_offline_is_refused_leaving_nothing_behind(tmp_path, offline):
  # A fresh workdir and data_dir: the refusal takes back the workdir it made
  # (and its lock file) and writes nothing into the data_dir.
  config = celeba_config.get_config("quick")
  helpers.with_overrides(config, {"data.data_dir": str(tmp_path / "data"),
                                  "data.download": True})
  with pytest.raises(tfds_access.DataNotAvailableError, match=re.escape(
      "TFDS data set 'celeb_a' (split 'train') is not prepared in data_dir="
      f"'{tmp_path / 'data'}' and could not be downloaded.")):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert os.listdir(tmp_path) == []
  # A workdir that was there before is the user's: it is kept.
  (tmp_path / "mine").mkdir()
  with pytest.raises(tfds_access.DataNotAvailableError):
    train.train_and_evaluate(config, str(tmp_path / "mine"))
  assert sorted(os.listdir(tmp_path)) == ["mine"]


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


def test_an_empty_split_is_one_line_naming_data_set_and_split(tmp_path, tiny_catalog):
  config = helpers.small_sinusoids_config(**{
      "data.name": "multi_digits", "data.builder_config": "n0_m10_s0",
      "data.data_dir": str(tmp_path), "sampling.tasks_per_step": 0})
  with pytest.raises(ValueError) as e:
    build.data_from_config(config)
  assert str(e.value) == ("config.data.builder_config='n0_m10_s0': data set 'multi_digits', "
                          "split 'train' has no examples (num_train=0).")
  assert os.listdir(tmp_path) == []
  # A catalog data set's empty split, on a real prepared builder (TFDS itself
  # raises "Paths sequence can not be of 0 length" for it).
  with pytest.raises(ValueError) as e:
    build.data_from_config(_catalog_config(tiny_catalog, **{"data.name": "tiny_catalog",
                                                           "data.test_split": "test[:0]"}))
  assert str(e.value) == ("config.data.test_split='test[:0]': data set 'tiny_catalog', "
                          "split 'test[:0]' has no examples.")

  class EmptySplitBuilder:  # what TFDS raises writing an empty split we did not foresee
    builder_config = type("Config", (), {"name": "c0"})()

    def download_and_prepare(self):
      raise AssertionError('Failed to finalize writing of split "test": No examples were '
                           "yielded.")
  with pytest.raises(ValueError) as e:
    tfds_access._prepare(EmptySplitBuilder(), "digits")  # pylint: disable=protected-access
  assert str(e.value) == ("builder_config='c0': data set 'digits', split 'test' "
                          "has no examples.")


@pytest.mark.parametrize("overrides, message", [
    ({"data.labels": {"label": "multiclass"}},
     "config.data.labels['label']='multiclass' is not one of ('auto', 'classification', "
     "'binary', 'regression')."),
    ({"data.test_fraction": 1.0},
     "config.data.test_fraction must be in [0, 1) (0 = the data set's own test split), "
     "got 1.0."),
    ({"data.test_fraction": 0.2},
     "config.data.test_fraction=0.2 holds out part of train_split as the test "
     "split: set test_split='' (it is 'test')."),
    ({"data.test_split": ""},
     "config.data.test_split must be a TFDS split string such as 'test' (or '' with "
     "test_fraction > 0), got ''."),
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
    ({"model.arch": "soft", "model.soft.norm": "l1"},
     "config.model: soft.norm='l1' is not one of ('squared', 'l2')."),
    ({"model.hidden": (16, 0)}, "config.model: hidden must be positive integers, got (16, 0)."),
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
     "config.cv.metric='f1' is not one of ('abs_err', 'accuracy', 'loss', 'mae', "
     "'mean_angle', 'median_angle', 'miou', 'mse', 'pix_acc', 'rel_err', 'within_11_25', "
     "'within_22_5', 'within_30')."),
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
       "labels: feature 'attributes/Smiling' (scalar bool) cannot be a "
       "'regression' label (binary: a scalar bool, integer or 2-class label; classification: "
       "a class label or scalar integer; regression: a scalar number)."),
      (celeb, {"labels": {"attributes/Smile": "binary"}},
       "labels: 'attributes/Smile' is not a feature; features are ["),
      (omniglot, {"labels": {"alphabet_char_id": "auto"}},
       "labels: feature 'alphabet_char_id' (scalar int64) needs its kind named: "
       "one of "
       "('classification', 'binary', 'regression')."),
      (omniglot, {"labels": {"alphabet_char_id": "classification", "label": "auto"},
                  "family": "alphabet"},
       "family='alphabet': labels must name exactly one label "
       "feature (every family task's), got ['alphabet_char_id', 'label']."),
      (omniglot, {"labels": {"label": "auto"}, "family": "image"},
       "family='image' must be a scalar integer feature; features are ["),
      (omniglot, {"labels": {"label": "auto"}, "input_key": "img"},
       "input_key='img' is not a feature of this data set; features are ["),
  ]
  for features, kwargs, message in cases:
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      specs.catalog_spec(features, kwargs.get("input_key", "image"), kwargs["labels"],
                         kwargs.get("family", ""))


def test_a_catalog_data_set_not_prepared_offline_fails_in_seconds_saying_how(tmp_path,
                                                                              monkeypatch):
  monkeypatch.setattr(tfds_access, "NETWORK_PROBE", ("127.0.0.1", 9))  # refused: "offline"
  with pytest.raises(tfds_access.DataNotAvailableError) as e:
    build.data_from_config(_catalog_config(tmp_path, **{"data.name": "mnist",
                                                        "data.download": True}))
  assert str(e.value).startswith(
      f"TFDS data set 'mnist' (split 'train') is not prepared in data_dir='{tmp_path}' and "
      "could not be downloaded. On a machine with network run `tfds build mnist "
      "--file_format=array_record --data_dir=DIR` (or set config.data.download=True "
      "there), copy DIR here and pass --config.data.data_dir=DIR. (ConnectionError: no "
      "network: 127.0.0.1:9 not reachable within 5 s")


def test_spec_and_task_errors_come_before_any_download(tmp_path, offline):
  """Nothing prepared, download on, the network refused: a typo in the spec's
  settings or too many tasks is reported from the metadata (``tfds.builder
  .info``), not as a failed download (CelebA's is over 1 GB)."""
  base = {"data.name": "celeb_a", "data.download": True}
  cases = [
      ({"data.labels": {"attributes/Smilin": "binary"}},
       "config.data.labels: 'attributes/Smilin' is not a feature; features are ["),
      ({"data.input_key": "img"},
       "config.data.input_key='img' is not a feature of this data set; features are ["),
      ({"data.family": "alphabet", "data.labels": {"attributes/Smiling": "binary"}},
       "config.data.family='alphabet' must be a scalar integer feature; features are ["),
      ({"data.labels": {"attributes/Smiling": "binary"}, "data.tasks": ("attributes.Smile",)},
       "config.data.tasks: unknown task(s) ['attributes.Smile'] for data set 'celeb_a'; its "
       "tasks are ['attributes.Smiling']."),
      ({"sampling.tasks_per_step": 50},
       "config.sampling.tasks_per_step=50 must be in [1, 40] (or 0 = all tasks) when "
       "sampling tasks without replacement: data set 'celeb_a' has at most 40 tasks (40 "
       "label features)."),
  ]
  for overrides, message in cases:
    config = _catalog_config(tmp_path, **{**base, **overrides})
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      build.data_from_config(config)
  # The same settings without a typo get as far as the (refused) download.
  with pytest.raises(tfds_access.DataNotAvailableError, match="ConnectionError: no network"):
    build.data_from_config(_catalog_config(tmp_path, **{
        **base, "data.labels": {"attributes/Smiling": "binary"}}))


@pytest.mark.parametrize("split, message", [
    ("trainn", "config.data.train_split='trainn': unknown split of data set 'tiny_catalog'; "
               "available: ['train', 'test']."),
    ("train+tset", "config.data.train_split='train+tset': unknown split of data set "
                   "'tiny_catalog'; available: ['train', 'test']."),
    ("train[:0]", "config.data.train_split='train[:0]': data set 'tiny_catalog', split "
                  "'train[:0]' has no examples."),
    ("train[30:]", "config.data.train_split='train[30:]': data set 'tiny_catalog': Requested "
                   "slice [30:20] incompatible with 20 examples (available: ['train', "
                   "'test'])."),
])
def test_a_bad_split_of_a_prepared_catalog_data_set_is_one_line_not_a_download(
    tiny_catalog, offline, split, message):
  config = _catalog_config(tiny_catalog, **{"data.name": "tiny_catalog",
                                            "data.download": True, "data.train_split": split})
  with pytest.raises(ValueError) as e:
    build.data_from_config(config)
  assert str(e.value) == message
  assert not isinstance(e.value, tfds_access.DataNotAvailableError)


def test_a_slice_of_a_prepared_catalog_data_set_loads_offline(tiny_catalog, offline):
  config = _catalog_config(tiny_catalog, **{"data.name": "tiny_catalog",
                                            "data.download": True,
                                            "data.train_split": "train[:6]+test[:2]"})
  data = build.data_from_config(config)
  np.testing.assert_array_equal(data.train["n"], [8])
  np.testing.assert_array_equal(data.test["n"], [10])
  images = data.train["x"][0, :, 0]  # image i is filled with i, its label is i % 2
  np.testing.assert_array_equal(data.train["y"]["classification2"][0], images.astype(int) % 2)


@pytest.mark.parametrize("split, message", [
    ("trainn", "config.data.train_split='trainn': unknown split of data set 'sinusoids'; "
               "available: ['train', 'test']."),
    ("train[:0]", "config.data.train_split='train[:0]': data set 'sinusoids', split "
                  "'train[:0]' has no examples."),
])
def test_a_bad_split_of_a_bundled_data_set_is_one_line(data_dir, split, message):
  config = helpers.small_sinusoids_config(**{"data.train_split": split})
  with pytest.raises(ValueError) as e:
    build.data_from_config(config)
  assert str(e.value) == message


def test_process_0_downloads_a_catalog_data_set_before_the_others_read_it(tmp_path,
                                                                          monkeypatch):
  """Two processes on one disk, in turn: process 0 prepares, then meets the
  others at the barrier; process 1 waits at the barrier first and then reads
  what process 0 wrote, without preparing it again."""
  events = []
  prepare = TinyCatalog.download_and_prepare

  def recorded(self, *args, **kwargs):
    events.append(("prepare", self.is_prepared()))
    return prepare(self, *args, **kwargs)
  monkeypatch.setattr(TinyCatalog, "download_and_prepare", recorded)
  monkeypatch.setattr(tfds_access, "_check_network", lambda: None)  # (nothing is downloaded)
  monkeypatch.setattr(tfds_access, "_barrier", lambda name: events.append(("barrier", name)))
  sizes = []
  for index in (0, 1):
    monkeypatch.setattr(tfds_access, "_processes", lambda i=index: (i, 2))
    events.append(("process", index))
    _, sources = tfds_access.open_sources("tiny_catalog", data_dir=str(tmp_path), download=True)
    sizes.append({s: len(src) for s, src in sources.items()})
  assert events == [("process", 0), ("prepare", False), ("barrier", "mtljax-prepared-tiny_catalog"),
                    ("process", 1), ("barrier", "mtljax-prepared-tiny_catalog")]
  assert sizes == [{"train": 20, "test": 10}] * 2


def test_a_class_count_from_the_data_is_the_largest_over_every_process_shard():
  """Two processes' shards of a family's train split (the host pipeline): the
  shard without the largest class gets the same class count as the other,
  through one all-process maximum (simulated with two threads; the real
  two-process run is the slow test below)."""
  spec = specs.DataSpec("x", (specs.TaskColumn(
      tasks_lib.Task("f_", "classification", 2), "y", classes_from_data=True),), split_key="f")

  def shard(labels):
    split = {"x": np.zeros((4, 2), np.float32), "y": np.asarray(labels, np.int64),
             "f": np.asarray([0, 1, 0, 1], np.int64)}
    return {"train": split, "test": split}
  shards = [shard([0, 1, 2, 3]), shard([0, 6, 1, 2])]  # largest classes 3 and 6
  gathered, barrier, counts = [None, None], threading.Barrier(2), [None, None]

  def run(i):
    def reduce_max(local):
      gathered[i] = local
      barrier.wait(timeout=30)
      return np.max(np.stack(gathered), axis=0)
    data = task_data.build_task_data("fam", spec, shards[i], reduce_max=reduce_max)
    counts[i] = sorted({t.num_classes for t in data.taskset})
  threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert [g.tolist() for g in gathered] == [[4], [7]]  # each shard's own max + 1
  assert counts == [[7], [7]]  # both: the largest over the two shards
  # One process: the all-process maximum is the value itself.
  np.testing.assert_array_equal(task_data.all_process_max(np.asarray([4, 2])), [4, 2])


@pytest.mark.slow
def test_two_processes_agree_on_a_class_count_from_their_shards():
  """Two processes (gloo on localhost, about 11 s on 2 cores), each with its own shard of
  a family's train split as on the host pipeline: the shard without the
  largest class gets the same class count as the other (one model)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "tests/catalog_worker.py", f"127.0.0.1:{port}",
                             str(i)], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert [(g["pid"], g["processes"], g["own"]) for g in got] == [(0, 2, 4), (1, 2, 7)]
  assert [g["counts"] for g in got] == [[7], [7]]  # both: the largest over the two shards


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


@pytest.mark.slow
def test_the_celeba_config_trains_every_attribute_on_mock_faces(tmp_path):
  """The CelebA config itself (its CNN, 40 binary heads on shared inputs, its
  pipeline choice), shrunk only in steps and batch, trained on TFDS mock
  records in celeb_a's exact features (218x178x3 faces): each attribute's
  label is constant (attribute j is true iff j % 3 == 0), so after training
  every task's test accuracy is 1 and its loss below log 2, and the tasks are
  the 40 attributes in the data set's order."""
  from mtljax import train  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=1):
    names = list(tfds.builder("celeb_a").info.features["attributes"].keys())
  assert len(names) == 40   # celeb_a's published attribute order:
  assert names[:4] == ["5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes"]
  assert names[-1] == "Young"

  def records(n, seed):
    rng = np.random.default_rng(seed)
    return [{"image": rng.integers(0, 256, (218, 178, 3), dtype=np.uint8),
             "attributes": {a: np.bool_(j % 3 == 0) for j, a in enumerate(names)},
             "landmarks": {k: np.int64(0) for k in (
                 "lefteye_x", "lefteye_y", "righteye_x", "righteye_y", "nose_x", "nose_y",
                 "leftmouth_x", "leftmouth_y", "rightmouth_x", "rightmouth_y")}}
            for _ in range(n)]
  made = {"train": records(48, 0), "validation": records(8, 1), "test": records(16, 2)}
  config = celeba_config.get_config("quick")
  helpers.with_overrides(config, {
      "data.data_dir": str(tmp_path / "data"), "data.download": False,
      "optim.lr": 3e-2, "sampling.examples_per_task": 8, "total_steps": 30,
      "steps_per_call": 10, "log_steps": 10, "eval_steps": 30, "checkpoint_steps": 30,
      "eval_batch_size": 16, "tensorboard": False, "plots": False})
  with tfds.testing.mock_data(as_data_source_fn=lambda self, split: made[split]):
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  tasks = summary["tasks"]
  assert list(tasks) == [f"attributes.{a}" for a in names]
  for name, metrics in tasks.items():
    assert metrics["accuracy"] == 1.0, (name, metrics)
    assert metrics["loss"] < np.log(2.0), (name, metrics)
