"""The `.inq` header: parsed as bounded JSON and every field checked before any section.

`parse_header` turns the header bytes into a dict without exhausting recursion
(nesting is measured first), refusing duplicate keys and NaN/Infinity;
`check_header` checks every field's type and range against the data that
follows and returns one `Leaf` per entry. Both raise through the reader's
`error`, which names the file.
"""

from __future__ import annotations

import json
from typing import Callable, List, NamedTuple, Optional, Tuple

import numpy as np

from inq_jax import _packing
from inq_jax._export_format import (ENTRY_KEYS, FORMAT, HEADER_KEYS, MAX_COUNT, MAX_JSON_DEPTH,
                                    MAX_NDIM, MAX_TREE_DEPTH, QUANTIZED_DTYPES, QUANTIZED_KEYS,
                                    RAW_DTYPES, brief, dtype_of, n1_problem, type_phrase)


class Leaf(NamedTuple):
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


def json_depth(raw: bytes) -> int:
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


def parse_header(raw: bytes, error: Callable[[str], ValueError]):
  """The header's JSON value; `error(...)` for text too deep, not UTF-8 or not JSON."""
  depth = json_depth(raw)
  if depth > MAX_JSON_DEPTH:
    raise error(f"corrupt: the header nests {depth} levels deep, more than "
                f"{MAX_JSON_DEPTH}")
  try:
    return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                      parse_constant=_no_constant)
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise error(f"corrupt: the header is not valid JSON ({e})") from None


def check_header(header, version: int, data_len: int,
                 error: Callable[[str], ValueError]) -> List[Leaf]:
  """The checked leaves of a parsed header whose sections fill `data_len` bytes.

  Raises `error(...)` for any field of the wrong type or range, sections that
  do not tile the data exactly, or trees that do not name every leaf exactly
  once at its own path.
  """
  return _Checker(data_len, error).header(header, version)


class _Checker:

  def __init__(self, data_len: int, error: Callable[[str], ValueError]):
    self.data_len = data_len
    self.error = error

  def int_in(self, value, what: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
      raise self.error(f"{what} is {brief(value)}, not an integer in [{lo}, {hi}]")
    return value

  def header(self, header, version) -> List[Leaf]:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
      raise self.error("corrupt: the header does not describe an inq_jax export")
    keys = set(header)
    if keys != HEADER_KEYS:
      raise self.error(f"corrupt: header fields {sorted(keys ^ HEADER_KEYS)} missing or "
                       "unknown")
    if header["version"] != version or isinstance(header["version"], bool):
      raise self.error(f"corrupt: header version {brief(header['version'])} disagrees "
                       f"with the prefix's {version}")
    bits = self.int_in(header["bits"], "header bits", 2, 8)
    for name in ("inq", "params", "extras"):
      if not isinstance(header[name], dict):
        raise self.error(f"corrupt: header {name!r} is {type_phrase(header[name])}, "
                         "not an object")
    entries = header["leaves"]
    if not isinstance(entries, list):
      raise self.error(f"corrupt: header 'leaves' is {type_phrase(entries)}, not a list")
    widths = self.widths(header["inq"], bits)
    leaves, end = [], 0
    for i, entry in enumerate(entries):
      leaf = self.entry(i, entry, widths, end)
      end = leaf.offset + leaf.length
      leaves.append(leaf)
    if end != self.data_len:
      raise self.error(f"corrupt: the sections end at data byte {end}, the data has "
                       f"{self.data_len}")
    # Every leaf exactly once, at its own path, in the tree of its group.
    owner = {}
    self.tree(header["params"], "params", "", "params", leaves, owner, 1)
    for name, skeleton in header["extras"].items():
      if not isinstance(name, str) or not name or "/" in name:
        raise self.error(f"corrupt: extras name {brief(name)} is empty or contains '/'")
      if not isinstance(skeleton, dict):
        raise self.error(f"corrupt: extras[{name!r}] is {type_phrase(skeleton)}, "
                         "not an object")
      self.tree(skeleton, f"extras[{name!r}]", name, "extras", leaves, owner, 2)
    unnamed = [leaf.path for leaf in leaves if leaf.index not in owner]
    if unnamed:
      raise self.error(f"corrupt: leaves {unnamed[:4]} appear in no tree")
    return leaves

  def widths(self, inq, bits):
    """The code widths a quantized entry may have: `bits`, and `layer_bits`' widths.

    A file of one width keeps `layer_bits` empty (or, written before it
    existed, absent), so each entry's width must be the header's; the
    regexes themselves are not evaluated (a file's regex is not run).
    """
    pairs = inq.get("layer_bits", [])
    if not isinstance(pairs, list):
      raise self.error(f"corrupt: header inq layer_bits is {type_phrase(pairs)}, not a list")
    widths = {bits}
    for pair in pairs:
      if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], str)):
        raise self.error(f"corrupt: header inq layer_bits entry {brief(pair)} is not a "
                         "[regex, bits] pair")
      widths.add(self.int_in(pair[1], f"header inq layer_bits[{pair[0]!r}]", 2, 8))
    return frozenset(widths)

  def entry(self, i, entry, widths, start) -> Leaf:
    if not isinstance(entry, dict):
      raise self.error(f"corrupt: leaf entry {i} is {type_phrase(entry)}, not an object")
    path = entry.get("path")
    if not isinstance(path, str) or not path or len(path) > 4096:
      raise self.error(f"corrupt: leaf entry {i} has path {brief(path)}")
    where = f"{path} (leaf {i})"
    kind = entry.get("kind")
    if kind not in ("quantized", "raw"):
      raise self.error(f"{where}: unknown leaf kind {brief(kind)}")
    expected = QUANTIZED_KEYS if kind == "quantized" else ENTRY_KEYS
    if set(entry) != expected:
      missing, unknown = sorted(expected - set(entry)), sorted(set(entry) - expected)
      raise self.error(f"{where}: malformed {kind} leaf entry (missing {missing}, "
                       f"unknown {unknown})")
    group = entry["group"]
    if group not in ("params", "extras"):
      raise self.error(f"{where}: group {brief(group)} is neither 'params' nor 'extras'")
    allowed = QUANTIZED_DTYPES if kind == "quantized" else RAW_DTYPES
    name = entry["dtype"]
    if name not in allowed or not isinstance(name, str):
      raise self.error(f"{where}: dtype {brief(name)} is not one of {allowed}")
    dtype = dtype_of(name)
    shape = entry["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
      raise self.error(f"{where}: shape {brief(shape)} is not a list of at most "
                       f"{MAX_NDIM} sizes")
    shape = tuple(self.int_in(s, f"{where}: a dimension", 0, MAX_COUNT) for s in shape)
    count = 1
    for s in shape:
      count *= s
    if count > MAX_COUNT:
      raise self.error(f"{where}: shape {shape} holds {count} weights, more than "
                       f"{MAX_COUNT}")
    layout = entry["layout"]
    offset = self.int_in(entry["offset"], f"{where}: offset", 0, self.data_len)
    length = self.int_in(entry["length"], f"{where}: length", 0, self.data_len)
    crc = self.int_in(entry["crc32"], f"{where}: crc32", 0, 0xFFFFFFFF)
    if offset != start:
      raise self.error(f"{where}: section at data byte {offset}; sections lie back to "
                       f"back, so it must start at {start}")
    if offset + length > self.data_len:
      raise self.error(f"{where}: section [{offset}, {offset + length}) lies outside the "
                       f"{self.data_len} data bytes")
    leaf_bits, n1 = None, None
    if kind == "raw":
      if layout != _packing.LAYOUT_RAW:
        raise self.error(f"{where}: raw leaf with layout {brief(layout)}")
      if length != count * dtype.itemsize:
        raise self.error(f"{where}: {length} bytes, expected {count * dtype.itemsize} "
                         f"for {shape} {name}")
    else:
      leaf_bits, n1 = self.quantized(where, entry, group, layout, shape, name, widths)
      least = _packing.min_section_bytes(layout, count, leaf_bits)
      if length < least or (layout == _packing.LAYOUT_PACKED and length != least):
        raise self.error(f"{where}: a {layout} section of {length} bytes cannot hold "
                         f"{count} {leaf_bits}-bit codes (shape {shape})")
    return Leaf(i, path, group, kind, shape, dtype, layout, offset, length, crc, leaf_bits,
                n1)

  def quantized(self, where, entry, group, layout, shape, dtype_name, widths):
    """(bits, n1 int64 array) of a quantized entry, every field checked."""
    if group != "params":
      raise self.error(f"{where}: a quantized leaf in group {group!r}; only params are "
                       "quantized")
    if layout not in _packing.QUANTIZED_LAYOUTS:
      raise self.error(f"{where}: unknown layout {brief(layout)}; expected one of "
                       f"{_packing.QUANTIZED_LAYOUTS}")
    leaf_bits = self.int_in(entry["bits"], f"{where}: bits", 2, 8)
    if leaf_bits not in widths:
      if len(widths) == 1:
        raise self.error(f"{where}: {leaf_bits}-bit codes in a {min(widths)}-bit file")
      raise self.error(f"{where}: {leaf_bits}-bit codes in a file whose widths are "
                       f"{sorted(widths)} (its bits and layer_bits)")
    raw_n1 = entry["n1"]
    if isinstance(raw_n1, list):
      if not shape or len(raw_n1) != shape[-1]:
        raise self.error(f"{where}: {len(raw_n1)} per-channel n1 for weights of shape "
                         f"{shape} (one per entry of the last axis)")
      values = raw_n1
    else:
      values = [raw_n1]
    values = [self.int_in(v, f"{where}: n1", -(1 << 62), 1 << 62) for v in values]
    problem = n1_problem(values, leaf_bits, dtype_name)
    if problem:
      raise self.error(f"{where}: {problem}")
    return leaf_bits, np.asarray(values if isinstance(raw_n1, list) else values[0], np.int64)

  def tree(self, skeleton, what, prefix, group, leaves, owner, depth):
    if depth > MAX_TREE_DEPTH:
      raise self.error(f"corrupt: {what} nests deeper than {MAX_TREE_DEPTH} levels")
    for key, value in skeleton.items():
      if not key or "/" in key:
        raise self.error(f"corrupt: {what} key {key!r} under {prefix or 'the top'} is "
                         "empty or contains '/'")
      path = f"{prefix}/{key}" if prefix else key
      if isinstance(value, dict):
        self.tree(value, what, path, group, leaves, owner, depth + 1)
        continue
      index = self.int_in(value, f"corrupt: {what} index at {path}", 0, len(leaves) - 1)
      if index in owner:
        raise self.error(f"corrupt: leaf {index} appears at both {owner[index]} and {path}")
      owner[index] = path
      leaf = leaves[index]
      if leaf.path != path or leaf.group != group:
        raise self.error(f"corrupt: {what} names leaf {index} at {path}, but that leaf is "
                         f"{leaf.path} in {leaf.group}")
