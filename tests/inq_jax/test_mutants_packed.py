"""inq_jax._packed's helpers, exactly: written to kill the mutants mutmut left alive.

See docs/mutation_testing.md. `init_stats`, `advance` and `value_ids` are
jitted whole-tree programs (mutmut does not mutate decorated functions), so
their helpers are checked here through them and directly, against values
written out by hand or computed with numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _codebook
from inq_jax import _packed
from inq_jax import _partition

ZERO = _packed._ZERO_ID  # pylint: disable=protected-access


# --- distinct_and_zeros ----------------------------------------------------------------


def ids_of(values_by_k):
  """Value ids of frozen weights, built from their definition (0 -> ZERO, +-2^k -> ZERO +- (k+2048))."""
  return np.asarray([ZERO if v is None else ZERO + v[0] * (v[1] + 2048) for v in values_by_k],
                    np.int32)


def test_distinct_and_zeros_counts_frozen_values_and_zeros():
  # 0 twice, +2^-3 twice, -2^-3 once, -2^0 once, and three weights not frozen (id 0).
  ids = np.concatenate([ids_of([None, None, (1, -3), (1, -3), (-1, -3), (-1, 0)]),
                        np.zeros(3, np.int32)]).reshape(3, 3)
  assert _packed.distinct_and_zeros(ids) == (6, 4, 2)


def test_distinct_and_zeros_with_only_negative_values_or_nothing_frozen():
  # Every id below ZERO (negative values only, no zero): the zero count still reads 0.
  assert _packed.distinct_and_zeros(ids_of([(-1, -5), (-1, -5), (-1, 2)])) == (3, 2, 0)
  assert _packed.distinct_and_zeros(np.zeros((2, 5), np.int32)) == (0, 0, 0)
  # An id of 1 (the smallest a value can have) counts as frozen.
  assert _packed.distinct_and_zeros(np.asarray([1, 0, 0], np.int32)) == (1, 1, 0)


# --- init_stats: half-precision leaves --------------------------------------------------


@pytest.mark.parametrize("dtype, bits_of_three", [
    (jnp.bfloat16, 0x4040), (jnp.float16, 0x4200), (jnp.float32, 0x40400000)])
@pytest.mark.parametrize("channel", [False, True])
def test_top_bits_are_the_largest_magnitude_bit_pattern(dtype, bits_of_three, channel):
  # The largest |w| is 3.0 (stored negative): its bit pattern with the sign bit
  # cleared, in the leaf's own width (written out by hand per dtype).
  leaf = jnp.asarray([[0.5], [-3.0], [0.25], [-0.0]], dtype)
  per_leaf, top, n1 = _packed.init_stats([leaf], [jnp.zeros((), bool)], bits=(5,),
                                         channel=channel, mse=False)
  assert [int(t) for t in top] == [bits_of_three]
  # n1 = floor(log2(4 * 3.0 / 3)) = 2 (paper Eq. 3)
  assert [int(n) for n in n1] == [2] and int(per_leaf[0][0]) == 0
  # 5 bits: n2 = -5, so 0.5 and 0.25 are kept and only -0.0 rounds to zero;
  # nothing reaches 1.5 * 2^2 = 6.
  assert [int(per_leaf[0][1]), int(per_leaf[0][2])] == [1, 0]


# --- _select_largest: every k, ties everywhere ------------------------------------------


def reference_largest(keys, k):
  """Mask of the k largest keys, ties to the lowest flat index (numpy's stable sort)."""
  order = np.argsort(-keys.astype(np.int64), kind="stable")
  mask = np.zeros(keys.size, bool)
  mask[order[:k]] = True
  return mask


def test_search_and_take_every_k_with_ties_match_a_stable_sort():
  # Two leaves (200 and 50 keys, each padded to one block with the frozen key,
  # as `advance` pads them) of small int keys with many ties; for every k of each
  # leaf the mask is the stable-sort reference. The binary search over int32 bit
  # patterns passes through every small threshold, and through each of them from
  # intervals like [t - 1, t + 2], where a search that skips a value lands one
  # below the threshold and takes every tied key.
  sizes = (200, 50)
  rng = np.random.default_rng(0)
  leaves = [rng.integers(0, 9, s).astype(np.int32) for s in sizes]
  keys = np.full((2, _packed.BLOCK), _packed.FROZEN_KEY, np.int32)
  keys[0, :200] = leaves[0]
  keys[1, :50] = leaves[1]
  keys = keys.reshape(2, _packed.SUB, _packed.LANES)
  seg = jnp.asarray([0, 1], np.int32)
  pads = np.asarray([_packed.BLOCK - 200, _packed.BLOCK - 50], np.int32)

  @jax.jit
  def select(keys, ks):
    t = _partition.search(keys, ks, seg, 2, jnp.ones(2, bool))
    return _partition.take(keys, t, ks, _partition.tally(keys, t, seg, 2), seg, 2)

  for k0 in range(sizes[0] + 1):
    k1 = k0 % (sizes[1] + 1)
    mask = np.asarray(select(jnp.asarray(keys), jnp.asarray([k0, k1], np.int32) + pads))
    mask = mask.reshape(2, -1)
    for leaf, k, g in zip(leaves, (k0, k1), (mask[0, :200], mask[1, :50])):
      np.testing.assert_array_equal(g, reference_largest(leaf, k), err_msg=f"k={k}")
    assert mask[0, 200:].all() and mask[1, 50:].all()  # padding: always selected


def test_counts_stay_exact_in_a_leaf_of_more_than_2_to_the_24_weights():
  # VGG-16's fc6 holds 102,760,448 weights. Counts above 2^24 = 16,777,216 are
  # not exact in float32, so every count (compare-and-count passes, frozen
  # counts) must stay integer: here a leaf of 2^24 + 2^20 + 7 distinct
  # magnitudes, of which exactly k = size - 1001 (odd) must be frozen.
  size = 2**24 + 2**20 + 7
  # Consecutive float32 bit patterns from 2^-20 up, shuffled: distinct magnitudes
  # whose per-row counts are anything from 0 to 128 (sorted, nearly every row's
  # count would be 0 or 128, whose sums are exact in float32 too).
  rank = np.random.default_rng(0).permutation(size).astype(np.int32)
  w = jax.lax.bitcast_convert_type(jnp.asarray(rank) + 0x35800000, jnp.float32)
  k = size - 1001
  _, new_m, stats, _ = _packed.advance(
      [w], [jnp.zeros(size, bool)], [jnp.int32(0)], np.asarray([k], np.int32),
      np.asarray([0, 0], np.uint32), bits=(5,), strategy="magnitude")
  mask = np.asarray(new_m[0])
  assert int(mask.sum()) == k
  np.testing.assert_array_equal(mask, rank >= 1001)  # the k largest
  assert [int(x) for x in np.asarray(stats)[0, :3]] == [0, 0, 0]


def test_half_precision_mse_search_computes_in_float32():
  # Squared rounding errors summed in bfloat16 (8 significant bits) are far
  # less exact; the packed search must compute in float32 like the per-leaf
  # `mse_exponent_bounds`, its reference (tested against float64 sums). Seeds
  # 175 and 267 were found by search: layers whose best two candidates are
  # close enough that summing in bfloat16 picks the other one. In float64 they
  # differ by 0.39% and 0.058%, far above float32's summation noise, so the
  # result does not depend on the order a machine sums in.
  leaves = [jnp.asarray(np.random.default_rng(seed).standard_t(2, 256) * 0.1, jnp.bfloat16)
            for seed in (175, 267)]
  _, _, n1 = _packed.init_stats(leaves, [jnp.zeros((), bool)] * 2, bits=(3, 3),
                                channel=False, mse=True)
  want = [int(_codebook.mse_exponent_bounds(w, 3)[0]) for w in leaves]
  assert [int(n) for n in n1] == want
