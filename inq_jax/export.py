"""Ship a quantized model: a compact, checksummed `.inq` file of b-bit codes.

    from inq_jax import export
    stats = export.save("model.inq", params, state, extras={"batch_stats": bs})
    params = export.load("model.inq")                      # bit-identical
    params, extras = export.load_with_extras("model.inq")

Every leaf INQ quantized (a path in `state.exponents`) is stored as b-bit codes
(zero, sign, exponent index n1 - k; see `inq_jax._packing`) with its n1 (one per
layer, or one per output channel), in whichever layout is smallest: "packed"
(exactly b bits per weight), "packed+lzma" (those bytes compressed with LZMA2)
or "sparse+lzma" (LZMA2 of a nonzero bitmap plus one byte per nonzero code; the
entropy-coded layout that makes pruned layers, mostly zeros, small). Every other
leaf (biases, BN parameters, `extras`) is stored raw in its own dtype.

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
    data    the sections, back to back

No pickle anywhere: the header is JSON and every section is plain bytes.
Reading checks the magic, version, lengths and every CRC before it decodes,
and refuses codes outside their codebook, so a damaged file raises a
`ValueError` naming the file instead of returning wrong weights.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 1 and 2.1 (b-bit power-of-two weights for deployment).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from inq_jax import _packing
from inq_jax._codebook import ZERO_CODEBOOK
from inq_jax._state import INQState
from inq_jax.tree import leaves_with_paths

FORMAT = "inq_jax.export"


# ------------------------------------------------------------------ trees


def _flatten(tree, what: str, prefix: str = "") -> Tuple[dict, list]:
  """(nested dict of leaf indices, [(path, array)]) of a nested dict of arrays."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what}: expected a nested dict of arrays, got "
                    f"{type(tree).__name__} at {prefix or 'the top'}; convert NNX "
                    "state with `state.to_pure_dict()`")
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
      skeleton[key], sub = _flatten(value, what, path)
      leaves += sub
    elif isinstance(value, (list, tuple)) or value is None:
      raise TypeError(f"{what}: {path} is a {type(value).__name__}; only nested dicts of "
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


def _unflatten(skeleton: dict, values: list, where: str) -> dict:
  out = {}
  for key, value in skeleton.items():
    if isinstance(value, dict):
      out[key] = _unflatten(value, values, where)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(values):
      out[key] = values[value]
    else:
      raise ValueError(f"{where}: bad leaf index {value!r} at key {key!r}")
  return out


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


def _dtype(name: str):
  try:
    return np.dtype(jnp.dtype(name))  # jnp knows bfloat16 and friends
  except TypeError:
    raise ValueError(f"unknown dtype {name!r}") from None


def _show(n1) -> str:
  n1 = np.asarray(n1)
  return str(int(n1)) if n1.ndim == 0 else f"{int(n1.min())}..{int(n1.max())}"


# ------------------------------------------------------------------ save


def _quantized_section(path, w, n1, bits, compress):
  """(section bytes, header entry fields) of one quantized leaf, after every check."""
  codes, valid = _packing.encode(w, n1, bits)
  if not valid.all():
    idx = tuple(int(i) for i in np.argwhere(~valid)[0])
    n1_here = np.asarray(n1) if np.ndim(n1) == 0 else np.asarray(n1)[idx[-1]]
    if int(n1_here) == ZERO_CODEBOOK:
      book = "{0} (an all-zero layer or channel)"
    else:
      book = (f"{{0, +-2^k: {int(_packing.n2_of(n1_here, bits))} <= k <= "
              f"{int(n1_here)}}}")
    raise ValueError(f"{path}: weight {float(np.asarray(w)[idx])!r} at index {idx} is not "
                     f"in its {bits}-bit codebook {book}; {int((~valid).sum())} such "
                     "weights; nothing was written")
  back = _packing.decode(codes, n1, bits).astype(w.dtype)
  if _little_endian(back) != _little_endian(w):  # guards the exact round trip
    raise ValueError(f"{path}: the {w.dtype} weights do not survive the code round trip")
  layouts = _packing.QUANTIZED_LAYOUTS if compress else (_packing.LAYOUT_PACKED,)
  candidates = _packing.encode_sections(codes, bits, layouts)
  layout = min(layouts, key=lambda name: len(candidates[name]))  # ties: the simpler one
  data = candidates[layout]
  n1_json = int(n1) if np.ndim(n1) == 0 else [int(v) for v in np.asarray(n1)]
  return data, {"kind": "quantized", "layout": layout, "bits": bits, "n1": n1_json}


def save(path: str, params, state: INQState, *, extras: Optional[Dict[str, Any]] = None,
         compress: bool = True) -> dict:
  """Writes a fully quantized model to `path` (atomically) and returns size stats.

  Args:
    path: the output file (conventionally `*.inq`); written to a temporary file
      next to it and renamed, so a crash never leaves a half-written file.
    params: nested dict of arrays, the params after the last `inq.advance`
      (and any retraining). NNX: pass `nnx.state(model, nnx.Param).to_pure_dict()`.
    state: the `INQState` of the finished run; every leaf in `state.exponents`
      must be fully frozen (`state.masks` all True) and every weight in its
      codebook.
    extras: optional {name: nested dict of arrays} stored raw alongside, e.g.
      {"batch_stats": variables["batch_stats"]}.
    compress: also try the LZMA layouts and keep the smallest per leaf (slow
      for very large layers: LZMA runs at a few MB/s); False: "packed" only.

  Returns:
    {"bytes": file size, "float32_bytes": 4 * number of param weights,
     "ratio": float32_bytes / bytes, "quantized_weights": N, "quantized_bytes":
     bytes of the quantized leaves' sections, "bits": b, "layouts": {path:
     layout}}.

  Raises:
    TypeError/ValueError naming the parameter path and value, before anything
    is written: a tree that is not a nested dict of arrays, a state made for
    other params, a quantized leaf not fully frozen, or a weight outside its
    codebook.

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
    extra_skeletons[name], sub = _flatten(extras[name], f"extras[{name!r}]")
    extra_flat += [(f"{name}/{p}", x) for p, x in sub]
  paths = {p for p, _ in flat}
  missing = sorted(set(state.exponents) - paths)
  if missing:
    raise ValueError(f"state quantizes {missing[:6]}, which are not in params (paths "
                     f"look like {sorted(paths)[:6]})")
  masks = dict(leaves_with_paths(state.masks)[0])

  sections, entries, quantized_weights, quantized_bytes, layouts = [], [], 0, 0, {}
  total_weights = 0
  for group, items in (("params", flat), ("extras", extra_flat)):
    for leaf_path, leaf in items:
      w = _host(leaf, leaf_path)
      entry = {"path": leaf_path, "group": group, "shape": list(w.shape),
               "dtype": str(w.dtype)}
      if group == "params":
        total_weights += w.size
      if group == "params" and leaf_path in state.exponents:
        if not jnp.issubdtype(w.dtype, jnp.floating):
          raise TypeError(f"{leaf_path}: dtype {w.dtype} is not floating point")
        mask = masks.get(leaf_path)
        if mask is None or np.shape(mask) != w.shape or not np.asarray(mask).all():
          frozen = 0 if mask is None else int(np.sum(np.asarray(mask)))
          raise ValueError(
              f"{leaf_path}: only {frozen} of {w.size} weights are quantized and frozen "
              f"(INQ step {int(state.step)} of {state.config.num_steps}); finish every "
              "portion with inq.advance before exporting; nothing was written")
        n1 = np.asarray(state.exponents[leaf_path]).astype(np.int64)
        data, fields = _quantized_section(leaf_path, w, n1, bits, compress)
        entry.update(fields)
        quantized_weights += w.size
        quantized_bytes += len(data)
        layouts[leaf_path] = fields["layout"]
      else:
        data = _little_endian(w)
        entry.update({"kind": "raw", "layout": _packing.LAYOUT_RAW})
      sections.append(data)
      entries.append(entry)

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
  file_len = _packing.PREFIX.size + len(header_bytes) + offset
  prefix = _packing.prefix(len(header_bytes), file_len, _packing.crc32(header_bytes))

  path = os.fspath(path)
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


class QuantizedCodes(NamedTuple):
  """The stored codes of one quantized leaf, as `read_codes` returns them."""
  path: str
  codes: np.ndarray   # uint8 b-bit codes, the leaf's shape (see inq_jax._packing)
  bits: int
  n1: np.ndarray      # int64: a scalar, or one per output channel (last axis)
  dtype: np.dtype
  layout: str         # "packed", "packed+lzma" or "sparse+lzma"
  stored_bytes: int   # bytes of the section on disk


class _File:
  """An opened export file: prefix and header checked, sections read on demand."""

  def __init__(self, path):
    self.path = os.fspath(path)
    try:
      with open(self.path, "rb") as f:
        self.blob = f.read()
    except OSError as e:
      raise ValueError(f"{self.path}: cannot read the file ({e.strerror})") from None
    self.header = self._header()

  def error(self, what: str) -> ValueError:
    return ValueError(f"{self.path}: {what}")

  def _header(self) -> dict:
    blob, n = self.blob, _packing.PREFIX.size
    if len(blob) < len(_packing.MAGIC) and _packing.MAGIC.startswith(blob):
      raise self.error(f"truncated: {len(blob)} bytes, shorter than the magic")
    if blob[:len(_packing.MAGIC)] != _packing.MAGIC:
      raise self.error(f"not an inq_jax export (magic {blob[:8]!r}, expected "
                       f"{_packing.MAGIC!r})")
    if len(blob) < n:
      raise self.error(f"truncated: {len(blob)} bytes, shorter than the {n}-byte prefix")
    magic, version, header_len, file_len, header_crc, prefix_crc = \
        _packing.PREFIX.unpack(blob[:n])
    del magic
    if version != _packing.VERSION:
      raise self.error(f"format version {version}; this reader supports version "
                       f"{_packing.VERSION}")
    if _packing.crc32(blob[:n - 4]) != prefix_crc:
      raise self.error("corrupt: the prefix CRC32 does not match")
    if len(blob) < file_len:
      raise self.error(f"truncated: {len(blob)} bytes, the file says {file_len}")
    if len(blob) > file_len:
      raise self.error(f"{len(blob) - file_len} unexpected bytes after the end "
                       f"({file_len} bytes)")
    if n + header_len > file_len:
      raise self.error(f"corrupt: header length {header_len} runs past the end")
    raw = blob[n:n + header_len]
    if _packing.crc32(raw) != header_crc:
      raise self.error("corrupt: the header CRC32 does not match")
    try:
      header = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise self.error(f"corrupt: the header is not JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT or \
        header.get("version") != version:
      raise self.error("corrupt: the header does not describe an inq_jax export")
    self.data_start = n + header_len
    self.data_len = file_len - self.data_start
    return header

  def entries(self):
    leaves = self.header.get("leaves")
    if not isinstance(leaves, list):
      raise self.error("corrupt: the header has no leaf list")
    return leaves

  def section(self, entry) -> bytes:
    try:
      offset, length, crc = int(entry["offset"]), int(entry["length"]), int(entry["crc32"])
      where = entry["path"]
    except (KeyError, TypeError, ValueError):
      raise self.error(f"corrupt: malformed leaf entry {str(entry)[:200]}") from None
    if offset < 0 or length < 0 or offset + length > self.data_len:
      raise self.error(f"{where}: section [{offset}, {offset + length}) lies outside the "
                       f"{self.data_len} data bytes")
    data = self.blob[self.data_start + offset:self.data_start + offset + length]
    if _packing.crc32(data) != crc:
      raise self.error(f"{where}: corrupt section, CRC32 mismatch")
    return data

  def codes(self, entry) -> QuantizedCodes:
    where = entry.get("path", "?")
    try:
      shape, bits, layout = tuple(int(s) for s in entry["shape"]), int(entry["bits"]), \
          entry["layout"]
      n1 = np.asarray(entry["n1"], np.int64)
      dtype = _dtype(entry["dtype"])
    except (KeyError, TypeError, ValueError) as e:
      raise self.error(f"{where}: malformed quantized leaf entry ({e})") from None
    if not 2 <= bits <= 8 or layout not in _packing.QUANTIZED_LAYOUTS or \
        n1.ndim > 1 or (n1.ndim == 1 and (not shape or n1.shape[0] != shape[-1])):
      raise self.error(f"{where}: malformed quantized leaf entry (bits {bits}, layout "
                       f"{layout!r}, n1 of shape {n1.shape} for weights {shape})")
    data = self.section(entry)
    count = int(np.prod(shape, dtype=np.int64))
    try:
      codes = _packing.decode_section(data, layout, count, bits).reshape(shape)
    except ValueError as e:
      raise self.error(f"{where}: corrupt {layout} section: {e}") from None
    return QuantizedCodes(where, codes, bits, n1, dtype, layout, int(entry["length"]))

  def value(self, entry) -> np.ndarray:
    where = entry.get("path", "?")
    kind = entry.get("kind")
    if kind == "quantized":
      q = self.codes(entry)
      ok = _packing.valid_codes(q.codes, q.n1, q.bits)
      if not ok.all():
        idx = tuple(int(i) for i in np.argwhere(~ok)[0])
        raise self.error(f"{where}: code {int(q.codes[idx])} at index {idx} is not in the "
                         f"{q.bits}-bit codebook (n1 {_show(q.n1)})")
      exact = _packing.decode(q.codes, q.n1, q.bits)
      with np.errstate(over="ignore"):
        out = exact.astype(q.dtype)
      if not np.array_equal(out.astype(np.float64), exact):
        raise self.error(f"{where}: codebook 2^..2^{_show(q.n1)} does not fit {q.dtype}")
      return out
    if kind != "raw":
      raise self.error(f"{where}: unknown leaf kind {kind!r}")
    try:
      shape, dtype = tuple(int(s) for s in entry["shape"]), _dtype(entry["dtype"])
    except (KeyError, TypeError, ValueError) as e:
      raise self.error(f"{where}: malformed leaf entry ({e})") from None
    data = self.section(entry)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
      raise self.error(f"{where}: {len(data)} bytes, expected {count * dtype.itemsize} "
                       f"for {shape} {dtype}")
    a = np.frombuffer(data, dtype if dtype.itemsize == 1 or sys.byteorder == "little"
                      else f"u{dtype.itemsize}")
    if a.dtype != dtype:
      a = a.byteswap().view(dtype)
    return a.reshape(shape).copy()

  def trees(self):
    values = [self.value(e) for e in self.entries()]
    try:
      params = _unflatten(self.header["params"], values, self.path)
      extras = {name: _unflatten(s, values, self.path)
                for name, s in self.header["extras"].items()}
    except (KeyError, AttributeError, TypeError):
      raise self.error("corrupt: malformed tree in the header") from None
    return params, extras


def read_header(path) -> dict:
  """The checked JSON header of an export file (see the module docstring).

  Raises:
    ValueError naming the file: wrong magic or version, truncated, corrupt
    prefix or header (CRC32 mismatch).
  """
  return _File(path).header


def read_codes(path, *, check_all: bool = True) -> Dict[str, QuantizedCodes]:
  """{path: QuantizedCodes} of every quantized leaf, without decoding to floats.

  Codes are returned as stored, valid or not (`inq_jax._packing.valid_codes`
  tells); a verifier checks them against the codebook itself.

  Args:
    path: the export file.
    check_all: also read every raw section and check its CRC32.

  Raises:
    ValueError naming the file and the leaf: bad magic/version, truncation, a
    CRC32 mismatch, a malformed entry or an undecodable LZMA section.
  """
  f = _File(path)
  out = {}
  for entry in f.entries():
    if not isinstance(entry, dict):
      raise f.error("corrupt: malformed leaf entry")
    if entry.get("kind") == "quantized":
      out[entry.get("path")] = f.codes(entry)
    elif check_all:
      f.section(entry)
  return out


def load_with_extras(path) -> Tuple[dict, Dict[str, dict]]:
  """(params, extras) from an export file: numpy arrays of their saved dtypes.

  The params are bit-identical to those `save` was given (the quantized ones
  decoded from their codes, the others as stored); extras likewise.

  Raises:
    ValueError naming the file and what is wrong: not an export (magic),
    unsupported version, truncated, CRC32 mismatch, or a code outside its
    codebook. Never returns partially or wrongly decoded weights.

  Example:
    >>> params, extras = load_with_extras("lenet.inq")
    >>> logits = model.apply({"params": params, **extras}, images)
  """
  return _File(path).trees()


def load(path) -> dict:
  """The params of an export file (see `load_with_extras`)."""
  return load_with_extras(path)[0]


__all__ = ["QuantizedCodes", "load", "load_with_extras", "read_codes", "read_header",
           "save"]
