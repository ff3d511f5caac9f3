"""round_to_pow2 / exponent_bounds against an exact reference written here.

The reference works in exact rationals (fractions.Fraction), straight from the
paper's Eq. 4 bins, so it shares no code or float trick with the library.
"""

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from inq_jax import quantize as inq
from inq_jax._codebook import MSE_SEARCH_OCTAVES


def ref_n1(s: float) -> int:
  """max k with 0.75 * 2^k <= s, exactly."""
  s = Fraction(s)
  k = math.floor(math.log2(float(s)))  # a guess, corrected exactly below
  while Fraction(3, 4) * Fraction(2) ** (k + 1) <= s:
    k += 1
  while Fraction(3, 4) * Fraction(2) ** k > s:
    k -= 1
  return k


def ref_round(w: float, n1: int, n2: int) -> float:
  """Eq. 4 with saturation, on exact rationals."""
  a = abs(Fraction(w))
  two = Fraction(2)
  if a < two ** (n2 - 1):
    return 0.0
  if a >= Fraction(3, 2) * two ** n1:
    k = n1  # saturate
  elif a < Fraction(3, 2) * two ** n2:
    k = n2  # the first bin: [2^(n2-1), 1.5 * 2^n2)
  else:
    k = next(k for k in range(n2 + 1, n1 + 1)
             if Fraction(3, 4) * two ** k <= a < Fraction(3, 2) * two ** k)
  return math.copysign(float(two ** k), w)


def boundary_values(n1, n2, dtype=np.float32):
  """Every bin edge from 2^(n2-1) to 1.5 * 2^(n1+1), with its float neighbours."""
  edges = [2.0 ** (n2 - 1)] + [f * 2.0 ** k for k in range(n2 - 1, n1 + 2)
                               for f in (0.75, 1.0, 1.5)]
  out = []
  for e in edges:
    e = dtype(e)
    out += [np.nextafter(e, dtype(0)), e, np.nextafter(e, dtype(np.inf))]
  vals = np.array(out, dtype)
  return np.concatenate([vals, -vals])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n1", [-9, -3, 0, 2])
def test_round_every_boundary_and_neighbours(bits, n1):
  n2 = n1 + 1 - 2 ** (bits - 2)
  w = boundary_values(n1, n2)
  got = np.asarray(inq.round_to_pow2(jnp.asarray(w), n1, n2))
  want = np.array([ref_round(float(x), n1, n2) for x in w], np.float32)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_round_boundaries_half_precision(dtype):
  n1, n2 = 1, -2  # 4 bits; every edge is a normal half-precision number
  w = boundary_values(n1, n2, dtype=np.dtype(dtype).type)
  got = inq.round_to_pow2(jnp.asarray(w, dtype), n1, n2)
  assert got.dtype == dtype
  want = [ref_round(float(x), n1, n2) for x in np.asarray(w, np.float32)]
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.array(want, np.float32))


finite_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, width=32)


@settings(max_examples=300, deadline=None)
@given(w=st.lists(finite_f32, min_size=1, max_size=64), bits=st.integers(2, 8),
       n1=st.integers(-20, 10))
def test_round_matches_reference(w, bits, n1):
  n2 = n1 + 1 - 2 ** (bits - 2)
  # Repeated to one length: one compiled program for all examples, not one per length.
  w = np.resize(np.array(w, np.float32), 64)
  got = np.asarray(inq.round_to_pow2(jnp.asarray(w), n1, n2))
  want = np.array([ref_round(float(x), n1, n2) for x in w], np.float32)
  np.testing.assert_array_equal(got, want)
  assert not np.any(np.signbit(got) & (got == 0)), "zero must come back as +0.0"
  assert np.all(np.asarray(inq.in_codebook(jnp.asarray(got), n1, n2)))


@settings(max_examples=200, deadline=None)
@given(w=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=200),
       bits=st.integers(2, 8))
def test_at_most_codebook_size_distinct_values(w, bits):
  w = jnp.asarray(np.resize(np.array(w, np.float32), 200))  # same values, one shape
  s = float(jnp.max(jnp.abs(w)))
  n1, n2 = inq.exponent_bounds(s, bits)
  q = np.asarray(inq.round_to_pow2(w, n1, n2))
  assert len(np.unique(q)) <= 2 ** (bits - 1) + 1 == inq.max_distinct_values(bits)
  if s > 0:  # the largest weight maps to +-2^n1 (paper: 0.75 * 2^n1 <= s < 1.5 * 2^n1)
    assert np.max(np.abs(q)) == 2.0 ** int(n1)


@settings(max_examples=300, deadline=None)
@given(s=st.floats(min_value=2.0 ** -100, max_value=2.0 ** 100, allow_nan=False, width=32),
       bits=st.integers(2, 8))
def test_exponent_bounds_matches_reference(s, bits):
  n1, n2 = inq.exponent_bounds(np.float32(s), bits)
  assert int(n1) == ref_n1(float(np.float32(s)))
  assert int(n2) == int(n1) + 1 - 2 ** (bits - 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
@pytest.mark.parametrize("k", [-12, -5, -1, 0, 1, 3, 7])
def test_exponent_bounds_exact_at_three_quarters(dtype, k):
  s = dtype(0.75 * 2.0 ** k)
  assert int(inq.exponent_bounds(s, 5)[0]) == k  # a float log2 can land just below k
  below = np.nextafter(np.float32(s), np.float32(0)) if dtype != np.float16 and \
      dtype != ml_dtypes.bfloat16 else dtype(float(s) * (1 - 2.0 ** -7))
  assert int(inq.exponent_bounds(below, 5)[0]) == k - 1
  # 1.5 * 2^k = 0.75 * 2^(k+1): exactly the lower edge of the next bin.
  assert int(inq.exponent_bounds(dtype(1.5 * 2.0 ** k), 5)[0]) == k + 1


def test_exponent_bounds_per_channel_and_zero():
  n1, n2 = inq.exponent_bounds(jnp.array([0.75, 0.0, 3.0, 0.1]), 3)
  np.testing.assert_array_equal(n1, [0, inq.ZERO_CODEBOOK, 2, -3])  # 0.1 >= 0.75 * 2^-3
  np.testing.assert_array_equal(n2, np.asarray(n1) - 1)


def test_zero_codebook_rounds_everything_to_zero():
  w = jnp.array([1.0, -3.0, 1e-3, 0.0])
  n1 = jnp.int32(inq.ZERO_CODEBOOK)
  np.testing.assert_array_equal(inq.round_to_pow2(w, n1, n1 - 7), np.zeros(4))


def test_saturation_never_zeroes_a_large_weight():
  n1, n2 = 0, -7
  w = jnp.array([1.49, 1.5, 3.0, 1e6, -1e30, jnp.inf])
  np.testing.assert_array_equal(inq.round_to_pow2(w, n1, n2), [1, 1, 1, 1, -1, 1])


def test_per_channel_broadcast_along_last_axis():
  w = jnp.full((3, 2), 0.3)
  q = inq.round_to_pow2(w, jnp.array([0, -3]), jnp.array([-1, -4]))
  np.testing.assert_array_equal(q, [[0.5, 0.125]] * 3)  # ch 0: [0.25, 0.75) -> 0.5; ch 1 saturates


def test_jit_compatible():
  f = jax.jit(lambda w, s: inq.round_to_pow2(w, *inq.exponent_bounds(s, 4)))
  np.testing.assert_array_equal(f(jnp.array([0.3, 0.9]), 1.0), [0.25, 1.0])


@pytest.mark.parametrize("bits", [1, 9, 0, -3])
def test_bad_bits_range(bits):
  with pytest.raises(ValueError, match=f"got {bits}"):
    inq.exponent_bounds(1.0, bits)


@pytest.mark.parametrize("bits", [5.0, True, "5", None])
def test_bad_bits_type(bits):
  with pytest.raises(TypeError, match="bits must be an int"):
    inq.exponent_bounds(1.0, bits)


def test_round_rejects_integers():
  with pytest.raises(TypeError, match="int32"):
    inq.round_to_pow2(jnp.arange(3), 0, -1)


def ref_mse_n1(w: np.ndarray, bits: int) -> int:
  """Brute force on exact rationals: n1 <= absmax n1 with least squared error."""
  top = ref_n1(float(np.abs(w).max()))
  errors = {}
  for n1 in range(top - MSE_SEARCH_OCTAVES, top + 1):
    n2 = n1 + 1 - 2 ** (bits - 2)
    errors[n1] = sum((Fraction(ref_round(float(x), n1, n2)) - Fraction(float(x))) ** 2
                     for x in w)
  best = min(errors.values())
  return max(n1 for n1, e in errors.items() if e == best)  # ties: the larger n1


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([2, 3, 4, 5]),
       st.floats(0.5, 20.0), st.integers(-12, 4))
def test_mse_exponent_bounds_matches_brute_force(seed, bits, tail, scale):
  rng = np.random.default_rng(seed)
  w = (rng.standard_t(3, size=40) * 2.0 ** scale).astype(np.float32)
  w[0] = tail * 2.0 ** scale * np.sign(w[0] or 1)  # an outlier `tail` x the bulk
  n1, n2 = inq.mse_exponent_bounds(jnp.asarray(w), bits)
  assert int(n1) == ref_mse_n1(w, bits)
  assert int(n2) == int(n1) + 1 - 2 ** (bits - 2)
  assert int(n1) <= ref_n1(float(np.abs(w).max()))


def test_mse_calibration_never_worse_than_absmax_and_keeps_the_bulk():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((400, 3)).astype(np.float32) * 0.05
  w[0, :] = [0.05 * 9.5, 0.05 * 2.0, 0.0]  # heavy tail in channel 0, none in 1
  w[:, 2] = 0.0  # an all-zero channel keeps the {0} codebook
  n1_abs, n2_abs = inq.exponent_bounds(np.abs(w).max(axis=0), 3)
  n1_mse, n2_mse = inq.mse_exponent_bounds(jnp.asarray(w), 3, axes=(0,))
  err = lambda n1, n2: np.sum((np.asarray(inq.round_to_pow2(w, n1, n2)) - w) ** 2, axis=0)
  assert np.all(err(n1_mse, n2_mse) <= err(n1_abs, n2_abs))
  assert int(n1_mse[0]) < int(n1_abs[0])  # the outlier no longer sets the range
  assert int(n1_mse[2]) == inq.ZERO_CODEBOOK
  zeros = np.mean(np.asarray(inq.round_to_pow2(w[:, 0], n1_mse[0], n2_mse[0])) == 0)
  assert zeros < 0.6  # the absmax codebook zeroes > 90% of this channel
  assert np.mean(np.asarray(inq.round_to_pow2(w[:, 0], n1_abs[0], n2_abs[0])) == 0) > 0.9
  # One codebook per leaf is the same search over every axis.
  n1_leaf, _ = inq.mse_exponent_bounds(jnp.asarray(w), 3)
  assert int(n1_leaf) == ref_mse_n1(w.ravel(), 3)
