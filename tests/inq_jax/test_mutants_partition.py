"""Tests added to kill mutmut mutants of inq_jax/_partition.py (docs/mutation_testing.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _partition
from inq_jax import quantize as inq


@pytest.mark.parametrize("portion", [True, "0.5", None])
def test_portion_must_be_a_real_number(portion):
  with pytest.raises(TypeError, match=r"portion must be a Python float in \(0, 1\], got "):
    inq.partition(jnp.ones(4), jnp.zeros(4, bool), portion)


def test_missing_key_message():
  with pytest.raises(ValueError) as e:
    inq.partition(jnp.ones(4), jnp.zeros(4, bool), 0.5, strategy="random")
  assert str(e.value) == ("strategy='random' needs a PRNG key: "
                          "partition(..., key=jax.random.key(0))")


def test_frozen_count_with_pruning():
  assert _partition.frozen_count(100, 0.5) == 50
  assert _partition.frozen_count(100, 0.5, pruned=80) == 90
  assert _partition.frozen_count(10, 1.0, pruned=3) == 10
  assert _partition.frozen_count(7, 0.3, pruned=2) == 2 + round(0.3 * 5)


def test_exact_zeros_are_ranked_and_tied_to_lowest_index():
  # Keys of 0 (w == 0) sit at the bottom of the binary search: the padding of the
  # last 128-key row must rank below them and the search must start at 0.
  w = jnp.array([0.0, 0.0, 0.0, 1.0, 0.0])
  got = inq.partition(w, jnp.zeros(5, bool), 0.6)  # k = 3
  np.testing.assert_array_equal(got, [True, True, False, True, False])
  np.testing.assert_array_equal(inq.partition(jnp.zeros(4), jnp.zeros(4, bool), 0.5),
                                [True, True, False, False])


def test_integer_weights_rejected_with_message():
  with pytest.raises(TypeError, match="partition needs floating-point weights, got dtype int32"):
    inq.partition(jnp.ones(4, jnp.int32), jnp.zeros(4, bool), 0.5)


def test_non_bool_mask_rejected():
  with pytest.raises(ValueError, match=r"frozen must be a bool array of shape \(4,\), got "
                     r"int32\[4\]"):
    inq.partition(jnp.ones(4), jnp.zeros(4, jnp.int32), 0.5)


def test_already_frozen_exactly_k_is_allowed():
  frozen = jnp.array([True, True, False, False])
  np.testing.assert_array_equal(inq.partition(jnp.ones(4), frozen, 0.5), frozen)


def test_magnitude_compiles_once_with_or_without_key():
  w = jnp.arange(1.0, 22.0).reshape(3, 7)  # a shape no other test uses
  frozen = jnp.zeros((3, 7), bool)
  before = _partition._partition._cache_size()
  inq.partition(w, frozen, 0.5)
  inq.partition(w, frozen, 0.5, key=jax.random.key(3))
  assert _partition._partition._cache_size() - before <= 1
