"""Reading `.inq` files: framing, sections, decoding, and the public read functions.

Nothing in the file is trusted: the prefix, then the header (`_export_header`),
are checked before any section is touched, and each section's CRC32 before it
is decoded. See `inq_jax.export` for the format and what its checks guarantee.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from typing import Dict, Tuple

import numpy as np

from inq_jax import _packing
from inq_jax._export_format import (MAX_HEADER_BYTES, DecodedLeaf, ExportFile,
                                    QuantizedCodes)
from inq_jax._export_header import Leaf, check_header, parse_header

# Bytes hashed at a time by `file_sha256`.
_HASH_CHUNK = 1 << 20


def _open_regular(path: str):
  """A binary file object of `path`, or ValueError naming it.

  Only regular files: a FIFO or a device (/dev/zero) could block or never end,
  so they are refused before reading, and opened non-blocking so one swapped
  in after the check cannot block either.
  """
  try:
    regular = stat.S_ISREG(os.stat(path).st_mode)
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
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise ValueError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")
  except OSError as e:
    os.close(fd)
    raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
  except BaseException:
    os.close(fd)
    raise


def _read(path: str, offset: int, length: int) -> Tuple[bytes, int]:
  """(up to `length` bytes of the file from `offset`, the file's size).

  The one place the reader touches storage.
  """
  with _open_regular(path) as f:
    try:
      size = os.fstat(f.fileno()).st_size
      f.seek(offset)
      return f.read(max(0, min(length, size - offset))), size
    except OSError as e:
      raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None


def file_sha256(path) -> str:
  """The SHA-256 hex digest of a file's bytes, as `sha256sum` prints it.

  Raises:
    ValueError naming the file if it is missing, unreadable or not a regular file.
  """
  path = path if isinstance(path, str) else os.fsdecode(os.fspath(path))
  digest = hashlib.sha256()
  with _open_regular(path) as f:
    try:
      for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
        digest.update(chunk)
    except OSError as e:
      raise ValueError(f"{path}: cannot read the file ({e.strerror})") from None
  return digest.hexdigest()


class _File:
  """An export file with its prefix and every header field checked."""

  def __init__(self, path):
    self.path = path if isinstance(path, str) else os.fsdecode(os.fspath(path))
    self.size, self.header, self.leaves = self._open()

  def error(self, what: str) -> ValueError:
    return ValueError(f"{self.path}: {what}")

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
    header = parse_header(raw, self.error)
    return size, header, check_header(header, version, len(self.data), self.error)

  def section(self, leaf: Leaf) -> bytes:
    data = bytes(self.data[leaf.offset:leaf.offset + leaf.length])
    if _packing.crc32(data) != leaf.crc32:
      raise self.error(f"{leaf.path}: corrupt section, CRC32 mismatch")
    return data

  def codes(self, leaf: Leaf) -> QuantizedCodes:
    data = self.section(leaf)
    count = int(np.prod(leaf.shape, dtype=np.int64))
    try:
      codes = _packing.decode_section(data, leaf.layout, count, leaf.bits)
    except ValueError as e:
      raise self.error(f"{leaf.path}: corrupt {leaf.layout} section: {e}") from None
    return QuantizedCodes(leaf.path, codes.reshape(leaf.shape), leaf.bits, leaf.n1,
                          leaf.dtype, leaf.layout, leaf.length)

  def decode(self, leaf: Leaf) -> DecodedLeaf:
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
  """The checked JSON header of an export file (see `inq_jax.export`).

  Every field is checked as for `load` (types, ranges, section sizes possible
  for their layout and shape, the sections tiling the data); the sections
  themselves are not read.

  Raises:
    ValueError naming the file: wrong magic or version, truncated, corrupt
    prefix or header (CRC32 mismatch, a field of the wrong type or range).
  """
  return _File(path).header


def read_codes(path, *, check_all: bool = True) -> Dict[str, QuantizedCodes]:
  """{path: QuantizedCodes} of every quantized leaf, without decoding to floats.

  Codes are returned as stored, valid or not (`inq_jax._packing.valid_codes`
  tells), each with its leaf's own bit width; the header has been checked as
  for `load`.

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
    outside its codebook. A malformed or damaged file never loads; a file
    edited on purpose with its CRCs recomputed and every field kept valid
    loads as the edited model (check `export.file_sha256` against a published
    digest to rule that out).

  Example:
    >>> params, extras = load_with_extras("lenet.inq")
    >>> logits = model.apply({"params": params, **extras}, images)
  """
  return inspect(path).trees()


def load(path) -> dict:
  """The params of an export file (see `load_with_extras`)."""
  return load_with_extras(path)[0]
