"""A stride-1 'VALID' convolution as one matrix product, for XLA:CPU.

Matrix products are XLA:CPU's fast path, and its convolutions and their
gradients are not (LeNet's first conv has one input channel, a shape XLA:CPU
handles poorly), so `conv_general_dilated` computes each such conv as

    y = patches(x) @ kernel.reshape(kh * kw * c, f)

where `patches(x)` gathers every kh x kw x c input window into one row (a gather
with constant indices: one pass over memory, faster here than concatenating
kh * kw shifted slices). The kernel gradient is then `patches(x).T @ dy`, one
more product on the same patches; the input gradient stays XLA's own
(transposed) convolution, which beat both a scatter and a gather of the
patches' gradient. `experiments.benchmarks.vs_pytorch` measures it; the
numbers are in the README.

Mind x's producer: XLA fuses an elementwise producer into the gather and
recomputes it for each of the kh * kw reads of every element (LeNet's pooling
is a reduction, which it does not fuse there; `lax.optimization_barrier` does
not prevent it).

Same sums in another order: results agree with `lax.conv_general_dilated` to
float32 rounding (about 1e-6 relative), not bit for bit. So whether a model
uses it is part of its config (LeNet's `cpu_matmul_conv`), never decided from
the host, and a run resumed on another host computes what it computed before.

`conv_general_dilated` has `lax.conv_general_dilated`'s signature, so a model
uses it through `nn.Conv(..., conv_general_dilated=conv_general_dilated)`:
parameters, initializers and checkpoints are nn.Conv's. On other backends (GPU,
TPU), and for any convolution that is not stride-1 'VALID' NHWC/HWIO without
dilation or groups, it is `lax.conv_general_dilated` itself.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero

_NHWC_HWIO = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                     out_spec=(0, 3, 1, 2))


@functools.lru_cache(maxsize=None)
def _patch_indices(h: int, w: int, c: int, kh: int, kw: int) -> np.ndarray:
  """Flat indices into one [h, w, c] image: row (y, x) is window (y, x), in HWIO order."""
  y, x, i, j, k = np.ogrid[:h - kh + 1, :w - kw + 1, :kh, :kw, :c]
  return ((y + i) * w * c + (x + j) * c + k).reshape(-1, kh * kw * c).astype(np.int32)


def _patches(x: jax.Array, kh: int, kw: int) -> jax.Array:
  """[b, h, w, c] -> [b * oh * ow, kh * kw * c]: every window, as one row."""
  b, h, w, c = x.shape
  return x.reshape(b, h * w * c)[:, _patch_indices(h, w, c, kh, kw)].reshape(-1, kh * kw * c)


def _times(patches: jax.Array, kernel: jax.Array, x_shape) -> jax.Array:
  """patches @ kernel, as the [b, oh, ow, f] output of a conv of an x of x_shape."""
  kh, kw, c, f = kernel.shape
  b, h, w, _ = x_shape
  return (patches @ kernel.reshape(kh * kw * c, f)).reshape(b, h - kh + 1, w - kw + 1, f)


def _conv_xla(x, kernel):
  return lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=_NHWC_HWIO)


@jax.custom_jvp
def conv_valid_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'VALID' NHWC x HWIO convolution as patches @ kernel.

  Args:
    x: [b, h, w, c] input.
    kernel: [kh, kw, c, f].

  Returns:
    [b, h - kh + 1, w - kw + 1, f], as `lax.conv_general_dilated(x, kernel,
    (1, 1), 'VALID')` computes it (to float32 rounding).
  """
  return _times(_patches(x, *kernel.shape[:2]), kernel, x.shape)


@functools.partial(conv_valid_matmul.defjvp, symbolic_zeros=True)
def _conv_valid_matmul_jvp(primals, tangents):
  # Linear in each argument. The kernel's tangent goes through the same patches
  # (so its transpose, the kernel gradient, is patches.T @ dy); the input's
  # through XLA's convolution (so the input gradient is XLA's transposed
  # convolution, not a scatter). Zero tangents (the image, when only params are
  # differentiated) cost nothing.
  x, kernel = primals
  dx, dkernel = tangents
  patches = _patches(x, *kernel.shape[:2])
  y = _times(patches, kernel, x.shape)
  dy = jnp.zeros_like(y)
  if not isinstance(dkernel, SymbolicZero):
    dy = dy + _times(patches, dkernel, x.shape)
  if not isinstance(dx, SymbolicZero):
    dy = dy + _conv_xla(dx, kernel)
  return y, dy


def _is_plain_valid(x, kernel, window_strides, padding, lhs_dilation, rhs_dilation,
                    dimension_numbers, feature_group_count, batch_group_count):
  ones = (None, (1, 1), [1, 1])
  return (x.ndim == 4 and kernel.ndim == 4 and tuple(window_strides) == (1, 1)
          and padding in ("VALID", ((0, 0), (0, 0)), [(0, 0), (0, 0)])
          and lhs_dilation in ones and rhs_dilation in ones
          and lax.conv_dimension_numbers(x.shape, kernel.shape, dimension_numbers)
          == _NHWC_HWIO
          and feature_group_count == 1 and batch_group_count == 1)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated`, computed by `conv_valid_matmul` on the CPU backend.

  That is where `jax.default_backend()` (when traced) is the CPU, for a
  stride-1 'VALID' NHWC/HWIO convolution without dilation or groups, at
  default precision and result type. Anything else, and every convolution on
  GPU and TPU, is passed to `lax.conv_general_dilated`.

  Example:
    >>> conv = nn.Conv(20, (5, 5), padding="VALID",
    ...                conv_general_dilated=cpu_conv.conv_general_dilated)
  """
  if (jax.default_backend() == "cpu" and precision is None
      and preferred_element_type is None
      and _is_plain_valid(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                          dimension_numbers, feature_group_count, batch_group_count)):
    return conv_valid_matmul(lhs, rhs)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)
