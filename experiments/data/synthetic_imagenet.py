"""A generated stand-in for ImageNet: real JPEG files in a real TFDS `imagenet2012` folder.

ImageNet cannot be downloaded here (and needs registration), so the input
pipeline's benchmark and tests prepare this instead: `prepare(data_dir)` writes
a TFDS dataset named `imagenet2012` (TFDS's own features and version: JPEG
'image', 1000-class 'label', 'file_name') as array_record into `data_dir`, so
`tfds.builder("imagenet2012", data_dir=data_dir)` finds it prepared and the
experiments read it exactly as they read the real one. The images are
ImageNet-sized (500 x 375 by default, the most common ImageNet size) JPEGs at
quality 90 of smooth random shapes plus pixel noise, about the file size of a
real ImageNet photo (~110 KB), so decoding costs what it costs on real data.

    python -m experiments.data.synthetic_imagenet --data_dir=/tmp/tfds_synthetic
"""

from __future__ import annotations

import argparse
import io
from typing import Tuple

import numpy as np
import PIL.Image

from experiments.data import fashion_mnist_idx  # noqa: F401  (TFDS's importlib_resources shim)
import tensorflow_datasets as tfds  # pylint: disable=g-bad-import-order
from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder


def jpeg(rng: np.random.Generator, size: Tuple[int, int], quality: int = 90) -> bytes:
  """One JPEG of `size` (width, height): smooth color fields plus pixel noise."""
  width, height = size
  coarse = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
  smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BICUBIC),
                      np.int16)
  noisy = np.clip(smooth + rng.normal(0, 12, size=smooth.shape), 0, 255).astype(np.uint8)
  buf = io.BytesIO()
  PIL.Image.fromarray(noisy).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


class _Builder(imagenet2012_dataset_builder.Builder, skip_registration=True):
  """TFDS's imagenet2012 builder with generated examples instead of the tars."""

  name = "imagenet2012"
  MANUAL_DOWNLOAD_INSTRUCTIONS = None
  counts = {"train": 256, "validation": 64}
  image_size = (500, 375)
  seed = 0

  @classmethod
  def _get_pkg_dir_path(cls):  # TFDS's metadata (class names, checksums) for imagenet2012
    return imagenet2012_dataset_builder.Builder._get_pkg_dir_path()  # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split, n) for split, n in self.counts.items()}

  def _generate_examples(self, split, n):  # pylint: disable=arguments-differ
    rng = np.random.default_rng([self.seed, 0 if split == "train" else 1])
    for i in range(n):
      yield f"{split}_{i}", {"image": jpeg(rng, self.image_size),
                             "label": int(rng.integers(1000)),
                             "file_name": f"synthetic_{split}_{i:06d}.JPEG"}


def prepare(data_dir: str, train: int = 256, validation: int = 64,
            image_size: Tuple[int, int] = (500, 375), seed: int = 0):
  """Prepares the generated `imagenet2012` in `data_dir` (once) and returns its builder."""
  builder_cls = type("SyntheticImagenet2012", (_Builder,), {
      "name": "imagenet2012", "counts": {"train": int(train), "validation": int(validation)},
      "image_size": tuple(image_size), "seed": int(seed)}, skip_registration=True)
  builder = builder_cls(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    builder.download_and_prepare()
  real = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
  counts = {s: real.info.splits[s].num_examples for s in ("train", "validation")}
  if counts != {"train": train, "validation": validation}:
    raise ValueError(f"{data_dir} already holds an imagenet2012 with {counts} examples, "
                     f"not train={train}, validation={validation}; use another data_dir")
  return real


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", required=True)
  parser.add_argument("--train", type=int, default=256)
  parser.add_argument("--validation", type=int, default=64)
  args = parser.parse_args(argv)
  builder = prepare(args.data_dir, args.train, args.validation)
  print(f"imagenet2012 (generated): {builder.data_dir}")


if __name__ == "__main__":
  main()
