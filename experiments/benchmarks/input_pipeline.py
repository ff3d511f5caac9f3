"""Benchmark: ImageNet input pipeline images/s on ImageNet-sized JPEGs, per core.

    python -m experiments.benchmarks.input_pipeline [--train 512] [--validation 128]

Prepares the generated `imagenet2012` (experiments/data/synthetic_imagenet.py:
500 x 375 JPEGs) in `--data_dir`, then times the train pipeline
(random-resized-crop + flip) and the eval pipeline (resize + center crop) at
224 x 224, with 1 and with 2 decoding cores, for:

* `legacy`: the pipeline before this benchmark existed: a pool of 1 or 2
  threads decodes and crops, a prefetch thread stacks and normalizes each
  batch to float32 (serially);
* `workers`: the experiments' pipeline: 1 or 2 worker processes make whole
  uint8 batches into shared memory (normalized later, on the device).

The main process is not pinned (on a TPU host it has cores of its own).
Images/s counts the batches after the first of each pass (worker start-up is
reported apart, as `startup_seconds`). Prints one JSON line with images/s per
decoding core, the per-core speed-up over `legacy`, the scaling from 1 to 2
cores, the single-image costs (`profile_ms`: JPEG decode, crop-resize) that
bound any pipeline on this CPU, what the loader itself costs per batch with
nothing to decode (`loader_overhead_ms_per_batch`, 1 and 2 workers; also grain's
DataLoader where grain is installed), the one stage of each pipeline that runs
serially on the host and the ceiling it sets (`serial_stage`), and a projection
for a 96-vCPU TPU host.
Targets: per-core speed-up >= 2 and scaling >= 1.7.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import tempfile
import time
from typing import Iterator

import numpy as np
import PIL.Image
from absl import flags

from experiments.benchmarks import machine
from experiments.data import imagenet
from experiments.data import input_pipeline
from experiments.data import synthetic_imagenet


def legacy_batches(source: imagenet.BatchSource, threads: int, normalization) -> Iterator[dict]:
  """The pipeline before worker processes, for the benchmark's side-by-side baseline.

  As the experiments read ImageNet until then: examples decoded and cropped
  (the whole image resized for eval) in a pool of `threads` threads, the batch
  normalized to float32, all made up to two batches ahead in one prefetch
  thread; the normalization and the stacking are serial, per batch.
  """
  start, stop = source.local
  size = source.image_size
  pool = concurrent.futures.ThreadPoolExecutor(threads)

  def one(index, seed):
    example = source.data_source[index]
    image = imagenet._to_pil(example["image"])  # pylint: disable=protected-access
    label = int(example["label"])
    if seed is None:
      return _legacy_center_crop(image.convert("RGB"), size), label
    rng = np.random.default_rng(seed)
    x, y, w, h = imagenet.random_resized_crop_box(rng, *image.size)
    out = np.asarray(image.convert("RGB").resize((size, size), PIL.Image.BILINEAR,
                                                 box=(x, y, x + w, y + h)))
    return (out[:, ::-1] if rng.random() < 0.5 else out), label

  class Batches:
    def __getitem__(self, t):
      mine = source.indices[t][start:stop].tolist()
      seeds = (np.random.default_rng([source.seed, source.epoch, t + 1]).integers(
          0, 2**63, size=source.indices.shape[1])[start:stop].tolist() if source.augment
               else [None] * len(mine))
      out = list(pool.map(one, mine, seeds))
      images = np.stack([image for image, _ in out])
      return {"image": imagenet.normalize_host(images, normalization),
              "label": np.array([label for _, label in out], np.int32)}

  try:
    yield from imagenet._prefetch(  # pylint: disable=protected-access
        Batches(), len(source))
  finally:
    pool.shutdown()


def _legacy_center_crop(pil: PIL.Image.Image, size: int) -> np.ndarray:
  resize = int(round(size * 256 / 224))
  width, height = pil.size
  new = ((resize, int(resize * height / width)) if width <= height
         else (int(resize * width / height), resize))
  image = np.asarray(pil.resize(new, PIL.Image.BILINEAR))
  top, left = int(round((new[1] - size) / 2.0)), int(round((new[0] - size) / 2.0))
  return image[top:top + size, left:left + size]


def _pass(make_iter) -> tuple:
  """(images/s after the first batch, seconds to the first batch) of one pass."""
  start = time.perf_counter()
  it = make_iter()
  next(it)
  first = time.perf_counter()
  n = 0
  for b in it:
    n += len(b["label"])
  end = time.perf_counter()
  return n / (end - first), first - start


def measure(data, split: str, pipeline: str, cores: int, batch: int, repeats: int) -> dict:
  source_of = {"train": data.train_source, "eval": data.test_source}[split]
  size = data.train_size if split == "train" else data.test_size
  steps = size // batch
  rates, startups = [], []
  for r in range(repeats):
    order = np.random.default_rng([r]).permutation(size)[:steps * batch].reshape(steps, batch)
    source = imagenet.BatchSource(source_of.data_source, order, (0, batch),
                                  source_of.image_size, seed=r, epoch=r,
                                  augment=split == "train", mask=split == "eval")
    if pipeline == "legacy":
      make = lambda s=source: legacy_batches(s, cores, data.normalization)
    else:
      make = lambda s=source: imagenet.iterate(s, cores)
    rate, startup = _pass(make)
    rates.append(rate)
    startups.append(startup)
  return {"images_per_second": round(float(np.median(rates)), 1),
          "startup_seconds": round(float(np.median(startups)), 2)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=None,
                      help="where to prepare the generated dataset (default: a folder in "
                      "the temp dir named after --train and --validation)")
  parser.add_argument("--train", type=int, default=512)
  parser.add_argument("--validation", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  if len(os.sched_getaffinity(0)) < 2:
    parser.error("needs 2 CPU cores to measure the scaling from 1 to 2")
  if args.data_dir is None:
    args.data_dir = os.path.join(tempfile.gettempdir(), f"inq_jax_synthetic_imagenet_"
                                 f"{args.train}_{args.validation}")
  builder = synthetic_imagenet.prepare(args.data_dir, args.train, args.validation)
  config = input_pipeline.ml_collections.ConfigDict({
      "name": "imagenet2012", "data_dir": args.data_dir, "test_split": "validation",
      "image_size": args.image_size, "augment": True, "workers": 0})
  data = input_pipeline.get_dataset(config)
  files = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(builder.data_dir)
           for f in fs if "array_record" in f]
  results, summary = {}, {"per_core_speedup": {}, "scaling_1_to_2": {}}
  for split in ("train", "eval"):
    results[split] = {p: {str(c): measure(data, split, p, c, args.batch, args.repeats)
                          for c in (1, 2)} for p in ("legacy", "workers")}
    rate = lambda p, c: results[split][p][str(c)]["images_per_second"]
    summary["per_core_speedup"][split] = round(rate("workers", 1) / rate("legacy", 1), 2)
    summary["scaling_1_to_2"][split] = round(rate("workers", 2) / rate("workers", 1), 2)
    summary.setdefault("legacy_scaling_1_to_2", {})[split] = round(
        rate("legacy", 2) / rate("legacy", 1), 2)
    # A 96-vCPU host (e.g. TPU v4-8) if per-core throughput held at the 2-core rate.
    summary.setdefault("projected_96_vcpu_images_per_second", {})[split] = round(
        rate("workers", 2) / 2 * 96)
  print(json.dumps({
      "profile_ms": _profile(data, args.image_size),
      "loader_overhead_ms_per_batch": _loader_overhead(args.batch, args.image_size),
      "serial_stage": _serial_stage(args.batch, args.image_size, data.normalization),
      "benchmark": "input_pipeline", "train_images": data.train_size,
      "eval_images": data.test_size, "source_image_size": [500, 375],
      "mean_record_kb": round(sum(files) / (data.train_size + data.test_size) / 1024, 1),
      "image_size": args.image_size, "batch": args.batch, "repeats": args.repeats,
      "cpu": machine.cpu_name(), "load_average": machine.load_average(),
      "results": results, **summary,
      "targets": {"per_core_speedup": 2.0, "scaling_1_to_2": 1.7}}))


def _profile(data, size: int) -> dict:
  """Median milliseconds per image of each stage, in this process, one thread."""
  source = data.train_source.data_source
  stages = {"read": [], "decode": [], "train_crop_resize": [], "eval_crop_resize": []}
  rng = np.random.default_rng(0)
  for i in range(min(64, len(source))):
    t0 = time.perf_counter()
    raw = source[i]["image"]
    t1 = time.perf_counter()
    pil = imagenet._to_pil(raw).convert("RGB")  # pylint: disable=protected-access
    t2 = time.perf_counter()
    x, y, w, h = imagenet.random_resized_crop_box(rng, *pil.size)
    pil.resize((size, size), PIL.Image.BILINEAR, box=(x, y, x + w, y + h))
    t3 = time.perf_counter()
    x, y, w, h = imagenet.center_crop_box(*pil.size, size)
    pil.resize((size, size), PIL.Image.BILINEAR, box=(x, y, x + w, y + h))
    t4 = time.perf_counter()
    for k, dt in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
      stages[k].append(dt * 1000)
  return {k: round(float(np.median(v)), 3) for k, v in stages.items()}


class _Blank:
  """Batches of the pipeline's shape with no reading or decoding: the loader's own cost."""

  def __init__(self, steps: int, batch: int, size: int):
    self.steps, self.shape = steps, (batch, size, size, 3)

  def __len__(self) -> int:
    return self.steps

  @property
  def batch_shape(self) -> tuple:
    return self.shape

  def __getitem__(self, t: int) -> dict:
    return {"image": np.full(self.shape, t % 251, np.uint8),
            "label": np.zeros(self.shape[:1], np.int32)}


def _loader_overhead(batch: int, size: int, steps: int = 24) -> dict:
  """Milliseconds per batch that 1 and 2 workers add with nothing to decode.

  Every batch crosses from a worker process to this one; on a 2-core machine
  that work shares the cores with the decoding. `pool` is the experiments'
  loader (`imagenet.iterate`); `grain` is grain's DataLoader over the same
  batches (None when grain is not installed), the loader it replaced.
  """
  def rate(make) -> float:
    it = make()
    next(it)
    start = time.perf_counter()
    n = sum(1 for _ in it)
    return round((time.perf_counter() - start) / n * 1000, 2)

  out = {"pool": {str(w): rate(lambda w=w: imagenet.iterate(_Blank(steps, batch, size), w))
                  for w in (1, 2)}, "grain": None}
  try:  # grain is optional: the loader it measures is not the project's
    import grain.python as grain  # pylint: disable=g-import-not-at-top
  except ImportError:
    return out
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain's workers read its absl flags

  def grain_loader(workers):
    return iter(grain.DataLoader(
        data_source=_Blank(steps, batch, size),
        sampler=grain.SequentialSampler(steps, grain.NoSharding()), worker_count=workers,
        worker_buffer_size=2, read_options=grain.ReadOptions(num_threads=1,
                                                             prefetch_buffer_size=2)))

  out["grain"] = {str(w): rate(lambda w=w: grain_loader(w)) for w in (1, 2)}
  return out


def _serial_stage(batch: int, size: int, normalization, repeats: int = 20) -> dict:
  """Milliseconds per image of the stage each pipeline runs in one thread of the host.

  `legacy`: stacking a batch of decoded images and normalizing it to float32
  (its prefetch thread, under the GIL); `workers`: copying a batch out of its
  shared-memory slot. Whatever the core count, a host cannot deliver more than
  1000 / ms images per second through that stage (`host_ceiling`).
  """
  images = [np.random.default_rng(i).integers(0, 256, (size, size, 3), dtype=np.uint8)
            for i in range(batch)]
  slot = np.stack(images)

  def per_image(fn) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
      fn()
    return (time.perf_counter() - start) / repeats / batch * 1000

  ms = {"legacy": per_image(lambda: imagenet.normalize_host(np.stack(images), normalization)),
        "workers": per_image(slot.copy)}
  ms = {k: max(round(v, 4), 1e-4) for k, v in ms.items()}
  return {"ms_per_image": ms,
          "host_ceiling_images_per_second": {k: round(1000 / v) for k, v in ms.items()}}


if __name__ == "__main__":
  main()
