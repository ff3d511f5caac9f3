"""Optax transforms for INQ retraining."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from inq_jax.tree import leaves_with_paths


class ElementwiseFreezeState(NamedTuple):
  """The frozen masks, carried as optimizer state (arguments, not constants)."""
  masks: Any


def elementwise_freeze(frozen_masks) -> optax.GradientTransformation:
  """Zeroes the update of every frozen weight; put it last in `optax.chain`.

  INQ retrains only the still-float weights: W <- W - lr * dE/dW * T with T = 0
  for frozen weights (paper Eq. 6), and E includes weight decay. Masking the
  gradient first is not enough: `add_decayed_weights` would add wd * W back,
  momentum/Adam would keep moving a weight with the velocity it had before it
  was frozen, and AdamW's decoupled decay acts on the parameter itself. Zeroing
  the final update, after every other transform, is the one place where frozen
  weights get exactly 0 and so stay bit-identical (`p + 0.0 == p`). The inner
  optimizer's moments still see those gradients; that moves nothing frozen.

  The masks live in this transform's state, so a jitted step receives them as an
  argument instead of baking megabytes of bool constants into the executable.
  `jnp.where` (not a multiply) keeps the zero exact even for NaN/Inf updates.

  Args:
    frozen_masks: a pytree shaped like the params: a bool array (True = frozen)
      per leaf, or a Python `False` / all-False array (a scalar is fine) for leaves
      never frozen. `INQState.masks` is exactly this.

  Returns:
    An `optax.GradientTransformation`.

  Example:
    >>> tx = optax.chain(optax.add_decayed_weights(5e-4),
    ...                  optax.sgd(1e-3, momentum=0.9),
    ...                  inq_jax.optim.elementwise_freeze(state.masks))

  Reference: arXiv:1702.03044, Eq. 6.
  """

  def init_fn(params):
    # Copies, so that donating the optimizer state to a jitted step never
    # deletes the caller's masks (e.g. `INQState.masks`).
    masks = jax.tree.map(lambda m: jnp.array(m, bool, copy=True), frozen_masks)
    flat, treedef = leaves_with_paths(params)
    mflat, mtreedef = leaves_with_paths(masks)
    if treedef != mtreedef:
      raise ValueError(f"freeze: the masks' tree does not match the params' tree "
                       f"({len(mflat)} mask leaves, {len(flat)} params)")
    for (path, p), (_, m) in zip(flat, mflat):
      if m.ndim and m.shape != jnp.shape(p):
        raise ValueError(f"freeze: {path} has shape {jnp.shape(p)} but its mask has "
                         f"shape {m.shape}")
    return ElementwiseFreezeState(masks=masks)

  def update_fn(updates, state, params=None):
    del params
    updates = jax.tree.map(lambda u, m: jnp.where(m, jnp.zeros((), u.dtype), u),
                           updates, state.masks)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


__all__ = ["ElementwiseFreezeState", "elementwise_freeze"]
