"""What a run leaves in its workdir: results.json, metrics, TensorBoard, plots.

Also where every workdir path is resolved (`path`, `is_remote`) and written
(`atomic_write`, `written_locally`), local or remote (gs://) alike.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Iterator, Optional

import jax
import numpy as np
from absl import logging
from etils import epath
from tqdm import auto as tqdm

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


def is_remote(p) -> bool:
  """Whether `p` names a remote store (gs://...) rather than a local path."""
  return "://" in str(p)


def abs_path(p) -> epath.Path:
  """`p` as an absolute epath (orbax needs absolute paths; gs:// ones already are)."""
  p = str(p)
  return epath.Path(p if is_remote(p) else os.path.abspath(p))


def atomic_write(target, text: str) -> None:
  """Writes `target` so that a reader never sees it half-written (local or gs://).

  Locally through a temporary and a rename. A remote object store already
  replaces an object atomically on upload (and has no cheap rename: gcsfs would
  copy and delete), so there the object is written directly.
  """
  target = epath.Path(target)
  if is_remote(target):
    target.write_text(text)
    return
  tmp = target.parent / (target.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(target)


def atomic_write_json(target, data) -> None:
  atomic_write(target, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def written_locally(target: str, companions=()) -> Iterator[str]:
  """A local path for a writer that only writes local files; its file ends up at `target`.

  `target` itself when it is local; for a remote one a temporary file of the
  same name, copied to `target` once the writer is done, and with it every
  file the writer put beside it whose name is the file's plus one of the
  suffixes in `companions` (e.g. ".sha256").
  """
  if not is_remote(target):
    yield target
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(target))
    yield local
    epath.Path(target).write_bytes(epath.Path(local).read_bytes())
    for suffix in companions:
      if os.path.exists(local + suffix):
        epath.Path(target + suffix).write_bytes(epath.Path(local + suffix).read_bytes())


@contextlib.contextmanager
def read_locally(source: str) -> Iterator[str]:
  """A local path holding `source`'s bytes, for a reader of local files only."""
  if not is_remote(source):
    yield source
    return
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, os.path.basename(source))
    epath.Path(local).write_bytes(epath.Path(source).read_bytes())
    yield local


def write_results(workdir: str, results: dict) -> None:
  """results.json (the contract in the README), written atomically on host 0."""
  if jax.process_index() == 0:
    atomic_write_json(abs_path(workdir) / RESULTS_FILE, results)


def read_metrics(workdir: str) -> list:
  """Every record of metrics.jsonl ([] if there is none yet)."""
  file = abs_path(workdir) / METRICS_FILE
  if not file.exists():
    return []
  return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def _tensorboardx_writer():
  """tensorboardX's SummaryWriter class, imported without importing torch.

  tensorboardX imports torch whenever it is installed, only to accept torch
  tensors, and importing torch takes seconds at every run's start. The writer
  is given Python floats, so torch is hidden while tensorboardX loads (`import
  torch` raises ImportError for that moment) unless it is loaded already.
  Imported here, not at the top, because of that hiding.
  """
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("torch", False) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """JSON lines in metrics.jsonl, and the scalars as TensorBoard events in tensorboard/.

  The file is rewritten whole at every record (it holds a few lines per epoch),
  because remote stores cannot append. A resumed run replays the interrupted
  epoch, so that epoch can appear twice; the later line is the one that counts.
  For a remote workdir the event files are written to a local temporary
  directory and copied whole into WORKDIR/tensorboard/ after every record.
  """

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._tb = self._tb_local = None
    if not self._enabled:
      return
    self._file = abs_path(workdir) / METRICS_FILE
    self._lines = (self._file.read_text().splitlines() if self._file.exists() else [])
    self._tb_dir = abs_path(workdir) / "tensorboard"
    try:
      summary_writer = _tensorboardx_writer()
    except ImportError:  # TensorBoard events are a convenience, not the record
      logging.warning("tensorboardX not installed; writing metrics.jsonl only")
      return
    if is_remote(workdir):
      self._tb_local = epath.Path(tempfile.mkdtemp(prefix="inq_tensorboard_"))
    self._tb = summary_writer(str(self._tb_local or self._tb_dir))

  def write(self, step: int, **scalars) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "time": round(time.time(), 3), **scalars}
    self._lines.append(json.dumps(record))
    atomic_write(self._file, "\n".join(self._lines) + "\n")
    if self._tb is not None:
      tag_prefix = str(scalars.get("stage", ""))
      for key, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{tag_prefix}/{key}" if tag_prefix else key, value, step)
      self._tb.flush()
      self._upload_events()

  def _upload_events(self) -> None:
    """Copies the local event files of a remote workdir into WORKDIR/tensorboard/."""
    if self._tb_local is None:
      return
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for local in self._tb_local.iterdir():
      (self._tb_dir / local.name).write_bytes(local.read_bytes())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._upload_events()
      self._tb = None
    if self._tb_local is not None:
      shutil.rmtree(self._tb_local, ignore_errors=True)
      self._tb_local = None


def _save_figure(fig, target: epath.Path) -> str:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  target.write_bytes(buffer.getvalue())
  return str(target)


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only, no display).

  Imported on first use, not at the top: pyplot takes about a second to
  import (measured), which only the plots at the end of a run need, and the
  backend is then chosen only by code that draws.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def progress_bar(total: int, desc: str):
  """A tqdm bar on a terminal; nothing (plain log lines instead) otherwise."""
  return tqdm.tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                   disable=not sys.stderr.isatty() or jax.process_index() != 0)


def plot_accuracy(workdir: str, results: dict) -> Optional[str]:
  """accuracy.png: test accuracy after the baseline and every INQ phase, before and after retraining."""
  plt = pyplot()
  labels = ["fp32"] + [f"{p['portion']:g}" for p in results["phases"]]
  acc = [results["baseline"]["test_accuracy"]] + [p["test_accuracy"] for p in results["phases"]]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(range(len(acc)), [100 * a for a in acc], "o-", label="after retraining")
  quantized = [p.get("quantized_test_accuracy") for p in results["phases"]]
  if all(q is not None for q in quantized):  # what each quantization step cost at once
    ax.plot(range(1, len(acc)), [100 * q for q in quantized], "x", color="tab:red",
            label="right after quantizing")
  ax.axhline(100 * acc[0], color="gray", ls="--", lw=0.8, label="fp32 baseline")
  ax.set_xticks(range(len(acc)), labels)
  ax.set_xlabel("accumulated portion quantized")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(f"INQ {bits_label(results.get('final') or {})}: {results['config']['model']} "
               f"on {results['config']['dataset']['name']}")
  ax.grid(alpha=0.3)
  ax.legend(loc="best", fontsize=8)
  fig.subplots_adjust(left=0.11, right=0.98, bottom=0.15, top=0.9)  # not tight_layout: slow
  out = _save_figure(fig, abs_path(workdir) / "accuracy.png")
  plt.close(fig)
  return out


def weight_histogram(weights: np.ndarray, bins: int = 200) -> dict:
  """What `plot_weights` draws of the pretrained weights: a histogram, not the weights.

  Kept in the workdir from INQ's start to the end of the run; a copy of the
  weights themselves would be the size of the largest layer (400 MB for
  VGG-16's fc6).
  """
  weights = np.ravel(np.asarray(weights, np.float32))
  lim = float(np.abs(weights).max()) * 1.1 or 1.0
  counts, edges = np.histogram(weights, bins=bins, range=(-lim, lim))
  return {"counts": counts, "edges": edges, "size": weights.size}


def plot_weights(workdir: str, name: str, before: dict, after: np.ndarray, n1, n2) -> str:
  """weights.png: one layer's weights before (`weight_histogram`) and after INQ, codebook marked."""
  plt = pyplot()
  after = np.ravel(after)
  fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  edges = np.asarray(before["edges"])
  lim = float(edges[-1])
  # One filled outline, not 200 bar patches, and fixed margins instead of
  # tight_layout: every run draws this figure, and both take several times longer.
  axes[0].stairs(np.asarray(before["counts"]), edges, fill=True, color="tab:blue")
  axes[0].set_title(f"{name}: pretrained float weights ({int(before['size'])} weights)")
  values, counts = np.unique(after, return_counts=True)
  axes[1].bar(values, counts, width=lim / 100, color="tab:orange")
  n1_max, n2_min = int(np.max(n1)), int(np.min(n2))
  marks = [s * 2.0 ** k for k in range(n2_min, n1_max + 1) for s in (-1, 1)]
  for ax in axes:
    ax.vlines(marks, 0, 1, transform=ax.get_xaxis_transform(), color="k", lw=0.5, alpha=0.4)
  axes[1].set_title(f"after INQ: {len(values)} distinct values; lines mark "
                    f"+-2^k, {n2_min} <= k <= {n1_max}")
  axes[1].set_yscale("log")
  axes[1].set_xlabel("weight value")
  fig.subplots_adjust(left=0.1, right=0.97, bottom=0.1, top=0.93, hspace=0.3)
  out = _save_figure(fig, abs_path(workdir) / "weights.png")
  plt.close(fig)
  return out


def codebook_entry(fit: dict) -> dict:
  """results.json's "codebook": {path: {"bits", "n1", "zero_fraction", "relative_error"}}.

  From `inq_jax.quantize.codebook_fit` of the weights INQ starts from: what
  rounding every pretrained weight at once would do (n1 is the largest of a
  per-channel codebook's; bits the layer's own width).
  """
  return {path: {"bits": int(f.bits), "n1": int(np.max(f.n1)),
                 "zero_fraction": f.zero_share, "relative_error": f.relative_error}
          for path, f in fit.items()}


def bits_entry(widths: dict) -> dict:
  """results.json's final "layer_bits" and "mean_bits", from {path: (bits, weights)}.

  "layer_bits": every quantized leaf's own width; "mean_bits": the average
  width per quantized weight (each leaf weighted by its number of weights),
  what a model of mixed widths costs per weight.
  """
  total = sum(n for _, n in widths.values())
  mean = sum(b * n for b, n in widths.values()) / total if total else float("nan")
  return {"layer_bits": {p: int(b) for p, (b, _) in widths.items()}, "mean_bits": mean}


def mixed_widths(final: dict) -> bool:
  """Whether a finished run's layers have different widths from its `bits`."""
  return any(b != final.get("bits") for b in (final.get("layer_bits") or {}).values())


def bits_label(final: dict) -> str:
  """'3-bit', or for mixed widths '3-bit (mixed, 3.06 bits/weight)': for titles and lines."""
  bits = final.get("bits", "")
  if not mixed_widths(final):
    return f"{bits}-bit"
  return f"{bits}-bit (mixed, {final['mean_bits']:.2f} bits/weight)"


def summary_lines(results: dict) -> list:
  """Human-readable lines for the end of a run (and for a finished run's rerun)."""
  lines = [f"baseline (fp32): test accuracy {100 * results['baseline']['test_accuracy']:.2f}%"]
  for i, p in enumerate(results["phases"]):
    lines.append(f"phase {i + 1}: portion {p['portion']:g}, test accuracy "
                 f"{100 * p['quantized_test_accuracy']:.2f}% quantized -> "
                 f"{100 * p['test_accuracy']:.2f}% retrained, train loss "
                 f"{p['train_loss']:.4f}, {p['seconds']:.1f}s")
  f = results.get("final")
  if f:
    lines.append(f"final {bits_label(f)}: test accuracy {100 * f['test_accuracy']:.2f}%, "
                 f"all_pow2={f['all_pow2']}, max_distinct_values={f['max_distinct_values']}")
    if mixed_widths(f):
      by_width = {}
      for path, b in f["layer_bits"].items():
        by_width.setdefault(b, []).append(path)
      lines.append("layer widths: " + "; ".join(
          f"{b} bits: {', '.join(paths)}" for b, paths in sorted(by_width.items())))
  return lines
