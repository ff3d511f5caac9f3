"""Writing `.inq` files: every check first, then one atomic write (see `inq_jax.export`)."""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from inq_jax import _packing
from inq_jax._codebook import ZERO_CODEBOOK, n2_from_n1
from inq_jax._export_format import (FORMAT, MAX_HEADER_BYTES, MAX_TREE_DEPTH,
                                    QUANTIZED_DTYPES, RAW_DTYPES, SHA256_SUFFIX, n1_problem,
                                    sha256_line, type_phrase)
from inq_jax._state import INQState
from inq_jax.tree import leaves_with_paths


def _flatten(tree, what: str, prefix: str = "", depth: int = 1) -> Tuple[dict, list]:
  """(nested dict of leaf indices, [(path, array)]) of a nested dict of arrays."""
  if not isinstance(tree, Mapping):
    raise TypeError(f"{what}: expected a nested dict of arrays, got "
                    f"{type(tree).__name__} at {prefix or 'the top'}; convert NNX "
                    "state with `state.to_pure_dict()`")
  if depth > MAX_TREE_DEPTH:
    raise ValueError(f"{what}: {prefix} nests deeper than {MAX_TREE_DEPTH} levels, which "
                     "the reader refuses")
  skeleton, leaves = {}, []
  for key in sorted(tree, key=str):
    if not isinstance(key, str):
      raise TypeError(f"{what}: key {key!r} under {prefix or 'the top'} is not a string")
    if "/" in key or not key:
      raise ValueError(f"{what}: key {key!r} under {prefix or 'the top'} is empty or "
                       "contains '/', which the '/'-joined paths cannot represent")
    path = f"{prefix}/{key}" if prefix else key
    value = tree[key]
    if isinstance(value, Mapping):
      skeleton[key], sub = _flatten(value, what, path, depth + 1)
      leaves += sub
    elif isinstance(value, (list, tuple)) or value is None:
      raise TypeError(f"{what}: {path} is {type_phrase(value)}; only nested dicts of "
                      "arrays can be exported (turn lists into dicts with string keys)")
    else:
      skeleton[key] = None
      leaves.append((path, value))
  return skeleton, leaves


def _number(skeleton: dict, counter: list) -> dict:
  out = {}
  for key, value in skeleton.items():
    if value is None:
      out[key] = counter[0]
      counter[0] += 1
    else:
      out[key] = _number(value, counter)
  return out


def _host(leaf, path: str) -> np.ndarray:
  try:
    return np.asarray(leaf)
  except Exception as e:  # e.g. a non-addressable multi-host array
    raise TypeError(f"{path}: cannot fetch the leaf to the host ({e})") from None


def _little_endian(a: np.ndarray) -> bytes:
  a = np.ascontiguousarray(a)
  if sys.byteorder != "little" and a.dtype.itemsize > 1:
    a = a.view(f"u{a.dtype.itemsize}").byteswap()
  return a.tobytes()


def _quantized_section(path, w, n1, bits, compress):
  """(section bytes, header entry fields) of one quantized leaf, after every check."""
  n1_json = int(n1) if np.ndim(n1) == 0 else [int(v) for v in np.asarray(n1)]
  problem = n1_problem(np.atleast_1d(n1_json).tolist(), bits, str(w.dtype))
  if problem:
    raise ValueError(f"{path}: {problem}; nothing was written")
  codes, valid = _packing.encode(w, n1, bits)
  if not valid.all():
    idx = tuple(int(i) for i in np.argwhere(~valid)[0])
    n1_here = np.asarray(n1) if np.ndim(n1) == 0 else np.asarray(n1)[idx[-1]]
    if int(n1_here) == ZERO_CODEBOOK:
      book = "{0} (an all-zero layer or channel)"
    else:
      book = (f"{{0, +-2^k: {int(n2_from_n1(int(n1_here), bits))} <= k <= "
              f"{int(n1_here)}}}")
    raise ValueError(f"{path}: weight {float(np.asarray(w)[idx])!r} at index {idx} is not "
                     f"in its {bits}-bit codebook {book}; {int((~valid).sum())} such "
                     "weights; nothing was written")
  # Guards the exact round trip through the very table `load` decodes with.
  back = _packing.decode_values(codes, n1, bits, w.dtype)
  as_bits = f"u{w.dtype.itemsize}"  # compared as bit patterns: -0.0 is not +0.0
  if not np.array_equal(back.view(as_bits), np.asarray(w, order="C").view(as_bits)):
    raise ValueError(f"{path}: the {w.dtype} weights do not survive the code round trip")
  layout, data = _packing.encode_best(codes, bits, compress)
  return data, {"kind": "quantized", "layout": layout, "bits": bits, "n1": n1_json}


def _remove_stale_temporaries(path: str) -> None:
  """Deletes `<path>.tmp<PID>` files that no live process is writing.

  A save killed between creating its temporary and renaming it leaves one
  behind. A temporary is stale when its PID is this process (an earlier save
  here that died half-way cannot still be writing) or names no live process;
  one whose PID is alive is left alone, since another process may be saving
  the same path right now. The liveness test is local: writers on other hosts
  sharing the directory are not seen (only one process should write a path).
  """
  if os.name != "posix":  # os.kill(pid, 0) is only a liveness probe on POSIX
    return
  directory, base = os.path.split(os.path.abspath(path))
  pattern = re.compile(re.escape(base) + r"\.tmp([0-9]{1,12})\Z")
  try:
    names = os.listdir(directory)
  except OSError:
    return
  for name in names:
    match = pattern.match(name)
    if not match:
      continue
    pid = int(match.group(1))
    if pid != os.getpid() and pid > 0:
      try:
        os.kill(pid, 0)
        continue  # alive
      except PermissionError:
        continue  # alive, another user's
      except (ProcessLookupError, OverflowError):
        pass
      except OSError:
        continue
    try:
      os.remove(os.path.join(directory, name))
    except OSError:
      pass


def _reason(e: OSError) -> str:
  name = errno.errorcode.get(e.errno, "")
  return f"{e.strerror or e}" + (f", {name}" if name else "")


def _write_temporary(tmp: str, parts: List[bytes]) -> None:
  with open(tmp, "wb") as f:
    for data in parts:
      f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _sync_directory(path: str) -> None:
  """Makes the renames in `path`'s directory durable where the platform allows."""
  if os.name != "posix":
    return
  try:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems refuse fsync on a directory; the data itself is synced
  finally:
    os.close(fd)


def _write_atomically(path: str, parts: List[bytes], sidecar: Optional[str]) -> None:
  """Writes `parts` to `path` (and `sidecar`'s text beside it) without a half-written file.

  Each target is written to `<target>.tmp<PID>`, synced, and only then renamed
  over the target, the model first. Any OSError (a full disk, a file size
  limit, no permission) removes the temporaries and raises one OSError of the
  same errno naming the target, with the old files in place.
  """
  side = path + SHA256_SUFFIX
  targets = [(path, parts)] + ([(side, [sidecar.encode()])] if sidecar is not None else [])
  temps = []
  try:
    for target, data in targets:
      _remove_stale_temporaries(target)
      temps.append(f"{target}.tmp{os.getpid()}")
      try:
        _write_temporary(temps[-1], data)
      except OSError as e:
        raise OSError(e.errno, f"{target}: cannot write the export ({_reason(e)}); "
                      f"nothing was replaced, {path} is as it was") from None
    try:
      os.replace(temps[0], path)
    except OSError as e:
      raise OSError(e.errno, f"{path}: cannot replace the file ({_reason(e)}); it is as "
                    "it was") from None
    if sidecar is not None:
      try:
        os.replace(temps[1], side)
      except OSError as e:
        try:
          os.remove(side)  # an old checksum would no longer match the new model
          left = "the old checksum file was removed"
        except FileNotFoundError:
          left = "there is no checksum file"
        except OSError:
          left = "the old checksum file could not be removed and no longer matches"
        raise OSError(e.errno, f"{side}: cannot write the checksum file ({_reason(e)}); "
                      f"{path} holds the new model, {left}") from None
    _sync_directory(path)
  finally:
    for tmp in temps:
      try:
        os.remove(tmp)
      except OSError:
        pass


def save(path, params, state: INQState, *, extras: Optional[Dict[str, Any]] = None,
         compress: bool = True, sha256_file: bool = False) -> dict:
  """Writes a fully quantized model to `path` (atomically) and returns size stats.

  Args:
    path: the output file (conventionally `*.inq`); written to a temporary file
      `<path>.tmp<PID>` next to it and renamed, so a crash or a full disk never
      leaves a half-written file and keeps the old one. Temporaries of `path`
      left by killed saves (their PID no longer running) are deleted first.
    params: nested dict of arrays, the params after the last `inq.advance`
      (and any retraining). NNX: pass `nnx.state(model, nnx.Param).to_pure_dict()`.
    state: the `INQState` of the finished run; every leaf in `state.exponents`
      must be fully frozen (`state.masks` all True) and every weight in its
      codebook. Each leaf is stored at its own width,
      `state.config.bits_for(path)` (`INQConfig.layer_bits`).
    extras: optional {name: nested dict of arrays} stored raw alongside, e.g.
      {"batch_stats": variables["batch_stats"]}.
    compress: choose each quantized leaf's smallest layout (Huffman-coded
      DEFLATE for typical layers; LZMA only where a sample shows repeated
      runs); False: "packed" only.
    sha256_file: also write `<path>.sha256`, one `sha256sum` line with the
      file's SHA-256 and its base name, atomically like the model. Check it
      with `sha256sum -c` or `python -m inq_jax.verify_file FILE --sha256`.
      False leaves an existing `<path>.sha256` as it is (it then no longer
      matches).

  Returns:
    {"bytes": file size, "float32_bytes": 4 * number of param weights,
     "ratio": float32_bytes / bytes, "quantized_weights": N, "quantized_bytes":
     bytes of the quantized leaves' sections, "bits": the config's default
     width b, "layer_bits": {path: the leaf's own width}, "mean_bits": the
     average width over the quantized weights, "layouts": {path: layout},
     "sha256": the file's SHA-256 hex digest, "sha256_file": the checksum
     file's path or None}.

  Raises:
    TypeError/ValueError naming the parameter path and value, before anything
    is written: a tree that is not a nested dict of arrays, a state made for
    other params, a quantized leaf not fully frozen, a weight outside its
    codebook, a codebook outside the leaf dtype's normal numbers, or a dtype
    the format does not store (see `RAW_DTYPES`).
    OSError (with the errno of the cause) naming the file being written when
    the write fails, e.g. on a full disk; the old file is then unchanged and
    no temporary is left.

  Example:
    >>> stats = save("lenet.inq", params, state, sha256_file=True)
    >>> stats["ratio"]   # about 6.3 for 5-bit LeNet-5

  Reference: arXiv:1702.03044, Sec. 2.1.
  """
  if not isinstance(state, INQState):
    raise TypeError(f"state must be an INQState, got {type(state).__name__}")
  if not isinstance(sha256_file, bool):
    raise TypeError(f"sha256_file must be True or False, got {sha256_file!r}")
  extras = {} if extras is None else extras
  if not isinstance(extras, Mapping):
    raise TypeError(f"extras must be a dict of nested dicts, got {type(extras).__name__}")
  bits = int(state.config.bits)
  skeleton, flat = _flatten(params, "params")
  extra_skeletons, extra_flat = {}, []
  for name in sorted(extras):
    if not isinstance(name, str) or not name or "/" in name:
      raise ValueError(f"extras: name {name!r} must be a non-empty string without '/'")
    extra_skeletons[name], sub = _flatten(extras[name], f"extras[{name!r}]", depth=2)
    extra_flat += [(f"{name}/{p}", x) for p, x in sub]
  paths = {p for p, _ in flat}
  missing = sorted(set(state.exponents) - paths)
  if missing:
    raise ValueError(f"state quantizes {missing[:6]}, which are not in params (paths "
                     f"look like {sorted(paths)[:6]})")
  masks = dict(leaves_with_paths(state.masks)[0])

  entries, sections, jobs = [], [], []
  total_weights = 0
  for group, items in (("params", flat), ("extras", extra_flat)):
    for leaf_path, leaf in items:
      w = _host(leaf, leaf_path)
      entry = {"path": leaf_path, "group": group, "shape": list(w.shape),
               "dtype": str(w.dtype)}
      if group == "params":
        total_weights += w.size
      if group == "params" and leaf_path in state.exponents:
        if str(w.dtype) not in QUANTIZED_DTYPES:
          raise TypeError(f"{leaf_path}: dtype {w.dtype} is not one of {QUANTIZED_DTYPES}")
        mask = masks.get(leaf_path)
        if mask is None or np.shape(mask) != w.shape or not np.asarray(mask).all():
          frozen = 0 if mask is None else int(np.sum(np.asarray(mask)))
          raise ValueError(
              f"{leaf_path}: only {frozen} of {w.size} weights are quantized and frozen "
              f"(INQ step {int(state.step)} of {state.config.num_steps}); finish every "
              "portion with inq.advance before exporting; nothing was written")
        n1 = np.asarray(state.exponents[leaf_path]).astype(np.int64)
        jobs.append((len(entries), leaf_path, w, n1, state.config.bits_for(leaf_path)))
        sections.append(None)  # filled in below
      else:
        if str(w.dtype) not in RAW_DTYPES:
          raise TypeError(f"{leaf_path}: dtype {w.dtype} cannot be stored; the format "
                          f"keeps {RAW_DTYPES}")
        sections.append(_little_endian(w))
        entry.update({"kind": "raw", "layout": _packing.LAYOUT_RAW})
      entries.append(entry)

  # Encoding and compression release the GIL (numpy, zlib, lzma): layers run
  # in parallel, largest first so the last one to finish is small. Errors are
  # raised for the first bad leaf in file order, whatever finished first.
  order = sorted(jobs, key=lambda job: -job[2].size)
  workers = max(1, min(len(order), os.cpu_count() or 1, 8))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    futures = {job[0]: pool.submit(_quantized_section, *job[1:], compress) for job in order}
    done = {}
    for index, *_ in jobs:
      try:
        done[index] = futures[index].result()
      except BaseException:
        for f in futures.values():
          f.cancel()
        raise
  quantized_weights, quantized_bytes, code_bits, layouts, layer_bits = 0, 0, 0, {}, {}
  for index, leaf_path, w, _, leaf_bits in jobs:
    data, fields = done[index]
    entries[index].update(fields)
    sections[index] = data
    quantized_weights += w.size
    quantized_bytes += len(data)
    code_bits += leaf_bits * w.size
    layouts[leaf_path] = fields["layout"]
    layer_bits[leaf_path] = leaf_bits

  offset = 0
  for entry, data in zip(entries, sections):
    entry.update({"offset": offset, "length": len(data), "crc32": _packing.crc32(data)})
    offset += len(data)
  counter = [0]
  header = {
      "format": FORMAT, "version": _packing.VERSION, "bits": bits,
      "inq": {**state.config.to_dict(), "step": int(state.step)},
      "params": _number(skeleton, counter),
      "extras": {name: _number(s, counter) for name, s in extra_skeletons.items()},
      "leaves": entries,
  }
  header_bytes = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
  if len(header_bytes) > MAX_HEADER_BYTES:
    raise ValueError(f"the header would take {len(header_bytes)} bytes, more than the "
                     f"{MAX_HEADER_BYTES} a reader accepts; nothing was written")
  file_len = _packing.PREFIX.size + len(header_bytes) + offset
  parts = [_packing.prefix(len(header_bytes), file_len, _packing.crc32(header_bytes)),
           header_bytes] + sections
  digest = hashlib.sha256()
  for data in parts:
    digest.update(data)
  sha256 = digest.hexdigest()

  path = os.fspath(path)
  path = path if isinstance(path, str) else os.fsdecode(path)
  sidecar = sha256_line(sha256, os.path.basename(path)) if sha256_file else None
  _write_atomically(path, parts, sidecar)
  return {"bytes": file_len, "float32_bytes": 4 * total_weights,
          "ratio": 4 * total_weights / file_len, "quantized_weights": quantized_weights,
          "quantized_bytes": quantized_bytes, "bits": bits, "layer_bits": layer_bits,
          "mean_bits": code_bits / quantized_weights if quantized_weights else float(bits),
          "layouts": layouts,
          "sha256": sha256, "sha256_file": path + SHA256_SUFFIX if sha256_file else None}
