"""The jitted steps: one train step per stage or phase, one eval step per run.

Both take the uint8 images the input pipeline ships and normalize them on the
device (`prepare_images`); the train step passes the run state's frozen masks
to the optimizer with every update, so they are arguments of the compiled
step, never constants baked into it.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

from experiments.mesh import Devices
from experiments.train_state import TrainState


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

  `tx` gets the state's `frozen_masks()` as the extra argument `frozen_masks`
  (transforms that take no extra arguments ignore it). `normalization`: see
  `prepare_images` (the trainer passes the dataset's).
  """
  tx = optax.with_extra_args_support(tx)
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
    deltas, opt_state = tx.update(grads, state.opt_state, state.params,
                                  frozen_masks=state.frozen_masks())
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
