"""Tests added to kill mutmut mutants of inq_jax/_codebook.py (docs/mutation_testing.md).

`representable` and `dtype_exponent_range` were only reached through `inq.init`
and the export; here they are checked at their exact boundaries against
numpy's own float arithmetic (2^k overflows, or falls below the smallest normal).
"""

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
