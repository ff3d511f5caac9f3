"""Where the examples come from: the prepared TFDS builder of each dataset.

  * fashion_mnist: `fashion_mnist_idx.FashionMnistIdx`, built from the four IDX
    files in `manual_dir` (default: where Debian's dataset-fashion-mnist puts
    them). Without them: TFDS's own `fashion_mnist` if already prepared, or
    downloaded with it where TensorFlow is installed (its builder needs TF), or
    else the original files fetched with urllib (checked against TFDS's SHA-256
    sums) and built with our builder. If nothing works, DatasetNotFoundError
    says how to get the files.
  * cifar10, imagenet2012: TFDS's builders. Preparing with them needs
    TensorFlow (they read files with tf.io.gfile); reading a prepared copy does
    not. ImageNet needs ILSVRC2012_img_{train,val}.tar in `manual_dir`.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from experiments.data import fashion_mnist_idx
from experiments.errors import ConfigError, UserError

IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
NAMES = ("cifar10", "fashion_mnist", "imagenet2012")


class DatasetNotFoundError(UserError, FileNotFoundError):
  """The dataset is not prepared and cannot be prepared here; the message says how."""

  def __str__(self):
    return str(self.args[0]) if self.args else ""


def tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def builder(config: ml_collections.ConfigDict):
  """(name, the prepared TFDS builder) of the dataset `config` describes."""
  name = config.get("name", "fashion_mnist")
  data_dir = config.get("data_dir", None) or None  # "" (e.g. an empty flag) = default
  manual_dir = config.get("manual_dir", None)
  if name == "fashion_mnist":
    return name, _fashion_mnist_builder(data_dir, manual_dir)
  if name == "cifar10":
    return name, _official_builder("cifar10", data_dir, None)
  if name == "imagenet2012":
    return name, _official_builder("imagenet2012", data_dir, manual_dir)
  raise ConfigError("dataset.name", name, f"must be one of {', '.join(NAMES)}")


def _fashion_mnist_builder(data_dir: Optional[str], manual_dir: Optional[str]):
  """A prepared Fashion-MNIST builder; see the module docstring for the order tried."""
  manual_dir = manual_dir or fashion_mnist_idx.DEBIAN_DIR
  own = fashion_mnist_idx.FashionMnistIdx(data_dir=data_dir, file_format="array_record")
  if own.is_prepared():
    # Not download_and_prepare: it would only check the prepared files again,
    # which costs every run's start a noticeable fraction of a second.
    return own
  if fashion_mnist_idx.has_idx_files(manual_dir):
    own.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
    return own

  logging.warning("Fashion-MNIST: no IDX files in %s; trying to download them", manual_dir)
  official = tfds.builder("fashion_mnist", data_dir=data_dir, file_format="array_record")
  download_dir = os.path.join(os.fspath(own.data_dir_root), "downloads", "manual",
                              "fashion_mnist_idx")
  try:
    if official.is_prepared():
      return official
    if tensorflow_available():
      official.download_and_prepare()
      return official
    # TFDS's fashion_mnist builder reads the files with tf.io.gfile, so without
    # TensorFlow fetch the same files (same SHA-256 checks) for our builder.
    fashion_mnist_idx.download_idx_files(download_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f"Fashion-MNIST is not prepared in {own.data_dir_root}, there are no IDX files in "
        f"manual_dir={manual_dir}, and downloading failed ({type(e).__name__}: {e}).\n"
        f"{fashion_mnist_idx.HOW_TO_GET}") from e
  own.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=download_dir))
  return own


def _official_builder(name: str, data_dir: Optional[str], manual_dir: Optional[str]):
  """TFDS's `name` builder, prepared as array_record (downloading if need be)."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if builder.is_prepared():
    return builder
  if name == "imagenet2012":
    manual_dir = manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads",
                                            "manual")
    missing = [t for t in IMAGENET_TARS if not os.path.isfile(os.path.join(manual_dir, t))]
    if missing:
      raise DatasetNotFoundError(
          f"imagenet2012 is not prepared in {builder.data_dir_root}, and manual_dir="
          f"{manual_dir} lacks {', '.join(missing)}. Download {' and '.join(IMAGENET_TARS)} "
          "from https://image-net.org (registration needed) into a folder DIR and pass "
          "--config.dataset.manual_dir=DIR.")
  how = ("prepare it where TensorFlow is installed (`tfds build "
         f"{name} --file_format=array_record --data_dir=DIR`) and pass "
         "--config.dataset.data_dir=DIR")
  if not tensorflow_available():
    raise DatasetNotFoundError(
        f"{name} is not prepared in {builder.data_dir_root}, and TFDS's {name} builder "
        f"needs TensorFlow to prepare it (reading it does not): `pip install tensorflow`, "
        f"or {how}.")
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir))
  except Exception as e:  # pylint: disable=broad-except
    raise DatasetNotFoundError(
        f"could not prepare {name} in {builder.data_dir_root} ({type(e).__name__}: {e}). "
        f"It needs network access{' and the ImageNet tars' if manual_dir else ''}; or {how}."
    ) from e
  return builder
