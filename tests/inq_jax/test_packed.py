"""The packed whole-tree programs (inq_jax/_packed.py) against per-leaf numpy references.

Packing puts every leaf of a dtype into one [rows, 128] array; what could go
wrong is at the seams: leaves whose size is not a multiple of 128, a leaf of one
weight, ties at the threshold in several leaves at once (the lowest flat index
of *each* leaf wins), several dtypes in one tree, per-channel exponents.
"""

import jax
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


def before(stats):
  """The `advance` stats before the step as {name: list per leaf}."""
  return {name: [int(x) for x in col] for name, col in zip(_packed.BEFORE, np.asarray(stats).T)}


def make_tree(rng, dtypes, tie_values=None, shapes=SHAPES):
  leaves, masks, n1s = [], [], []
  for i, shape in enumerate(shapes):
    dtype = dtypes[i % len(dtypes)]
    if tie_values is None:
      w = rng.normal(size=shape)
    else:  # few distinct magnitudes: ties at every threshold
      w = rng.choice(tie_values, size=shape) * rng.choice([-1, 1], size=shape)
    leaves.append(jnp.asarray(w, dtype))
    masks.append(jnp.asarray(rng.random(shape) < 0.3))
    n1s.append(jnp.int32(1))
  return leaves, masks, n1s


def check_advance_against_reference(leaves, masks, n1s, bits):
  for portion in (0.4, 0.7, 1.0):
    ks = [max(int(np.sum(m)), int(round(portion * w.size))) for w, m in zip(leaves, masks)]
    new_w, new_m, stats, after = _packed.advance(
        leaves, masks, n1s, np.asarray(ks, np.int32), np.asarray([0, 0], np.uint32),
        bits=bits, strategy="magnitude")
    stats = before(stats)
    assert stats["nonfinite"] == [0] * len(leaves)
    assert stats["frozen"] == [int(np.sum(m)) for m in masks]
    for i, (w, m, k) in enumerate(zip(leaves, masks, ks)):
      want = reference_select(w, m, k)
      np.testing.assert_array_equal(np.asarray(new_m[i]), want, err_msg=f"leaf {i}")
      n2 = int(_codebook.n2_from_n1(1, bits[i]))
      rounded = np.asarray(_codebook.round_to_pow2(w, 1, n2))
      expect = np.where(want & ~np.asarray(m), rounded, np.asarray(w))
      assert new_w[i].dtype == w.dtype and new_w[i].shape == w.shape
      np.testing.assert_array_equal(np.asarray(new_w[i]), expect, err_msg=f"leaf {i}")
      # The checksums before and after the step, against numpy.
      assert _packed.unsigned(stats["frozen_sum"][i]) == _packed.checksum_reference(w, m)
      assert _packed.unsigned(stats["float_sum"][i]) == _packed.checksum_reference(
          w, ~m, sampled=True)
      assert _packed.unsigned(after[i][0]) == _packed.checksum_reference(new_w[i], new_m[i])
      assert _packed.unsigned(after[i][1]) == _packed.checksum_reference(
          new_w[i], ~new_m[i], sampled=True)
    leaves, masks = new_w, new_m


@pytest.mark.parametrize("dtypes,ties", [
    ((jnp.float32,), None), ((jnp.float32,), (0.25, 0.5, 1.0)),
    ((jnp.float32, jnp.bfloat16, jnp.float16), (0.125, 0.5)),
    ((jnp.bfloat16,), None)])
def test_advance_matches_per_leaf_reference(dtypes, ties):
  rng = np.random.default_rng(0)
  leaves, masks, n1s = make_tree(rng, dtypes, ties)
  # Each leaf its own width (per-layer bits), 2 to 8.
  check_advance_against_reference(leaves, masks, n1s, bits=(4, 2, 8, 3, 5, 4))


@pytest.fixture
def tiny_bins(monkeypatch, request):
  """Search bins of a few rows, so that small trees have several bins and big leaves."""
  monkeypatch.setattr(_packed, "BIN_BLOCKS", request.param)
  jax.clear_caches()  # programs traced with the default bins must not be reused
  yield request.param
  jax.clear_caches()


@pytest.mark.parametrize("tiny_bins", [1, 2, 3], indirect=True)
def test_search_bin_by_bin_matches_the_reference(tiny_bins):
  # Leaves of 1..4 blocks: with bins of 1-3 blocks some share a bin, some are
  # larger than a bin (searched in place, packed last), and the last bins'
  # windows run past the end of the bins (dynamic_slice moves them back).
  shapes = [(2048,), (3, 100), (1,), (2, 2, 3, 5), (2049,), (4, 2000), (5,), (6000,)]
  rng = np.random.default_rng(5)
  leaves, masks, n1s = make_tree(rng, (jnp.float32, jnp.bfloat16), (0.25, 0.5, 1.0, 2.0),
                                 shapes=shapes)
  group = _packed.groups(leaves)[0]
  assert any(end - start > tiny_bins for start, end in group.bins) is False
  check_advance_against_reference(leaves, masks, n1s, bits=(5,) * len(shapes))


def test_groups_put_leaves_larger_than_a_bin_last(monkeypatch):
  monkeypatch.setattr(_packed, "BIN_BLOCKS", 2)
  block = _packed.BLOCK
  leaves = [jnp.zeros(s) for s in [(2 * block + 1,), (10,), (block + 1,), (8 * block,), (5,)]]
  (group,) = _packed.groups(leaves)
  assert group.index == (1, 2, 4, 0, 3)  # 3 blocks and 8 blocks are larger than a bin
  assert group.blocks == (1, 2, 1, 3, 8)
  assert group.bins == ((0, 1), (1, 3), (3, 4)) and group.big_start == 4


def test_stats_count_each_leaf_separately():
  rng = np.random.default_rng(1)
  leaves, masks, n1s = make_tree(rng, (jnp.float32,))
  n2 = int(_codebook.n2_from_n1(1, 5))
  leaves = [jnp.where(m, _codebook.round_to_pow2(w, 1, n2), w) for w, m in zip(leaves, masks)]
  leaves[2] = leaves[2].at[5].set(jnp.nan).at[7].set(jnp.inf)
  masks[4] = masks[4].at[0, 0].set(True)
  leaves[4] = leaves[4].at[0, 0].set(0.3)  # frozen but not 0 or +-2^k
  ks = np.asarray([int(np.sum(m)) for m in masks], np.int32)
  _, _, stats, _ = _packed.advance(
      leaves, masks, n1s, ks, np.asarray([0, 0], np.uint32), bits=(5,) * 6,
      strategy="magnitude")
  stats = before(stats)
  assert stats["nonfinite"] == [0, 0, 2, 0, 0, 0]
  assert stats["frozen"] == [int(np.sum(m)) for m in masks]
  assert stats["outside"] == [0, 0, 0, 0, 1, 0]
  # Rounds to zero: |w| < 2^(n2 - 1) = 2^-7 (n1 = 1, 5 bits); saturates: |w| >= 3.
  for i, w in enumerate(leaves):
    a = np.abs(np.asarray(w, np.float32))
    assert stats["zeros"][i] == int(np.sum(a < 2.0**-7)), i
    assert stats["saturated"][i] == int(np.sum(a >= 3.0)), i


def test_random_strategy_freezes_exactly_k_and_keeps_frozen():
  rng = np.random.default_rng(2)
  leaves, masks, n1s = make_tree(rng, (jnp.float32, jnp.float16))
  ks = np.asarray([max(int(np.sum(m)), w.size // 2) for w, m in zip(leaves, masks)], np.int32)
  key = np.asarray([7, 3], np.uint32)
  bits = (5,) * len(leaves)
  _, new_m, _, _ = _packed.advance(leaves, masks, n1s, ks, key, bits=bits, strategy="random")
  again = _packed.advance(leaves, masks, n1s, ks, key, bits=bits, strategy="random")[1]
  other = _packed.advance(leaves, masks, n1s, ks, np.asarray([7, 4], np.uint32), bits=bits,
                          strategy="random")[1]
  for m, new, k, same in zip(masks, new_m, ks, again):
    assert int(np.sum(new)) == k and np.all(np.asarray(new)[np.asarray(m)])
    np.testing.assert_array_equal(np.asarray(new), np.asarray(same))
  # Another step draws other weights (in the larger leaves, where there is a choice).
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(new_m[3:], other[3:]))


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
