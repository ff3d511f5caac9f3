"""init / advance / verify over Linen, NNX and plain-dict pytrees; every bad input."""

import dataclasses
import math
from fractions import Fraction

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import inq_jax
from inq_jax import quantize as inq


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(8, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    return nn.Dense(10)(x)


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.heads = nnx.List([nnx.Linear(8 * 36, 10, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    return self.heads[0](x.reshape(x.shape[0], -1))


def linen_params():
  return LinenNet().init(jax.random.key(0), jnp.ones((1, 6, 6, 1)))["params"]


def plain_params(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(1), 3)
  return {"encoder": {"layers": [{"kernel": jax.random.normal(k[0], (16, 32), dtype),
                                  "bias": jnp.zeros(32, dtype)}]},
          "head": {"kernel": (jax.random.normal(k[1], (32, 4)) * 5).astype(dtype),
                   "scale": jnp.ones(4, dtype)}}


def leaves(tree):
  return {inq_jax.tree.path_str(p): np.asarray(jnp.asarray(x, jnp.float32))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def run_all_steps(params, config, check=None):
  state = inq.init(params, config)
  before = leaves(params)
  for step in range(config.num_steps):
    old_masks = leaves(state.masks)
    old = leaves(params)
    # Pretend to retrain: move every float weight a little, as SGD would.
    params = jax.tree.map(lambda x, m: jnp.where(m, x, x * 1.01 + 0.001).astype(x.dtype),
                          params, state.masks)
    moved = leaves(params)
    params, state = inq.advance(params, state)
    new, masks = leaves(params), leaves(state.masks)
    for path in new:
      if path not in state.exponents:
        np.testing.assert_array_equal(new[path], moved[path])  # untouched
        continue
      old_m, m = old_masks[path].astype(bool), masks[path].astype(bool)
      assert m[old_m].all()
      assert m.sum() == round(config.portions[step] * m.size)
      np.testing.assert_array_equal(new[path][old_m], moved[path][old_m])  # bit-identical
      np.testing.assert_array_equal(new[path][~m], moved[path][~m])
      if check:
        check(path, new[path], m)
  summary = inq.verify(params, state)
  assert set(summary) == set(state.exponents)
  for path, s in summary.items():
    assert s.frozen == s.total
    if config.granularity == "layer":
      assert s.distinct_values <= 2 ** (config.bits - 1) + 1
  del before, old
  return params, state, summary


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_plain_dict_all_steps(bits):
  config = inq.INQConfig(bits=bits)
  _, state, summary = run_all_steps(plain_params(), config)
  assert set(summary) == {"encoder/layers/0/kernel", "head/kernel"}
  assert int(state.step) == 4 and state.done


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_leaves(dtype):
  params, state, _ = run_all_steps(plain_params(dtype), inq.INQConfig(bits=4))
  assert params["head"]["kernel"].dtype == dtype


def test_linen_variables_params():
  params, state, summary = run_all_steps(linen_params(), inq.INQConfig(bits=5))
  assert set(summary) == {"Conv_0/kernel", "Dense_0/kernel"}  # biases, BN stay float
  out = LinenNet().apply({"params": params, "batch_stats": {"BatchNorm_0": {
      "mean": jnp.zeros(8), "var": jnp.ones(8)}}}, jnp.ones((2, 6, 6, 1)))
  assert out.shape == (2, 10)


def test_nnx_state_and_update():
  model = NNXNet(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  params, state, summary = run_all_steps(params, inq.INQConfig(bits=4))
  assert set(summary) == {"conv/kernel", "heads/0/kernel"}
  nnx.update(model, params)
  w = np.asarray(model.conv.kernel[...])
  n1, n2 = state.bounds("conv/kernel")
  assert bool(jnp.all(inq.in_codebook(w, n1, n2)))


def test_channel_granularity():
  w = jnp.concatenate([jax.random.normal(jax.random.key(0), (50, 1)) * 0.01,
                       jax.random.normal(jax.random.key(1), (50, 1)) * 10.0], axis=1)
  params = {"dense": {"kernel": w}}
  config = inq.INQConfig(bits=3, granularity="channel")
  state = inq.init(params, config)
  n1 = np.asarray(state.exponents["dense/kernel"])
  assert n1.shape == (2,) and n1[1] - n1[0] >= 8
  params, state, _ = run_all_steps(params, config)
  for c in range(2):
    col = np.asarray(params["dense"]["kernel"][:, c])
    assert len(np.unique(col)) <= 2 ** (3 - 1) + 1
    assert np.abs(col).max() == 2.0 ** n1[c]


def test_all_zero_layer_stays_zero():
  params = {"a": {"kernel": jnp.zeros((4, 4))}, "b": {"kernel": jnp.ones((2, 2))}}
  config = inq.INQConfig(bits=5, granularity="layer")
  params, state, summary = run_all_steps(params, config)
  assert summary["a/kernel"].zeros == 16
  chan = {"a": {"kernel": jnp.zeros((4, 3)).at[:, 1].set(0.5)}}
  out, st, _ = run_all_steps(chan, inq.INQConfig(bits=2, granularity="channel"))
  assert int(st.exponents["a/kernel"][0]) == inq.ZERO_CODEBOOK


def test_saturation_after_growth():
  params = {"d": {"kernel": jnp.array([[0.75, 0.1], [0.2, 0.3]])}}
  state = inq.init(params, inq.INQConfig(bits=2, portions=(0.5, 1.0)))
  params, state = inq.advance(params, state)
  assert not bool(state.masks["d"]["kernel"][0, 1])
  params = {"d": {"kernel": params["d"]["kernel"].at[0, 1].set(40.0)}}  # grew a lot
  params, state = inq.advance(params, state)
  assert float(params["d"]["kernel"][0, 1]) == 1.0  # saturates to 2^n1, not zero
  inq.verify(params, state)


def test_random_strategy_reproducible_from_seed():
  def masks(seed):
    params = plain_params()
    state = inq.init(params, inq.INQConfig(strategy="random", seed=seed))
    _, state = inq.advance(params, state)
    return np.asarray(state.masks["head"]["kernel"])
  np.testing.assert_array_equal(masks(3), masks(3))
  assert not np.array_equal(masks(3), masks(4))


def test_state_is_a_pytree_that_jits():
  params = plain_params()
  state = inq.init(params, inq.INQConfig())
  _, state = inq.advance(params, state)
  count = jax.jit(lambda s: sum(jnp.sum(m) for m in jax.tree.leaves(s.masks)))(state)
  assert int(count) == round(0.5 * 16 * 32) + round(0.5 * 32 * 4)
  leaves_, treedef = jax.tree.flatten(state)
  assert jax.tree.unflatten(treedef, leaves_).config == state.config


def test_verify_names_leaf_and_value_of_tampered_weight():
  params = plain_params()
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  idx = tuple(np.argwhere(np.asarray(state.masks["head"]["kernel"]))[0])
  bad = {**params, "head": {**params["head"],
                            "kernel": params["head"]["kernel"].at[idx].set(0.3)}}
  with pytest.raises(ValueError, match=r"head/kernel: frozen weight 0\.3.* at index"):
    inq.verify(bad, state)
  out_of_range = bad["head"]["kernel"].at[idx].set(2.0 ** 20)  # a power of 2 above n1
  with pytest.raises(ValueError, match="not in its 5-bit codebook"):
    inq.verify({**params, "head": {**params["head"], "kernel": out_of_range}}, state)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(bits=5.0), TypeError, "bits must be an int"),
    (dict(bits=True), TypeError, "bits must be an int"),
    (dict(bits=1), ValueError, r"bits must be in \[2, 8\], got 1"),
    (dict(bits=9), ValueError, "got 9"),
    (dict(portions=()), ValueError, "portions is empty"),
    (dict(portions=(0.5, 0.5, 1.0)), ValueError, "strictly increasing, got 0.5 then 0.5"),
    (dict(portions=(0.7, 0.3, 1.0)), ValueError, "strictly increasing"),
    (dict(portions=(0.0, 1.0)), ValueError, r"portion 0.0 .* outside \(0, 1\]"),
    (dict(portions=(0.5, 1.2)), ValueError, "portion 1.2"),
    (dict(portions=(0.5, 0.9)), ValueError, "must end at 1.0"),
    (dict(portions="0.5"), TypeError, "sequence of floats"),
    (dict(strategy="largest"), ValueError, "unknown partition strategy 'largest'"),
    (dict(granularity="tensor"), ValueError, "unknown granularity 'tensor'"),
    (dict(calibration="percentile"), ValueError, "unknown calibration 'percentile'"),
    (dict(include="("), ValueError, "include='\\(' is not a valid regex"),
    (dict(seed=1.5), TypeError, "seed must be an int"),
])
def test_bad_config(kwargs, exc, match):
  with pytest.raises(exc, match=match):
    inq.INQConfig(**kwargs)


def test_config_is_frozen_keyword_only():
  config = inq.INQConfig(portions=[0.5, 1])
  assert config.portions == (0.5, 1.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    config.bits = 3
  with pytest.raises(TypeError):
    inq.INQConfig(5)  # pylint: disable=too-many-function-args
  assert inq_jax.INQConfig is inq.INQConfig


def test_regex_matching_nothing():
  with pytest.raises(ValueError, match="include='conv' matches no parameter"):
    inq.init(plain_params(), inq.INQConfig(include="conv"))
  with pytest.raises(ValueError, match="exclude='first' matches no parameter"):
    inq.init(plain_params(), inq.INQConfig(exclude="first"))
  with pytest.raises(ValueError, match="leaves no parameter"):
    inq.init(plain_params(), inq.INQConfig(exclude="kernel"))


def test_non_float_selected_leaf():
  params = {"emb": {"kernel": jnp.arange(6).reshape(2, 3)}, "d": {"kernel": jnp.ones((2, 2))}}
  with pytest.raises(TypeError, match="emb/kernel: dtype int32 is not floating point"):
    inq.init(params, inq.INQConfig())


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_at_init_and_advance(bad):
  params = plain_params()
  broken = {**params, "head": {**params["head"],
                               "kernel": params["head"]["kernel"].at[2, 1].set(bad)}}
  with pytest.raises(ValueError, match=rf"head/kernel: 1 non-finite .*{bad}.* at index \(2, 1\)"):
    inq.init(broken, inq.INQConfig())
  state = inq.init(params, inq.INQConfig())
  with pytest.raises(ValueError, match="head/kernel: 1 non-finite"):
    inq.advance(broken, state)
  # Nothing was changed: the good state still advances the good params.
  assert int(state.step) == 0
  inq.advance(params, state)


def test_state_for_another_tree():
  state = inq.init(plain_params(), inq.INQConfig())
  with pytest.raises(ValueError, match=r"state: the mask's tree does not match params.*"
                     r"differing paths.*made by init\(\) for another tree"):
    inq.advance(linen_params(), state)
  other = plain_params()
  other["head"]["kernel"] = jnp.ones((32, 5))
  with pytest.raises(ValueError, match=r"head/kernel: params have shape \(32, 5\)"):
    inq.advance(other, state)
  with pytest.raises(TypeError, match="state must be an INQState"):
    inq.verify(other, {"masks": 1})


def test_advance_after_last_portion():
  params = plain_params()
  state = inq.init(params, inq.INQConfig(portions=(1.0,)))
  params, state = inq.advance(params, state)
  with pytest.raises(ValueError, match=r"all 1 portions \(1.0,\) are already applied"):
    inq.advance(params, state)


def test_exponent_range_not_representable():
  params = {"d": {"kernel": jnp.full((4, 4), 0.1, jnp.float16)}}
  with pytest.raises(ValueError, match=r"d/kernel: the 8-bit codebook .* float16"):
    inq.init(params, inq.INQConfig(bits=8))
  inq.init(params, inq.INQConfig(bits=5))  # 5 bits fits float16
  huge = {"d": {"kernel": jnp.full((2,), 60000.0, jnp.float16)}}
  with pytest.raises(ValueError, match="float16"):
    inq.init(huge, inq.INQConfig(bits=2))


def test_advance_is_eager_only():
  params = plain_params()
  state = inq.init(params, inq.INQConfig())
  with pytest.raises(TypeError, match="outside jax.jit"):
    jax.jit(inq.advance)(params, state)


def test_state_flattens_to_its_fields():
  # No `pruned`: masks, exponents, step, the seal, and per quantized leaf its
  # checksums and fit; a restore target from abstract_state has the same tree.
  params = plain_params()
  state = inq.init(params, inq.INQConfig())
  assert state.pruned == {}
  quantized = len(state.exponents)
  assert len(jax.tree.leaves(state)) == (len(jax.tree.leaves(state.masks)) + 3 * quantized + 2)
  target = inq.abstract_state(params, inq.INQConfig())
  assert jax.tree.structure(target) == jax.tree.structure(state)
  for want, have in zip(jax.tree.leaves(target), jax.tree.leaves(state)):
    assert (want.shape, want.dtype) == (have.shape, have.dtype)


def test_advance_rejects_masks_off_the_schedule():
  params = plain_params()
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  masks = {**state.masks, "head": {**state.masks["head"],
                                   "kernel": jnp.ones((32, 4), bool)}}
  with pytest.raises(ValueError, match=r"head/kernel: the state's mask has 128 frozen weights, "
                     r"but after 1 of 4 portions there should be 64 \(round\(0.5 \* 128\)\)"):
    inq.advance(params, dataclasses.replace(state, masks=masks))


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_mse_calibration_runs_to_a_valid_codebook(granularity):
  w = jax.random.normal(jax.random.key(3), (64, 4)) * 0.05
  w = w.at[0].set(0.05 * 10.0)  # one outlier row: the absmax n1 would be 3 octaves up
  params = {"dense": {"kernel": w}}
  config = inq.INQConfig(bits=3, granularity=granularity, calibration="mse",
                         portions=(0.5, 1.0))
  axes = (0,) if granularity == "channel" else None
  n1 = np.asarray(inq.init(params, config).exponents["dense/kernel"])
  np.testing.assert_array_equal(n1, np.asarray(inq.mse_exponent_bounds(w, 3, axes)[0]))
  absmax = np.asarray(inq.init(params, dataclasses.replace(
      config, calibration="absmax")).exponents["dense/kernel"])
  assert np.all(n1 < absmax)
  params, state, summary = run_all_steps(params, config)
  s = summary["dense/kernel"]  # verify raises on any weight outside its codebook
  np.testing.assert_array_equal(s.n1, n1)
  assert np.all(inq.in_codebook(params["dense"]["kernel"], s.n1, s.n2))
  assert state.config.to_dict()["calibration"] == "mse"


# ------------------------------------------------- advance vs exact reference


def ref_round(w: float, n1: int, n2: int) -> float:
  """Paper Eq. 4 on exact rationals: ties up, saturation at 2^n1, {0} codebook."""
  if n1 == inq.ZERO_CODEBOOK:
    return 0.0
  a, two = abs(Fraction(w)), Fraction(2)
  if a < two ** (n2 - 1):
    return 0.0
  if a >= Fraction(3, 2) * two ** n1:
    k = n1
  elif a < Fraction(3, 2) * two ** n2:
    k = n2
  else:
    k = next(k for k in range(n2 + 1, n1 + 1)
             if Fraction(3, 4) * two ** k <= a < Fraction(3, 2) * two ** k)
  return math.copysign(float(two ** k), w)


def ref_n1(s: float) -> int:
  """max k with 0.75 * 2^k <= s, exactly; ZERO_CODEBOOK for s == 0."""
  s, k = Fraction(s), 0
  if s == 0:
    return inq.ZERO_CODEBOOK
  while Fraction(3, 4) * Fraction(2) ** k > s:
    k -= 1
  while Fraction(3, 4) * Fraction(2) ** (k + 1) <= s:
    k += 1
  return k


def reference_params():
  k = jax.random.split(jax.random.key(7), 2)
  scale = 2.0 ** jnp.arange(-3, 3)  # one octave apart per output channel
  return {"fc": {"kernel": jax.random.normal(k[0], (24, 6)) * scale,
                 "bias": jnp.linspace(-1, 1, 6)},
          "conv": {"kernel": jax.random.normal(k[1], (3, 3, 2, 4)) * 0.1}}


def per_weight_bounds(n1, shape, bits):
  """n1 and n2 (= n1 + 1 - 2^(b-2), written out here) for every weight."""
  n1 = np.broadcast_to(np.asarray(n1, np.int64), shape[-1:] if np.ndim(n1) else ())
  n1 = np.broadcast_to(n1, shape)
  return n1, n1 + 1 - 2 ** (bits - 2)


def plant_edges(w, frozen, n1, n2):
  """Moves some still-float weights onto exact bin edges and past the top."""
  w = w.copy()
  free = np.flatnonzero(~frozen.reshape(-1))
  for i, idx in enumerate(free[::3]):
    a, b = int(n1.reshape(-1)[idx]), int(n2.reshape(-1)[idx])
    k = b + (i // 6) % (a - b + 1)
    edge = [2.0 ** (b - 1), np.nextafter(np.float32(2.0 ** (b - 1)), np.float32(0)),
            0.75 * 2.0 ** k, 1.5 * 2.0 ** k,
            np.nextafter(np.float32(1.5 * 2.0 ** k), np.float32(0)), 5.0 * 2.0 ** a][i % 6]
    w.reshape(-1)[idx] = np.float32(edge) * (-1) ** i
  return w


def bits_of(x):
  return np.ascontiguousarray(x, np.float32).view(np.uint32)


def check_against_reference(params, config, pruned=None):
  state = inq.init(params, config, pruned=pruned)
  for path, n1 in state.exponents.items():
    want_shape = (6,) if path == "fc/kernel" else (4,)
    assert np.asarray(n1).shape == (want_shape if config.granularity == "channel" else ())
    if config.calibration == "absmax":
      w = leaves(params)[path]
      axes = tuple(range(w.ndim - 1)) if config.granularity == "channel" else None
      want = np.vectorize(ref_n1)(np.abs(w).max(axis=axes).astype(np.float64))
      np.testing.assert_array_equal(np.asarray(n1), want)
  for step in range(config.num_steps):
    masks = leaves(state.masks)
    moved = {}
    for path, w in leaves(params).items():
      if path in state.exponents:
        n1, n2 = per_weight_bounds(state.exponents[path], w.shape, config.bits)
        m = masks[path].astype(bool)
        w = np.where(m, w, w * 1.2 + 0.001).astype(np.float32)  # "retraining"
        moved[path] = plant_edges(w, m, n1, n2)
      else:
        moved[path] = w + 1.0
    params = jax.tree_util.tree_unflatten(
        jax.tree.structure(params),
        [jnp.asarray(moved[inq_jax.tree.path_str(p)]) for p, _ in
         jax.tree_util.tree_flatten_with_path(params)[0]])
    params, state = inq.advance(params, state)
    new, new_masks = leaves(params), leaves(state.masks)
    for path, before in moved.items():
      got = new[path]
      if path not in state.exponents:
        np.testing.assert_array_equal(bits_of(got), bits_of(before))
        continue
      old_m, m = masks[path].astype(bool), new_masks[path].astype(bool)
      assert m[old_m].all()
      assert m.sum() == state.frozen_target(path, m.size, step + 1)
      np.testing.assert_array_equal(bits_of(got[old_m]), bits_of(before[old_m]))
      np.testing.assert_array_equal(bits_of(got[~m]), bits_of(before[~m]))
      n1, n2 = per_weight_bounds(state.exponents[path], got.shape, config.bits)
      newly = m & ~old_m
      want = np.array([ref_round(float(x), int(a), int(b)) for x, a, b in
                       zip(before[newly], n1[newly], n2[newly])], np.float32)
      np.testing.assert_array_equal(bits_of(got[newly]), bits_of(want),
                                    err_msg=f"{path} step {step}")
  inq.verify(params, state)
  return params, state


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("calibration", ["absmax", "mse"])
def test_advance_matches_exact_reference(bits, granularity, calibration):
  config = inq.INQConfig(bits=bits, granularity=granularity, calibration=calibration)
  check_against_reference(reference_params(), config)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_advance_matches_exact_reference_on_pruned_model(granularity):
  params = reference_params()
  pcfg = inq_jax.prune.PruneConfig(sparsity=0.6)
  keep = inq_jax.prune.prune_masks(params, pcfg, 1)
  params = inq_jax.prune.apply(params, keep)
  config = inq.INQConfig(bits=4, granularity=granularity,
                         portions=(0.2, 0.4, 0.6, 0.8, 1.0), strategy="random")
  out, state = check_against_reference(params, config, pruned=keep)
  for path in state.exponents:
    pruned = ~np.asarray(leaves(keep)[path]).astype(bool)
    assert pruned.any() and np.all(leaves(out)[path][pruned] == 0)
