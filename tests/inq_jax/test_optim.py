"""freeze: frozen weights stay bit-identical under every common optimizer."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import inq_jax
from inq_jax import quantize as inq

OPTIMIZERS = {
    "sgd_momentum_wd": lambda: optax.chain(optax.add_decayed_weights(5e-4),
                                           optax.sgd(0.05, momentum=0.9)),
    "sgd_nesterov_wd": lambda: optax.chain(optax.add_decayed_weights(5e-4),
                                           optax.sgd(0.05, momentum=0.9, nesterov=True)),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=1e-2),
}


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


def data():
  x = jax.random.normal(jax.random.key(0), (64, 8))
  return x, (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0).astype(jnp.int32)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_frozen_bit_identical_through_all_phases(name):
  model, (x, y) = MLP(), data()
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  state = inq.init(params, inq.INQConfig(bits=4, portions=(0.3, 0.6, 0.9, 1.0)))
  opt_state = None
  for step in range(state.config.num_steps - 1):
    params, state = inq.advance(params, state)
    tx = optax.chain(OPTIMIZERS[name](), inq_jax.optim.elementwise_freeze(state.masks))
    if opt_state is None or step % 2 == 0:
      opt_state = tx.init(params)
    else:  # carry the inner optimizer's momentum over, with the new masks
      opt_state = (opt_state[0], inq_jax.optim.ElementwiseFreezeState(state.masks))

    @jax.jit
    def train_step(p, s, tx=tx):
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    before = jax.tree.map(np.asarray, params)
    for _ in range(5):
      params, opt_state = train_step(params, opt_state)
    for path in ("Dense_0", "Dense_1"):
      m = np.asarray(state.masks[path]["kernel"])
      old, new = before[path]["kernel"], np.asarray(params[path]["kernel"])
      assert old[m].tobytes() == new[m].tobytes(), f"{name}: frozen {path} moved"
      assert np.any(old[~m] != new[~m]), f"{name}: float weights of {path} did not train"
    assert np.any(before["Dense_0"]["bias"] != np.asarray(params["Dense_0"]["bias"]))
  params, state = inq.advance(params, state)
  assert all(s.frozen == s.total for s in inq.verify(params, state).values())


def test_nnx_optimizer():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  model, (x, y) = Net(nnx.Rngs(0)), data()
  params = nnx.state(model, nnx.Param)
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  nnx.update(model, params)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), inq_jax.optim.elementwise_freeze(state.masks))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
    grads = nnx.grad(loss_fn)(model)
    optimizer.update(model, grads)

  before = np.asarray(model.l1.kernel[...])
  for _ in range(3):
    train_step(model, optimizer)
  m = np.asarray(state.masks["l1"]["kernel"][...])
  after = np.asarray(model.l1.kernel[...])
  assert before[m].tobytes() == after[m].tobytes()
  assert np.any(before[~m] != after[~m])


def test_python_false_masks_and_zero_exact_for_nan():
  tx = inq_jax.optim.elementwise_freeze({"a": jnp.array([True, False]), "b": False})
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  s = tx.init(params)
  upd, _ = tx.update({"a": jnp.array([jnp.nan, 1.0]), "b": jnp.ones(3)}, s)
  np.testing.assert_array_equal(upd["a"], [0.0, 1.0])
  np.testing.assert_array_equal(upd["b"], [1.0] * 3)


def test_masks_mismatch():
  with pytest.raises(ValueError, match="elementwise_freeze: the mask's tree does not match"):
    inq_jax.optim.elementwise_freeze({"a": False}).init({"a": jnp.zeros(2), "b": jnp.zeros(2)})
  with pytest.raises(ValueError, match=r"a: params have shape \(2,\) but the mask has shape "
                     r"\(3,\)"):
    inq_jax.optim.elementwise_freeze({"a": jnp.zeros(3, bool)}).init({"a": jnp.zeros(2)})


def test_masks_are_arguments_not_constants():
  # A 1M-weight mask baked in as a constant would put megabytes into the program.
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (1024, 1024))}}
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), inq_jax.optim.elementwise_freeze(state.masks))
  opt_state = tx.init(params)

  def step(p, s):
    updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
    return optax.apply_updates(p, updates), s

  text = jax.jit(step).lower(params, opt_state).as_text()
  # The mask is a parameter of the lowered program (an argument of @main) ...
  main = re.search(r"func\.func public @main\((.*?)\)\s*->", text, re.S).group(1)
  assert main.count("tensor<1024x1024xi1>") == 1, main
  # ... and no constant of its shape or any large literal is embedded.
  assert not re.search(r"constant.*tensor<1024x1024xi1>", text)
  assert not re.search(r'dense<"0x[0-9A-Fa-f]{256,}', text)


def test_donating_opt_state_keeps_callers_masks():
  params = {"d": {"kernel": jnp.ones((4, 4))}}
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  tx = inq_jax.optim.elementwise_freeze(state.masks)
  step = jax.jit(lambda p, s: tx.update(p, s), donate_argnums=1)
  jax.block_until_ready(step(params, tx.init(params)))
  assert int(jnp.sum(state.masks["d"]["kernel"])) == 8  # not deleted by the donation


# ------------------------------------------- masks passed with every update


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_maskless_freeze_takes_the_masks_per_update_and_matches_the_stateful_one(name):
  """elementwise_freeze() in a named_chain, masks as an extra argument: the same updates."""
  model, (x, y) = MLP(), data()
  params = model.init(jax.random.key(1), x)["params"]

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                           y).mean()

  state = inq.init(params, inq.INQConfig(bits=4, portions=(0.5, 1.0)))
  params, state = inq.advance(params, state)
  stateful = optax.chain(OPTIMIZERS[name](), inq_jax.optim.elementwise_freeze(state.masks))
  maskless = optax.named_chain(("base", OPTIMIZERS[name]()),
                               ("freeze", inq_jax.optim.elementwise_freeze()))
  assert isinstance(maskless, optax.GradientTransformationExtraArgs)
  opt_state = maskless.init(params)
  assert opt_state["freeze"] == inq_jax.optim.MasklessFreezeState()
  assert not jax.tree.leaves(opt_state["freeze"])  # nothing of the masks in the state

  @jax.jit
  def step_stateful(p, s):
    updates, s = stateful.update(jax.grad(loss_fn)(p), s, p)
    return optax.apply_updates(p, updates), s

  @jax.jit
  def step_maskless(p, s, masks):
    updates, s = maskless.update(jax.grad(loss_fn)(p), s, p, frozen_masks=masks)
    return optax.apply_updates(p, updates), s

  a, sa = params, stateful.init(params)
  b, sb = params, opt_state
  for _ in range(5):
    a, sa = step_stateful(a, sa)
    b, sb = step_maskless(b, sb, state.masks)
  m = np.asarray(state.masks["Dense_0"]["kernel"])
  before = np.asarray(params["Dense_0"]["kernel"])
  got = np.asarray(b["Dense_0"]["kernel"])
  assert before[m].tobytes() == got[m].tobytes()  # frozen: bit-identical
  assert np.any(before[~m] != got[~m])            # the float weights trained
  for (path, u), (_, v) in zip(*(jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))):
    assert np.asarray(u).tobytes() == np.asarray(v).tobytes(), path


def test_maskless_freeze_needs_matching_masks_with_every_update():
  tx = inq_jax.optim.elementwise_freeze()
  params = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
  s = tx.init(params)
  with pytest.raises(ValueError, match=r"built without masks.*frozen_masks=masks"):
    tx.update(params, s, params)
  with pytest.raises(ValueError, match="elementwise_freeze: the mask's tree does not match"):
    tx.update(params, s, params, frozen_masks={"a": False})
  with pytest.raises(ValueError, match=r"a: params have shape \(2,\) but the mask has shape"):
    tx.update(params, s, params, frozen_masks={"a": jnp.zeros(3, bool), "b": False})
  # Python False for a leaf never frozen; NaN updates of frozen weights are exact zeros;
  # the other extra arguments of a chain are someone else's.
  upd, s2 = tx.update({"a": jnp.array([jnp.nan, 1.0]), "b": jnp.ones(3)}, s, params,
                      frozen_masks={"a": jnp.array([True, False]), "b": False}, value=1.0)
  np.testing.assert_array_equal(upd["a"], [0.0, 1.0])
  np.testing.assert_array_equal(upd["b"], [1.0] * 3)
  assert s2 == s


def test_maskless_masks_are_arguments_not_constants():
  params = {"d": {"kernel": jax.random.normal(jax.random.key(0), (1024, 1024))}}
  state = inq.init(params, inq.INQConfig())
  params, state = inq.advance(params, state)
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), inq_jax.optim.elementwise_freeze())

  def step(p, s, masks):
    updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p, frozen_masks=masks)
    return optax.apply_updates(p, updates), s

  text = jax.jit(step).lower(params, tx.init(params), state.masks).as_text()
  main = re.search(r"func\.func public @main\((.*?)\)\s*->", text, re.S).group(1)
  assert main.count("tensor<1024x1024xi1>") == 1, main
  assert not re.search(r"constant.*tensor<1024x1024xi1>", text)
  assert not re.search(r'dense<"0x[0-9A-Fa-f]{256,}', text)
