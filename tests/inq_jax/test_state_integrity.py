"""An INQState that cannot be quietly swapped: its seal, its checksums, restore targets.

The seal binds the config and the quantized leaves' layout, and separately the
exponents and pruned counts `init` computed; the checksums bind the frozen
weights. Each case here changes one thing a user (or a bug) could change and
checks that `advance` and `verify` refuse it with a message naming the cause,
and that nothing else trips them.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import inq_jax
from inq_jax import _packed
from inq_jax import quantize as inq


def params_():
  rng = np.random.default_rng(0)
  return {"conv": {"kernel": jnp.asarray(rng.normal(0, 0.2, (3, 3, 2, 8)), jnp.float32),
                   "bias": jnp.zeros(8)},
          "fc": {"kernel": jnp.asarray(rng.normal(0, 0.05, (72, 10)), jnp.float32)}}


def stepped(config=None, steps=1):
  params = params_()
  state = inq.init(params, config or inq.INQConfig(bits=5))
  for _ in range(steps):
    params, state = inq.advance(params, state)
  return params, state


CONFIG_CHANGES = {
    "bits": {"bits": 4}, "portions": {"portions": (0.25, 0.5, 1.0)},
    "strategy": {"strategy": "random"}, "include": {"include": "fc/kernel"},
    "exclude": {"exclude": "^conv/"}, "granularity": {"granularity": "channel"},
    "calibration": {"calibration": "mse"}, "seed": {"seed": 1},
    "layer_bits": {"layer_bits": (("^fc/", 8),)},
}


def test_every_config_field_is_covered():
  assert set(CONFIG_CHANGES) == {f.name for f in dataclasses.fields(inq.INQConfig)}


@pytest.mark.parametrize("field", sorted(CONFIG_CHANGES))
def test_a_config_changed_after_init_is_refused(field):
  params, state = stepped()
  changed = dataclasses.replace(state.config, **CONFIG_CHANGES[field])
  # (Another granularity is caught earlier: per-channel exponents have another shape.)
  for fn in (inq.advance, inq.verify):
    with pytest.raises(ValueError, match="does not belong to (its config or to )?these params"):
      fn(params, dataclasses.replace(state, config=changed))


@pytest.mark.parametrize("how", ["swapped", "edited", "from_other_state"])
def test_exponents_swapped_or_edited_are_refused(how):
  params, state = stepped()
  n1 = dict(state.exponents)
  assert int(n1["conv/kernel"]) != int(n1["fc/kernel"])
  if how == "swapped":
    n1["conv/kernel"], n1["fc/kernel"] = n1["fc/kernel"], n1["conv/kernel"]
  elif how == "edited":
    n1["fc/kernel"] = n1["fc/kernel"] + 1  # a codebook the dtype holds
  else:
    scaled = jax.tree.map(lambda w: w * 4, params_())
    n1 = dict(inq.init(scaled, state.config).exponents)
  for fn in (inq.advance, inq.verify):
    with pytest.raises(ValueError, match=r"exponents \(n1\) or pruned counts are not the ones "
                       "init computed"):
      fn(params, dataclasses.replace(state, exponents=n1))


def test_params_of_another_dtype_are_refused():
  params, state = stepped()
  as_bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match="for params of other shapes or dtypes"):
    inq.verify(as_bf16, state)


def test_a_forged_seal_of_the_wrong_shape_is_named():
  params, state = stepped()
  with pytest.raises(ValueError, match=r"the state's seal must be uint32 \[2\]"):
    inq.verify(params, dataclasses.replace(state, seal=jnp.zeros(3, jnp.uint32)))


@pytest.mark.parametrize("edit", ["halve", "negate", "move_to_zero", "swap_two"])
def test_frozen_weights_moved_within_the_codebook_are_refused(edit):
  params, state = stepped()
  w = np.asarray(params["fc"]["kernel"]).copy()
  mask = np.asarray(state.masks["fc"]["kernel"])
  frozen = np.argwhere(mask & (w != 0))
  i, j = map(tuple, frozen[:2])
  if edit == "halve":  # 2^k -> 2^(k-1): still in the 5-bit codebook
    w[i] /= 2
  elif edit == "negate":
    w[i] = -w[i]
  elif edit == "move_to_zero":
    w[i] = 0.0
  else:  # two frozen weights of different values trade places
    j = next(tuple(k) for k in frozen if w[tuple(k)] != w[i])
    w[i], w[j] = w[j], w[i]
  moved = {**params, "fc": {"kernel": jnp.asarray(w)}}
  summary = inq.verify(moved, state, check_frozen_values=False)  # all still in the codebook
  assert summary["fc/kernel"].frozen == int(mask.sum())
  for fn in (inq.advance, inq.verify):
    with pytest.raises(ValueError, match=r"fc/kernel: the frozen weights changed since the "
                       r"last init/advance \(their checksum is 0x[0-9a-f]{8}, the state "
                       r"recorded 0x[0-9a-f]{8}\).*\(1\) inq_jax.optim.elementwise_freeze"):
      fn(moved, state)


def test_checksums_ignore_the_sign_of_a_frozen_zero_and_the_still_float_weights():
  params, state = stepped(inq.INQConfig(bits=3), steps=3)
  mask = np.asarray(state.masks["fc"]["kernel"])
  w = np.asarray(params["fc"]["kernel"]).copy()
  assert np.any(mask & (w == 0))
  w[mask & (w == 0)] = -0.0  # a frozen zero plus a zero update can flip its sign bit
  w[~mask] *= 1.5            # retraining moves only the float weights
  inq.verify({**params, "fc": {"kernel": jnp.asarray(w)}}, state)
  inq.advance({**params, "fc": {"kernel": jnp.asarray(w)}}, state)


def test_the_checksums_are_the_numpy_reference():
  params, state = stepped(steps=2)
  for path, leaf, mask in [("fc/kernel", params["fc"]["kernel"], state.masks["fc"]["kernel"]),
                           ("conv/kernel", params["conv"]["kernel"],
                            state.masks["conv"]["kernel"])]:
    frozen_sum, float_sum = np.asarray(state.checksums[path]).tolist()
    assert frozen_sum == _packed.checksum_reference(np.asarray(leaf), np.asarray(mask))
    assert float_sum == _packed.checksum_reference(np.asarray(leaf), ~np.asarray(mask),
                                                   sampled=True)


def test_optimizer_kept_from_the_previous_phase_is_caught_and_named():
  # The old optimizer state freezes the old masks: the weights this advance
  # froze move, and the next advance says why.
  params = params_()
  state = inq.init(params, inq.INQConfig(bits=5))
  params, state = inq.advance(params, state)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), inq_jax.optim.elementwise_freeze(state.masks))
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  params, state = inq.advance(params, state)  # the optimizer is not re-created
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  with pytest.raises(ValueError, match=r"\(2\) the optimizer was not re-created after advance"):
    inq.advance(params, state)


def test_freeze_first_in_the_chain_is_caught_and_named():
  params = params_()
  state = inq.init(params, inq.INQConfig(bits=5))
  params, state = inq.advance(params, state)
  tx = optax.chain(inq_jax.optim.elementwise_freeze(state.masks),
                   optax.add_decayed_weights(0.1), optax.sgd(0.1))
  opt_state = tx.init(params)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), opt_state, params)
  params = optax.apply_updates(params, updates)
  with pytest.raises(ValueError, match=r"\(1\) inq_jax.optim.elementwise_freeze is not the "
                     "LAST transform"):
    inq.advance(params, state)


def test_abstract_state_is_a_restore_target_of_inits_structure():
  params = params_()
  for config, pruned in ((inq.INQConfig(), None), (inq.INQConfig(granularity="channel"), None),
                         (inq.INQConfig(), jax.tree.map(lambda w: jnp.ones(jnp.shape(w), bool),
                                                        params))):
    state = inq.init(params, config, pruned=pruned)
    for source in (params, jax.eval_shape(lambda: params)):
      target = inq.abstract_state(source, config, pruned=pruned is not None)
      assert jax.tree.structure(target) == jax.tree.structure(state)
      for want, have in zip(jax.tree.leaves(target), jax.tree.leaves(state)):
        assert isinstance(want, jax.ShapeDtypeStruct)
        assert (want.shape, want.dtype) == (have.shape, have.dtype)
  with pytest.raises(ValueError, match=r"layer_bits regex '\^nothing' .* matches no quantized"):
    inq.abstract_state(params, inq.INQConfig(layer_bits={"^nothing": 8}))


def test_a_restored_dict_is_named():
  params, state = stepped()
  as_dict = {"masks": state.masks, "exponents": state.exponents, "step": state.step}
  with pytest.raises(TypeError, match="restore into inq.abstract_state"):
    inq.advance(params, as_dict)
