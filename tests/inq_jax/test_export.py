"""The .inq export: bit-exact round trips, sizes, layouts, and every way to refuse."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from inq_jax import _packing, export
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths


def make_params(dtype=jnp.float32, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"conv": {"kernel": (jax.random.normal(k[0], (3, 3, 2, 8)) * 0.3).astype(dtype),
                   "bias": jnp.linspace(-1, 1, 8).astype(dtype)},
          "dense": {"kernel": (jax.random.normal(k[1], (40, 10)) * 0.05).astype(dtype),
                    "bias": jnp.zeros(10, dtype)}}


def quantized(params, **config):
  state = inq.init(params, inq.INQConfig(**config))
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  return params, state


def flat(tree):
  return dict(leaves_with_paths(tree)[0])


def assert_bit_identical(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for path in fa:
    x, y = np.asarray(fa[path]), np.asarray(fb[path])
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), path


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_round_trip_bit_exact(tmp_path, dtype, granularity):
  params, state = quantized(make_params(dtype), bits=4, granularity=granularity)
  extras = {"batch_stats": {"bn": {"mean": jnp.arange(3, dtype=jnp.float32),
                                   "var": jnp.array([-0.0, 1.0, 2.5], jnp.float32)}},
            "empty": {}}
  stats = export.save(tmp_path / "m.inq", params, state, extras=extras)
  back, back_extras = export.load_with_extras(tmp_path / "m.inq")
  assert_bit_identical(params, back)
  assert_bit_identical(extras["batch_stats"], back_extras["batch_stats"])
  assert back_extras["empty"] == {} and sorted(back_extras) == ["batch_stats", "empty"]
  assert_bit_identical(params, export.load(tmp_path / "m.inq"))
  assert stats["bits"] == 4 and stats["quantized_weights"] == 3 * 3 * 2 * 8 + 40 * 10
  assert stats["bytes"] == os.path.getsize(tmp_path / "m.inq")
  assert stats["float32_bytes"] == 4 * (144 + 8 + 400 + 10)
  assert stats["ratio"] == pytest.approx(stats["float32_bytes"] / stats["bytes"])
  header = export.read_header(tmp_path / "m.inq")
  n1 = {e["path"]: e["n1"] for e in header["leaves"] if e["kind"] == "quantized"}
  if granularity == "channel":
    assert len(n1["conv/kernel"]) == 8 and len(n1["dense/kernel"]) == 10
  else:
    assert isinstance(n1["conv/kernel"], int)
  assert header["inq"]["granularity"] == granularity and header["inq"]["step"] == 4
  assert not [f for f in os.listdir(tmp_path) if f != "m.inq"]  # no temporary left


def test_negative_zero_and_all_zero_layer_round_trip(tmp_path):
  params = make_params()
  params["dense"]["kernel"] = jnp.zeros((40, 10))  # codebook {0}
  params, state = quantized(params, bits=3)
  kernel = np.array(params["conv"]["kernel"])
  kernel[0, 0, 0, 0] = -0.0  # not produced by INQ, but a codebook value: kept exactly
  params["conv"]["kernel"] = jnp.asarray(kernel)
  export.save(tmp_path / "m.inq", params, state)
  back = export.load(tmp_path / "m.inq")
  assert_bit_identical(params, back)
  assert np.signbit(back["conv"]["kernel"][0, 0, 0, 0])
  assert state.exponents["dense/kernel"] == inq.ZERO_CODEBOOK


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
def test_payload_at_most_bits_per_weight(tmp_path, bits):
  params, state = quantized({"a": {"kernel": jax.random.normal(jax.random.key(1), (64, 48))},
                             "b": {"kernel": jax.random.normal(jax.random.key(2), (5, 5, 3, 7))}},
                            bits=bits)
  n = 64 * 48 + 5 * 5 * 3 * 7
  for compress in (True, False):
    stats = export.save(tmp_path / "m.inq", params, state, compress=compress)
    assert stats["quantized_weights"] == n
    header = export.read_header(tmp_path / "m.inq")
    for e in header["leaves"]:
      size = int(np.prod(e["shape"]))
      assert e["length"] <= _packing.packed_size(size, bits)  # ceil(size * bits / 8)
      if not compress:
        assert e["layout"] == "packed" and e["length"] == _packing.packed_size(size, bits)
    # 4 * 48 * bits / 8 is whole; the 525-weight leaf pads at most one byte.
    assert stats["quantized_bytes"] <= n * bits / 8 + 1
    assert_bit_identical(params, export.load(tmp_path / "m.inq"))


def test_mostly_zero_leaf_gets_a_sparse_layout(tmp_path):
  w = np.array(jax.random.normal(jax.random.key(3), (400, 250)) * 0.03)
  w[np.abs(w) < np.quantile(np.abs(w), 0.9)] = 0  # 90% pruned
  params, state = quantized({"fc": {"kernel": jnp.asarray(w)}}, bits=5)
  assert float(np.mean(np.asarray(params["fc"]["kernel"]) == 0)) >= 0.899
  stats = export.save(tmp_path / "m.inq", params, state)
  assert stats["layouts"]["fc/kernel"] in ("sparse+deflate", "sparse+lzma")
  assert stats["ratio"] >= 40, stats  # 90%-zero 5-bit weights: >= 40x below float32
  assert_bit_identical(params, export.load(tmp_path / "m.inq"))


def test_pruned_rows_get_an_lzma_layout(tmp_path):
  # Whole zero rows are repeated runs: LZMA's matcher pays, Huffman alone does not.
  w = np.array(jax.random.normal(jax.random.key(3), (400, 250)) * 0.03)
  w[np.random.default_rng(0).random(400) < 0.9] = 0
  params, state = quantized({"fc": {"kernel": jnp.asarray(w)}}, bits=5)
  stats = export.save(tmp_path / "m.inq", params, state)
  assert stats["layouts"]["fc/kernel"] in ("packed+lzma", "sparse+lzma")
  assert_bit_identical(params, export.load(tmp_path / "m.inq"))


@pytest.mark.parametrize("zero_fraction", [0.0, 0.5, 0.9, 0.99])
def test_chosen_layout_is_near_the_smallest(zero_fraction):
  # The writer compresses one candidate, chosen from histograms; it must stay
  # within 2% of trying every layout in full.
  rng = np.random.default_rng(1)
  magnitudes = rng.geometric(0.45, 200_000).clip(1, 8)
  codes = (magnitudes | (rng.integers(0, 2, 200_000) << 4)).astype(np.uint8)
  codes[rng.random(200_000) < zero_fraction] = 0
  every = {name: _packing.encode_layout(codes, 5, name)
           for name in _packing.QUANTIZED_LAYOUTS}
  layout, data = _packing.encode_best(codes, 5)
  assert len(data) <= 1.02 * min(len(v) for v in every.values()), (
      layout, {k: len(v) for k, v in every.items()})
  np.testing.assert_array_equal(_packing.decode_section(data, layout, codes.size, 5), codes)


def test_refuses_unfinished_run_before_writing(tmp_path):
  params = make_params()
  state = inq.init(params, inq.INQConfig(bits=5))
  params, state = inq.advance(params, state)
  (tmp_path / "m.inq").write_bytes(b"old")
  with pytest.raises(ValueError, match=r"conv/kernel: only 72 of 144 weights .*step 1 of 4"):
    export.save(tmp_path / "m.inq", params, state)
  assert (tmp_path / "m.inq").read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["m.inq"]


def test_refuses_weight_outside_codebook(tmp_path):
  params, state = quantized(make_params(), bits=5)
  n1 = int(state.exponents["dense/kernel"])
  bad = params["dense"]["kernel"].at[3, 4].set(0.3 * 2.0 ** n1)
  with pytest.raises(ValueError, match=r"dense/kernel: weight .* at index \(3, 4\) is not in "
                     r"its 5-bit codebook \{0, \+-2\^k: " + f"{n1 - 7} <= k <= {n1}"):
    export.save(tmp_path / "m.inq", {**params, "dense": {**params["dense"], "kernel": bad}},
                state)
  too_big = params["dense"]["kernel"].at[0, 0].set(2.0 ** (n1 + 1))
  with pytest.raises(ValueError, match=r"dense/kernel: weight"):
    export.save(tmp_path / "m.inq", {**params, "dense": {"kernel": too_big,
                                                         "bias": params["dense"]["bias"]}},
                state)
  nan = params["dense"]["kernel"].at[0, 1].set(jnp.nan)
  with pytest.raises(ValueError, match=r"nan at index \(0, 1\)"):
    export.save(tmp_path / "m.inq", {**params, "dense": {"kernel": nan,
                                                         "bias": params["dense"]["bias"]}},
                state)
  assert os.listdir(tmp_path) == []


def test_refuses_bad_trees(tmp_path):
  params, state = quantized(make_params(), bits=5)
  with pytest.raises(ValueError, match=r"state quantizes \['conv/kernel'\]"):
    export.save(tmp_path / "m.inq", {"dense": params["dense"]}, state)
  with pytest.raises(TypeError, match="nested dict"):
    export.save(tmp_path / "m.inq", {**params, "list": [jnp.ones(2)]}, state)
  with pytest.raises(ValueError, match="contains '/'"):
    export.save(tmp_path / "m.inq", {**params, "a/b": jnp.ones(2)}, state)
  with pytest.raises(TypeError, match="INQState"):
    export.save(tmp_path / "m.inq", params, None)
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- damaged files


def split_file(path):
  blob = open(path, "rb").read()
  n = _packing.PREFIX.size
  header_len = _packing.PREFIX.unpack(blob[:n])[2]
  return json.loads(blob[n:n + header_len]), bytearray(blob[n + header_len:])


def write_file(path, header, data):
  """Rewrites a file with valid CRCs everywhere: only semantic checks can object."""
  for e in header["leaves"]:
    e["crc32"] = _packing.crc32(bytes(data[e["offset"]:e["offset"] + e["length"]]))
  raw = json.dumps(header).encode()
  n = _packing.PREFIX.size + len(raw) + len(data)
  with open(path, "wb") as f:
    f.write(_packing.prefix(len(raw), n, _packing.crc32(raw)) + raw + bytes(data))


@pytest.fixture
def saved(tmp_path):
  params, state = quantized(make_params(), bits=5)
  path = tmp_path / "m.inq"
  export.save(path, params, state, extras={"batch_stats": {"m": jnp.ones(3)}}, compress=False)
  return path


def test_truncated_file(saved):
  blob = saved.read_bytes()
  for cut in (0, 3, 20, _packing.PREFIX.size + 10, len(blob) - 1):
    saved.write_bytes(blob[:cut])
    with pytest.raises(ValueError, match=f"{re.escape(str(saved))}: truncated"):
      export.load(saved)


def test_wrong_magic_and_version(saved):
  blob = saved.read_bytes()
  saved.write_bytes(b"PK\x03\x04" + blob[4:])
  with pytest.raises(ValueError, match=f"{re.escape(str(saved))}: not an inq_jax export"):
    export.load(saved)
  header, data = split_file_from(blob, saved)
  raw = json.dumps(header).encode()
  n = _packing.PREFIX.size + len(raw) + len(data)
  saved.write_bytes(_packing.prefix(len(raw), n, _packing.crc32(raw), version=2) + raw + data)
  with pytest.raises(ValueError, match=f"{re.escape(str(saved))}: format version 2; this reader supports "
                     "version 1"):
    export.load(saved)


def split_file_from(blob, path):
  path.write_bytes(blob)
  return split_file(path)


@pytest.mark.parametrize("where", ["prefix", "header", "code", "float", "extras", "trailer"])
def test_corrupted_byte(saved, where):
  blob = bytearray(saved.read_bytes())
  header, _ = split_file(saved)
  start = len(blob) - sum(e["length"] for e in header["leaves"])
  by_path = {e["path"]: e for e in header["leaves"]}
  pos = {"prefix": 14, "header": _packing.PREFIX.size + 5,
         "code": start + by_path["conv/kernel"]["offset"] + 3,
         "float": start + by_path["conv/bias"]["offset"] + 1,
         "extras": start + by_path["batch_stats/m"]["offset"]}.get(where)
  if where == "trailer":
    blob += b"\0"
  else:
    blob[pos] ^= 0x10
  saved.write_bytes(bytes(blob))
  with pytest.raises(ValueError, match=f"{re.escape(str(saved))}: .*(corrupt|CRC|truncated|unexpected bytes)"):
    export.load_with_extras(saved)
  with pytest.raises(ValueError, match=re.escape(str(saved))):
    export.read_codes(saved)


def test_invalid_code_with_recomputed_crc_is_refused(saved):
  header, data = split_file(saved)
  entry = next(e for e in header["leaves"] if e["path"] == "dense/kernel")
  assert entry["layout"] == "packed"
  # The first code's low 4 bits: m = 15 > 2^(5-2) = 8 names no exponent.
  data[entry["offset"]] = (data[entry["offset"]] & 0xE0) | 0x0F
  write_file(saved, header, data)
  with pytest.raises(ValueError, match=r"dense/kernel: code 15 at index \(0, 0\) is not in "
                     "the 5-bit codebook"):
    export.load(saved)
  codes = export.read_codes(saved)["dense/kernel"]  # readable, but flagged by valid_codes
  assert not _packing.valid_codes(codes.codes, codes.n1, 5)[0, 0]


@pytest.mark.parametrize("n1", [400, 2000, -1100, -120, 2 ** 70, -(2 ** 70)])
def test_n1_outside_the_dtype_is_refused(saved, n1):
  # 2^2000 and 2^-1100 are inf and 0 in float64 itself: a float guard would
  # pass them and decode every weight to +-inf or +-0. Compared as ints.
  header, data = split_file(saved)
  entry = next(e for e in header["leaves"] if e["path"] == "dense/kernel")
  entry["n1"] = n1
  write_file(saved, header, data)
  pattern = (r"dense/kernel \(leaf \d\): (codebook 2\^-?\d+\.\.2\^-?\d+ does not fit "
             r"float32, whose normal powers of two are 2\^-126\.\.2\^127|n1 is )")
  with pytest.raises(ValueError, match=re.escape(str(saved)) + ": " + pattern):
    export.load(saved)


@pytest.mark.parametrize("extra", [1, -1])
def test_read_header_refuses_a_packed_section_one_byte_off(saved, extra):
  # A packed section is exactly ceil(n * b / 8) bytes; one byte more or less
  # is refused by the header check itself, before any section is read.
  header, data = split_file(saved)
  entry = next(e for e in header["leaves"] if e["path"] == "dense/kernel")
  assert entry["layout"] == "packed" and entry["length"] == 250  # 400 5-bit codes
  end = entry["offset"] + entry["length"]
  data[end:end] = b"\0" if extra > 0 else b""
  if extra < 0:
    del data[end - 1]
  entry["length"] += extra
  for e in header["leaves"]:
    if e["offset"] > entry["offset"]:
      e["offset"] += extra
  write_file(saved, header, data)
  want = (re.escape(f"{saved}: dense/kernel (leaf ") + r"\d+" +
          re.escape(f"): a packed section of {250 + extra} bytes cannot hold 400 5-bit "
                    "codes (shape (40, 10))"))
  for read in (export.read_header, export.inspect, export.read_codes, export.load):
    with pytest.raises(ValueError, match=want):
      read(saved)


def test_save_refuses_a_codebook_outside_the_dtype(tmp_path):
  params, state = quantized(make_params(jnp.float16), bits=5)
  # n2 = -17 lies below float16's smallest normal power, 2^-14.
  state = dataclasses.replace(state, exponents={**state.exponents,
                                                "dense/kernel": jnp.int32(-10)})
  params = {**params, "dense": {**params["dense"],
                                "kernel": jnp.zeros((40, 10), jnp.float16)}}
  with pytest.raises(ValueError, match=r"dense/kernel: codebook 2\^-17\.\.2\^-10 does not "
                     "fit float16"):
    export.save(tmp_path / "m.inq", params, state)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [np.complex64, np.dtype("datetime64[s]"), np.dtype("V4"),
                                   object])
def test_save_refuses_dtypes_the_reader_refuses(tmp_path, dtype):
  params, state = quantized(make_params(), bits=5)
  odd = np.zeros(3, dtype)
  with pytest.raises(TypeError, match=r"extras/odd|batch_stats/odd"):
    export.save(tmp_path / "m.inq", params, state, extras={"batch_stats": {"odd": odd}})
  assert os.listdir(tmp_path) == []


def test_save_writes_every_allowed_raw_dtype(tmp_path):
  params, state = quantized(make_params(), bits=5)
  extras = {"stats": {name: np.arange(3).astype(jnp.dtype(name))
                      for name in export.RAW_DTYPES}}
  export.save(tmp_path / "m.inq", params, state, extras=extras)
  _, back = export.load_with_extras(tmp_path / "m.inq")
  for name, value in extras["stats"].items():
    assert back["stats"][name].dtype == value.dtype
    assert back["stats"][name].tobytes() == value.tobytes()


def test_stale_temporaries_are_removed(tmp_path):
  params, state = quantized(make_params(), bits=5)
  out = tmp_path / "m.inq"
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()  # a PID that no longer runs
  (tmp_path / f"m.inq.tmp{dead.pid}").write_bytes(b"half a file")
  (tmp_path / f"m.inq.tmp{os.getpid()}").write_bytes(b"ours, from a failed save")
  alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    (tmp_path / f"m.inq.tmp{alive.pid}").write_bytes(b"being written right now")
    (tmp_path / "other.inq.tmp1").write_bytes(b"another output's")
    export.save(out, params, state)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.inq", f"m.inq.tmp{alive.pid}",
                                                   "other.inq.tmp1"])
  finally:
    alive.kill()
    alive.wait()
  assert_bit_identical(params, export.load(out))


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "directory"])
def test_only_regular_files_are_read(tmp_path, kind):
  path = {"fifo": tmp_path / "m.inq", "dev_zero": "/dev/zero", "directory": tmp_path}[kind]
  if kind == "fifo":
    os.mkfifo(path)
  with pytest.raises(ValueError, match=re.escape(f"{path}: not a regular file")):
    export.load(path)
  with pytest.raises(ValueError, match=re.escape(f"{path}: not a regular file")):
    export.read_header(path)


def test_missing_file(tmp_path):
  with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'no.inq'}: does not exist")):
    export.load(tmp_path / "no.inq")


# ------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(0, 300), zero_frac=st.floats(0, 1),
       seed=st.integers(0, 2**31 - 1))
def test_pack_and_sections_round_trip(bits, n, zero_frac, seed):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, 1 << bits, n).astype(np.uint8)
  codes[rng.random(n) < zero_frac] = 0
  packed = _packing.pack(codes, bits)
  assert len(packed) == _packing.packed_size(n, bits)
  np.testing.assert_array_equal(_packing.unpack(packed, n, bits), codes)
  for layout in _packing.QUANTIZED_LAYOUTS:
    data = _packing.encode_layout(codes, bits, layout)
    np.testing.assert_array_equal(_packing.decode_section(data, layout, n, bits), codes)


def test_bit_order_is_little_endian():
  # Codes 1, 2, 3 at 3 bits, each LSB first: stream bits 100 010 110, stream bit i
  # is bit i % 8 of byte i // 8 -> bytes 0b11010001, 0b00000000.
  assert _packing.pack(np.array([1, 2, 3], np.uint8), 3) == bytes([0b11010001, 0])
  assert _packing.pack(np.array([5, 6], np.uint8), 4) == bytes([0x65])


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_codes_cover_the_codebook(bits):
  n1 = 3
  k = np.arange(n1 + 1 - 2 ** (bits - 2), n1 + 1)
  values = np.concatenate([[0.0, -0.0], 2.0 ** k, -(2.0 ** k)])
  codes, valid = _packing.encode(values, n1, bits)
  assert valid.all() and len(set(codes.tolist())) == len(values)
  back = _packing.decode(codes, n1, bits)
  assert back.tobytes() == values.tobytes()
  assert codes.max() < 1 << bits
  all_codes = np.arange(1 << bits, dtype=np.uint8)
  assert _packing.valid_codes(all_codes, n1, bits).sum() == 2 * 2 ** (bits - 2) + 2
  assert _packing.valid_codes(all_codes, inq.ZERO_CODEBOOK, bits).sum() == 2  # +-0
  _, valid = _packing.encode(np.array([2.0 ** (n1 + 1), 0.75, 2.0 ** (k[0] - 1)]), n1, bits)
  assert not valid.any()
