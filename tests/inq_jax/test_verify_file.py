"""python -m inq_jax.verify_file: the per-layer table, exit codes, damaged and tampered files."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _packing, export, verify_file
from inq_jax import quantize as inq

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export_model(path, bits=5, granularity="layer", compress=False):
  k = jax.random.split(jax.random.key(0), 2)
  params = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 8)) * 0.3,
                     "bias": jnp.linspace(-1, 1, 8)},
            "dense": {"kernel": jax.random.normal(k[1], (40, 10)) * 0.05}}
  state = inq.init(params, inq.INQConfig(bits=bits, granularity=granularity))
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  export.save(path, params, state, compress=compress)
  return params, state


def rewrite(path, edit):
  """Applies `edit(header, data)` and rewrites every CRC so only semantics can object."""
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


def entry(header, path):
  return next(e for e in header["leaves"] if e["path"] == path)


@pytest.mark.parametrize("granularity", ["layer", "channel"])
def test_table_and_exit_zero(tmp_path, capsys, granularity):
  params, state = export_model(tmp_path / "m.inq", bits=4, granularity=granularity)
  assert verify_file.main([str(tmp_path / "m.inq")]) == 0
  out = capsys.readouterr().out
  lines = out.splitlines()
  assert lines[1].split() == ["path", "weights", "bits", "distinct", "n1", "n2", "zero",
                              "layout", "bytes", "in", "codebook"]
  rows = {l.split()[0]: l.split() for l in lines[3:5]}
  assert sorted(rows) == ["conv/kernel", "dense/kernel"]
  summary = inq.verify(params, state)
  for path, row in rows.items():
    w = np.asarray(params[path.split("/")[0]]["kernel"])
    assert row[1] == str(w.size) and row[2] == "4" and row[-1] == "yes"
    assert int(row[3]) == np.unique(w).size == summary[path].distinct_values
    if granularity == "layer":
      assert int(row[3]) <= 9
    assert float(row[6]) == pytest.approx(np.mean(w == 0), abs=1e-3)
    n1 = np.asarray(state.exponents[path])
    if granularity == "layer":
      assert row[4:6] == [str(int(n1)), str(int(n1) - 3)]
    elif n1.min() < n1.max():
      assert row[4] == f"{n1.min()}..{n1.max()}"
  assert "OK: the file loads and every quantized weight is in its codebook" in out
  assert "1 raw leaves" in out


def test_takes_a_file_not_a_workdir(tmp_path, capsys):
  export_model(tmp_path / "model.inq")
  assert verify_file.main([str(tmp_path)]) == 1  # a directory is not a file
  err = capsys.readouterr().err
  assert f"{tmp_path}: not a regular file" in err
  assert "experiments" not in err  # no hints about the experiments' layout
  assert verify_file.main([str(tmp_path / "model.inq")]) == 0
  assert str(tmp_path / "model.inq") in capsys.readouterr().out


def test_edited_float_leaf_is_flagged(tmp_path, capsys):
  export_model(tmp_path / "m.inq")
  header = export.read_header(tmp_path / "m.inq")
  blob = bytearray((tmp_path / "m.inq").read_bytes())
  start = len(blob) - sum(e["length"] for e in header["leaves"])
  blob[start + entry(header, "conv/bias")["offset"] + 2] ^= 0x01
  (tmp_path / "m.inq").write_bytes(bytes(blob))
  assert verify_file.main([str(tmp_path / "m.inq")]) == 1
  err = capsys.readouterr().err
  assert "conv/bias: corrupt section, CRC32 mismatch" in err and str(tmp_path) in err


@pytest.mark.parametrize("compress", [False, True])
def test_tampered_code_with_recomputed_crc_is_flagged(tmp_path, capsys, compress):
  export_model(tmp_path / "m.inq", bits=5, compress=compress)

  def edit(header, data):
    e = entry(header, "dense/kernel")
    codes = export.read_codes(tmp_path / "m.inq")["dense/kernel"].codes.reshape(-1).copy()
    codes[7] = 0b01100  # m = 12 > 2^(5-2) = 8: names no exponent of the codebook
    sections = _packing.encode_sections(codes, 5, (e["layout"],))
    new = sections[e["layout"]]
    old_len = e["length"]
    data[e["offset"]:e["offset"] + old_len] = new
    for other in header["leaves"]:
      if other["offset"] > e["offset"]:
        other["offset"] += len(new) - old_len
    e["length"] = len(new)

  rewrite(tmp_path / "m.inq", edit)
  assert verify_file.main([str(tmp_path / "m.inq")]) == 1
  captured = capsys.readouterr()
  assert "dense/kernel: 1 of 400 codes are outside the 5-bit codebook" in captured.err
  assert "first code 12 at index (0, 7)" in captured.err
  assert "NO (1)" in captured.out
  with pytest.raises(ValueError, match=r"dense/kernel: code 12 at index \(0, 7\)"):
    export.load(tmp_path / "m.inq")


def test_nonzero_code_in_zero_codebook_is_flagged(tmp_path, capsys):
  export_model(tmp_path / "m.inq", bits=3)

  def edit(header, data):
    entry(header, "dense/kernel")["n1"] = inq.ZERO_CODEBOOK  # codebook {0}: any m != 0 is bad

  rewrite(tmp_path / "m.inq", edit)
  assert verify_file.main([str(tmp_path / "m.inq")]) == 1
  assert "dense/kernel" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncate", "magic", "missing"])
def test_unreadable_files(tmp_path, capsys, damage):
  path = tmp_path / "m.inq"
  export_model(path)
  blob = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(blob[:-5])
  elif damage == "magic":
    path.write_bytes(b"\0" + blob[1:])
  else:
    path.unlink()
  assert verify_file.main([str(path)]) == 1
  err = capsys.readouterr().err
  assert {"truncate": "truncated", "magic": "not an inq_jax export",
          "missing": "does not exist"}[damage] in err


def test_command_line(tmp_path):
  export_model(tmp_path / "m.inq", bits=2)
  run = subprocess.run([sys.executable, "-m", "inq_jax.verify_file", str(tmp_path / "m.inq")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "2-bit" in run.stdout and "OK" in run.stdout
  for line in run.stdout.splitlines()[3:5]:
    assert int(line.split()[3]) <= 3  # ternary
  (tmp_path / "m.inq").write_bytes(b"junk")
  run = subprocess.run([sys.executable, "-m", "inq_jax.verify_file", str(tmp_path / "m.inq")],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and "not an inq_jax export" in run.stderr


def test_a_decoder_that_disagrees_with_the_codes_is_caught(tmp_path, monkeypatch, capsys):
  """The re-encode check: decoded weights that are valid codebook values, but not the stored codes.

  Every weight's sign flipped stays in the codebook, so only encoding the
  decoded weights back and comparing with the stored codes can tell.
  """
  path = str(tmp_path / "m.inq")
  export_model(path)
  real = _packing.decode_values
  monkeypatch.setattr(_packing, "decode_values",
                      lambda codes, n1, bits, dtype: -real(codes, n1, bits, dtype))
  assert verify_file.main([path]) == 1
  err = capsys.readouterr().err
  assert "the decoded weights do not encode back to the stored codes" in err
  assert path in err
