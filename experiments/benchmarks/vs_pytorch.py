"""Benchmark: the LeNet train step in JAX (the project's jitted step) against PyTorch.

    python -m experiments.benchmarks.vs_pytorch [--batch 128] [--steps 10] [--repeats 15]

The same LeNet (conv 20 5x5 VALID -> relu -> max-pool 2x2 -> conv 50 5x5 VALID
-> relu -> max-pool 2x2 -> flatten -> dense 500 -> relu -> dense 10), the same
batch (128 random 28x28x1 images, already in memory on both sides), the same
optimizer (SGD lr 0.01, momentum 0.9, weight decay 5e-4 added to the gradient)
and the same thread count, timed in one process in interleaved rounds:

* `jax_freeze`: `experiments.steps.make_train_step` with `optimizer.make_optimizer`
  (base SGD chained with INQ's `elementwise_freeze`, half of every kernel
  frozen), compiled ahead of time, state donated, as training runs it;
* `jax_base`: the same step with the base optimizer alone (no freeze);
* `torch`: `torch.optim.SGD(momentum=0.9, weight_decay=5e-4)` in eager PyTorch,
  NCHW, no freeze (PyTorch does strictly less work than `jax_freeze`);
* `jax_xla_conv`: `jax_freeze` with `LeNet(cpu_matmul_conv=False)`, i.e. XLA's
  own convolutions instead of `experiments.models.cpu_conv`'s matrix products.

`ratio` is the median over rounds of jax_freeze / torch (target <= 1.0);
`ratio_base` the same for jax_base; `matmul_conv_speedup` the median of
jax_xla_conv / jax_freeze (what the CPU convolution buys). `--profile` adds a
breakdown: forward alone and forward+backward (no optimizer) on each side.

Threads: `--threads N` (default: the CPUs this process may use) pins the whole
process to N CPUs (`os.sched_setaffinity`, before JAX starts its thread pools)
and sets PyTorch to N threads, so both sides get the same cores. XLA:CPU has no
thread-count knob: `XLA_FLAGS=--xla_cpu_multi_thread_eigen=false` alone does
not make it single-threaded (its runtime still runs independent ops and
partitioned loops on other threads: unpinned it took 69-72 ms a step, pinned
to one core 104-140 ms), so earlier one-thread ratios measured with that flag gave
XLA two cores against PyTorch's one. On a loaded machine (load average above
the core count) PyTorch's OpenMP kernels slow down far more than XLA's: read
`load_average` before trusting `ratio`.

Prints one JSON line (skips, with a message and exit status 0, when torch is
not installed: `{"benchmark": "vs_pytorch", "skipped": "..."}`).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import models, optimizer, steps
from experiments.mesh import Devices
from experiments.train_state import INQ, TrainState
from experiments.configs import fashion_mnist_lenet
from inq_jax import quantize

LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4


def _torch_lenet(torch, params):
  """PyTorch LeNet with the JAX model's weights (HWIO -> OIHW, NHWC flatten order)."""
  nn = torch.nn

  class LeNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 20, 5)
      self.conv2 = nn.Conv2d(20, 50, 5)
      self.fc1 = nn.Linear(800, 500)
      self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
      x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2, 2)
      x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2, 2)
      x = torch.flatten(x, 1)
      return self.fc2(torch.relu(self.fc1(x)))

  net = LeNet()
  p = jax.tree.map(np.array, params)  # writable copies
  with torch.no_grad():
    for name in ("conv1", "conv2"):
      oihw = np.ascontiguousarray(p[name]["kernel"].transpose(3, 2, 0, 1))
      getattr(net, name).weight.copy_(torch.from_numpy(oihw))
      getattr(net, name).bias.copy_(torch.from_numpy(np.array(p[name]["bias"])))
    # JAX flattens [B, 4, 4, 50] (h, w, c); PyTorch flattens [B, 50, 4, 4] (c, h, w).
    fc1 = p["fc1"]["kernel"].reshape(4, 4, 50, 500).transpose(2, 0, 1, 3).reshape(800, 500)
    net.fc1.weight.copy_(torch.from_numpy(np.ascontiguousarray(fc1.T)))
    net.fc1.bias.copy_(torch.from_numpy(np.array(p["fc1"]["bias"])))
    net.fc2.weight.copy_(torch.from_numpy(np.ascontiguousarray(p["fc2"]["kernel"].T)))
    net.fc2.bias.copy_(torch.from_numpy(np.array(p["fc2"]["bias"])))
  return net


def _state(devices, params, tx, inq_state):
  return devices.replicate(TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats={},
      opt_state=tx.init(params), inq_state=inq_state, keep=None, stage=jnp.int32(INQ),
      phase=jnp.int32(0), epoch=jnp.int32(0)))


def _median(xs):
  return round(float(np.median(xs)), 4)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
  parser.add_argument("--repeats", type=int, default=15, help="interleaved rounds")
  parser.add_argument("--threads", type=int, default=0,
                      help="CPUs for both sides: the process is pinned to this many and "
                           "PyTorch gets as many threads (0: all the process may use)")
  parser.add_argument("--profile", action="store_true",
                      help="also time forward and forward+backward alone on each side")
  args = parser.parse_args()
  try:  # torch is optional: without it the benchmark says it skipped
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    print(json.dumps({"benchmark": "vs_pytorch", "skipped": "torch is not installed"}))
    return
  cpus = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(cpus)
  if not 0 < threads <= len(cpus):
    raise ValueError(f"--threads {threads}: this process may use only {len(cpus)} CPUs")
  # Before JAX's backend starts (its thread pools are sized to the CPUs it
  # may use): both sides get the same cores.
  os.sched_setaffinity(0, cpus[:threads])
  torch.set_num_threads(threads)

  config = fashion_mnist_lenet.get_config()
  config.weight_decay, config.momentum, config.nesterov = WEIGHT_DECAY, MOMENTUM, False
  config.optimizer = "sgd"
  devices = Devices()
  model = models.from_config(config, 10)  # the default job's LeNet, its CPU options included
  params = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))["params"]
  inq_state = quantize.init(params, quantize.INQConfig(bits=5, portions=(0.5, 1.0)))
  params, inq_state = quantize.advance(params, inq_state)  # half of every kernel frozen
  schedule = optimizer.learning_rate(config.inq, 469, 1)  # cosine from 0.01: one scalar op
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, args.batch).astype(np.int32)
  batch = devices.put_batch({"image": images, "label": labels})

  runners = {}
  for name in ("jax_freeze", "jax_base", "jax_xla_conv"):
    tx = (optimizer.base_optimizer(config, schedule) if name == "jax_base"
          else optimizer.make_optimizer(config, schedule))
    ts = _state(devices, jax.tree.map(jnp.copy, params), tx, jax.tree.map(jnp.copy, inq_state))
    net = model.clone(cpu_matmul_conv=False) if name == "jax_xla_conv" else model
    step = steps.make_train_step(net, tx, devices, seed=0).lower(ts, batch).compile()
    box = [ts]

    def run(n, step=step, box=box):
      ts = box[0]
      for _ in range(n):
        ts, _ = step(ts, batch)
      jax.block_until_ready(ts)
      box[0] = ts
    runners[name] = run

  net = _torch_lenet(torch, params)
  opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  x_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(labels.astype(np.int64))
  loss_fn = torch.nn.CrossEntropyLoss()

  def torch_run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x_t), y_t)
      loss.backward()
      opt.step()
  runners["torch"] = torch_run

  # Same function on both sides: check the models agree before timing them.
  with torch.no_grad():
    torch_logits = net(x_t).numpy()
  jax_logits = np.asarray(model.apply({"params": params}, images))
  max_logit_diff = float(np.max(np.abs(torch_logits - jax_logits)))

  if args.profile:
    fwd = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def jloss(p, x, y):
      logits = model.apply({"params": p}, x)
      return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    grad = jax.jit(jax.grad(jloss))
    xj, yj = batch["image"], batch["label"]

    def jax_fwd(n):
      for _ in range(n):
        out = fwd(params, xj)
      jax.block_until_ready(out)

    def jax_grad(n):
      for _ in range(n):
        out = grad(params, xj, yj)
      jax.block_until_ready(out)

    def torch_fwd(n):
      with torch.no_grad():
        for _ in range(n):
          net(x_t)

    def torch_grad(n):
      for _ in range(n):
        net.zero_grad(set_to_none=True)
        loss_fn(net(x_t), y_t).backward()
    runners.update(jax_fwd=jax_fwd, jax_fwd_bwd=jax_grad, torch_fwd=torch_fwd,
                   torch_fwd_bwd=torch_grad)

  for run in runners.values():  # compile / warm up
    run(3)

  names = list(runners)
  times = {name: [] for name in names}
  for r in range(args.repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[name](args.steps)
      times[name].append((time.perf_counter() - start) / args.steps)
  t = {name: np.asarray(v) for name, v in times.items()}
  ratios = t["jax_freeze"] / t["torch"]
  line = {
      "benchmark": "vs_pytorch", "ratio": _median(ratios), "target": 1.0,
      "ratio_base": _median(t["jax_base"] / t["torch"]),
      "ratio_q25": round(float(np.percentile(ratios, 25)), 4),
      "ratio_q75": round(float(np.percentile(ratios, 75)), 4),
      "matmul_conv_speedup": _median(t["jax_xla_conv"] / t["jax_freeze"]),
      "jax_freeze_step_ms": _median(1e3 * t["jax_freeze"]),
      "jax_base_step_ms": _median(1e3 * t["jax_base"]),
      "jax_xla_conv_step_ms": _median(1e3 * t["jax_xla_conv"]),
      "torch_step_ms": _median(1e3 * t["torch"]),
      "max_logit_diff": round(max_logit_diff, 6),
      "batch": args.batch, "steps_per_round": args.steps, "repeats": args.repeats,
      "threads": threads, "torch_threads": torch.get_num_threads(),
      "cpus": sorted(os.sched_getaffinity(0)),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "jax": jax.__version__, "torch": torch.__version__,
      "load_average": [round(x, 2) for x in os.getloadavg()]}
  if args.profile:
    line["profile_ms"] = {name: _median(1e3 * t[name]) for name in
                          ("jax_fwd", "jax_fwd_bwd", "torch_fwd", "torch_fwd_bwd")}
  print(json.dumps(line))


if __name__ == "__main__":
  main()
