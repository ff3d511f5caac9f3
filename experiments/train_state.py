"""The state of a run, as one pytree: what a checkpoint holds and a resume needs."""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

from inq_jax import prune
from inq_jax import quantize

# TrainState.stage: where a run stands; a run moves through them in this order.
BASELINE, PRUNE, INQ, DONE = 0, 1, 2, 3
STAGE_NAMES = {BASELINE: "baseline", PRUNE: "prune", INQ: "inq", DONE: "done"}


@flax.struct.dataclass
class TrainState:
  """The state of a run: restoring it is all a resume needs.

  Attributes:
    step: global train step (it seeds dropout).
    params, batch_stats: the model's variables ({} batch_stats without BN).
    opt_state: the state of `optimizer.make_optimizer`'s chain, a dict with the
      base optimizer's state under "base" (the freeze under "freeze" keeps none).
    inq_state: the `INQState`, None until INQ starts: its codebooks come from
      the weights the baseline (and the pruning) leave.
    keep: the pruning's keep masks (True = kept), shaped as `prune.prune_masks`
      makes them (an array for every weight INQ selects, a scalar True for the
      rest); all True until something is pruned, and so in a run that does
      not prune.
    stage: BASELINE, PRUNE, INQ or DONE.
    phase: within PRUNE, the pruning steps applied; within INQ, the portions
      quantized (`inq_state.step`); 0 when the stage has applied none yet.
    epoch: epochs trained since the last pruning step or portion (in BASELINE,
      since the start).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  inq_state: Optional[quantize.INQState]
  keep: Any
  stage: jax.Array
  phase: jax.Array
  epoch: jax.Array

  def at(self, stage: int, phase: int = 0, epoch: int = 0) -> "TrainState":
    return self.replace(stage=jnp.int32(stage), phase=jnp.int32(phase),
                        epoch=jnp.int32(epoch))

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def frozen_masks(self):
    """What the optimizer must not move, shaped like the params (True = frozen).

    The INQ masks once INQ has started (they include the pruned weights), the
    pruned weights before. Computed from the state's own fields, inside the
    jitted step, so the masks live in one place and are never constants of the
    compiled program.
    """
    if self.inq_state is not None:
      return self.inq_state.masks
    return prune.frozen(self.keep)
