"""`export.read_header` refuses, on the header alone, what the header can tell is wrong.

Tools read the header without decoding the sections (e.g.
experiments.tools.evaluate reports the file's bits from it), so a check that
belongs to the header must not be left to the decoder. Written against the
public reader API, so that it outlives the split of inq_jax/export.py.
"""

import json

import jax
import jax.numpy as jnp
import pytest

from inq_jax import _packing, export, verify_file
from inq_jax import quantize as inq


def export_model(path):
  k = jax.random.split(jax.random.key(3), 2)
  params = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 8)) * 0.3,
                     "bias": jnp.linspace(-1, 1, 8)},
            "dense": {"kernel": jax.random.normal(k[1], (41, 10)) * 0.05}}
  state = inq.init(params, inq.INQConfig(bits=5))
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  export.save(path, params, state, compress=False)  # every quantized leaf packed


def rewrite(path, edit):
  """Applies `edit(header, data)` and rewrites every CRC and length: only semantics can object."""
  blob = open(path, "rb").read()
  n = _packing.PREFIX.size
  header_len = _packing.PREFIX.unpack(blob[:n])[2]
  header, data = json.loads(blob[n:n + header_len]), bytearray(blob[n + header_len:])
  edit(header, data)
  for e in header["leaves"]:
    e["crc32"] = _packing.crc32(bytes(data[e["offset"]:e["offset"] + e["length"]]))
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(_packing.prefix(len(raw), n + len(raw) + len(data), _packing.crc32(raw)))
    f.write(raw + bytes(data))


def resize_section(leaf_path, delta):
  """An edit that makes one section `delta` bytes longer (zeros) or shorter, moving the rest."""
  def edit(header, data):
    entries = header["leaves"]
    i = next(i for i, e in enumerate(entries) if e["path"] == leaf_path)
    end = entries[i]["offset"] + entries[i]["length"]
    if delta > 0:
      data[end:end] = bytes(delta)
    else:
      del data[end + delta:end]
    entries[i]["length"] += delta
    for e in entries[i + 1:]:
      e["offset"] += delta
  return edit


@pytest.mark.parametrize("leaf", ["conv/kernel", "dense/kernel"])
@pytest.mark.parametrize("delta", [1, 8, -1])
def test_a_packed_section_of_the_wrong_length_is_refused_by_the_header(tmp_path, leaf, delta):
  path = str(tmp_path / "m.inq")
  export_model(path)
  entry = next(e for e in export.read_header(path)["leaves"] if e["path"] == leaf)
  assert entry["layout"] == "packed"
  rewrite(path, resize_section(leaf, delta))
  with pytest.raises(ValueError, match=rf"{leaf} \(leaf \d\): a packed section of "
                                       rf"{entry['length'] + delta} bytes cannot hold"):
    export.read_header(path)
  with pytest.raises(ValueError, match="cannot hold"):
    export.load(path)
  assert verify_file.main([path]) == 1


def test_the_unedited_file_passes_the_same_checks(tmp_path):
  path = str(tmp_path / "m.inq")
  export_model(path)
  rewrite(path, resize_section("dense/kernel", 0))
  assert export.read_header(path)["bits"] == 5
  export.load(path)
  assert verify_file.main([path]) == 0
