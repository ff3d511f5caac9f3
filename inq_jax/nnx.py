"""INQ on a Flax NNX model: INQ reads and writes the model's own `nnx.Param`s.

The functions of `inq_jax.quantize` are pure: they take a params pytree and
return a new one. With NNX the params live inside the model, and an
`nnx.State` taken before training holds the values of that moment, not the
trained ones. These helpers read the model's params afresh at every call and
write the result back into the model, so the loop cannot act on stale values:

    from inq_jax import nnx as inq_nnx

    state = inq_nnx.init(model, inq.INQConfig(bits=5))
    for portion in state.config.portions:
      state = inq_nnx.advance(model, state)        # quantizes the model in place
      if portion == 1.0:
        break
      optimizer = inq_nnx.optimizer(model, optax.sgd(0.01, momentum=0.9), state)
      ...train with optimizer.update(model, grads)...
    inq_nnx.verify(model, state)

Reference: arXiv:1702.03044.
"""

from __future__ import annotations

from typing import Any, Dict

import optax
from flax import nnx

from inq_jax import optim
from inq_jax import quantize as inq


def params(model: nnx.Module, wrt: Any = nnx.Param) -> nnx.State:
  """The model's params as INQ sees them: `nnx.state(model, wrt)`, read now."""
  return nnx.state(model, wrt)


def init(model: nnx.Module, config: inq.INQConfig, *, wrt: Any = nnx.Param,
         pruned=None) -> inq.INQState:
  """`inq.init` of the model's (pretrained) params; `state.masks` has their structure."""
  return inq.init(params(model, wrt), config, pruned=pruned)


def advance(model: nnx.Module, state: inq.INQState, *, wrt: Any = nnx.Param) -> inq.INQState:
  """`inq.advance` of the model's current params, written back into the model.

  Returns the new state; build a new optimizer with it (`optimizer`), since
  the old one frees the weights this step froze.
  """
  new, state = inq.advance(params(model, wrt), state)
  nnx.update(model, new)
  return state


def verify(model: nnx.Module, state: inq.INQState, *, wrt: Any = nnx.Param,
           check_frozen_values: bool = True) -> Dict[str, inq.LeafSummary]:
  """`inq.verify` of the model's current params."""
  return inq.verify(params(model, wrt), state, check_frozen_values=check_frozen_values)


def optimizer(model: nnx.Module, tx: optax.GradientTransformation, state: inq.INQState, *,
              wrt: Any = nnx.Param) -> nnx.Optimizer:
  """A fresh `nnx.Optimizer` for the next phase: `tx`, then the freeze (last in the chain).

  Call it after every `advance`: its masks are the state's of that moment, and
  a fresh optimizer state restarts momentum and the schedule (paper Sec. 2.3).
  """
  return nnx.Optimizer(model, optax.chain(tx, optim.elementwise_freeze(state.masks)), wrt=wrt)


__all__ = ["advance", "init", "optimizer", "params", "verify"]
