"""experiments.loops: the epoch loop and the evaluation every stage and tool shares.

Evaluation must count every test example exactly once whatever the device
count: the trainer rounds the eval batch up to a multiple of the devices
(`Devices.eval_batch_size`), the pipeline pads the last batch and masks the
padding, and the eval step sums over the unmasked examples only. This is
checked on 1 device here and on 3 and 8 fake CPU devices in subprocesses
(XLA_FLAGS must be set before JAX starts), with a model that predicts the
class written in each image, so that the exact accuracy and loss are known.

  XLA_FLAGS=--xla_force_host_platform_device_count=3 python tests/experiments/test_loops.py
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from experiments import loops, steps
from experiments.data import input_pipeline as ip
from experiments.mesh import Devices

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SHAPE = (4, 4, 1)
TEST_SIZE = 37  # a prime: no batch size or device count divides it
EVAL_BATCH_SIZES = (1, 10, 100)
CLASSES = 10


class Oracle(nn.Module):
  """Ranks the classes from the one written in the first pixel on; a parameter it does not use."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    self.param("unused", nn.initializers.zeros, (1,))
    predicted = x[:, 0, 0, 0].astype(jnp.int32)
    return -2.0 * ((jnp.arange(CLASSES)[None, :] - predicted[:, None]) % CLASSES)


def oracle_dataset(train_size=50):
  """Test example i predicts class i % 10; one in three is wrong, and half of those miss the top 5."""
  def split(n):
    images = np.zeros((n,) + SHAPE, np.uint8)
    predicted = np.arange(n) % CLASSES
    images[:, 0, 0, 0] = predicted
    off = np.where(np.arange(n) % 3, 0, np.where(np.arange(n) % 2, 1, 7))
    labels = ((predicted + off) % CLASSES).astype(np.int32)
    return ip._ArraySource(images, labels, "fashion_mnist"), off  # pylint: disable=protected-access

  (test, off), (train, _) = split(TEST_SIZE), split(train_size)
  data = ip.Dataset(name="fashion_mnist", num_classes=CLASSES, image_shape=SHAPE,
                    train_size=train_size, test_size=TEST_SIZE, augment=True,
                    train_source=train, test_source=test)
  return data, off


def expected(off):
  """Accuracy, top-5 accuracy and mean loss of the oracle, each label `off` ranks down."""
  logits = -2.0 * np.arange(CLASSES)  # by rank
  log_p = logits - np.log(np.exp(logits).sum())
  return {"accuracy": float(np.mean(off == 0)), "top5_accuracy": float(np.mean(off < 5)),
          "loss": float(np.mean(-log_p[off]))}


def evaluate_everything() -> dict:
  """What the trainer's evaluations give on this process's devices (JSON-able)."""
  devices = Devices()
  data, _ = oracle_dataset()
  params = {"unused": jnp.zeros(1)}
  eval_step = steps.make_eval_step(Oracle(), devices, top5=True)
  out = {"devices": devices.count,
         "eval_batch_size": {n: devices.eval_batch_size(n) for n in (1, devices.count + 1, 100)},
         "test": {}, "sample": {}}
  for size in EVAL_BATCH_SIZES:
    batches = list(loops.test_batches(data, size, devices))
    shapes = sorted({len(b["label"]) for b in batches})
    result = loops.evaluate(eval_step, params, {}, iter(batches), devices)
    out["test"][size] = {**result, "batch_shapes": shapes,
                         "counted": int(sum(b["mask"].sum() for b in batches))}
  # The train-split sample of a phase that does not train: every example counted.
  sample = list(loops.train_split_eval_batches(data, 100, devices, seed=0))
  rest = [b["image"].copy() for b in sample]
  for image in rest:
    image[:, 0, 0, 0] = 0
  out["sample"] = {"sizes": [len(b["label"]) for b in sample],
                   "masked": int(sum((~b["mask"]).sum() for b in sample)),
                   # the stored images: the class still in the first pixel, nothing elsewhere
                   "unaugmented": all(not image.any() for image in rest),
                   **loops.evaluate(eval_step, params, {}, iter(sample), devices)}
  return out


def check(out: dict, devices: int) -> None:
  _, off = oracle_dataset()
  want = expected(off)
  assert 0 < want["accuracy"] < want["top5_accuracy"] < 1
  assert out["devices"] == devices
  # Rounded up to the device count, never down.
  assert {int(k): v for k, v in out["eval_batch_size"].items()} == {
      1: devices, devices + 1: 2 * devices, 100: -(-100 // devices) * devices}
  for size, got in out["test"].items():
    assert got["counted"] == TEST_SIZE, (devices, size, got)
    assert all(s % devices == 0 for s in got["batch_shapes"]), (devices, size, got)
    assert got["accuracy"] == want["accuracy"], (devices, size, got)
    assert abs(got["loss"] - want["loss"]) <= 1e-5 * want["loss"], (devices, size, got)
    assert got["top5_accuracy"] == want["top5_accuracy"], (devices, size, got)
  sample = out["sample"]
  assert sample["masked"] == 0 and sum(sample["sizes"]) <= 50 and sample["unaugmented"]
  assert all(s % devices == 0 and s > 0 for s in sample["sizes"]), sample


def test_evaluation_counts_every_test_example_once_on_1_device():
  out = json.loads(json.dumps(evaluate_everything()))
  check(out, jax.device_count())


def test_evaluation_counts_every_test_example_once_on_3_and_8_devices():
  for n in (3, 8):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
               PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(json.loads(proc.stdout.strip().splitlines()[-1]), n)


# ------------------------------------------------------------ the epoch loop


class Counter:
  """A stand-in train step: counts steps and remembers each batch's labels."""

  def __init__(self):
    self.labels = []

  def __call__(self, state, batch):
    self.labels.append(np.asarray(batch["label"]))
    return state.replace(step=state.step + 1), {"loss": jnp.float32(len(self.labels)),
                                                "accuracy": jnp.float32(0.5)}


def test_train_epoch_runs_num_steps_from_the_states_step():
  from experiments.train_state import TrainState  # pylint: disable=g-import-not-at-top
  devices = Devices()
  state = TrainState(step=jnp.int32(7), params={}, batch_stats={}, opt_state={},
                     inq_state=None, keep={}, stage=jnp.int32(0), phase=jnp.int32(0),
                     epoch=jnp.int32(0))
  data, _ = oracle_dataset(train_size=50)
  batches = data.train_batches(10, 0, 3)
  step, seen = Counter(), []
  state, metrics = loops.train_epoch(state, step, batches, num_steps=3, devices=devices,
                                     desc="test", on_step=seen.append)
  # A resumed segment's steps are numbered on from the state's: 8, 9, 10.
  assert seen == [8, 9, 10] and int(state.step) == 10 and metrics["steps"] == 3
  assert metrics["train_loss"] == 2.0 and metrics["train_accuracy"] == 0.5  # means over 3
  want = [b["label"] for b in data.train_batches(10, 0, 3)][:3]
  assert len(step.labels) == 3
  for a, b in zip(step.labels, want):
    np.testing.assert_array_equal(a, b)


if __name__ == "__main__":
  print(json.dumps(evaluate_everything()))
