"""NYUv2 / Cityscapes readers (mtljax/data/dense_files.py) on mock files in
exactly MTAN's preprocessed layout: prepared once, read back equal to the
files, and every bad input a one-line DataError naming the file or folder."""

import os
import re
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mtljax import errors
from mtljax.data import dense_files as df
from mtljax.data import pipeline
from mtljax.data import split_parts
from mtljax.data import tfds_access

NYU_H, NYU_W = df.NYUV2_SHAPE
CITY_H, CITY_W = 128, 256


def write_nyuv2(root: str, counts=(("train", 2), ("val", 1)), seed: int = 0) -> dict:
  """Full-size NYUv2 files as MTAN's release lays them out (HWC, labels
  float32 with -1 ignored, depth [H, W, 1] with 0 missing, unit normals with
  0 missing); returns what was written, per folder and index."""
  r = np.random.default_rng(seed)
  written = {}
  for sub, n in counts:
    for field in ("image", "label", "depth", "normal"):
      os.makedirs(os.path.join(root, sub, field), exist_ok=True)
    for i in range(n):
      normal = r.normal(size=(NYU_H, NYU_W, 3))
      normal /= np.linalg.norm(normal, axis=-1, keepdims=True)
      normal[r.random((NYU_H, NYU_W)) < 0.1] = 0
      depth = r.uniform(0.5, 10, (NYU_H, NYU_W, 1))
      depth[r.random((NYU_H, NYU_W)) < 0.1] = 0
      arrays = {"image": r.random((NYU_H, NYU_W, 3)).astype(np.float32),
                "label": r.integers(-1, 13, (NYU_H, NYU_W)).astype(np.float32),
                "depth": depth.astype(np.float32), "normal": normal.astype(np.float32)}
      for field, x in arrays.items():
        np.save(os.path.join(root, sub, field, f"{i}.npy"), x)
      written[sub, i] = arrays
  return written


def write_cityscapes(root: str, counts=(("train", 3), ("val", 2)), seed: int = 0,
                     label_folders=("label_7", "label_19")) -> dict:
  """128x256 Cityscapes files as MTAN's release (label_7, label_19: int64
  with -1 ignored; inverse depth [H, W, 1], 0 missing)."""
  r = np.random.default_rng(seed)
  written = {}
  for sub, n in counts:
    for field in ("image", "depth") + tuple(label_folders):
      os.makedirs(os.path.join(root, sub, field), exist_ok=True)
    for i in range(n):
      depth = r.uniform(0.0, 0.3, (CITY_H, CITY_W, 1)).astype(np.float32)
      depth[depth < 0.03] = 0
      arrays = {"image": r.random((CITY_H, CITY_W, 3)).astype(np.float32), "depth": depth}
      for folder in label_folders:
        c = 19 if folder.endswith("19") else 7
        arrays[folder] = r.integers(-1, c, (CITY_H, CITY_W)).astype(np.int64)
      for field, x in arrays.items():
        np.save(os.path.join(root, sub, field, f"{i}.npy"), x)
      written[sub, i] = arrays
  return written


# ----------------------------------------------------------------------------
# Preparing and reading back.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nyuv2(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("nyuv2"))
  data_dir = str(tmp_path_factory.mktemp("nyuv2_tfds"))
  written = write_nyuv2(root)
  features, sources = df.open_dense("nyuv2_mtan", root, data_dir=data_dir)
  return root, data_dir, written, features, sources


def test_nyuv2_records_equal_the_files(nyuv2):
  _, _, written, features, sources = nyuv2
  assert {s: len(src) for s, src in sources.items()} == {"train": 2, "test": 1}
  shapes = {k: (tuple(f.shape), np.dtype(f.np_dtype)) for k, f in features.items()}
  assert shapes == {"image": ((NYU_H, NYU_W, 3), np.float32),
                    "label": ((NYU_H, NYU_W), np.int32),
                    "depth": ((NYU_H, NYU_W, 1), np.float32),
                    "normal": ((NYU_H, NYU_W, 3), np.float32)}
  for (sub, i), arrays in written.items():
    record = sources["train" if sub == "train" else "test"][i]
    for field, x in arrays.items():
      assert record[field].dtype == (np.int32 if field == "label" else np.float32)
      np.testing.assert_array_equal(record[field], x)  # bitwise (labels exact ints)


def test_nyuv2_is_prepared_once_and_reused(nyuv2):
  root, data_dir, _, _, _ = nyuv2
  b = df.builder("nyuv2_mtan", root, data_dir=data_dir, prepare=False)
  assert b.is_prepared()
  files = sorted(os.path.join(d, f) for d, _, fs in os.walk(b.data_dir) for f in fs)
  before = {f: os.stat(f).st_mtime_ns for f in files}
  _, sources = df.open_dense("nyuv2_mtan", root, data_dir=data_dir)
  assert {f: os.stat(f).st_mtime_ns for f in files} == before  # nothing rewritten
  assert len(sources["train"]) == 2
  assert os.listdir(os.path.dirname(b.data_dir.rstrip("/"))) == ["1.0.0"]


def test_the_pipelines_readers_read_the_prepared_records(nyuv2):
  """The host pipeline's fast path (the image's raw bytes out of the
  serialized record) and the device path's column read give the files."""
  _, _, written, _, sources = nyuv2
  reader = pipeline.Reader(sources["train"], "image", (NYU_H, NYU_W, 3), np.dtype(np.float32))
  assert reader.raw is not None
  got = reader.inputs(np.array([1, 0, 1]))
  for k, i in enumerate((1, 0, 1)):
    np.testing.assert_array_equal(got[k], written["train", i]["image"])
  # ... and the device path's column read.
  cols = tfds_access.read_columns(sources["train"], ["label", "normal"])
  for i in range(2):
    np.testing.assert_array_equal(cols["label"][i], written["train", i]["label"])
    np.testing.assert_array_equal(cols["normal"][i], written["train", i]["normal"])


def test_dense_bytes_states_float32_sizes(nyuv2):
  _, _, _, features, sources = nyuv2
  sizes = df.dense_bytes(df.NYUV2_SHAPE, 795, normals=True)
  assert sizes["image"] == 795 * 288 * 384 * 3 * 4 == 1_055_047_680  # 0.98 GiB
  assert sizes["total"] == 795 * 288 * 384 * 8 * 4
  record = sources["train"][0]
  assert sizes["total"] == 795 * sum(x.nbytes for x in record.values())
  assert {k: v // 795 for k, v in sizes.items() if k != "total"} == {
      k: x.nbytes for k, x in record.items()}
  assert df.source_bytes(features, sources) == {
      s: df.dense_bytes(df.NYUV2_SHAPE, n, normals=True) for s, n in (("train", 2), ("test", 1))}
  city = df.layout_bytes(df.cityscapes_layout(7), {"train": 2975, "test": 500})
  assert city["train"]["total"] == 2975 * 128 * 256 * 5 * 4 and "normal" not in city["test"]


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("cityscapes"))
  return root, write_cityscapes(root)


def test_cityscapes_class_count_chooses_the_label_folder(cityscapes_root, tmp_path):
  root, written = cityscapes_root
  for classes in (7, 19):
    features, sources = df.open_dense("cityscapes_mtan", root, classes=classes,
                                      data_dir=str(tmp_path))
    assert set(features) == {"image", "label", "depth"}
    assert {s: len(v) for s, v in sources.items()} == {"train": 3, "test": 2}
    for (sub, i), arrays in written.items():
      record = sources["train" if sub == "train" else "test"][i]
      np.testing.assert_array_equal(record["label"], arrays[f"label_{classes}"])
      np.testing.assert_array_equal(record["depth"], arrays["depth"])
      np.testing.assert_array_equal(record["image"], arrays["image"])
  assert len(os.listdir(os.path.join(str(tmp_path), "cityscapes_mtan"))) == 2


def test_libmtls_label_folder_and_a_changed_file_prepares_a_new_copy(tmp_path):
  root = str(tmp_path / "cityscapes2")
  written = write_cityscapes(root, counts=(("train", 2), ("val", 1)), label_folders=("label",))
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(errors.DataError, match=r"label_7' is missing \(choose the labels"):
    df.open_dense("cityscapes_mtan", root, data_dir=data_dir)
  _, sources = df.open_dense("cityscapes_mtan", root, label_folder="label", data_dir=data_dir)
  np.testing.assert_array_equal(sources["test"][0]["label"], written["val", 0]["label"])
  # Rewrite one file: a new fingerprint, a new prepared copy with the new values.
  new = np.zeros((CITY_H, CITY_W), np.int64)
  path = os.path.join(root, "val", "label", "0.npy")
  np.save(path, new)
  os.utime(path, ns=(1, 1))
  _, sources = df.open_dense("cityscapes_mtan", root, label_folder="label", data_dir=data_dir)
  np.testing.assert_array_equal(sources["test"][0]["label"], new)
  assert len(os.listdir(os.path.join(data_dir, "cityscapes_mtan"))) == 2


# ----------------------------------------------------------------------------
# Bad input: one line, naming the file or folder, before anything is written.
# ----------------------------------------------------------------------------


def _save(path, x):
  np.save(path, x)


def _rename_everywhere(root, sub, old, new):
  for field in os.listdir(os.path.join(root, sub)):
    os.rename(os.path.join(root, sub, field, old), os.path.join(root, sub, field, new))


def _nan_depth(root):
  d = np.load(os.path.join(root, "train/depth/1.npy"))
  d[5, 7, 0] = np.nan
  _save(os.path.join(root, "train/depth/1.npy"), d)


CITY_ERRORS = [
    ("missing root", lambda r: shutil.rmtree(r), {}, r"ROOT '{root}' is not a directory"),
    ("missing split", lambda r: shutil.rmtree(os.path.join(r, "val")), {},
     r"folder '{root}/val' is missing \(it holds: train\)"),
    ("missing field", lambda r: shutil.rmtree(os.path.join(r, "train/depth")), {},
     r"folder '{root}/train/depth' is missing"),
    ("missing class folder", lambda r: None, {"classes": 2},
     r"folder '{root}/train/label_2' is missing \(choose"),
    ("mismatched counts", lambda r: os.remove(os.path.join(r, "val/depth/1.npy")), {},
     r"folder '{root}/val/depth' has 1 files but '{root}/val/image' has 2"),
    ("not contiguous", lambda r: _rename_everywhere(r, "train", "1.npy", "7.npy"), {},
     r"file '{root}/train/image/1.npy' is missing: .* not numbered 0..2 \(the highest is 7.npy\)"),
    ("bad name", lambda r: _save(os.path.join(r, "train/depth/01.npy"), np.zeros(1)), {},
     r"file '{root}/train/depth/01.npy' is not named"),
    ("wrong shape", lambda r: _save(os.path.join(r, "train/depth/2.npy"),
                                    np.ones((CITY_H, CITY_W), np.float32)), {},
     r"file '{root}/train/depth/2.npy' has shape \(128, 256\); depth files are \(128, 256, 1\)"),
    ("wrong resolution", lambda r: _save(os.path.join(r, "val/image/0.npy"),
                                         np.ones((256, 512, 3), np.float32)), {},
     r"file '{root}/val/image/0.npy' has shape \(256, 512, 3\)"),
    ("integer image", lambda r: _save(os.path.join(r, "val/image/1.npy"),
                                      np.ones((CITY_H, CITY_W, 3), np.uint8)), {},
     r"file '{root}/val/image/1.npy' has dtype uint8"),
    ("NaN depth", _nan_depth, {}, r"file '{root}/train/depth/1.npy' \(depth\) contains NaN"),
    ("negative depth", lambda r: _save(os.path.join(r, "train/depth/0.npy"),
                                       -np.ones((CITY_H, CITY_W, 1), np.float32)), {},
     r"file '{root}/train/depth/0.npy' has negative depth -1"),
    ("label too large", lambda r: _save(os.path.join(r, "val/label_7/1.npy"),
                                        np.full((CITY_H, CITY_W), 7, np.int64)), {},
     r"file '{root}/val/label_7/1.npy' has label 7 outside \[-1, 7\)"),
    ("label below -1", lambda r: _save(os.path.join(r, "train/label_19/0.npy"),
                                       np.full((CITY_H, CITY_W), -2.0, np.float32)),
     {"classes": 19}, r"file '{root}/train/label_19/0.npy' has label -2 outside \[-1, 19\)"),
    ("fractional label", lambda r: _save(os.path.join(r, "train/label_7/0.npy"),
                                         np.full((CITY_H, CITY_W), 2.5, np.float32)), {},
     r"file '{root}/train/label_7/0.npy' has a label 2.5 that is not an integer"),
    ("not npy", lambda r: open(os.path.join(r, "train/image/0.npy"), "wb").write(b"junk"), {},
     r"file '{root}/train/image/0.npy' is not a readable .npy array"),
]


@pytest.mark.parametrize("what, damage, kwargs, message", CITY_ERRORS,
                         ids=[c[0] for c in CITY_ERRORS])
def test_bad_cityscapes_files_are_one_line_errors_naming_the_file(
    what, damage, kwargs, message, cityscapes_root, tmp_path):
  del what
  root = str(tmp_path / "city")
  shutil.copytree(cityscapes_root[0], root)
  damage(root)
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(errors.DataError) as e:
    df.open_dense("cityscapes_mtan", root, data_dir=data_dir, **kwargs)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("cityscapes_mtan: ")
  assert re.search(message.format(root=re.escape(root)), msg), msg
  assert not os.path.exists(os.path.join(data_dir, "cityscapes_mtan"))  # nothing prepared


def test_bad_nyuv2_shape_names_the_file(tmp_path):
  root = str(tmp_path / "nyu")
  write_nyuv2(root, counts=(("train", 1), ("val", 1)))
  np.save(os.path.join(root, "val/normal/0.npy"), np.zeros((3, NYU_H, NYU_W), np.float32))
  with pytest.raises(errors.DataError,
                     match=r"val/normal/0.npy' has shape \(3, 288, 384\); normal files are "
                           r"\(288, 384, 3\)"):
    df.validate(root, df.nyuv2_layout())


def test_bad_options_name_the_option():
  with pytest.raises(ValueError, match="classes=13: MTAN's preprocessed Cityscapes"):
    df.layout_of("cityscapes_mtan", classes=13)
  with pytest.raises(ValueError, match=r"shape=\(64, 80\)"):
    df.layout_of("cityscapes_mtan", shape=(64, 80))
  with pytest.raises(ValueError, match="nyuv2_mtan has 13 classes"):
    df.layout_of("nyuv2_mtan", classes=7)
  with pytest.raises(ValueError, match="'nyu' is not a preprocessed dense data set"):
    df.layout_of("nyu")


# ----------------------------------------------------------------------------
# Splits over TFDS's in-memory limit: written in parts, read as one split.
# ----------------------------------------------------------------------------

CITY_RECORD = CITY_H * CITY_W * (3 + 1 + 1) * 4  # raw bytes of one record's arrays


@pytest.fixture(scope="module")
def parted(tmp_path_factory):
  """Cityscapes files (5 train, 3 val) prepared with parts of 2 records:
  train in parts of 2, 2, 1 and val of 2, 1."""
  root = str(tmp_path_factory.mktemp("city_parts"))
  data_dir = str(tmp_path_factory.mktemp("city_parts_tfds"))
  written = write_cityscapes(root, counts=(("train", 5), ("val", 3)), seed=3)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(split_parts, "PART_BYTES", 2 * split_parts.raw_record_bytes(
        df.record_features((CITY_H, CITY_W), normals=False)))
    features, sources = df.open_dense("cityscapes_mtan", root, data_dir=data_dir)
  return root, data_dir, written, features, sources


def test_a_split_over_the_part_size_is_one_split_of_several_shards(parted):
  root, data_dir, _, _, sources = parted
  b = df.builder("cityscapes_mtan", root, data_dir=data_dir, prepare=False)
  assert b.is_prepared()
  assert {s: list(i.shard_lengths) for s, i in b.info.splits.items()} == {
      "train": [2, 2, 1], "test": [2, 1]}  # the parts are hidden: no train_part0
  assert sorted(f for f in os.listdir(b.data_dir) if "array_record" in f) == [
      f"cityscapes_mtan-test.array_record-0000{k}-of-00002" for k in range(2)] + [
      f"cityscapes_mtan-train.array_record-0000{k}-of-00003" for k in range(3)]
  assert {s: len(v) for s, v in sources.items()} == {"train": 5, "test": 3}
  # ... read again from the directory alone (dataset_info.json), as TFDS does.
  again = tfds.builder_from_directory(b.data_dir)
  assert [again.info.splits[s].num_examples for s in ("train", "test")] == [5, 3]


def test_parted_records_read_back_in_file_order_bitwise_through_both_readers(parted):
  _, _, written, _, sources = parted
  for split, sub, n in (("train", "train", 5), ("test", "val", 3)):
    src = sources[split]
    for i in range(n):  # record access
      for field, file_field in (("image", "image"), ("label", "label_7"), ("depth", "depth")):
        assert src[i][field].tobytes() == written[sub, i][file_field].astype(
            src[i][field].dtype).tobytes()
    # The device path's column read, records across the parts in any order.
    order = np.array([n - 1, 0, n // 2, 1, n - 1])
    cols = tfds_access.read_columns(src, ["image", "label", "depth"], indices=order, chunk=2)
    for k, i in enumerate(order):
      np.testing.assert_array_equal(cols["image"][k], written[sub, i]["image"])
      np.testing.assert_array_equal(cols["label"][k], written[sub, i]["label_7"])
      np.testing.assert_array_equal(cols["depth"][k], written[sub, i]["depth"])
    # The host pipeline's Reader, on the raw array_record reader (fast path).
    reader = pipeline.Reader(src, "image", (CITY_H, CITY_W, 3), np.dtype(np.float32))
    assert reader.raw is not None
    got = reader.inputs(order)
    for k, i in enumerate(order):
      assert got[k].tobytes() == written[sub, i]["image"].tobytes()


def test_slices_of_a_parted_split_cross_the_parts(parted):
  root, data_dir, written, _, _ = parted
  b = df.builder("cityscapes_mtan", root, data_dir=data_dir, prepare=False)
  src = b.as_data_source(split="train[1:4]")  # parts hold 0-1, 2-3, 4
  assert len(src) == 3
  for k in range(3):
    np.testing.assert_array_equal(src[k]["depth"], written["train", k + 1]["depth"])


def test_the_record_bound_covers_each_serialised_record(parted, nyuv2):
  """Each record as written (the raw array_record bytes) is at most the bound
  the parts are sized by, and less than 256 bytes under it."""
  for features, sources, arrays in ((parted[3], parted[4], CITY_RECORD),
                                    (nyuv2[3], nyuv2[4], NYU_H * NYU_W * 8 * 4)):
    bound = split_parts.raw_record_bytes(features)
    assert bound == arrays + split_parts.RECORD_OVERHEAD
    for src in sources.values():
      sizes = [len(src.data_source[i]) for i in range(len(src))]
      assert all(arrays < s <= bound for s in sizes), (sizes, bound)


def test_parts_stay_within_tfds_in_memory_limit(tmp_path, monkeypatch):
  """With TFDS's own limit lowered to 2 records' bytes (its Shuffler would
  then spill a 3-record split through TensorFlow, which is not installed),
  the parts are sized by it and preparing a 5-record split succeeds."""
  from tensorflow_datasets.core import shuffle as tfds_shuffle
  record = split_parts.raw_record_bytes(df.record_features((CITY_H, CITY_W), normals=False))
  monkeypatch.setattr(tfds_shuffle, "MAX_MEM_BUFFER_SIZE", 2 * record)
  root = str(tmp_path / "city")
  written = write_cityscapes(root, counts=(("train", 5), ("val", 1)), seed=4,
                             label_folders=("label_7",))
  _, sources = df.open_dense("cityscapes_mtan", root, data_dir=str(tmp_path / "tfds"))
  assert [sources["train"][i]["image"].tobytes() for i in range(5)] == [
      written["train", i]["image"].tobytes() for i in range(5)]


def test_part_ranges_cover_the_split_in_order():
  record = 1000
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(split_parts, "PART_BYTES", 3500)  # 3 records per part
    assert split_parts.records_per_part(record) == 3
    for n in (1, 2, 3, 4, 7, 9, 10):
      ranges = split_parts.part_ranges(n, record)
      assert len(ranges) == -(-n // 3)
      assert [lo for lo, _ in ranges] == list(range(0, n, 3))
      assert [hi for _, hi in ranges] == [min(lo + 3, n) for lo, _ in ranges]
      names = split_parts.part_names("train", len(ranges))
      assert names == (["train"] if n <= 3 else [f"train_part{p}" for p in range(len(ranges))])
    with pytest.raises(ValueError, match="one record of 4000 bytes is over the 3500 bytes"):
      split_parts.part_ranges(2, 4000)
  assert split_parts.records_per_part(record) == (1000 << 20) // record  # TFDS's 1000 MiB
  with pytest.raises(ValueError, match="looks like a part's name"):
    split_parts.part_names("train_part3", 2)


def test_not_enough_disk_is_one_line_before_anything_is_read(tmp_path, monkeypatch):
  root = str(tmp_path / "city")
  write_cityscapes(root, counts=(("train", 2), ("val", 1)), label_folders=("label_7",))
  monkeypatch.setattr(split_parts, "_free_bytes", lambda path: 1 << 20)
  monkeypatch.setattr(df, "check_files", None)  # (reading a file would fail)
  monkeypatch.setattr(df, "read_example", None)
  with pytest.raises(errors.DataError) as e:
    df.open_dense("cityscapes_mtan", root, data_dir=str(tmp_path / "tfds"))
  assert not df.builder("cityscapes_mtan", root, data_dir=str(tmp_path / "tfds"),
                        prepare=False).is_prepared()
  msg = str(e.value)
  assert "\n" not in msg
  need = 3 * (CITY_RECORD + split_parts.RECORD_OVERHEAD) / 2**20
  assert re.fullmatch(rf"cityscapes_mtan/c7_128x256_\w+: preparing needs about {need:.1f} MiB "
                      rf"in '.*' \(train 2, test 1 records\) but only 1.0 MiB is free there.",
                      msg), msg
