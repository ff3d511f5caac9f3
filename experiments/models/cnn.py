"""Flax Linen image classifiers for the INQ experiments.

Every model is called as ``model.apply(variables, x, train=...)`` with NHWC
float images and returns float32 logits ``[B, num_classes]``. ``dtype`` is the
computation dtype (e.g. bfloat16); parameters and BatchNorm statistics are
always float32, which is what INQ quantizes and what checkpoints hold.

Naming contract: every conv and dense weight is a param called ``kernel`` (the
Flax default), biases are ``bias``, BatchNorm has params ``scale``/``bias`` and
``mean``/``var`` in the ``batch_stats`` collection. The quantizer selects its
layers with the regex ``(^|/)kernel$`` over '/'-joined paths, so a weight under
any other name would silently stay float.

Models with dropout (AlexNet, VGG16, GoogLeNet) need a ``'dropout'`` rng when
``train=True``: ``model.apply(..., train=True, rngs={'dropout': key})``.

References:
  LeNet: Y. LeCun et al., 1998 (the Caffe "LeNet" variant, 20-50-500 units).
  ResNet-20: K. He et al., "Deep Residual Learning", CVPR 2016, Sec. 4.2.
  AlexNet, VGG16, GoogLeNet, ResNet-18/50: the torchvision layouts, except
  GoogLeNet (see its docstring).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import cpu_conv

Dtype = Any

# He et al. (2015) init, as torchvision's ResNet/VGG use for convs: plain
# lecun-normal would shrink activations by sqrt(2) per ReLU layer, which stalls
# the deep BN-free nets (VGG16) when trained from scratch.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _batch_norm(train: bool, dtype: Dtype, name: str) -> nn.BatchNorm:
  # momentum 0.9 in Flax == momentum 0.1 in PyTorch; eps as in torchvision.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, name=name)


def _pad(p: int):
  # Explicit symmetric padding, as PyTorch does. Flax's 'SAME' pads (0, 1) for a
  # stride-2 3x3 conv on even inputs, which would break torchvision parity.
  return ((p, p), (p, p))


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, name: str) -> nn.Conv:
  """Bias-free conv (a BN follows) with PyTorch's padding kernel // 2."""
  return nn.Conv(features, (kernel, kernel), (stride, stride), padding=_pad(kernel // 2),
                 use_bias=False, dtype=dtype, kernel_init=_conv_init, name=name)


def _logits(x):
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


# --------------------------------------------------------------------- LeNet


@jax.custom_jvp
def _max_pool_2x2(x):
  """nn.max_pool(x, (2, 2), (2, 2)) for even H and W, as a reshape and a max."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@_max_pool_2x2.defjvp
def _max_pool_2x2_jvp(primals, tangents):
  # The tangent of the first tap that holds the max, chosen by three selects:
  # linear in the tangent, so the gradient is three selects too. nn.max_pool's
  # gradient is XLA's select-and-scatter, and the reshape-and-max's a compare,
  # a count and a divide; both are slow enough on the CPU to matter in a small
  # net's train step. (On an exact tie the first tap gets the whole gradient,
  # a subgradient like the others'.)
  (x,), (dx,) = primals, tangents
  y = _max_pool_2x2(x)
  b, h, w, c = x.shape
  taps = lambda a: [a.reshape(b, h // 2, 2, w // 2, 2, c)[:, :, i, :, j] for i in (0, 1)
                    for j in (0, 1)]
  xs, dxs = taps(x), taps(dx)
  dy = dxs[3]
  for k in (2, 1, 0):
    dy = jnp.where(xs[k] == y, dxs[k], dy)
  return y, dy


class LeNet(nn.Module):
  """LeNet (Caffe variant) for 28x28x1 inputs, with ReLUs; no BN.

  ``cpu_matmul_conv``: on the CPU backend, with two or more cores, compute the
  convs as matrix products (`cpu_conv`, the default); False keeps XLA's
  convolution everywhere (the benchmark's reference). Same params, and the
  same function to float32 rounding, either way.
  """

  num_classes: int = 10
  dtype: Dtype = jnp.float32
  cpu_matmul_conv: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BN or dropout
    x = jnp.asarray(x, self.dtype)
    # On a multi-core CPU each conv is one matrix product (see cpu_conv).
    conv = functools.partial(
        nn.Conv, kernel_size=(5, 5), padding="VALID", dtype=self.dtype,
        conv_general_dilated=cpu_conv.conv_general_dilated if self.cpu_matmul_conv else None)
    # relu(max(.)) == max(relu(.)) exactly; pooling first gives relu a quarter
    # of the elements.
    x = conv(20, name="conv1")(x)
    x = nn.relu(_max_pool_2x2(x))
    x = conv(50, name="conv2")(x)
    x = nn.relu(_max_pool_2x2(x))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(500, dtype=self.dtype, name="fc1")(x))
    return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc2")(x))


# ------------------------------------------------------------------ ResNet-20


class CifarBasicBlock(nn.Module):
  """3x3-3x3 basic block with the parameter-free option-A shortcut."""

  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = _conv(self.features, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.features, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(train, self.dtype, "bn2")(y)
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
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = _conv(16, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
    for stage, features in enumerate((16, 32, 64)):
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        x = CifarBasicBlock(features, stride, self.dtype,
                            name=f"layer{stage + 1}_{block}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


# ------------------------------------------------------------ AlexNet, VGG16


class AlexNet(nn.Module):
  """torchvision's single-tower AlexNet (no LRN, no BN); 61.1M params at 1000 classes.

  Dropout (p=0.5) before the first two classifier layers when ``train=True``:
  pass ``rngs={'dropout': key}``. Needs inputs of at least 63x63.
  """

  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), (s, s), padding=_pad(p), dtype=self.dtype,
                                            kernel_init=_conv_init, name=name)
    x = jnp.asarray(x, self.dtype)
    x = nn.max_pool(nn.relu(conv(64, 11, 4, 2, "conv1")(x)), (3, 3), (2, 2))
    x = nn.max_pool(nn.relu(conv(192, 5, 1, 2, "conv2")(x)), (3, 3), (2, 2))
    x = nn.relu(conv(384, 3, 1, 1, "conv3")(x))
    x = nn.relu(conv(256, 3, 1, 1, "conv4")(x))
    x = nn.max_pool(nn.relu(conv(256, 3, 1, 1, "conv5")(x)), (3, 3), (2, 2))
    x = adaptive_avg_pool(x, (6, 6))
    # torchvision flattens NCHW; the order only matters for weight import.
    return _fc_classifier(x, self.num_classes, self.dtype, train)


def _fc_classifier(x, num_classes: int, dtype: Dtype, train: bool):
  """AlexNet's and VGG's head: dropout-fc6 4096-dropout-fc7 4096-fc8 (inside a compact call)."""
  x = x.reshape((x.shape[0], -1))
  x = nn.Dropout(0.5, deterministic=not train)(x)
  x = nn.relu(nn.Dense(4096, dtype=dtype, name="fc6")(x))
  x = nn.Dropout(0.5, deterministic=not train)(x)
  x = nn.relu(nn.Dense(4096, dtype=dtype, name="fc7")(x))
  return _logits(nn.Dense(num_classes, dtype=dtype, name="fc8")(x))


class VGG16(nn.Module):
  """VGG-16, configuration D (Simonyan & Zisserman 2015), no BN; torchvision layout.

  138.4M params at 1000 classes. Dropout (p=0.5) in the classifier when
  ``train=True`` (needs a 'dropout' rng). Needs inputs of at least 32x32; the
  7x7 adaptive average pool makes the classifier size independent of it.
  """

  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    for stage, (features, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
      for i in range(convs):
        x = nn.Conv(features, (3, 3), padding=_pad(1), dtype=self.dtype,
                    kernel_init=_conv_init, name=f"conv{stage + 1}_{i + 1}")(x)
        x = nn.relu(x)
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = adaptive_avg_pool(x, (7, 7))
    return _fc_classifier(x, self.num_classes, self.dtype, train)


# ------------------------------------------------------------------ GoogLeNet


class ConvBN(nn.Module):
  """Conv (+ BN) + ReLU; with ``batch_norm=False`` a biased conv + ReLU."""

  features: int
  kernel: int
  stride: int = 1
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride,) * 2,
                padding=_pad(self.kernel // 2), use_bias=not self.batch_norm,
                dtype=self.dtype, kernel_init=_conv_init, name="conv")(x)
    if self.batch_norm:
      x = _batch_norm(train, self.dtype, "bn")(x)
    return nn.relu(x)


class Inception(nn.Module):
  """Inception module: 1x1 | 1x1-3x3 | 1x1-5x5 | 3x3 maxpool-1x1, concatenated."""

  ch1x1: int
  ch3x3red: int
  ch3x3: int
  ch5x5red: int
  ch5x5: int
  pool_proj: int
  batch_norm: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    cbr = lambda f, k, name: ConvBN(f, k, 1, self.batch_norm, self.dtype, name=name)
    b1 = cbr(self.ch1x1, 1, "branch1")(x, train)
    b2 = cbr(self.ch3x3, 3, "branch2")(cbr(self.ch3x3red, 1, "branch2_reduce")(x, train), train)
    b3 = cbr(self.ch5x5, 5, "branch3")(cbr(self.ch5x5red, 1, "branch3_reduce")(x, train), train)
    b4 = nn.max_pool(x, (3, 3), (1, 1), padding=_pad(1))
    b4 = cbr(self.pool_proj, 1, "branch4")(b4, train)
    return jnp.concatenate([b1, b2, b3, b4], axis=-1)


# (name, #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj): Szegedy et al.
# 2015, Table 1. A None entry is a 3x3/2 max pool.
GOOGLENET_INCEPTIONS = (
    ("inception3a", 64, 96, 128, 16, 32, 32),
    ("inception3b", 128, 128, 192, 32, 96, 64),
    None,
    ("inception4a", 192, 96, 208, 16, 48, 64),
    ("inception4b", 160, 112, 224, 24, 64, 64),
    ("inception4c", 128, 128, 256, 24, 64, 64),
    ("inception4d", 112, 144, 288, 32, 64, 64),
    ("inception4e", 256, 160, 320, 32, 128, 128),
    None,
    ("inception5a", 256, 160, 320, 32, 128, 128),
    ("inception5b", 384, 192, 384, 48, 128, 128),
)


class GoogLeNet(nn.Module):
  """GoogLeNet / Inception v1 (Szegedy et al. 2015, Table 1).

  Differences from the paper, stated because they matter for comparisons:
    * BatchNorm after every conv by default (``batch_norm=True``, convs then
      have no bias), as torchvision's googlenet does, so the net trains from
      scratch without the paper's auxiliary losses. ``batch_norm=False`` gives
      the paper's BN-free net (biased convs).
    * No LRN layers and no auxiliary classifiers (they only matter for
      training, and the paper discards them at inference).
    * Unlike torchvision, the third branch is a real 5x5 conv, as in the paper
      (torchvision uses 3x3 there), so torchvision weights do not map onto it.
    * Max pools use symmetric padding 1 (torchvision uses ceil_mode); spatial
      sizes match the paper's at 224x224 (112, 56, 28, 14, 7).
    * Global average pooling instead of a fixed 7x7 one, so any input of at
      least 32x32 works.
  Dropout p=0.4 before the classifier when ``train=True`` (needs a 'dropout'
  rng). 7,005,832 params with BN and 1000 classes.
  """

  num_classes: int = 1000
  dtype: Dtype = jnp.float32
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    cbr = lambda f, k, s, name: ConvBN(f, k, s, self.batch_norm, self.dtype, name=name)
    pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding=_pad(1))
    x = jnp.asarray(x, self.dtype)
    x = pool(cbr(64, 7, 2, "conv1")(x, train))
    x = cbr(64, 1, 1, "conv2")(x, train)
    x = pool(cbr(192, 3, 1, "conv3")(x, train))
    for spec in GOOGLENET_INCEPTIONS:
      if spec is None:
        x = pool(x)
      else:
        x = Inception(*spec[1:], batch_norm=self.batch_norm, dtype=self.dtype,
                      name=spec[0])(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(0.4, deterministic=not train)(x)
    return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


# ------------------------------------------------------- torchvision ResNets


class BasicBlock(nn.Module):
  """torchvision ``BasicBlock``: 3x3 (stride) - 3x3, 1x1 conv + BN downsample."""

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  expansion = 1  # a class constant, not a dataclass field

  @nn.compact
  def __call__(self, x, train: bool = False):
    y = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.planes, 3, 1, self.dtype, "conv2")(y)
    y = _batch_norm(train, self.dtype, "bn2")(y)
    if self.stride != 1 or x.shape[-1] != self.planes:
      x = _conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = _batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck`` (ResNet v1.5): 1x1 - 3x3 (stride) - 1x1 (x4)."""

  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool = False):
    out = self.planes * self.expansion
    y = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
    y = nn.relu(_batch_norm(train, self.dtype, "bn1")(y))
    y = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(y)
    y = nn.relu(_batch_norm(train, self.dtype, "bn2")(y))
    y = _conv(out, 1, 1, self.dtype, "conv3")(y)
    y = _batch_norm(train, self.dtype, "bn3")(y)
    if self.stride != 1 or x.shape[-1] != out:
      x = _conv(out, 1, self.stride, self.dtype, "downsample_conv")(x)
      x = _batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(x + y)


class _TorchvisionResNet(nn.Module):
  """torchvision's ImageNet ResNet; subclasses set ``block`` and ``stage_sizes``.

  Submodules are named after torchvision's state_dict keys: ``conv1``, ``bn1``,
  ``layer{i}_{j}`` (torchvision ``layer{i}.{j}``) with ``conv1``/``bn1``/...,
  ``downsample_conv``/``downsample_bn`` (``downsample.0``/``downsample.1``) and
  ``fc``; see experiments/pretrained.py for the weight import.
  """

  num_classes: int = 1000
  dtype: Dtype = jnp.float32

  # Class constants, deliberately unannotated so they are not dataclass fields.
  block = None
  stage_sizes = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    x = _conv(64, 7, 2, self.dtype, "conv1")(x)
    x = nn.relu(_batch_norm(train, self.dtype, "bn1")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(1))  # pads with -inf, as PyTorch
    for i, blocks in enumerate(self.stage_sizes):
      for j in range(blocks):
        stride = 2 if i > 0 and j == 0 else 1
        x = self.block(64 * 2 ** i, stride, self.dtype, name=f"layer{i + 1}_{j}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return _logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


class ResNet18(_TorchvisionResNet):
  """ResNet-18, torchvision layout; 11,689,512 params at 1000 classes."""

  block = BasicBlock
  stage_sizes = (2, 2, 2, 2)


class ResNet50(_TorchvisionResNet):
  """ResNet-50 v1.5 (stride on the 3x3 conv), torchvision layout; 25,557,032 params."""

  block = Bottleneck
  stage_sizes = (3, 4, 6, 3)


# ------------------------------------------------------------------ registry

MODELS: dict[str, Callable[..., nn.Module]] = {
    "lenet": LeNet,
    "resnet20": ResNet20,
    "alexnet": AlexNet,
    "vgg16": VGG16,
    "googlenet": GoogLeNet,
    "resnet18": ResNet18,
    "resnet50": ResNet50,
}


def get_model(name: str, num_classes: int, dtype: Dtype = jnp.float32) -> nn.Module:
  """The model called ``name`` (a key of ``MODELS``).

  Args:
    name: one of 'lenet', 'resnet20', 'alexnet', 'vgg16', 'googlenet',
      'resnet18', 'resnet50'.
    num_classes: size of the logits.
    dtype: computation dtype; parameters stay float32.

  Raises:
    ValueError: for an unknown name.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
  return MODELS[name](num_classes=num_classes, dtype=dtype)


def init_variables(model: nn.Module, input_shape: Sequence[int], rng) -> dict:
  """Initial variables of ``model`` for NHWC inputs of ``input_shape``.

  Init runs under ``jax.jit`` so the random kernels are drawn by one compiled
  program instead of op by op (seconds instead of tens of seconds for VGG16 on
  CPU). BN models are initialised in eval mode, so no 'dropout' rng is needed.

  Args:
    model: a Flax Linen module from this file.
    input_shape: e.g. (1, 28, 28, 1); the batch size does not affect params.
    rng: a JAX PRNG key, or an int seed.

  Returns:
    A dict with 'params' and, for models with BatchNorm, 'batch_stats'.
  """
  if isinstance(rng, int):
    rng = jax.random.key(rng)
  x = jnp.zeros(tuple(input_shape), jnp.float32)
  init = jax.jit(lambda key: model.init({"params": key}, x, train=False))
  # XLA:CPU spends most of this compile on one threefry kernel per distinct
  # weight shape; the non-partitionable threefry compiles much faster. Init is
  # unsharded (the trainer replicates it afterwards), so partitionability buys
  # nothing here.
  # Values stay a pure function of `rng`.
  flag = getattr(jax, "threefry_partitionable", None)
  with flag(False) if flag is not None else contextlib.nullcontext():
    variables = init(rng)
  return dict(variables)
