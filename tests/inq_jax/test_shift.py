"""Integer shift-add inference against float64 on the same quantized weights."""

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from inq_jax import _packing, shift
from inq_jax import quantize as inq


def random_codes(rng, shape, bits, n1, zero_frac=0.3):
  """Weights drawn uniformly from the b-bit codebook of n1, with extra zeros."""
  n2 = n1 + 1 - 2 ** (bits - 2)
  k = rng.integers(n2, n1 + 1, shape)
  w = np.ldexp(rng.choice([-1.0, 1.0], shape), k)
  w[rng.random(shape) < zero_frac] = 0.0
  return w, n2


def float_conv(x, w, strides, pads):
  """float64 NHWC x HWIO convolution, written out independently of shift_conv."""
  (pt, pb), (pl, pr) = pads
  x = np.pad(x, [(0, 0), (pt, pb), (pl, pr), (0, 0)])
  kh, kw, _, co = w.shape
  ho = (x.shape[1] - kh) // strides[0] + 1
  wo = (x.shape[2] - kw) // strides[1] + 1
  y = np.zeros((x.shape[0], ho, wo, co))
  for a in range(kh):
    for b in range(kw):
      window = x[:, a:a + strides[0] * (ho - 1) + 1:strides[0],
                 b:b + strides[1] * (wo - 1) + 1:strides[1], :]
      y += np.einsum("nhwc,co->nhwo", window, w[a, b])
  return y


def test_to_codes_round_trip_and_errors():
  w = np.array([[0.5, 0.0, -0.125], [-0.0, 1.0, 2.0 ** -3]], np.float32)
  codes = shift.to_codes(w, n1=0, n2=-3)
  assert codes.sign.dtype == np.int8 and codes.nonzero.dtype == bool
  np.testing.assert_array_equal(codes.sign, [[1, 1, -1], [1, 1, 1]])
  np.testing.assert_array_equal(codes.exp, [[-1, 0, -3], [0, 0, -3]])
  np.testing.assert_array_equal(codes.nonzero, w != 0)
  assert shift.from_codes(codes).tolist() == w.astype(np.float64).tolist()
  with pytest.raises(ValueError, match=r"weight 0.25 at index \(1,\) .* -1 <= k <= 0"):
    shift.to_codes(np.array([0.5, 0.25]), n1=0, n2=-1)
  with pytest.raises(ValueError, match=r"weight 0.75 at index \(0,\)"):
    shift.to_codes(np.array([0.75]), n1=0, n2=-3)
  # Per-channel bounds along the last axis.
  codes = shift.to_codes(np.array([[4.0, 0.25]]), n1=np.array([2, -2]), n2=np.array([0, -4]))
  np.testing.assert_array_equal(codes.exp, [[2, -2]])
  with pytest.raises(ValueError, match=r"index \(0, 1\)"):
    shift.to_codes(np.array([[4.0, 0.5]]), n1=np.array([2, -2]), n2=np.array([0, -4]))
  zeros = shift.to_codes(np.zeros(3), n1=inq.ZERO_CODEBOOK, n2=inq.ZERO_CODEBOOK - 7)
  assert not zeros.nonzero.any()


def test_codes_of_an_inq_layer(tmp_path):
  w = jax.random.normal(jax.random.key(0), (30, 7)) * 0.1
  n1, n2 = inq.exponent_bounds(jnp.max(jnp.abs(w)), 4)
  q = np.asarray(inq.round_to_pow2(w, n1, n2))
  codes = shift.to_codes(q, int(n1), int(n2))
  np.testing.assert_array_equal(shift.from_codes(codes), q)


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), n1=st.integers(-6, 3), frac_bits=st.integers(0, 12),
       batch=st.integers(1, 4), k_in=st.integers(1, 40), k_out=st.integers(1, 9),
       seed=st.integers(0, 2**31 - 1))
def test_dense_exact_on_the_grid(bits, n1, frac_bits, batch, k_in, k_out, seed):
  rng = np.random.default_rng(seed)
  w, n2 = random_codes(rng, (k_in, k_out), bits, n1)
  codes = shift.to_codes(w, n1, n2)
  acc_frac = shift.accumulator_frac_bits(codes, frac_bits)
  x_int = rng.integers(-2**10, 2**10, (batch, k_in))
  bias = np.ldexp(rng.integers(-2**12, 2**12, k_out).astype(np.float64), -acc_frac)
  y = shift.shift_dense(x_int, codes, bias, frac_bits=frac_bits, out_frac_bits=acc_frac)
  want = np.ldexp(x_int.astype(np.float64), -frac_bits) @ w + bias  # exact in float64
  np.testing.assert_array_equal(shift.dequantize(y, acc_frac), want)
  # The same result, rounded to frac_bits (default), is the nearest grid point.
  y8 = shift.shift_dense(x_int, codes, bias, frac_bits=frac_bits)
  assert np.all(np.abs(shift.dequantize(y8, frac_bits) - want) <= 2.0 ** -(frac_bits + 1))


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 6), n1=st.integers(-5, 2), frac_bits=st.integers(0, 16),
       k_in=st.integers(1, 50), k_out=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_dense_error_bounded_by_activation_rounding(bits, n1, frac_bits, k_in, k_out, seed):
  rng = np.random.default_rng(seed)
  w, n2 = random_codes(rng, (k_in, k_out), bits, n1)
  codes = shift.to_codes(w, n1, n2)
  x = rng.normal(size=(3, k_in)) * 4
  bias = rng.normal(size=k_out)
  acc_frac = shift.accumulator_frac_bits(codes, frac_bits)
  y = shift.shift_dense(shift.quantize_activations(x, frac_bits), codes, bias,
                        frac_bits=frac_bits, out_frac_bits=acc_frac)
  err = np.abs(shift.dequantize(y, acc_frac) - (x @ w + bias))
  # Activation rounding (<= 2^-(f+1) each, times |w|), plus the bias rounded to
  # the accumulator grid, plus float64 slack of the reference itself.
  bound = np.abs(w).sum(axis=0) * 2.0 ** -(frac_bits + 1) + 2.0 ** -(acc_frac + 1)
  assert np.all(err <= bound + 1e-9 * (1 + np.abs(x) @ np.abs(w)))


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 5), n1=st.integers(-4, 2), frac_bits=st.integers(0, 10),
       hw=st.tuples(st.integers(3, 9), st.integers(3, 9)),
       kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
       channels=st.tuples(st.integers(1, 3), st.integers(1, 4)),
       strides=st.tuples(st.integers(1, 2), st.integers(1, 2)),
       padding=st.sampled_from(["SAME", "VALID"]), seed=st.integers(0, 2**31 - 1))
def test_conv_exact_on_the_grid(bits, n1, frac_bits, hw, kernel, channels, strides, padding,
                                seed):
  rng = np.random.default_rng(seed)
  w, n2 = random_codes(rng, kernel + channels, bits, n1)
  codes = shift.to_codes(w, n1, n2)
  acc_frac = shift.accumulator_frac_bits(codes, frac_bits)
  x_int = rng.integers(-2**8, 2**8, (2,) + hw + channels[:1])
  bias = np.ldexp(rng.integers(-2**8, 2**8, channels[1]).astype(np.float64), -acc_frac)
  y = shift.shift_conv(x_int, codes, bias, frac_bits=frac_bits, strides=strides,
                       padding=padding, out_frac_bits=acc_frac)
  pads = shift.conv_padding(hw, kernel, strides, padding)
  want = float_conv(np.ldexp(x_int.astype(np.float64), -frac_bits), w, strides, pads) + bias
  assert y.shape == want.shape
  np.testing.assert_array_equal(shift.dequantize(y, acc_frac), want)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("strides", [1, 2])
def test_conv_matches_flax_conv(padding, strides):
  rng = np.random.default_rng(0)
  w, n2 = random_codes(rng, (3, 3, 2, 5), 5, 0)
  bias = rng.normal(size=5)
  x = rng.normal(size=(2, 8, 7, 2))
  layer = nn.Conv(5, (3, 3), strides=strides, padding=padding)
  want = np.asarray(layer.apply({"params": {"kernel": jnp.asarray(w, jnp.float32),
                                            "bias": jnp.asarray(bias, jnp.float32)}},
                                jnp.asarray(x, jnp.float32)))
  f = 12
  y = shift.shift_conv(shift.quantize_activations(x, f), shift.to_codes(w, 0, n2), bias,
                       frac_bits=f, strides=strides, padding=padding)
  assert y.shape == want.shape
  bound = np.abs(w).sum() * 2.0 ** -(f + 1) + 2.0 ** -(f + 1)
  assert np.max(np.abs(shift.dequantize(y, f) - want)) <= bound + 1e-5


def test_conv_error_bounded_with_lenet_like_layer():
  rng = np.random.default_rng(1)
  w = np.asarray(jax.random.normal(jax.random.key(2), (5, 5, 1, 6)) * 0.2)
  n1, n2 = inq.exponent_bounds(np.abs(w).max(), 5)
  q = np.asarray(inq.round_to_pow2(w, n1, n2), np.float64)
  x = rng.random((2, 12, 12, 1))
  f = 8
  codes = shift.to_codes(q, int(n1), int(n2))
  acc_frac = shift.accumulator_frac_bits(codes, f)
  y = shift.shift_conv(shift.quantize_activations(x, f), codes, frac_bits=f, padding="VALID",
                       out_frac_bits=acc_frac)
  want = float_conv(x, q, (1, 1), [(0, 0), (0, 0)])
  bound = np.abs(q).reshape(-1, 6).sum(axis=0) * 2.0 ** -(f + 1)
  assert np.all(np.abs(shift.dequantize(y, acc_frac) - want) <= bound + 1e-12)


def test_rounding_is_half_to_even():
  assert shift._round_shift(np.array([5, 6, 7, -5, -6, -7, 2, -2]), -2).tolist() == \
      [1, 2, 2, -1, -2, -2, 0, 0]
  assert shift.quantize_activations(np.array([0.5, 1.5, -0.5, 0.25]), 0).tolist() == \
      [0, 2, 0, 0]


def test_errors():
  codes = shift.to_codes(np.array([[1.0, 0.5]]), 0, -3)
  with pytest.raises(ValueError, match=r"x_int of shape \(2, 3\) does not fit"):
    shift.shift_dense(np.zeros((2, 3), np.int64), codes, frac_bits=4)
  with pytest.raises(TypeError, match="integer fixed-point"):
    shift.shift_dense(np.zeros((2, 1)), codes, frac_bits=4)
  with pytest.raises(OverflowError, match="accumulator could overflow"):
    shift.shift_dense(np.full((1, 1), 2**61, np.int64), codes, frac_bits=4)
  with pytest.raises(OverflowError, match="do not fit int64"):
    shift.quantize_activations(np.array([1e10]), 40)
  with pytest.raises(ValueError, match="NaN"):
    shift.quantize_activations(np.array([np.nan]), 4)
  with pytest.raises(ValueError, match="bias must be"):
    shift.shift_dense(np.zeros((1, 1), np.int64), codes, np.zeros(3), frac_bits=4)
  conv = shift.to_codes(np.ones((3, 3, 2, 1)), 0, -3)
  with pytest.raises(ValueError, match="NHWC with 2 channels"):
    shift.shift_conv(np.zeros((1, 5, 5, 3), np.int64), conv, frac_bits=4)
  with pytest.raises(ValueError, match="padding must be"):
    shift.shift_conv(np.zeros((1, 5, 5, 2), np.int64), conv, frac_bits=4, padding="CIRCULAR")
  # All-zero kernel: only the bias remains, exactly.
  zero = shift.to_codes(np.zeros((4, 2)), inq.ZERO_CODEBOOK, inq.ZERO_CODEBOOK - 7)
  y = shift.shift_dense(np.ones((1, 4), np.int64), zero, np.array([0.5, -1.25]), frac_bits=2)
  assert shift.dequantize(y, 2).tolist() == [[0.5, -1.25]]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_from_stored_matches_to_codes(bits, per_channel):
  # The stored b-bit codes of a leaf (export's format) read straight into shift
  # codes, without floats: the same as splitting the decoded weights.
  rng = np.random.default_rng(bits)
  n1 = np.array([3, -5, 0, inq.ZERO_CODEBOOK]) if per_channel else np.int64(-2)
  shape = (6, 4)
  w = np.zeros(shape)
  for c in range(4):
    top = int(np.broadcast_to(n1, (4,))[c])
    if top != inq.ZERO_CODEBOOK:
      w[:, c], _ = random_codes(rng, (6,), bits, top)
  w[0, 0] = -0.0
  stored, valid = _packing.encode(w, n1, bits)
  assert valid.all()
  got = shift.from_stored(stored, n1, bits)
  want = shift.to_codes(w, n1, inq.n2_from_n1(n1, bits))
  for a, b in zip(got, want):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  scalar = shift.from_stored(np.uint8(0b101 if bits == 3 else 1), 1, bits)
  assert shift.from_codes(scalar) == (-2.0 if bits == 3 else 2.0)  # sign, m = 1: 2^n1
  assert all(isinstance(a, np.ndarray) and a.shape == () for a in scalar)


def test_from_stored_refuses_codes_outside_the_codebook():
  with pytest.raises(ValueError, match=r"code 7 at index \(1,\) is not in the 3-bit codebook "
                     "of n1 0"):
    shift.from_stored(np.array([1, 7], np.uint8), 0, 3)  # m = 3 > 2^(3-2)
  with pytest.raises(ValueError, match=r"code 1 at index \(0,\) is not in the 4-bit codebook"):
    shift.from_stored(np.array([1], np.uint8), inq.ZERO_CODEBOOK, 4)
  with pytest.raises(ValueError, match=r"integers in \[0, 7\] for 3 bits"):
    shift.from_stored(np.array([8], np.uint8), 0, 3)
  with pytest.raises(ValueError, match="does not fit codes of shape"):
    shift.from_stored(np.zeros((2, 3), np.uint8), np.zeros(2, np.int64), 3)
