"""What the training loop is built from, tested directly (no trainer run).

experiments.optimizer (epoch_steps, learning_rate, the freeze), experiments.steps
(the jitted train and eval steps), experiments.loops (train_epoch, evaluate),
experiments.mesh (Devices) and experiments.train_state (TrainState).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import loops, optimizer, steps
from experiments.mesh import Devices
from experiments.train_state import BASELINE, INQ, TrainState
from inq_jax import prune
from inq_jax import quantize

SHAPE = (4, 4, 1)  # tiny images


class TinyNet(nn.Module):
  """A conv, BatchNorm and a dense layer: kernels to quantize, statistics to update."""
  batch_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (2, 2), padding="VALID")(x)
    if self.batch_norm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    return nn.Dense(5)(nn.relu(x).reshape(x.shape[0], -1))


def stage_config(**overrides):
  c = ml_collections.ConfigDict({"learning_rate": 0.1, "lr_schedule": "cosine",
                                 "step_epochs": 1.0, "step_factor": 0.1, "warmup_epochs": 0.0})
  c.update(overrides)
  return c


def run_config(opt="sgd"):
  return ml_collections.ConfigDict({"optimizer": opt, "momentum": 0.9, "nesterov": False,
                                    "weight_decay": 5e-4})


def batches(n, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch,) + SHAPE, dtype=np.uint8),
           "label": rng.integers(0, 5, batch).astype(np.int32)} for _ in range(n)]


def make_state(model, devices, inq_state=None, keep=None, opt="sgd"):
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE), train=False)
  params = variables["params"]
  if keep is None:  # nothing pruned, in the pruning's own layout
    keep = jax.tree.map(lambda x: np.ones(np.shape(x), bool), params)
  tx = optimizer.make_optimizer(run_config(opt), optimizer.learning_rate(stage_config(), 4, 1))
  state = TrainState(step=jnp.int32(0), params=params,
                     batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                     inq_state=inq_state, keep=keep, stage=jnp.int32(BASELINE),
                     phase=jnp.int32(0), epoch=jnp.int32(0))
  return devices.replicate(state), tx


NORM = ((0.5,), (0.25,))


# ------------------------------------------------------------ schedules


@pytest.mark.parametrize("epochs,per_epoch,want", [
    (2.0, 10, [10, 10]), (1.5, 4, [4, 2]), (0.46, 10, [5]), (0.0, 7, []), (0.01, 7, [])])
def test_epoch_steps(epochs, per_epoch, want):
  assert optimizer.epoch_steps(epochs, per_epoch) == want


def test_learning_rate_schedules():
  cosine = optimizer.learning_rate(stage_config(), 10, 2.0)  # 20 steps
  assert float(cosine(0)) == pytest.approx(0.1) and float(cosine(20)) == pytest.approx(0.0)
  assert float(cosine(10)) == pytest.approx(0.05)
  step = optimizer.learning_rate(stage_config(lr_schedule="step", step_epochs=0.5), 10, 2.0)
  assert [float(step(i)) for i in (0, 4, 5, 9, 10, 19)] == pytest.approx(
      [0.1, 0.1, 0.01, 0.01, 0.001, 1e-4])
  const = optimizer.learning_rate(stage_config(lr_schedule="constant"), 10, 3.0)
  assert float(const(0)) == float(const(29)) == pytest.approx(0.1)
  warm = optimizer.learning_rate(stage_config(lr_schedule="constant", warmup_epochs=1.0), 10,
                                 2.0)
  assert [float(warm(i)) for i in (0, 5, 10, 15)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_reset_count_restarts_the_schedule():
  tx = optimizer.base_optimizer(run_config(), optimizer.learning_rate(stage_config(), 4, 1))
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update({"w": jnp.ones(3)}, state, params)
  counts = lambda s: [int(v) for _, v in optax.tree_utils.tree_get_all_with_path(s, "count")]
  assert counts(state) == [3]
  assert counts(optimizer.reset_count(state)) == [0]
  # a constant learning rate keeps no count: returned as it is
  plain = optax.sgd(0.1).init(params)
  assert optimizer.reset_count(plain) is plain


# ------------------------------------------------------------ train step


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_freeze_through_extra_args_keeps_frozen_weights_bit_identical(opt):
  model, devices = TinyNet(), Devices()
  params = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"]
  inq_state = quantize.init(params, quantize.INQConfig(bits=4, portions=(0.5, 1.0)))
  params, inq_state = quantize.advance(params, inq_state)
  masks = jax.tree.map(np.asarray, inq_state.masks)  # the step donates the state's own
  state, tx = make_state(model, devices, inq_state=inq_state, opt=opt)
  state = state.replace(params=devices.replicate(params))
  # The optimizer state holds no masks: the step passes the state's own.
  assert not jax.tree.leaves(state.opt_state["freeze"])
  before = jax.tree.map(np.asarray, state.params)
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  for batch in batches(4):
    state, _ = step(state, devices.put_batch(batch))
  for layer in ("Conv_0", "Dense_0"):
    m = masks[layer]["kernel"]
    old, new = before[layer]["kernel"], np.asarray(state.params[layer]["kernel"])
    assert m.any() and old[m].tobytes() == new[m].tobytes(), layer
    assert np.any(old[~m] != new[~m]), layer  # the float weights trained
  assert int(state.step) == 4


def test_before_inq_the_pruned_weights_stay_zero():
  model, devices = TinyNet(), Devices()
  params = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))["params"]
  keep = prune.prune_masks(params, prune.PruneConfig(sparsity=0.5), 1)
  pruned = ~np.asarray(keep["Dense_0"]["kernel"])  # the step donates the state's own
  state, tx = make_state(model, devices, keep=keep)
  state = state.replace(params=devices.replicate(prune.apply(params, keep)))
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  for batch in batches(3):
    state, _ = step(state, devices.put_batch(batch))
  kernel = np.asarray(state.params["Dense_0"]["kernel"])
  assert pruned.any() and (kernel[pruned] == 0).all() and not np.signbit(kernel[pruned]).any()
  assert (kernel[~pruned] != 0).all()


def test_batch_statistics_move_in_the_train_step_not_in_evaluation():
  model, devices = TinyNet(batch_norm=True), Devices()
  state, tx = make_state(model, devices)
  stats = jax.tree.map(np.asarray, state.batch_stats)
  eval_step = steps.make_eval_step(model, devices, top5=False, normalization=NORM)
  data = [{**b, "mask": np.ones(8, bool)} for b in batches(2, seed=1)]
  first = loops.evaluate(eval_step, state.params, state.batch_stats, data, devices)
  assert loops.evaluate(eval_step, state.params, state.batch_stats, data, devices) == first
  jax.tree.map(np.testing.assert_array_equal, stats, jax.tree.map(np.asarray, state.batch_stats))
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  state, _ = step(state, devices.put_batch(batches(1)[0]))
  moved = jax.tree.map(lambda a, b: bool(np.any(a != np.asarray(b))), stats, state.batch_stats)
  assert all(jax.tree.leaves(moved))


def test_prepare_images_normalizes_uint8_on_the_device():
  images = jnp.asarray([[0, 255]], jnp.uint8)
  np.testing.assert_allclose(steps.prepare_images(images, NORM), [[-2.0, 2.0]], rtol=1e-6)
  floats = jnp.ones((1, 2))
  assert steps.prepare_images(floats, None) is floats
  with pytest.raises(TypeError, match="normalizes uint8 images"):
    steps.prepare_images(floats, NORM)


def test_compiled_step_and_train_epoch():
  model, devices = TinyNet(), Devices()
  state, tx = make_state(model, devices)
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  compiled, seconds = steps.compile_step(step, state, 8, SHAPE, devices)
  assert seconds >= 0
  seen = []
  state, metrics = loops.train_epoch(state, compiled, iter(batches(5)), num_steps=3,
                                     devices=devices, desc="test", on_step=seen.append)
  assert seen == [1, 2, 3] and int(state.step) == 3 and metrics["steps"] == 3
  assert np.isfinite(metrics["train_loss"]) and 0 <= metrics["train_accuracy"] <= 1


def reference_loss(model, images, labels):
  """Mean cross entropy of `model` on uint8 `images`, normalized here by hand (NORM)."""
  x = (np.asarray(images, np.float32) / 255 - NORM[0][0]) / NORM[1][0]

  def loss(params):
    logits = model.apply({"params": params}, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  return loss


def test_the_step_is_sgd_with_momentum_on_the_mean_loss_plus_weight_decay():
  """Two steps against paper Sec. 2.3 by hand: v = g + wd w + m v, w -= lr(t) v."""
  model, devices = TinyNet(), Devices()
  state, tx = make_state(model, devices)
  c, lr = run_config(), optimizer.learning_rate(stage_config(), 4, 1)  # make_state's
  w = jax.tree.map(np.asarray, state.params)
  velocity = jax.tree.map(np.zeros_like, w)
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  for t, batch in enumerate(batches(2, seed=3)):
    grads = jax.grad(reference_loss(model, batch["image"], jnp.asarray(batch["label"])))(w)
    velocity = jax.tree.map(lambda g, p, v: g + c.weight_decay * p + c.momentum * v, grads, w,
                            velocity)
    w = jax.tree.map(lambda p, v: p - float(lr(t)) * v, w, velocity)
    state, metrics = step(state, devices.put_batch(batch))
    for path, want in enumerate(jax.tree.leaves(w)):
      np.testing.assert_allclose(np.asarray(jax.tree.leaves(state.params)[path]), want,
                                 rtol=2e-5, atol=1e-7, err_msg=f"step {t}")
  assert float(lr(1)) < float(lr(0))  # the schedule moved on with the step count


class DropNet(nn.Module):
  """Dropout before the dense layer: the gradient depends on the dropout draw."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.5, deterministic=not train)(x.reshape(x.shape[0], -1))
    return nn.Dense(5)(x)


def test_dropout_draws_anew_every_step_and_the_same_for_the_same_step_and_seed():
  model, devices = DropNet(), Devices()
  batch = batches(1, seed=4)[0]

  def trained(at_step, seed):
    state, tx = make_state(model, devices)
    state = state.replace(step=devices.replicate(jnp.int32(at_step)))
    step = steps.make_train_step(model, tx, devices, seed=seed, normalization=NORM)
    state, _ = step(state, devices.put_batch(batch))
    return np.asarray(state.params["Dense_0"]["kernel"])

  first = trained(0, seed=0)
  assert first.tobytes() == trained(0, seed=0).tobytes()  # a resumed step draws the same
  assert not np.array_equal(first, trained(1, seed=0))  # the next step draws anew
  assert not np.array_equal(first, trained(0, seed=1))  # another seed draws otherwise


# ------------------------------------------------------------ evaluation


class Oracle(nn.Module):
  """Predicts the class written in each image's first pixel; a trivial parameter."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    self.param("unused", nn.initializers.zeros, (1,))
    return 10.0 * jax.nn.one_hot(x[:, 0, 0, 0].astype(jnp.int32), 5)


def test_evaluation_counts_every_unmasked_example_once():
  devices = Devices()
  eval_step = steps.make_eval_step(Oracle(), devices, top5=False)
  params = {"unused": jnp.zeros(1)}

  def batch(predicted, labels, real):
    image = np.zeros((len(labels),) + SHAPE, np.float32)
    image[:, 0, 0, 0] = predicted
    return {"image": image, "label": np.asarray(labels, np.int32),
            "mask": np.arange(len(labels)) < real}

  # 10 real examples, 7 right; the padded tail of the last batch is all "right"
  # and must count nowhere.
  data = [batch([0, 1, 2, 3], [0, 1, 2, 0], 4), batch([4, 4, 1, 1], [4, 4, 0, 1], 4),
          batch([2, 3, 3, 3], [2, 0, 3, 3], 2)]
  got = loops.evaluate(eval_step, params, {}, data, devices)
  assert got["accuracy"] == 7 / 10
  assert "top5_accuracy" not in got
  top5 = steps.make_eval_step(Oracle(), devices, top5=True)
  assert loops.evaluate(top5, params, {}, data, devices)["top5_accuracy"] == 1.0


def test_the_eval_loss_is_the_mean_over_the_unmasked_examples():
  devices = Devices()
  eval_step = steps.make_eval_step(Oracle(), devices, top5=False)
  image = np.zeros((8,) + SHAPE, np.float32)
  image[:, 0, 0, 0] = [0, 1, 2, 3, 4, 0, 0, 0]  # predicted classes
  labels = np.asarray([0, 1, 2, 0, 1, 3, 3, 3], np.int32)  # 3 wrong, then 3 padding
  got = loops.evaluate(eval_step, {"unused": jnp.zeros(1)}, {},
                       [{"image": image, "label": labels, "mask": np.arange(8) < 5}], devices)
  logits = 10.0 * np.eye(5)[image[:5, 0, 0, 0].astype(int)]
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -np.mean(log_p[np.arange(5), labels[:5]])
  assert got["loss"] == pytest.approx(want, rel=1e-5)
  assert got["accuracy"] == 3 / 5


class NormNet(nn.Module):
  """BatchNorm and dropout: what evaluation must run in inference mode."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
    return nn.Dense(5)(x)


def test_evaluation_uses_the_running_statistics_and_no_dropout():
  model, devices = NormNet(), Devices()
  variables = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))
  rng = np.random.default_rng(5)  # running statistics far from any batch's own
  stats = {"BatchNorm_0": {"mean": rng.normal(size=6).astype(np.float32),
                           "var": rng.uniform(0.5, 4, size=6).astype(np.float32)}}
  data = [{**b, "mask": np.ones(8, bool)} for b in batches(2, seed=6)]
  eval_step = steps.make_eval_step(model, devices, top5=False, normalization=NORM)
  got = loops.evaluate(eval_step, variables["params"], stats, data, devices)
  x = np.concatenate([(b["image"] / 255 - NORM[0][0]) / NORM[1][0] for b in data]).astype(
      np.float32)
  y = np.concatenate([b["label"] for b in data])
  logits = model.apply({"params": variables["params"], "batch_stats": stats}, x, train=False)
  loss = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), y[:, None], 1))
  assert got["loss"] == pytest.approx(float(loss), rel=1e-5)
  assert got["accuracy"] == np.mean(np.argmax(logits, -1) == y)


def test_devices():
  devices = Devices()
  n = devices.count
  assert devices.eval_batch_size(1) == n and devices.eval_batch_size(n + 1) == 2 * n
  put = devices.put_batch({"x": np.arange(2 * n)})
  assert put["x"].sharding == devices.batch
  devices.check_all_reduce()


def test_train_state_position():
  state = TrainState(step=jnp.int32(7), params={}, batch_stats={}, opt_state={},
                     inq_state=None, keep={}, stage=jnp.int32(BASELINE), phase=jnp.int32(2),
                     epoch=jnp.int32(3))
  moved = state.at(INQ, 1)
  assert (int(moved.stage), int(moved.phase), int(moved.epoch), int(moved.step)) == (INQ, 1, 0, 7)
  assert state.variables == {"params": {}, "batch_stats": {}}
