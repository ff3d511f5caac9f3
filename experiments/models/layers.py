"""Building blocks the networks share: initializers, padding, BatchNorm, the float32 head."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# He et al. (2015) init, as torchvision's ResNet/VGG use for convs: plain
# lecun-normal would shrink activations by sqrt(2) per ReLU layer, which stalls
# the deep BN-free nets (VGG16) when trained from scratch.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  # momentum 0.9 in Flax == momentum 0.1 in PyTorch; eps as in torchvision.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def pad(p: int):
  # Explicit symmetric padding, as PyTorch does. Flax's 'SAME' pads (0, 1) for a
  # stride-2 3x3 conv on even inputs, which would break torchvision parity.
  return ((p, p), (p, p))


def conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  """Bias-free conv (a BN follows) with PyTorch's padding kernel // 2."""
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=pad(kernel // 2),
                 use_bias=False, dtype=dtype, kernel_init=conv_init, name=name)


def logits(x):
  # Softmax/cross-entropy in float32 even when computing in bfloat16.
  return jnp.asarray(x, jnp.float32)


def adaptive_avg_pool(x: jax.Array, output_size: tuple[int, int]) -> jax.Array:
  """PyTorch's ``AdaptiveAvgPool2d`` on NHWC input.

  Output cell i averages input rows floor(i*H/out) .. ceil((i+1)*H/out) - 1,
  exactly as PyTorch does, so inputs smaller than ``output_size`` replicate
  (AlexNet/VGG at small test resolutions) and 224x224 inputs are pooled as in
  torchvision. Implemented as two small averaging matrices (static shapes).

  Args:
    x: [B, H, W, C].
    output_size: (out_h, out_w).

  Returns:
    [B, out_h, out_w, C].
  """

  def matrix(size, out):
    m = np.zeros((out, size), np.float32)
    for i in range(out):
      start, end = (i * size) // out, -((-(i + 1) * size) // out)
      m[i, start:end] = 1.0 / (end - start)
    return jnp.asarray(m, x.dtype)

  _, h, w, _ = x.shape
  if (h, w) == tuple(output_size):
    return x
  return jnp.einsum("oh,bhwc,pw->bopc", matrix(h, output_size[0]), x,
                    matrix(w, output_size[1]), precision=jax.lax.Precision.HIGHEST)
