"""Benchmark: what `inq_jax.optim.elementwise_freeze` adds to a train step.

    python -m experiments.benchmarks.step_overhead [--batch 128] [--repeats 15]

The default job's LeNet train step (SGD momentum + weight decay) with the
trainer's optimizer (`optimizer.make_optimizer`: base, then the freeze, which
takes the state's masks with every update), half of every kernel frozen,
against the same step with `base` alone: same batch, same jitted step builder, both
compiled first, then `--repeats` interleaved rounds of `--steps` steps each.
Prints one JSON line; `ratio` is the median of the per-round time ratios
(freeze / base). Target: ratio <= 1.02.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import models, optimizer, steps
from experiments.mesh import Devices
from experiments.train_state import INQ, TrainState
from experiments.configs import fashion_mnist_lenet
from inq_jax import quantize


def _state(run_devices, params, tx, inq_state):
  return run_devices.replicate(TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
      opt_state=tx.init(params), inq_state=inq_state, keep=None, stage=jnp.int32(INQ),
      phase=jnp.int32(0), epoch=jnp.int32(0)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
  args = parser.parse_args()

  config = fashion_mnist_lenet.get_config()
  devices = Devices()
  model = models.from_config(config, 10)  # the default job's LeNet, its CPU options included
  params = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))["params"]
  state = quantize.init(params, quantize.INQConfig(bits=5, portions=(0.5, 1.0)))
  params, state = quantize.advance(params, state)  # half of every kernel frozen
  schedule = optimizer.learning_rate(config.inq, 469, 1)
  rng = np.random.default_rng(0)
  batch = devices.put_batch({
      "image": rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32),
      "label": rng.integers(0, 10, args.batch).astype(np.int32)})

  variants = {}
  for name in ("base", "freeze"):
    tx = (optimizer.base_optimizer(config, schedule) if name == "base"
          else optimizer.make_optimizer(config, schedule))
    # Own copies: the step donates its state, which would delete shared buffers.
    ts = _state(devices, jax.tree.map(jnp.copy, params), tx,
                jax.tree.map(jnp.copy, state))
    step = steps.make_train_step(model, tx, devices, seed=0).lower(ts, batch).compile()
    for _ in range(3):  # warm up
      ts, _ = step(ts, batch)
    jax.block_until_ready(ts)
    variants[name] = [step, ts]

  def timed(name):
    step, ts = variants[name]
    start = time.perf_counter()
    for _ in range(args.steps):
      ts, _ = step(ts, batch)
      if devices.sync_each_step:
        jax.block_until_ready(ts)
    jax.block_until_ready(ts)
    variants[name][1] = ts
    return (time.perf_counter() - start) / args.steps

  ratios, base_ms, freeze_ms = [], [], []
  for r in range(args.repeats):
    order = ("base", "freeze") if r % 2 == 0 else ("freeze", "base")
    t = {name: timed(name) for name in order}
    ratios.append(t["freeze"] / t["base"])
    base_ms.append(1e3 * t["base"])
    freeze_ms.append(1e3 * t["freeze"])
  print(json.dumps({
      "benchmark": "step_overhead", "ratio": round(float(np.median(ratios)), 4),
      "target": 1.02, "base_step_ms": round(float(np.median(base_ms)), 2),
      "freeze_step_ms": round(float(np.median(freeze_ms)), 2),
      "ratio_min": round(float(np.min(ratios)), 4), "ratio_max": round(float(np.max(ratios)), 4),
      "batch": args.batch, "steps_per_round": args.steps, "repeats": args.repeats,
      "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "jax": jax.__version__}))


if __name__ == "__main__":
  main()
