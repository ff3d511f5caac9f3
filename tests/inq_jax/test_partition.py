"""partition: counts, monotonicity, magnitude order, ties, random reproducibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inq_jax import quantize as inq

portions_st = st.lists(st.floats(0.01, 1.0), min_size=1, max_size=6).map(
    lambda ps: sorted(set(round(p, 3) for p in ps)))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), size=st.sampled_from([1, 7, 64, 300]),
       portions=portions_st, strategy=st.sampled_from(["magnitude", "random"]))
def test_monotone_counts_and_order(seed, size, portions, strategy):
  rng = np.random.default_rng(seed)
  # Few distinct magnitudes so ties are common.
  w = jnp.asarray(rng.choice([-2.0, -0.5, 0.0, 0.25, 0.5, 1.0, 3.0], size).astype(np.float32)
                  * rng.choice([1.0, 1.0001], size).astype(np.float32))
  frozen = jnp.zeros(size, bool)
  for i, p in enumerate(portions):
    new = inq.partition(w, frozen, p, strategy=strategy, key=jax.random.key(i))
    new_np, old_np = np.asarray(new), np.asarray(frozen)
    assert new.dtype == jnp.bool_ and new.shape == w.shape
    assert new_np.sum() == round(p * size)
    assert np.all(new_np[old_np]), "a frozen weight was unfrozen"
    if strategy == "magnitude":
      added, still = new_np & ~old_np, ~new_np
      if added.any() and still.any():
        a = np.abs(np.asarray(w))
        assert a[added].min() >= a[still].max()
        # Deterministic tie break: among equal |w|, lower indices go first.
        tied = np.flatnonzero(a == a[added].min())
        chosen = tied[new_np[tied] & ~old_np[tied]]
        rest = tied[~new_np[tied]]
        if rest.size:
          assert chosen.max() < rest.min()
    frozen = new


def test_magnitude_example_and_ties_to_lowest_index():
  w = jnp.array([0.1, -0.9, 0.5, 0.2])
  np.testing.assert_array_equal(inq.partition(w, jnp.zeros(4, bool), 0.5),
                                [False, True, True, False])
  flat = jnp.ones(10)
  np.testing.assert_array_equal(inq.partition(flat, jnp.zeros(10, bool), 0.3),
                                np.arange(10) < 3)


def test_matches_sort_reference_on_large_layer():
  w = jax.random.normal(jax.random.key(0), (3, 3, 64, 128))
  frozen = inq.partition(w, jnp.zeros(w.shape, bool), 0.5)
  frozen = inq.partition(w * 3.0 + 1.0, frozen, 0.75)  # retrained weights change order
  a = np.abs(np.asarray(w)).ravel()
  first = np.zeros(a.size, bool)
  first[np.argsort(-a, kind="stable")[: round(0.5 * a.size)]] = True
  b = np.abs(np.asarray(w * 3.0 + 1.0)).ravel()
  b_masked = np.where(first, np.inf, b)
  want = np.zeros(a.size, bool)
  want[np.argsort(-b_masked, kind="stable")[: round(0.75 * a.size)]] = True
  np.testing.assert_array_equal(np.asarray(frozen).ravel(), want)


def test_random_reproducible_and_uniform_among_float():
  w = jnp.arange(1000, dtype=jnp.float32)
  frozen = jnp.arange(1000) < 100
  a = inq.partition(w, frozen, 0.5, strategy="random", key=jax.random.key(7))
  b = inq.partition(w, frozen, 0.5, strategy="random", key=jax.random.key(7))
  c = inq.partition(w, frozen, 0.5, strategy="random", key=jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert int(a.sum()) == 500 and bool(jnp.all(a[:100]))
  added = np.flatnonzero(np.asarray(a & ~frozen))
  # Not the magnitude order: both halves of the float range get picked.
  assert (added < 550).sum() > 100 and (added >= 550).sum() > 100


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_half_precision(dtype):
  w = jnp.array([0.1, -4.0, 0.5, 2.0], dtype)
  np.testing.assert_array_equal(inq.partition(w, jnp.zeros(4, bool), 0.5),
                                [False, True, False, True])


def test_full_portion_freezes_all_and_jit():
  w = jax.random.normal(jax.random.key(1), (33, 5))
  f = jax.jit(lambda w, m: inq.partition(w, m, 1.0))
  assert bool(jnp.all(f(w, jnp.zeros(w.shape, bool))))


@pytest.mark.parametrize("portion", [0.0, -0.1, 1.5, float("nan")])
def test_bad_portion(portion):
  with pytest.raises(ValueError, match="portion"):
    inq.partition(jnp.ones(4), jnp.zeros(4, bool), portion)


def test_bad_strategy_and_missing_key():
  with pytest.raises(ValueError, match="unknown partition strategy 'largest'"):
    inq.partition(jnp.ones(4), jnp.zeros(4, bool), 0.5, strategy="largest")
  with pytest.raises(ValueError, match="needs a PRNG key"):
    inq.partition(jnp.ones(4), jnp.zeros(4, bool), 0.5, strategy="random")


def test_shrinking_portion_and_bad_mask():
  with pytest.raises(ValueError, match="already frozen"):
    inq.partition(jnp.ones(4), jnp.ones(4, bool), 0.5)
  with pytest.raises(ValueError, match="bool array of shape"):
    inq.partition(jnp.ones(4), jnp.zeros(3, bool), 0.5)
