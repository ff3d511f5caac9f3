"""Benchmark: `inq_jax.export.save` / `load` on a ResNet-50-shaped quantized model.

    python -m experiments.benchmarks.export_speed [--bits 5] [--zero_fraction 0.9]

Builds the conv/dense kernels of torchvision's ResNet-50 in Flax HWIO layout
(`quantize_speed.resnet50_shapes`), random normal weights, optionally zeroes
the smallest `--zero_fraction` of each kernel (a pruned model), quantizes every
kernel with INQ in one portion, and times `export.save` and `export.load`.
`--width_divisor N` divides every channel width by N (a small stand-in of the
same structure, for tests).

Also reports the size the exhaustive writer would reach ("full try": every
quantized leaf compressed in each of "packed", "packed+lzma" and "sparse+lzma"
with LZMA preset 6, keeping the smallest), so the layout choice can be judged
by `size_ratio_vs_full_try`; `--no_full_try` skips that slow reference.

Prints one JSON line. Target on a 2-core CPU at width_divisor 1: save_seconds
<= 2 with size_ratio_vs_full_try <= 1.02. `save_cpu_seconds` (summed over the
writer's threads) and `load_average` (the machine's 1-minute load when the save
started) tell a slow run on a busy machine from a slow writer.
"""

import argparse
import json
import lzma
import os
import tempfile
import time

import jax
import numpy as np

from experiments.benchmarks import quantize_speed
from inq_jax import export
from inq_jax import quantize


def quantized_model(width_divisor: int, bits: int, zero_fraction: float, seed: int = 0):
  """(params, state): ResNet-50-shaped kernels INQ-quantized in one portion."""
  params = quantize_speed.make_params(seed, width_divisor)
  if zero_fraction > 0:
    def prune(path, w):
      if not path[-1].key == "kernel":
        return w
      w = np.asarray(w)
      cut = np.quantile(np.abs(w), zero_fraction)
      return np.where(np.abs(w) < cut, 0, w).astype(w.dtype)
    params = jax.tree_util.tree_map_with_path(prune, params)
  state = quantize.init(params, quantize.INQConfig(bits=bits, portions=(1.0,)))
  params, state = quantize.advance(params, state)
  return params, state


def _pack(codes: np.ndarray, bits: int) -> bytes:
  """b-bit codes as a little-endian bit stream (the `packed` layout's bytes)."""
  planes = (codes[:, None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.reshape(-1), bitorder="little").tobytes()


def _sparse_stream(codes: np.ndarray) -> bytes:
  """A nonzero bitmap, then one byte per nonzero code (the sparse layouts' stream)."""
  nonzero = codes != 0
  return np.packbits(nonzero, bitorder="little").tobytes() + codes[nonzero].tobytes()


def _full_try_bytes(path: str) -> int:
  """Section bytes an exhaustive writer (every layout LZMA-compressed) would store."""
  total = 0
  for q in export.read_codes(path).values():
    flat = np.asarray(q.codes, np.uint8).reshape(-1)
    packed = _pack(flat, q.bits)
    old = lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                                     preset=6)
    total += min(len(packed), len(old(packed)), len(old(_sparse_stream(flat))))
  return total


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bits", type=int, default=5)
  parser.add_argument("--width_divisor", type=int, default=1)
  parser.add_argument("--zero_fraction", type=float, default=0.0)
  parser.add_argument("--no_full_try", action="store_true")
  args = parser.parse_args()
  try:
    quantize_speed.resnet50_shapes(args.width_divisor)
  except ValueError as e:
    parser.error(str(e))
  params, state = quantized_model(args.width_divisor, args.bits, args.zero_fraction)
  jax.block_until_ready(params)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "model.inq")
    load_average = os.getloadavg()[0]
    start, cpu = time.perf_counter(), time.process_time()
    stats = export.save(path, params, state)
    save_seconds = time.perf_counter() - start
    save_cpu_seconds = time.process_time() - cpu  # all threads
    start = time.perf_counter()
    export.load(path)
    load_seconds = time.perf_counter() - start
    full_try, full_try_seconds = None, None
    if not args.no_full_try:
      start = time.perf_counter()
      full_try = stats["bytes"] - stats["quantized_bytes"] + _full_try_bytes(path)
      full_try_seconds = time.perf_counter() - start
  layouts = {}
  for layout in stats["layouts"].values():
    layouts[layout] = layouts.get(layout, 0) + 1
  print(json.dumps({
      "benchmark": "export_speed", "width_divisor": args.width_divisor, "bits": args.bits,
      "zero_fraction": args.zero_fraction, "cpus": os.cpu_count(),
      "quantized_weights": stats["quantized_weights"],
      "save_seconds": round(save_seconds, 3), "save_cpu_seconds": round(save_cpu_seconds, 3),
      "load_seconds": round(load_seconds, 3), "load_average": round(load_average, 2),
      "bytes": stats["bytes"], "full_try_bytes": full_try,
      "size_ratio_vs_full_try": None if full_try is None else round(stats["bytes"] / full_try, 4),
      "full_try_seconds": None if full_try_seconds is None else round(full_try_seconds, 3),
      "layouts": layouts}))


if __name__ == "__main__":
  main()
