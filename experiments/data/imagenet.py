"""ImageNet batches made in worker processes: no serial per-image stage on the host.

A TPU host must decode, crop and resize thousands of JPEGs a second. Here the
unit of work is one whole batch (this process's slice of a global batch):
`BatchSource[t]` reads its JPEGs, decodes and crops them and returns uint8
arrays. `iterate` runs N worker processes, each making whole batches (worker
results land in a ring of shared-memory slots, so a batch costs the main
process one copy, not a pickle through a pipe) and yields them in order.
Nothing per image runs in the main process; the uint8 images go to the device
as they are (4x fewer bytes than float32) and are normalized there, inside the
jitted step (`experiments.steps.prepare_images`).

Why not grain's DataLoader: its overhead per record, with nothing to decode,
is larger than this pool's per batch, most of which is allocating and copying
the batch (`experiments.benchmarks.input_pipeline` measures both, when grain
is installed; the numbers are in the README).

Batch t of epoch e is a pure function of (seed, e, t): the same for any
number of workers or processes, so a killed run resumes on the same batches.

This module imports neither JAX nor TFDS: workers start fast and only load
what unpickling the TFDS data source needs.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import math
import multiprocessing
import os
from multiprocessing import shared_memory
from typing import Iterator, Optional

import numpy as np
import PIL.Image


def _to_pil(image) -> PIL.Image.Image:
  """An RGB PIL image from encoded bytes (SkipDecoding) or a decoded uint8 array."""
  if isinstance(image, (bytes, bytearray, np.bytes_)):
    pil = PIL.Image.open(io.BytesIO(bytes(image)))
  else:
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    pil = PIL.Image.fromarray(image)
  return pil


def _draft(pil: PIL.Image.Image, box, size: int):
  """Lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop stays >= size pixels.

  Returns the box in the (possibly smaller) decoded image's pixels.
  """
  if pil.format == "JPEG":
    x, y, w, h = box
    scale = min(w, h) / size  # decoded crop must keep >= size pixels per side
    if scale >= 2:
      full = pil.size
      pil.draft("RGB", (math.ceil(full[0] / scale), math.ceil(full[1] / scale)))
      fx, fy = pil.size[0] / full[0], pil.size[1] / full[1]
      box = (x * fx, y * fy, w * fx, h * fy)
  return box


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
  """(x, y, w, h) as torchvision's RandomResizedCrop picks it (10 tries, then center)."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    w, h = int(round(height * ratio[1])), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, size: int) -> tuple:
  """(x, y, w, h) of the central crop that resize-shorter-side-to-size*256/224 then
  crop-size would keep, in the original image's pixels."""
  resize = int(round(size * 256 / 224))
  if width <= height:
    new = (resize, int(resize * height / width))
  else:
    new = (int(resize * width / height), resize)
  top = int(round((new[1] - size) / 2.0))
  left = int(round((new[0] - size) / 2.0))
  fx, fy = width / new[0], height / new[1]
  return left * fx, top * fy, size * fx, size * fy


def train_image(image, seed: int, size: int) -> np.ndarray:
  """Random-resized-crop to size x size and a random flip, from the example's seed."""
  pil = _to_pil(image)
  rng = np.random.default_rng(seed)
  box = random_resized_crop_box(rng, *pil.size)
  x, y, w, h = _draft(pil, box, size)
  out = np.asarray(pil.convert("RGB").resize((size, size), PIL.Image.BILINEAR,
                                             box=(x, y, x + w, y + h)))
  return out[:, ::-1] if rng.random() < 0.5 else out


def eval_image(image, size: int) -> np.ndarray:
  """The central size x size crop after resizing the shorter side to size * 256/224.

  Only the pixels of the crop are resampled (the resize of the whole image
  followed by a crop gives the same box).
  """
  pil = _to_pil(image)
  x, y, w, h = _draft(pil, center_crop_box(*pil.size, size), size)
  return np.asarray(pil.convert("RGB").resize((size, size), PIL.Image.BILINEAR,
                                              box=(x, y, x + w, y + h)))


class BatchSource:
  """Batches of one pass over a split, by index (picklable: it goes to the workers).

  Record t is {'image': uint8 [b, size, size, 3], 'label': int32 [b]} (plus
  'mask' for eval, False on padding), b = this process's slice of global batch t.

  Args:
    data_source: a TFDS data source of the split, its images undecoded
      (`decoders={'image': tfds.decode.SkipDecoding()}`) or decoded arrays.
    indices: int64 [steps, global batch]: the examples of each global batch;
      -1 pads the last eval batch.
    local: (start, stop) of this process's slice of every global batch.
    image_size: output height and width.
    seed, epoch: with the batch number, the per-example augmentation seeds
      (train); `augment=False` gives eval crops.
  """

  def __init__(self, data_source, indices: np.ndarray, local: tuple, image_size: int,
               seed: int = 0, epoch: int = 0, augment: bool = False, mask: bool = False):
    self.data_source, self.indices, self.local = data_source, indices, tuple(local)
    self.image_size, self.seed, self.epoch = image_size, int(seed), int(epoch)
    self.augment, self.mask = augment, mask

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def batch_shape(self) -> tuple:
    """The shape of every batch's 'image'."""
    return (self.local[1] - self.local[0], self.image_size, self.image_size, 3)

  def __getitem__(self, t: int) -> dict:
    t = int(t)
    start, stop = self.local
    mine = self.indices[t][start:stop]
    if self.augment:
      # One seed per example of the global batch: crops don't depend on the process count.
      seeds = np.random.default_rng([self.seed, self.epoch, t + 1]).integers(
          0, 2**63, size=self.indices.shape[1])[start:stop]
    size = self.image_size
    images = np.zeros((len(mine), size, size, 3), np.uint8)
    labels = np.zeros((len(mine),), np.int32)
    real = mine >= 0
    for i in np.flatnonzero(real):
      example = self.data_source[int(mine[i])]
      images[i] = (train_image(example["image"], int(seeds[i]), size) if self.augment
                   else eval_image(example["image"], size))
      labels[i] = int(example["label"])
    out = {"image": images, "label": labels}
    if self.mask:
      out["mask"] = real
    return out


def iterate(source: BatchSource, workers: int, buffer: int = 2) -> Iterator[dict]:
  """source[0], source[1], ... made by `workers` worker processes (0: in this one).

  Every worker makes one batch at a time and up to `buffer` finished batches
  wait (with 0 workers: `buffer` batches made ahead in a thread); each batch in
  flight holds a shared-memory slot, e.g. 154 MB for 1024 images of 224x224.
  The workers are spawned (never forked from a process running XLA's threads)
  and stop when the pass ends or the iterator is closed.
  """
  steps = len(source)
  if workers <= 0:
    return _prefetch(source, steps, buffer)
  return _pool(source, steps, workers, buffer)


# Set in each worker process by _worker_start.
_WORKER = {}


def _worker_start(source: BatchSource, name: str, slots: int) -> None:
  shm = shared_memory.SharedMemory(name=name)
  _WORKER.update(source=source, shm=shm, images=np.ndarray(
      (slots,) + source.batch_shape, np.uint8, buffer=shm.buf))


def _worker_make(t: int, slot: int) -> dict:
  """Makes batch t into shared-memory slot `slot`; returns the rest of the batch."""
  batch = _WORKER["source"][t]
  _WORKER["images"][slot] = batch.pop("image")
  return batch


def _pool(source: BatchSource, steps: int, workers: int, buffer: int) -> Iterator[dict]:
  slots = max(1, min(steps, workers + buffer))
  shm = shared_memory.SharedMemory(create=True,
                                   size=max(1, slots * math.prod(source.batch_shape)))
  images = np.ndarray((slots,) + source.batch_shape, np.uint8, buffer=shm.buf)
  pool = concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
      initargs=(source, shm.name, slots))
  try:
    # Batch t uses slot t % slots; batch t + slots is asked for only once batch
    # t has been copied out, so a slot is never overwritten while it is read.
    pending = collections.deque(pool.submit(_worker_make, t, t % slots)
                                for t in range(min(steps, slots)))
    for t in range(steps):
      batch = pending.popleft().result()
      batch["image"] = images[t % slots].copy()
      if t + slots < steps:
        pending.append(pool.submit(_worker_make, t + slots, (t + slots) % slots))
      yield batch
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    del images  # the buffer must have no views left before it is closed
    shm.close()
    shm.unlink()


def _prefetch(source, steps: int, depth: int = 2) -> Iterator[dict]:
  """source[0..steps-1], made up to `depth` batches ahead in a thread."""
  with concurrent.futures.ThreadPoolExecutor(1) as executor:
    pending = [executor.submit(source.__getitem__, t) for t in range(min(depth, steps))]
    for t in range(steps):
      result = pending.pop(0).result()
      if t + depth < steps:
        pending.append(executor.submit(source.__getitem__, t + depth))
      yield result


def normalize_host(images: np.ndarray, normalization) -> np.ndarray:
  """float32 (images / 255 - mean) / std on the host (tools that need floats there)."""
  mean, std = (np.asarray(v, np.float32) for v in normalization)
  return (np.asarray(images).astype(np.float32) * np.float32(1 / 255) - mean) / std


def workers_default(configured: Optional[int]) -> int:
  """The configured worker count, or by default every CPU this process may use."""
  if configured is not None:
    if int(configured) < 0:
      raise ValueError(f"dataset.workers must be >= 0 (0: decode in this process), got "
                       f"{configured}")
    return int(configured)
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1
