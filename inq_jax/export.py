"""Ship a quantized model: a compact, checksummed `.inq` file of b-bit codes.

    from inq_jax import export
    stats = export.save("model.inq", params, state, extras={"batch_stats": bs})
    params = export.load("model.inq")                      # bit-identical
    params, extras = export.load_with_extras("model.inq")

Every leaf INQ quantized (a path in `state.exponents`) is stored as b-bit codes
(zero, sign, exponent index n1 - k; see `inq_jax._packing`) with its n1 (one per
layer, or one per output channel), in the smallest layout the writer tries:
"packed" (exactly b bits per weight), "codes+deflate" / "sparse+deflate"
(Huffman-coded bytes, all codes or a nonzero bitmap plus the nonzero codes) or
"packed+lzma" / "sparse+lzma" (LZMA2, for leaves with repeated runs). Every
other leaf (biases, BN parameters, `extras`) is stored raw in its own dtype.

File format, version 1 (all integers little-endian):

    prefix  36 bytes: magic b"\\x89INQJAX\\n", u32 version, u64 header length,
            u64 file length, u32 CRC32 of the header, u32 CRC32 of the 32
            prefix bytes before it
    header  UTF-8 JSON: {"format", "version", "bits", "inq" (the INQConfig and
            step), "params": nested dict of leaf indices, "extras": {name:
            nested dict of leaf indices}, "leaves": [entry, ...]}; an entry has
            path, kind ("quantized"/"raw"), shape, dtype, layout, offset and
            length (bytes, relative to the end of the header), crc32 of its
            section, group ("params"/"extras"), and for quantized leaves
            bits and n1 (an int, or a list with one per output channel)
    data    the sections, back to back in leaf order, nothing else

No pickle anywhere: the header is JSON and every section is plain bytes.

Reading trusts nothing in the file. Before any section is decoded it checks
the magic, version, lengths and CRCs, bounds the header's size
(`MAX_HEADER_BYTES`) and nesting (`MAX_TREE_DEPTH`), and checks every header
field's type and range: dtypes from a whitelist (`QUANTIZED_DTYPES`,
`RAW_DTYPES`), every n1 with its whole codebook inside the stored dtype's
normal numbers, each section's declared size possible for its layout, the
sections tiling the data exactly, and the trees naming every leaf exactly once
at its own path. Compressed sections are inflated with an output cap of the
size their entry declares. Codes outside their codebook are refused. Any
failure is a `ValueError` naming the file and what is wrong, never wrong
weights; `inspect` is the one decode that `load` and `inq_jax.verify_file`
share.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 1 and 2.1 (b-bit power-of-two weights for deployment).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import stat
import sys
from collections.abc import Mapping
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from inq_jax import _packing
from inq_jax._codebook import ZERO_CODEBOOK, dtype_exponent_range, n2_from_n1
from inq_jax._state import INQState
from inq_jax.tree import leaves_with_paths

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
_MAX_JSON_DEPTH = MAX_TREE_DEPTH + 4
MAX_NDIM = 32
# Bound on any declared dimension and weight count, so sizes stay exact ints
# far from overflow in numpy; the section-size checks bound them far tighter.
_MAX_COUNT = 1 << 48

_HEADER_KEYS = frozenset({"format", "version", "bits", "inq", "params", "extras", "leaves"})
_ENTRY_KEYS = frozenset({"path", "group", "shape", "dtype", "kind", "layout", "offset",
                         "length", "crc32"})
_QUANTIZED_KEYS = _ENTRY_KEYS | {"bits", "n1"}


# ------------------------------------------------------------------ trees


def _flatten(tree, what: str, prefix: str = "", depth: int = 1) -> Tuple[dict, list]:
  """(nested dict of leaf indices, [(path, array)]) of a nested dict of arrays."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what}: expected a nested dict of arrays, got "
                    f"{type(tree).__name__} at {prefix or 'the top'}; convert NNX "
                    "state with `state.to_pure_dict()`")
  if depth > MAX_TREE_DEPTH:
    raise ValueError(f"{what}: {prefix} nests deeper than {MAX_TREE_DEPTH} levels, which "
                     "the reader refuses")
  skeleton, leaves = {}, []
  for key in sorted(tree, key=str):
    if not isinstance(key, str):
      raise TypeError(f"{what}: key {key!r} under {prefix or 'the top'} is not a string")
    if "/" in key or not key:
      raise ValueError(f"{what}: key {key!r} under {prefix or 'the top'} is empty or "
                       "contains '/', which the '/'-joined paths cannot represent")
    path = f"{prefix}/{key}" if prefix else key
    value = tree[key]
    if isinstance(value, Mapping):
      skeleton[key], sub = _flatten(value, what, path, depth + 1)
      leaves += sub
    elif isinstance(value, (list, tuple)) or value is None:
      raise TypeError(f"{what}: {path} is {_a(value)}; only nested dicts of "
                      "arrays can be exported (turn lists into dicts with string keys)")
    else:
      skeleton[key] = None
      leaves.append((path, value))
  return skeleton, leaves


def _number(skeleton: dict, counter: list) -> dict:
  out = {}
  for key, value in skeleton.items():
    if value is None:
      out[key] = counter[0]
      counter[0] += 1
    else:
      out[key] = _number(value, counter)
  return out


def _unflatten(skeleton: dict, values: list) -> dict:
  """The nested dict of `values` a checked skeleton (see `_File._tree`) names."""
  return {key: _unflatten(v, values) if isinstance(v, dict) else values[v]
          for key, v in skeleton.items()}


def _host(leaf, path: str) -> np.ndarray:
  try:
    return np.asarray(leaf)
  except Exception as e:  # e.g. a non-addressable multi-host array
    raise TypeError(f"{path}: cannot fetch the leaf to the host ({e})") from None


def _little_endian(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a)
  if sys.byteorder != "little" and a.dtype.itemsize > 1:
    a = a.view(f"u{a.dtype.itemsize}").byteswap()
  return a.tobytes()


def _dtype(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))  # jnp knows bfloat16; names are whitelisted first


def _show(n1) -> str:
  n1 = np.asarray(n1)
  return str(int(n1)) if n1.ndim == 0 else f"{int(n1.min())}..{int(n1.max())}"


def _n1_problem(n1_values, bits: int, dtype_name: str) -> Optional[str]:
  """Why a list of n1 (Python ints) cannot describe `dtype_name` weights, or None.

  Every value of a codebook 2^n2..2^n1 must be a normal number of the stored
  dtype, so that decoding is exact; compared as Python ints, which cannot
  overflow (a float64 comparison would: 2^2000 is inf there).
  """
  lo, hi = dtype_exponent_range(jnp.dtype(dtype_name))
  shift = int(n2_from_n1(0, bits))
  for n1 in n1_values:
    if n1 != ZERO_CODEBOOK and not (n1 <= hi and n1 + shift >= lo):
      return (f"codebook 2^{n1 + shift}..2^{n1} does not fit {dtype_name}, whose normal "
              f"powers of two are 2^{lo}..2^{hi}")
  return None


# ------------------------------------------------------------------ save


def _quantized_section(path, w, n1, bits, compress):
  """(section bytes, header entry fields) of one quantized leaf, after every check."""
  n1_json = int(n1) if np.ndim(n1) == 0 else [int(v) for v in np.asarray(n1)]
  problem = _n1_problem(np.atleast_1d(n1_json).tolist(), bits, str(w.dtype))
  if problem:
    raise ValueError(f"{path}: {problem}; nothing was written")
  codes, valid = _packing.encode(w, n1, bits)
  if not valid.all():
    idx = tuple(int(i) for i in np.argwhere(~valid)[0])
    n1_here = np.asarray(n1) if np.ndim(n1) == 0 else np.asarray(n1)[idx[-1]]
    if int(n1_here) == ZERO_CODEBOOK:
      book = "{0} (an all-zero layer or channel)"
    else:
      book = (f"{{0, +-2^k: {int(n2_from_n1(int(n1_here), bits))} <= k <= "
              f"{int(n1_here)}}}")
    raise ValueError(f"{path}: weight {float(np.asarray(w)[idx])!r} at index {idx} is not "
                     f"in its {bits}-bit codebook {book}; {int((~valid).sum())} such "
                     "weights; nothing was written")
  # Guards the exact round trip through the very table `load` decodes with.
  back = _packing.decode_values(codes, n1, bits, w.dtype)
  as_bits = f"u{w.dtype.itemsize}"  # compared as bit patterns: -0.0 is not +0.0
  if not np.array_equal(back.view(as_bits), np.ascontiguousarray(w).view(as_bits)):
    raise ValueError(f"{path}: the {w.dtype} weights do not survive the code round trip")
  layout, data = _packing.encode_best(codes, bits, compress)
  return data, {"kind": "quantized", "layout": layout, "bits": bits, "n1": n1_json}


def _remove_stale_temporaries(path: str) -> None:
  """Deletes `<path>.tmp<PID>` files that no live process is writing.

  A save killed between creating its temporary and renaming it leaves one
  behind. A temporary is stale when its PID is this process (an earlier save
  here that died half-way cannot still be writing) or names no live process;
  one whose PID is alive is left alone, since another process may be saving
  the same path right now. The liveness test is local: writers on other hosts
  sharing the directory are not seen (only one process should write a path).
  """
  if os.name != "posix":  # os.kill(pid, 0) is only a liveness probe on POSIX
    return
  directory, base = os.path.split(os.path.abspath(path))
  pattern = re.compile(re.escape(base) + r"\.tmp([0-9]{1,12})\Z")
  try:
    names = os.listdir(directory)
  except OSError:
    return
  for name in names:
    match = pattern.match(name)
    if not match:
      continue
    pid = int(match.group(1))
    if pid != os.getpid() and pid > 0:
      try:
        os.kill(pid, 0)
        continue  # alive
      except PermissionError:
        continue  # alive, another user's
      except (ProcessLookupError, OverflowError):
        pass
      except OSError:
        continue
    try:
      os.remove(os.path.join(directory, name))
    except OSError:
      pass


def save(path: str, params, state: INQState, *, extras: Optional[Dict[str, Any]] = None,
         compress: bool = True) -> dict:
  """Writes a fully quantized model to `path` (atomically) and returns size stats.

  Args:
    path: the output file (conventionally `*.inq`); written to a temporary file
      `<path>.tmp<PID>` next to it and renamed, so a crash never leaves a
      half-written file. Temporaries of `path` left by killed saves (their PID
      no longer running) are deleted first.
    params: nested dict of arrays, the params after the last `inq.advance`
      (and any retraining). NNX: pass `nnx.state(model, nnx.Param).to_pure_dict()`.
    state: the `INQState` of the finished run; every leaf in `state.exponents`
      must be fully frozen (`state.masks` all True) and every weight in its
      codebook.
    extras: optional {name: nested dict of arrays} stored raw alongside, e.g.
      {"batch_stats": variables["batch_stats"]}.
    compress: choose each quantized leaf's smallest layout (Huffman-coded
      DEFLATE for typical layers; LZMA only where a sample shows repeated
      runs); False: "packed" only.

  Returns:
    {"bytes": file size, "float32_bytes": 4 * number of param weights,
     "ratio": float32_bytes / bytes, "quantized_weights": N, "quantized_bytes":
     bytes of the quantized leaves' sections, "bits": b, "layouts": {path:
     layout}}.

  Raises:
    TypeError/ValueError naming the parameter path and value, before anything
    is written: a tree that is not a nested dict of arrays, a state made for
    other params, a quantized leaf not fully frozen, a weight outside its
    codebook, a codebook outside the leaf dtype's normal numbers, or a dtype
    the format does not store (see `RAW_DTYPES`).

  Example:
    >>> stats = save("lenet.inq", params, state)
    >>> stats["ratio"]   # about 6.3 for 5-bit LeNet-5

  Reference: arXiv:1702.03044, Sec. 2.1.
  """
  if not isinstance(state, INQState):
    raise TypeError(f"state must be an INQState, got {type(state).__name__}")
  extras = {} if extras is None else extras
  if not isinstance(extras, Mapping):
    raise TypeError(f"extras must be a dict of nested dicts, got {type(extras).__name__}")
  bits = int(state.config.bits)
  skeleton, flat = _flatten(params, "params")
  extra_skeletons, extra_flat = {}, []
  for name in sorted(extras):
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"extras: name {name!r} must be a non-empty string without '/'")
    extra_skeletons[name], sub = _flatten(extras[name], f"extras[{name!r}]", depth=2)
    extra_flat += [(f"{name}/{p}", x) for p, x in sub]
  paths = {p for p, _ in flat}
  missing = sorted(set(state.exponents) - paths)
  if missing:
    raise ValueError(f"state quantizes {missing[:6]}, which are not in params (paths "
                     f"look like {sorted(paths)[:6]})")
  masks = dict(leaves_with_paths(state.masks)[0])

  entries, sections, jobs = [], [], []
  total_weights = 0
  for group, items in (("params", flat), ("extras", extra_flat)):
    for leaf_path, leaf in items:
      w = _host(leaf, leaf_path)
      entry = {"path": leaf_path, "group": group, "shape": list(w.shape),
               "dtype": str(w.dtype)}
      if group == "params":
        total_weights += w.size
      if group == "params" and leaf_path in state.exponents:
        if str(w.dtype) not in QUANTIZED_DTYPES:
          raise TypeError(f"{leaf_path}: dtype {w.dtype} is not one of {QUANTIZED_DTYPES}")
        mask = masks.get(leaf_path)
        if mask is None or np.shape(mask) != w.shape or not np.asarray(mask).all():
          frozen = 0 if mask is None else int(np.sum(np.asarray(mask)))
          raise ValueError(
              f"{leaf_path}: only {frozen} of {w.size} weights are quantized and frozen "
              f"(INQ step {int(state.step)} of {state.config.num_steps}); finish every "
              "portion with inq.advance before exporting; nothing was written")
        n1 = np.asarray(state.exponents[leaf_path]).astype(np.int64)
        jobs.append((len(entries), leaf_path, w, n1))
        sections.append(None)  # filled in below
      else:
        if str(w.dtype) not in RAW_DTYPES:
          raise TypeError(f"{leaf_path}: dtype {w.dtype} cannot be stored; the format "
                          f"keeps {RAW_DTYPES}")
        sections.append(_little_endian(w))
        entry.update({"kind": "raw", "layout": _packing.LAYOUT_RAW})
      entries.append(entry)

  # Encoding and compression release the GIL (numpy, zlib, lzma): layers run
  # in parallel, largest first so the last one to finish is small. Errors are
  # raised for the first bad leaf in file order, whatever finished first.
  order = sorted(jobs, key=lambda job: -job[2].size)
  workers = max(1, min(len(order), os.cpu_count() or 1, 8))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {job[0]: pool.submit(_quantized_section, job[1], job[2], job[3], bits,
                                   compress) for job in order}
    done = {}
    for index, _, _, _ in jobs:
      try:
        done[index] = futures[index].result()
      except BaseException:
        for f in futures.values():
          f.cancel()
        raise
  quantized_weights, quantized_bytes, layouts = 0, 0, {}
  for index, leaf_path, w, _ in jobs:
    data, fields = done[index]
    entries[index].update(fields)
    sections[index] = data
    quantized_weights += w.size
    quantized_bytes += len(data)
    layouts[leaf_path] = fields["layout"]

  offset = 0
  for entry, data in zip(entries, sections):
    entry.update({"offset": offset, "length": len(data), "crc32": _packing.crc32(data)})
    offset += len(data)
  counter = [0]
  header = {
      "format": FORMAT, "version": _packing.VERSION, "bits": bits,
      "inq": {**state.config.to_dict(), "step": int(state.step)},
      "params": _number(skeleton, counter),
      "extras": {name: _number(s, counter) for name, s in extra_skeletons.items()},
      "leaves": entries,
  }
  header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
  if len(header_bytes) > MAX_HEADER_BYTES:
    raise ValueError(f"the header would take {len(header_bytes)} bytes, more than the "
                     f"{MAX_HEADER_BYTES} a reader accepts; nothing was written")
  file_len = _packing.PREFIX.size + len(header_bytes) + offset
  prefix = _packing.prefix(len(header_bytes), file_len, _packing.crc32(header_bytes))

  path = os.fspath(path)
  _remove_stale_temporaries(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(prefix)
      f.write(header_bytes)
      for data in sections:
        f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  size = os.path.getsize(path)
  return {"bytes": size, "float32_bytes": 4 * total_weights,
          "ratio": 4 * total_weights / size, "quantized_weights": quantized_weights,
          "quantized_bytes": quantized_bytes, "bits": bits, "layouts": layouts}


# ------------------------------------------------------------------ read


def _read(path: str, offset: int, length: int) -> Tuple[bytes, int]:
  """(up to `length` bytes of the file from `offset`, the file's size).

  The one place the reader touches storage. Only regular files: a FIFO or a
  device (/dev/zero) could block or never end, so they are refused before
  reading, and opened non-blocking so one swapped in after the check cannot
  block either.
  """
  try:
    mode = os.stat(path).st_mode
    regular = stat.S_ISREG(mode)
    if regular:
      fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) |
                   getattr(os, "O_BINARY", 0))
  except FileNotFoundError:
    raise ValueError(f"{path}: does not exist") from None
  except OSError as e:
    raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
  except ValueError as e:  # e.g. an embedded NUL in the name
    raise ValueError(f"{path!r}: cannot read the file ({e})") from None
  if not regular:
    raise ValueError(f"{path}: not a regular file")
  try:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
      raise ValueError(f"{path}: not a regular file")
    with os.fdopen(fd, "rb") as f:
      fd = None
      f.seek(offset)
      return f.read(max(0, min(length, st.st_size - offset))), st.st_size
  except OSError as e:
    raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
  finally:
    if fd is not None:
      os.close(fd)


def _json_depth(raw: bytes) -> int:
  """The deepest nesting of [ and { outside strings in JSON text, in linear time.

  Run before `json.loads`, whose recursion a deeply nested header would
  exhaust. Only the few structural bytes are looked at: a quote is escaped
  when an odd run of backslashes precedes it.
  """
  b = np.frombuffer(raw, np.uint8)
  where = np.flatnonzero((b == 0x22) | (b == 0x5C) | (b == 0x5B) | (b == 0x7B) |
                         (b == 0x5D) | (b == 0x7D))
  if where.size == 0:
    return 0
  ch = b[where]
  backslash = ch == 0x5C
  m = where.size
  idx = np.arange(m)
  adjacent = np.zeros(m, bool)
  adjacent[1:] = where[1:] == where[:-1] + 1
  follows_backslash = np.zeros(m, bool)
  follows_backslash[1:] = backslash[:-1] & adjacent[1:]
  # Length of the run of adjacent backslashes ending at each backslash.
  run_start = np.maximum.accumulate(np.where(backslash & ~follows_backslash, idx, 0))
  run = np.where(backslash, idx - run_start + 1, 0)
  run_before = np.zeros(m, np.int64)
  run_before[1:] = np.where(follows_backslash[1:], run[:-1], 0)
  quote = (ch == 0x22) & (run_before % 2 == 0)
  inside = np.cumsum(quote) % 2 == 1  # for a bracket: an odd number of quotes before it
  delta = np.where(inside | backslash | (ch == 0x22), 0,
                   np.where((ch == 0x5B) | (ch == 0x7B), 1, -1))
  return int(max(0, np.cumsum(delta).max()))


def _no_duplicate_keys(pairs):
  out = {}
  for key, value in pairs:
    if key in out:
      raise ValueError(f"duplicate key {key!r}")
    out[key] = value
  return out


def _no_constant(name):
  raise ValueError(f"{name} is not JSON")


def _a(value) -> str:
  """'a list', 'an int': the JSON value's Python type, for messages."""
  name = type(value).__name__
  return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def _brief(value) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


class QuantizedCodes(NamedTuple):
  """The stored codes of one quantized leaf, as `read_codes` returns them."""
  path: str
  codes: np.ndarray   # uint8 b-bit codes, the leaf's shape (see inq_jax._packing)
  bits: int
  n1: np.ndarray      # int64: a scalar, or one per output channel (last axis)
  dtype: np.dtype
  layout: str         # one of inq_jax._packing.QUANTIZED_LAYOUTS
  stored_bytes: int   # bytes of the section on disk


class _Leaf(NamedTuple):
  """A checked header entry."""
  index: int
  path: str
  group: str
  kind: str
  shape: Tuple[int, ...]
  dtype: np.dtype
  layout: str
  offset: int
  length: int
  crc32: int
  bits: Optional[int]
  n1: Optional[np.ndarray]


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
                         f"is not in the {q.bits}-bit codebook (n1 {_show(q.n1)})")
    values = [leaf.value for leaf in self.leaves]
    params = _unflatten(self.header["params"], values)
    extras = {name: _unflatten(s, values) for name, s in self.header["extras"].items()}
    return params, extras


class _File:
  """An export file with its prefix and every header field checked."""

  def __init__(self, path):
    self.path = path if isinstance(path, str) else os.fsdecode(os.fspath(path))
    self.size, self.header, self.leaves = self._open()

  def error(self, what: str) -> ValueError:
    return ValueError(f"{self.path}: {what}")

  # -------------------------------------------------------------- framing

  def _open(self):
    n = _packing.PREFIX.size
    head, size = _read(self.path, 0, n)
    if len(head) < len(_packing.MAGIC) and _packing.MAGIC.startswith(head):
      raise self.error(f"truncated: {len(head)} bytes, shorter than the magic")
    if head[:len(_packing.MAGIC)] != _packing.MAGIC:
      raise self.error(f"not an inq_jax export (magic {head[:8]!r}, expected "
                       f"{_packing.MAGIC!r})")
    if len(head) < n:
      raise self.error(f"truncated: {len(head)} bytes, shorter than the {n}-byte prefix")
    _, version, header_len, file_len, header_crc, prefix_crc = _packing.PREFIX.unpack(head)
    if version != _packing.VERSION:
      raise self.error(f"format version {version}; this reader supports version "
                       f"{_packing.VERSION}")
    if _packing.crc32(head[:n - 4]) != prefix_crc:
      raise self.error("corrupt: the prefix CRC32 does not match")
    if size < file_len:
      raise self.error(f"truncated: {size} bytes, the file says {file_len}")
    if size > file_len:
      raise self.error(f"{size - file_len} unexpected bytes after the end "
                       f"({file_len} bytes)")
    if header_len > MAX_HEADER_BYTES:
      raise self.error(f"corrupt: a header of {header_len} bytes exceeds the "
                       f"{MAX_HEADER_BYTES}-byte limit")
    if n + header_len > file_len:
      raise self.error(f"corrupt: header length {header_len} runs past the end")
    rest, size_now = _read(self.path, n, file_len - n)
    if size_now != size or len(rest) != file_len - n:
      raise self.error("the file changed while it was being read")
    raw = rest[:header_len]
    if _packing.crc32(raw) != header_crc:
      raise self.error("corrupt: the header CRC32 does not match")
    self.data = memoryview(rest)[header_len:]
    depth = _json_depth(raw)
    if depth > _MAX_JSON_DEPTH:
      raise self.error(f"corrupt: the header nests {depth} levels deep, more than "
                       f"{_MAX_JSON_DEPTH}")
    try:
      header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
      raise self.error(f"corrupt: the header is not valid JSON ({e})") from None
    leaves = self._check_header(header, version)
    return size, header, leaves

  # -------------------------------------------------------------- header

  def _int(self, value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
      raise self.error(f"{what} is {_brief(value)}, not an integer in [{lo}, {hi}]")
    return value

  def _check_header(self, header, version) -> List[_Leaf]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
      raise self.error("corrupt: the header does not describe an inq_jax export")
    keys = set(header)
    if keys != _HEADER_KEYS:
      raise self.error(f"corrupt: header fields {sorted(keys ^ _HEADER_KEYS)} missing or "
                       "unknown")
    if header["version"] != version or isinstance(header["version"], bool):
      raise self.error(f"corrupt: header version {_brief(header['version'])} disagrees "
                       f"with the prefix's {version}")
    bits = self._int(header["bits"], "header bits", 2, 8)
    for name in ("inq", "params", "extras"):
      if not isinstance(header[name], dict):
        raise self.error(f"corrupt: header {name!r} is {_a(header[name])}, "
                         "not an object")
    entries = header["leaves"]
    if not isinstance(entries, list):
      raise self.error(f"corrupt: header 'leaves' is {_a(entries)}, not a list")
    leaves, end = [], 0
    for i, entry in enumerate(entries):
      leaf = self._check_entry(i, entry, bits, end)
      end = leaf.offset + leaf.length
      leaves.append(leaf)
    if end != len(self.data):
      raise self.error(f"corrupt: the sections end at data byte {end}, the data has "
                       f"{len(self.data)}")
    # Every leaf exactly once, at its own path, in the tree of its group.
    owner = {}
    self._tree(header["params"], "params", "", "params", leaves, owner, 1)
    for name, skeleton in header["extras"].items():
      if not isinstance(name, str) or not name or "/" in name:
        raise self.error(f"corrupt: extras name {_brief(name)} is empty or contains '/'")
      if not isinstance(skeleton, dict):
        raise self.error(f"corrupt: extras[{name!r}] is {_a(skeleton)}, "
                         "not an object")
      self._tree(skeleton, f"extras[{name!r}]", name, "extras", leaves, owner, 2)
    unnamed = [leaf.path for leaf in leaves if leaf.index not in owner]
    if unnamed:
      raise self.error(f"corrupt: leaves {unnamed[:4]} appear in no tree")
    return leaves

  def _check_entry(self, i, entry, bits, start) -> _Leaf:
    if not isinstance(entry, dict):
      raise self.error(f"corrupt: leaf entry {i} is {_a(entry)}, not an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path or len(path) > 4096:
      raise self.error(f"corrupt: leaf entry {i} has path {_brief(path)}")
    where = f"{path} (leaf {i})"
    kind = entry.get("kind")
    if kind not in ("quantized", "raw"):
      raise self.error(f"{where}: unknown leaf kind {_brief(kind)}")
    expected = _QUANTIZED_KEYS if kind == "quantized" else _ENTRY_KEYS
    if set(entry) != expected:
      missing, unknown = sorted(expected - set(entry)), sorted(set(entry) - expected)
      raise self.error(f"{where}: malformed {kind} leaf entry (missing {missing}, "
                       f"unknown {unknown})")
    group = entry["group"]
    if group not in ("params", "extras"):
      raise self.error(f"{where}: group {_brief(group)} is neither 'params' nor 'extras'")
    allowed = QUANTIZED_DTYPES if kind == "quantized" else RAW_DTYPES
    name = entry["dtype"]
    if name not in allowed or not isinstance(name, str):
      raise self.error(f"{where}: dtype {_brief(name)} is not one of {allowed}")
    dtype = _dtype(name)
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
      raise self.error(f"{where}: shape {_brief(shape)} is not a list of at most "
                       f"{MAX_NDIM} sizes")
    shape = tuple(self._int(s, f"{where}: a dimension", 0, _MAX_COUNT) for s in shape)
    count = 1
    for s in shape:
      count *= s
    if count > _MAX_COUNT:
      raise self.error(f"{where}: shape {shape} holds {count} weights, more than "
                       f"{_MAX_COUNT}")
    layout = entry["layout"]
    offset = self._int(entry["offset"], f"{where}: offset", 0, len(self.data))
    length = self._int(entry["length"], f"{where}: length", 0, len(self.data))
    crc = self._int(entry["crc32"], f"{where}: crc32", 0, 0xFFFFFFFF)
    if offset != start:
      raise self.error(f"{where}: section at data byte {offset}; sections lie back to "
                       f"back, so it must start at {start}")
    if offset + length > len(self.data):
      raise self.error(f"{where}: section [{offset}, {offset + length}) lies outside the "
                       f"{len(self.data)} data bytes")
    leaf_bits, n1 = None, None
    if kind == "raw":
      if layout != _packing.LAYOUT_RAW:
        raise self.error(f"{where}: raw leaf with layout {_brief(layout)}")
      if length != count * dtype.itemsize:
        raise self.error(f"{where}: {length} bytes, expected {count * dtype.itemsize} "
                         f"for {shape} {name}")
    else:
      if group != "params":
        raise self.error(f"{where}: a quantized leaf in group {group!r}; only params are "
                         "quantized")
      if layout not in _packing.QUANTIZED_LAYOUTS:
        raise self.error(f"{where}: unknown layout {_brief(layout)}; expected one of "
                         f"{_packing.QUANTIZED_LAYOUTS}")
      leaf_bits = self._int(entry["bits"], f"{where}: bits", 2, 8)
      if leaf_bits != bits:
        raise self.error(f"{where}: {leaf_bits}-bit codes in a {bits}-bit file")
      raw_n1 = entry["n1"]
      if isinstance(raw_n1, list):
        if not shape or len(raw_n1) != shape[-1]:
          raise self.error(f"{where}: {len(raw_n1)} per-channel n1 for weights of shape "
                           f"{shape} (one per entry of the last axis)")
        values = raw_n1
      else:
        values = [raw_n1]
      values = [self._int(v, f"{where}: n1", -(1 << 62), 1 << 62) for v in values]
      problem = _n1_problem(values, bits, name)
      if problem:
        raise self.error(f"{where}: {problem}")
      n1 = np.asarray(values if isinstance(raw_n1, list) else values[0], np.int64)
      least = _packing.min_section_bytes(layout, count, bits)
      if length < least or (layout == _packing.LAYOUT_PACKED and length != least):
        raise self.error(f"{where}: a {layout} section of {length} bytes cannot hold "
                         f"{count} {bits}-bit codes (shape {shape})")
    return _Leaf(i, path, group, kind, shape, dtype, layout, offset, length, crc, leaf_bits,
                 n1)

  def _tree(self, skeleton, what, prefix, group, leaves, owner, depth):
    if depth > MAX_TREE_DEPTH:
      raise self.error(f"corrupt: {what} nests deeper than {MAX_TREE_DEPTH} levels")
    for key, value in skeleton.items():
      if not key or "/" in key:
        raise self.error(f"corrupt: {what} key {key!r} under {prefix or 'the top'} is "
                         "empty or contains '/'")
      path = f"{prefix}/{key}" if prefix else key
      if isinstance(value, dict):
        self._tree(value, what, path, group, leaves, owner, depth + 1)
        continue
      index = self._int(value, f"corrupt: {what} index at {path}", 0, len(leaves) - 1)
      if index in owner:
        raise self.error(f"corrupt: leaf {index} appears at both {owner[index]} and {path}")
      owner[index] = path
      leaf = leaves[index]
      if leaf.path != path or leaf.group != group:
        raise self.error(f"corrupt: {what} names leaf {index} at {path}, but that leaf is "
                         f"{leaf.path} in {leaf.group}")

  # -------------------------------------------------------------- sections

  def section(self, leaf: _Leaf) -> bytes:
    data = bytes(self.data[leaf.offset:leaf.offset + leaf.length])
    if _packing.crc32(data) != leaf.crc32:
      raise self.error(f"{leaf.path}: corrupt section, CRC32 mismatch")
    return data

  def codes(self, leaf: _Leaf) -> QuantizedCodes:
    data = self.section(leaf)
    count = int(np.prod(leaf.shape, dtype=np.int64))
    try:
      codes = _packing.decode_section(data, leaf.layout, count, leaf.bits)
    except ValueError as e:
      raise self.error(f"{leaf.path}: corrupt {leaf.layout} section: {e}") from None
    return QuantizedCodes(leaf.path, codes.reshape(leaf.shape), leaf.bits, leaf.n1,
                          leaf.dtype, leaf.layout, leaf.length)

  def decode(self, leaf: _Leaf) -> DecodedLeaf:
    if leaf.kind == "raw":
      data = self.section(leaf)
      dtype = leaf.dtype
      a = np.frombuffer(data, dtype if dtype.itemsize == 1 or sys.byteorder == "little"
                        else f"u{dtype.itemsize}")
      if a.dtype != dtype:
        a = a.byteswap().view(dtype)
      if dtype == np.bool_ and data and max(data) > 1:
        raise self.error(f"{leaf.path}: a bool byte other than 0 or 1")
      return DecodedLeaf(leaf.path, leaf.group, leaf.kind, leaf.layout, leaf.shape, dtype,
                         leaf.length, None, 0, None, a.reshape(leaf.shape).copy())
    q = self.codes(leaf)
    ok = _packing.valid_codes(q.codes, q.n1, q.bits)
    invalid = int(ok.size - np.count_nonzero(ok))
    first, value = None, None
    if invalid:
      first = tuple(int(i) for i in np.argwhere(~ok)[0])
    else:
      value = _packing.decode_values(q.codes, q.n1, q.bits, q.dtype)
    return DecodedLeaf(leaf.path, leaf.group, leaf.kind, leaf.layout, leaf.shape, leaf.dtype,
                       leaf.length, q, invalid, first, value)


def inspect(path) -> ExportFile:
  """Decodes every leaf of an export file: the one decode behind `load` and verify.

  Codes outside their codebook do not raise here; they are counted per leaf
  (`DecodedLeaf.invalid`, whose `value` is then None) so that a verifier can
  report them all. `ExportFile.trees()` is what `load_with_extras` returns,
  and raises for such codes.

  Raises:
    ValueError naming the file and what is wrong: not a regular file, not an
    export, unsupported version, truncated, a CRC32 mismatch, a header field
    of the wrong type or out of range, a section that cannot hold its declared
    shape or does not decode to it.
  """
  f = _File(path)
  return ExportFile(f.path, f.size, f.header, [f.decode(leaf) for leaf in f.leaves])


def read_header(path) -> dict:
  """The checked JSON header of an export file (see the module docstring).

  Raises:
    ValueError naming the file: wrong magic or version, truncated, corrupt
    prefix or header (CRC32 mismatch, a field of the wrong type or range).
  """
  return _File(path).header


def read_codes(path, *, check_all: bool = True) -> Dict[str, QuantizedCodes]:
  """{path: QuantizedCodes} of every quantized leaf, without decoding to floats.

  Codes are returned as stored, valid or not (`inq_jax._packing.valid_codes`
  tells); the header has been checked as for `load`.

  Args:
    path: the export file.
    check_all: also read every raw section and check its CRC32.

  Raises:
    ValueError naming the file and the leaf: as `inspect`.
  """
  f = _File(path)
  out = {}
  for leaf in f.leaves:
    if leaf.kind == "quantized":
      out[leaf.path] = f.codes(leaf)
    elif check_all:
      f.section(leaf)
  return out


def load_with_extras(path) -> Tuple[dict, Dict[str, dict]]:
  """(params, extras) from an export file: numpy arrays of their saved dtypes.

  The params are bit-identical to those `save` was given (the quantized ones
  decoded from their codes, the others as stored); extras likewise.

  Raises:
    ValueError naming the file and what is wrong (see `inspect`), or a code
    outside its codebook. Never returns partially or wrongly decoded weights.

  Example:
    >>> params, extras = load_with_extras("lenet.inq")
    >>> logits = model.apply({"params": params, **extras}, images)
  """
  return inspect(path).trees()


def load(path) -> dict:
  """The params of an export file (see `load_with_extras`)."""
  return load_with_extras(path)[0]


__all__ = ["DecodedLeaf", "ExportFile", "QuantizedCodes", "QUANTIZED_DTYPES", "RAW_DTYPES",
           "inspect", "load", "load_with_extras", "read_codes", "read_header", "save"]
