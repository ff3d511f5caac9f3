"""Fashion-MNIST for the examples: the original IDX files, or generated images without them.

The examples need nothing but numpy to read data. With the real files (on
Debian: `apt-get install dataset-fashion-mnist`, or the four `*-ubyte.gz` files
from https://github.com/zalandoresearch/fashion-mnist in one folder) they train
on them; without, on generated 28x28 images whose class is a stripe pattern, so
every example still runs anywhere.
"""

import gzip
import os

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def _read_idx(path: str, header: int) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


def load(split: str, limit: int, data_dir: str = DEFAULT_DIR):
  """(images float32 [n, 28, 28, 1] scaled to [0, 1], labels int32 [n]), the first `limit`."""
  images_file, labels_file = (os.path.join(data_dir, f) for f in _FILES[split])
  if os.path.exists(images_file) and os.path.exists(labels_file):
    images = _read_idx(images_file, 16).reshape(-1, 28, 28, 1)[:limit]
    labels = _read_idx(labels_file, 8)[:limit]
    return images.astype(np.float32) / 255.0, labels.astype(np.int32)
  print(f"no Fashion-MNIST files in {data_dir}: using generated images")
  rng = np.random.default_rng({"train": 0, "test": 1}[split])
  labels = rng.integers(0, 10, limit).astype(np.int32)
  rows = np.arange(28)[None, :, None]
  stripes = (rows % (labels[:, None, None] + 2) == 0).astype(np.float32)
  images = np.broadcast_to(stripes, (limit, 28, 28)) + 0.3 * rng.random((limit, 28, 28))
  return images[..., None].astype(np.float32), labels


def batches(images, labels, batch_size: int, seed: int):
  """One epoch of shuffled batches (dropping the last partial one)."""
  order = np.random.default_rng(seed).permutation(len(labels))
  for start in range(0, len(order) - batch_size + 1, batch_size):
    idx = order[start:start + batch_size]
    yield images[idx], labels[idx]
