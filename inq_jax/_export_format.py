"""What an `.inq` file may hold, shared by its writer and its reader.

The layout of the file is described in `inq_jax.export`; the codes and bit
streams of its sections in `inq_jax._packing`. Here: the names and limits both
sides agree on, the one codebook rule (`n1_problem`, from `_codebook`), the
`sha256sum` sidecar lines, and the NamedTuples the reader returns.
"""

from __future__ import annotations

from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from inq_jax._codebook import ZERO_CODEBOOK, dtype_exponent_range, n2_from_n1, representable

FORMAT = "inq_jax.export"

# Dtypes a file may declare. Quantized leaves are floats; raw leaves also the
# integer and bool types that batch statistics, step counters or masks in
# `extras` use. Anything else (object, datetime, void, complex, ...) is refused
# by `save` and by the reader alike.
QUANTIZED_DTYPES = ("float16", "bfloat16", "float32", "float64")
RAW_DTYPES = QUANTIZED_DTYPES + ("int8", "int16", "int32", "int64", "uint8", "uint16",
                                 "uint32", "uint64", "bool")
# The header is read whole and parsed before any section: bound it. Far above
# what a model needs (a few hundred bytes per leaf plus its n1 lists).
MAX_HEADER_BYTES = 16 << 20
# Nesting of the params/extras trees; the JSON header nests a few levels more.
MAX_TREE_DEPTH = 64
MAX_JSON_DEPTH = MAX_TREE_DEPTH + 4
MAX_NDIM = 32
# Bound on any declared dimension and weight count, so sizes stay exact ints
# far from overflow in numpy; the section-size checks bound them far tighter.
MAX_COUNT = 1 << 48

HEADER_KEYS = frozenset({"format", "version", "bits", "inq", "params", "extras", "leaves"})
ENTRY_KEYS = frozenset({"path", "group", "shape", "dtype", "kind", "layout", "offset",
                        "length", "crc32"})
QUANTIZED_KEYS = ENTRY_KEYS | {"bits", "n1"}

# The checksum file `save(..., sha256_file=True)` writes beside `path`.
SHA256_SUFFIX = ".sha256"


def dtype_of(name: str) -> np.dtype:
  """The numpy dtype of a whitelisted name (jnp knows bfloat16)."""
  return np.dtype(jnp.dtype(name))


def show_n1(n1) -> str:
  n1 = np.asarray(n1)
  return str(int(n1)) if n1.ndim == 0 else f"{int(n1.min())}..{int(n1.max())}"


def n1_problem(n1_values: Iterable[int], bits: int, dtype_name: str) -> Optional[str]:
  """Why exponents n1 (ints within int64) cannot describe `dtype_name` weights, or None.

  The rule is `_codebook.representable`, the one `init` applies: every
  codebook value and rounding edge 2^(n2-1)..2^n1 is a normal number of the
  dtype, so a file holds exactly the codebooks a run can make and every code
  decodes exactly.
  """
  n1 = np.asarray(list(n1_values), np.int64)
  n2 = n2_from_n1(n1, bits)
  if representable(n1, n2, jnp.dtype(dtype_name)):
    return None
  lo, hi = dtype_exponent_range(jnp.dtype(dtype_name))
  bad = int(n1[(n1 != ZERO_CODEBOOK) & ~((n1 <= hi) & (n2 - 1 >= lo))][0])
  return (f"codebook 2^{int(n2_from_n1(bad, bits))}..2^{bad} does not fit {dtype_name}, "
          f"whose normal powers of two are 2^{lo}..2^{hi} (the codebook needs "
          f"2^{int(n2_from_n1(bad, bits)) - 1}..2^{bad})")


def type_phrase(value) -> str:
  """'a list', 'an int': the value's Python type, for messages."""
  name = type(value).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def brief(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def unflatten(skeleton: dict, values: list) -> dict:
  """The nested dict of `values` a checked skeleton of leaf indices names."""
  return {key: unflatten(v, values) if isinstance(v, dict) else values[v]
          for key, v in skeleton.items()}


# ------------------------------------------------------------------ sha256sum lines


def sha256_line(digest: str, name: str) -> str:
  """One `sha256sum` line for file `name`, escaped as GNU coreutils does.

  A name holding a backslash, newline or carriage return is written with
  those escaped and the line starts with a backslash, so `sha256sum -c` reads
  it back.
  """
  if any(c in name for c in "\\\n\r"):
    escaped = name.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return f"\\{digest}  {escaped}\n"
  return f"{digest}  {name}\n"


def _unescape(name: str) -> str:
  out, i = [], 0
  while i < len(name):
    if name[i] == "\\" and i + 1 < len(name) and name[i + 1] in "\\nr":
      out.append({"\\": "\\", "n": "\n", "r": "\r"}[name[i + 1]])
      i += 2
    else:
      out.append(name[i])
      i += 1
  return "".join(out)


def parse_sha256_lines(text: str) -> List[Tuple[str, str]]:
  """[(lower-case hex digest, file name)] of `sha256sum` output (GNU or --tag style).

  Raises:
    ValueError naming the first line that is neither form.
  """
  out = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    if line.startswith("SHA256 (") and ") = " in line:  # sha256sum --tag
      name, _, digest = line[len("SHA256 ("):].rpartition(") = ")
    else:
      escaped = line.startswith("\\")
      body = line[1:] if escaped else line
      digest, name = body[:64], body[66:]
      if body[64:66] not in ("  ", " *"):
        digest = ""
      if escaped:
        name = _unescape(name)
    if not is_sha256_hex(digest) or not name:
      raise ValueError(f"line {number} is not a sha256sum line ('<64 hex digits>  <file>'): "
                       f"{brief(line)}")
    out.append((digest.lower(), name))
  return out


def is_sha256_hex(text: str) -> bool:
  return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


# ------------------------------------------------------------------ what the reader returns


class QuantizedCodes(NamedTuple):
  """The stored codes of one quantized leaf, as `read_codes` returns them."""
  path: str
  codes: np.ndarray   # uint8 b-bit codes, the leaf's shape (see inq_jax._packing)
  bits: int           # this leaf's own width
  n1: np.ndarray      # int64: a scalar, or one per output channel (last axis)
  dtype: np.dtype
  layout: str         # one of inq_jax._packing.QUANTIZED_LAYOUTS
  stored_bytes: int   # bytes of the section on disk


class DecodedLeaf(NamedTuple):
  """One leaf as `inspect` decoded it."""
  path: str
  group: str          # "params" or "extras"
  kind: str           # "quantized" or "raw"
  layout: str
  shape: Tuple[int, ...]
  dtype: np.dtype
  stored_bytes: int
  codes: Optional[QuantizedCodes]  # quantized leaves only
  invalid: int        # codes outside the codebook (quantized leaves)
  first_invalid: Optional[Tuple[int, ...]]
  value: Optional[np.ndarray]      # None when a code is invalid


class ExportFile(NamedTuple):
  """A fully decoded export file (`inspect`)."""
  path: str
  size: int                  # bytes
  header: dict
  leaves: List[DecodedLeaf]  # in file order

  def invalid(self) -> List[DecodedLeaf]:
    return [leaf for leaf in self.leaves if leaf.invalid]

  def trees(self) -> Tuple[dict, Dict[str, dict]]:
    """(params, extras), or ValueError for the first leaf with an invalid code."""
    for leaf in self.leaves:
      if leaf.invalid:
        q = leaf.codes
        raise ValueError(f"{self.path}: {leaf.path}: code "
                         f"{int(q.codes[leaf.first_invalid])} at index {leaf.first_invalid} "
                         f"is not in the {q.bits}-bit codebook (n1 {show_n1(q.n1)})")
    values = [leaf.value for leaf in self.leaves]
    params = unflatten(self.header["params"], values)
    extras = {name: unflatten(s, values) for name, s in self.header["extras"].items()}
    return params, extras
