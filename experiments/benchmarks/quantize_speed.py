"""Benchmark: init / advance / verify on a ResNet-50-shaped params pytree.

    python -m experiments.benchmarks.quantize_speed [--bits 5] [--strategy magnitude]

`--width_divisor N` divides every channel width by N (a small stand-in of the
same structure, for tests); the figures in the README use the default, 1.

Prints one JSON line with two sets of timings, both from this fresh process:

* first call (what a user waits, compilation included): `first_init_seconds`
  and `first_advance_seconds` (one per portion, `first_advance_seconds_max`),
  with `first_compiles` (all of them) and `first_init_compiles`,
  `first_advance_compiles`, `first_verify_compiles` counting the XLA backend
  compilations each triggered (jax.monitoring's backend-compile events): one
  program each for init, advance and verify over the whole tree (inq_jax
  packs the leaves; see inq_jax/_packed.py), compiled once per run;
* steady state (everything compiled): `init_seconds`, `advance_seconds`,
  `advance_seconds_max`, `verify_seconds`, the same calls repeated on fresh
  copies (`--repeats` times; the per-call median is reported).

Targets on this CPU at ResNet-50 shapes: `first_init_seconds` <= 0.5,
`first_advance_seconds_max` <= 2, `advance_seconds_max` <= 0.3. The line also
carries the device kind, jax version and the 1/5/15-minute load average (the
timings of a shared machine are noisy).
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import quantize


def resnet50_shapes(width_divisor=1):
  """{path: shape} of ResNet-50 (torchvision layout in Flax HWIO order).

  Args:
    width_divisor: every channel width is divided by it (1: the real ResNet-50).
  """
  if width_divisor < 1 or 64 % width_divisor:
    raise ValueError(f"width_divisor must divide 64, got {width_divisor}")
  stem = 64 // width_divisor
  shapes = {"conv_init/kernel": (7, 7, 3, stem), "bn_init/scale": (stem,),
            "bn_init/bias": (stem,)}
  cin = stem
  widths = tuple(w // width_divisor for w in (64, 128, 256, 512))
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), widths)):
    for b in range(blocks):
      name = f"stage{stage + 1}_block{b}"
      convs = [(1, 1, cin, width), (3, 3, width, width), (1, 1, width, width * 4)]
      if b == 0:
        convs.append((1, 1, cin, width * 4))  # projection shortcut
      for i, shape in enumerate(convs):
        shapes[f"{name}/conv{i}/kernel"] = shape
        shapes[f"{name}/bn{i}/scale"] = shape[-1:]
        shapes[f"{name}/bn{i}/bias"] = shape[-1:]
      cin = width * 4
  shapes["head/kernel"] = (cin, 1000)
  shapes["head/bias"] = (1000,)
  return shapes


def make_params(seed=0, width_divisor=1):
  """Random normal params of ResNet-50's shapes (std 1/sqrt(fan-in)), as float32 jax arrays.

  Drawn with numpy on the host: `jax.random.normal` compiles one program per
  leaf shape, which took 29 of the export benchmark's 37 s on a 2-core CPU.
  """
  params = {}
  rng = np.random.default_rng(seed)
  for path, shape in resnet50_shapes(width_divisor).items():
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    w = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))
    node[leaf] = jnp.asarray(w)
  return params


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = [0]


def _count_compiles(event, duration, **kwargs):
  del duration, kwargs
  if event == _COMPILE_EVENT:
    _compiles[0] += 1


def _timed_compiles(fn):
  before = _compiles[0]
  out, dt = _timed(fn)
  return out, dt, _compiles[0] - before


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  jax.block_until_ready(out)
  return out, time.perf_counter() - t


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bits", type=int, default=5)
  parser.add_argument("--strategy", default="magnitude")
  parser.add_argument("--granularity", default="layer")
  parser.add_argument("--width_divisor", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=3,
                      help="steady-state rounds (init, every advance, verify)")
  args = parser.parse_args()
  try:
    shapes = resnet50_shapes(args.width_divisor)
  except ValueError as e:
    parser.error(str(e))
  config = quantize.INQConfig(bits=args.bits, strategy=args.strategy, granularity=args.granularity)
  params = make_params(width_divisor=args.width_divisor)
  jax.block_until_ready(params)
  weights = sum(int(np.prod(s)) for p, s in shapes.items() if config.selects(p))
  # First-call times are what a user waits on a fresh machine: no program may
  # come from a persistent compilation cache (JAX_COMPILATION_CACHE_DIR, as the
  # test suite sets for its subprocesses), and every compilation is counted.
  jax.config.update("jax_enable_compilation_cache", False)
  # A user's process has compiled its model before `quantize.init`: XLA's one-time
  # start-up (the first compilation in a process) is not INQ's to count.
  jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(())))
  jax.monitoring.register_event_duration_secs_listener(_count_compiles)

  # First calls, compilation included: nothing of inq_jax has run in this process.
  state, first_init, init_compiles = _timed_compiles(lambda: quantize.init(params, config))
  p, s = params, state
  first_advance, advance_compiles = [], []
  for _ in config.portions:
    (p, s), dt, n = _timed_compiles(lambda: quantize.advance(p, s))
    first_advance.append(round(dt, 4))
    advance_compiles.append(n)
  _, first_verify, verify_compiles = _timed_compiles(lambda: quantize.verify(p, s))

  # Steady state: the same calls again, all compiled, `--repeats` times.
  init_s, advance_s, verify_s = [], [[] for _ in config.portions], []
  compiles_before = _compiles[0]
  for _ in range(args.repeats):
    s, dt = _timed(lambda: quantize.init(params, config))
    init_s.append(dt)
    p = params
    for i, _ in enumerate(config.portions):
      (p, s), dt = _timed(lambda: quantize.advance(p, s))
      advance_s[i].append(dt)
    _, dt = _timed(lambda: quantize.verify(p, s))
    verify_s.append(dt)
  steady_compiles = _compiles[0] - compiles_before
  advance_med = [round(float(np.median(a)), 4) for a in advance_s]
  print(json.dumps({
      "benchmark": "quantize_speed", "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind, "jax": jax.__version__,
      "load_average": [round(x, 2) for x in os.getloadavg()],
      "weights": weights, "width_divisor": args.width_divisor,
      "bits": args.bits, "strategy": args.strategy, "granularity": args.granularity,
      "portions": list(config.portions),
      "first_init_seconds": round(first_init, 4),
      "first_advance_seconds": first_advance,
      "first_advance_seconds_max": max(first_advance),
      "first_verify_seconds": round(first_verify, 4),
      "first_compiles": init_compiles + sum(advance_compiles) + verify_compiles,
      "first_init_compiles": init_compiles,
      "first_advance_compiles": advance_compiles,
      "first_verify_compiles": verify_compiles,
      "repeats": args.repeats,
      "init_seconds": round(float(np.median(init_s)), 4),
      "advance_seconds": advance_med, "advance_seconds_max": max(advance_med),
      "verify_seconds": round(float(np.median(verify_s)), 4),
      "steady_compiles": steady_compiles,
      "targets": {"first_init_seconds": 0.5, "first_advance_seconds_max": 2.0,
                  "advance_seconds_max": 0.3}}))


if __name__ == "__main__":
  main()
