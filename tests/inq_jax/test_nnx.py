"""inq_jax.nnx: INQ over an NNX model's own Params (issue #28)."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from inq_jax import nnx as inq_nnx
from inq_jax import optim
from inq_jax import quantize as inq


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden, self.out = nnx.Linear(16, 32, rngs=rngs), nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


X = jax.random.normal(jax.random.key(0), (64, 16))
Y = jax.random.randint(jax.random.key(1), (64,), 0, 4)
CONFIG = inq.INQConfig(bits=5, portions=(0.5, 0.75, 1.0))


def loss(m):
  return optax.softmax_cross_entropy_with_integer_labels(m(X), Y).mean()


def flat(model):
  return {path: np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(
      nnx.state(model, nnx.Param))}


def test_the_loop_quantizes_the_model_in_place_and_keeps_each_phases_training():
  model = MLP(nnx.Rngs(0))
  state = inq_nnx.init(model, CONFIG)
  with warnings.catch_warnings():
    warnings.simplefilter("error", inq.StaleParamsWarning)  # every phase trained
    for portion in CONFIG.portions:
      state = inq_nnx.advance(model, state)
      frozen = jax.tree.map(np.asarray, state.masks)
      after_advance = flat(model)
      # The model itself holds the quantized weights: verify reads them from it.
      summary = inq_nnx.verify(model, state)
      assert all(s.frozen > 0 for s in summary.values())
      if portion == 1.0:
        break
      optimizer = inq_nnx.optimizer(model, optax.sgd(0.1, momentum=0.9), state)
      for _ in range(5):
        optimizer.update(model, nnx.grad(loss)(model))
      trained = flat(model)
      masks = {path: m for path, m in jax.tree_util.tree_leaves_with_path(frozen)}
      for path, before in after_advance.items():
        m = masks[path]
        # frozen weights bit-identical, the rest trained
        np.testing.assert_array_equal(trained[path][m], before[m])
        if (~m).any():
          assert not np.array_equal(trained[path][~m], before[~m]), path
  summary = inq_nnx.verify(model, state)
  assert all(s.frozen == s.total for s in summary.values())


def test_the_old_way_round_a_stale_state_warns():
  # The README's earlier NNX paragraph: advance a State read once, update the
  # model, train the model, then advance the old State again. Nothing of the
  # training reaches INQ, and the library says so.
  model = MLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  state = inq.init(params, CONFIG)
  params, state = inq.advance(params, state)
  nnx.update(model, params)
  optimizer = nnx.Optimizer(model, optax.chain(
      optax.sgd(0.1), optim.elementwise_freeze(state.masks)), wrt=nnx.Param)
  optimizer.update(model, nnx.grad(loss)(model))
  with pytest.warns(inq.StaleParamsWarning, match="inq_jax.nnx.advance"):
    inq.advance(params, state)


def test_params_are_read_afresh():
  model = MLP(nnx.Rngs(0))
  model.out.kernel.value = jnp.zeros_like(model.out.kernel.value)
  assert not np.any(np.asarray(inq_nnx.params(model)["out"]["kernel"].value))
