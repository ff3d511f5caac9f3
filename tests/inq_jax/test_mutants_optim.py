"""Tests added to kill mutmut mutants of inq_jax/optim.py (docs/mutation_testing.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import inq_jax


def test_init_casts_masks_to_bool():
  # An integer 0/1 mask is stored as bool (jnp.array(m, bool)), not as int32.
  tx = inq_jax.optim.elementwise_freeze({"a": np.array([1, 0])})
  s = tx.init({"a": jnp.zeros(2)})
  assert s.masks["a"].dtype == jnp.bool_


def test_init_copies_the_callers_mask():
  m = jnp.array([True, False])
  tx = inq_jax.optim.elementwise_freeze({"a": m})
  s = tx.init({"a": jnp.zeros(2)})
  assert s.masks["a"] is not m
  s.masks["a"].delete()  # e.g. donated by a jitted step
  assert not m.is_deleted()
  np.testing.assert_array_equal(m, [True, False])


def test_init_places_masks_with_committed_params():
  dev = jax.devices()[0]
  params = {"a": jax.device_put(jnp.zeros(2), dev), "b": jax.device_put(jnp.zeros(3), dev)}
  tx = inq_jax.optim.elementwise_freeze({"a": jnp.array([True, False]), "b": False})
  s = tx.init(params)
  for k in params:
    assert s.masks[k].committed, k
    assert s.masks[k].sharding == params[k].sharding or s.masks[k].ndim == 0, k


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_update_keeps_low_precision_dtype(dtype):
  # The zero must have the update's dtype: a float32 zero would promote a bf16 update.
  tx = inq_jax.optim.elementwise_freeze({"a": jnp.array([True, False])})
  s = tx.init({"a": jnp.zeros(2, dtype)})
  upd, _ = tx.update({"a": jnp.ones(2, dtype)}, s)
  assert upd["a"].dtype == dtype
  np.testing.assert_array_equal(np.asarray(upd["a"], np.float32), [0.0, 1.0])
