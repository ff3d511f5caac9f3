"""Reference integer inference for INQ layers: multiplications become bit shifts.

Every INQ weight is 0 or +-2^k, so with fixed-point activations x = X * 2^-f
(X an integer, f = `frac_bits`) a product is a shift:

    x * (+-2^k) = +-(X << (k - k0)) * 2^(k0 - f),   k0 = the smallest exponent used,

and a dot product is a sum of signed, shifted integers, exact in an int64
accumulator whose unit is 2^(k0 - f), i.e. with f - k0 fractional bits
(`accumulator_frac_bits`). The bias is added in that fixed point, and the sum is
rounded (half to even) to the requested output precision.

This is a reference, written for exactness and clarity, not speed: numpy int64,
no floats on the integer path. The shift-add is organised per exponent: the
activations meeting weight +-2^k are added or subtracted (a matrix of signs in
{-1, 0, 1}) and that partial sum is shifted left by k - k0, which is the same
integer as shifting each activation first (shifts distribute over exact
integer sums). An `OverflowError` is raised before computing if int64 could
overflow.

    codes = to_codes(w, n1, n2)                   # w: INQ-quantized kernel
    codes = from_stored(q.codes, q.n1, q.bits)    # or a leaf of export.read_codes
    x_int = quantize_activations(x, frac_bits=8)
    y_int = shift_dense(x_int, codes, bias, frac_bits=8)   # 8 fractional bits
    y = dequantize(y_int, 8)

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 1 and 4 (power-of-two weights turn multiplications into
bit shifts on hardware such as FPGAs).
"""

from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from inq_jax._codebook import ZERO_CODEBOOK, check_bits, codebook_exponents

_LIMIT = 2**62  # headroom below int64's 2^63 for the accumulator


class Codes(NamedTuple):
  """A quantized kernel as shift codes: w = nonzero * sign * 2^exp.

  Attributes:
    sign: int8, +1 or -1 (+1 where the weight is zero).
    exp: int32, the exponent k of +-2^k (0 where the weight is zero).
    nonzero: bool, False where the weight is 0.
  """
  sign: np.ndarray
  exp: np.ndarray
  nonzero: np.ndarray


def to_codes(w, n1, n2) -> Codes:
  """Splits INQ-quantized weights into (sign, exponent, nonzero).

  Args:
    w: weights, each exactly 0 or +-2^k with n2 <= k <= n1 (any float dtype).
    n1, n2: the codebook's exponent bounds, scalars or per-output-channel arrays
      (broadcast along the last axis), as in `inq.exponent_bounds`.

  Returns:
    `Codes(sign int8, exp int32, nonzero bool)`, each of w's shape.

  Raises:
    ValueError naming the index and value of the first weight outside the
    codebook.

  Example:
    >>> to_codes(np.array([0.5, 0.0, -0.125]), n1=0, n2=-3)
    Codes(sign=array([ 1,  1, -1], dtype=int8), exp=array([-1,  0, -3], dtype=int32),
          nonzero=array([ True, False,  True]))

  Reference: arXiv:1702.03044, Eq. 3-4 (the codebook).
  """
  x = np.asarray(w).astype(np.float64)
  n1 = np.asarray(n1, np.int64)
  n2 = np.asarray(n2, np.int64)
  k, ok = codebook_exponents(x, n1, n2, xp=np)
  nonzero = x != 0
  if not ok.all():
    idx = tuple(int(i) for i in np.argwhere(~ok)[0])
    raise ValueError(f"weight {float(x[idx])!r} at index {idx} is not 0 or +-2^k with "
                     f"{np.broadcast_to(n2, x.shape)[idx]} <= k <= "
                     f"{np.broadcast_to(n1, x.shape)[idx]}")
  sign = np.where(np.signbit(x) & nonzero, -1, 1).astype(np.int8)
  return Codes(sign, np.where(nonzero, k, 0).astype(np.int32), nonzero)


def from_stored(codes, n1, bits: int) -> Codes:
  """The shift codes of a leaf's stored b-bit codes, in integers only.

  `export.read_codes` returns each quantized leaf's codes with its own width
  (`QuantizedCodes.bits`; leaves of one file may differ, see
  `INQConfig.layer_bits`); this reads them as the file defines them (sign bit
  b-1, m = 1 + n1 - k in the low bits, see `inq_jax._packing`) without going
  through floats, so it holds for any n1 and width.

  Args:
    codes: uint8 b-bit codes of the leaf's shape.
    n1: the leaf's n1, a scalar or one per output channel (last axis).
    bits: the leaf's own code width b in [2, 8].

  Returns:
    `Codes(sign, exp, nonzero)` as `to_codes` gives for the decoded weights
    (sign +1 where the weight is zero, -0.0 included).

  Raises:
    ValueError naming the index and code of the first code outside the
    b-bit codebook of n1.

  Example:
    >>> q = export.read_codes("model.inq")["fc1/kernel"]
    >>> codes = from_stored(q.codes, q.n1, q.bits)

  Reference: arXiv:1702.03044, Sec. 2.1 (the b-bit codebook).
  """
  bits = check_bits(bits)
  codes = np.asarray(codes)
  if not np.issubdtype(codes.dtype, np.integer) or (codes.size and (
      codes.min() < 0 or codes.max() >= 1 << bits)):
    raise ValueError(f"codes must be integers in [0, {(1 << bits) - 1}] for {bits} bits")
  codes = codes.astype(np.int64)
  n1 = np.asarray(n1, np.int64)
  if n1.ndim > 1 or (n1.ndim == 1 and (codes.ndim == 0 or n1.shape[0] != codes.shape[-1])):
    raise ValueError(f"n1 of shape {n1.shape} does not fit codes of shape {codes.shape} "
                     "(a scalar, or one per entry of the last axis)")
  n1 = np.broadcast_to(n1, codes.shape)
  m = codes & ((1 << (bits - 1)) - 1)
  nonzero = np.asarray(m != 0)  # an array also for a scalar leaf
  ok = ~nonzero | ((m <= 1 << (bits - 2)) & (n1 != ZERO_CODEBOOK))
  if not ok.all():
    idx = tuple(int(i) for i in np.argwhere(~ok)[0])
    raise ValueError(f"code {int(codes[idx])} at index {idx} is not in the {bits}-bit "
                     f"codebook of n1 {int(n1[idx])}")
  negative = (codes >> (bits - 1)).astype(bool) & nonzero
  return Codes(np.where(negative, -1, 1).astype(np.int8),
               np.where(nonzero, n1 + 1 - m, 0).astype(np.int32), nonzero)


def from_codes(codes: Codes) -> np.ndarray:
  """The float64 weights `codes` stand for (the inverse of `to_codes`)."""
  value = np.ldexp(codes.sign.astype(np.float64), codes.exp.astype(np.int32))
  return np.where(codes.nonzero, value, 0.0)


def _check_frac_bits(frac_bits, name="frac_bits") -> int:
  if isinstance(frac_bits, bool) or not isinstance(frac_bits, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {frac_bits!r}")
  if not -64 < frac_bits < 64:
    raise ValueError(f"{name}={frac_bits} is outside (-64, 64)")
  return int(frac_bits)


def quantize_activations(x, frac_bits: int) -> np.ndarray:
  """Fixed-point activations: round(x * 2^frac_bits) as int64 (ties to even).

  The rounding error is at most 2^-(frac_bits+1) per activation.

  Raises:
    ValueError for NaN/Inf, OverflowError if a value does not fit in 2^62.
  """
  frac_bits = _check_frac_bits(frac_bits)
  x = np.asarray(x, np.float64)
  if not np.isfinite(x).all():
    raise ValueError("activations contain NaN or Inf")
  scaled = np.rint(np.ldexp(x, frac_bits))
  if scaled.size and np.abs(scaled).max() >= _LIMIT:
    raise OverflowError(f"activations up to {np.abs(x).max():.6g} do not fit int64 with "
                        f"{frac_bits} fractional bits")
  return scaled.astype(np.int64)


def dequantize(x_int, frac_bits: int) -> np.ndarray:
  """float64 values x_int * 2^-frac_bits (exact while |x_int| < 2^53)."""
  return np.ldexp(np.asarray(x_int, np.int64).astype(np.float64),
                  -_check_frac_bits(frac_bits))


def accumulator_frac_bits(codes: Codes, frac_bits: int) -> int:
  """Fractional bits of the exact accumulator: frac_bits - (smallest exponent used).

  Pass it as `out_frac_bits` to get results with no rounding at all.
  """
  exps = codes.exp[codes.nonzero]
  return _check_frac_bits(frac_bits) - (int(exps.min()) if exps.size else 0)


def _round_shift(acc: np.ndarray, shift: int) -> np.ndarray:
  """acc * 2^shift as int64, rounded half to even when shift < 0."""
  if shift >= 0:
    return acc << shift
  d = -shift
  q = acc >> d                     # floor
  r = acc - (q << d)               # in [0, 2^d)
  half = np.int64(1) << (d - 1)
  return q + ((r > half) | ((r == half) & ((q & 1) == 1)))


def _shift_matmul(x_int: np.ndarray, codes: Codes, bias, frac_bits: int,
                  out_frac_bits: Optional[int]) -> np.ndarray:
  """x_int [..., K] with codes [K, N]: the shift-add core of dense and conv."""
  frac_bits = _check_frac_bits(frac_bits)
  out_frac = frac_bits if out_frac_bits is None else _check_frac_bits(out_frac_bits,
                                                                      "out_frac_bits")
  x_int = np.asarray(x_int)
  if not np.issubdtype(x_int.dtype, np.integer):
    raise TypeError(f"x_int must be integer fixed-point activations (see "
                    f"quantize_activations), got dtype {x_int.dtype}")
  x_int = x_int.astype(np.int64)
  acc_frac = accumulator_frac_bits(codes, frac_bits)
  base = frac_bits - acc_frac  # the smallest exponent k0
  exps = np.unique(codes.exp[codes.nonzero])
  # Overflow guard with Python ints: |acc| <= max|x| * fan-in * 2^(kmax - k0) + |bias|.
  bias_int = None
  if bias is not None:
    b = np.asarray(bias, np.float64)
    if b.shape != codes.exp.shape[-1:] or not np.isfinite(b).all():
      raise ValueError(f"bias must be {codes.exp.shape[-1:]} finite values, got shape "
                       f"{b.shape}")
    bias_int = np.rint(np.ldexp(b, acc_frac))
  max_x = int(np.abs(x_int).max()) if x_int.size else 0
  fan_in = int(codes.nonzero.sum(axis=0).max()) if codes.nonzero.size else 0
  top = max_x * fan_in * (2 ** (int(exps.max()) - base) if exps.size else 0)
  top += int(np.abs(bias_int).max()) if bias_int is not None and bias_int.size else 0
  top = max(top, 1) * 2 ** max(out_frac - acc_frac, 0)
  if top >= _LIMIT:
    raise OverflowError(f"the int64 accumulator could overflow (bound {top:.3g}); use "
                        "fewer fractional bits")
  acc = np.zeros(x_int.shape[:-1] + codes.exp.shape[-1:], np.int64)
  for k in exps:
    signs = np.where(codes.nonzero & (codes.exp == k), codes.sign, 0).astype(np.int64)
    acc += (x_int @ signs) << (int(k) - base)  # adds/subtracts, then one shift
  if bias_int is not None:
    acc += bias_int.astype(np.int64)
  return _round_shift(acc, out_frac - acc_frac)


def shift_dense(x_int, codes: Codes, bias=None, *, frac_bits: int,
                out_frac_bits: Optional[int] = None) -> np.ndarray:
  """A quantized Dense layer in integers: y = x @ w + bias.

  Args:
    x_int: int fixed-point activations [..., K] with `frac_bits` fractional bits.
    codes: `to_codes` of the kernel [K, N].
    bias: optional float bias [N], rounded to the accumulator's grid.
    frac_bits: fractional bits of `x_int`.
    out_frac_bits: fractional bits of the result (default `frac_bits`); the
      exact accumulator is rounded half to even to it.
      `accumulator_frac_bits(codes, frac_bits)` gives the result unrounded.

  Returns:
    int64 [..., N]; `dequantize(y, out_frac_bits)` gives floats.

  Example:
    >>> y = dequantize(shift_dense(quantize_activations(x, 10), to_codes(w, n1, n2),
    ...                            b, frac_bits=10), 10)   # ~ x @ w + b

  Reference: arXiv:1702.03044, Sec. 1 (shift instead of multiply).
  """
  if codes.exp.ndim != 2:
    raise ValueError(f"dense codes must be [in, out], got shape {codes.exp.shape}")
  x_int = np.asarray(x_int)
  if x_int.ndim < 1 or x_int.shape[-1] != codes.exp.shape[0]:
    raise ValueError(f"x_int of shape {x_int.shape} does not fit a kernel of shape "
                     f"{codes.exp.shape}")
  return _shift_matmul(x_int, codes, bias, frac_bits, out_frac_bits)


Padding = Union[str, Sequence[Tuple[int, int]]]


def conv_padding(in_hw, kernel_hw, strides, padding: Padding):
  """[(lo, hi), (lo, hi)] as flax/lax compute them ('SAME' pads the excess at the end)."""
  if isinstance(padding, str):
    mode = padding.upper()
    if mode == "VALID":
      return [(0, 0), (0, 0)]
    if mode != "SAME":
      raise ValueError(f"padding must be 'SAME', 'VALID' or [(lo, hi), (lo, hi)], got "
                       f"{padding!r}")
    pads = []
    for n, k, s in zip(in_hw, kernel_hw, strides):
      out = -(-n // s)
      total = max((out - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    return pads
  pads = [tuple(int(v) for v in p) for p in padding]
  if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
    raise ValueError(f"explicit padding must be [(lo, hi), (lo, hi)] >= 0, got {padding!r}")
  return pads


def shift_conv(x_int, codes: Codes, bias=None, *, frac_bits: int, strides=1,
               padding: Padding = "SAME", out_frac_bits: Optional[int] = None
               ) -> np.ndarray:
  """A quantized 2-D convolution in integers, like `flax.linen.Conv` (no dilation).

  Args:
    x_int: int fixed-point activations, NHWC, with `frac_bits` fractional bits.
    codes: `to_codes` of the HWIO kernel [kh, kw, C, O].
    bias: optional float bias [O].
    frac_bits, out_frac_bits: as in `shift_dense`.
    strides: an int or (sh, sw).
    padding: 'SAME' (flax's default), 'VALID', or [(top, bottom), (left, right)].

  Returns:
    int64 [N, H', W', O] with `out_frac_bits` (default `frac_bits`) fractional bits.

  Example:
    >>> y = shift_conv(quantize_activations(images, 8), to_codes(k, n1, n2), b,
    ...                frac_bits=8, padding="VALID")

  Reference: arXiv:1702.03044, Sec. 1 (shift instead of multiply).
  """
  x_int = np.asarray(x_int)
  if codes.exp.ndim != 4:
    raise ValueError(f"conv codes must be HWIO, got shape {codes.exp.shape}")
  kh, kw, cin, _ = codes.exp.shape
  if x_int.ndim != 4 or x_int.shape[-1] != cin:
    raise ValueError(f"x_int of shape {x_int.shape} is not NHWC with {cin} channels for "
                     f"a kernel of shape {codes.exp.shape}")
  strides = (strides, strides) if isinstance(strides, numbers.Integral) else tuple(strides)
  if len(strides) != 2 or min(strides) < 1:
    raise ValueError(f"strides must be a positive int or a pair, got {strides}")
  (pt, pb), (pl, pr) = conv_padding(x_int.shape[1:3], (kh, kw), strides, padding)
  x = np.pad(x_int, [(0, 0), (pt, pb), (pl, pr), (0, 0)])
  if x.shape[1] < kh or x.shape[2] < kw:
    raise ValueError(f"input {x_int.shape[1:3]} (padded {x.shape[1:3]}) is smaller than "
                     f"the kernel {(kh, kw)}")
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  windows = windows[:, ::strides[0], ::strides[1]]            # [N, H', W', C, kh, kw]
  patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(windows.shape[:3] + (-1,))
  flat = Codes(*(a.reshape(kh * kw * cin, -1) for a in codes))
  return _shift_matmul(patches, flat, bias, frac_bits, out_frac_bits)


__all__ = ["Codes", "accumulator_frac_bits", "conv_padding", "dequantize", "from_codes",
           "from_stored", "quantize_activations", "shift_conv", "shift_dense", "to_codes"]
