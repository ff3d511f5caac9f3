"""What the training loop is built from: the run state, the mesh, the jitted steps.

`TrainState` is the whole state of a run as one pytree, saved and restored by
one orbax call: the model variables, the optimizer state, the INQ state, the
pruning masks and the run's position (stage, phase, epoch). `train_epoch` is
the one epoch loop of every stage (baseline, pruning, INQ phases); `evaluate`
is the one evaluation, shared by train.py, tools/evaluate.py and the study.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import inq_jax.optim
from experiments import reporting
from inq_jax import quantize as inq

# TrainState.stage
BASELINE, PRUNE, INQ, DONE = 0, 1, 2, 3
STAGE_NAMES = {BASELINE: "baseline", PRUNE: "prune", INQ: "inq", DONE: "done"}


@flax.struct.dataclass
class TrainState:
  """The state of a run: restoring it is all a resume needs.

  Attributes:
    step: global train step (it seeds dropout).
    params, batch_stats: the model's variables ({} batch_stats without BN).
    opt_state: the state of `make_optimizer`'s chain, a dict with the base
      optimizer's state under "base" and the frozen masks under "freeze".
    inq: the `INQState`. Before INQ starts it is `inq.init` of the initial
      weights (nothing frozen), so the state has one structure for the whole run.
    keep: pruning keep masks (True = kept), or None when the run does not prune.
    stage: BASELINE, PRUNE, INQ or DONE.
    phase: the pruning step (1..T) or the INQ phase (0..n-1; advanced already).
    epoch: epochs finished in this stage or phase.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  inq: inq.INQState
  keep: Any
  stage: jax.Array
  phase: jax.Array
  epoch: jax.Array

  def at(self, stage: int, phase: int = 0, epoch: int = 0) -> "TrainState":
    return self.replace(stage=jnp.int32(stage), phase=jnp.int32(phase),
                        epoch=jnp.int32(epoch))

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


# ------------------------------------------------------------------ devices


class Devices:
  """A 1-D mesh over every device: batch sharded on `data`, state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))
    self.count = jax.device_count()
    # Fake multi-device CPU backends can deadlock in the all-reduce unless each
    # step is waited for; real accelerators keep their async dispatch.
    self.sync_each_step = jax.default_backend() == "cpu" and self.count > 1

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
            for k, v in batch.items()}

  def replicate(self, tree):
    if jax.process_count() == 1:
      return jax.device_put(tree, self.replicated)
    # Several processes: an array on this process's own device cannot be
    # device_put onto the global mesh (no cross-host transfers); every process
    # holds the same values, so each fills its devices' replicas from its copy.
    def put(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, self.replicated)
      return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(put, tree)

  def eval_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the devices; the padding is masked out."""
    return -(-requested // self.count) * self.count


# ---------------------------------------------------------------- optimizer


def epoch_steps(epochs: float, steps_per_epoch: int) -> list:
  """Steps in each (possibly partial, last) epoch of a stage of `epochs` epochs.

  Fractional epochs let a study give every INQ phase, say, 0.4 epochs: the
  last chunk is the first part of a fresh shuffle, and resuming works per chunk.
  """
  total = int(round(epochs * steps_per_epoch))
  full, rest = divmod(total, steps_per_epoch)
  return [steps_per_epoch] * full + ([rest] if rest else [])


def learning_rate(stage_config, steps_per_epoch: int, epochs: float):
  """The schedule of one stage or phase (`config.baseline`, `.prune` or `.inq`)."""
  base_lr = stage_config.learning_rate
  total = max(1, sum(epoch_steps(epochs, steps_per_epoch)))
  if stage_config.lr_schedule == "cosine":
    schedule = optax.cosine_decay_schedule(base_lr, total)
  elif stage_config.lr_schedule == "step":
    every = max(1, int(steps_per_epoch * stage_config.step_epochs))
    schedule = optax.piecewise_constant_schedule(
        base_lr, {every * i: stage_config.step_factor for i in range(1, total // every + 1)})
  else:
    schedule = optax.constant_schedule(base_lr)
  warmup = int(stage_config.warmup_epochs * steps_per_epoch)
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
  return schedule


def base_optimizer(config, schedule) -> optax.GradientTransformation:
  """SGD (weight decay in the loss, momentum) or AdamW, as `config.optimizer` says."""
  if config.optimizer == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum or None,
                                 nesterov=config.nesterov))
  return optax.adamw(schedule, weight_decay=config.weight_decay)


def make_optimizer(config, schedule, masks) -> optax.GradientTransformation:
  """`named_chain(base=base_optimizer, freeze=elementwise_freeze(masks))`.

  The freeze is last, after weight decay and momentum, so frozen weights get an
  update of exactly zero (paper Eq. 6). Named parts let a phase carry the base
  optimizer's state (`opt_state["base"]`) while taking the new masks.
  """
  return optax.named_chain(("base", base_optimizer(config, schedule)),
                           ("freeze", inq_jax.optim.elementwise_freeze(masks)))


def reset_count(base_state):
  """The base optimizer's state with its step count at 0 (the schedule restarts)."""
  try:
    return optax.tree_utils.tree_set(base_state, count=jnp.zeros([], jnp.int32))
  except KeyError:  # a constant learning rate keeps no count
    return base_state


# ------------------------------------------------------------------- steps


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def prepare_images(images, normalization):
  """The model's input: uint8 images normalized here, on the device.

  The input pipeline ships uint8 (4x fewer bytes than float32, and no serial
  per-image stage on the host); `normalization` is the dataset's ((mean,),
  (std,)) of images scaled to [0, 1]. None: `images` are used as they are
  (benchmarks that feed float batches).
  """
  if normalization is None:
    return images
  if images.dtype != jnp.uint8:
    raise TypeError(f"the step normalizes uint8 images on the device; got {images.dtype} "
                    "(pass normalization=None for images normalized already)")
  mean, std = (jnp.asarray(v, jnp.float32) for v in normalization)
  return (images.astype(jnp.float32) * jnp.float32(1 / 255) - mean) / std


def make_train_step(model, tx, devices: Devices, seed: int, normalization=None):
  """The jitted step for optimizer `tx`; rebuilt for every phase because `tx` changes.

  `normalization`: see `prepare_images` (the trainer passes the dataset's).
  """
  dropout_key = jax.random.key(seed)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(dropout_key, state.step)
    images = prepare_images(batch["image"], normalization)

    def loss_fn(params):
      logits, updates = model.apply(_variables(params, state.batch_stats), images,
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": rng})
      logits = logits.astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params)
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                          batch_stats=updates.get("batch_stats", state.batch_stats),
                          opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy}

  return jax.jit(step, in_shardings=(devices.replicated, devices.batch),
                 out_shardings=(devices.replicated, devices.replicated), donate_argnums=0)


def compile_step(train_step, state: TrainState, batch_size: int, image_shape,
                 devices: Devices, image_dtype=jnp.uint8):
  """Compiles a phase's step ahead of time: (executable, seconds)."""
  start = time.perf_counter()
  shape = (batch_size,) + tuple(image_shape)
  batch = {"image": jax.ShapeDtypeStruct(shape, image_dtype, sharding=devices.batch),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=devices.batch)}
  compiled = train_step.lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def make_eval_step(model, devices: Devices, top5: bool, normalization=None):
  """Jitted sums of correct predictions and loss over the unmasked examples of a batch."""

  def step(params, batch_stats, batch):
    images = prepare_images(batch["image"], normalization)
    logits = model.apply(_variables(params, batch_stats), images, train=False)
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    out = {"correct1": jnp.sum((jnp.argmax(logits, -1) == label) * mask),
           "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}
    if top5:
      hit = jnp.any(jax.lax.top_k(logits, 5)[1] == label[:, None], axis=-1)
      out["correct5"] = jnp.sum(hit * mask)
    return out

  return jax.jit(step, in_shardings=(devices.replicated, devices.replicated, devices.batch),
                 out_shardings=devices.replicated)


# ------------------------------------------------------------------ loops


def train_epoch(state: TrainState, train_step, batches, *, steps: int, devices: Devices,
                desc: str, on_step: Optional[Callable[[int], None]] = None):
  """Runs `steps` steps over `batches`: (state, {"train_loss", "train_accuracy", ...}).

  Metrics are fetched from the device in groups of 20 steps, not every step.
  """
  bar = reporting.progress(steps, desc)
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
    if n == steps:
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
