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


# The longest tests (a minute or so each on 2 cores), started first: pytest-xdist
# hands tests out in collection order, and one of these drawn last would leave
# the other worker idle for its whole length. Order only; nothing is skipped.
_LONGEST_FIRST = (
    "test_sharding.py::test_sharded_runs_equal_one_device_for_every_mesh_and_method_kind",
    "test_sharding.py::test_cross_validation_and_transfer_run_on_the_mesh",
    "test_sharing_experiments.py::test_exam_experiment_reports_held_out_mse_per_approach",
    "test_transfer.py::test_transfer_digits_experiment_writes_results_per_strategy_and_shots",
    "test_pipeline.py::test_two_processes_read_disjoint_shards_and_train_on_a_global_mesh",
    "test_sharing_experiments.py::test_mmoe_sweep_writes_curves_repetitions_and_paired_gaps",
    "test_toy.py::test_cagrad_protocol_reproduces_the_papers_picture",
    "test_sharding.py::test_two_processes_on_a_global_mesh_of_eight_equal_one_process",
    "test_notebook.py::test_quickstart_notebook_executes",
    "test_readme.py::test_readme_notebook_example_runs_and_its_numbers_are_sums_over_a_call",
    "test_objectives.py::test_accumulated_gram_path_never_holds_the_per_task_jacobian",
    "test_sharding.py::test_a_run_resumes_on_another_mesh",
)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  def rank(item):
    for i, name in enumerate(_LONGEST_FIRST):
      if name in item.nodeid:
        return i
    return len(_LONGEST_FIRST)
  items.sort(key=rank)  # stable: the rest keep their order
