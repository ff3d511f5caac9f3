"""The packed whole-tree programs (inq_jax/_packed.py) against per-leaf numpy references.

Packing puts every leaf of a dtype into one [rows, 128] array; what could go
wrong is at the seams: leaves whose size is not a multiple of 128, a leaf of one
weight, ties at the threshold in several leaves at once (the lowest flat index
of *each* leaf wins), several dtypes in one tree, per-channel exponents.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _codebook
from inq_jax import _packed
from inq_jax import quantize as inq

SHAPES = [(1,), (127,), (128,), (129,), (3, 100), (2, 2, 3, 5)]


def reference_select(w, frozen, k):
  """Mask of the k largest float32 |w| among not-frozen weights, plus frozen; ties low index."""
  key = np.abs(np.asarray(w, np.float32)).reshape(-1)
  f = np.asarray(frozen).reshape(-1)
  out = f.copy()
  free = np.flatnonzero(~f)
  order = free[np.argsort(-key[free], kind="stable")]
  out[order[:k - f.sum()]] = True
  return out.reshape(np.shape(w))


def make_tree(rng, dtypes, tie_values=None):
  leaves, masks, n1s = [], [], []
  for i, shape in enumerate(SHAPES):
    dtype = dtypes[i % len(dtypes)]
    if tie_values is None:
      w = rng.normal(size=shape)
    else:  # few distinct magnitudes: ties at every threshold
      w = rng.choice(tie_values, size=shape) * rng.choice([-1, 1], size=shape)
    leaves.append(jnp.asarray(w, dtype))
    masks.append(jnp.asarray(rng.random(shape) < 0.3))
    n1s.append(jnp.int32(1))
  return leaves, masks, n1s


@pytest.mark.parametrize("dtypes,ties", [
    ((jnp.float32,), None), ((jnp.float32,), (0.25, 0.5, 1.0)),
    ((jnp.float32, jnp.bfloat16, jnp.float16), (0.125, 0.5)),
    ((jnp.bfloat16,), None)])
def test_advance_matches_per_leaf_reference(dtypes, ties):
  rng = np.random.default_rng(0)
  leaves, masks, n1s = make_tree(rng, dtypes, ties)
  bits = 4
  for portion in (0.4, 0.7, 1.0):
    ks = [max(int(np.sum(m)), int(round(portion * w.size))) for w, m in zip(leaves, masks)]
    new_w, new_m, (nonfinite, frozen, outside) = _packed.advance(
        leaves, masks, n1s, np.asarray(ks, np.int32), np.asarray([0, 0], np.uint32),
        bits=bits, strategy="magnitude")
    assert list(nonfinite) == [0] * len(leaves)
    assert list(frozen) == [int(np.sum(m)) for m in masks]
    for i, (w, m, k) in enumerate(zip(leaves, masks, ks)):
      want = reference_select(w, m, k)
      np.testing.assert_array_equal(np.asarray(new_m[i]), want, err_msg=f"leaf {i}")
      n2 = int(_codebook.n2_from_n1(1, bits))
      rounded = np.asarray(_codebook.round_to_pow2(w, 1, n2))
      expect = np.where(want & ~np.asarray(m), rounded, np.asarray(w))
      assert new_w[i].dtype == w.dtype and new_w[i].shape == w.shape
      np.testing.assert_array_equal(np.asarray(new_w[i]), expect, err_msg=f"leaf {i}")
    leaves, masks = new_w, new_m


def test_stats_count_each_leaf_separately():
  rng = np.random.default_rng(1)
  leaves, masks, n1s = make_tree(rng, (jnp.float32,))
  n2 = int(_codebook.n2_from_n1(1, 5))
  leaves = [jnp.where(m, _codebook.round_to_pow2(w, 1, n2), w) for w, m in zip(leaves, masks)]
  leaves[2] = leaves[2].at[5].set(jnp.nan).at[7].set(jnp.inf)
  masks[4] = masks[4].at[0, 0].set(True)
  leaves[4] = leaves[4].at[0, 0].set(0.3)  # frozen but not 0 or +-2^k
  ks = np.asarray([int(np.sum(m)) for m in masks], np.int32)
  _, _, (nonfinite, frozen, outside) = _packed.advance(
      leaves, masks, n1s, ks, np.asarray([0, 0], np.uint32), bits=5, strategy="magnitude")
  assert list(nonfinite) == [0, 0, 2, 0, 0, 0]
  assert list(frozen) == [int(np.sum(m)) for m in masks]
  assert list(outside) == [0, 0, 0, 0, 1, 0]


def test_random_strategy_freezes_exactly_k_and_keeps_frozen():
  rng = np.random.default_rng(2)
  leaves, masks, n1s = make_tree(rng, (jnp.float32, jnp.float16))
  ks = np.asarray([max(int(np.sum(m)), w.size // 2) for w, m in zip(leaves, masks)], np.int32)
  key = np.asarray([7, 3], np.uint32)
  _, new_m, _ = _packed.advance(leaves, masks, n1s, ks, key, bits=5, strategy="random")
  again = _packed.advance(leaves, masks, n1s, ks, key, bits=5, strategy="random")[1]
  for m, new, k, same in zip(masks, new_m, ks, again):
    assert int(np.sum(new)) == k and np.all(np.asarray(new)[np.asarray(m)])
    np.testing.assert_array_equal(np.asarray(new), np.asarray(same))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("calibration", ["absmax", "mse"])
def test_init_matches_per_leaf_bounds(granularity, calibration):
  rng = np.random.default_rng(3)
  params = {f"l{i}": {"kernel": jnp.asarray(rng.normal(size=s) * 2.0 ** i, jnp.float32)}
            for i, s in enumerate(SHAPES[1:] + [(4, 6)])}
  config = inq.INQConfig(bits=3, granularity=granularity, calibration=calibration,
                         include=r".*kernel")
  state = inq.init(params, config)
  for name, leaf in params.items():
    w = leaf["kernel"]
    axes = tuple(range(w.ndim - 1)) if granularity == "channel" else None
    if calibration == "mse":
      want = _codebook.mse_exponent_bounds(w, 3, axes)[0]
    else:
      want = _codebook.exponent_bounds(jnp.max(jnp.abs(w), axis=axes), 3)[0]
    np.testing.assert_array_equal(np.asarray(state.exponents[f"{name}/kernel"]),
                                  np.asarray(want), err_msg=name)


def test_verify_counts_distinct_values_across_channels():
  # Two channels with different exponents: their values are distinct even
  # where their offsets from n2 are equal.
  w = jnp.asarray([[1.0, 0.25], [0.5, 0.125], [0.0, -0.25]], jnp.float32)
  state = inq.init({"k": w}, inq.INQConfig(bits=3, granularity="channel", include="k",
                                           portions=(1.0,)))
  params, state = inq.advance({"k": w}, state)
  summary = inq.verify(params, state)["k"]
  values = np.asarray(params["k"])
  assert summary.distinct_values == np.unique(values).size
  assert summary.zeros == int(np.sum(values == 0)) and summary.frozen == w.size
