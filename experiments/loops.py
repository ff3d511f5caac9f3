"""The one epoch loop of every stage and the one evaluation of every tool.

`train_epoch` runs the baseline's, the pruning steps' and the INQ phases'
epochs; `evaluate` is shared by train.py, tools/evaluate.py and the study;
`reestimate_bn` (over `bn_batches`) re-estimates BatchNorm statistics for the
trainer (`inq.bn_reestimate_batches`) and the study's diagnostic.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from experiments import reporting
from experiments.mesh import Devices
from experiments.train_state import TrainState


def train_epoch(state: TrainState, train_step, batches, *, num_steps: int, devices: Devices,
                desc: str, on_step: Optional[Callable[[int], None]] = None):
  """Runs `num_steps` steps over `batches`: (state, {"train_loss", "train_accuracy", ...}).

  Metrics are fetched from the device in groups of 20 steps, not every step.
  """
  bar = reporting.progress_bar(num_steps, desc)
  sums, n, pending = {"loss": 0.0, "accuracy": 0.0}, 0, []

  def drain():
    for m in jax.device_get(pending):
      for key in sums:
        sums[key] += float(m[key])
    pending.clear()

  first_step = int(state.step)
  start = time.perf_counter()
  for batch in batches:
    state, metrics = train_step(state, devices.put_batch(batch))
    if devices.sync_each_step:
      jax.block_until_ready(state)
    pending.append(metrics)
    n += 1
    bar.update(1)
    if on_step is not None:
      on_step(first_step + n)
    if len(pending) >= 20:
      drain()
      bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", acc=f"{sums['accuracy'] / n:.3f}")
    if n == num_steps:
      break
  drain()
  bar.close()
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  loss, acc = sums["loss"] / max(n, 1), sums["accuracy"] / max(n, 1)
  logging.info("%s: train loss %.4f, train accuracy %.4f, %.1fs", desc, loss, acc, seconds)
  return state, {"train_loss": loss, "train_accuracy": acc, "seconds": seconds, "steps": n}


def evaluate(eval_step, params, batch_stats, batches, devices: Devices) -> dict:
  """{"accuracy", "loss" (, "top5_accuracy")} over every unmasked example of `batches`.

  Batches carry a bool 'mask'; padded examples (the last batch, rounded up to the
  device count) count nowhere, so the result is over exactly the split.
  """
  sums = None
  for batch in batches:
    out = eval_step(params, batch_stats, devices.put_batch(batch))
    if devices.sync_each_step:
      jax.block_until_ready(out)
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  count = float(sums["count"])
  result = {"accuracy": float(sums["correct1"]) / count, "loss": float(sums["loss"]) / count}
  if "correct5" in sums:
    result["top5_accuracy"] = float(sums["correct5"]) / count
  return result


def test_batches(data, eval_batch_size: int, devices: Devices):
  """The test split in batches of `eval_batch_size` rounded up to the device count."""
  return data.test_batches(devices.eval_batch_size(eval_batch_size))


# A phase that does not train reports the loss on a fixed random sample of the
# train split this large, not on all of it: a whole ImageNet train split would
# cost a third of an epoch at the end of every run.
TRAIN_LOSS_EXAMPLES = 10_000


def train_split_eval_batches(data, eval_batch_size: int, devices: Devices, seed: int):
  """Train examples without augmentation, every one unmasked (eval mode).

  Whole batches of one seeded shuffle, until at least TRAIN_LOSS_EXAMPLES
  examples (or the whole split, when it is smaller).
  """
  size = devices.eval_batch_size(eval_batch_size)
  if size > data.train_size:  # one (smaller) batch rather than none
    size = max(devices.count, data.train_size // devices.count * devices.count)
  batches = data.train_batches(size, 0, seed, augment=False)
  count = -(-TRAIN_LOSS_EXAMPLES // size)
  return ({**b, "mask": np.ones(len(b["label"]), bool)}
          for b in itertools.islice(batches, count))


def bn_batches(data, batch_size: int, seed: int, count: int):
  """`count` plain (unaugmented) train batches of one seeded draw, over epochs as needed."""
  batches = itertools.chain.from_iterable(
      data.train_batches(batch_size, epoch, seed, augment=False) for epoch in itertools.count())
  return itertools.islice(batches, count)


def reestimate_bn(bn_stats_step, params, batch_stats, batches, devices: Devices):
  """The BatchNorm statistics after `batches`, each run forward in train mode.

  `bn_stats_step` is `steps.make_bn_stats_step`'s: every BatchNorm's running
  statistics move toward each batch's with the model's own momentum (flax:
  new = momentum * old + (1 - momentum) * batch). `params` are only read.
  """
  stats = batch_stats
  for batch in batches:
    stats = bn_stats_step(params, stats, devices.put_batch(batch))
    if devices.sync_each_step:
      jax.block_until_ready(stats)
  return stats
