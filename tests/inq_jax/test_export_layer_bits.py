"""Per-layer bit widths (INQConfig.layer_bits) in the .inq file, verify_file and shift."""

import copy
import json
import re

import jax
import numpy as np
import pytest

from inq_jax import _packing, export, shift, verify_file
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

# conv1 and the classifier at 8 bits, fc1 ternary, the rest at the default 3.
LAYER_BITS = {"^conv1/": 8, "^fc1/": 2, "^fc2/": 8}


def lenet_like():
  k = jax.random.split(jax.random.key(0), 4)
  return {"conv1": {"kernel": jax.random.normal(k[0], (5, 5, 1, 6)) * 0.3,
                    "bias": jax.numpy.linspace(-1, 1, 6)},
          "conv2": {"kernel": jax.random.normal(k[1], (5, 5, 6, 16)) * 0.1},
          "fc1": {"kernel": jax.random.normal(k[2], (256, 120)) * 0.05},
          "fc2": {"kernel": jax.random.normal(k[3], (120, 10)) * 0.1}}


def run_inq(params, config):
  state = inq.init(params, config)
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  inq.verify(params, state)
  return params, state


def snapshot(tree):
  """{path: (dtype, shape, bytes)}: equal snapshots are bit-identical trees."""
  return {path: (np.asarray(x).dtype, np.shape(x), np.asarray(x).tobytes())
          for path, x in leaves_with_paths(tree)[0]}


@pytest.mark.parametrize("granularity", ["layer", "channel"])
@pytest.mark.parametrize("compress", [True, False])
def test_mixed_widths_round_trip_bit_for_bit(tmp_path, capsys, granularity, compress):
  params, state = run_inq(lenet_like(), inq.INQConfig(bits=3, layer_bits=LAYER_BITS,
                                                      granularity=granularity))
  path = tmp_path / "m.inq"
  stats = export.save(path, params, state, compress=compress)
  want = {"conv1/kernel": 8, "conv2/kernel": 3, "fc1/kernel": 2, "fc2/kernel": 8}
  assert stats["bits"] == 3 and stats["layer_bits"] == want
  weights = dict(leaves_with_paths(params)[0])
  sizes = {p: np.size(weights[p]) for p in want}
  assert stats["mean_bits"] == pytest.approx(
      sum(want[p] * n for p, n in sizes.items()) / sum(sizes.values()))
  assert snapshot(params) == snapshot(export.load(path))
  header = export.read_header(path)
  assert {e["path"]: e["bits"] for e in header["leaves"] if e["kind"] == "quantized"} == want
  if not compress:  # exactly b bits per weight, each leaf its own b
    for e in header["leaves"]:
      if e["kind"] == "quantized":
        assert e["length"] == _packing.packed_size(sizes[e["path"]], want[e["path"]])
  codes = export.read_codes(path)
  for p, q in codes.items():
    assert q.bits == want[p]
    n1, n2 = state.bounds(p)
    np.testing.assert_array_equal(q.n1, np.asarray(n1))
    # The shift reference reads each leaf at its own width, and agrees with
    # splitting the weights on the leaf's own codebook.
    w = np.asarray(weights[p])
    for a, b in zip(shift.from_stored(q.codes, q.n1, q.bits), shift.to_codes(w, n1, n2)):
      np.testing.assert_array_equal(a, b)
    if granularity == "layer":  # per-channel codebooks differ from channel to channel
      assert len(np.unique(w)) <= 2 ** (want[p] - 1) + 1
  capsys.readouterr()
  assert verify_file.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert ", mixed 8/3/2-bit, " in out.splitlines()[0]
  rows = {line.split()[0]: line.split() for line in out.splitlines()[3:7]}
  assert {p: int(r[2]) for p, r in rows.items()} == want
  assert f"average bits per quantized weight: {stats['mean_bits']:.3f} (code width)" in out


def test_a_width_the_config_does_not_give_is_refused(tmp_path):
  params, state = run_inq(lenet_like(), inq.INQConfig(bits=3, layer_bits=LAYER_BITS))
  path = tmp_path / "m.inq"
  export.save(path, params, state, compress=False)
  header, sections = _parse(path.read_bytes())
  header["inq"]["layer_bits"] = [["^conv1/", 8], ["^fc2/", 8]]  # fc1's 2 bits now unlisted
  path.write_bytes(_build(header, sections))
  want = (re.escape(f"{path}: fc1/kernel (leaf ") + r"\d+" +
          re.escape("): 2-bit codes in a file whose widths are [3, 8] (its bits and layer_bits)"))
  with pytest.raises(ValueError, match=want):
    export.read_header(path)


# ------------------------------------------------------------- files built by hand
#
# The reader's side of mixed widths, checked on a file spliced from a 5-bit and
# a 3-bit export of the same params (no layer_bits run needed).


def _parse(blob):
  n = _packing.PREFIX.size
  header_len = _packing.PREFIX.unpack(blob[:n])[2]
  header = json.loads(blob[n:n + header_len])
  data = blob[n + header_len:]
  return header, [data[e["offset"]:e["offset"] + e["length"]] for e in header["leaves"]]


def _build(header, sections):
  header = copy.deepcopy(header)
  offset = 0
  for e, s in zip(header["leaves"], sections):
    e.update({"offset": offset, "length": len(s), "crc32": _packing.crc32(s)})
    offset += len(s)
  raw = json.dumps(header).encode()
  data = b"".join(sections)
  return _packing.prefix(len(raw), _packing.PREFIX.size + len(raw) + len(data),
                         _packing.crc32(raw)) + raw + data


def _uniform(tmp_path, bits):
  params = {"conv": {"kernel": jax.random.normal(jax.random.key(1), (3, 3, 2, 8)) * 0.3},
            "dense": {"kernel": jax.random.normal(jax.random.key(2), (40, 10)) * 0.05}}
  state = inq.init(params, inq.INQConfig(bits=bits))
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  export.save(tmp_path / f"{bits}.inq", params, state, compress=False)
  return params, _parse((tmp_path / f"{bits}.inq").read_bytes())


@pytest.fixture
def spliced(tmp_path):
  """(path, expected params, header, sections): conv at 5 bits, dense at 3."""
  five, (header, sections) = _uniform(tmp_path, 5)
  three, (header3, sections3) = _uniform(tmp_path, 3)
  i = next(j for j, e in enumerate(header["leaves"]) if e["path"] == "dense/kernel")
  j = next(j for j, e in enumerate(header3["leaves"]) if e["path"] == "dense/kernel")
  header["leaves"][i] = header3["leaves"][j]
  sections[i] = sections3[j]
  header["inq"]["layer_bits"] = [["^dense/", 3]]
  path = tmp_path / "mixed.inq"
  path.write_bytes(_build(header, sections))
  return path, {"conv": five["conv"], "dense": three["dense"]}, header, sections


def test_reader_takes_each_leaf_at_its_own_width(spliced, capsys):
  path, want, _, _ = spliced
  assert snapshot(want) == snapshot(export.load(path))
  codes = export.read_codes(path)
  assert (codes["conv/kernel"].bits, codes["dense/kernel"].bits) == (5, 3)
  assert verify_file.main([str(path)]) == 0
  out = capsys.readouterr().out
  assert ", mixed 5/3-bit, " in out
  assert "average bits per quantized weight: 3.529 (code width)" in out  # (144*5+400*3)/544


@pytest.mark.parametrize("layer_bits, message", [
    ([], "dense/kernel (leaf 1): 3-bit codes in a 5-bit file"),
    ([["^conv/", 8]], "dense/kernel (leaf 1): 3-bit codes in a file whose widths are [5, 8]"),
    ({"^dense/": 3}, "header inq layer_bits is a dict, not a list"),
    ([["^dense/", 9]], "header inq layer_bits['^dense/'] is 9, not an integer in [2, 8]"),
    ([["^dense/", "3"]], "header inq layer_bits['^dense/'] is '3', not an integer"),
    ([["^dense/", True]], "header inq layer_bits['^dense/'] is True, not an integer"),
    ([[3, "^dense/"]], "header inq layer_bits entry [3, '^dense/'] is not a [regex, bits] pair"),
    ([["^dense/", 3, 1]], "is not a [regex, bits] pair"),
    (["^dense/"], "is not a [regex, bits] pair"),
])
def test_reader_refuses_widths_the_header_does_not_declare(spliced, layer_bits, message):
  path, _, header, sections = spliced
  header["inq"]["layer_bits"] = layer_bits
  path.write_bytes(_build(header, sections))
  with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + re.escape(message)):
    export.read_header(path)


def test_a_packed_leaf_read_at_the_wrong_width_is_refused(spliced):
  # The same packed section declared 5-bit: its size no longer fits. (A
  # compressed section of 3-bit codes re-declared 5-bit can decode to other
  # valid codes: a deliberate edit, which only a published SHA-256 reveals.)
  path, _, header, sections = spliced
  assert {e["layout"] for e in header["leaves"] if e["kind"] == "quantized"} == {"packed"}
  entry = next(e for e in header["leaves"] if e["path"] == "dense/kernel")
  entry["bits"] = 5
  path.write_bytes(_build(header, sections))
  with pytest.raises(ValueError, match=re.escape(
      f"{path}: dense/kernel (leaf 1): a packed section of 150 bytes cannot hold 400 5-bit "
      "codes")):
    export.read_header(path)
