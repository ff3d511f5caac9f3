"""Flax Linen image classifiers for the INQ experiments, and how a run builds one.

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

This file holds AlexNet, VGG16 and GoogLeNet; LeNet is in `lenet`, the
ResNets in `resnet`. References: AlexNet, VGG16, GoogLeNet: the torchvision
layouts, except GoogLeNet (see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from experiments.models import layers
from experiments.models.layers import adaptive_avg_pool  # noqa: F401  (the package's name)
from experiments.models.lenet import LeNet
from experiments.models.resnet import ResNet18, ResNet20, ResNet50

# ------------------------------------------------------------ AlexNet, VGG16


class AlexNet(nn.Module):
  """torchvision's single-tower AlexNet (no LRN, no BN); 61.1M params at 1000 classes.

  Dropout (p=0.5) before the first two classifier layers when ``train=True``:
  pass ``rngs={'dropout': key}``. Needs inputs of at least 63x63.
  """

  num_classes: int = 1000
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = lambda f, k, s, p, name: nn.Conv(f, (k, k), (s, s), padding=layers.pad(p),
                                            dtype=self.dtype,
                                            kernel_init=layers.conv_init, name=name)
    x = jnp.asarray(x, self.dtype)
    x = nn.max_pool(nn.relu(conv(64, 11, 4, 2, "conv1")(x)), (3, 3), (2, 2))
    x = nn.max_pool(nn.relu(conv(192, 5, 1, 2, "conv2")(x)), (3, 3), (2, 2))
    x = nn.relu(conv(384, 3, 1, 1, "conv3")(x))
    x = nn.relu(conv(256, 3, 1, 1, "conv4")(x))
    x = nn.max_pool(nn.relu(conv(256, 3, 1, 1, "conv5")(x)), (3, 3), (2, 2))
    x = adaptive_avg_pool(x, (6, 6))
    # torchvision flattens NCHW; the order only matters for weight import.
    return _fc_classifier(x, self.num_classes, self.dtype, train)


def _fc_classifier(x, num_classes: int, dtype: layers.Dtype, train: bool):
  """AlexNet's and VGG's head: dropout-fc6 4096-dropout-fc7 4096-fc8 (inside a compact call)."""
  x = x.reshape((x.shape[0], -1))
  x = nn.Dropout(0.5, deterministic=not train)(x)
  x = nn.relu(nn.Dense(4096, dtype=dtype, name="fc6")(x))
  x = nn.Dropout(0.5, deterministic=not train)(x)
  x = nn.relu(nn.Dense(4096, dtype=dtype, name="fc7")(x))
  return layers.logits(nn.Dense(num_classes, dtype=dtype, name="fc8")(x))


class VGG16(nn.Module):
  """VGG-16, configuration D (Simonyan & Zisserman 2015), no BN; torchvision layout.

  138.4M params at 1000 classes. Dropout (p=0.5) in the classifier when
  ``train=True`` (needs a 'dropout' rng). Needs inputs of at least 32x32; the
  7x7 adaptive average pool makes the classifier size independent of it.
  """

  num_classes: int = 1000
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = jnp.asarray(x, self.dtype)
    for stage, (features, convs) in enumerate(((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))):
      for i in range(convs):
        x = nn.Conv(features, (3, 3), padding=layers.pad(1), dtype=self.dtype,
                    kernel_init=layers.conv_init, name=f"conv{stage + 1}_{i + 1}")(x)
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
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride,) * 2,
                padding=layers.pad(self.kernel // 2), use_bias=not self.batch_norm,
                dtype=self.dtype, kernel_init=layers.conv_init, name="conv")(x)
    if self.batch_norm:
      x = layers.batch_norm(train, self.dtype, "bn")(x)
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
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    cbr = lambda f, k, name: ConvBN(f, k, 1, self.batch_norm, self.dtype, name=name)
    b1 = cbr(self.ch1x1, 1, "branch1")(x, train)
    b2 = cbr(self.ch3x3, 3, "branch2")(cbr(self.ch3x3red, 1, "branch2_reduce")(x, train), train)
    b3 = cbr(self.ch5x5, 5, "branch3")(cbr(self.ch5x5red, 1, "branch3_reduce")(x, train), train)
    b4 = nn.max_pool(x, (3, 3), (1, 1), padding=layers.pad(1))
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
  dtype: layers.Dtype = jnp.float32
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    cbr = lambda f, k, s, name: ConvBN(f, k, s, self.batch_norm, self.dtype, name=name)
    pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding=layers.pad(1))
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
    return layers.logits(nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x))


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


def get_model(name: str, num_classes: int, dtype: layers.Dtype = jnp.float32,
              **options) -> nn.Module:
  """The model called ``name`` (a key of ``MODELS``).

  Args:
    name: one of 'lenet', 'resnet20', 'alexnet', 'vgg16', 'googlenet',
      'resnet18', 'resnet50'.
    num_classes: size of the logits.
    dtype: computation dtype; parameters stay float32.
    **options: the model's own fields (e.g. LeNet's ``cpu_matmul_conv``).

  Raises:
    ValueError: for an unknown name or an option the model does not have.
  """
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
  fields = {f.name for f in dataclasses.fields(MODELS[name])
            if f.init and f.name not in ("parent", "name", "num_classes", "dtype")}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"model {name!r} has no option {', '.join(unknown)}; its options: "
                     f"{sorted(fields) or 'none'}")
  return MODELS[name](num_classes=num_classes, dtype=dtype, **options)


def from_config(config, num_classes: int) -> nn.Module:
  """The model of an experiment config: `config.model`, `.dtype` and `.model_kwargs`."""
  return get_model(config.model, num_classes, dtype=jnp.dtype(config.dtype),
                   **dict(config.get("model_kwargs") or {}))


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
