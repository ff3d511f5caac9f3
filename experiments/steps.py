"""The jitted steps: one train step per stage or phase, one eval step per run.

Both take the uint8 images the input pipeline ships and normalize them on the
device (`prepare_images`); the train step passes the run state's frozen masks
to the optimizer with every update, so they are arguments of the compiled
step, never constants baked into it. With distillation (`Distill`) the train
step also takes the teacher's variables as an argument, replicated like the
params, and runs the teacher in evaluation mode on the same batch.
`make_bn_stats_step` is the forward pass that re-estimates BatchNorm
statistics (train mode, no gradient).
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from experiments.mesh import Devices
from experiments.train_state import TrainState


def model_variables(params, batch_stats):
  """What `model.apply` takes: the params, and the BatchNorm statistics if the model has any."""
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


class Distill(NamedTuple):
  """Distillation from a teacher's soft predictions (`distillation_loss`)."""
  weight: float       # a: 0 = labels only, 1 = the teacher only
  temperature: float  # T > 0


def distillation_loss(logits, teacher_logits, labels, weight: float, temperature: float):
  """(1 - a) * CE(labels) + a * T^2 * KL(softmax(teacher / T) || softmax(student / T)).

  Hinton et al.'s knowledge distillation (arXiv:1503.02531): the T^2 keeps the
  soft term's gradient on the scale of the hard one's whatever T is. Means over
  the batch; `teacher_logits` get no gradient.

  Returns:
    (loss, cross-entropy with the labels, KL divergence at temperature T).
  """
  a, t = weight, temperature
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  teacher_log_p = jax.nn.log_softmax(teacher_logits / t)
  student_log_p = jax.nn.log_softmax(logits / t)
  kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1).mean()
  loss = (1 - a) * ce + a * t ** 2 * kl
  return loss, ce, kl


def make_train_step(model, tx, devices: Devices, seed: int, normalization=None,
                    distill: Optional[Distill] = None):
  """The jitted step for optimizer `tx`; rebuilt for every phase because `tx` changes.

  `tx` gets the state's `frozen_masks()` as the extra argument `frozen_masks`
  (transforms that take no extra arguments ignore it). `normalization`: see
  `prepare_images` (the trainer passes the dataset's).

  Without `distill` the step is `step(state, batch)` and its loss the
  cross-entropy with the labels. With it, `step(state, batch, teacher)`:
  `teacher` is the teacher's variables ({"params"(, "batch_stats")}), an
  argument replicated like the state (never a constant of the program), run
  in evaluation mode on the same images; the loss is `distillation_loss`.
  """
  tx = optax.with_extra_args_support(tx)
  dropout_key = jax.random.key(seed)

  def step(state: TrainState, batch, teacher=None):
    rng = jax.random.fold_in(dropout_key, state.step)
    images = prepare_images(batch["image"], normalization)
    if distill is not None:
      teacher_logits = model.apply(teacher, images, train=False).astype(jnp.float32)

    def loss_fn(params):
      logits, updates = model.apply(model_variables(params, state.batch_stats), images,
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": rng})
      logits = logits.astype(jnp.float32)
      if distill is None:
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      else:
        loss, _, _ = distillation_loss(logits, teacher_logits, batch["label"], distill.weight,
                                       distill.temperature)
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    deltas, opt_state = tx.update(grads, state.opt_state, state.params,
                                  frozen_masks=state.frozen_masks())
    state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, deltas),
                          batch_stats=updates.get("batch_stats", state.batch_stats),
                          opt_state=opt_state)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "accuracy": accuracy}

  in_shardings = (devices.replicated, devices.batch) + (
      () if distill is None else (devices.replicated,))  # the teacher: replicated
  return jax.jit(step, in_shardings=in_shardings,
                 out_shardings=(devices.replicated, devices.replicated), donate_argnums=0)


def compile_step(train_step, state: TrainState, batch_size: int, image_shape,
                 devices: Devices, image_dtype=jnp.uint8, teacher=None):
  """Compiles a phase's step ahead of time: (executable, seconds).

  `teacher`: the teacher's variables for a distilling step (`make_train_step`
  with `distill`), None otherwise.
  """
  start = time.perf_counter()
  shape = (batch_size,) + tuple(image_shape)
  batch = {"image": jax.ShapeDtypeStruct(shape, image_dtype, sharding=devices.batch),
           "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=devices.batch)}
  args = (state, batch) if teacher is None else (state, batch, teacher)
  compiled = train_step.lower(*args).compile()
  return compiled, time.perf_counter() - start


def make_eval_step(model, devices: Devices, top5: bool, normalization=None):
  """Jitted sums of correct predictions and loss over the unmasked examples of a batch."""

  def step(params, batch_stats, batch):
    images = prepare_images(batch["image"], normalization)
    logits = model.apply(model_variables(params, batch_stats), images, train=False)
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


def make_bn_stats_step(model, devices: Devices, normalization=None):
  """Jitted: the BatchNorm statistics after one batch in train mode, nothing else.

  `step(params, batch_stats, batch)` runs the model forward in train mode (each
  BatchNorm normalizes with the batch's statistics and moves its running ones
  toward them, with its own momentum) and returns the new `batch_stats`; no
  gradient, no dropout, the params are only read. `Run.reestimate_bn` runs it
  over train batches after a quantization step.
  """

  def step(params, batch_stats, batch):
    images = prepare_images(batch["image"], normalization)
    # A dropout key for the models whose train mode needs one; dropout never
    # feeds a BatchNorm in these models, so it does not change the statistics.
    _, updates = model.apply(model_variables(params, batch_stats), images, train=True,
                             mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
    return updates["batch_stats"]

  return jax.jit(step, in_shardings=(devices.replicated, devices.replicated, devices.batch),
                 out_shardings=devices.replicated)
