"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) for JAX/Flax.

`inq_jax.quantize` holds the pure functions over parameter pytrees (`init`,
`advance`, `verify`), `inq_jax.optim.elementwise_freeze` the optax transform
that keeps quantized weights frozen, and `inq_jax.tree` the '/'-joined
parameter paths (`path_str`, `leaves_with_paths`, `select`) that the regexes
of `INQConfig` and `PruneConfig` match against.
"""

from inq_jax import optim
from inq_jax import quantize
from inq_jax import tree
from inq_jax.quantize import INQConfig
from inq_jax.quantize import INQState

__version__ = "0.1.0"

__all__ = ["INQConfig", "INQState", "optim", "quantize", "tree", "__version__"]
