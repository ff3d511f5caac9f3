"""export.save on every tree INQ accepts, a failing disk, and SHA-256 against deliberate edits."""

import errno
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from inq_jax import _export_writer, _packing, export, verify_file
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_inq(params, config):
  state = inq.init(params, config)
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  inq.verify(params, state)
  return params, state


def small_model(seed=0):
  k = jax.random.split(jax.random.key(seed), 2)
  params = {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 8)) * 0.3,
                     "bias": jnp.linspace(-1, 1, 8)},
            "dense": {"kernel": jax.random.normal(k[1], (40, 10)) * 0.05}}
  return run_inq(params, inq.INQConfig(bits=5))


def snapshot(tree):
  """{path: (dtype, shape, bytes)}: equal snapshots are bit-identical trees."""
  return {path: (np.asarray(x).dtype, np.shape(x), np.asarray(x).tobytes())
          for path, x in leaves_with_paths(tree)[0]}


# ------------------------------------------------------------- every tree INQ accepts


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_scalar_and_empty_quantized_leaves(tmp_path, capsys, dtype):
  # A 0-d kernel (a learned gain) selected by `include`, and an empty one:
  # init, advance and verify accept both, so save must too.
  params = {"gain": jnp.asarray(0.3, dtype), "neg": jnp.asarray(-1.7, dtype),
            "empty": {"kernel": jnp.zeros((0, 3), dtype)},
            "dense": {"kernel": (jax.random.normal(jax.random.key(0), (4, 3)) * 0.5).astype(dtype),
                      "bias": jnp.asarray(2.0, dtype)}}
  params, state = run_inq(params, inq.INQConfig(bits=3, include=r"^gain$|^neg$|kernel$"))
  assert set(state.exponents) == {"gain", "neg", "empty/kernel", "dense/kernel"}
  stats = export.save(tmp_path / "m.inq", params, state)
  assert stats["quantized_weights"] == 1 + 1 + 0 + 12
  back = export.load(tmp_path / "m.inq")
  assert snapshot(params) == snapshot(back)
  assert all(isinstance(back[k], np.ndarray) and back[k].shape == () for k in ("gain", "neg"))
  assert float(back["gain"]) == 0.25 and float(back["neg"]) == -2.0
  codes = export.read_codes(tmp_path / "m.inq")
  assert codes["gain"].codes.shape == () and codes["empty/kernel"].codes.shape == (0, 3)
  assert verify_file.main([str(tmp_path / "m.inq")]) == 0
  out = capsys.readouterr().out
  assert "gain " in out and "neg " in out


def test_scalar_leaf_outside_its_codebook_names_it(tmp_path):
  params, state = run_inq({"gain": jnp.float32(0.3), "w": {"kernel": jnp.ones((2, 2))}},
                          inq.INQConfig(bits=3, include=r"^gain$|kernel$"))
  with pytest.raises(ValueError, match=r"gain: weight 0\.3\d* at index \(\) is not in its "
                     r"3-bit codebook"):
    export.save(tmp_path / "m.inq", {**params, "gain": jnp.float32(0.3)}, state)
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- a failing disk


class _FullDisk(io.FileIO):
  """A file that takes `room` bytes, then fails like a full disk."""

  room = 0

  def write(self, data):
    if len(data) > _FullDisk.room:
      if _FullDisk.room:
        super().write(bytes(data)[:_FullDisk.room])
      _FullDisk.room = 0
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    _FullDisk.room -= len(data)
    return super().write(data)


def _full_disk(monkeypatch, room, only=""):
  """Every file the writer opens whose name contains `only` fills after `room` bytes."""
  real_open = open

  def fake_open(name, mode="r", *args, **kwargs):
    if only in os.fspath(name) and "w" in mode:
      _FullDisk.room = room
      return _FullDisk(name, "w")
    return real_open(name, mode, *args, **kwargs)

  monkeypatch.setattr(_export_writer, "open", fake_open, raising=False)


def _one_clear_error(e, path):
  text = str(e.value)
  assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
  assert text.count(str(path)) >= 1 and "No space left on device" in text, text
  assert e.value.__cause__ is None and e.value.__suppress_context__, "a chained traceback"
  return text


@pytest.mark.parametrize("room", [0, 10, 700])
def test_full_disk_keeps_the_old_file(tmp_path, monkeypatch, room):
  params, state = small_model()
  path = tmp_path / "m.inq"
  old = export.save(path, params, state, sha256_file=True)
  before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  other, other_state = small_model(seed=1)
  _full_disk(monkeypatch, room)
  with pytest.raises(OSError) as e:
    export.save(path, other, other_state, sha256_file=True)
  text = _one_clear_error(e, path)
  assert text.startswith(f"[Errno 28] {path}: cannot write the export")
  assert "is as it was" in text
  assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
  assert export.file_sha256(path) == old["sha256"]
  assert snapshot(params) == snapshot(export.load(path))


def test_full_disk_while_writing_the_checksum_keeps_both_old_files(tmp_path, monkeypatch):
  params, state = small_model()
  path = tmp_path / "m.inq"
  export.save(path, params, state, sha256_file=True)
  before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
  _full_disk(monkeypatch, 5, only=".sha256.tmp")
  other, other_state = small_model(seed=1)
  with pytest.raises(OSError) as e:
    export.save(path, other, other_state, sha256_file=True)
  text = _one_clear_error(e, f"{path}.sha256")
  assert text.startswith(f"[Errno 28] {path}.sha256: cannot write the export")
  assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before


def test_fsync_failure_is_a_write_failure(tmp_path, monkeypatch):
  # Filesystems that allocate late (NFS, some FUSE) report a full disk at fsync.
  path = tmp_path / "m.inq"
  path.write_bytes(b"old model")
  params, state = small_model()

  def fsync(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(os, "fsync", fsync)
  with pytest.raises(OSError) as e:
    export.save(path, params, state)
  _one_clear_error(e, path)
  assert os.listdir(tmp_path) == ["m.inq"] and path.read_bytes() == b"old model"


def test_checksum_that_cannot_be_renamed_is_not_left_stale(tmp_path, monkeypatch):
  params, state = small_model()
  path = tmp_path / "m.inq"
  export.save(path, params, state, sha256_file=True)
  other, other_state = small_model(seed=1)
  real_replace = os.replace

  def replace(src, dst):
    if os.fspath(dst).endswith(".sha256"):
      raise OSError(errno.EACCES, os.strerror(errno.EACCES))
    return real_replace(src, dst)

  monkeypatch.setattr(os, "replace", replace)
  with pytest.raises(PermissionError, match=f"{path}.sha256: cannot write the checksum file "
                     rf"\(Permission denied, EACCES\); {path} holds the new model, the old "
                     "checksum file was removed"):
    export.save(path, other, other_state, sha256_file=True)
  assert os.listdir(tmp_path) == ["m.inq"]  # no stale checksum, no temporary
  assert snapshot(other) == snapshot(export.load(path))


def test_file_size_limit_in_a_real_process(tmp_path):
  # The kernel refuses the write (RLIMIT_FSIZE: EFBIG, Python ignores SIGXFSZ)
  # part-way through the temporary, as a full disk would.
  path = tmp_path / "m.inq"
  path.write_bytes(b"old model")
  script = textwrap.dedent(f"""
      import json, resource, sys
      import jax, jax.numpy as jnp
      from inq_jax import export
      from inq_jax import quantize as inq
      params = {{"dense": {{"kernel": jax.random.normal(jax.random.key(0), (64, 64))}}}}
      state = inq.init(params, inq.INQConfig(bits=5))
      for _ in state.config.portions:
        params, state = inq.advance(params, state)
      resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
      try:
        export.save({str(path)!r}, params, state, compress=False)
      except OSError as e:
        print(json.dumps([type(e).__name__, e.errno, str(e)]))
        sys.exit(3)
  """)
  run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == 3, (run.stdout, run.stderr)
  name, code, text = json.loads(run.stdout.splitlines()[-1])
  assert (name, code) == ("OSError", errno.EFBIG)
  assert text == (f"[Errno 27] {path}: cannot write the export (File too large, EFBIG); "
                  f"nothing was replaced, {path} is as it was")
  assert os.listdir(tmp_path) == ["m.inq"] and path.read_bytes() == b"old model"


def test_sha256_file_must_be_a_bool(tmp_path):
  params, state = small_model()
  with pytest.raises(TypeError, match="sha256_file must be True or False, got 'yes'"):
    export.save(tmp_path / "m.inq", params, state, sha256_file="yes")
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------- SHA-256 against edits


def test_save_returns_the_sha256_and_writes_a_sha256sum_line(tmp_path):
  params, state = small_model()
  path = tmp_path / "m.inq"
  stats = export.save(path, params, state)
  digest = hashlib.sha256(path.read_bytes()).hexdigest()
  assert stats["sha256"] == digest == export.file_sha256(path)
  assert stats["sha256_file"] is None and os.listdir(tmp_path) == ["m.inq"]
  stats = export.save(path, params, state, sha256_file=True)
  assert stats["sha256_file"] == f"{path}.sha256"
  assert (tmp_path / "m.inq.sha256").read_text() == f"{digest}  m.inq\n"
  if shutil.which("sha256sum"):
    check = subprocess.run(["sha256sum", "-c", "m.inq.sha256"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "m.inq: OK" in check.stdout, check


def test_odd_file_names_are_escaped_as_sha256sum_does(tmp_path):
  params, state = small_model()
  path = tmp_path / "a\\b\nc.inq"
  stats = export.save(path, params, state, sha256_file=True)
  line = (tmp_path / "a\\b\nc.inq.sha256").read_text()
  assert line == f"\\{stats['sha256']}  a\\\\b\\nc.inq\n"
  assert verify_file.main([str(path), "--sha256"]) == 0
  if shutil.which("sha256sum"):
    check = subprocess.run(["sha256sum", "-c", "a\\b\nc.inq.sha256"], cwd=tmp_path,
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check


def _edit_one_code_keeping_it_valid(path):
  """Flips the sign of one nonzero code of dense/kernel and recomputes every CRC."""
  blob = path.read_bytes()
  n = _packing.PREFIX.size
  header_len = _packing.PREFIX.unpack(blob[:n])[2]
  header, data = json.loads(blob[n:n + header_len]), bytearray(blob[n + header_len:])
  entry = next(e for e in header["leaves"] if e["path"] == "dense/kernel")
  codes = export.read_codes(path)["dense/kernel"].codes.reshape(-1).copy()
  i = int(np.flatnonzero(codes & 0x0F)[0])
  codes[i] ^= 0x10  # the sign bit of a 5-bit code: -w for w, still in the codebook
  section = _packing.encode_layout(codes, 5, entry["layout"])
  start = entry["offset"]
  data[start:start + entry["length"]] = section
  for e in header["leaves"]:
    if e["offset"] > start:
      e["offset"] += len(section) - entry["length"]
  entry["length"] = len(section)
  for e in header["leaves"]:
    e["crc32"] = _packing.crc32(bytes(data[e["offset"]:e["offset"] + e["length"]]))
  raw = json.dumps(header).encode()
  path.write_bytes(_packing.prefix(len(raw), n + len(raw) + len(data), _packing.crc32(raw)) +
                   raw + bytes(data))
  return np.unravel_index(i, (40, 10))


@pytest.mark.parametrize("compress", [False, True])
def test_a_crc_valid_edit_loads_but_fails_the_sha256_check(tmp_path, capsys, compress):
  params, state = small_model()
  path = tmp_path / "m.inq"
  stats = export.save(path, params, state, compress=compress, sha256_file=True)
  assert verify_file.main([str(path), "--sha256"]) == 0
  index = _edit_one_code_keeping_it_valid(path)
  # What a CRC cannot tell: the edited file is well-formed and loads.
  edited = export.load(path)
  assert edited["dense"]["kernel"][index] == -np.asarray(params["dense"]["kernel"])[index]
  capsys.readouterr()
  assert verify_file.main([str(path)]) == 0
  assert "OK: the file loads" in capsys.readouterr().out
  # What the published SHA-256 tells, in each form --sha256 takes.
  sidecar = f"{path}.sha256"
  for argv in ([str(path), "--sha256"], [str(path), "--sha256", sidecar],
               [str(path), "--sha256", stats["sha256"]],
               [str(path), "--sha256", stats["sha256"].upper()]):
    assert verify_file.main(argv) == 1, argv
    err = capsys.readouterr().err
    assert f"error: {path}: SHA-256 mismatch: the file's is {export.file_sha256(path)}" in err
    assert f"expects {stats['sha256']}; the file is not the one that was published" in err
  if shutil.which("sha256sum"):
    check = subprocess.run(["sha256sum", "-c", "m.inq.sha256"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert check.returncode != 0 and "FAILED" in check.stdout


def test_sha256_usage_errors_exit_2(tmp_path, capsys):
  params, state = small_model()
  path = tmp_path / "m.inq"
  stats = export.save(path, params, state)
  assert verify_file.main([str(path), "--sha256"]) == 2
  assert f"--sha256: {path}.sha256 does not exist" in capsys.readouterr().err
  (tmp_path / "sums").write_text("not a checksum\n")
  assert verify_file.main([str(path), "--sha256", str(tmp_path / "sums")]) == 2
  assert "line 1 is not a sha256sum line" in capsys.readouterr().err
  (tmp_path / "sums").write_text(f"{'0' * 64}  a.inq\n{'1' * 64}  b.inq\n")
  assert verify_file.main([str(path), "--sha256", str(tmp_path / "sums")]) == 2
  assert "has no line for m.inq (it lists ['a.inq', 'b.inq'])" in capsys.readouterr().err
  # A sha256sum file listing several files: the line for this one is used.
  (tmp_path / "sums").write_text(f"{'0' * 64}  a.inq\n{stats['sha256']}  dir/m.inq\n")
  assert verify_file.main([str(path), "--sha256", str(tmp_path / "sums")]) == 0
  (tmp_path / "sums").write_text(f"SHA256 (m.inq) = {stats['sha256']}\n")  # --tag style
  assert verify_file.main([str(path), "--sha256", str(tmp_path / "sums")]) == 0
  capsys.readouterr()
  assert verify_file.main([str(tmp_path / "missing.inq"), "--sha256", stats["sha256"]]) == 1
  assert "missing.inq: does not exist" in capsys.readouterr().err


def test_sha256_on_the_command_line(tmp_path):
  params, state = small_model()
  path = tmp_path / "m.inq"
  export.save(path, params, state, sha256_file=True)
  run = subprocess.run([sys.executable, "-m", "inq_jax.verify_file", str(path), "--sha256"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr
  assert "OK: SHA-256" in run.stdout
  _edit_one_code_keeping_it_valid(path)
  run = subprocess.run([sys.executable, "-m", "inq_jax.verify_file", str(path), "--sha256"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert run.returncode == 1 and "SHA-256 mismatch" in run.stderr
  assert "Traceback" not in run.stderr
