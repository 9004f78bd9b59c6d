"""Shared fixtures: one data directory per test session (bundled data sets are
generated into it on first use; nothing is downloaded)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tfds"))
  old = os.environ.get("MTLJAX_DATA_DIR")
  os.environ["MTLJAX_DATA_DIR"] = path
  yield path
  if old is None:
    os.environ.pop("MTLJAX_DATA_DIR", None)
  else:
    os.environ["MTLJAX_DATA_DIR"] = old
