"""Shared fixtures: one data directory per test session (bundled data sets are
generated into it on first use; nothing is downloaded).

XLA's persistent compilation cache is on for the suite (set here, before any
test imports jax; worker subprocesses inherit it through the environment):
the suite compiles the same small programs in many tests and processes, and
reading them back halves its time on 2 cores. It changes no result (a cached
executable is the one XLA would compile for the same program and flags) and no
compile count the tests assert (those count jit traces). Override with
``JAX_COMPILATION_CACHE_DIR``."""

import os

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(_ROOT, ".pytest_cache", "jax-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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
