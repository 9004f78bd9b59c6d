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


# ----------------------------------------------------------------------------
# Scheduling on xdist workers: `--dist loadfile --no-loadscope-reorder` (both
# tiers, setup.cfg and scripts/test.sh) makes every test file one work unit,
# run by one worker, handed out in this file's order.
#
# * Why: a file's tests share compiled programs (module fixtures, per-process
#   caches of built steps and methods, identical programs hit XLA's persistent
#   cache). Handed out test by test, neighbouring tests of a file ran on both
#   workers at the same moment, so each worker compiled the file's shared
#   programs itself, concurrently, and neither found it in the persistent cache
#   (a 66 s module fixture of test_backbone_models was compiled twice at once).
#   (`--dist loadgroup` with xdist_group marks would group finer, but xdist 3.8
#   marks a group by rewriting ``item._nodeid``, which pytest 9.2 no longer
#   reads: the groups were silently ignored.)
# * Order: the files with the most worker-seconds are handed out first, so that
#   none of them starts last and leaves the other worker idle (longest
#   processing time first; measured per file in BUILD_NOTES, "Suite time").
#   Order only: nothing is skipped, and a file missing here keeps its place.
# ----------------------------------------------------------------------------
_HEAVIEST_FILES_FIRST = (  # both tiers' worker-seconds, heaviest first
    "test_backbone_models.py", "test_objectives.py", "test_sharding.py",
    "test_jacobians.py", "test_segnet.py", "test_transfer.py", "test_gradients.py",
    "test_experiments.py", "test_cv.py", "test_x64.py", "test_objectives_new.py",
    "test_sharing_experiments.py", "test_partial_labels.py", "test_experts.py",
    "test_hard_jacobians.py", "test_models.py", "test_sharing.py", "test_train.py",
    "test_pipeline.py", "test_faults.py", "test_dense_tasks.py", "test_toy.py",
    "test_accel.py", "test_model_references.py", "test_seeds.py", "test_notebook.py",
)


def _file_rank(item) -> int:
  name = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
  try:
    return _HEAVIEST_FILES_FIRST.index(name)
  except ValueError:
    return len(_HEAVIEST_FILES_FIRST)


def pytest_collection_modifyitems(config, items):  # pylint: disable=unused-argument
  items.sort(key=_file_rank)  # stable: each file's tests keep their order


# ----------------------------------------------------------------------------
# Compile accounting. Every XLA compile request (a jit program, or an eager
# op's one-op program, the first time a process sees it; answered by the
# persistent cache or not) is counted, per test and per process: compilation
# is most of the suite's time, and the count, unlike seconds, does not depend
# on the machine's speed (only, a little, on which worker runs which test).
#
# * MTLJAX_COMPILE_REPORT=FILE appends one JSON line per test (nodeid, wall
#   seconds, compile requests, persistent-cache hits, compile seconds, and
#   per program name its requests and seconds): the profile BUILD_NOTES'
#   suite table comes from.
# * The budget: a run of the whole fast tier from the repository root (bare
#   ``pytest``, or ``scripts/test.sh``'s first tier; no paths, no ``-k``) on
#   at most 2 xdist workers fails when its compile requests, summed over the
#   workers, exceed FAST_TIER_COMPILE_BUDGET by more than 50 %: a new test
#   that compiles a new program per case shows up here, not as a slowly
#   doubling suite. Each worker compiles the programs its tests share again,
#   so the sum grows with the number of workers (one process compiles
#   fewest); it was measured on 2. Raise the budget, with the reason in
#   BUILD_NOTES, only for compilations a new code path needs.
# ----------------------------------------------------------------------------
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402  (after the cache settings above)

# mtljax's XLA_FLAGS workarounds (mtljax/xla_workarounds.py) take effect only
# if mtljax is imported before the first JAX computation: import it here, so
# that no test file's module-level JAX code runs first.
import mtljax  # noqa: E402,F401  pylint: disable=unused-import

_COUNTS = {"requests": 0, "hits": 0, "seconds": 0.0}
_PROGRAMS: dict = {}  # fun_name -> [requests, seconds], this test's (for the report)


def _on_duration(event, duration, fun_name="?", **_):
  if event == "/jax/core/compile/backend_compile_duration":
    _COUNTS["requests"] += 1
    _COUNTS["seconds"] += duration
    entry = _PROGRAMS.setdefault(fun_name, [0, 0.0])
    entry[0] += 1
    entry[1] += duration


def _on_event(event, **_):
  if event == "/jax/compilation_cache/cache_hits":
    _COUNTS["hits"] += 1


jax.monitoring.register_event_duration_secs_listener(_on_duration)
jax.monitoring.register_event_listener(_on_event)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):  # pylint: disable=unused-argument
  before = dict(_COUNTS)
  _PROGRAMS.clear()
  start = time.perf_counter()
  yield
  path = os.environ.get("MTLJAX_COMPILE_REPORT")
  if path:
    row = {"test": item.nodeid, "wall_s": round(time.perf_counter() - start, 3),
           "compiles": _COUNTS["requests"] - before["requests"],
           "cache_hits": _COUNTS["hits"] - before["hits"],
           "compile_s": round(_COUNTS["seconds"] - before["seconds"], 3),
           "programs": {k: [n, round(sec, 3)] for k, (n, sec) in _PROGRAMS.items()}}
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")


# Compile requests of the whole fast tier on 2 xdist workers (one file per
# worker at a time), measured with an empty persistent cache (see BUILD_NOTES,
# "Suite time": 4,925 at 377417c). The run fails above 1.5x.
FAST_TIER_COMPILE_BUDGET = 5000
_BUDGET_SLACK = 1.5


def _whole_fast_tier(config) -> bool:
  workers = config.getoption("numprocesses", None)
  return (FAST_TIER_COMPILE_BUDGET > 0 and config.getoption("markexpr") == "not slow"
          and not config.getoption("keyword")
          and config.args_source == pytest.Config.ArgsSource.TESTPATHS
          and (not workers or workers <= 2))


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  config = session.config
  if hasattr(config, "workeroutput"):     # an xdist worker: report to the controller
    config.workeroutput["mtljax_compiles"] = _COUNTS["requests"]
    return
  total = _COUNTS["requests"] + getattr(config, "_mtljax_worker_compiles", 0)
  config._mtljax_compiles = total  # pylint: disable=protected-access
  if (_whole_fast_tier(config) and session.testscollected
      and total > _BUDGET_SLACK * FAST_TIER_COMPILE_BUDGET):
    config._mtljax_over_budget = True  # pylint: disable=protected-access
    if session.exitstatus == pytest.ExitCode.OK:
      session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
  if error:  # a crashed worker reports nothing (and may be reported down twice)
    return
  config = node.config
  config._mtljax_worker_compiles = (  # pylint: disable=protected-access
      getattr(config, "_mtljax_worker_compiles", 0)
      + getattr(node, "workeroutput", {}).get("mtljax_compiles", 0))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  del exitstatus
  total = getattr(config, "_mtljax_compiles", None)
  if total is None or hasattr(config, "workeroutput"):
    return
  terminalreporter.write_line(
      f"XLA compile requests: {total} (the whole fast tier's budget: "
      f"{FAST_TIER_COMPILE_BUDGET}, fails above {int(_BUDGET_SLACK * FAST_TIER_COMPILE_BUDGET)})")
  if getattr(config, "_mtljax_over_budget", False):
    terminalreporter.write_line(
        f"FAILED: the fast tier made {total} XLA compile requests, more than "
        f"{_BUDGET_SLACK}x its budget of {FAST_TIER_COMPILE_BUDGET} "
        "(tests/conftest.py). Share compiled programs across the new cases (one jit, "
        "vmap over data, session fixtures) or move the matrix to the slow tier.", red=True)
