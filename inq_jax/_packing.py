"""Low-level pieces of the `.inq` export format: codes, bit packing, file framing.

A quantized weight of a b-bit INQ codebook {0} U {+-2^k : n2 <= k <= n1} is one
b-bit code:

    bit b-1      : sign (1 = negative)
    bits 0..b-2  : m = 0 for zero, else m = 1 + (n1 - k) in [1, 2^(b-2)]

so m - 1 is the exponent index n1 - k (0 = the largest magnitude 2^n1). Codes
with m > 2^(b-2) are invalid (they exist for b >= 3) and so is any m != 0 when
n1 is `ZERO_CODEBOOK` (a layer or channel whose codebook is {0}). Sign 1 with
m = 0 is -0.0: a valid codebook value, kept so that round trips are bit-exact
(INQ itself only ever writes +0.0).

Codes are packed into a little-endian bit stream: code j occupies stream bits
[j*b, (j+1)*b), its least significant bit first, and stream bit i is bit
(i % 8) of byte i // 8 (numpy `packbits(..., bitorder="little")`). A leaf of n
weights takes ceil(n*b / 8) bytes; the last byte is zero-padded.

Layouts of a quantized leaf's section (the writer keeps the smallest):
  "packed"       the bit stream above, exactly ceil(n*b / 8) bytes.
  "packed+lzma"  that bit stream compressed with LZMA2 (an .xz stream, no
                 integrity check of its own: the section has a CRC32).
  "sparse+lzma"  LZMA2 (.xz) of: the nonzero bitmap (code != 0; packbits,
                 little-endian bit order, ceil(n/8) bytes) followed by one byte
                 per nonzero code in C order. Best for pruned layers, where most
                 codes are 0, and usually for dense ones too: LZMA models whole
                 bytes far better than b-bit fields straddling byte boundaries.

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 2.1 (the b-bit codebook: one code for zero, b-1 bits
for a sign and 2^(b-2) exponents).
"""

from __future__ import annotations

import lzma
import struct
import zlib
from typing import Tuple

import numpy as np

from inq_jax._codebook import ZERO_CODEBOOK

# 8-byte magic: a non-ASCII first byte (so text tools see binary) and a newline
# at the end (so a CR/LF-mangled transfer breaks it), as in PNG.
MAGIC = b"\x89INQJAX\n"
VERSION = 1
# magic, format version, header length, file length, header CRC32, prefix CRC32
# (over the 32 bytes before it). Little-endian.
PREFIX = struct.Struct("<8sIQQII")

LAYOUT_PACKED = "packed"
LAYOUT_LZMA = "packed+lzma"
LAYOUT_SPARSE = "sparse+lzma"
LAYOUT_RAW = "raw"
QUANTIZED_LAYOUTS = (LAYOUT_PACKED, LAYOUT_LZMA, LAYOUT_SPARSE)

# Codes are packed this many at a time (a multiple of 8, so every chunk ends
# on a byte boundary) to bound the temporary memory of very large layers.
_CHUNK = 1 << 20


def num_magnitudes(bits: int) -> int:
  """Exponents 2^n2..2^n1 in a b-bit codebook: 2^(b-2)."""
  return 1 << (bits - 2)


def n2_of(n1, bits: int):
  """n2 = n1 + 1 - 2^(b-2), elementwise over an int array or scalar."""
  return np.asarray(n1, np.int64) + 1 - num_magnitudes(bits)


def packed_size(count: int, bits: int) -> int:
  """Bytes of `count` packed b-bit codes: ceil(count * bits / 8)."""
  return (count * bits + 7) // 8


def _channel_n1(n1, shape) -> np.ndarray:
  """n1 as an int64 array broadcastable against `shape` (per layer or last axis)."""
  n1 = np.asarray(n1, np.int64)
  if n1.ndim == 0:
    return n1
  if n1.ndim != 1 or not shape or n1.shape[0] != shape[-1]:
    raise ValueError(f"per-channel n1 of shape {n1.shape} does not fit weights of shape "
                     f"{tuple(shape)} (one n1 per entry of the last axis)")
  return n1


def encode(w: np.ndarray, n1, bits: int) -> Tuple[np.ndarray, np.ndarray]:
  """(codes uint8 of w's shape, valid bool of w's shape) for weights `w`.

  A weight is valid when it is exactly 0 (either sign) or +-2^k with
  n2 <= k <= n1; the code of an invalid weight is meaningless.
  """
  x = np.asarray(w).astype(np.float64)  # exact for float16/bfloat16/float32/float64
  n1 = _channel_n1(n1, x.shape)
  n2 = n2_of(n1, bits)
  a = np.abs(x)
  mantissa, exponent = np.frexp(a)
  k = exponent.astype(np.int64) - 1
  zero = a == 0
  valid = zero | ((mantissa == 0.5) & (k >= n2) & (k <= n1) & (n1 != ZERO_CODEBOOK))
  m = np.where(zero | ~valid, 0, n1 - k + 1)
  codes = (np.signbit(x).astype(np.int64) << (bits - 1)) | m
  return codes.astype(np.uint8), valid


def split_codes(codes: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
  """(negative bool, m int64) of b-bit codes."""
  codes = np.asarray(codes, np.int64)
  return (codes >> (bits - 1)).astype(bool), codes & ((1 << (bits - 1)) - 1)


def valid_codes(codes: np.ndarray, n1, bits: int) -> np.ndarray:
  """Elementwise: does the b-bit code name a value of its codebook?"""
  codes = np.asarray(codes)
  n1 = _channel_n1(n1, codes.shape)
  _, m = split_codes(codes, bits)
  return (m == 0) | ((m <= num_magnitudes(bits)) & (n1 != ZERO_CODEBOOK))


def decode(codes: np.ndarray, n1, bits: int) -> np.ndarray:
  """float64 values of valid b-bit codes (codes of invalid ones are undefined)."""
  codes = np.asarray(codes)
  n1 = _channel_n1(n1, codes.shape)
  negative, m = split_codes(codes, bits)
  k = np.where(m == 0, 0, n1 - m + 1)
  # Exponents far outside float64 (only for invalid codes) are clamped, not UB.
  magnitude = np.where(m == 0, 0.0, np.ldexp(1.0, np.clip(k, -1100, 1100).astype(np.int32)))
  return np.where(negative, -magnitude, magnitude)


def pack(codes: np.ndarray, bits: int) -> bytes:
  """b-bit codes (any shape, C order) -> the little-endian bit stream, as bytes."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  shifts = np.arange(bits, dtype=np.uint8)
  out = []
  for start in range(0, flat.size, _CHUNK):
    chunk = flat[start:start + _CHUNK]
    bitplanes = (chunk[:, None] >> shifts) & 1
    out.append(np.packbits(bitplanes.reshape(-1), bitorder="little").tobytes())
  return b"".join(out)


def unpack(data: bytes, count: int, bits: int) -> np.ndarray:
  """The inverse of `pack`: `count` uint8 codes from the bit stream `data`."""
  if len(data) != packed_size(count, bits):
    raise ValueError(f"{len(data)} bytes of packed codes, expected "
                     f"{packed_size(count, bits)} for {count} {bits}-bit codes")
  raw = np.frombuffer(data, np.uint8)
  weights = (np.uint8(1) << np.arange(bits, dtype=np.uint8))
  out = np.empty(count, np.uint8)
  step = _CHUNK * bits // 8  # bytes per chunk of _CHUNK codes
  for i, start in enumerate(range(0, count, _CHUNK)):
    n = min(_CHUNK, count - start)
    stream = np.unpackbits(raw[i * step:i * step + packed_size(n, bits)],
                           count=n * bits, bitorder="little")
    out[start:start + n] = (stream.reshape(n, bits) * weights).sum(axis=1, dtype=np.uint8)
  return out


def compress(data: bytes) -> bytes:
  """LZMA2 in an .xz container (Python's `lzma`, preset 6), without a check."""
  return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=6)


def decompress(data: bytes) -> bytes:
  return lzma.decompress(data, format=lzma.FORMAT_XZ)


def encode_sections(codes: np.ndarray, bits: int, layouts=QUANTIZED_LAYOUTS):
  """{layout: section bytes} of b-bit codes, for each of `layouts`."""
  out = {}
  packed = pack(codes, bits)
  if LAYOUT_PACKED in layouts:
    out[LAYOUT_PACKED] = packed
  if LAYOUT_LZMA in layouts:
    out[LAYOUT_LZMA] = compress(packed)
  if LAYOUT_SPARSE in layouts:
    flat = np.asarray(codes, np.uint8).reshape(-1)
    nonzero = flat != 0
    out[LAYOUT_SPARSE] = compress(np.packbits(nonzero, bitorder="little").tobytes()
                                  + flat[nonzero].tobytes())
  return out


def decode_section(data: bytes, layout: str, count: int, bits: int) -> np.ndarray:
  """`count` uint8 codes (flat) from a section; ValueError if it is malformed.

  Raises ValueError for an unknown layout, bad lengths, an undecodable LZMA
  stream, or (sparse) a bitmap that disagrees with the codes that follow it.
  Code *values* are not checked against a codebook here (see `valid_codes`).
  """
  if layout == LAYOUT_PACKED:
    return unpack(data, count, bits)
  if layout not in (LAYOUT_LZMA, LAYOUT_SPARSE):
    raise ValueError(f"unknown layout {layout!r}; expected one of {QUANTIZED_LAYOUTS}")
  try:
    data = decompress(data)
  except (lzma.LZMAError, EOFError) as e:
    raise ValueError(f"corrupt LZMA stream ({e})") from None
  if layout == LAYOUT_LZMA:
    return unpack(data, count, bits)
  head = (count + 7) // 8
  if len(data) < head:
    raise ValueError(f"sparse section of {len(data)} bytes is shorter than its "
                     f"{head}-byte bitmap")
  bitmap = np.frombuffer(data[:head], np.uint8)
  nonzero = np.unpackbits(bitmap, bitorder="little").astype(bool)
  if nonzero[count:].any():
    raise ValueError("sparse bitmap has bits set past the last weight")
  nonzero = nonzero[:count]
  values = np.frombuffer(data[head:], np.uint8)
  if values.size != int(nonzero.sum()):
    raise ValueError(f"sparse bitmap marks {int(nonzero.sum())} nonzero codes but "
                     f"{values.size} follow it")
  if values.size and (values.min() == 0 or values.max() >= 1 << bits):
    raise ValueError(f"sparse section holds a code outside 1..{(1 << bits) - 1}")
  out = np.zeros(count, np.uint8)
  out[nonzero] = values
  return out


def crc32(data: bytes) -> int:
  return zlib.crc32(data) & 0xFFFFFFFF


def prefix(header_len: int, file_len: int, header_crc: int, version: int = VERSION) -> bytes:
  head = PREFIX.pack(MAGIC, version, header_len, file_len, header_crc, 0)[:-4]
  return head + struct.pack("<I", crc32(head))
