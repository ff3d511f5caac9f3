"""The low-bit options' steps (issue #32), tested directly: the distilling train step and
the BatchNorm statistics step.

What must hold:
- the distillation loss is (1 - a) CE + a T^2 KL(softmax(teacher / T) || softmax(student / T)),
  checked against float64 numpy for several (a, T);
- the distilling step runs the teacher in evaluation mode (its running BN statistics, no
  dropout) on the same normalized batch, and its update is the gradient of that loss;
- the teacher is an argument of the compiled step, replicated, beside a sharded batch,
  and a 4-device step gives the 1-device loss and update;
- the BN statistics step moves the running statistics as flax's train mode does and
  returns nothing else: no weight changes.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import optimizer, steps
from experiments.mesh import Devices
from experiments.train_state import BASELINE, TrainState

SHAPE = (4, 4, 1)
NORM = ((0.5,), (0.25,))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class BNNet(nn.Module):
  """A conv, BatchNorm, dropout and a dense layer: train and evaluation mode differ."""
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(3, (2, 2), padding="VALID")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
    x = nn.relu(x).reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(5)(x)


def batches(n, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch,) + SHAPE, dtype=np.uint8),
           "label": rng.integers(0, 5, batch).astype(np.int32)} for _ in range(n)]


def make_tx():
  c = ml_collections.ConfigDict({"optimizer": "sgd", "momentum": 0.9, "nesterov": False,
                                 "weight_decay": 5e-4})
  stage = ml_collections.ConfigDict({"learning_rate": 0.1, "lr_schedule": "constant",
                                     "step_epochs": 1.0, "step_factor": 0.1,
                                     "warmup_epochs": 0.0})
  return optimizer.make_optimizer(c, optimizer.learning_rate(stage, 4, 1))


def student_and_teacher(model):
  student = model.init(jax.random.key(0), jnp.zeros((1,) + SHAPE))
  teacher = model.init(jax.random.key(1), jnp.zeros((1,) + SHAPE))
  # Running statistics unlike any batch's (the init's are mean 0, variance 1):
  # evaluation mode and train mode disagree.
  stats = teacher["batch_stats"]["BatchNorm_0"]
  teacher = {"params": teacher["params"], "batch_stats": {"BatchNorm_0": {
      "mean": stats["mean"] - jnp.asarray([0.3, -0.2, 0.1]), "var": stats["var"] * 0.3}}}
  return student, teacher


def make_state(student, tx, devices):
  student = jax.tree.map(np.array, student)  # copies: the step donates the state
  params = student["params"]
  return devices.replicate(TrainState(
      step=jnp.int32(0), params=params, batch_stats=student["batch_stats"],
      opt_state=tx.init(params), inq_state=None,
      keep=jax.tree.map(lambda x: np.ones(np.shape(x), bool), params),
      stage=jnp.int32(BASELINE), phase=jnp.int32(0), epoch=jnp.int32(0)))


def numpy_loss(logits, teacher_logits, labels, a, t):
  """The distillation loss in float64 numpy, written from the formula."""
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  logits, teacher_logits = np.float64(logits), np.float64(teacher_logits)
  ce = -log_softmax(logits)[np.arange(len(labels)), labels].mean()
  p = np.exp(log_softmax(teacher_logits / t))
  kl = (p * (np.log(p) - log_softmax(logits / t))).sum(-1).mean()
  return (1 - a) * ce + a * t * t * kl, ce, kl


# ------------------------------------------------------------ the loss


@pytest.mark.parametrize("a,t", [(0.5, 4.0), (1.0, 2.0), (0.3, 1.0), (0.0, 3.0)])
def test_distillation_loss_is_the_formula(a, t):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (16, 7)).astype(np.float32)
  teacher = rng.normal(0, 3, (16, 7)).astype(np.float32)
  labels = rng.integers(0, 7, 16).astype(np.int32)
  got = steps.distillation_loss(jnp.asarray(logits), jnp.asarray(teacher), jnp.asarray(labels),
                                a, t)
  np.testing.assert_allclose(np.float64(got), numpy_loss(logits, teacher, labels, a, t),
                             rtol=2e-5, atol=1e-6)


def test_distillation_loss_is_zero_kl_for_the_teacher_itself_and_gives_no_teacher_gradient():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(0, 2, (8, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 8), jnp.int32)
  loss, ce, kl = steps.distillation_loss(logits, logits, labels, 1.0, 2.0)
  assert abs(float(kl)) < 1e-6 and abs(float(loss)) < 1e-5 and float(ce) > 0
  grad = jax.grad(lambda t: steps.distillation_loss(logits, t, labels, 0.5, 2.0)[0])(logits + 1)
  assert not np.any(np.asarray(grad))


# ------------------------------------------------------------ the distilling step


@pytest.mark.parametrize("a,t", [(0.5, 4.0), (1.0, 1.0)])
def test_distilling_step_runs_the_teacher_in_evaluation_mode_and_descends_the_loss(a, t):
  model, devices = BNNet(dropout=0.5), Devices()
  student, teacher = student_and_teacher(model)
  tx = make_tx()
  state = make_state(student, tx, devices)
  batch = batches(1)[0]
  images = steps.prepare_images(jnp.asarray(batch["image"]), NORM)
  labels = jnp.asarray(batch["label"])
  rng = jax.random.fold_in(jax.random.key(0), 0)  # the step's dropout key at step 0
  teacher_logits = model.apply(teacher, images, train=False)  # evaluation mode

  def reference_loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": student["batch_stats"]}, images,
                            train=True, mutable=["batch_stats"], rngs={"dropout": rng})
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    p = jax.nn.softmax(teacher_logits / t)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits / t)), -1).mean()
    return (1 - a) * ce + a * t * t * kl

  want_loss, grads = jax.value_and_grad(reference_loss)(student["params"])
  np.testing.assert_allclose(
      want_loss, numpy_loss(model.apply({"params": student["params"], "batch_stats":
                                          student["batch_stats"]}, images, train=True,
                                         mutable=["batch_stats"], rngs={"dropout": rng})[0],
                            teacher_logits, batch["label"], a, t)[0], rtol=1e-5)
  deltas, _ = optax.with_extra_args_support(tx).update(
      grads, tx.init(student["params"]), student["params"],
      frozen_masks=jax.tree.map(lambda x: np.zeros(np.shape(x), bool), student["params"]))
  want_params = optax.apply_updates(student["params"], deltas)

  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM,
                               distill=steps.Distill(a, t))
  new, metrics = step(state, devices.put_batch(batch), devices.replicate(teacher))
  np.testing.assert_allclose(float(metrics["loss"]), float(want_loss), rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7),
               jax.device_get(new.params), jax.device_get(want_params))
  # A teacher in train mode (its batch statistics, dropout on) would give another loss.
  train_mode = model.apply(teacher, images, train=True, mutable=["batch_stats"],
                           rngs={"dropout": rng})[0]
  assert abs(numpy_loss(np.asarray(train_mode), teacher_logits, batch["label"], 1.0, t)[2]) > 1e-3


def test_distilling_step_takes_the_teacher_as_a_replicated_argument():
  model, devices = BNNet(), Devices()
  student, teacher = student_and_teacher(model)
  tx = make_tx()
  state = make_state(student, tx, devices)
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM,
                               distill=steps.Distill(0.5, 2.0))
  teacher = devices.replicate(teacher)
  compiled, _ = steps.compile_step(step, state, 8, SHAPE, devices, teacher=teacher)
  shardings = compiled.input_shardings[0]
  teacher_shardings = jax.tree.leaves(shardings[2])
  assert teacher_shardings and all(s.is_fully_replicated for s in teacher_shardings)
  assert not jax.tree.leaves(shardings[1])[0].is_fully_replicated or devices.count == 1
  # Another teacher, same program: the teacher is an argument, not a constant.
  other = jax.tree.map(lambda x: x * 0.5, teacher)
  batch = devices.put_batch(batches(1)[0])
  _, m1 = compiled(jax.tree.map(jnp.copy, state), batch, teacher)
  _, m2 = compiled(jax.tree.map(jnp.copy, state), batch, other)
  assert float(m1["loss"]) != float(m2["loss"])


def test_without_distillation_the_step_takes_no_teacher():
  model, devices = BNNet(), Devices()
  student, _ = student_and_teacher(model)
  tx = make_tx()
  step = steps.make_train_step(model, tx, devices, seed=0, normalization=NORM)
  state = make_state(student, tx, devices)
  _, metrics = step(state, devices.put_batch(batches(1)[0]))
  assert np.isfinite(float(metrics["loss"]))


_SHARDED = r"""
import jax, jax.numpy as jnp, numpy as np, sys
sys.path.insert(0, {here!r})
import test_lowbit_steps as t
from experiments import steps
from experiments.mesh import Devices
assert jax.device_count() == 4
model, devices = t.BNNet(), Devices()
student, teacher = t.student_and_teacher(model)
tx = t.make_tx()
out = []
for mesh in (devices, None):
  if mesh is None:  # one device of the four
    one = Devices.__new__(Devices)
    one.mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    one.replicated = jax.sharding.NamedSharding(one.mesh, jax.sharding.PartitionSpec())
    one.batch = jax.sharding.NamedSharding(one.mesh, jax.sharding.PartitionSpec("data"))
    one.count, one.sync_each_step = 1, True
    mesh = one
  step = steps.make_train_step(model, tx, mesh, seed=0, normalization=t.NORM,
                               distill=steps.Distill(0.5, 4.0))
  state = t.make_state(student, tx, mesh)
  for batch in t.batches(3):
    state, m = step(state, mesh.put_batch(batch), mesh.replicate(teacher))
    jax.block_until_ready(state)
  out.append((float(m["loss"]), jax.device_get(state.params)))
(l4, p4), (l1, p1) = out
assert abs(l4 - l1) < 1e-5 * max(1, abs(l1)), (l4, l1)
jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), p4, p1)
print("ok", l4, l1)
"""


def test_distilling_step_on_4_devices_matches_1_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  here = os.path.dirname(os.path.abspath(__file__))
  proc = subprocess.run([sys.executable, "-c", _SHARDED.format(here=here)], env=env,
                        capture_output=True, text=True, timeout=600, check=False, cwd=ROOT)
  assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# ------------------------------------------------------------ BN statistics


def test_bn_stats_step_moves_the_running_statistics_and_nothing_else():
  model, devices = BNNet(dropout=0.5), Devices()
  student, _ = student_and_teacher(model)
  params = devices.replicate(student["params"])
  before = jax.tree.map(np.asarray, params)
  stats = devices.replicate(student["batch_stats"])
  step = steps.make_bn_stats_step(model, devices, normalization=NORM)
  want = student["batch_stats"]
  for batch in batches(3, seed=4):
    stats = step(params, stats, devices.put_batch(batch))
    images = steps.prepare_images(jnp.asarray(batch["image"]), NORM)
    # flax's BatchNorm in train mode: running = 0.9 running + 0.1 batch (biased variance)
    x = nn.Conv(3, (2, 2), padding="VALID").apply({"params": student["params"]["Conv_0"]},
                                                  images)
    mean, var = np.mean(np.float64(x), (0, 1, 2)), np.var(np.float64(x), (0, 1, 2))
    bn = want["BatchNorm_0"]
    want = {"BatchNorm_0": {"mean": 0.9 * np.float64(bn["mean"]) + 0.1 * mean,
                            "var": 0.9 * np.float64(bn["var"]) + 0.1 * var}}
  got = jax.device_get(stats)
  for k in ("mean", "var"):
    np.testing.assert_allclose(got["BatchNorm_0"][k], want["BatchNorm_0"][k], rtol=1e-4,
                               atol=1e-6)
  assert set(jax.device_get(stats)) == {"BatchNorm_0"}
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(params))
