"""A TFDS builder for Fashion-MNIST that reads the original IDX `.gz` files.

Why not TFDS's own `fashion_mnist` builder: it verifies the SHA-256 of the
*compressed* files, so repackaged copies (Debian's `dataset-fashion-mnist`
re-gzips them: different headers, identical pixels) fail with
`NonMatchingChecksumError`; and it reads them with `tf.io.gfile`, so it cannot
prepare anything without TensorFlow installed. This builder checks the IDX
content instead (magic numbers, shapes, sizes), needs no TensorFlow, and writes
array_record, which `tfds.data_source` reads. Features: 'image' uint8
(28, 28, 1) and 'label' with `fashion_mnist`'s 10 class names. The image is a
raw-bytes Tensor rather than `fashion_mnist`'s PNG Image: TFDS encodes PNGs
from arrays with TensorFlow, and without PNG coding both preparing and reading
are faster.

The four files are taken from the manual dir (`download_config.manual_dir`).
`download_idx_files` fetches the originals when there is no local copy.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import os
import shutil
import struct
import sys
import tempfile
import urllib.request
from typing import Optional

import numpy as np
import tensorflow_datasets as tfds


def _ensure_importlib_resources() -> None:
  """Lets TFDS builders prepare data where the `importlib_resources` backport is absent.

  TFDS 4.9's `DatasetBuilder.code_path` (used by every `download_and_prepare`)
  imports `importlib_resources` but declares it only for Python < 3.9, so on a
  clean install preparing *any* dataset fails with ModuleNotFoundError. From
  Python 3.11 the standard library's `importlib.resources` has the same API
  (`abc.Traversable` is all TFDS uses), so it stands in for the backport.
  """
  try:
    importlib.import_module("importlib_resources")
  except ImportError:
    try:
      importlib.import_module("importlib.resources.abc")  # Python >= 3.11
    except ImportError:
      return  # Python 3.10: `pip install importlib_resources` is needed.
    sys.modules["importlib_resources"] = sys.modules["importlib.resources"]


_ensure_importlib_resources()

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
# The URLs and SHA-256 sums that TFDS's `fashion_mnist` builder registers
# (tensorflow_datasets/url_checksums/fashion_mnist.txt).
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SHA256 = {
    "train-images-idx3-ubyte.gz":
        "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz":
        "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz":
        "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz":
        "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}
FILES = {  # split -> (images, labels, number of examples)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
               "Shirt", "Sneaker", "Bag", "Ankle boot")
HOW_TO_GET = (
    "Get the four Fashion-MNIST files (train-images-idx3-ubyte.gz, "
    "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
    f"in one of these ways:\n"
    f"  * Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` (installs them in "
    f"{DEBIAN_DIR}, the default manual_dir);\n"
    "  * download them from https://github.com/zalandoresearch/fashion-mnist/tree/master/"
    "data/fashion into a folder DIR and pass --config.dataset.manual_dir=DIR.")


class BadIdxFileError(ValueError):
  """An IDX file that is truncated, corrupt or not the expected array."""


def read_idx(path: str, expected_shape: tuple) -> np.ndarray:
  """Reads one gzipped IDX file of unsigned bytes and checks its shape.

  IDX header: two zero bytes, a type byte (0x08 = uint8), the number of
  dimensions, then one big-endian uint32 per dimension.

  Args:
    path: a `*-ubyte.gz` file.
    expected_shape: e.g. (60000, 28, 28) for train images.

  Returns:
    A uint8 array of `expected_shape`.

  Raises:
    BadIdxFileError: the file is not valid gzip, has the wrong magic number,
      the wrong shape, or too few or too many bytes.
  """
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise BadIdxFileError(f"{path}: cannot decompress ({e}). Delete it and get it "
                          f"again.\n{HOW_TO_GET}") from e
  ndim = len(expected_shape)
  expected_magic = 0x0800 | ndim
  if len(data) < 4 + 4 * ndim:
    raise BadIdxFileError(f"{path}: {len(data)} bytes, too short for an IDX header")
  magic = struct.unpack(">I", data[:4])[0]
  if magic != expected_magic:
    raise BadIdxFileError(f"{path}: IDX magic number {magic:#010x}, expected "
                          f"{expected_magic:#010x} (uint8, {ndim} dimensions)")
  shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
  if tuple(shape) != tuple(expected_shape):
    raise BadIdxFileError(f"{path}: IDX shape {shape}, expected {tuple(expected_shape)}")
  body = data[4 + 4 * ndim:]
  if len(body) != int(np.prod(shape)):
    raise BadIdxFileError(f"{path}: {len(body)} data bytes, expected {int(np.prod(shape))} "
                          f"for shape {shape} (truncated or padded file)")
  return np.frombuffer(body, np.uint8).reshape(shape)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images [n, 28, 28, 1] uint8, labels [n] uint8) of 'train' or 'test'."""
  images_file, labels_file, n = FILES[split]
  images = read_idx(os.path.join(directory, images_file), (n, 28, 28))
  labels = read_idx(os.path.join(directory, labels_file), (n,))
  if labels.max() >= len(CLASS_NAMES):
    raise BadIdxFileError(f"{os.path.join(directory, labels_file)}: label {labels.max()} "
                          f"is not in 0..{len(CLASS_NAMES) - 1}")
  return images[..., None], labels


def has_idx_files(directory: Optional[str]) -> bool:
  return bool(directory) and all(os.path.isfile(os.path.join(directory, name))
                                 for name in SHA256)


def download_idx_files(directory: str, timeout: float = 60.0) -> None:
  """Downloads the original files into `directory`, checking TFDS's SHA-256 sums.

  Each file is written under a temporary name and renamed only once its checksum
  matches, so an interrupted download never leaves a plausible-looking file.

  Raises:
    OSError (urllib.error.URLError included) when a download fails;
    ValueError on a checksum mismatch.
  """
  os.makedirs(directory, exist_ok=True)
  for name, sha256 in SHA256.items():
    target = os.path.join(directory, name)
    if os.path.isfile(target):
      continue
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.")
    try:
      with os.fdopen(fd, "wb") as out, urllib.request.urlopen(URL + name,
                                                              timeout=timeout) as response:
        shutil.copyfileobj(response, out)
      with open(tmp, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
      if got != sha256:
        raise ValueError(f"{URL + name}: SHA-256 {got}, expected {sha256}")
      os.replace(tmp, target)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


class FashionMnistIdx(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from the IDX files in the manual dir (registered as 'fashion_mnist_idx')."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: the IDX files, checked by content."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = HOW_TO_GET

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST (Zalando), read from the original IDX files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8,
                                           encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    directory = os.fspath(dl_manager.manual_dir)
    if not has_idx_files(directory):
      raise FileNotFoundError(f"The Fashion-MNIST IDX files are not all in {directory}.\n"
                              f"{HOW_TO_GET}")
    # Read (and check) every file before writing anything.
    arrays = {split: read_split(directory, split) for split in FILES}
    return {split: self._generate_examples(*arrays[split]) for split in FILES}

  def _generate_examples(self, images, labels):
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image, "label": int(label)}
