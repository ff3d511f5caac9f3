"""inq_jax: Incremental Network Quantization (Zhou et al., ICLR 2017) for JAX/Flax.

`inq_jax.quantize` holds the pure functions over parameter pytrees,
`inq_jax.optim.elementwise_freeze` the optax transform that keeps quantized weights frozen.
"""

from inq_jax import optim
from inq_jax import quantize
from inq_jax.quantize import INQConfig
from inq_jax.quantize import INQState

__version__ = "0.1.0"

__all__ = ["INQConfig", "INQState", "optim", "quantize", "__version__"]
