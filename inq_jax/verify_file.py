"""Checks an exported `.inq` model: `python -m inq_jax.verify_file FILE [--sha256 [X]]`.

Decodes the file with the very code `inq_jax.export.load` runs
(`export.inspect`), then checks every leaf, so "OK" means `load` returns
exactly the weights described here: every section intact, every header field
well-formed, every quantized code in its layer's codebook {0, +-2^k : n2 <= k
<= n1}, every leaf of its declared shape and dtype, and every quantized leaf
re-encoding to its stored codes.

Prints one row per quantized layer: path, weights, bits (the layer's own
width), distinct values, n1 and n2 (min..max over channels for per-channel
codebooks), fraction of zeros, layout, stored bytes, and whether every code
lies in the codebook; then the average code width over the quantized weights
and the bits per weight they take on disk. Codes are checked as stored, so a
code outside its codebook is caught even when the CRCs were recomputed after
the edit.

What this cannot tell: the CRCs and checks catch damage and malformed files,
not a deliberate edit that keeps every field valid (a code changed to another
value of its codebook, CRCs recomputed): that file is well-formed, and loads
as a different model. `--sha256` detects it by comparing the file's SHA-256
with the one published beside it (`export.save(..., sha256_file=True)` writes
`FILE.sha256`); trust it only as far as you trust where that digest came from.

    --sha256              check against FILE.sha256 (a sha256sum line)
    --sha256 HEXDIGEST    check against this digest
    --sha256 PATH         check against the line for FILE in this sha256sum file

Exit status 0 if the file loads, every weight is in its codebook and (with
--sha256) the digest matches; 1 otherwise (the reason goes to stderr); 2 for
a usage error, such as a missing or malformed checksum file.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 2.1 (the b-bit power-of-two codebook).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, NamedTuple, Optional, Tuple

import numpy as np

from inq_jax import _packing, export
from inq_jax._codebook import ZERO_CODEBOOK, n2_from_n1
from inq_jax._export_format import is_sha256_hex, parse_sha256_lines

# --sha256 given without a value: the checksum file beside FILE.
_BESIDE = object()


class UsageError(ValueError):
  """A command-line mistake (exit status 2), such as a missing checksum file."""


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


def _bounds(n1: np.ndarray, bits: int):
  flat = np.atleast_1d(n1)
  real = flat[flat != ZERO_CODEBOOK]
  if real.size == 0:
    return "{0}", "{0}"
  n2 = n2_from_n1(real, bits)
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


def check_leaf(path: str, leaf: export.DecodedLeaf) -> None:
  """Raises ValueError naming `path` unless `leaf` decoded to exactly what it declares.

  The decoded value must have the header's shape and dtype, and a quantized
  leaf's weights must encode back to its stored codes (so the codes, n1 and
  dtype describe the weights `load` returns and nothing else).
  """
  where = f"{path}: {leaf.path}"
  if leaf.value is None:
    return  # invalid codes: reported per layer
  if leaf.value.shape != leaf.shape or leaf.value.dtype != leaf.dtype:
    raise ValueError(f"{where}: decoded {leaf.value.shape} {leaf.value.dtype}, the header "
                     f"declares {leaf.shape} {leaf.dtype}")
  if leaf.codes is not None:
    q = leaf.codes
    codes, valid = _packing.encode(leaf.value, q.n1, q.bits)
    if not valid.all() or not np.array_equal(codes, q.codes):
      raise ValueError(f"{where}: the decoded weights do not encode back to the stored "
                       "codes")


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


def inspect(path: str):
  """(export.ExportFile, [LayerReport]) of an export file, every leaf checked.

  Raises:
    ValueError naming the file: anything `export.load` refuses other than
    codes outside their codebook (those are reported in the rows), or a leaf
    that decodes to something other than what its header declares.
  """
  f = export.inspect(path)
  rows = []
  for leaf in f.leaves:
    check_leaf(f.path, leaf)
    if leaf.codes is not None:
      rows.append(check_layer(leaf.codes))
  if not f.invalid():
    f.trees()  # exactly what load returns: must not raise
  return f, rows


def verify_file(path: str) -> List[LayerReport]:
  """Reports for every quantized layer of an export file (see `inspect`)."""
  return inspect(path)[1]


def expected_sha256(file: str, source) -> Tuple[str, str]:
  """(expected hex digest, where it came from) for `--sha256 [source]`.

  `source` is a 64-digit hex digest, the path of a `sha256sum` file, or
  `_BESIDE` for `FILE.sha256`. A checksum file must hold a line for FILE's
  base name (or exactly one line, for a file renamed with its checksum).

  Raises:
    UsageError naming the checksum file and what is wrong with it.
  """
  if source is not _BESIDE and is_sha256_hex(source):
    return source.lower(), "--sha256"
  side = file + export.SHA256_SUFFIX if source is _BESIDE else source
  try:
    with open(side, encoding="utf-8") as f:
      text = f.read(1 << 20)
  except FileNotFoundError:
    hint = (" (write it with export.save(..., sha256_file=True) or sha256sum)"
            if source is _BESIDE else "; give a 64-digit hex digest or a sha256sum file")
    raise UsageError(f"--sha256: {side} does not exist{hint}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"--sha256: cannot read {side} ({e})") from None
  try:
    lines = parse_sha256_lines(text)
  except ValueError as e:
    raise UsageError(f"--sha256: {side}: {e}") from None
  name = os.path.basename(file)
  found = [digest for digest, listed in lines if os.path.basename(listed) == name]
  if not found and len(lines) == 1:
    found = [lines[0][0]]
  if len(set(found)) != 1:
    listed = sorted({listed for _, listed in lines})
    what = "no line" if not found else "different lines"
    raise UsageError(f"--sha256: {side} has {what} for {name} (it lists {listed[:4]})")
  return found[0], side


def main(argv: Optional[List[str]] = None) -> int:
  """Command line entry point; returns the exit status (0 ok, 1 failed, 2 usage error)."""
  parser = argparse.ArgumentParser(
      prog="python -m inq_jax.verify_file",
      description="Check that an exported INQ model (.inq) loads, that the file is "
                  "intact and that every weight lies in its layer's power-of-two "
                  "codebook; with --sha256, that it is the very file whose SHA-256 "
                  "was published.")
  parser.add_argument("file", metavar="FILE")
  parser.add_argument("--sha256", nargs="?", const=_BESIDE, default=None,
                      metavar="HEXDIGEST|PATH",
                      help="check the file's SHA-256 against a hex digest or a sha256sum "
                           "file (default: FILE.sha256)")
  args = parser.parse_args(argv)
  if args.sha256 is not None:
    try:
      want, source = expected_sha256(args.file, args.sha256)
      got = export.file_sha256(args.file)
    except UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    if got != want:
      print(f"error: {args.file}: SHA-256 mismatch: the file's is {got}, {source} expects "
            f"{want}; the file is not the one that was published (edited, damaged or "
            "replaced)", file=sys.stderr)
      return 1
  try:
    f, rows = inspect(args.file)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  header = f.header
  widths = sorted({r.bits for r in rows})
  width = (f"{header['bits']}-bit" if widths in ([], [header["bits"]])
           else "mixed " + "/".join(str(b) for b in reversed(widths)) + "-bit")
  print(f"{f.path}: inq_jax export v{header['version']}, {width}, {f.size} bytes")
  print(format_table(rows))
  total = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in f.leaves
              if leaf.group == "params")
  quantized = sum(r.weights for r in rows)
  print(f"{len(rows)} quantized leaves ({quantized} weights), "
        f"{len(f.leaves) - len(rows)} raw leaves; float32 would take "
        f"{4 * total} bytes, {4 * total / f.size:.2f}x more")
  if quantized:
    mean_bits = sum(r.bits * r.weights for r in rows) / quantized
    stored = 8 * sum(r.stored_bytes for r in rows) / quantized
    print(f"average bits per quantized weight: {mean_bits:.3f} (code width), "
          f"{stored:.3f} stored")
  bad = [r for r in rows if r.invalid]
  for r in bad:
    print(f"error: {f.path}: {r.path}: {r.invalid} of {r.weights} codes are outside the "
          f"{r.bits}-bit codebook (n1 {r.n1}), first {r.first_invalid}", file=sys.stderr)
  if bad:
    return 1
  if args.sha256 is not None:
    print(f"OK: SHA-256 {got} matches {source}")
  print("OK: the file loads and every quantized weight is in its codebook")
  return 0


if __name__ == "__main__":
  sys.exit(main())
