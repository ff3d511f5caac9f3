"""Hostile input to init / advance / verify and the codebook functions.

Each case used to pass silently (a layer zeroed, a value cast, a check skipped)
and must now raise up front, naming the parameter path and the value.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import quantize as inq


def params_(kernel=None):
  k = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4) if kernel is None else kernel
  return {"d": {"kernel": k, "bias": jnp.zeros(4)}}


@pytest.mark.parametrize("dtype, tiny", [(jnp.float32, 1e-40), (jnp.float16, 1e-6),
                                         (jnp.bfloat16, 1e-39)])
def test_all_subnormal_layer_is_refused(dtype, tiny):
  kernel = jnp.zeros((8, 4), dtype).at[1, 2].set(tiny)
  with pytest.raises(ValueError, match=r"d/kernel: every weight is 0 or subnormal .*"
                     r"codebook would be \{0\}"):
    inq.init(params_(kernel), inq.INQConfig(bits=4))


def test_subnormal_channel_is_refused_and_zero_channel_is_not():
  kernel = jnp.ones((8, 3)).at[:, 1].set(1e-40).at[:, 2].set(0.0)
  with pytest.raises(ValueError, match=r"d/kernel: output channel 1: every weight is 0 or "
                     r"subnormal"):
    inq.init(params_(kernel), inq.INQConfig(granularity="channel"))
  inq.init(params_(kernel.at[:, 1].set(0.5)), inq.INQConfig(granularity="channel"))


@pytest.mark.parametrize("value", [1e-300, 1e300, 0.5])
def test_float64_numpy_leaf_without_x64(value):
  assert not jax.config.read("jax_enable_x64")
  kernel = np.full((8, 4), value)  # float64
  with pytest.raises(ValueError, match=r"d/kernel: float64 weights while jax's x64 mode is "
                     r"off.*float32.*jax_enable_x64"):
    inq.init(params_(kernel), inq.INQConfig())
  state = inq.init(params_(), inq.INQConfig())
  with pytest.raises(ValueError, match="d/kernel: float64 weights"):
    inq.advance(params_(kernel), state)


@pytest.mark.parametrize("max_abs, match", [
    (-1.0, "max_abs -1.0 must be finite and >= 0"),
    (np.nan, "max_abs nan must be finite"),
    (np.inf, "max_abs inf must be finite"),
    (np.array([0.5, -0.25]), r"max_abs -0.25 at index \(1,\)"),
    (1e-40, "subnormal in float32"),
])
def test_exponent_bounds_rejects_bad_max(max_abs, match):
  with pytest.raises(ValueError, match=match):
    inq.exponent_bounds(max_abs, 5)


def test_exponent_bounds_under_jit_is_unchecked_but_runs():
  n1, _ = jax.jit(lambda s: inq.exponent_bounds(s, 5))(jnp.float32(0.75))
  assert int(n1) == 0


def test_round_to_pow2_rejects_n1_below_n2():
  with pytest.raises(ValueError, match=r"n1=-3 < n2=0"):
    inq.round_to_pow2(jnp.ones(3), -3, 0)
  with pytest.raises(ValueError, match=r"n1=0 < n2=2 at index \(1,\)"):
    inq.round_to_pow2(jnp.ones((2, 2)), jnp.array([1, 0]), jnp.array([0, 2]))
  np.testing.assert_array_equal(inq.round_to_pow2(jnp.ones(2), 0, 0), [1.0, 1.0])


@pytest.mark.parametrize("seed", [2**70, 2**32, -1])
def test_seed_must_fit_uint32(seed):
  with pytest.raises(ValueError, match=rf"seed must be in \[0, 2\*\*32\).*got {seed}"):
    inq.INQConfig(seed=seed)
  assert inq.INQConfig(seed=2**32 - 1).seed == 2**32 - 1


def test_string_leaf_selected_for_quantization():
  params = {"d": {"kernel": jnp.ones((2, 2))}, "name": {"kernel": "conv3x3"}}
  with pytest.raises(TypeError, match=r"name/kernel: a str leaf \('conv3x3'\) is not an array"):
    inq.init(params, inq.INQConfig())
  # Unselected, it is carried along untouched.
  state = inq.init(params, inq.INQConfig(exclude="name"))
  out, _ = inq.advance(params, state)
  assert out["name"]["kernel"] == "conv3x3"


@pytest.mark.parametrize("n1", [500, 128, -120, -(2**31) + 3])
def test_forged_exponent_out_of_dtype_range(n1):
  params = params_()
  state = inq.init(params, inq.INQConfig())
  forged = dataclasses.replace(state, exponents={"d/kernel": jnp.int32(n1)})
  with pytest.raises(ValueError, match=rf"d/kernel: the state's exponent n1={n1} .* float32 "
                     r"holds normal numbers .*edited"):
    inq.advance(params, forged)
  with pytest.raises(ValueError, match=rf"d/kernel: the state's exponent n1={n1}"):
    inq.verify(params, forged)


def test_forged_exponent_shape_and_edit_after_a_step():
  params = params_()
  state = inq.init(params, inq.INQConfig())
  wrong_shape = dataclasses.replace(state, exponents={"d/kernel": jnp.zeros(4, jnp.int32)})
  with pytest.raises(ValueError, match=r"d/kernel: the state's exponent n1 must be an int "
                     r"array of shape \(\)"):
    inq.advance(params, wrong_shape)
  params, state = inq.advance(params, state)
  # Representable but not the run's codebook (the next advance would zero every
  # new weight, all below 2^(n2-1)): the state's seal refuses it.
  edited = dataclasses.replace(state, exponents={"d/kernel": jnp.int32(60)})
  for fn in (inq.advance, inq.verify):
    with pytest.raises(ValueError, match=r"exponents \(n1\) or pruned counts are not the "
                       r"ones init computed"):
      fn(params, edited)


def test_init_advance_verify_refuse_tracing():
  params = params_().copy()
  params["d"] = {**params["d"], "kernel": params["d"]["kernel"].at[0, 0].set(jnp.nan)}
  with pytest.raises(TypeError, match="init runs eagerly.*outside jax.jit"):
    jax.jit(lambda p: inq.init(p, inq.INQConfig()).exponents)(params)
  good = params_()
  state = inq.init(good, inq.INQConfig())
  with pytest.raises(TypeError, match="advance runs eagerly.*outside jax.jit"):
    jax.jit(lambda p: inq.advance(p, state)[0])(good)
  with pytest.raises(TypeError, match="advance runs eagerly"):
    jax.jit(inq.advance)(good, state)
  with pytest.raises(TypeError, match="verify runs eagerly"):
    jax.jit(lambda p: len(inq.verify(p, state)))(good)
