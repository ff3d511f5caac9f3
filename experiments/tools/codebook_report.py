"""How well each layer's codebook fits its pretrained weights, before any training.

  python -m experiments.tools.codebook_report \
      --variables=workdirs/sweep_fashion_mnist/seed0/fp32/baseline_variables --bits=3,2

For every quantized leaf and bit width, under both calibrations ("absmax", the
paper's n1 from max |w|, and "mse"), prints a markdown table of: max|w| / std
(how heavy the tail is), n1, the fraction of weights that round to zero and the
relative rounding error ||round(w) - w|| / ||w||. With per-layer widths
(`--layer_bits='^conv1/=8,^fc2/=8'`, as `inq.layer_bits`: the first matching
regex gives a leaf its width, `--bits` the rest) each row is at the leaf's own
width, and a line per bit width gives the average bits per quantized weight. This is post-training
quantization seen layer by layer; it explains why the absmax codebook fails a
batch-norm-free LeNet at 3 and 2 bits (experiments/RESULTS.md).
"""

from __future__ import annotations

import argparse
import os
import re

import numpy as np
import orbax.checkpoint as ocp

from experiments import reporting
from inq_jax import quantize
from inq_jax.tree import leaves_with_paths


def rows(params, bits_list, calibrations=("absmax", "mse"), layer_bits=()) -> list:
  """[dict] per (leaf, bits, calibration), leaves as `quantize.INQConfig` selects them.

  `layer_bits`: (regex, bits) pairs as `INQConfig.layer_bits`; a row's "bits" is
  its leaf's own width, "config_bits" the default width of its column.
  """
  out = []
  for path, leaf in leaves_with_paths(params)[0]:
    if not quantize.INQConfig().selects(path):
      continue
    w = np.asarray(leaf, np.float32)
    for config_bits in bits_list:
      bits = quantize.INQConfig(bits=config_bits, layer_bits=layer_bits).bits_for(path)
      for calibration in calibrations:
        config = quantize.INQConfig(bits=bits, calibration=calibration, portions=(1.0,),
                               include="^" + re.escape(path) + "$")
        n1, n2 = quantize.init(_single(path, w), config).bounds(path)
        q = np.asarray(quantize.round_to_pow2(w, n1, n2))
        out.append({"path": path, "bits": bits, "config_bits": config_bits,
                    "calibration": calibration, "weights": int(w.size),
                    "tail": float(np.abs(w).max() / w.std()), "n1": int(n1),
                    "zero_fraction": float(np.mean(q == 0)),
                    "relative_error": float(np.linalg.norm(q - w) / np.linalg.norm(w))})
  return out


def mean_bits(table: list) -> dict:
  """{default width: average bits per quantized weight} over `rows`' leaves."""
  out = {}
  for b in dict.fromkeys(r["config_bits"] for r in table):
    leaves = {r["path"]: (r["bits"], r["weights"]) for r in table if r["config_bits"] == b}
    out[b] = reporting.bits_entry(leaves)["mean_bits"]
  return out


def parse_layer_bits(text: str) -> tuple:
  """'REGEX=BITS,REGEX=BITS' -> ((regex, bits), ...) ('' -> ())."""
  pairs = []
  for item in filter(None, text.split(",")):
    pattern, sep, bits = item.rpartition("=")
    if not sep:
      raise ValueError(f"--layer_bits entries are REGEX=BITS, got {item!r}")
    pairs.append((pattern, int(bits)))
  return tuple(pairs)


def _single(path: str, w):
  """A one-leaf tree whose '/'-joined path is `path`."""
  tree = w
  for part in reversed(path.split("/")):
    tree = {part: tree}
  return tree


def markdown(table: list) -> str:
  lines = ["| layer | max\\|w\\|/std | bits | calibration | n1 | zero | rel. error |",
           "|---|---|---|---|---|---|---|"]
  for r in table:
    lines.append(f"| {r['path']} | {r['tail']:.1f} | {r['bits']} | {r['calibration']} | "
                 f"{r['n1']} | {r['zero_fraction']:.2f} | {r['relative_error']:.2f} |")
  means = mean_bits(table)
  if any(r["bits"] != r["config_bits"] for r in table):  # mixed widths: what they cost
    lines.append("")
    lines += [f"{b} bits with the per-layer widths: {m:.3f} bits per quantized weight on "
              f"average" for b, m in means.items()]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variables", required=True,
                      help="an orbax checkpoint of {'params', ...}, e.g. WORKDIR/baseline_variables")
  parser.add_argument("--bits", default="3,2", help="comma-separated bit widths")
  parser.add_argument("--layer_bits", default="",
                      help="per-layer widths as inq.layer_bits: REGEX=BITS,REGEX=BITS")
  args = parser.parse_args()
  # A mistake in the command: argparse's one-line message and exit status 2.
  try:
    bits = [int(b) for b in args.bits.split(",")]
    for b in bits:
      quantize.INQConfig(bits=b)
  except (TypeError, ValueError) as e:
    parser.error(f"--bits={args.bits}: {e}")
  try:
    layer_bits = parse_layer_bits(args.layer_bits)
    quantize.INQConfig(layer_bits=layer_bits)
  except (TypeError, ValueError) as e:
    parser.error(f"--layer_bits={args.layer_bits}: {e}")
  if not os.path.isdir(args.variables):
    parser.error(f"--variables {args.variables} is not a directory (an orbax checkpoint of "
                 "{'params', ...}, e.g. WORKDIR/baseline_variables)")
  try:
    variables = ocp.StandardCheckpointer().restore(os.path.abspath(args.variables))
    params = variables["params"]
  except Exception as e:  # pylint: disable=broad-except  (orbax's errors of any unreadable dir)
    parser.error(f"--variables {args.variables} is not a readable checkpoint of "
                 f"{{'params', ...}}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  print(markdown(rows(params, bits, layer_bits=layer_bits)))


if __name__ == "__main__":
  main()
