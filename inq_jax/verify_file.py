"""Checks an exported `.inq` model: every code in its codebook, every section intact.

    python -m inq_jax.verify_file model.inq
    python -m inq_jax.verify_file WORKDIR          # checks WORKDIR/model.inq

A WORKDIR argument (a directory) means the file `WORKDIR/model.inq`, which the
training script writes at the end of every run (`experiments.checkpoints.
export_run`; or `python -m experiments.export --workdir=WORKDIR` by hand).

Prints one row per quantized layer: path, weights, bits, distinct values, n1 and
n2 (min..max over channels for per-channel codebooks), fraction of zeros, layout,
stored bytes, and whether every code lies in the layer's codebook
{0, +-2^k : n2 <= k <= n1}. The codes are checked as stored, without decoding to
floats, so a file whose CRCs were recomputed after tampering with a code is
still caught. Exit status 0 if the file is intact and every weight is in its
codebook, 1 otherwise (the reason goes to stderr).

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 2.1 (the b-bit power-of-two codebook).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, NamedTuple, Optional

import numpy as np

from inq_jax import _packing, export
from inq_jax._codebook import ZERO_CODEBOOK

WORKDIR_FILE = "model.inq"


class LayerReport(NamedTuple):
  path: str
  weights: int
  bits: int
  distinct_values: int   # among valid codes; +0 and -0 count as one value
  n1: str
  n2: str
  zero_fraction: float
  layout: str
  stored_bytes: int
  invalid: int           # codes outside the codebook
  first_invalid: str     # "code C at index I", or ""


def resolve(target: str) -> str:
  """The export file `target` names: itself, or `target/model.inq` for a directory."""
  if os.path.isdir(target):
    return os.path.join(target, WORKDIR_FILE)
  return target


def _bounds(n1: np.ndarray, bits: int):
  flat = np.atleast_1d(n1)
  real = flat[flat != ZERO_CODEBOOK]
  if real.size == 0:
    return "{0}", "{0}"
  n2 = _packing.n2_of(real, bits)
  if n1.ndim == 0:
    return str(int(real[0])), str(int(n2[0]))
  extra = f" +{n1.size - real.size} zero" if real.size < n1.size else ""

  def span(a):
    lo, hi = int(a.min()), int(a.max())
    return (str(lo) if lo == hi else f"{lo}..{hi}") + extra

  return span(real), span(n2)


def check_layer(q: export.QuantizedCodes) -> LayerReport:
  """What one quantized leaf's codes say; `invalid` > 0 means outside the codebook."""
  valid = _packing.valid_codes(q.codes, q.n1, q.bits)
  _, m = _packing.split_codes(q.codes, q.bits)
  invalid = int(q.codes.size - valid.sum())
  first = ""
  if invalid:
    idx = tuple(int(i) for i in np.argwhere(~valid)[0])
    first = f"code {int(q.codes[idx])} at index {idx}"
  # Distinct values (of the whole layer: per-channel codebooks differ); -0 == +0.
  values = _packing.decode(q.codes, q.n1, q.bits)[valid]
  distinct = int(np.unique(np.where(values == 0, 0.0, values)).size)
  n1_text, n2_text = _bounds(q.n1, q.bits)
  size = max(q.codes.size, 1)
  return LayerReport(q.path, int(q.codes.size), q.bits, distinct, n1_text, n2_text,
                     float(np.sum(m == 0)) / size, q.layout, q.stored_bytes, invalid, first)


def format_table(rows: List[LayerReport]) -> str:
  head = ("path", "weights", "bits", "distinct", "n1", "n2", "zero", "layout", "bytes",
          "in codebook")
  body = [(r.path, str(r.weights), str(r.bits), str(r.distinct_values), r.n1, r.n2,
           f"{r.zero_fraction:.3f}", r.layout, str(r.stored_bytes),
           "yes" if not r.invalid else f"NO ({r.invalid})") for r in rows]
  widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
  lines = []
  for row in [head] + body:
    cells = [c.ljust(w) if i in (0, 7, 9) else c.rjust(w)
             for i, (c, w) in enumerate(zip(row, widths))]
    lines.append("  ".join(cells).rstrip())
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def verify_file(path: str) -> List[LayerReport]:
  """Reports for every quantized layer of an export file.

  Raises:
    ValueError naming the file: not an export, wrong version, truncated, or a
    section whose CRC32 does not match (every section is checked).
  """
  return [check_layer(q) for q in export.read_codes(path, check_all=True).values()]


def main(argv: Optional[List[str]] = None) -> int:
  """Command line entry point; returns the exit status (0 ok, 1 failed)."""
  parser = argparse.ArgumentParser(
      prog="python -m inq_jax.verify_file",
      description="Check that every weight of an exported INQ model (.inq) lies in "
                  "its layer's power-of-two codebook and that the file is intact. "
                  f"A directory means DIR/{WORKDIR_FILE}.")
  parser.add_argument("target", metavar="FILE_OR_WORKDIR")
  args = parser.parse_args(argv)
  path = resolve(args.target)
  if not os.path.isfile(path):
    hint = (f" (export the run with `python -m experiments.export --workdir="
            f"{args.target}`)" if os.path.isdir(args.target) else "")
    print(f"error: {path} does not exist{hint}", file=sys.stderr)
    return 1
  try:
    header = export.read_header(path)
    rows = verify_file(path)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(f"{path}: inq_jax export v{header['version']}, {header['bits']}-bit, "
        f"{os.path.getsize(path)} bytes")
  print(format_table(rows))
  params = [e for e in header["leaves"] if e.get("group") == "params"]
  total = sum(int(np.prod(e["shape"], dtype=np.int64)) for e in params)
  quantized = sum(r.weights for r in rows)
  print(f"{len(rows)} quantized leaves ({quantized} weights), "
        f"{len(header['leaves']) - len(rows)} float leaves; float32 would take "
        f"{4 * total} bytes, {4 * total / os.path.getsize(path):.2f}x more")
  bad = [r for r in rows if r.invalid]
  for r in bad:
    print(f"error: {r.path}: {r.invalid} of {r.weights} codes are outside the "
          f"{r.bits}-bit codebook (n1 {r.n1}), first {r.first_invalid}", file=sys.stderr)
  if bad:
    return 1
  print("OK: every quantized weight is in its codebook")
  return 0


if __name__ == "__main__":
  sys.exit(main())
