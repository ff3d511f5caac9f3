"""Incremental Network Quantization as pure functions over parameter pytrees.

The front: `init` (codebooks from the pretrained params), `advance` (quantize
and freeze the next portion), `verify` (every frozen weight in its codebook)
and `inq_jax.optim.elementwise_freeze` (the optax transform, last in the chain,
that keeps frozen weights fixed while retraining). `init`, `advance` and
`verify` run eagerly, once per phase: call them outside `jax.jit`.

The public module Flax users import::

    from inq_jax import quantize as inq

    state = inq.init(params, inq.INQConfig(bits=5))    # codebooks from pretrained
    for _ in state.config.portions:
      params, state = inq.advance(params, state)       # quantize + freeze a portion
      ...retrain with optax.chain(base, inq_jax.optim.elementwise_freeze(state.masks))...
    inq.verify(params, state)                          # every frozen weight in P_l

The state holds a seal of its config and exponents and checksums of the frozen
weights, so `advance` and `verify` refuse a state that was edited, restored
with another config, or whose frozen weights moved. It checkpoints like any
Flax state: save `config.to_dict()` beside it and restore into
`abstract_state(params, config)`. `init` warns (`CodebookFitWarning`) when a
codebook rounds most of a layer to zero (`codebook_fit` gives the numbers),
`advance` when the weights' scale moved or when nothing was retrained between
two calls (`StaleParamsWarning`). With Flax NNX, `inq_jax.nnx` runs these on
the model's own params.

INQ on a pruned model (paper Sec. 3.4): prune with `inq_jax.prune` (its
`PruneConfig`, `prune_masks` and `pruned_count` are also re-exported here), then
`inq.init(params, config, pruned=keep)`: the pruned zeros stay frozen and the
portions count only the remaining weights.

Works on Linen `variables["params"]`, NNX `nnx.state(model, nnx.Param)` and plain
nested dicts, with float32, bfloat16 and float16 leaves (float64 with x64 on).

Per-layer bit widths: `INQConfig(bits=3, layer_bits={"^conv1/": 8})`.

Codebook arithmetic for scripts and reports: `exponent_bounds`,
`mse_exponent_bounds`, `n2_from_n1`, `round_to_pow2`, `in_codebook`,
`max_distinct_values`, `ZERO_CODEBOOK`.

Reference: A. Zhou et al., "Incremental Network Quantization: Towards Lossless
CNNs with Low-Precision Weights", ICLR 2017, arXiv:1702.03044.
"""

from inq_jax._codebook import ZERO_CODEBOOK
from inq_jax._codebook import exponent_bounds
from inq_jax._codebook import in_codebook
from inq_jax._codebook import max_distinct_values
from inq_jax._codebook import mse_exponent_bounds
from inq_jax._codebook import n2_from_n1
from inq_jax._codebook import round_to_pow2
from inq_jax._config import DEFAULT_INCLUDE
from inq_jax._config import INQConfig
from inq_jax._advance import advance
from inq_jax._advance import verify
from inq_jax._init import CodebookFit
from inq_jax._init import codebook_fit
from inq_jax._init import init
from inq_jax._partition import frozen_count
from inq_jax._partition import partition
from inq_jax._state import CodebookFitWarning
from inq_jax._state import INQState
from inq_jax._state import LeafSummary
from inq_jax._state import StaleParamsWarning
from inq_jax._state import abstract_state
from inq_jax.prune import PruneConfig
from inq_jax.prune import prune_masks
from inq_jax.prune import pruned_count

__all__ = [
    "init", "advance", "verify", "abstract_state", "codebook_fit", "CodebookFit",
    "CodebookFitWarning", "StaleParamsWarning", "INQConfig", "INQState", "LeafSummary",
    "DEFAULT_INCLUDE", "PruneConfig", "prune_masks", "pruned_count", "frozen_count",
    "partition", "ZERO_CODEBOOK", "exponent_bounds", "mse_exponent_bounds", "n2_from_n1",
    "round_to_pow2", "in_codebook", "max_distinct_values",
]
