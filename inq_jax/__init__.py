"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) for JAX/Flax.

`inq_jax.quantize` holds the pure functions over parameter pytrees (`init`,
`advance`, `verify`), `inq_jax.optim.elementwise_freeze` the optax transform
that keeps quantized weights frozen, and `inq_jax.tree` the '/'-joined
parameter paths (`path_str`, `leaves_with_paths`, `select`) that the regexes
of `INQConfig` and `PruneConfig` match against. `inq_jax.nnx` runs INQ on a
Flax NNX model, `inq_jax.prune` prunes before INQ, `inq_jax.export` writes
and reads the b-bit `.inq` file, `inq_jax.shift` is the integer shift-add
reference; they are imported on first use (`inq_jax.nnx` needs flax).
"""

import importlib

from inq_jax import optim
from inq_jax import quantize
from inq_jax import tree
from inq_jax.quantize import INQConfig
from inq_jax.quantize import INQState

__version__ = "0.1.0"

# Imported when first named: `inq_jax.nnx` needs flax, which the core does not.
_LAZY = ("export", "nnx", "prune", "shift", "verify_file")

__all__ = ["INQConfig", "INQState", "optim", "quantize", "tree", "__version__", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"inq_jax.{name}")
  raise AttributeError(f"module 'inq_jax' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
