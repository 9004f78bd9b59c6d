"""Task and example sampling: distributions (fixed seed, statistical bounds)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax import tasks
from mtljax.data import sampling
from mtljax.data import specs
from mtljax.data import task_data

SIZES = np.array([10, 1000, 50, 5000, 200])  # very unequal data sizes
DRAWS = 40_000


def _draws(probs, k, replace):
  keys = jax.random.split(jax.random.key(0), DRAWS)
  f = jax.jit(jax.vmap(lambda r: sampling.sample_tasks(r, jnp.asarray(probs, jnp.float32),
                                                       k, replace)))
  return np.asarray(f(keys))  # [DRAWS, K]


def _assert_frequencies(counts, total, p):
  # Each count is Binomial(total, p_i): allow 5 standard deviations.
  sd = np.sqrt(total * p * (1 - p))
  assert np.all(np.abs(counts - total * p) <= 5 * sd + 1), (counts / total, p)


def test_task_probabilities_closed_forms():
  np.testing.assert_allclose(sampling.task_probabilities("uniform", SIZES), 0.2)
  np.testing.assert_allclose(sampling.task_probabilities("proportional", SIZES),
                             SIZES / SIZES.sum())
  p = sampling.task_probabilities("temperature", SIZES, temperature=3.0)
  np.testing.assert_allclose(p, SIZES ** (1 / 3) / np.sum(SIZES ** (1 / 3)))
  np.testing.assert_allclose(sampling.task_probabilities("temperature", SIZES, 1.0),
                             sampling.task_probabilities("proportional", SIZES))
  np.testing.assert_allclose(sampling.task_probabilities("temperature", SIZES, 1e6), 0.2,
                             atol=1e-4)


@pytest.mark.parametrize("sampler, temperature", [
    ("uniform", 1.0), ("proportional", 1.0), ("temperature", 2.0)])
def test_with_replacement_frequencies_match_the_distribution(sampler, temperature):
  p = sampling.task_probabilities(sampler, SIZES, temperature)
  ids = _draws(p, 3, replace=True)
  counts = np.bincount(ids.ravel(), minlength=len(SIZES))
  _assert_frequencies(counts, ids.size, p)


def test_uniform_without_replacement_ignores_data_sizes():
  p = sampling.task_probabilities("uniform", SIZES)
  ids = _draws(p, 2, replace=False)
  assert np.all(ids[:, 0] != ids[:, 1])
  counts = np.bincount(ids.ravel(), minlength=len(SIZES))
  # Inclusion probability of each task is K/T = 0.4, whatever its size.
  _assert_frequencies(counts, DRAWS, np.full(len(SIZES), 0.4))


def test_all_tasks_every_step_when_k_equals_t():
  ids = _draws(sampling.task_probabilities("uniform", SIZES), len(SIZES), replace=False)
  np.testing.assert_array_equal(np.sort(ids, axis=1),
                                np.broadcast_to(np.arange(len(SIZES)), ids.shape))


def _plackett_luce_inclusion(p, k):
  """Exact inclusion probabilities of successive sampling without replacement."""
  incl = np.zeros(len(p))
  for seq in itertools.permutations(range(len(p)), k):
    prob, left = 1.0, 1.0
    for i in seq:
      prob *= p[i] / left
      left -= p[i]
    incl[list(seq)] += prob
  return incl


def test_proportional_without_replacement_matches_successive_sampling():
  p = sampling.task_probabilities("proportional", SIZES)
  ids = _draws(p, 2, replace=False)
  counts = np.bincount(ids.ravel(), minlength=len(SIZES))
  want = _plackett_luce_inclusion(p, 2)
  np.testing.assert_allclose(want.sum(), 2.0)
  _assert_frequencies(counts, DRAWS, want)


def test_example_indices_in_range_and_keyed_by_task_stream():
  n = jnp.array([3, 100, 7])
  stream = jnp.array([10, 11, 12])
  rng = jax.random.key(1)
  draws = 20_000
  a = np.asarray(sampling.example_indices(rng, jnp.array([0, 1, 2]), stream, n, draws))
  assert a.shape == (3, draws)
  for t in range(3):
    nt = int(n[t])
    assert a[t].min() >= 0 and a[t].max() < nt
    # Every index of [0, n) is drawn: a value is missed with probability
    # (1 - 1/n)^draws, below 100 * 0.99^20000 ~ 1e-85 for n = 100.
    np.testing.assert_array_equal(np.unique(a[t]), np.arange(nt))
    # Each index's count is Binomial(draws, 1/n) (n = 100: mean 200, sd 14).
    _assert_frequencies(np.bincount(a[t], minlength=nt), draws, np.full(nt, 1 / nt))
  # The same task gets the same examples in whichever slot it falls.
  b = sampling.example_indices(rng, jnp.array([2, 0, 1]), stream, n, draws)
  np.testing.assert_array_equal(a[2], b[0])
  np.testing.assert_array_equal(a[0], b[1])
  # A task drawn twice gets fresh examples in its second slot.
  c = sampling.example_indices(rng, jnp.array([1, 1]), stream, n, draws)
  np.testing.assert_array_equal(c[0], a[1])
  assert not np.array_equal(c[0], c[1])


def test_examples_are_uniform_over_a_tasks_data():
  n = jnp.array([7])
  keys = jax.random.split(jax.random.key(2), 2000)
  idx = jax.vmap(lambda r: sampling.example_indices(r, jnp.array([0]), jnp.array([0]),
                                                    n, 20))(keys)
  counts = np.bincount(np.asarray(idx).ravel(), minlength=7)
  _assert_frequencies(counts, idx.size, np.full(7, 1 / 7))


@pytest.mark.parametrize("args, match", [
    (("roulette", SIZES), "task_sampler='roulette'"),
    (("temperature", SIZES, 0.0), "temperature must be > 0"),
    (("uniform", np.array([3, 0])), "at least one training example"),
])
def test_bad_sampler_input(args, match):
  with pytest.raises(ValueError, match=match):
    sampling.task_probabilities(*args)


def test_shared_example_indices_are_one_uniform_draw_for_every_slot():
  n = jnp.array([9, 9, 9])
  keys = jax.random.split(jax.random.key(3), 1000)
  idx = jax.vmap(lambda r: sampling.shared_example_indices(r, jnp.array([2, 0, 1]), n, 12))(
      keys)  # [1000, K, B]
  assert idx.shape == (1000, 3, 12)
  np.testing.assert_array_equal(idx[:, 0], idx[:, 1])
  np.testing.assert_array_equal(idx[:, 0], idx[:, 2])
  counts = np.bincount(np.asarray(idx[:, 0]).ravel(), minlength=9)
  _assert_frequencies(counts, idx[:, 0].size, np.full(9, 1 / 9))


def test_shared_inputs_check_names_the_tasks_that_differ():
  sampling.check_shared_inputs({"source": np.array([0, 0]), "n": np.array([5, 5])})
  with pytest.raises(ValueError, match=r"shared_inputs=True.*b: source 1, 5 examples"):
    sampling.check_shared_inputs({"source": np.array([0, 1]), "n": np.array([5, 5])},
                                 ["a", "b"])
  with pytest.raises(ValueError, match=r"a: source 0, 4 examples"):
    sampling.check_shared_inputs({"source": np.array([0, 0]), "n": np.array([4, 5])},
                                 ["a", "b"])


# ---------------------------------------------------------------------------
# gather_batch against plain numpy indexing
# ---------------------------------------------------------------------------


def _hand_built_split(seed=0):
  """Six tasks in three groups, three input sources of different sizes (two
  tasks share source 0), laid out as in ``task_data.build_task_data``. Inputs and
  regression labels encode (source or row, example) so a wrong index shows."""
  taskset = tasks.TaskSet((
      tasks.Task("c_a", "classification", 3),  # classification3 row 0, source 0
      tasks.Task("r_a", "regression"),         # regression1 row 0, source 0
      tasks.Task("c_b", "classification", 3),  # classification3 row 1, source 1
      tasks.Task("r_b", "regression"),         # regression1 row 1, source 2
      tasks.Task("b_a", "binary"),             # binary1 row 0, source 2
      tasks.Task("r_c", "regression"),         # regression1 row 2, source 1
  ))
  source = np.array([0, 0, 1, 2, 2, 1], np.int32)
  sizes = np.array([9, 12, 5], np.int32)  # examples per source; N = 12
  n = sizes[source]
  rng = np.random.default_rng(seed)
  num = sizes.max()
  x = np.zeros((3, num, 2, 3), np.float32)
  for s, size in enumerate(sizes):
    x[s, :size] = 1000 * (s + 1) + 10 * np.arange(size)[:, None, None] + rng.uniform(
        size=(size, 2, 3))
  y = {"classification3": np.zeros((2, num), np.int32),
       "regression1": np.zeros((3, num), np.float32),
       "binary1": np.zeros((1, num), np.int32)}
  for t, task in enumerate(taskset.tasks):
    g = task.group
    row = int(taskset.local_index[t])
    if task.kind == "regression":
      y[g][row, :n[t]] = 100 * (row + 1) + np.arange(n[t]) + rng.uniform(size=n[t])
    else:
      y[g][row, :n[t]] = rng.integers(0, task.out_dim if task.out_dim > 1 else 2, n[t])
  return taskset, {"x": x, "source": source, "n": n, "y": y}


def _numpy_gather(split, taskset, task_ids, idx):
  """x_ref[k, b] = x[source[t_k], idx[k, b]] and, for slots whose task is in
  group g, y_ref[g][k, b] = y[g][local_index[t_k], idx[k, b]] (other slots: NaN
  or -1, never compared)."""
  k_slots, batch = idx.shape
  x_ref = np.zeros((k_slots, batch) + split["x"].shape[2:], np.float32)
  y_ref = {g: np.full((k_slots, batch), np.nan) for g in split["y"]}
  for k in range(k_slots):
    t = int(task_ids[k])
    g = taskset.tasks[t].group
    for b in range(batch):
      x_ref[k, b] = split["x"][split["source"][t], idx[k, b]]
      y_ref[g][k, b] = split["y"][g][taskset.local_index[t], idx[k, b]]
  return x_ref, y_ref


@pytest.mark.parametrize("jit", [False, True])
def test_gather_batch_matches_numpy_indexing(jit):
  taskset, split = _hand_built_split()
  task_ids = np.array([3, 0, 3, 5, 2, 4, 0, 1, 2], np.int32)  # repeats, all groups
  rng = np.random.default_rng(1)
  idx = np.stack([rng.integers(0, split["n"][t], 16) for t in task_ids]).astype(np.int32)
  gather = jax.jit(sampling.gather_batch) if jit else sampling.gather_batch
  x, ys = gather(jax.tree.map(jnp.asarray, split),
                 {"local_index": jnp.asarray(taskset.local_index)},
                 jnp.asarray(task_ids), jnp.asarray(idx))
  x_ref, y_ref = _numpy_gather(split, taskset, task_ids, idx)
  assert x.shape == (9, 16, 2, 3)
  np.testing.assert_array_equal(np.asarray(x), x_ref)
  assert sorted(ys) == sorted(split["y"])
  for g, yg in ys.items():
    assert yg.shape == (9, 16) and yg.dtype == split["y"][g].dtype
    mine = np.array([taskset.tasks[t].group == g for t in task_ids])
    assert mine.any()
    np.testing.assert_array_equal(np.asarray(yg)[mine], y_ref[g][mine].astype(yg.dtype))


def test_gather_batch_reads_what_build_task_data_laid_out():
  # Three tasks labelling one set of inputs, through build_task_data: the
  # gathered inputs and labels are the raw columns at the drawn examples
  # (regression labels standardised with the train split's mean and sd).
  spec = specs.DataSpec("x", (
      specs.TaskColumn(tasks.Task("c", "classification", 3), "c"),
      specs.TaskColumn(tasks.Task("r", "regression"), "r"),
      specs.TaskColumn(tasks.Task("c2", "classification", 3), "c2")))
  rng = np.random.default_rng(2)

  def columns(size):
    return {"x": rng.normal(size=(size, 4)).astype(np.float32),
            "c": rng.integers(0, 3, size), "c2": rng.integers(0, 3, size),
            "r": rng.normal(5.0, 3.0, size).astype(np.float32)}
  raw = {"train": columns(40), "test": columns(10)}
  data = task_data.build_task_data("toy", spec, raw)
  ts = data.taskset
  task_ids = np.array([1, 2, 0, 1], np.int32)
  idx = rng.integers(0, 40, size=(4, 8)).astype(np.int32)
  x, ys = sampling.gather_batch(jax.tree.map(jnp.asarray, data.train),
                                {"local_index": jnp.asarray(ts.local_index)},
                                jnp.asarray(task_ids), jnp.asarray(idx))
  col = {"c": raw["train"]["c"], "c2": raw["train"]["c2"],
         "r": (raw["train"]["r"] - raw["train"]["r"].mean()) / raw["train"]["r"].std()}
  for k, t in enumerate(task_ids):
    task = ts.tasks[t]
    for b in range(8):
      np.testing.assert_array_equal(np.asarray(x[k, b]), raw["train"]["x"][idx[k, b]])
      np.testing.assert_allclose(float(ys[task.group][k, b]), col[task.name][idx[k, b]],
                                 rtol=1e-5, atol=1e-5)
