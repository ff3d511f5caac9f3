"""Optax transforms for INQ retraining."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax

from inq_jax import _checks
from inq_jax import tree


class ElementwiseFreezeState(NamedTuple):
  """The frozen masks, carried as optimizer state (arguments, not constants)."""
  masks: Any


class MasklessFreezeState(NamedTuple):
  """The state of `elementwise_freeze()` without masks: none; they come with each update."""


def elementwise_freeze(
    frozen_masks=None,
) -> Union[optax.GradientTransformation, optax.GradientTransformationExtraArgs]:
  """Zeroes the update of every frozen weight; put it last in `optax.chain`.

  INQ retrains only the still-float weights: W <- W - lr * dE/dW * T with T = 0
  for frozen weights (paper Eq. 6), and E includes weight decay. Masking the
  gradient first is not enough: `add_decayed_weights` would add wd * W back,
  momentum/Adam would keep moving a weight with the velocity it had before it
  was frozen, and AdamW's decoupled decay acts on the parameter itself. Zeroing
  the final update, after every other transform, is the one place where frozen
  weights get exactly 0 and so stay bit-identical (`p + 0.0 == p`). The inner
  optimizer's moments still see those gradients; that moves nothing frozen.

  Two ways to hand it the masks, so that a jitted step receives them as an
  argument instead of baking megabytes of bool constants into the executable:

  - `elementwise_freeze(masks)`: the masks live in this transform's state
    (`ElementwiseFreezeState`). Each mask is copied onto its parameter's
    devices (sharded like it, or a scalar replicated there), so in_shardings
    taken from the optimizer state (`jax.tree.map(lambda x: x.sharding,
    opt_state)`) agree with the params'. A new set of masks means a new
    optimizer state (or a replaced `ElementwiseFreezeState`).
  - `elementwise_freeze()`: an `optax.GradientTransformationExtraArgs` with an
    empty state (`MasklessFreezeState`) whose `update` takes the masks as the
    keyword argument `frozen_masks` on every call, so they are kept in one
    place (e.g. `INQState.masks` inside a train state) and not copied into the
    optimizer state. `optax.chain` and `optax.named_chain` pass extra keyword
    arguments on to it: `tx.update(grads, opt_state, params,
    frozen_masks=state.masks)`.

  `jnp.where` (not a multiply) keeps the zero exact even for NaN/Inf updates.

  How it differs from `optax.freeze`: `optax.freeze(mask)` takes a static
  per-leaf bool (a whole parameter is frozen or not) and wraps an inner
  transform; it cannot take arrays. INQ freezes individual weights, so this
  transform takes an elementwise bool array per leaf, and it must be the LAST
  transform of the chain so that nothing after it can move a frozen weight.

  What it does not protect: it zeroes the updates of the parameters only.
  Copies of the parameters that an optimizer keeps in its own state (the
  averaged "eval" params of schedule-free optimizers, an EMA of the weights,
  the slow weights of lookahead) are computed from those params plus other
  terms and drift off the codebook. Round such copies where `state.masks` is
  True (`inq_jax.quantize.round_to_pow2` with `state.bounds(path)`) and check
  them with `inq_jax.quantize.verify(copy, state, check_frozen_values=False)`
  before using or exporting them.

  Args:
    frozen_masks: a pytree shaped like the params: a bool array (True = frozen)
      per leaf, or a Python `False` / all-False array (a scalar is fine) for leaves
      never frozen. `INQState.masks` is exactly this. None: the masks come with
      every `update` call instead (`frozen_masks=`, the same kind of pytree).

  Returns:
    An `optax.GradientTransformation` holding `frozen_masks`; without them an
    `optax.GradientTransformationExtraArgs` whose `update` raises ValueError if
    `frozen_masks` is missing or its tree does not match the updates'.

  Example:
    >>> tx = optax.chain(optax.add_decayed_weights(5e-4),
    ...                  optax.sgd(1e-3, momentum=0.9),
    ...                  inq_jax.optim.elementwise_freeze(state.masks))
    >>> # or, the masks passed with each update:
    >>> tx = optax.chain(optax.sgd(1e-3, momentum=0.9), inq_jax.optim.elementwise_freeze())
    >>> updates, opt_state = tx.update(grads, opt_state, params, frozen_masks=state.masks)

  Reference: arXiv:1702.03044, Eq. 6.
  """
  if frozen_masks is None:
    return _freeze_by_argument()

  def init_fn(params):
    leaves, treedef = tree.aligned(
        params, frozen_masks, what="elementwise_freeze", noun="mask",
        hint="; the masks are INQState.masks, made for the tree given to inq.init: give "
             "the optimizer that same tree (e.g. variables['params'], not the whole "
             "variables)")
    # Copies, so that donating the optimizer state to a jitted step never
    # deletes the caller's masks (e.g. `INQState.masks`), placed with their
    # params so the optimizer state lives where the params live.
    masks = [_checks.place_like(jnp.array(m, bool, copy=True), p) for _, p, m in leaves]
    return ElementwiseFreezeState(masks=jax.tree_util.tree_unflatten(treedef, masks))

  def update_fn(updates, state, params=None):
    del params
    return _zero_frozen(updates, state.masks), state

  return optax.GradientTransformation(init_fn, update_fn)


def _freeze_by_argument() -> optax.GradientTransformationExtraArgs:
  """`elementwise_freeze()`: the masks are the `frozen_masks` argument of every update."""

  def init_fn(params):
    del params
    return MasklessFreezeState()

  def update_fn(updates, state, params=None, *, frozen_masks: Optional[Any] = None,
                **extra_args):
    del params, extra_args  # a chain hands every transform all of its extra arguments
    if frozen_masks is None:
      raise ValueError("elementwise_freeze() was built without masks, so every update "
                       "needs them: tx.update(updates, opt_state, params, "
                       "frozen_masks=masks)")
    # The structure and shapes are static: checked once, when the step is traced.
    tree.aligned(updates, frozen_masks, what="elementwise_freeze", noun="mask")
    return _zero_frozen(updates, frozen_masks), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zero_frozen(updates, masks):
  return jax.tree.map(lambda u, m: jnp.where(m, jnp.zeros((), u.dtype), u), updates, masks)


__all__ = ["ElementwiseFreezeState", "MasklessFreezeState", "elementwise_freeze"]
