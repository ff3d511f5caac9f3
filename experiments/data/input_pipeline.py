"""Datasets for the experiments: Fashion-MNIST, CIFAR-10, ImageNet, without TensorFlow.

`get_dataset(config.dataset)` returns a `Dataset` whose batches are numpy
arrays of uint8 images, as stored: they go to the device as they are (4x fewer
bytes than float32) and the jitted step normalizes them there with
`Dataset.normalization`, the usual per-dataset (mean, std) (`steps.prepare_images`):

  train_batches(batch_size, epoch, seed)  {'image' u8 [b,H,W,C], 'label' i32 [b]}
  test_batches(batch_size)                same plus 'mask' bool [b]

`batch_size` is global; each process gets its own b = batch_size / processes
slice of every global batch. The order and the augmentation of epoch `e` are a
pure function of (seed, e), and independent of the number of processes, so a
run that is killed and resumed at epoch `e` sees exactly the same batches.

Storage: TFDS datasets prepared as array_record in `data_dir`, read with
`tfds.data_source` (random access, no TensorFlow). Fashion-MNIST and CIFAR-10
are loaded into memory once as uint8 and cached as an .npz next to the prepared
files, since decoding every record through TFDS again each run is slow. ImageNet streams:
grain worker processes (`dataset.workers`, default every CPU) read the JPEGs,
decode, crop and resize them and hand over whole uint8 batches
(`experiments/data/imagenet.py`); nothing per image runs in the main process.

Where the data comes from: `builders` (which prepares it where it can).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from typing import Any, Iterator, Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from experiments.data import builders
from experiments.data import imagenet
from experiments.errors import ConfigError
# Raised by get_dataset, and named in its errors: this module's names too.
from experiments.data.builders import DatasetNotFoundError, IMAGENET_TARS  # noqa: F401

# (mean, std) per channel, of images scaled to [0, 1].
NORMALIZATION = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
_READ_CHUNK = 4096  # examples per __getitems__ call while filling the cache


# ----------------------------------------------------------------- sources


_CROP_PADDING = {"cifar10": 4, "fashion_mnist": 2}


class _ArraySource:
  """A split held in memory as uint8 images [n, H, W, C] and int32 labels [n]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str):
    self.images, self.labels, self.name = images, labels, name

  def __len__(self) -> int:
    return len(self.labels)

  def load(self, indices: np.ndarray, rng: Optional[np.random.Generator],
           local: slice) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and labels of indices[local]; rng (train only) augments.

    Augmentation parameters are drawn for the whole global batch `indices` and
    then sliced, so an example's crop does not depend on the process count.
    """
    images = self.images[indices[local]]
    if rng is not None:
      # Random crop of the zero-padded image (pad 4 on 32x32 CIFAR, 2 on 28x28
      # Fashion-MNIST) and a horizontal flip: shifts and mirror images of
      # objects and garments are the same class.
      n, pad = len(indices), _CROP_PADDING[self.name]
      h, w = images.shape[1:3]
      offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))[local]
      flips = (rng.random(n) < 0.5)[local]
      padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      # One gather for the whole batch (no per-image Python): the crop's rows
      # and columns per image, the columns reversed where it is mirrored.
      rows = offsets[:, :1] + np.arange(h)
      cols = offsets[:, 1:] + np.arange(w)
      cols = np.where(flips[:, None], cols[:, ::-1], cols)
      images = padded[np.arange(len(padded))[:, None, None], rows[:, :, None],
                      cols[:, None, :]]
    return images, self.labels[indices[local]]


class _ImageNetSource:
  """An ImageNet split read on demand (JPEG bytes) by worker processes."""

  def __init__(self, data_source, image_size: int, workers: int):
    self.data_source, self.image_size, self.workers = data_source, image_size, workers

  def __len__(self) -> int:
    return len(self.data_source)

  def batches(self, indices: np.ndarray, local: slice, **kwargs) -> Iterator[dict]:
    source = imagenet.BatchSource(self.data_source, indices, (local.start, local.stop),
                                  self.image_size, **kwargs)
    return imagenet.iterate(source, self.workers)


# ----------------------------------------------------------------- dataset


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A train and a test split, as batches of uint8 numpy images and int32 labels.

  Attributes:
    name: 'fashion_mnist', 'cifar10' or 'imagenet2012'.
    num_classes: number of labels.
    image_shape: (H, W, C) of every batch image.
    train_size: examples in the train split.
    test_size: examples in the test split.
    augment: whether `train_batches` augments (cifar10: pad-4 random crop + flip;
      fashion_mnist: pad-2 random crop + flip; imagenet2012: random-resized-crop
      + flip).
  """

  name: str
  num_classes: int
  image_shape: tuple
  train_size: int
  test_size: int
  augment: bool = False
  train_source: Any = dataclasses.field(default=None, repr=False, compare=False)
  test_source: Any = dataclasses.field(default=None, repr=False, compare=False)
  train_split: str = "train"

  def steps_per_epoch(self, batch_size: int) -> int:
    """Full global batches per epoch; the remainder of the shuffled split is dropped.

    Raises:
      ConfigError if not one batch fits in the train split (an epoch would
      train nothing).
    """
    steps = _full_batches(self.train_size, batch_size)
    if steps == 0 and batch_size > 0:
      raise ConfigError("batch_size", batch_size, (
          f"batch_size={batch_size} is larger than the train split ({self.train_size} "
          f"examples in {self.train_split!r})"),
          f"set --config.batch_size to at most {self.train_size}, or a larger "
          "--config.dataset.train_split", shows_value=True)
    return steps

  def train_batches(self, batch_size: int, epoch: int, seed: int,
                    augment: Optional[bool] = None) -> Iterator[dict]:
    """This process's slice of each global batch of epoch `epoch`.

    Args:
      batch_size: global batch size (a multiple of jax.process_count()).
      epoch: epoch number; every epoch is a different shuffle.
      seed: with `epoch`, determines the order and augmentation completely.
      augment: overrides `self.augment` (False gives plain train images, e.g.
        to evaluate on the train split).

    Yields:
      steps_per_epoch(batch_size) dicts {'image': uint8 [b, H, W, C],
      'label': int32 [b]}, b = batch_size // jax.process_count().
    """
    local = self._local_slice(batch_size)
    augment = self.augment if augment is None else augment
    seed = int(seed) % 2**64  # SeedSequence entropy must be >= 0
    order = np.random.default_rng([seed, int(epoch), 0]).permutation(self.train_size)
    steps = self.steps_per_epoch(batch_size)

    if isinstance(self.train_source, _ImageNetSource):
      return self.train_source.batches(
          order[:steps * batch_size].reshape(steps, batch_size), local, seed=seed,
          epoch=int(epoch), augment=augment)

    def batch(step):
      indices = order[step * batch_size:(step + 1) * batch_size]
      rng = np.random.default_rng([seed, int(epoch), step + 1]) if augment else None
      images, labels = self.train_source.load(indices, rng, local)
      return {"image": images, "label": labels.astype(np.int32)}

    return (batch(step) for step in range(steps))

  def test_batches(self, batch_size: int) -> Iterator[dict]:
    """Every test example once, in order; the last batch padded, with 'mask' False there.

    With several processes, global batch k is [k*B, (k+1)*B) and each process
    gets its slice; every process yields the same number of batches.
    """
    local = self._local_slice(batch_size)
    b = local.stop - local.start
    steps = -(-self.test_size // batch_size)
    if isinstance(self.test_source, _ImageNetSource):
      indices = np.arange(steps * batch_size)
      indices[self.test_size:] = -1  # padding, masked out
      return self.test_source.batches(indices.reshape(steps, batch_size), local, mask=True)

    def batch(step):
      indices = np.arange(step * batch_size, min((step + 1) * batch_size, self.test_size))
      real = len(indices[local])
      image = np.zeros((b,) + tuple(self.image_shape), np.uint8)
      label = np.zeros((b,), np.int32)
      if real:
        images, labels = self.test_source.load(indices, None, local)
        image[:real], label[:real] = images, labels
      return {"image": image, "label": label, "mask": np.arange(b) < real}

    return (batch(step) for step in range(steps))

  def _local_slice(self, batch_size: int) -> slice:
    count, index = jax.process_count(), jax.process_index()
    if batch_size <= 0 or batch_size % count:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the "
                       f"{count} processes")
    b = batch_size // count
    return slice(index * b, (index + 1) * b)

  @property
  def normalization(self) -> tuple:
    """((mean,), (std,)) per channel of images scaled to [0, 1]; applied on the device."""
    return NORMALIZATION[self.name]

  def normalize(self, images: np.ndarray) -> np.ndarray:
    """float32 normalized images on the host, for tools that compute there."""
    return imagenet.normalize_host(images, self.normalization)


# ----------------------------------------------------------------- loading


def get_dataset(config: ml_collections.ConfigDict) -> Dataset:
  """The dataset `config` (the `config.dataset` block) describes.

  Fields (all but `name` optional): name, data_dir (TFDS data dir, None = TFDS
  default), manual_dir, train_split ('train'), test_split ('test'), augment
  (False), image_size (224, imagenet2012 only), workers (imagenet2012 only:
  decoding worker processes, None = every CPU, 0 = in this process).

  Raises:
    DatasetNotFoundError: the data is not prepared and cannot be prepared here.
    fashion_mnist_idx.BadIdxFileError: a Fashion-MNIST IDX file is corrupt.
    ConfigError: an unknown dataset name, a split the dataset lacks or one
      that selects no example, a bad `workers`.
  """
  workers = _workers(config.get("workers", None))  # a bad setting first, before any reading
  name, builder = builders.builder(config)
  train_split = config.get("train_split", "train")
  test_split = config.get("test_split", "test")
  for key, split in (("train_split", train_split), ("test_split", test_split)):
    check_split(builder, key, split)
  augment = bool(config.get("augment", False))
  num_classes = builder.info.features["label"].num_classes

  if name == "imagenet2012":
    size = int(config.get("image_size", 224))
    workers = imagenet.workers_default(workers)
    # Undecoded: the workers decode (and can decode JPEGs at reduced scale).
    train, test = (_ImageNetSource(builder.as_data_source(
        split=split, decoders={"image": tfds.decode.SkipDecoding()}), size, workers)
                   for split in (train_split, test_split))
    image_shape = (size, size, 3)
  else:
    train, test = (_ArraySource(*_load_split(builder, split), name)
                   for split in (train_split, test_split))
    image_shape = tuple(train.images.shape[1:])
  for key, split, source in (("train_split", train_split, train), ("test_split", test_split,
                                                                  test)):
    if not len(source):  # what the metadata could not tell
      raise ConfigError(f"dataset.{key}", split, f"{split!r} selects no example of "
                        f"{builder.name}", shows_value=True)
  logging.info("%s (%s): %s %d examples, %s %d examples, classes %d, images %s",
               name, builder.name, train_split, len(train), test_split, len(test),
               num_classes, image_shape)
  return Dataset(name=name, num_classes=num_classes, image_shape=image_shape,
                 train_size=len(train), test_size=len(test), augment=augment,
                 train_source=train, test_source=test, train_split=train_split)


def _workers(value):
  """`dataset.workers` as given (None: one per CPU), refused unless an int >= 0."""
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
    raise ConfigError("dataset.workers", value, "must be an int >= 0 (0: decode in this "
                      "process) or None (one worker per CPU)")
  return value


def check_split(builder, key: str, split: str) -> int:
  """The examples `split` selects in `builder`'s prepared data, read from its metadata.

  Raises:
    ConfigError naming `dataset.<key>` for a split the dataset does not have,
    a slice past its end, or one that selects no example (TFDS would say
    so only when the split is read, in its own words, or not at all).
  """
  if not builder.info.splits:  # no split metadata (TFDS's test mocks): the reader decides
    return -1
  sizes = ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items())
  try:
    count = builder.info.splits[split].num_examples
  except (ValueError, KeyError, AssertionError) as e:
    raise ConfigError(f"dataset.{key}", split, f"{split!r} does not fit {builder.name}: "
                      f"{str(e).splitlines()[0]}", f"its splits: {sizes}",
                      shows_value=True) from None
  if count <= 0:
    raise ConfigError(f"dataset.{key}", split, f"{split!r} selects no example of "
                      f"{builder.name}", f"its splits: {sizes}", shows_value=True)
  return count


def steps_per_epoch(config: ml_collections.ConfigDict, batch_size: int) -> int:
  """`get_dataset(config).steps_per_epoch(batch_size)`, from the split's size alone.

  Reads the prepared dataset's metadata (preparing it first if need be), not
  its examples.
  """
  _, builder = builders.builder(config)
  split = config.get("train_split", "train")
  count = check_split(builder, "train_split", split)
  return _full_batches(count if count >= 0 else builder.info.splits[split].num_examples,
                       batch_size)


def _full_batches(examples: int, batch_size: int) -> int:
  """Full global batches per epoch; the remainder of the shuffled split is dropped."""
  return examples // batch_size


def _load_split(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images, int32 labels) of a split, from the .npz cache when present.

  The cache sits in the prepared dataset's folder (immutable once prepared)
  and is checked against the split's length, so a stale one is rebuilt.
  """
  source = builder.as_data_source(split=split)
  n = len(source)
  tag = re.sub(r"[^A-Za-z0-9]+", "_", split).strip("_")
  digest = hashlib.sha1(split.encode()).hexdigest()[:8]
  cache = os.path.join(builder.data_dir, f"inq_cache-{tag}-{digest}.npz")
  if os.path.isfile(cache):
    with np.load(cache) as f:
      if len(f["labels"]) == n:
        return f["images"], f["labels"]

  first = source[0]
  images = np.empty((n,) + np.shape(first["image"]), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _READ_CHUNK):
    keys = list(range(start, min(start + _READ_CHUNK, n)))
    # One __getitems__ call per chunk: far fewer round trips than one __getitem__ per record.
    for i, example in zip(keys, source.__getitems__(keys)):
      images[i], labels[i] = example["image"], example["label"]

  # Only into an existing local folder: never create one (e.g. under TFDS's
  # test mocks, whose data_dir does not exist) or write to remote storage.
  if os.path.isdir(builder.data_dir):
    tmp = f"{cache}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        np.savez(f, images=images, labels=labels)
      os.replace(tmp, cache)
    except OSError as e:  # a read-only data_dir: fine, just slower next time
      logging.warning("could not cache %s split %r in %s: %s", builder.name, split, cache, e)
      if os.path.exists(tmp):
        os.remove(tmp)
  return images, labels
