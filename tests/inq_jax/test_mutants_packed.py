"""inq_jax._packed's helpers, exactly: written to kill the mutants mutmut left alive.

See docs/mutation_testing.md. `init_stats`, `advance` and `value_ids` are
jitted whole-tree programs (mutmut does not mutate decorated functions), so
their helpers are checked here through them and directly, against values
written out by hand or computed with numpy.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _packed
from inq_jax import quantize as inq

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
  nonfinite, top, n1 = _packed.init_stats([leaf], bits=5, channel=channel, mse=False)
  assert [int(t) for t in top] == [bits_of_three]
  # n1 = floor(log2(4 * 3.0 / 3)) = 2 (paper Eq. 3)
  assert [int(n) for n in n1] == [2] and [int(c) for c in nonfinite] == [0]
