"""Benchmark: init / advance / verify on a ResNet-50-shaped params pytree.

    python -m experiments.benchmarks.quantize_speed [--bits 5] [--strategy magnitude]

`--width_divisor N` divides every channel width by N (a small stand-in of the
same structure, for tests); the figures in the README use the default, 1.

Prints one JSON line. Target on a 2-core CPU: every advance <= 1 s
(`advance_seconds_max`). Timings exclude compilation: each advance shape is
compiled once on a throwaway copy first.
"""

import argparse
import json
import time

import jax
import numpy as np

from inq_jax import quantize as inq


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
  params = {}
  key = jax.random.key(seed)
  for i, (path, shape) in enumerate(resnet50_shapes(width_divisor).items()):
    node = params
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    node[leaf] = jax.random.normal(jax.random.fold_in(key, i), shape) / np.sqrt(fan_in)
  return params


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
  args = parser.parse_args()
  try:
    shapes = resnet50_shapes(args.width_divisor)
  except ValueError as e:
    parser.error(str(e))
  config = inq.INQConfig(bits=args.bits, strategy=args.strategy, granularity=args.granularity)
  params = make_params(width_divisor=args.width_divisor)
  weights = sum(int(np.prod(s)) for p, s in shapes.items() if config.selects(p))

  # Warm-up: compile every (shape, portion) kernel on a copy.
  warm_p, warm_s = params, inq.init(params, config)
  for _ in config.portions:
    warm_p, warm_s = inq.advance(warm_p, warm_s)
  jax.block_until_ready(warm_p)
  inq.verify(warm_p, warm_s)

  state, init_s = _timed(lambda: inq.init(params, config))
  advance_s = []
  for _ in config.portions:
    (params, state), dt = _timed(lambda: inq.advance(params, state))
    advance_s.append(round(dt, 4))
  _, verify_s = _timed(lambda: inq.verify(params, state))
  print(json.dumps({
      "benchmark": "quantize_speed", "backend": jax.default_backend(),
      "device": jax.devices()[0].device_kind, "weights": weights,
      "width_divisor": args.width_divisor,
      "bits": args.bits, "strategy": args.strategy, "granularity": args.granularity,
      "portions": list(config.portions), "init_seconds": round(init_s, 4),
      "advance_seconds": advance_s, "advance_seconds_max": max(advance_s),
      "verify_seconds": round(verify_s, 4)}))


if __name__ == "__main__":
  main()
