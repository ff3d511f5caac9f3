"""Tests added to kill mutmut mutants of inq_jax/_codebook.py (docs/mutation_testing.md).

`representable` and `dtype_exponent_range` were only reached through `inq.init`
and the export; here they are checked at their exact boundaries against
numpy's own float arithmetic (2^k overflows, or falls below the smallest normal).
"""

import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from inq_jax import _codebook

DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]


def _normal(k: int, dtype) -> bool:
  """2^k is a finite normal number of `dtype` (numpy's arithmetic, not finfo's exponents)."""
  with np.errstate(over="ignore", under="ignore"):
    x = np.asarray(np.ldexp(np.float64(1.0), k)).astype(dtype)
  tiny = float(ml_dtypes.finfo(dtype).smallest_normal)
  return bool(np.isfinite(x)) and float(x) >= tiny and float(x) == 2.0 ** k


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_exponent_range_is_the_normal_powers_of_two(dtype):
  lo, hi = _codebook.dtype_exponent_range(dtype)
  assert type(lo) is int and type(hi) is int
  assert _normal(lo, dtype) and _normal(hi, dtype)
  assert not _normal(lo - 1, dtype) and not _normal(hi + 1, dtype)
  assert (lo, hi) == {np.float32: (-126, 127), np.float16: (-14, 15),
                      ml_dtypes.bfloat16: (-126, 127)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_representable_at_its_boundaries(dtype):
  lo, hi = _codebook.dtype_exponent_range(dtype)
  # Every value 2^n2..2^n1 and the lowest bin edge 2^(n2-1) must be normal.
  assert _codebook.representable(hi, lo + 1, dtype) is True
  assert _codebook.representable(hi + 1, lo + 1, dtype) is False
  assert _codebook.representable(hi, lo, dtype) is False
  assert _codebook.representable(0, -3, dtype) is True
  # Per channel: every entry must fit; an all-zero channel's {0} always does.
  z = _codebook.ZERO_CODEBOOK
  n1 = np.array([z, hi, 0], np.int32)
  n2 = np.array([_codebook.n2_from_n1(z, 8), lo + 1, -3], np.int32)
  assert _codebook.representable(n1, n2, dtype) is True
  assert _codebook.representable(np.array([z, z]), np.array([z, z]), dtype) is True
  assert _codebook.representable(n1, np.array([n2[0], lo, -3]), dtype) is False
  assert _codebook.representable(np.array([z, hi + 1, 0]), n2, dtype) is False


def _reference_member(x: float, n1: int, n2: int):
  """(member, j): x is exactly 0 or +-2^j with n2 <= j <= n1 (j None otherwise)."""
  if x == 0:
    return True, None
  if not np.isfinite(x) or n1 == _codebook.ZERO_CODEBOOK:
    return False, None
  f = Fraction(abs(x))
  j = f.numerator.bit_length() - f.denominator.bit_length()
  for cand in (j - 1, j, j + 1):
    if f == Fraction(2) ** cand:
      return n2 <= cand <= n1, cand
  return False, None


def _candidates(n1: int, n2: int, dtype) -> np.ndarray:
  out = [0.0, -0.0, np.inf, -np.inf, np.nan]
  for j in range(n2 - 2, n1 + 3):
    for v in (2.0 ** j, 3.0 * 2.0 ** (j - 1), 1.25 * 2.0 ** j):
      out += [v, -v]
    p = np.asarray(2.0 ** j, dtype)
    out += [float(np.nextafter(p, np.asarray(np.inf, dtype))),
            float(np.nextafter(p, np.asarray(0, dtype)))]
  return np.array(out, np.float64)


@pytest.mark.parametrize("n1,bits", [(0, 5), (-3, 2), (3, 3), (-20, 8)])
def test_codebook_exponents_match_exact_membership(n1, bits):
  """Members are exactly 0 and +-2^j, n2 <= j <= n1; k is j; NumPy and JAX agree."""
  n2 = int(_codebook.n2_from_n1(n1, bits))
  x = _candidates(n1, n2, np.float64)
  want = [_reference_member(float(v), n1, n2) for v in x]
  k, member = _codebook.codebook_exponents(x, n1, n2)  # numpy, float64 (the file format)
  assert k.dtype == np.int64 and member.dtype == bool
  np.testing.assert_array_equal(member, [m for m, _ in want])
  for v, (m, j), kk in zip(x, want, k):
    if m and j is not None:
      assert kk == j, (v, kk, j)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. asking jax for int64 with float64 off
    k32, member32 = _codebook.codebook_exponents(jnp.asarray(x, jnp.float32),
                                                 jnp.int32(n1), jnp.int32(n2), xp=jnp)
  assert k32.dtype == jnp.int32
  x32 = np.asarray(x, np.float32)
  want32 = [_reference_member(float(v), n1, n2)[0] for v in x32]
  np.testing.assert_array_equal(np.asarray(member32), want32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16, jnp.bfloat16])
def test_in_codebook_matches_exact_membership_per_channel(dtype):
  n1 = np.array([1, -2, _codebook.ZERO_CODEBOOK], np.int32)  # per output channel
  n2 = np.asarray(_codebook.n2_from_n1(n1, 4), np.int32)
  column = _candidates(1, int(n2[0]), np.float32)
  x = np.asarray(jnp.asarray(np.stack([column] * 3, axis=1), dtype))  # [m, 3]
  got = np.asarray(_codebook.in_codebook(jnp.asarray(x), n1, n2))
  for c in range(3):
    want = [_reference_member(float(v), int(n1[c]), int(n2[c]))[0] for v in x[:, c]]
    np.testing.assert_array_equal(got[:, c], want, err_msg=f"channel {c}")
  assert got[:, 2].sum() == np.sum(x[:, 2] == 0)  # the {0} codebook holds only zeros


def test_mse_exponent_bounds_rejects_integer_weights():
  with pytest.raises(TypeError) as e:
    _codebook.mse_exponent_bounds(jnp.arange(4), 3)
  assert str(e.value) == "mse_exponent_bounds needs floating-point weights, got dtype int32"


def test_mse_exponent_bounds_per_channel_is_each_channel_on_its_own():
  rng = np.random.default_rng(1)
  w = rng.standard_normal((300, 4)).astype(np.float32) * 0.05
  w[0] = [0.05 * 12, 0.05 * 2.5, 0.05 * 6, 0.0]  # different tails: different best n1
  w[:, 3] *= 8.0
  n1, n2 = _codebook.mse_exponent_bounds(jnp.asarray(w), 3, axes=(0,))
  want = [int(_codebook.mse_exponent_bounds(jnp.asarray(w[:, c]), 3)[0]) for c in range(4)]
  assert [int(v) for v in n1] == want
  assert len(set(int(v) - int(m) for v, m in
                 zip(n1, _codebook.exponent_bounds(np.abs(w).max(axis=0), 3)[0]))) > 1
  np.testing.assert_array_equal(np.asarray(n2), np.asarray(n1) + 1 - 2)


def test_in_codebook_under_jit():
  w = jnp.array([0.0, 0.25, 0.3, -1.0, 2.0])
  got = jax.jit(_codebook.in_codebook)(w, 0, -3)
  np.testing.assert_array_equal(np.asarray(got), [True, True, False, True, False])


F32_TINY, F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


@pytest.mark.parametrize("max_abs,why", [
    (-1.0, "must be finite and >= 0"), (float("nan"), "must be finite and >= 0"),
    (float("inf"), "must be finite and >= 0"), (1e39, "overflows float32"),
    (np.float32(F32_TINY / 2),
     "is subnormal in float32: no codebook of normal numbers holds it"),
    (np.float16(2.0 ** -15), None),  # subnormal in float16, normal in float32: accepted
])
def test_exponent_bounds_checks_max_abs_exactly(max_abs, why):
  if why is None:
    assert int(_codebook.exponent_bounds(max_abs, 5)[0]) == -15
    return
  with pytest.raises(ValueError) as e:
    _codebook.exponent_bounds(max_abs, 5)
  assert str(e.value) == f"exponent_bounds: max_abs {float(max_abs)!r} {why}"


def test_exponent_bounds_accepts_the_edges_of_float32_and_integers():
  assert int(_codebook.exponent_bounds(np.float32(F32_TINY), 5)[0]) == -126
  # 4/3 of the largest float32 is 2^128.4: n1 = 128, which `representable` refuses.
  assert int(_codebook.exponent_bounds(np.float32(F32_MAX), 5)[0]) == 128
  assert int(_codebook.exponent_bounds(3, 5)[0]) == 2  # 3 = 0.75 * 4
  assert int(_codebook.exponent_bounds(np.int32(0), 5)[0]) == _codebook.ZERO_CODEBOOK


def test_exponent_bounds_names_the_bad_channel():
  with pytest.raises(ValueError) as e:
    _codebook.exponent_bounds(np.array([1.0, 2.0, -1.0], np.float32), 5)
  assert str(e.value) == "exponent_bounds: max_abs -1.0 at index (2,) must be finite and >= 0"


def test_mse_search_reaches_exactly_eight_octaves_down():
  # 2 bits ({0, +-2^n1}) with an outlier of 1.0 (absmax n1 = 0) over a bulk of
  # 2^19 weights. A bulk at 2^-8 is best kept: n1 = -8 (the last candidate;
  # squared error ~1, against 8 at n1 = 0). A bulk at 2^-9 would be best at
  # n1 = -9 (~1), one octave past the search; among n1 = 0..-8, n1 = 0 (2.0).
  assert _codebook.MSE_SEARCH_OCTAVES == 8
  for bulk, want in ((2.0 ** -8, -8), (2.0 ** -9, 0)):
    w = np.full(2 ** 19, bulk, np.float32)
    w[0] = 1.0
    assert int(_codebook.mse_exponent_bounds(jnp.asarray(w), 2)[0]) == want, bulk


def test_mse_ties_keep_the_larger_n1():
  # 0.75 rounds to 1 (n1 = 0) or to 0.5 (n1 = -1): the same error 0.0625.
  assert int(_codebook.mse_exponent_bounds(jnp.array([0.75]), 2)[0]) == 0


def test_check_bits_message_names_the_type():
  with pytest.raises(TypeError) as e:
    _codebook.check_bits("5")
  assert str(e.value) == "bits must be an int in [2, 8], got '5' (str)"


@pytest.mark.parametrize("max_abs", [3, np.int32(3), np.float16(3.0), jnp.bfloat16(3.0),
                                     np.array([3.0, 0.0], np.float32)])
def test_exponent_bounds_of_any_number_type_are_int32(max_abs):
  n1, n2 = _codebook.exponent_bounds(max_abs, 4)
  assert n1.dtype == jnp.int32 and n2.dtype == jnp.int32
  assert np.ravel(np.asarray(n1))[0] == 2 and np.ravel(np.asarray(n2))[0] == 2 + 1 - 4


def test_n2_from_n1_on_python_numpy_and_jax_integers():
  z = _codebook.ZERO_CODEBOOK
  for n1 in (0, np.int32(0), np.array([0, z], np.int32)):
    n2 = _codebook.n2_from_n1(n1, 5)
    assert isinstance(n2, (np.ndarray, np.integer)) and n2.dtype == np.int64  # no overflow
    np.testing.assert_array_equal(n2, np.asarray(n1, np.int64) - 7)
  assert int(_codebook.n2_from_n1(np.array([z], np.int32), 8)[0]) == z - 63
  got = _codebook.n2_from_n1(jnp.array([3, -2], jnp.int32), 2)
  assert isinstance(got, jax.Array) and got.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(got), [3, -2])
  got = _codebook.n2_from_n1(jnp.array([3, -2], jnp.int32), 6)
  np.testing.assert_array_equal(np.asarray(got), [3 - 15, -2 - 15])


_NEEDS = "; the codebook 2^n2..2^n1 needs n1 >= n2 (n2 = n1 + 1 - 2^(bits-2))"


def test_round_to_pow2_refuses_n1_below_n2_naming_the_channel():
  w = jnp.ones((2, 3))
  with pytest.raises(ValueError) as e:
    _codebook.round_to_pow2(w, -4, -3)
  assert str(e.value) == "round_to_pow2: n1=-4 < n2=-3" + _NEEDS
  with pytest.raises(ValueError) as e:
    _codebook.round_to_pow2(w, np.array([0, -5, -6]), np.array([-3, -3, -3]))
  assert str(e.value) == "round_to_pow2: n1=-5 < n2=-3 at index (1,)" + _NEEDS
  with pytest.raises(ValueError) as e:  # channel 0 has n1 == n2 (allowed)
    _codebook.round_to_pow2(w, np.array([-3, -5, 0]), np.array([-3, -3, -3]))
  assert str(e.value) == "round_to_pow2: n1=-5 < n2=-3 at index (1,)" + _NEEDS
  # n1 == n2 is the 2-bit codebook {0, +-2^n1}
  np.testing.assert_array_equal(np.asarray(_codebook.round_to_pow2(w, -3, -3)), 0.125)


def test_round_to_pow2_with_either_bound_traced():
  w = jnp.array([0.3, -0.75, 5.0, 0.01])
  want = np.asarray(_codebook.round_to_pow2(w, 0, -3))
  for f, arg in ((lambda n1: _codebook.round_to_pow2(w, n1, -3), 0),
                 (lambda n2: _codebook.round_to_pow2(w, 0, n2), -3)):
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(arg)), want)
  np.testing.assert_array_equal(
      np.asarray(jax.jit(lambda a, b: _codebook.round_to_pow2(w, a, b))(0, -3)), want)
