"""Benchmark: the project's jitted train step in JAX against PyTorch, LeNet and ResNet-20.

    python -m experiments.benchmarks.vs_pytorch [--batch 128] [--steps 10] [--repeats 15]
        [--resnet_steps 2] [--resnet_repeats 7] [--models lenet,resnet20]

Two models, each against an equivalent torch module written here with the
same initial values copied across (so both compute the same function), the
same batch (`--batch` random 28x28x1 images, Fashion-MNIST's shape, already in
memory on both sides), the same optimizer (SGD lr 0.01, momentum 0.9, weight
decay 5e-4 added to the gradient) and the same threads, timed in one process
in interleaved rounds (each round runs every runner `--steps` steps, in
alternating order):

* LeNet (`experiments.models.cnn.LeNet`: conv 20 5x5 VALID -> relu -> max-pool
  2x2 -> conv 50 5x5 VALID -> relu -> max-pool 2x2 -> flatten -> dense 500 ->
  relu -> dense 10), the top-level keys;
* ResNet-20 with BatchNorm (`experiments.models.cnn.ResNet20`, He et al.'s
  CIFAR net with option-A shortcuts, BN in training mode with batch
  statistics), the keys under `resnet20` (`--resnet_steps` steps per round,
  `--resnet_repeats` rounds: its step is about ten times LeNet's).

Runners:

* `jax_freeze`: `experiments.steps.make_train_step` with `optimizer.make_optimizer`
  (base SGD chained with INQ's `elementwise_freeze`, half of every kernel
  frozen), compiled ahead of time, state donated, as training runs it;
* `jax_base`: the same step with the base optimizer alone (no freeze);
* `torch`: `torch.optim.SGD(momentum=0.9, weight_decay=5e-4)` in eager PyTorch,
  NCHW, no freeze (PyTorch does strictly less work than `jax_freeze`);
* LeNet only, `jax_xla_conv`: `jax_freeze` with `LeNet(cpu_matmul_conv=False)`,
  i.e. XLA's own convolutions instead of `experiments.models.cpu_conv`'s
  matrix products.

`ratio` is the median over rounds of jax_freeze / torch (target <= 1.0);
`ratio_base` the same for jax_base; `*_step_ms` the median time of one step;
`matmul_conv_speedup` (LeNet) the median of jax_xla_conv / jax_freeze (what
the CPU convolution buys). `--profile` adds a LeNet breakdown: forward alone
and forward+backward (no optimizer) on each side.

Parity, checked before timing: LeNet's `max_logit_diff` (the two forwards'
largest logit difference); ResNet-20's `loss_diff` (the first step's loss,
BN on batch statistics) and `loss_after_step_diff` (the loss of the second
step, after one SGD update on both sides: gradients, weight decay, momentum
and BN agree), from the `jax_base` step against torch.

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
from experiments.benchmarks import machine
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


def _torch_resnet20(torch, params, batch_stats, num_classes=10):
  """PyTorch ResNet-20 (option-A shortcuts, BN) with the JAX model's variables.

  Mirrors `experiments.models.cnn.ResNet20`: 3x3 convs without bias, padding 1;
  BN with PyTorch's momentum 0.1 (Flax's 0.9) and eps 1e-5; a block whose
  shape changes subsamples its input and zero-pads the new channels evenly on
  both sides; global average pool, then the classifier.
  """
  nn, functional = torch.nn, torch.nn.functional

  class Block(nn.Module):

    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(cout, eps=1e-5, momentum=0.1)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.stride != 1 or self.extra:
        x = x[:, :, ::self.stride, ::self.stride]
        x = functional.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return torch.relu(x + y)

  class ResNet20(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(16, eps=1e-5, momentum=0.1)
      blocks, cin = {}, 16
      for stage, features in enumerate((16, 32, 64)):
        for b in range(3):
          blocks[f"layer{stage + 1}_{b}"] = Block(cin, features,
                                                  2 if stage > 0 and b == 0 else 1)
          cin = features
      self.blocks = nn.ModuleDict(blocks)
      self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
      x = torch.relu(self.bn1(self.conv1(x)))
      for block in self.blocks.values():
        x = block(x)
      return self.fc(x.mean(dim=(2, 3)))

  net = ResNet20()
  p = jax.tree.map(np.array, params)  # writable copies
  stats = jax.tree.map(np.array, batch_stats)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))

  def load(conv, bn, p_conv, p_bn, s_bn):
    conv.weight.copy_(t(p_conv["kernel"].transpose(3, 2, 0, 1)))  # HWIO -> OIHW
    bn.weight.copy_(t(p_bn["scale"]))
    bn.bias.copy_(t(p_bn["bias"]))
    bn.running_mean.copy_(t(s_bn["mean"]))
    bn.running_var.copy_(t(s_bn["var"]))

  with torch.no_grad():
    load(net.conv1, net.bn1, p["conv1"], p["bn1"], stats["bn1"])
    for name, block in net.blocks.items():
      for i in ("1", "2"):
        load(getattr(block, "conv" + i), getattr(block, "bn" + i), p[name]["conv" + i],
             p[name]["bn" + i], stats[name]["bn" + i])
    net.fc.weight.copy_(t(p["fc"]["kernel"].T))
    net.fc.bias.copy_(t(p["fc"]["bias"]))
  return net


def _state(devices, params, tx, inq_state, batch_stats=None):
  return devices.replicate(TrainState(
      step=jnp.zeros([], jnp.int32), params=params, batch_stats=batch_stats or {},
      opt_state=tx.init(params), inq_state=inq_state, keep=None, stage=jnp.int32(INQ),
      phase=jnp.int32(0), epoch=jnp.int32(0)))


def _median(xs):
  return round(float(np.median(xs)), 4)


def _copy(tree):
  return jax.tree.map(jnp.copy, tree)


def _jax_runner(step, ts, batch):
  """run(n): n steps of the compiled `step` from the state it last left (donated)."""
  box = [ts]

  def run(n):
    ts = box[0]
    for _ in range(n):
      ts, _ = step(ts, batch)
    jax.block_until_ready(ts)
    box[0] = ts
  return run


def _torch_runner(torch, net, x_t, y_t, losses=None):
  """run(n): n SGD steps of `net` (its own optimizer: LR, MOMENTUM, WEIGHT_DECAY).

  Each step's loss is appended to `losses` if one is given (not when timed).
  """
  opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
  loss_fn = torch.nn.CrossEntropyLoss()

  def run(n):
    for _ in range(n):
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(net(x_t), y_t)
      loss.backward()
      opt.step()
      if losses is not None:
        losses.append(loss.item())
  return run


def _interleaved(runners, steps_per_round, repeats):
  """{name: seconds per step, one per round}: every runner once a round, order alternating."""
  for run in runners.values():  # compile / warm up
    run(3)
  names = list(runners)
  times = {name: [] for name in names}
  for r in range(repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      start = time.perf_counter()
      runners[name](steps_per_round)
      times[name].append((time.perf_counter() - start) / steps_per_round)
  return {name: np.asarray(v) for name, v in times.items()}


def _ratios(t):
  """The figures both models report from their interleaved times `t`."""
  ratios = t["jax_freeze"] / t["torch"]
  return {
      "ratio": _median(ratios), "target": 1.0,
      "ratio_base": _median(t["jax_base"] / t["torch"]),
      "ratio_q25": round(float(np.percentile(ratios, 25)), 4),
      "ratio_q75": round(float(np.percentile(ratios, 75)), 4),
      "jax_freeze_step_ms": _median(1e3 * t["jax_freeze"]),
      "jax_base_step_ms": _median(1e3 * t["jax_base"]),
      "torch_step_ms": _median(1e3 * t["torch"])}


def _setup(name, batch_size, seed=0):
  """(config, model, variables after half of every kernel is frozen, INQ state, schedule)."""
  config = fashion_mnist_lenet.get_config()
  config.weight_decay, config.momentum, config.nesterov = WEIGHT_DECAY, MOMENTUM, False
  config.optimizer = "sgd"
  # The default job's model options (LeNet's CPU convolution and pooling) included.
  model = models.from_config(config, 10) if name == "lenet" else models.get_model(name, 10)
  variables = models.init_variables(model, (1, 28, 28, 1), jax.random.key(seed))
  inq_state = quantize.init(variables["params"],
                            quantize.INQConfig(bits=5, portions=(0.5, 1.0)))
  params, inq_state = quantize.advance(variables["params"], inq_state)  # half of every kernel frozen
  schedule = optimizer.learning_rate(config.inq, 469, 1)  # cosine from 0.01: one scalar op
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((batch_size, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  return (config, model, params, variables.get("batch_stats", {}), inq_state, schedule,
          images, labels)


def _lenet(args, torch, devices):
  """LeNet's figures (the line's top-level keys) and, with --profile, its breakdown."""
  config, model, params, _, inq_state, schedule, images, labels = _setup("lenet", args.batch)
  batch = devices.put_batch({"image": images, "label": labels})

  runners = {}
  for name in ("jax_freeze", "jax_base", "jax_xla_conv"):
    tx = (optimizer.base_optimizer(config, schedule) if name == "jax_base"
          else optimizer.make_optimizer(config, schedule))
    ts = _state(devices, _copy(params), tx, _copy(inq_state))
    net = model.clone(cpu_matmul_conv=False) if name == "jax_xla_conv" else model
    step = steps.make_train_step(net, tx, devices, seed=0).lower(ts, batch).compile()
    runners[name] = _jax_runner(step, ts, batch)

  net = _torch_lenet(torch, params)
  x_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(labels.astype(np.int64))
  runners["torch"] = _torch_runner(torch, net, x_t, y_t)
  loss_fn = torch.nn.CrossEntropyLoss()

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

  t = _interleaved(runners, args.steps, args.repeats)
  line = _ratios(t)
  line.update({
      "matmul_conv_speedup": _median(t["jax_xla_conv"] / t["jax_freeze"]),
      "jax_xla_conv_step_ms": _median(1e3 * t["jax_xla_conv"]),
      "max_logit_diff": round(max_logit_diff, 6),
      "steps_per_round": args.steps, "repeats": args.repeats})
  if args.profile:
    line["profile_ms"] = {name: _median(1e3 * t[name]) for name in
                          ("jax_fwd", "jax_fwd_bwd", "torch_fwd", "torch_fwd_bwd")}
  return line


def _resnet20(args, torch, devices):
  """ResNet-20's figures (the line's `resnet20` dict), parity checked first."""
  config, model, params, batch_stats, inq_state, schedule, images, labels = _setup(
      "resnet20", args.batch)
  batch = devices.put_batch({"image": images, "label": labels})
  steps_compiled = {}
  runners = {}
  for name in ("jax_freeze", "jax_base"):
    tx = (optimizer.base_optimizer(config, schedule) if name == "jax_base"
          else optimizer.make_optimizer(config, schedule))
    ts = _state(devices, _copy(params), tx, _copy(inq_state), _copy(batch_stats))
    step = steps.make_train_step(model, tx, devices, seed=0).lower(ts, batch).compile()
    steps_compiled[name] = (step, tx)
    runners[name] = _jax_runner(step, ts, batch)

  net = _torch_resnet20(torch, params, batch_stats)
  x_t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y_t = torch.from_numpy(labels.astype(np.int64))
  net.train()

  # Parity: two steps from the same variables on each side (its own copies),
  # the base optimizer on the JAX side (torch freezes nothing): the first
  # step's loss checks the forward with BN on batch statistics, the second's
  # the update (gradients, weight decay, momentum).
  step, tx = steps_compiled["jax_base"]
  ts = _state(devices, _copy(params), tx, _copy(inq_state), _copy(batch_stats))
  jax_losses = []
  for _ in range(2):
    ts, metrics = step(ts, batch)
    jax_losses.append(float(metrics["loss"]))
  check = _torch_resnet20(torch, params, batch_stats)
  check.train()
  torch_losses = []
  _torch_runner(torch, check, x_t, y_t, torch_losses)(2)

  runners["torch"] = _torch_runner(torch, net, x_t, y_t)
  t = _interleaved(runners, args.resnet_steps, args.resnet_repeats)
  line = _ratios(t)
  line.update({
      "loss": round(jax_losses[0], 6), "torch_loss": round(torch_losses[0], 6),
      "loss_diff": float(f"{abs(jax_losses[0] - torch_losses[0]):.3g}"),
      "loss_after_step_diff": float(f"{abs(jax_losses[1] - torch_losses[1]):.3g}"),
      "steps_per_round": args.resnet_steps, "repeats": args.resnet_repeats})
  return line


MODELS = ("lenet", "resnet20")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=10, help="LeNet steps per timed round")
  parser.add_argument("--repeats", type=int, default=15, help="LeNet's interleaved rounds")
  parser.add_argument("--resnet_steps", type=int, default=2,
                      help="ResNet-20 steps per timed round")
  parser.add_argument("--resnet_repeats", type=int, default=7,
                      help="ResNet-20's interleaved rounds")
  parser.add_argument("--models", default=",".join(MODELS),
                      help="comma-separated, of: " + ", ".join(MODELS))
  parser.add_argument("--threads", type=int, default=0,
                      help="CPUs for both sides: the process is pinned to this many and "
                           "PyTorch gets as many threads (0: all the process may use)")
  parser.add_argument("--profile", action="store_true",
                      help="also time LeNet's forward and forward+backward alone on each side")
  args = parser.parse_args()
  chosen = [m for m in args.models.split(",") if m]
  if not chosen or set(chosen) - set(MODELS):
    parser.error(f"--models {args.models!r}: choose from {', '.join(MODELS)}")
  try:
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

  devices = Devices()
  line = {"benchmark": "vs_pytorch", "models": chosen}
  if "lenet" in chosen:
    line.update(_lenet(args, torch, devices))
  if "resnet20" in chosen:
    line["resnet20"] = _resnet20(args, torch, devices)
  line.update({
      "batch": args.batch, "threads": threads, "torch_threads": torch.get_num_threads(),
      "cpus": sorted(os.sched_getaffinity(0)),
      "cpu_model": machine.cpu_name(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "device_kind": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
      "jax": jax.__version__, "torch": torch.__version__,
      "load_average": machine.load_average()})
  print(json.dumps(line))


if __name__ == "__main__":
  main()
