"""inq_jax._packing to the bit: codes, bit streams, codecs and their error messages.

Written for the mutation run of `_packing.py` (docs/mutation_testing.md). Each
reference below is built independently of the code under test: bit streams bit
by bit in Python, codes from exact fractions, Huffman sizes by hand.
"""

import lzma
import struct
import tracemalloc
import zlib
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from inq_jax import _packing as P

ZERO = -(2**30)  # ZERO_CODEBOOK


def message(exc, fn, *args, **kwargs) -> str:
  with pytest.raises(exc) as e:
    fn(*args, **kwargs)
  return str(e.value)


def reference_pack(codes, bits) -> bytes:
  """Code j at stream bits [j*b, (j+1)*b), LSB first; stream bit i = bit i%8 of byte i//8."""
  stream = []
  for c in codes:
    stream += [(int(c) >> k) & 1 for k in range(bits)]
  stream += [0] * (-len(stream) % 8)
  return bytes(sum(bit << k for k, bit in enumerate(stream[i:i + 8]))
               for i in range(0, len(stream), 8))


def reference_code(value, n1, bits):
  """(code, valid) of one weight from exact fractions: sign bit, m = 1 + n1 - k."""
  v = Fraction(float(value))
  negative = np.signbit(float(value))
  if v == 0:
    return (int(negative) << (bits - 1)), True
  if n1 == ZERO:
    return None, False
  n2 = n1 + 1 - 2 ** (bits - 2)
  for k in range(n2, n1 + 1):
    if abs(v) == Fraction(2) ** k:
      return (int(negative) << (bits - 1)) | (1 + n1 - k), True
  return None, False


def test_sizes():
  assert [P.num_magnitudes(b) for b in range(2, 9)] == [1, 2, 4, 8, 16, 32, 64]
  assert [P.packed_size(n, 5) for n in (0, 1, 8, 9)] == [0, 1, 5, 6]
  assert [P.packed_size(n, 3) for n in (1, 2, 3, 8)] == [1, 1, 2, 3]
  assert P.sparse_size_range(0) == (0, 0)
  assert P.sparse_size_range(1) == (1, 2)
  assert P.sparse_size_range(8) == (1, 9)
  assert P.sparse_size_range(9) == (2, 11)


def test_channel_n1_message():
  assert message(ValueError, P.encode, np.zeros((2, 3)), np.zeros(2, np.int64), 5) == (
      "per-channel n1 of shape (2,) does not fit weights of shape (2, 3) (one n1 per entry "
      "of the last axis)")
  assert message(ValueError, P.decode, np.zeros((), np.uint8), np.zeros(1, np.int64), 5) == (
      "per-channel n1 of shape (1,) does not fit weights of shape () (one n1 per entry of "
      "the last axis)")
  assert message(ValueError, P.valid_codes, np.zeros((3,), np.uint8), np.zeros((1, 3)), 5) == (
      "per-channel n1 of shape (1, 3) does not fit weights of shape (3,) (one n1 per entry "
      "of the last axis)")
  assert P.valid_codes(np.zeros((2, 3), np.uint8), np.zeros(3, np.int64), 5).shape == (2, 3)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, ml_dtypes.bfloat16])
def test_encode_against_exact_fractions(bits, dtype):
  n1 = 1
  n2 = n1 + 1 - 2 ** (bits - 2)
  values = [0.0, -0.0, 0.3, -0.75, 3.0, 4.0, 2.0 ** (n2 - 1), 2.0 ** max(n2, -14)]
  values += [s * 2.0 ** k for k in range(max(n2, -14), n1 + 1) for s in (1, -1)]
  w = np.asarray(values, dtype)
  codes, valid = P.encode(w, n1, bits)
  assert codes.dtype == np.uint8 and codes.shape == w.shape
  for i, x in enumerate(w):
    want, ok = reference_code(x, n1, bits)
    assert bool(valid[i]) == ok, (x, bits)
    if ok:
      assert int(codes[i]) == want, (x, bits)
  # Per channel: each column has its own n1; a {0} column only holds zeros.
  w2 = np.asarray([[1.0, 0.0, 0.5], [-0.5, -0.0, 0.25]], dtype)
  n1s = np.asarray([0, ZERO, -1])
  codes, valid = P.encode(w2, n1s, bits)
  for (r, c), x in np.ndenumerate(w2):
    want, ok = reference_code(x, int(n1s[c]), bits)
    assert bool(valid[r, c]) == ok
    if ok:
      assert int(codes[r, c]) == want


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_split_valid_decode_every_code(bits):
  all_codes = np.arange(1 << bits, dtype=np.uint8)
  negative, m = P.split_codes(all_codes, bits)
  assert negative.dtype == bool and m.dtype == np.int64
  np.testing.assert_array_equal(negative, all_codes >= 1 << (bits - 1))
  np.testing.assert_array_equal(m, all_codes % (1 << (bits - 1)))
  n1 = 3
  valid = P.valid_codes(all_codes, n1, bits)
  want_valid = [c % (1 << (bits - 1)) <= 2 ** (bits - 2) for c in range(1 << bits)]
  np.testing.assert_array_equal(valid, want_valid)
  np.testing.assert_array_equal(P.valid_codes(all_codes, ZERO, bits),
                                [c % (1 << (bits - 1)) == 0 for c in range(1 << bits)])
  values = P.decode(all_codes, n1, bits)
  assert values.dtype == np.float64
  for c in range(1 << bits):
    if not want_valid[c]:
      continue
    mag = c % (1 << (bits - 1))
    want = 0.0 if mag == 0 else 2.0 ** (n1 + 1 - mag)
    want = -want if c >= 1 << (bits - 1) else want
    assert values[c] == want and np.signbit(values[c]) == np.signbit(want), (c, bits)
  # float16's normals stop at 2^-14: its codebooks end there (n2 = 4 - 2^(b-2)).
  for dtype in (np.float32, ml_dtypes.bfloat16) + ((np.float16,) if bits < 8 else ()):
    table = P.decode_values(all_codes, n1, bits, dtype)
    assert table.dtype == dtype
    np.testing.assert_array_equal(np.signbit(table[valid]), np.signbit(values[valid]))
    np.testing.assert_array_equal(table[valid].astype(np.float64), values[valid])


def test_decode_clamps_far_exponents():
  # Invalid codes' exponents are clamped to +-1100, never undefined behaviour.
  with np.errstate(over="ignore"):  # 2^1100 overflows float64 to inf
    assert P.decode(np.asarray([1], np.uint8), 5000, 3)[0] == np.inf
  assert P.decode(np.asarray([2], np.uint8), -5000, 3)[0] == 0.0


def test_decode_values_per_channel_and_zero_codebook():
  bits = 4  # m in 1..4: 2^n1 .. 2^(n1-3)
  codes = np.asarray([[1, 1, 0], [4, 9, 8], [12, 0, 0]], np.uint8)
  n1 = np.asarray([0, 2, ZERO])
  got = P.decode_values(codes, n1, bits, np.float32)
  np.testing.assert_array_equal(got, np.float32([[1.0, 4.0, 0.0], [0.125, -4.0, -0.0],
                                                 [-0.125, 0.0, 0.0]]))
  assert np.signbit(got[1, 2]) and not np.signbit(got[2, 2])
  assert P.decode_values(np.zeros((0, 3), np.uint8), n1, bits, np.float16).shape == (0, 3)
  assert P.decode_values(np.zeros((0, 3), np.uint8), n1, bits, np.float16).dtype == np.float16
  assert P.decode_values(np.asarray([1, 2], np.uint8), 0, bits, np.float32).tolist() == [1.0, 0.5]


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 8])
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 23])
def test_pack_and_unpack_against_bits(bits, count):
  codes = np.random.default_rng(bits * 100 + count).integers(0, 1 << bits, count).astype(np.uint8)
  data = P.pack(codes, bits)
  assert data == reference_pack(codes, bits)
  np.testing.assert_array_equal(P.unpack(data, count, bits), codes)


def test_pack_and_unpack_across_chunks():
  # Two chunks plus a partial third, with a code count that is not a multiple of 8.
  bits, count = 5, 2 * (1 << 20) + 13
  codes = np.random.default_rng(0).integers(0, 1 << bits, count).astype(np.uint8)
  data = P.pack(codes, bits)
  assert len(data) == (count * bits + 7) // 8
  for start in ((1 << 21) - 8, (1 << 21) + 8):  # byte-aligned starts, to the end
    assert data[start * bits // 8:] == reference_pack(codes[start:], bits)
  head = codes[(1 << 20) - 8:(1 << 20) + 8]  # across the first chunk boundary
  start = ((1 << 20) - 8) * bits // 8
  assert data[start:start + 10] == reference_pack(head, bits)
  np.testing.assert_array_equal(P.unpack(data, count, bits), codes)


def test_unpack_messages():
  assert message(ValueError, P.unpack, b"\x00" * 4, 7, 5) == (
      "4 bytes of packed codes, expected 5 for 7 5-bit codes")
  assert message(ValueError, P.unpack, b"\x00\x80", 3, 5) == (
      "nonzero padding bits after the last code")
  # The last padding bit of the last byte counts; a full last byte has none.
  np.testing.assert_array_equal(P.unpack(bytes([0xFF, 0x7F]), 3, 5), [31, 31, 31])
  assert message(ValueError, P.unpack, bytes([0xFF, 0xFF]), 3, 5) == (
      "nonzero padding bits after the last code")
  np.testing.assert_array_equal(P.unpack(bytes([0xFF] * 5), 8, 5), [31] * 8)


def test_compress_is_xz_without_check_and_plain_literals():
  data = bytes(range(7)) * 500
  blob = P.compress(data)
  assert blob[:6] == b"\xfd7zXZ\x00"
  assert blob[6:8] == b"\x00\x00"  # stream flags: check type 0 (none)
  assert lzma.decompress(blob) == data
  # LZMA2 properties byte of the first chunk: (pb * 5 + lp) * 9 + lc = 0.
  block_header_size = (blob[12] + 1) * 4
  first_chunk = blob[12 + block_header_size:]
  assert first_chunk[0] >= 0xE0 and first_chunk[5] == 0  # a chunk with new props, props 0


def test_deflate_is_raw_huffman_only_with_a_block_per_part():
  part = bytes([1, 2, 3, 4]) * 300  # repeated strings: matching would shrink it a lot
  out = P.deflate(part)
  assert zlib.decompressobj(-15).decompress(out) == part
  assert len(out) > 290  # Huffman only: ~2 bits per byte, no matches
  assert out != zlib.compress(part)[2:-4]
  two = P.deflate(b"\x00" * 100, b"\x07" * 100)
  assert zlib.decompressobj(-15).decompress(two) == b"\x00" * 100 + b"\x07" * 100
  # Its own block (and Huffman table) per part: not the stream of the joined parts.
  assert two != P.deflate(b"\x00" * 100 + b"\x07" * 100)
  assert zlib.decompressobj(-15).decompress(P.deflate()) == b""
  assert zlib.decompressobj(-15).decompress(P.deflate(b"ab", b"", b"cd")) == b"abcd"


@pytest.mark.parametrize("codec", ["lzma", "deflate"])
def test_inflate_messages(codec):
  data = bytes(range(50)) * 4
  blob = P.compress(data) if codec == "lzma" else P.deflate(data)
  assert P._inflate(blob, codec, len(data)) == data  # pylint: disable=protected-access
  assert message(ValueError, P._inflate, blob, codec, len(data) - 1) == (  # pylint: disable=protected-access
      f"{codec} stream expands past the {len(data) - 1} bytes the header implies")
  assert message(ValueError, P._inflate, blob[:len(blob) // 2], codec, len(data)) == (  # pylint: disable=protected-access
      f"truncated {codec} stream")
  assert message(ValueError, P._inflate, blob + b"xyz", codec, len(data)) == (  # pylint: disable=protected-access
      f"3 bytes after the end of the {codec} stream")
  got = message(ValueError, P._inflate, b"\xff" * 40, codec, 100)  # pylint: disable=protected-access
  assert got.startswith(f"corrupt {codec} stream (") and got.endswith(")")


def sparse_stream(flat) -> bytes:
  """The sparse stream, built independently: the nonzero bitmap, then the nonzero codes."""
  flat = np.asarray(flat, np.uint8).reshape(-1)
  return np.packbits(flat != 0, bitorder="little").tobytes() + flat[flat != 0].tobytes()


def every_layout(codes, bits):
  return {layout: P.encode_layout(codes, bits, layout) for layout in P.QUANTIZED_LAYOUTS}


def test_sparse_parts():
  flat = np.asarray([0, 3, 0, 0, 0, 0, 0, 0, 9, 0], np.uint8)
  bitmap, values = P.sparse_parts(flat)
  assert bitmap == bytes([0b00000010, 0b00000001]) and values == bytes([3, 9])
  assert sparse_stream(flat) == bitmap + values


def test_entropy_and_huffman_bits_by_hand():
  assert P.entropy_bits([]) == 0.0 and P.entropy_bits([0, 0]) == 0.0
  assert P.entropy_bits([5]) == 0.0
  assert P.entropy_bits([1, 1]) == 2.0
  assert P.entropy_bits([2, 1, 1, 0]) == pytest.approx(6.0)  # 2*1 + 1*2 + 1*2
  assert P.huffman_bits([0, 7, 0]) == 7  # one symbol: a bit each
  assert P.huffman_bits([]) == 0
  assert P.huffman_bits([1, 1]) == 2
  assert P.huffman_bits([1, 1, 2]) == 6  # codes 2, 2, 1 bits
  assert P.huffman_bits([5, 1, 1, 1, 1]) == 17  # 5 x 1 bit + 4 x 3 bits
  assert P.huffman_bits(np.asarray([[3, 3], [3, 3]])) == 24


def test_encode_layout_makes_each_layout():
  codes = np.asarray([0, 1, 0, 2, 0, 0, 31, 0], np.uint8)
  every = every_layout(codes, 5)
  assert every[P.LAYOUT_PACKED] == reference_pack(codes, 5)
  assert lzma.decompress(every[P.LAYOUT_LZMA]) == every[P.LAYOUT_PACKED]
  assert lzma.decompress(every[P.LAYOUT_SPARSE]) == sparse_stream(codes)
  inflate = zlib.decompressobj(-15).decompress
  assert inflate(every[P.LAYOUT_DEFLATE]) == codes.tobytes()
  assert zlib.decompressobj(-15).decompress(every[P.LAYOUT_SPARSE_DEFLATE]) == sparse_stream(codes)
  # The sparse+deflate bitmap ends its own DEFLATE block, so its Huffman table
  # fits the bitmap alone.
  assert every[P.LAYOUT_SPARSE_DEFLATE] == P.deflate(*P.sparse_parts(codes))
  want = ("unknown layout 'raw'; expected one of ('packed', 'codes+deflate', "
          "'sparse+deflate', 'packed+lzma', 'sparse+lzma')")
  assert message(ValueError, P.encode_layout, codes, 5, "raw") == want


def test_sample_windows():
  small = bytes(range(256)) * 128  # exactly 4 windows of 8 KiB: whole
  assert P._sample(small) == small  # pylint: disable=protected-access
  big = bytes(np.random.default_rng(0).integers(0, 256, 100_000, dtype=np.uint8))
  step = (100_000 - 8192) // 3
  want = b"".join(big[i * step:i * step + 8192] for i in range(4))
  assert P._sample(big) == want  # pylint: disable=protected-access
  assert P._sample(big)[-8192:] == big[-8192 - (100_000 - 8192) % 3:][:8192]  # pylint: disable=protected-access


def test_repetitive():
  rng = np.random.default_rng(0)
  assert P.repetitive(bytes([0, 1, 2, 3, 4, 5, 6, 7]) * 2000)
  assert not P.repetitive(rng.integers(0, 256, 30_000, dtype=np.uint8).tobytes())
  assert not P.repetitive(rng.integers(0, 4, 30_000, dtype=np.uint8).tobytes())


def test_encode_best_choices():
  rng = np.random.default_rng(0)
  # Uniform 5-bit codes: nothing beats the packed size.
  flat = rng.integers(0, 32, 4000).astype(np.uint8)
  assert P.encode_best(flat, 5) == (P.LAYOUT_PACKED, P.pack(flat, 5))
  assert P.encode_best(flat, 5, compress_=False) == (P.LAYOUT_PACKED, P.pack(flat, 5))
  # Skewed, independent codes: Huffman over whole bytes (dense or sparse).
  skew = rng.choice([1, 2, 17, 18], 8000, p=[0.4, 0.3, 0.2, 0.1]).astype(np.uint8)
  layout, data = P.encode_best(skew, 5)
  assert layout == P.LAYOUT_DEFLATE
  assert data == P.deflate(skew.tobytes())
  mostly_zero = np.where(rng.random(8000) < 0.9, 0, skew).astype(np.uint8)
  layout, data = P.encode_best(mostly_zero, 5)
  assert layout == P.LAYOUT_SPARSE_DEFLATE
  assert data == P.deflate(*P.sparse_parts(mostly_zero))
  # Repeated rows (whole pruned channels): LZMA's string matching wins.
  rows = np.tile(rng.integers(0, 32, 64).astype(np.uint8), 400)
  layout, data = P.encode_best(rows, 5)
  assert layout in (P.LAYOUT_LZMA, P.LAYOUT_SPARSE)
  np.testing.assert_array_equal(P.decode_section(data, layout, rows.size, 5), rows)
  # Extremely skewed: sparse+lzma's arithmetic coder beats whole-bit Huffman codes.
  rare = np.zeros(200_000, np.uint8)
  rare[rng.choice(200_000, 300, replace=False)] = rng.integers(1, 32, 300)
  layout, data = P.encode_best(rare, 5)
  assert layout == P.LAYOUT_SPARSE
  np.testing.assert_array_equal(P.decode_section(data, layout, rare.size, 5), rare)


def test_min_section_bytes():
  assert P.min_section_bytes(P.LAYOUT_PACKED, 9, 5) == 6
  assert P.min_section_bytes(P.LAYOUT_LZMA, 9, 5) == 1
  assert P.min_section_bytes(P.LAYOUT_LZMA, 16384 + 1, 8) == 2  # ceil(16385 / 16384)
  assert P.min_section_bytes(P.LAYOUT_LZMA, 16384, 8) == 1
  assert P.min_section_bytes(P.LAYOUT_SPARSE, 16384 * 8, 5) == 1
  assert P.min_section_bytes(P.LAYOUT_SPARSE, 16384 * 8 + 1, 5) == 2
  assert P.min_section_bytes(P.LAYOUT_DEFLATE, 1040, 5) == 1
  assert P.min_section_bytes(P.LAYOUT_DEFLATE, 1041, 5) == 2
  assert P.min_section_bytes(P.LAYOUT_SPARSE_DEFLATE, 1040 * 8, 5) == 1
  assert P.min_section_bytes(P.LAYOUT_SPARSE_DEFLATE, 1040 * 8 + 1, 5) == 2
  assert P.min_section_bytes(P.LAYOUT_DEFLATE, 0, 5) == 0
  want = ("unknown layout 'raw'; expected one of ('packed', 'codes+deflate', "
          "'sparse+deflate', 'packed+lzma', 'sparse+lzma')")
  assert message(ValueError, P.min_section_bytes, "raw", 9, 5) == want
  assert message(ValueError, P.decode_section, b"", "raw", 9, 5) == want


def test_decode_section_messages():
  codes = np.asarray([0, 1, 0, 2, 0, 0, 31, 0, 0], np.uint8)
  s = every_layout(codes, 5)
  for layout, data in s.items():
    np.testing.assert_array_equal(P.decode_section(data, layout, 9, 5), codes)
    assert P.decode_section(data, layout, 9, 5).dtype == np.uint8
  assert message(ValueError, P.decode_section, b"\x00" * 5, P.LAYOUT_PACKED, 9, 5) == (
      "a packed section of 5 bytes cannot hold 9 codes")
  assert message(ValueError, P.decode_section, b"", P.LAYOUT_DEFLATE, 9, 5) == (
      "a codes+deflate section of 0 bytes cannot hold 9 codes")
  assert message(ValueError, P.decode_section, P.deflate(bytes(8)), P.LAYOUT_DEFLATE, 9, 5) == (
      "8 codes, expected 9")
  assert message(ValueError, P.decode_section, P.deflate(bytes([0] * 8 + [32])),
                 P.LAYOUT_DEFLATE, 9, 5) == "a code exceeds 5 bits"
  np.testing.assert_array_equal(
      P.decode_section(P.deflate(bytes([0] * 8 + [31])), P.LAYOUT_DEFLATE, 9, 5), [0] * 8 + [31])
  bitmap, values = P.sparse_parts(codes)  # 2 bytes of bitmap for 9 codes
  assert message(ValueError, P.decode_section, P.deflate(bitmap[:1]), P.LAYOUT_SPARSE_DEFLATE,
                 9, 5) == "sparse section of 1 bytes is shorter than its 2-byte bitmap"
  past = bytes([bitmap[0], bitmap[1] | 0b10])
  assert message(ValueError, P.decode_section, P.deflate(past, values),
                 P.LAYOUT_SPARSE_DEFLATE, 9, 5) == "sparse bitmap has bits set past the last weight"
  assert message(ValueError, P.decode_section, P.compress(bitmap + values[:-1]),
                 P.LAYOUT_SPARSE, 9, 5) == "sparse bitmap marks 3 nonzero codes but 2 follow it"
  for bad in (0, 32):
    assert message(ValueError, P.decode_section, P.deflate(bitmap, values[:-1] + bytes([bad])),
                   P.LAYOUT_SPARSE_DEFLATE, 9, 5) == "sparse section holds a code outside 1..31"
  np.testing.assert_array_equal(
      P.decode_section(P.deflate(bitmap, values[:-1] + bytes([1])), P.LAYOUT_SPARSE_DEFLATE, 9, 5),
      [0, 1, 0, 2, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(P.decode_section(P.deflate(bytes(2)), P.LAYOUT_SPARSE_DEFLATE,
                                                 9, 5), np.zeros(9))
  # The inflate cap: packed+lzma may expand to packed_size, not one byte more.
  big = P.compress(bytes(7))
  assert message(ValueError, P.decode_section, big, P.LAYOUT_LZMA, 9, 5) == (
      "lzma stream expands past the 6 bytes the header implies")


def test_crc32_and_prefix():
  assert P.crc32(b"") == 0 and P.crc32(b"abc") == 0x352441C2
  out = P.prefix(100, 2000, 0xDEADBEEF)
  assert len(out) == P.PREFIX.size == 36
  magic, version, header_len, file_len, header_crc, own = P.PREFIX.unpack(out)
  assert (magic, version, header_len, file_len, header_crc) == (
      b"\x89INQJAX\n", 1, 100, 2000, 0xDEADBEEF)
  assert own == zlib.crc32(out[:32])
  assert P.PREFIX.unpack(P.prefix(1, 2, 3, version=7))[1] == 7
  assert out[8:12] == struct.pack("<I", 1)


def _compress_calls(monkeypatch):
  calls = []
  real = P.compress

  def spy(data):
    calls.append(bytes(data))
    return real(data)

  monkeypatch.setattr(P, "compress", spy)
  return calls


def test_encode_best_tries_lzma_only_where_it_can_pay(monkeypatch):
  calls = _compress_calls(monkeypatch)
  rng = np.random.default_rng(0)
  # Independent, near-uniform codes: Huffman is within 10% of the entropy and
  # nothing repeats, so LZMA (slow) is not even tried.
  for n in (100, 4000):
    assert P.encode_best(rng.integers(0, 32, n).astype(np.uint8), 5)[0] == P.LAYOUT_PACKED
  skew = np.where(rng.random(2000) < 0.5, 7, rng.integers(0, 32, 2000)).astype(np.uint8)
  assert P.encode_best(skew, 5)[0] == P.LAYOUT_DEFLATE
  assert calls == []
  # One symbol at 90%, the rest uniform: nothing repeats, but whole-bit Huffman
  # codes waste more than 10% over the entropy: sparse+lzma is tried, and wins.
  rng = np.random.default_rng(1)
  flat = np.where(rng.random(20000) < 0.9, 7, rng.integers(0, 32, 20000)).astype(np.uint8)
  assert not P.repetitive(flat.tobytes()) and not P.repetitive(sparse_stream(flat))
  layout, data = P.encode_best(flat, 5)
  assert calls == [sparse_stream(flat)]
  assert (layout, data) == (P.LAYOUT_SPARSE, P.compress(sparse_stream(flat)))
  calls.clear()
  # Runs of zeros: the dense stream repeats (the sparse one does not): both
  # LZMA layouts are tried.
  rng = np.random.default_rng(2)
  flat = np.where(rng.random(20000) < 0.95, 0, rng.integers(1, 32, 20000)).astype(np.uint8)
  assert P.repetitive(flat.tobytes()) and not P.repetitive(sparse_stream(flat))
  P.encode_best(flat, 5)
  assert calls == [P.pack(flat, 5), sparse_stream(flat)]


def _tie(zeros):
  """64 codes (all 5 but `zeros` zeros, at most 2 per bitmap byte).

  Huffman sizes: dense 64 bits (two symbols); sparse 8 (bitmap: at most two
  byte values) + 64 - zeros (one nonzero symbol, a bit each).
  """
  flat = np.full(64, 5, np.uint8)
  for z in range(zeros):
    flat[(z % 8) * 8 + z // 8] = 0
  return flat


def test_encode_best_breaks_huffman_ties_towards_dense():
  dense, sparse = _tie(8), _tie(9)
  assert P.huffman_bits(np.bincount(dense)) == 64
  assert P.huffman_bits(np.bincount(np.packbits(dense != 0, bitorder="little"))) == 8
  # 8 zeros: a tie (64 = 8 + 56), dense wins; 9 zeros: sparse is a bit smaller.
  assert P.encode_best(dense, 5) == (P.LAYOUT_DEFLATE, P.deflate(dense.tobytes()))
  assert P.encode_best(sparse, 5) == (P.LAYOUT_SPARSE_DEFLATE,
                                      P.deflate(*P.sparse_parts(sparse)))


def test_encode_accepts_any_integer_codes_and_shapes():
  rng = np.random.default_rng(3)
  flat = np.where(rng.random(3000) < 0.6, 0, rng.integers(1, 32, 3000)).astype(np.uint8)
  as_grid = flat.reshape(30, 100)
  for codes in (as_grid, flat.astype(np.int64), as_grid.astype(np.int32)):
    assert P.encode_best(codes, 5) == P.encode_best(flat, 5)
    assert every_layout(codes, 5) == every_layout(flat, 5)
  assert P.encode_best(np.zeros(0, np.uint8), 5) == (P.LAYOUT_PACKED, b"")
  empty = every_layout(np.zeros((0, 3), np.uint8), 5)
  for layout, data in empty.items():
    assert P.decode_section(data, layout, 0, 5).shape == (0,)


def test_decode_exponents_beyond_int32():
  # Exponents clamp before the int32 cast: no wrap-around to 2^0.
  with np.errstate(over="ignore"):
    assert P.decode(np.asarray([1], np.uint8), np.int64(2**40), 3)[0] == np.inf
  assert P.decode(np.asarray([1], np.uint8), np.int64(-(2**40)), 3)[0] == 0.0
  assert P.decode(np.asarray([5], np.uint8), np.int64(-(2**40)), 3)[0] == 0.0


def test_decode_values_one_code_and_conv_shapes():
  assert P.decode_values(np.asarray([1], np.uint8), 0, 4, np.float32).tolist() == [1.0]
  assert P.decode_values(np.asarray(9, np.uint8), 2, 4, np.float32) == -4.0
  # A conv kernel [h, w, in, out] with one n1 per output channel.
  codes = np.arange(2 * 3 * 2 * 4, dtype=np.uint8).reshape(2, 3, 2, 4) % 16
  n1 = np.asarray([0, 1, 2, ZERO])
  got = P.decode_values(np.where(n1 == ZERO, 0, codes).astype(np.uint8), n1, 4, np.float32)
  assert got.shape == codes.shape
  want = P.decode(np.where(n1 == ZERO, 0, codes).astype(np.uint8), n1, 4)
  ok = P.valid_codes(codes, n1, 4)
  np.testing.assert_array_equal(got[ok], want[ok].astype(np.float32))


def test_prefix_crc_in_the_upper_half():
  # CRCs of 2^31 and above are unsigned 32-bit fields.
  highs = 0
  for header_len in range(1, 40):
    out = P.prefix(header_len, 1000, 7)
    own = P.PREFIX.unpack(out)[-1]
    assert own == zlib.crc32(out[:32])
    highs += own >= 2**31
  assert highs > 5


def test_huffman_bits_ignores_absent_symbols():
  assert P.huffman_bits([0, 1, 1, 2]) == 6
  assert P.huffman_bits([0, 0, 5, 3]) == 8


def _xz_with_dictionary(data: bytes, props: int) -> bytes:
  """An .xz stream of `data` whose LZMA2 filter declares dictionary size code `props`.

  The block header's props byte is rewritten and its CRC32 recomputed: a
  well-formed stream that asks the decoder for a huge dictionary.
  """
  blob = bytearray(P.compress(data))
  size = (blob[12] + 1) * 4
  header = blob[12:12 + size]
  assert header[1] & 0xC0 == 0 and header[2] == 0x21 and header[3] == 1  # no sizes; LZMA2
  header[4] = props
  header[-4:] = struct.pack("<I", zlib.crc32(bytes(header[:-4])))
  blob[12:12 + size] = header
  return bytes(blob)


def test_inflate_refuses_what_is_not_a_bounded_xz_stream():
  data = bytes(range(64)) * 4
  # A 1 GiB dictionary (props 36: 2 << 29) for 256 bytes: past the memory cap.
  bomb = _xz_with_dictionary(data, 36)
  assert lzma.LZMADecompressor().decompress(bomb) == data  # valid, just greedy
  got = message(ValueError, P._inflate, bomb, "lzma", len(data))  # pylint: disable=protected-access
  assert got.startswith("corrupt lzma stream (") and "emory" in got
  assert P._inflate(_xz_with_dictionary(data, 16), "lzma", len(data)) == data  # pylint: disable=protected-access
  # The legacy .lzma container is not .xz: refused, even though lzma reads it.
  alone = lzma.compress(data, format=lzma.FORMAT_ALONE)
  got = message(ValueError, P._inflate, alone, "lzma", len(data))  # pylint: disable=protected-access
  assert got.startswith("corrupt lzma stream (")


def test_decode_section_names_the_codec():
  codes = np.asarray([0, 1, 0, 2, 0, 0, 31, 0, 0], np.uint8)
  for layout, codec in ((P.LAYOUT_DEFLATE, "deflate"), (P.LAYOUT_SPARSE_DEFLATE, "deflate"),
                        (P.LAYOUT_LZMA, "lzma"), (P.LAYOUT_SPARSE, "lzma")):
    data = P.encode_layout(codes, 5, layout)
    assert message(ValueError, P.decode_section, data + b"\x00", layout, 9, 5) == (
        f"1 bytes after the end of the {codec} stream")
    got = message(ValueError, P.decode_section, b"\xff" * 20, layout, 9, 5)
    assert got.startswith(f"corrupt {codec} stream ("), (layout, got)


def test_encode_best_prefers_packed_on_a_size_tie():
  # Found by search: the sparse+deflate stream is exactly ceil(n * 5 / 8) bytes.
  for codes in ([27, 25, 0, 0, 0, 19, 28, 0, 0, 0, 0, 0, 0, 0, 0, 22, 0],
                [0, 0, 29, 0, 0, 9, 0, 18, 0, 0, 28, 20, 0, 8, 0, 1, 0, 0, 0, 0, 15, 20, 0, 3,
                 0, 7, 0, 0]):
    flat = np.asarray(codes, np.uint8)
    assert len(P.deflate(*P.sparse_parts(flat))) == P.packed_size(flat.size, 5)
    assert len(P.deflate(flat.tobytes())) > P.packed_size(flat.size, 5)
    assert P.encode_best(flat, 5) == (P.LAYOUT_PACKED, P.pack(flat, 5))


def test_encode_float64_weights_as_they_are():
  # float64 powers of two far below float32's range are codebook members of a
  # float64 model; narrowing them to float32 first would zero them.
  n1 = -199
  w = np.asarray([2.0**-200, -(2.0**-199), 2.0**-250, 0.0])  # n2 = -199 + 1 - 64 = -262
  codes, valid = P.encode(w, n1, 8)
  assert valid.tolist() == [True, True, True, True]
  assert codes.tolist() == [2, 128 | 1, 52, 0]  # m = 1 + n1 - k
  np.testing.assert_array_equal(P.decode(codes, n1, 8), w)


@pytest.mark.parametrize("codec", ["lzma", "deflate"])
def test_inflate_stops_at_the_cap(codec):
  # 64 MiB of zeros compress to a few KB (LZMA) or 8 MB (Huffman-only DEFLATE);
  # inflating them whole to find out they exceed a 1 KB cap would take 64 MiB.
  # At most cap + 1 bytes are made: the peak is the decoder's own state (LZMA's
  # 8 MiB dictionary, zlib's copy of the unread input).
  data = bytes(64 << 20)
  blob = P.compress(data) if codec == "lzma" else P.deflate(data)
  del data
  tracemalloc.start()
  try:
    got = message(ValueError, P._inflate, blob, codec, 1000)  # pylint: disable=protected-access
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert got == f"{codec} stream expands past the 1000 bytes the header implies"
  assert peak < 24 << 20, peak


def test_pack_takes_any_shape_in_c_order():
  codes = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4) % 32
  assert P.pack(codes, 5) == P.pack(codes.reshape(-1), 5) == reference_pack(codes.reshape(-1), 5)
  assert P.pack(codes.tolist(), 5) == P.pack(codes.reshape(-1), 5)
