"""inq_jax._state to the letter: every error message, every count, the pruned path.

Written to kill the mutants mutmut left alive in `_state.py` (see
docs/mutation_testing.md): each expected message and value here is written out
by hand from the paper's formulas and the dtype's limits, never computed by the
code under test.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _checks
from inq_jax import _packed
from inq_jax import quantize as inq


def message(exc, fn, *args, **kwargs) -> str:
  with pytest.raises(exc) as e:
    fn(*args, **kwargs)
  return str(e.value)


def cfg(**kw):
  return inq.INQConfig(**kw)


# --- init -----------------------------------------------------------------------------


def test_config_must_be_inqconfig():
  assert message(TypeError, inq.init, {"kernel": jnp.ones(4)}, {"bits": 5}) == (
      "config must be an INQConfig, got dict")


def test_channel_granularity_needs_an_axis():
  params = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.float32(0.5)}}
  assert message(ValueError, inq.init, params, cfg(granularity="channel")) == (
      "b/kernel: granularity='channel' needs at least one axis, got a scalar")
  # A 1-axis leaf is enough (one channel per entry).
  state = inq.init({"kernel": jnp.asarray([1.0, 0.25])}, cfg(granularity="channel"))
  np.testing.assert_array_equal(np.asarray(state.exponents["kernel"]), [0, -2])


def test_subnormal_layer_message_float32():
  tiny = np.float32(2.0**-130)  # subnormal in float32 (normal >= 2^-126)
  params = {"ok": {"kernel": jnp.ones(3)},
            "bad": {"kernel": jnp.asarray([0.0, -tiny, tiny / 2], jnp.float32)}}
  assert message(ValueError, inq.init, params, cfg()) == (
      f"bad/kernel: every weight is 0 or subnormal (max |w| = {float(tiny)!r} < "
      f"{2.0**-126!r}, the smallest normal float32); its codebook would be {{0}} and "
      "every weight would be zeroed. Rescale the layer or exclude it from quantization")


@pytest.mark.parametrize("dtype, tiniest, smallest_normal, name", [
    (jnp.float16, 2.0**-24, 2.0**-14, "float16"), (jnp.float32, 2.0**-149, 2.0**-126, "float32")])
def test_the_smallest_subnormal_is_caught(dtype, tiniest, smallest_normal, name):
  # Its bit pattern is 1: the smallest nonzero |w| of the dtype.
  w = jnp.asarray([[0.0, -tiniest], [0.0, 0.0]], dtype)
  assert message(ValueError, inq.init, {"kernel": w}, cfg()) == (
      f"kernel: every weight is 0 or subnormal (max |w| = {tiniest!r} < {smallest_normal!r}, "
      f"the smallest normal {name}); its codebook would be {{0}} and every weight would be "
      "zeroed. Rescale the layer or exclude it from quantization")


def test_subnormal_channel_message_float16_names_the_channel():
  # Channel 0 is all zero (legal), channel 1's largest |w| is exactly the
  # smallest normal float16 2^-14 (legal), channel 2 is normal, channel 3 is
  # subnormal: the message must name channel 3 and no other.
  w = np.zeros((2, 4), np.float16)
  w[0, 1] = np.float16(2.0**-14)
  w[:, 2] = [1.0, -0.5]
  w[1, 3] = np.float16(2.0**-20)  # float16 normals start at 2^-14
  msg = message(ValueError, inq.init, {"kernel": jnp.asarray(w)}, cfg(granularity="channel"))
  assert msg == (
      f"kernel: output channel 3: every weight is 0 or subnormal (max |w| = {2.0**-20!r} < "
      f"{2.0**-14!r}, the smallest normal float16); its codebook would be {{0}} and every "
      "weight would be zeroed. Rescale the layer or exclude it from quantization")


def test_unrepresentable_codebook_message_layer_and_channel():
  # 8 bits: n2 = n1 + 1 - 2^6 = n1 - 63; float16 normals are 2^-14..2^15.
  w = jnp.asarray([[1.0, -0.5], [0.25, 0.125]], jnp.float16)
  assert message(ValueError, inq.init, {"kernel": w}, cfg(bits=8)) == (
      "kernel: the 8-bit codebook 2^-63..2^0 (max |w| 1.) needs exponents -64..0, but "
      "float16 holds normal numbers 2^-14..2^15; use fewer bits or a wider dtype")
  assert message(ValueError, inq.init, {"kernel": w}, cfg(bits=6, granularity="channel")) == (
      "kernel: the 6-bit codebook 2^[-15 -16]..2^[ 0 -1] (max |w| [1.  0.5]) needs "
      "exponents [-16 -17]..[ 0 -1], but float16 holds normal numbers 2^-14..2^15; use "
      "fewer bits or a wider dtype")
  # 5 bits fit: n2 - 1 = n1 - 8 >= -14 for n1 >= -6.
  state = inq.init({"kernel": w}, cfg(bits=5, granularity="channel"))
  np.testing.assert_array_equal(np.asarray(state.exponents["kernel"]), [0, -1])


def test_init_exponents_mixed_tree_in_order():
  # Several leaves of two dtypes, one empty and one all-zero, per layer: each n1
  # is floor(log2(4/3 max|w|)) of its own leaf (ZERO_CODEBOOK = -2^30 for {0}).
  params = {"a": {"kernel": jnp.asarray([3.0, -1.0], jnp.float32)},     # 3 = 1.5 * 2 -> 2
            "b": {"kernel": jnp.zeros((0, 3), jnp.float32)},             # empty
            "c": {"kernel": jnp.asarray([[0.7]], jnp.float16)},          # 0.93 -> -1
            "d": {"kernel": jnp.zeros((2, 2), jnp.float32)},             # {0}
            "e": {"kernel": jnp.asarray([-0.74, 0.1], jnp.float32)}}     # 0.987 -> -1
  state = inq.init(params, cfg())
  got = {p: int(n) for p, n in state.exponents.items()}
  assert got == {"a/kernel": 2, "b/kernel": -(2**30), "c/kernel": -1, "d/kernel": -(2**30),
                 "e/kernel": -1}
  for p, n in state.exponents.items():
    assert n.dtype == jnp.int32 and n.shape == (), p
  # Per channel: one n1 per entry of the last axis, leaf after leaf.
  state = inq.init(params, cfg(granularity="channel"))
  assert {p: np.asarray(n).tolist() for p, n in state.exponents.items()} == {
      "a/kernel": [2, 0], "b/kernel": [-(2**30)] * 3, "c/kernel": [-1],
      "d/kernel": [-(2**30)] * 2, "e/kernel": [-1, -3]}


# --- pruned ---------------------------------------------------------------------------


def pruned_params():
  a = jnp.asarray([[0.0, 2.0, -1.0], [0.5, 0.0, 0.25]], jnp.float32)
  return {"a": {"kernel": a, "bias": jnp.ones(3)}, "b": {"kernel": jnp.ones((2, 2))}}


def keep_mask(**over):
  keep = {"a": {"kernel": jnp.asarray([[False, True, True], [True, False, True]]),
                "bias": jnp.asarray(True)},
          "b": {"kernel": jnp.asarray(True)}}
  for k, v in over.items():
    keep[k] = v
  return keep


def test_pruned_init_counts_and_masks():
  state = inq.init(pruned_params(), cfg(), pruned=keep_mask())
  assert {p: int(c) for p, c in state.pruned.items()} == {"a/kernel": 2, "b/kernel": 0}
  assert all(c.dtype == jnp.int32 for c in state.pruned.values())
  np.testing.assert_array_equal(np.asarray(state.masks["a"]["kernel"]),
                                [[True, False, False], [False, True, False]])
  np.testing.assert_array_equal(np.asarray(state.masks["b"]["kernel"]), np.zeros((2, 2), bool))
  assert np.asarray(state.masks["a"]["bias"]).shape == ()
  assert not bool(state.masks["a"]["bias"])
  assert state.pruned_count("a/kernel") == 2 and state.pruned_count("b/kernel") == 0
  assert state.pruned_count("a/bias") == 0
  # frozen_target: pruned + round(sigma * (size - pruned)); 0 portions: pruned only.
  assert [state.frozen_target("a/kernel", 6, s) for s in range(5)] == [2, 4, 5, 6, 6]
  assert [state.frozen_target("b/kernel", 4, s) for s in range(5)] == [0, 2, 3, 4, 4]
  params, state = inq.advance(pruned_params(), state)
  m = np.asarray(state.masks["a"]["kernel"])
  # The two largest unpruned |w| (2.0 and -1.0) join the two pruned zeros.
  np.testing.assert_array_equal(m, [[True, True, True], [False, True, False]])
  np.testing.assert_array_equal(np.asarray(params["a"]["kernel"]),
                                [[0.0, 2.0, -1.0], [0.5, 0.0, 0.25]])


def test_pruned_nothing_pruned_is_empty_counts():
  keep = keep_mask(a={"kernel": jnp.asarray(True), "bias": jnp.asarray(True)})
  state = inq.init(pruned_params(), cfg(), pruned=keep)
  assert {p: int(c) for p, c in state.pruned.items()} == {"a/kernel": 0, "b/kernel": 0}


def test_pruned_keep_mask_errors():
  params = pruned_params()
  bad_tree = {"a": {"kernel": jnp.asarray(True)}, "b": {"kernel": jnp.asarray(True)}}
  assert message(ValueError, inq.init, params, cfg(), pruned=bad_tree) == (
      "pruned: the keep mask's tree does not match params (2 leaves, params have 3); "
      "differing paths: ['a/bias']")
  keep = keep_mask(b={"kernel": jnp.ones((2, 2), jnp.float32)})
  assert message(TypeError, inq.init, params, cfg(), pruned=keep) == (
      "pruned: b/kernel: the keep mask must be bool (True = kept), got float32")
  keep = keep_mask(a={"kernel": jnp.asarray(True), "bias": jnp.asarray([True, False, False])})
  assert message(ValueError, inq.init, params, cfg(), pruned=keep) == (
      "pruned: a/bias has 2 pruned weights but INQ does not quantize it, so nothing would "
      "keep them frozen at zero; add it to INQConfig.include or do not prune it (and pass "
      "the keep mask, True = kept, not its inverse)")
  keep = keep_mask(a={"kernel": jnp.asarray([[False, False, True], [True, False, False]]),
                      "bias": jnp.asarray(True)})
  assert message(ValueError, inq.init, params, cfg(), pruned=keep) == (
      "pruned: a/kernel: 2 pruned weights (keep mask False) are not zero, first 2 at index "
      "(0, 1); zero them with inq_jax.prune.apply(params, keep) and pass the keep mask "
      "(True = kept), not its inverse")


def test_pruned_float16_nonzero_value_is_shown():
  params = {"kernel": jnp.asarray([0.0, 0.3], jnp.float16)}
  keep = {"kernel": jnp.asarray([True, False])}
  assert message(ValueError, inq.init, params, cfg(), pruned=keep) == (
      "pruned: kernel: 1 pruned weights (keep mask False) are not zero, first 0.30004883 at "
      "index (1,); zero them with inq_jax.prune.apply(params, keep) and pass the keep mask "
      "(True = kept), not its inverse")


# --- a state that does not fit --------------------------------------------------------


def small():
  return {"d": {"kernel": jnp.asarray([[1.0, -0.5], [0.375, 0.125]], jnp.float32),
                "bias": jnp.zeros(2)}}


def test_state_type_and_tree_errors():
  params = small()
  state = inq.init(params, cfg())
  assert message(TypeError, inq.advance, params, {"masks": state.masks}) == (
      "state must be an INQState, got dict")
  assert message(TypeError, inq.verify, params, None) == "state must be an INQState, got NoneType"
  other = {"d": {"kernel": params["d"]["kernel"]}}
  assert message(ValueError, inq.advance, other, state) == (
      "state: the mask's tree does not match params (2 leaves, params have 1); differing "
      "paths: ['d/bias']; the state was made by init() for another tree")
  grown = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  assert message(ValueError, inq.advance, grown, state) == (
      "state: d/kernel: params have shape (3, 2) but the mask has shape (2, 2)")
  # A quantized leaf whose mask is a scalar placeholder.
  scalar_mask = dataclasses.replace(
      state, masks={"d": {"kernel": jnp.asarray(False), "bias": jnp.asarray(False)}})
  assert message(ValueError, inq.advance, params, scalar_mask) == (
      "d/kernel: params have shape (2, 2) but the state's mask has shape ()")
  extra = dataclasses.replace(state, exponents={**state.exponents, "e/kernel": jnp.int32(0)})
  assert message(ValueError, inq.verify, params, extra) == (
      "state quantizes ['e/kernel'] which are not in params")


def test_state_exponent_errors():
  params = small()
  state = inq.init(params, cfg(bits=8))
  as_float = dataclasses.replace(state, exponents={"d/kernel": jnp.float32(0)})
  assert message(ValueError, inq.advance, params, as_float) == (
      "d/kernel: the state's exponent n1 must be an int array of shape () "
      "(granularity='layer'), got float32[]; the state does not belong to these params")
  per_channel = dataclasses.replace(state, exponents={"d/kernel": jnp.asarray([0, 0])})
  assert message(ValueError, inq.verify, params, per_channel) == (
      "d/kernel: the state's exponent n1 must be an int array of shape () "
      "(granularity='layer'), got int32[2]; the state does not belong to these params")


def test_state_exponent_errors_per_channel_names_first_bad_channel():
  params = small()
  state = inq.init(params, cfg(bits=8, granularity="channel"))
  # Channel 0 holds the {0} codebook (legal), channel 1 an impossible n1.
  edited = dataclasses.replace(state, exponents={"d/kernel": jnp.asarray([-(2**30), 200], jnp.int32)})
  assert message(ValueError, inq.verify, params, edited) == (
      "d/kernel: the state's exponent n1=200 gives the 8-bit codebook 2^137..2^200, but "
      "float32 holds normal numbers 2^-126..2^127 (init never makes such an exponent); "
      "the state's exponents were edited or belong to another model")
  wrong_shape = dataclasses.replace(state, exponents={"d/kernel": jnp.asarray([0, 0, 0])})
  assert message(ValueError, inq.verify, params, wrong_shape) == (
      "d/kernel: the state's exponent n1 must be an int array of shape (2,) "
      "(granularity='channel'), got int32[3]; the state does not belong to these params")


def test_frozen_count_messages():
  params = small()
  state = inq.init(params, cfg())
  params, state = inq.advance(params, state)
  off = dataclasses.replace(state, masks={"d": {"kernel": jnp.asarray([[True, True], [True, False]]),
                                                "bias": jnp.asarray(False)}})
  assert message(ValueError, inq.advance, params, off) == (
      "d/kernel: the state's mask has 3 frozen weights, but after 1 of 4 portions there "
      "should be 2 (round(0.5 * 4)); the masks do not belong to this state (was it rebuilt "
      "or restored without its `pruned` counts?)")
  # At step 0 the target is the pruned count; with pruned weights the message says so.
  p = pruned_params()
  st = inq.init(p, cfg(), pruned=keep_mask())
  # Rebuilt without its pruned counts: the seal (which binds them) refuses it first.
  rebuilt = dataclasses.replace(st, pruned={})
  assert message(ValueError, inq.advance, p, rebuilt) == (
      "this INQState's exponents (n1) or pruned counts are not the ones init computed for "
      "it: they were edited, swapped between layers, or taken from another state. Restore "
      "the state as it was saved, or start again with init")
  lost = dataclasses.replace(
      st, masks={**st.masks, "b": {"kernel": jnp.zeros((2, 2), bool).at[0, 0].set(True)}})
  assert message(ValueError, inq.advance, p, lost) == (
      "b/kernel: the state's mask has 1 frozen weights, but after 0 of 4 portions there "
      "should be 0 (round(0.0 * 4)); the masks do not belong to this state (was it rebuilt "
      "or restored without its `pruned` counts?)")
  p2, st2 = inq.advance(p, st)
  moved = dataclasses.replace(st2, masks={**st2.masks, "a": {"kernel": jnp.ones((2, 3), bool),
                                                             "bias": jnp.asarray(False)}})
  assert message(ValueError, inq.advance, p2, moved) == (
      "a/kernel: the state's mask has 6 frozen weights, but after 1 of 4 portions there "
      "should be 4 (2 pruned + round(0.5 * 4)); the masks do not belong to this state (was "
      "it rebuilt or restored without its `pruned` counts?)")


def test_frozen_weight_outside_codebook_message():
  params = small()
  state = inq.init(params, cfg(bits=3))  # n1 = 0, n2 = -1: {0, +-0.5, +-1}
  params, state = inq.advance(params, state)
  w = np.asarray(params["d"]["kernel"]).copy()
  assert w.tolist() == [[1.0, -0.5], [0.375, 0.125]]  # 1.0 and -0.5 frozen
  w[0, 1] = -0.75
  bad = {"d": {"kernel": jnp.asarray(w), "bias": params["d"]["bias"]}}
  want = ("d/kernel: frozen weight -0.75 at index (0, 1) is not in its 3-bit codebook "
          "{0, +-2^k: -1 <= k <= 0} (1 such weights). Frozen weights must not move between "
          "init/advance and the next call. The usual causes: (1) "
          "inq_jax.optim.elementwise_freeze is not the LAST transform of the optax chain")
  assert message(ValueError, inq.verify, bad, state).startswith(want)
  assert message(ValueError, inq.advance, bad, state).startswith(want)
  # The message names the other causes too, the common ones first.
  text = message(ValueError, inq.advance, bad, state)
  causes = ["(2) the optimizer was not re-created after advance", "(3) the params and the "
            "state come from different runs", "(4) these params are an optimizer's copy"]
  assert all(c in text for c in causes)
  assert [text.index(c) for c in causes] == sorted(text.index(c) for c in causes)
  # Moved within the codebook (-0.5 -> +0.5): caught by the frozen checksum.
  w[0, 1] = 0.5
  moved = {"d": {"kernel": jnp.asarray(w), "bias": params["d"]["bias"]}}
  for fn in (inq.verify, inq.advance):
    assert message(ValueError, fn, moved, state).startswith(
        "d/kernel: the frozen weights changed since the last init/advance (their checksum is ")
  # ... unless verify is told these are a copy that need only be in the codebook.
  inq.verify(moved, state, check_frozen_values=False)
  # An unfrozen weight may be anything.
  w[0, 1], w[1, 0] = -0.5, 0.77
  inq.verify({"d": {"kernel": jnp.asarray(w), "bias": params["d"]["bias"]}}, state)


def test_advance_after_the_last_portion_message():
  params = small()
  state = inq.init(params, cfg(portions=(0.5, 1.0)))
  assert not state.done
  params, state = inq.advance(params, state)
  assert not state.done and int(state.step) == 1
  params, state = inq.advance(params, state)
  assert state.done and int(state.step) == 2 and state.step.dtype == jnp.int32
  assert message(ValueError, inq.advance, params, state) == (
      "all 2 portions (0.5, 1.0) are already applied (state.step=2); the model is fully "
      "quantized")


# --- verify's summary -----------------------------------------------------------------


def test_verify_summary_counts_by_hand():
  # 4 bits: n1 = floor(log2(4/3 * 2.5)) = 1, n2 = 1 + 1 - 4 = -2: {0, +-2^-2..2^1}.
  # Rounding: |w| in [1.5, 3) -> 2, [0.75, 1.5) -> 1, [0.125, 0.375) -> 0.25, below -> 0.
  w = jnp.asarray([[2.5, -2.5, 0.0, 0.2], [0.26, -0.1, 1.1, 0.0]], jnp.float32)
  params = {"x": {"kernel": w, "bias": jnp.ones(2)}, "y": {"kernel": jnp.zeros((0,))}}
  state = inq.init(params, cfg(bits=4, portions=(0.5, 1.0)))
  s0 = inq.verify(params, state)
  assert s0["x/kernel"][:4] == (8, 0, 0, 0)
  assert (int(s0["x/kernel"].n1), int(s0["x/kernel"].n2)) == (1, -2)
  params, state = inq.advance(params, state)
  # The 4 largest |w|: 2.5, -2.5, 1.1, 0.26 -> 2, -2, 1, 0.25.
  np.testing.assert_array_equal(np.asarray(params["x"]["kernel"]),
                                np.float32([[2.0, -2.0, 0.0, 0.2], [0.25, -0.1, 1.0, 0.0]]))
  assert inq.verify(params, state)["x/kernel"][:4] == (8, 4, 4, 0)
  params, state = inq.advance(params, state)
  # Then 0.2 -> 0.25 and -0.1 -> 0; the two zeros stay 0.
  np.testing.assert_array_equal(np.asarray(params["x"]["kernel"]),
                                [[2.0, -2.0, 0.0, 0.25], [0.25, 0.0, 1.0, 0.0]])
  s2 = inq.verify(params, state)
  assert s2["x/kernel"][:4] == (8, 8, 5, 3)  # {2, -2, 1, 0.25, 0}, three zeros
  assert (int(s2["x/kernel"].n1), int(s2["x/kernel"].n2)) == (1, -2)
  assert s2["y/kernel"][:4] == (0, 0, 0, 0)
  assert int(s2["y/kernel"].n1) == -(2**30)
  assert set(s2) == {"x/kernel", "y/kernel"}


def test_eager_only_messages_name_the_function():
  params = small()
  state = inq.init(params, cfg())
  want = ("{} runs eagerly (its input checks need concrete values); call it outside jax.jit, "
          "jax.vmap and other transformations (also not from inside a jitted function on "
          "closed-over arrays), once per phase, between the train steps")
  # A traced state alone (params concrete) is refused by the same check.
  assert message(TypeError, jax.jit(lambda s: inq.advance(params, s)), state) == (
      want.format("advance"))
  assert message(TypeError, jax.jit(lambda s: inq.verify(params, s)), state) == (
      want.format("verify"))
  assert message(TypeError, jax.jit(lambda p: inq.advance(p, state)), params) == (
      want.format("advance"))
  assert message(TypeError, jax.jit(lambda p: inq.init(p, cfg())), params) == want.format("init")
  keep = {"d": {"kernel": jnp.ones((2, 2), bool), "bias": jnp.asarray(True)}}
  assert message(TypeError, jax.jit(lambda k: inq.init(params, cfg(), pruned=k)), keep) == (
      want.format("init"))


@pytest.mark.parametrize("dtype, bits, name, lo, hi, edges", [
    # float32 normals are 2^-126..2^127; at 8 bits n2 - 1 = n1 - 64.
    (jnp.float32, 8, "float32", -126, 127, ((127, True), (128, False), (-62, True),
                                            (-63, False))),
    # float16 normals are 2^-14..2^15; at 5 bits n2 - 1 = n1 - 8.
    (jnp.float16, 5, "float16", -14, 15, ((15, True), (16, False), (-6, True), (-7, False)))])
def test_state_exponent_checked_against_the_leaf_dtype(dtype, bits, name, lo, hi, edges):
  params = {"kernel": jnp.asarray([[1.0, -0.5], [0.25, 0.0]], dtype)}
  state = inq.init(params, cfg(bits=bits))
  assert int(state.exponents["kernel"]) == 0
  shift = 2 ** (bits - 2) - 1  # n2 = n1 - shift
  for n1, ok in edges:
    edited = dataclasses.replace(state, exponents={"kernel": jnp.int32(n1)})
    if ok:  # a codebook the dtype holds, but not the one init made: the seal refuses it
      assert message(ValueError, inq.verify, params, edited).startswith(
          "this INQState's exponents (n1) or pruned counts are not the ones init computed")
      continue
    for fn in (inq.advance, inq.verify):
      assert message(ValueError, fn, params, edited) == (
          f"kernel: the state's exponent n1={n1} gives the {bits}-bit codebook "
          f"2^{n1 - shift}..2^{n1}, but {name} holds normal numbers 2^{lo}..2^{hi} (init "
          "never makes such an exponent); the state's exponents were edited or belong to "
          "another model")


@pytest.mark.parametrize("edge", [127, -62])
def test_state_exponent_message_skips_channels_at_the_edges(edge):
  # float32 at 8 bits: n1 = 127 (top) and n1 = -62 (n2 - 1 = -126, the bottom)
  # are legal; the message must name the bad channel after them.
  params = small()
  state = inq.init(params, cfg(bits=8, granularity="channel"))
  edited = dataclasses.replace(state, exponents={"d/kernel": jnp.asarray([edge, 200], jnp.int32)})
  assert message(ValueError, inq.advance, params, edited).startswith(
      "d/kernel: the state's exponent n1=200 gives the 8-bit codebook 2^137..2^200, but ")


def test_verify_and_advance_with_only_empty_quantized_leaves():
  params = {"a": {"kernel": jnp.zeros((0, 3))}, "b": {"bias": jnp.ones(2)}}
  state = inq.init(params, cfg(portions=(1.0,)))
  assert inq.verify(params, state)["a/kernel"][:4] == (0, 0, 0, 0)
  new, state = inq.advance(params, state)
  assert new["a"]["kernel"].shape == (0, 3) and int(state.step) == 1
  np.testing.assert_array_equal(np.asarray(new["b"]["bias"]), [1.0, 1.0])
  assert inq.verify(new, state)["a/kernel"][:4] == (0, 0, 0, 0)


def test_advance_returns_copies_of_unquantized_leaves():
  # A jitted step may donate what advance returns: the caller's own arrays
  # (e.g. the pretrained biases) must not be among them.
  params = small()
  state = inq.init(params, cfg())
  new, _ = inq.advance(params, state)
  assert new["d"]["bias"] is not params["d"]["bias"]
  assert new["d"]["kernel"] is not params["d"]["kernel"]
  new["d"]["bias"].delete()
  new["d"]["kernel"].delete()
  np.testing.assert_array_equal(np.asarray(params["d"]["bias"]), [0.0, 0.0])
  np.testing.assert_array_equal(np.asarray(params["d"]["kernel"]),
                                [[1.0, -0.5], [0.375, 0.125]])


def test_advance_cuts_leaves_on_the_host_on_cpu(monkeypatch):
  # On CPU the packed results come back whole and are cut on the host
  # (unpack=False): cutting them in XLA compiles one kernel per output array.
  calls = []
  real = _packed.advance

  def spy(*args, **kwargs):
    calls.append(kwargs["unpack"])
    return real(*args, **kwargs)

  monkeypatch.setattr(_packed, "advance", spy)
  params = small()
  new, _ = inq.advance(params, inq.init(params, cfg()))
  assert calls == [False]
  np.testing.assert_array_equal(np.asarray(new["d"]["kernel"]), [[1.0, -0.5], [0.375, 0.125]])


def test_advance_keeps_committed_leaves_committed():
  # Params committed to a device come back committed there, weights and masks
  # alike: the next phase's programs then see the same input placement.
  device = jax.devices()[0]
  params = jax.device_put(small(), device)
  state = inq.init(params, cfg())
  new, state = inq.advance(params, state)
  for tree in (new, state.masks):
    for leaf in jax.tree.leaves(tree):
      assert leaf.committed and leaf.devices() == {device}
  uncommitted = small()
  new, state = inq.advance(uncommitted, inq.init(uncommitted, cfg()))
  assert not new["d"]["kernel"].committed and not state.masks["d"]["kernel"].committed


@pytest.mark.parametrize("seed", [0, 2**31 + 12345, 2**32 - 1])
def test_random_partition_draws_from_the_uint32_seed_and_step(seed):
  # The masks of step s are those of the key (seed, s) as uint32, whatever
  # the seed's size: seeds above 2^31 must not wrap to other masks.
  w = jnp.asarray(np.random.default_rng(0).standard_normal((6, 7)), jnp.float32)
  config = cfg(strategy="random", seed=seed)
  state = inq.init({"kernel": w}, config)
  _, state = inq.advance({"kernel": w}, state)

  def draw(seed_step):
    return np.asarray(_packed.advance(
        [w], [jnp.zeros((6, 7), bool)], [state.exponents["kernel"]],
        np.asarray([21], np.int32), np.asarray(seed_step, np.uint32), bits=(5,),
        strategy="random")[1][0])

  np.testing.assert_array_equal(np.asarray(state.masks["kernel"]), draw([seed, 0]))
  assert int(np.sum(np.asarray(state.masks["kernel"]))) == 21
  assert not np.array_equal(draw([seed, 0]), draw([(seed + 2**31) % 2**32, 0]))


def test_init_runs_no_per_leaf_check_for_normal_leaves(monkeypatch):
  # init measures every leaf in one program; the per-leaf finite check (a host
  # round trip per leaf) runs only for a leaf with a non-finite weight, and a
  # leaf whose largest |w| is exactly the smallest normal is not subnormal.
  calls = []
  real = _checks.check_finite
  monkeypatch.setattr(_checks, "check_finite", lambda *a: (calls.append(a[0]), real(*a))[1])
  params = {"a": {"kernel": jnp.asarray([[1.0, -0.5], [0.25, 0.0]], jnp.float16)},
            "b": {"kernel": jnp.asarray([[3.0, 0.1]], jnp.bfloat16)},
            "c": {"kernel": jnp.asarray([0.7, -2.0], jnp.float32)},
            "z": {"kernel": jnp.zeros((3, 2), jnp.float32)}}
  for granularity in ("layer", "channel"):
    inq.init(params, cfg(granularity=granularity))
  assert calls == []
  edge = {"kernel": jnp.asarray([2.0**-14, 0.0], jnp.float16)}  # max = smallest normal
  with pytest.raises(ValueError, match="needs exponents"):
    inq.init(edge, cfg(bits=2))
  with pytest.raises(ValueError, match="subnormal"):
    inq.init({"kernel": jnp.asarray([2.0**-20, 0.0], jnp.float16)}, cfg())
  with pytest.raises(ValueError, match="non-finite"):
    inq.init({"kernel": jnp.asarray([1.0, np.nan], jnp.float32)}, cfg())
  assert calls == ["kernel"]


def test_masks_are_bool_arrays():
  params = small()
  state = inq.init(params, cfg())
  for tree in (state.masks, inq.advance(params, state)[1].masks):
    assert {str(m.dtype) for m in jax.tree.leaves(tree)} == {"bool"}
  assert state.masks["d"]["bias"].shape == () and state.masks["d"]["kernel"].shape == (2, 2)


def test_quantized_leaf_that_stopped_being_float():
  params = small()
  state = inq.init(params, cfg())
  ints = {"d": {"kernel": jnp.ones((2, 2), jnp.int32), "bias": params["d"]["bias"]}}
  assert message(TypeError, inq.advance, ints, state) == (
      "d/kernel: dtype int32 is not floating point; only float weights can be quantized "
      "(narrow `include` or add it to `exclude`)")
  assert message(TypeError, inq.verify, ints, state).endswith("can be quantized (narrow "
                                                            "`include` or add it to `exclude`)")


def test_missing_paths_message_lists_six():
  params = small()
  state = inq.init(params, cfg())
  extra = {f"x{i}/kernel": jnp.int32(0) for i in range(8)}
  bad = dataclasses.replace(state, exponents={**state.exponents, **extra})
  assert message(ValueError, inq.verify, params, bad) == (
      "state quantizes ['x0/kernel', 'x1/kernel', 'x2/kernel', 'x3/kernel', 'x4/kernel', "
      "'x5/kernel'] which are not in params")


def test_selection_messages_say_quantize():
  params = small()
  assert message(ValueError, inq.init, params, cfg(include="kernel", exclude="d/")) == (
      "include='kernel' minus exclude='d/' leaves no parameter to quantize; paths look like "
      "['d/bias', 'd/kernel']")
  ints = {"d": {"kernel": jnp.ones((2, 2), jnp.int32), "bias": params["d"]["bias"]}}
  assert message(TypeError, inq.init, ints, cfg()) == (
      "d/kernel: dtype int32 is not floating point; only float weights can be quantized "
      "(narrow `include` or add it to `exclude`)")


def test_init_places_everything_like_committed_params():
  device = jax.devices()[0]
  params = jax.device_put(pruned_params(), device)
  state = inq.init(params, cfg(granularity="channel"), pruned=keep_mask())
  assert state.step.dtype == jnp.int32 and state.step.shape == ()
  for tree in (state.masks, state.exponents):
    for leaf in jax.tree.leaves(tree):
      assert leaf.committed and leaf.devices() == {device}
  assert inq.init(pruned_params(), cfg()).step.dtype == jnp.int32
