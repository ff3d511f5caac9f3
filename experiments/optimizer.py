"""The optimizer of every stage and phase: its schedule, the base optimizer and the freeze."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from inq_jax import optim


def epoch_steps(epochs: float, steps_per_epoch: int) -> list:
  """Steps in each (possibly partial, last) epoch of a stage of `epochs` epochs.

  Fractional epochs let a study give every INQ phase, say, 0.4 epochs: the
  last chunk is the first part of a fresh shuffle, and resuming works per chunk.
  """
  total = int(round(epochs * steps_per_epoch))
  full, rest = divmod(total, steps_per_epoch)
  return [steps_per_epoch] * full + ([rest] if rest else [])


def learning_rate(stage_config, steps_per_epoch: int, epochs: float):
  """The schedule of one stage or phase (`config.baseline`, `.prune` or `.inq`)."""
  base_lr = stage_config.learning_rate
  total = max(1, sum(epoch_steps(epochs, steps_per_epoch)))
  if stage_config.lr_schedule == "cosine":
    schedule = optax.cosine_decay_schedule(base_lr, total)
  elif stage_config.lr_schedule == "step":
    every = max(1, int(steps_per_epoch * stage_config.step_epochs))
    schedule = optax.piecewise_constant_schedule(
        base_lr, {every * i: stage_config.step_factor for i in range(1, total // every + 1)})
  else:
    schedule = optax.constant_schedule(base_lr)
  warmup = int(stage_config.warmup_epochs * steps_per_epoch)
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
  return schedule


def base_optimizer(config, schedule) -> optax.GradientTransformation:
  """SGD (weight decay in the loss, momentum) or AdamW, as `config.optimizer` says."""
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum or None,
                                 nesterov=config.nesterov))
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_optimizer(config, schedule) -> optax.GradientTransformationExtraArgs:
  """`named_chain(base=base_optimizer, freeze=elementwise_freeze())`.

  The freeze is last, after weight decay and momentum, so frozen weights get an
  update of exactly zero (paper Eq. 6). It keeps no state: the train step
  passes the run state's own masks with every update (`frozen_masks=`). Named
  parts let a phase carry the base optimizer's state (`opt_state["base"]`).
  """
  return optax.named_chain(("base", base_optimizer(config, schedule)),
                           ("freeze", optim.elementwise_freeze()))


def reset_count(base_state):
  """The base optimizer's state with its step count at 0 (the schedule restarts)."""
  try:
    return optax.tree_utils.tree_set(base_state, count=jnp.zeros([], jnp.int32))
  except KeyError:  # a constant learning rate keeps no count
    return base_state
