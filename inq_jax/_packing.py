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

Layouts of a quantized leaf's section (the writer keeps the smallest it tries):
  "packed"         the bit stream above, exactly ceil(n*b / 8) bytes.
  "packed+lzma"    that bit stream compressed with LZMA2 (an .xz stream, no
                   integrity check of its own: the section has a CRC32).
  "sparse+lzma"    LZMA2 (.xz) of the sparse stream: the nonzero bitmap (code
                   != 0; packbits, little-endian bit order, ceil(n/8) bytes)
                   followed by one byte per nonzero code in C order.
  "codes+deflate"  raw DEFLATE (RFC 1951, no zlib header) of one byte per code.
  "sparse+deflate" raw DEFLATE of the sparse stream.

The DEFLATE layouts are written with Huffman coding only (no string matching):
the codes of a trained layer are close to independent draws, so what pays is
an entropy coder over whole-byte symbols, which Huffman-only DEFLATE is and
cheaply; LZMA's match finder costs far more time there and gains nothing
(experiments/benchmarks/export_speed.py measures both).
The LZMA layouts remain for leaves with repeated runs (whole pruned channels,
tiny layers), where string matching does pay; `encode_best` tries them only
when a cheap sample says so.

Every compressed section is decompressed with an output cap equal to the size
its header entry implies, so a hostile section cannot expand past the model's
declared size (see `decode_section`).

Reference: Zhou et al., "Incremental Network Quantization", ICLR 2017,
arXiv:1702.03044, Sec. 2.1 (the b-bit codebook: one code for zero, b-1 bits
for a sign and 2^(b-2) exponents).
"""

from __future__ import annotations

import heapq
import lzma
import struct
import zlib
from typing import Tuple

import numpy as np

from inq_jax._codebook import ZERO_CODEBOOK, codebook_exponents, n2_from_n1

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
LAYOUT_DEFLATE = "codes+deflate"
LAYOUT_SPARSE_DEFLATE = "sparse+deflate"
LAYOUT_RAW = "raw"
# In order of preference on a size tie (the simplest first).
QUANTIZED_LAYOUTS = (LAYOUT_PACKED, LAYOUT_DEFLATE, LAYOUT_SPARSE_DEFLATE, LAYOUT_LZMA,
                     LAYOUT_SPARSE)
_LZMA_LAYOUTS = (LAYOUT_LZMA, LAYOUT_SPARSE)

# Upper bounds on (decompressed bytes) / (compressed bytes). DEFLATE cannot
# exceed 1032:1 (a 258-byte match in at least 2 bits); LZMA2 reaches about
# 7000:1 on all-zero input, 16384 leaves room for cleverer encoders. A section
# claiming more cannot be genuine, and is refused before anything is inflated.
MAX_DEFLATE_RATIO = 1040
MAX_LZMA_RATIO = 1 << 14
# Room for the LZMA decoder's own state (its dictionary, at most what the
# stream asks for, and tables), on top of the output it may produce.
_LZMA_MEMLIMIT_SLACK = 128 << 20

# Codes are packed this many at a time (a multiple of 8, so every chunk ends
# on a byte boundary) to bound the temporary memory of very large layers.
_CHUNK = 1 << 20
# LZMA lands some 5-7% above the order-0 entropy of independent codes, and is
# far slower than Huffman-only DEFLATE: it is worth trying only when Huffman
# coding wastes more than this factor over the entropy.
_HUFFMAN_SLACK = 1.10
# Bytes of a stream sampled to decide whether the LZMA layouts are worth trying.
_SAMPLE_WINDOW = 1 << 13
_SAMPLE_WINDOWS = 4


def num_magnitudes(bits: int) -> int:
  """Exponents 2^n2..2^n1 in a b-bit codebook: 2^(b-2)."""
  return 1 << (bits - 2)


def packed_size(count: int, bits: int) -> int:
  """Bytes of `count` packed b-bit codes: ceil(count * bits / 8)."""
  return (count * bits + 7) // 8


def sparse_size_range(count: int) -> Tuple[int, int]:
  """(least, most) bytes of the sparse stream of `count` codes."""
  head = (count + 7) // 8
  return head, head + count


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

  A weight is valid when `inq_jax._codebook.codebook_exponents` says it is a
  member: exactly 0 (either sign) or +-2^k with n2 <= k <= n1. The code of an
  invalid weight is meaningless.
  """
  x = np.asarray(w)
  # float32 and float64 as they are; narrower floats widen to float32 exactly.
  if x.dtype not in (np.float32, np.float64):
    x = x.astype(np.float32)
  n1 = _channel_n1(n1, x.shape)
  shape = x.shape
  # numpy turns 0-d results into scalars, which the in-place steps below cannot
  # write to: a scalar leaf is encoded as one weight and reshaped back.
  x = x.reshape(shape or (1,))
  k, valid = codebook_exponents(x, n1, n2_from_n1(n1, bits))
  # m = n1 + 1 - k in uint8 arithmetic: wraps mod 256 where the weight is not a
  # nonzero member, and those entries are zeroed next; members have m <= 64.
  m = k.astype(np.uint8)
  np.subtract((n1 + 1).astype(np.uint8), m, out=m)
  m *= valid & (x != 0)
  codes = (np.signbit(x).view(np.uint8) << np.uint8(bits - 1)) | m
  return codes.reshape(shape), valid.reshape(shape)


def split_codes(codes: np.ndarray, bits: int) -> Tuple[np.ndarray, np.ndarray]:
  """(negative bool, m int64) of b-bit codes."""
  codes = np.asarray(codes, np.int64)
  return (codes >> (bits - 1)).astype(bool), codes & ((1 << (bits - 1)) - 1)


def valid_codes(codes: np.ndarray, n1, bits: int) -> np.ndarray:
  """Elementwise: does the b-bit code name a value of its codebook?"""
  codes = np.asarray(codes)
  n1 = _channel_n1(n1, codes.shape)
  m = codes & np.uint8((1 << (bits - 1)) - 1)
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


def decode_values(codes: np.ndarray, n1, bits: int, dtype) -> np.ndarray:
  """Values of valid b-bit codes in `dtype`, by table lookup.

  The caller guarantees every code is valid and every real n1 keeps its
  codebook 2^n2..2^n1 among `dtype`'s normal numbers, so each table entry (made
  in float64, then cast) is exact.
  """
  codes = np.asarray(codes)
  n1 = _channel_n1(n1, codes.shape)
  table = np.arange(1 << bits)
  negative, m = split_codes(table, bits)
  real = (n1 != ZERO_CODEBOOK)[..., None]
  k = np.where(real, n1[..., None], 0) - m + 1
  ok = (m > 0) & (m <= num_magnitudes(bits)) & real
  magnitude = np.where(ok, np.ldexp(1.0, np.where(ok, k, 0).astype(np.int32)), 0.0)
  lut = np.where(negative, -magnitude, magnitude).astype(dtype)
  if codes.size == 0:
    return np.zeros(codes.shape, dtype)
  if n1.ndim == 0:
    return np.asarray(lut[codes]).reshape(codes.shape)  # a 0-d array, not a scalar
  flat = codes.reshape(-1, n1.shape[0])
  return lut[np.arange(n1.shape[0]), flat].reshape(codes.shape)


def pack(codes: np.ndarray, bits: int) -> bytes:
  """b-bit codes (any shape, C order) -> the little-endian bit stream, as bytes."""
  flat = np.asarray(codes, np.uint8).reshape(-1)
  out = np.empty(packed_size(flat.size, bits), np.uint8)
  for start in range(0, flat.size, _CHUNK):
    chunk = flat[start:start + _CHUNK]
    groups = -(-chunk.size // 8)
    padded = np.zeros(groups * 8, np.uint64)
    padded[:chunk.size] = chunk
    padded = padded.reshape(groups, 8)
    # 8 codes of b bits are exactly b bytes: gather them in one little-endian u64.
    word = padded[:, 0].copy()
    for j in range(1, 8):
      word |= padded[:, j] << np.uint64(j * bits)
    stream = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits].reshape(-1)
    at = start * bits // 8
    n = packed_size(chunk.size, bits)
    out[at:at + n] = stream[:n]
  return out.tobytes()


def unpack(data: bytes, count: int, bits: int) -> np.ndarray:
  """The inverse of `pack`: `count` uint8 codes from the bit stream `data`.

  Raises ValueError for a wrong length or nonzero padding bits after the last
  code (a writer never sets them, so they can only be damage).
  """
  if len(data) != packed_size(count, bits):
    raise ValueError(f"{len(data)} bytes of packed codes, expected "
                     f"{packed_size(count, bits)} for {count} {bits}-bit codes")
  raw = np.frombuffer(data, np.uint8)
  out = np.empty(count, np.uint8)
  mask = np.uint64((1 << bits) - 1)
  for start in range(0, count, _CHUNK):
    n = min(_CHUNK, count - start)
    groups = -(-n // 8)
    at = start * bits // 8
    words = np.zeros((groups, 8), np.uint8)
    chunk = np.zeros(groups * bits, np.uint8)
    chunk[:packed_size(n, bits)] = raw[at:at + packed_size(n, bits)]
    words[:, :bits] = chunk.reshape(groups, bits)
    word = words.reshape(-1).view("<u8")
    codes = np.empty((groups, 8), np.uint8)
    for j in range(8):
      codes[:, j] = (word >> np.uint64(j * bits)) & mask
    out[start:start + n] = codes.reshape(-1)[:n]
    if codes.reshape(-1)[n:].any():  # the bits after the last code, in its byte
      raise ValueError("nonzero padding bits after the last code")
  return out


# LZMA2 for code bytes: no literal context bits (lc=0, lp=0, pb=0). Codes carry
# no information in the high bits of the previous byte or in the position, and
# splitting the literal model by them only slows its adaptation. Any reader
# handles it: the .xz stream records its own properties.
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]


def compress(data: bytes) -> bytes:
  """LZMA2 in an .xz container (Python's `lzma`, preset 6), without a check."""
  return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                       filters=_LZMA_FILTERS)


def deflate(*parts: bytes) -> bytes:
  """One raw DEFLATE stream, Huffman coding only, each part in its own blocks.

  Ending a block between parts (the bitmap and the codes of the sparse
  stream) gives each part Huffman tables fitted to its own symbols.
  """
  c = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
  out = []
  for part in parts[:-1]:
    out.append(c.compress(part))
    out.append(c.flush(zlib.Z_BLOCK))
  out.append(c.compress(parts[-1] if parts else b""))
  out.append(c.flush())
  return b"".join(out)


def _inflate(data: bytes, codec: str, cap: int) -> bytes:
  """Decompresses one complete stream to at most `cap` bytes; ValueError otherwise."""
  if codec == "lzma":
    d = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=cap + _LZMA_MEMLIMIT_SLACK)
    errors = (lzma.LZMAError, EOFError)
  else:
    d = zlib.decompressobj(-15)
    errors = (zlib.error,)
  try:
    out = d.decompress(data, cap + 1)
  except errors as e:
    raise ValueError(f"corrupt {codec} stream ({e})") from None
  if len(out) > cap:
    raise ValueError(f"{codec} stream expands past the {cap} bytes the header implies")
  if not d.eof:
    raise ValueError(f"truncated {codec} stream")
  if d.unused_data:
    raise ValueError(f"{len(d.unused_data)} bytes after the end of the {codec} stream")
  return out


def sparse_parts(flat: np.ndarray) -> Tuple[bytes, bytes]:
  """(nonzero bitmap, nonzero codes) of flat codes: the sparse stream's two parts."""
  nonzero = flat != 0
  return np.packbits(nonzero, bitorder="little").tobytes(), flat[nonzero].tobytes()


def entropy_bits(histogram) -> float:
  """Order-0 entropy of `histogram` (symbol counts) times its count, in bits."""
  c = np.asarray(histogram, np.float64).reshape(-1)
  c = c[c > 0]
  return float(np.sum(c * np.log2(c.sum() / c))) if c.size else 0.0


def huffman_bits(histogram) -> int:
  """Bits a static Huffman code for `histogram` (symbol counts) spends in all.

  The size DEFLATE's Huffman-only mode reaches, give or take its block
  headers: an exact estimate from a histogram, in microseconds.
  """
  counts = [int(c) for c in np.asarray(histogram).reshape(-1) if c > 0]
  if len(counts) <= 1:
    return sum(counts)  # one symbol still costs a bit each
  # Each merge adds one bit to every symbol beneath it: the sum of all merged
  # weights is the total code length.
  heap = sorted(counts)  # a sorted list is already a heap
  total = 0
  while len(heap) > 1:
    merged = heapq.heappop(heap) + heapq.heappop(heap)
    total += merged
    heapq.heappush(heap, merged)
  return total


def encode_layout(codes: np.ndarray, bits: int, layout: str) -> bytes:
  """The section of b-bit codes in one quantized `layout`; `encode_best` makes its candidates here.

  Raises:
    ValueError for a layout that is not one of `QUANTIZED_LAYOUTS`.
  """
  flat = np.asarray(codes, np.uint8).reshape(-1)
  if layout == LAYOUT_PACKED:
    return pack(flat, bits)
  if layout == LAYOUT_LZMA:
    return compress(pack(flat, bits))
  if layout == LAYOUT_DEFLATE:
    return deflate(flat.tobytes())
  if layout == LAYOUT_SPARSE_DEFLATE:
    return deflate(*sparse_parts(flat))
  if layout == LAYOUT_SPARSE:
    return compress(b"".join(sparse_parts(flat)))
  raise ValueError(f"unknown layout {layout!r}; expected one of {QUANTIZED_LAYOUTS}")


def _sample(stream: bytes) -> bytes:
  if len(stream) <= _SAMPLE_WINDOW * _SAMPLE_WINDOWS:
    return stream
  step = (len(stream) - _SAMPLE_WINDOW) // (_SAMPLE_WINDOWS - 1)
  return b"".join(stream[i * step:i * step + _SAMPLE_WINDOW] for i in range(_SAMPLE_WINDOWS))


def repetitive(stream: bytes) -> bool:
  """Does string matching beat Huffman-only coding on a sample of `stream`?

  DEFLATE with matching (level 1, fast) against Huffman only on the same few
  KB: only when matches pay there can LZMA's far stronger matcher be worth its
  cost; on independent codes matches only add overhead.
  """
  sample = _sample(stream)
  return len(zlib.compress(sample, 1)) < 0.97 * len(deflate(sample))


def encode_best(codes: np.ndarray, bits: int, compress_: bool = True) -> Tuple[str, bytes]:
  """(layout, section) of b-bit codes: the smallest of the layouts worth trying.

  Of the two DEFLATE layouts only the one whose Huffman size, computed from the
  code and bitmap histograms (`huffman_bits`), is smaller gets compressed.
  "sparse+lzma" is tried as well when that Huffman size exceeds the histograms'
  entropy by more than `_HUFFMAN_SLACK` (very skewed codes, where LZMA's
  arithmetic coder gains what whole-bit Huffman codes cannot; below that LZMA's
  own overhead over the entropy eats the gain), and both LZMA layouts when `repetitive`
  finds repeated strings in a sample (there a histogram says nothing).
  "packed" whenever nothing beats its exact size. `compress_=False`: "packed".
  """
  flat = np.asarray(codes, np.uint8).reshape(-1)
  if not compress_:
    return LAYOUT_PACKED, pack(flat, bits)
  nonzero = flat != 0
  bitmap = np.packbits(nonzero, bitorder="little")
  nonzero_codes = flat[nonzero]
  codes_histogram = np.bincount(flat, minlength=256)
  nonzero_histogram = codes_histogram.copy()
  nonzero_histogram[0] = 0
  histograms = {
      LAYOUT_DEFLATE: [codes_histogram],
      LAYOUT_SPARSE_DEFLATE: [np.bincount(bitmap, minlength=256), nonzero_histogram]}
  huffman = {k: sum(huffman_bits(h) for h in v) for k, v in histograms.items()}
  entropy = min(sum(entropy_bits(h) for h in v) for v in histograms.values())
  dense = flat.tobytes()
  if huffman[LAYOUT_DEFLATE] <= huffman[LAYOUT_SPARSE_DEFLATE]:
    tried = [LAYOUT_DEFLATE]
  else:
    tried = [LAYOUT_SPARSE_DEFLATE]
  sparse = bitmap.tobytes() + nonzero_codes.tobytes()
  if repetitive(sparse) or repetitive(dense):
    tried += [LAYOUT_LZMA, LAYOUT_SPARSE]
  elif min(huffman.values()) > _HUFFMAN_SLACK * entropy + 64:
    tried.append(LAYOUT_SPARSE)
  candidates = {name: encode_layout(flat, bits, name) for name in tried}
  best = min(candidates, key=lambda name: (len(candidates[name]),
                                           QUANTIZED_LAYOUTS.index(name)))
  if len(candidates[best]) >= packed_size(flat.size, bits):
    return LAYOUT_PACKED, pack(flat, bits)
  return best, candidates[best]


def min_section_bytes(layout: str, count: int, bits: int) -> int:
  """The fewest bytes a `layout` section of `count` b-bit codes can take.

  A header declaring a shape whose least size exceeds its section is
  impossible, and is refused before anything is decompressed.
  """
  if layout == LAYOUT_PACKED:
    return packed_size(count, bits)
  if layout == LAYOUT_LZMA:
    return -(-packed_size(count, bits) // MAX_LZMA_RATIO)
  if layout == LAYOUT_SPARSE:
    return -(-sparse_size_range(count)[0] // MAX_LZMA_RATIO)
  if layout == LAYOUT_DEFLATE:
    return -(-count // MAX_DEFLATE_RATIO)
  if layout == LAYOUT_SPARSE_DEFLATE:
    return -(-sparse_size_range(count)[0] // MAX_DEFLATE_RATIO)
  raise ValueError(f"unknown layout {layout!r}; expected one of {QUANTIZED_LAYOUTS}")


def decode_section(data: bytes, layout: str, count: int, bits: int) -> np.ndarray:
  """`count` uint8 codes (flat) from a section; ValueError if it is malformed.

  Raises ValueError for an unknown layout, bad lengths, an undecodable or
  over-long compressed stream, codes of more than b bits, or (sparse) a bitmap
  that disagrees with the codes that follow it. Code *values* are not checked
  against a codebook here (see `valid_codes`). Compressed streams are inflated
  with an output cap of the most bytes `count` codes can take, so memory stays
  within a small multiple of the declared leaf size.
  """
  if layout not in QUANTIZED_LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; expected one of {QUANTIZED_LAYOUTS}")
  if len(data) < min_section_bytes(layout, count, bits):
    raise ValueError(f"a {layout} section of {len(data)} bytes cannot hold {count} codes")
  if layout == LAYOUT_PACKED:
    return unpack(data, count, bits)
  codec = "lzma" if layout in _LZMA_LAYOUTS else "deflate"
  if layout == LAYOUT_LZMA:
    return unpack(_inflate(data, codec, packed_size(count, bits)), count, bits)
  if layout == LAYOUT_DEFLATE:
    out = np.frombuffer(_inflate(data, codec, count), np.uint8)
    if out.size != count:
      raise ValueError(f"{out.size} codes, expected {count}")
    if out.size and out.max() >= 1 << bits:
      raise ValueError(f"a code exceeds {bits} bits")
    return out.copy()
  head, most = sparse_size_range(count)
  data = _inflate(data, codec, most)
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
