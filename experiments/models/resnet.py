"""The residual networks: ResNet-20 for CIFAR-sized inputs, torchvision's ResNet-18/50.

References:
  ResNet-20: K. He et al., "Deep Residual Learning", CVPR 2016, Sec. 4.2.
  ResNet-18/50: the torchvision layouts (`pretrained` imports their weights).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from experiments.models import layers


def _two_convs(x, features: int, stride: int, dtype, train: bool):
  """The residual branch of both basic blocks: 3x3 conv (stride), BN, ReLU, 3x3 conv, BN.

  Called inside a block's compact `__call__`, so its layers (conv1, bn1, conv2,
  bn2) are the block's own.
  """
  y = layers.conv(features, 3, stride, dtype, "conv1")(x)
  y = nn.relu(layers.batch_norm(train, dtype, "bn1")(y))
  y = layers.conv(features, 3, 1, dtype, "conv2")(y)
  return layers.batch_norm(train, dtype, "bn2")(y)


class CifarBasicBlock(nn.Module):
  """3x3-3x3 basic block with the parameter-free option-A shortcut."""

  features: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = _two_convs(x, self.features, self.stride, self.dtype, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      # Option A (He et al. 2016, Sec. 4.2): subsample, zero-pad the new
      # channels. Same subsampling grid as the stride-s conv with padding 1.
      x = x[:, ::self.stride, ::self.stride, :]
      extra = self.features - x.shape[-1]
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """ResNet-20 for CIFAR (He et al. 2016, Sec. 4.2): 6n+2 layers with n=3.

  Shortcuts are option A (identity; subsample + zero channel padding where the
  shape changes), as in the paper's CIFAR experiments, giving its 0.27M
  parameters (269,722 with 10 classes). It has no shortcut weights, so every
  conv/dense weight is a quantized 3x3 conv, the first conv or the classifier.
  Works for any input size (32x32x3 CIFAR, 28x28x1 Fashion-MNIST).
  """

  num_classes: int = 10
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(16, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, "bn1")(x))
    for stage, features in enumerate((16, 32, 64)):
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        x = CifarBasicBlock(features, stride, self.dtype,
                            name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return layers.logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3x3 (stride) - 3x3, 1x1 conv + BN downsample."""

  planes: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32

  expansion = 1  # a class constant, not a dataclass field

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = _two_convs(x, self.planes, self.stride, self.dtype, train)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = layers.conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = layers.batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (ResNet v1.5): 1x1 - 3x3 (stride) - 1x1 (x4)."""

  planes: int
  stride: int = 1
  dtype: layers.Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = self.planes * self.expansion
    y = layers.conv(self.planes, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(layers.batch_norm(train, self.dtype, "bn1")(y))
    y = layers.conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(layers.batch_norm(train, self.dtype, "bn2")(y))
    y = layers.conv(out, 1, 1, self.dtype, "conv3")(y)
    y = layers.batch_norm(train, self.dtype, "bn3")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = layers.conv(out, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = layers.batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(x + y)


class _TorchvisionResNet(nn.Module):
  """torchvision's ImageNet ResNet; subclasses set ``block`` and ``stage_sizes``.

  Submodules are named after torchvision's state_dict keys: ``conv1``, ``bn1``,
  ``layer{i}_{j}`` (torchvision ``layer{i}.{j}``) with ``conv1``/``bn1``/...,
  ``downsample_conv``/``downsample_bn`` (``downsample.0``/``downsample.1``) and
  ``fc``; see experiments/models/pretrained.py for the weight import.
  """

  num_classes: int = 1000
  dtype: layers.Dtype = jnp.float32

  # Class constants, deliberately unannotated so they are not dataclass fields.
  block = None
  stage_sizes = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = layers.conv(64, 7, 2, self.dtype, "conv1")(x)
    x = nn.relu(layers.batch_norm(train, self.dtype, "bn1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.pad(1))  # pads with -inf, as PyTorch
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(64 * 2 ** i, stride, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return layers.logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


class ResNet18(_TorchvisionResNet):
  """ResNet-18, torchvision layout; 11,689,512 params at 1000 classes."""

  block = BasicBlock
  stage_sizes = (2, 2, 2, 2)


class ResNet50(_TorchvisionResNet):
  """ResNet-50 v1.5 (stride on the 3x3 conv), torchvision layout; 25,557,032 params."""

  block = Bottleneck
  stage_sizes = (3, 4, 6, 3)
