"""LeNet (the Caffe variant, 20-50-500 units; Y. LeCun et al., 1998) for 28x28x1 images.

Its CPU speed-ups are options of the model, off unless a config turns them on
(`config.model_kwargs`), so what a run computes never depends on the host:

  cpu_matmul_conv  each conv as one matrix product (`cpu_conv`);
  cpu_select_pool  the 2x2 max pools with a gradient of three selects.

Both apply on the CPU backend only; on GPU and TPU, LeNet is XLA's convolution
and `nn.max_pool` whatever they say. Same params, and the same function to
float32 rounding, either way.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models import cpu_conv
from experiments.models import layers


@jax.custom_jvp
def select_max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), (2, 2)) for even H and W, as a reshape and a max."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@select_max_pool_2x2.defjvp
def _select_max_pool_2x2_jvp(primals, tangents):
  # The tangent of the first tap that holds the max, chosen by three selects:
  # linear in the tangent, so the gradient is three selects too. nn.max_pool's
  # gradient is XLA's select-and-scatter, and the reshape-and-max's a compare,
  # a count and a divide; both are slow enough on the CPU to matter in a small
  # net's train step. (On an exact tie the first tap gets the whole gradient,
  # a subgradient like the others'.)
  (x,), (dx,) = primals, tangents
  y = select_max_pool_2x2(x)
  b, h, w, c = x.shape
  taps = lambda a: [a.reshape(b, h // 2, 2, w // 2, 2, c)[:, :, i, :, j] for i in (0, 1)
                    for j in (0, 1)]
  xs, dxs = taps(x), taps(dx)
  dy = dxs[3]
  for k in (2, 1, 0):
    dy = jnp.where(xs[k] == y, dxs[k], dy)
  return y, dy


class LeNet(nn.Module):
  """LeNet for 28x28x1 inputs, with ReLUs; no BN. The CPU options: the module doc."""

  num_classes: int = 10
  dtype: layers.Dtype = jnp.float32
  cpu_matmul_conv: bool = False
  cpu_select_pool: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BN or dropout
    x = jnp.asarray(x, self.dtype)
    conv = functools.partial(  # cpu_conv's conv is XLA's own off the CPU backend
        nn.Conv, kernel_size=(5, 5), padding="VALID", dtype=self.dtype,
        conv_general_dilated=cpu_conv.conv_general_dilated if self.cpu_matmul_conv else None)
    pool = (select_max_pool_2x2 if self.cpu_select_pool and jax.default_backend() == "cpu"
            else lambda y: nn.max_pool(y, (2, 2), (2, 2)))
    # relu(max(.)) == max(relu(.)) exactly; pooling first gives relu a quarter
    # of the elements.
    x = conv(20, name="conv1")(x)
    x = nn.relu(pool(x))
    x = conv(50, name="conv2")(x)
    x = nn.relu(pool(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, dtype=self.dtype, name="fc1")(x))
    return layers.logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x))
