"""Power-of-two codebooks: exponent bounds (paper Sec. 2.1) and Eq. 4 rounding.

A b-bit INQ codebook for one layer (or one output channel) is

    P = {0} U {+-2^k : n2 <= k <= n1},   n1 = floor(log2(4 s / 3)),
                                         n2 = n1 + 1 - 2^(b-2),

where s is the largest |w| of the *pretrained* weights. Everything here is exact:
no float log2 is taken, the exponent comes from `frexp`, whose mantissa comparison
against 0.75 is exact in every binary float format.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Eqs. 2-4.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np

# n1 of a layer (or channel) whose pretrained weights are all zero. Its codebook is
# {0}: every weight rounds to 0 and stays there. Far below any float exponent, so it
# can never collide with a real n1, and n2 = n1 + 1 - 2^(b-2) still fits in int32.
ZERO_CODEBOOK = -(2**30)

MIN_BITS, MAX_BITS = 2, 8

# The unsigned integer of each float width, for bit-pattern arithmetic.
UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def check_bits(bits) -> int:
  """Returns `bits` if it is a Python int in [2, 8], else raises a clear error."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
    raise TypeError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {bits!r} "
                    f"({type(bits).__name__})")
  if not MIN_BITS <= bits <= MAX_BITS:
    raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
  return int(bits)


def num_exponents(bits: int) -> int:
  """Number of non-zero magnitudes 2^n2..2^n1 in a b-bit codebook: 2^(b-2)."""
  return 2 ** (check_bits(bits) - 2)


def max_distinct_values(bits: int) -> int:
  """Size of a b-bit codebook: zero plus both signs of 2^(b-2) powers = 2^(b-1)+1."""
  return 2 * num_exponents(bits) + 1


def _compute_dtype(dtype):
  # float16/bfloat16 upcast to float32 exactly; float32/float64 are used as they are.
  return jnp.float32 if jnp.dtype(dtype).itemsize < 4 else dtype


def _check_max_abs(max_abs) -> None:
  """Raises unless every concrete `max_abs` is 0 or a finite normal number >= 0.

  Checked in float64 on the host, where nothing is flushed to zero, against
  the range of the dtype jax will compute in.
  """
  x = np.asarray(max_abs).astype(np.float64)
  dtype = jnp.asarray(max_abs).dtype
  info = jnp.finfo(_compute_dtype(dtype if jnp.issubdtype(dtype, jnp.floating)
                                  else jnp.float32))
  tiny, big = float(info.smallest_normal), float(info.max)
  bad = ~(x >= 0) | (x > big) | ((x > 0) & (x < tiny))
  if bad.any():
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    v = float(x[idx])
    if 0 < v < tiny:
      why = f"is subnormal in {info.dtype}: no codebook of normal numbers holds it"
    elif big < v < np.inf:
      why = f"overflows {info.dtype}"
    else:
      why = "must be finite and >= 0"
    at = f" at index {idx}" if idx else ""
    raise ValueError(f"exponent_bounds: max_abs {v!r}{at} {why}")


def exponent_bounds(max_abs, bits: int):
  """The exponent range (n1, n2) of a b-bit INQ codebook.

  n1 = floor(log2(4 * max_abs / 3)) computed exactly: with max_abs = m * 2^e and
  m in [0.5, 1), n1 = e if m >= 0.75 else e - 1. So max_abs = 0.75 * 2^k gives
  exactly k, in float16, bfloat16, float32 and float64 alike, where a float log2
  can land just below the integer. n2 = n1 + 1 - 2^(bits-2).

  Args:
    max_abs: the largest |w| of the pretrained weights; a scalar or an array
      (one entry per output channel). Must be finite, >= 0, and 0 or a normal
      number of its dtype.
    bits: the codebook's bit-width b, a Python int in [2, 8].

  Returns:
    `(n1, n2)` as int32 arrays of `max_abs`'s shape. Where max_abs == 0 (an
    all-zero layer or channel), n1 is `ZERO_CODEBOOK` and the codebook is {0}.

  Raises:
    ValueError for a negative, NaN, infinite or subnormal `max_abs`, checked
    when it is concrete (eagerly). Under `jax.jit` the values are unknown and
    nothing is checked: a NaN gives n1 = `ZERO_CODEBOOK`.

  Example:
    >>> exponent_bounds(0.75, bits=5)   # 0.75 = 0.75 * 2^0
    (Array(0, dtype=int32), Array(-7, dtype=int32))

  Reference: arXiv:1702.03044, Eq. 3 and the text after it.
  """
  bits = check_bits(bits)
  if not isinstance(max_abs, jax.core.Tracer):
    _check_max_abs(max_abs)
  s = jnp.asarray(max_abs)
  if not jnp.issubdtype(s.dtype, jnp.floating):
    s = s.astype(jnp.float32)
  n1 = top_exponent(s.astype(_compute_dtype(s.dtype)))
  return n1, n2_from_n1(n1, bits)


def top_exponent(max_abs):
  """n1 = floor(log2(4 max_abs / 3)) exactly (int32), `ZERO_CODEBOOK` where max_abs == 0.

  `exponent_bounds` without its checks, for callers that checked (or trace) already.
  """
  mantissa, exponent = jnp.frexp(max_abs)
  n1 = exponent.astype(jnp.int32) - (mantissa < 0.75).astype(jnp.int32)
  return jnp.where(max_abs > 0, n1, jnp.int32(ZERO_CODEBOOK))


def round_to_pow2(w, n1, n2):
  """Rounds weights to the codebook {0} U {+-2^k : n2 <= k <= n1} (paper Eq. 4).

  With alpha < beta adjacent in {0, 2^n2, ..., 2^n1}, |w| maps to beta when
  (alpha + beta)/2 <= |w| < 3 beta / 2; so |w| < 2^(n2-1) -> 0 and
  0.75 * 2^k <= |w| < 1.5 * 2^k -> 2^k (lower bounds inclusive: ties go up).
  Eq. 4 read literally would zero |w| >= 1.5 * 2^n1; weights can grow past that
  during retraining while n1 stays fixed from the pretrained model, so they
  saturate to +-2^n1 instead. Zero is returned as +0.0.

  Args:
    w: a floating-point array.
    n1, n2: int exponent bounds, scalars or arrays broadcastable against `w`
      (per-output-channel bounds of shape `(w.shape[-1],)` broadcast along the
      last axis, which is the output axis of Flax Dense and Conv kernels).
      `n1 == ZERO_CODEBOOK` means the codebook {0}.

  Returns:
    An array of the same shape and dtype as `w`. NaN stays NaN.

  Raises:
    ValueError if concrete (eager) bounds have n1 < n2 anywhere; under
    `jax.jit` they are not checked.

  Example:
    >>> round_to_pow2(jnp.array([0.3, -0.75, 5.0]), n1=0, n2=-3)
    Array([ 0.25, -1.  ,  1.  ], dtype=float32)

  Reference: arXiv:1702.03044, Eq. 4.
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"round_to_pow2 needs floating-point weights, got dtype {w.dtype}")
  if not isinstance(n1, jax.core.Tracer) and not isinstance(n2, jax.core.Tracer):
    lo, hi = np.broadcast_arrays(np.asarray(n2), np.asarray(n1))
    if np.any(hi < lo):
      idx = tuple(int(i) for i in np.argwhere(hi < lo)[0])
      raise ValueError(f"round_to_pow2: n1={int(hi[idx])} < n2={int(lo[idx])}"
                       f"{f' at index {idx}' if idx else ''}; the codebook 2^n2..2^n1 "
                       "needs n1 >= n2 (n2 = n1 + 1 - 2^(bits-2))")
  return _round_jit(w, n1, n2)


def _round(w, n1, n2):
  """round_to_pow2 after its checks; jitted (`_round_jit`), also when called eagerly."""
  x = w.astype(_compute_dtype(w.dtype))
  n1 = jnp.asarray(n1, jnp.int32)
  n2 = jnp.asarray(n2, jnp.int32)
  a = jnp.abs(x)
  mantissa, exponent = jnp.frexp(a)
  # Nearest power of two with ties up: a in [0.75 * 2^k, 1.5 * 2^k) -> k.
  k = exponent.astype(jnp.int32) - (mantissa < 0.75).astype(jnp.int32)
  k = jnp.clip(k, n2, n1)  # below: the [2^(n2-1), 0.75 * 2^n2) bin; above: saturate.
  k = jnp.where(jnp.isinf(a), n1, k)
  one = jnp.ones((), x.dtype)
  # Compared as floats rather than through frexp's exponent, which is wrong for
  # subnormals on some backends; 2^(n2-1) is a normal number for codebooks that
  # `init` accepts, and such tiny weights round to zero either way.
  keep = (a >= jnp.ldexp(one, n2 - 1)) & (n1 != ZERO_CODEBOOK)
  magnitude = jnp.ldexp(one, k)
  q = jnp.where(keep, jnp.where(x < 0, -magnitude, magnitude), jnp.zeros((), x.dtype))
  q = jnp.where(jnp.isnan(x), x, q)
  return q.astype(w.dtype)


# One compiled program per input signature. Called eagerly, the ~20 operations
# above would each be compiled for every new weight shape: 2-3 s per layer on a
# 2-core CPU (codebook reports, a user's own eager call), against ~0.1 s jitted.
_round_jit = jax.jit(_round)


# How many octaves below the absmax n1 `mse_exponent_bounds` searches. Eight covers
# layers whose largest weight is 256x their typical one, far past any trained net.
MSE_SEARCH_OCTAVES = 8


def mse_exponent_bounds(w, bits: int, axes=None):
  """The exponent range (n1, n2) whose codebook rounds `w` with least squared error.

  The paper anchors n1 at the largest |w| (`exponent_bounds`). In a layer with a
  heavy tail that leaves most weights below 2^(n2-1): a batch-norm-free LeNet's
  fc1 has max |w| = 9.5 std, so its 3-bit absmax codebook rounds 98% of the
  weights to zero. This calibration instead tries n1 = n1_absmax - d for
  d = 0..MSE_SEARCH_OCTAVES and keeps the one minimising sum (round_to_pow2(w) -
  w)^2 (ties keep the larger n1); weights above the new top saturate to +-2^n1.
  An extension, not in the paper.

  Args:
    w: the pretrained floating-point weights of one leaf.
    bits: codebook bit-width b.
    axes: axes reduced over; `None` for one codebook per leaf, all but the last
      for one per output channel.

  Returns:
    `(n1, n2)` as int32 arrays of the reduced shape; all-zero weights get
    `ZERO_CODEBOOK` as in `exponent_bounds`.

  Example:
    >>> w = jnp.full(20, 0.1).at[0].set(0.5)  # ternary: {0, +-2^n1}
    >>> exponent_bounds(jnp.max(jnp.abs(w)), 2)[0], mse_exponent_bounds(w, 2)[0]
    (Array(-1, dtype=int32), Array(-3, dtype=int32))
  """
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"mse_exponent_bounds needs floating-point weights, got dtype {w.dtype}")
  x = w.astype(_compute_dtype(w.dtype))
  n1_max, _ = exponent_bounds(jnp.max(jnp.abs(x), axis=axes), bits)
  best_n1 = mse_search(x, n1_max, 1 - num_exponents(bits), lambda n1: n1,
                       lambda err: jnp.sum(err, axis=axes))
  return best_n1, n2_from_n1(best_n1, bits)


def mse_search(x, n1_max, shift, at_weights, reduce):
  """The candidate n1 = n1_max - d (d = 0..MSE_SEARCH_OCTAVES) of least squared error.

  `at_weights(n1)` broadcasts per-codebook exponents against `x`, `shift` (n2 -
  n1, an int or an int array broadcastable like `at_weights(n1)`) gives each
  codebook's n2, `reduce` sums squared errors per codebook; ties keep the larger n1 (less saturation),
  and all-zero codebooks keep `ZERO_CODEBOOK`. Shared by `mse_exponent_bounds`
  (one leaf) and `inq_jax._packed` (every leaf at once).
  """
  empty = n1_max == ZERO_CODEBOOK
  best_n1, best_err = n1_max, None
  for d in range(MSE_SEARCH_OCTAVES + 1):
    cand = jnp.where(empty, n1_max, n1_max - d)
    n1 = at_weights(cand)
    err = reduce(jnp.square(_round(x, n1, n1 + shift) - x))
    if best_err is None:
      best_n1, best_err = cand, err
      continue
    better = err < best_err  # strict: on a tie the larger n1 (less saturation) stays
    best_n1 = jnp.where(better, cand, best_n1)
    best_err = jnp.where(better, err, best_err)
  return best_n1


def n2_from_n1(n1, bits: int):
  """n2 = n1 + 1 - 2^(b-2): the smallest exponent of a b-bit codebook (paper Eq. 3).

  Works on Python ints, numpy and jax integer arrays alike (the result keeps the
  input's array type; numpy inputs are widened to int64 so no bound overflows).
  """
  shift = 1 - num_exponents(bits)
  if isinstance(n1, (np.ndarray, np.integer, int)):
    return np.asarray(n1, np.int64) + shift
  return n1 + jnp.asarray(shift, jnp.asarray(n1).dtype)


def codebook_exponents(x, n1, n2, xp=np):
  """The one codebook-membership test: (k, member) elementwise.

  `member` is True where x is exactly 0 (either sign) or +-2^k with n2 <= k <= n1
  and the codebook is not {0} (n1 == ZERO_CODEBOOK); `k` is floor(log2|x|) (only
  meaningful where x is a nonzero member). `xp` is `numpy` (the file format and
  the shift reference, in float64) or `jax.numpy` (`in_codebook`, under jit).
  """
  a = xp.abs(x)
  mantissa, exponent = xp.frexp(a)
  k = exponent.astype(xp.int64 if xp is np else xp.int32) - 1
  pow2 = (mantissa == 0.5) & (k >= n2) & (k <= n1) & (n1 != ZERO_CODEBOOK)
  # The exact round trip guards against frexp quirks on subnormals (some backends).
  pow2 &= xp.ldexp(xp.ones((), a.dtype), xp.where(pow2, k, 0).astype(xp.int32)) == a
  return k, (a == 0) | pow2


def in_codebook(w, n1, n2):
  """Elementwise: is `w` exactly 0 or +-2^k with n2 <= k <= n1?"""
  w = jnp.asarray(w)
  x = w.astype(_compute_dtype(w.dtype))
  return codebook_exponents(x, jnp.asarray(n1, jnp.int32), jnp.asarray(n2, jnp.int32),
                            xp=jnp)[1]


def representable(n1, n2, dtype) -> bool:
  """True when every codebook value and bin edge 2^(n2-1)..2^n1 is a normal `dtype`."""
  return not unrepresentable(n1, n2, dtype).any()


def unrepresentable(n1, n2, dtype) -> np.ndarray:
  """bool, shaped like n1: codebooks with a value or bin edge that is not a normal `dtype`.

  The one rule for "can this dtype hold the codebook": `init` refuses such a
  codebook, a state or a file that holds one was edited or made for another dtype.
  """
  lo, hi = dtype_exponent_range(dtype)
  n1 = np.asarray(n1, np.int64)
  n2 = np.asarray(n2, np.int64)
  return (n1 != ZERO_CODEBOOK) & ((n1 > hi) | (n2 - 1 < lo))


def dtype_exponent_range(dtype):
  """(smallest, largest) k with 2^k a normal number of `dtype`."""
  info = jnp.finfo(dtype)
  return int(info.minexp), int(info.maxexp) - 1


__all__ = [
    "ZERO_CODEBOOK", "codebook_exponents", "n2_from_n1", "exponent_bounds", "round_to_pow2", "in_codebook",
    "max_distinct_values", "num_exponents",
]
