"""Task and example sampling: distributions (fixed seed, statistical bounds)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtljax.data import sampling

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
  a = sampling.example_indices(rng, jnp.array([0, 1, 2]), stream, n, 500)
  assert a.shape == (3, 500)
  for t in range(3):
    assert int(a[t].min()) >= 0 and int(a[t].max()) < int(n[t])
    assert len(np.unique(np.asarray(a[t]))) == min(int(n[t]), 500) or n[t] == 100
  # The same task gets the same examples in whichever slot it falls.
  b = sampling.example_indices(rng, jnp.array([2, 0, 1]), stream, n, 500)
  np.testing.assert_array_equal(a[2], b[0])
  np.testing.assert_array_equal(a[0], b[1])
  # A task drawn twice gets fresh examples in its second slot.
  c = sampling.example_indices(rng, jnp.array([1, 1]), stream, n, 500)
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
