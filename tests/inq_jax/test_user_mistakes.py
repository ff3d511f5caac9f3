"""The mistakes a Flax user makes with the library get messages that name the fix.

(Frozen weights that move, and why, are in test_state_integrity.py.)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import inq_jax
from inq_jax import quantize as inq


class WithBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Dense(8)(x)
    return nn.Dense(3)(nn.BatchNorm(use_running_average=not train)(x))


def test_whole_linen_variables_are_refused_with_the_fix():
  variables = WithBN().init(jax.random.key(0), jnp.ones((2, 4)))
  assert set(variables) == {"params", "batch_stats"}
  with pytest.raises(ValueError, match=r"init got a Flax variables dict \(top-level keys "
                     r"\['batch_stats', 'params'\]\); pass variables\['params'\] instead"):
    inq.init(variables, inq.INQConfig())
  inq.init(variables["params"], inq.INQConfig())


def test_an_optimizer_over_another_tree_names_the_fix():
  variables = WithBN().init(jax.random.key(0), jnp.ones((2, 4)))
  state = inq.init(variables["params"], inq.INQConfig())
  tx = optax.chain(optax.sgd(0.1), inq_jax.optim.elementwise_freeze(state.masks))
  with pytest.raises(ValueError, match=r"give the optimizer that same tree \(e.g. "
                     r"variables\['params'\], not the whole variables\)"):
    tx.init(variables)


def test_advance_inside_a_jitted_function_on_closed_over_params_is_refused():
  params = {"d": {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(4, 4)),
                                        jnp.float32)}}
  state = inq.init(params, inq.INQConfig())

  @jax.jit
  def step(x):
    new, _ = inq.advance(params, state)  # concrete arrays, closed over
    return x + new["d"]["kernel"].sum()

  with pytest.raises(TypeError, match=r"advance runs eagerly .*\(also not from inside a "
                     r"jitted function on closed-over arrays\)"):
    step(1.0)
  with pytest.raises(TypeError, match="verify runs eagerly"):
    jax.jit(lambda x: x + len(inq.verify(params, state)))(1.0)
  with pytest.raises(TypeError, match="init runs eagerly"):
    jax.jit(lambda x: x + len(inq.init(params, inq.INQConfig()).exponents))(1.0)


def test_every_public_module_is_reached_from_the_package():
  for name in ("export", "nnx", "prune", "shift", "verify_file", "quantize", "optim", "tree"):
    assert getattr(inq_jax, name).__name__ == f"inq_jax.{name}"
    assert name in dir(inq_jax)
  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    inq_jax.nope  # pylint: disable=pointless-statement


def test_leaf_summaries_print_plain_numbers():
  params = {"d": {"kernel": jnp.asarray([[1.0, -0.5], [0.3, 0.1]], jnp.float32)}}
  state = inq.init(params, inq.INQConfig(bits=3, portions=(1.0,)))
  params, state = inq.advance(params, state)
  (summary,) = inq.verify(params, state).values()
  assert repr(summary) == ("LeafSummary(total=4, frozen=4, distinct_values=4, zeros=1, n1=0, "
                           "n2=-1, bits=3)")
