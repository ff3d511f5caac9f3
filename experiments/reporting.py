"""What a run leaves in its workdir: results.json, metrics, TensorBoard, plots."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional

import jax
import numpy as np
from absl import logging

RESULTS_FILE = "results.json"
METRICS_FILE = "metrics.jsonl"


def atomic_write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def atomic_write_json(path: str, data) -> None:
  atomic_write(path, json.dumps(data, indent=2) + "\n")


def write_results(workdir: str, results: dict) -> None:
  """results.json (the contract in the README), written atomically on host 0."""
  if jax.process_index() == 0:
    atomic_write(os.path.join(workdir, RESULTS_FILE), json.dumps(results, indent=2) + "\n")


class MetricWriter:
  """Appends JSON lines to metrics.jsonl and mirrors scalars to TensorBoard.

  A resumed run replays the interrupted epoch, so that epoch can appear twice;
  the later line is the one that counts.
  """

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._tb = None
    if not self._enabled:
      return
    self._path = os.path.join(workdir, METRICS_FILE)
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    except ImportError:  # TensorBoard events are a convenience, not the record
      logging.warning("tensorboardX not installed; writing metrics.jsonl only")

  def write(self, step: int, **scalars) -> None:
    if not self._enabled:
      return
    record = {"step": int(step), "time": round(time.time(), 3), **scalars}
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      tag_prefix = str(scalars.get("stage", ""))
      for key, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(f"{tag_prefix}/{key}" if tag_prefix else key, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def progress(total: int, desc: str):
  """A tqdm bar on a terminal; nothing (plain log lines instead) otherwise."""
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  return tqdm.tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True,
                   disable=not sys.stderr.isatty() or jax.process_index() != 0)


def plot_accuracy(workdir: str, results: dict) -> Optional[str]:
  """accuracy.png: test accuracy after the baseline and after every INQ phase."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = ["fp32"] + [f"{p['portion']:g}" for p in results["phases"]]
  acc = [results["baseline"]["test_accuracy"]] + [p["test_accuracy"] for p in results["phases"]]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(range(len(acc)), [100 * a for a in acc], "o-")
  ax.axhline(100 * acc[0], color="gray", ls="--", lw=0.8, label="fp32 baseline")
  ax.set_xticks(range(len(acc)), labels)
  ax.set_xlabel("accumulated portion quantized")
  ax.set_ylabel("test accuracy (%)")
  bits = results.get("final", {}).get("bits", "")
  ax.set_title(f"INQ {bits}-bit: {results['config']['model']} on "
               f"{results['config']['dataset']['name']}")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower left")
  fig.tight_layout()
  path = os.path.join(workdir, "accuracy.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def plot_weights(workdir: str, name: str, before: np.ndarray, after: np.ndarray,
                 n1, n2) -> str:
  """weights.png: one layer's weights before and after INQ, codebook marked."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  before, after = np.ravel(before), np.ravel(after)
  fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
  lim = float(np.abs(before).max()) * 1.1 or 1.0
  axes[0].hist(before, bins=200, range=(-lim, lim), color="tab:blue")
  axes[0].set_title(f"{name}: pretrained float weights ({before.size} weights)")
  values, counts = np.unique(after, return_counts=True)
  axes[1].bar(values, counts, width=lim / 100, color="tab:orange")
  n1_max, n2_min = int(np.max(n1)), int(np.min(n2))
  for k in range(n2_min, n1_max + 1):
    for s in (-1, 1):
      for ax in axes:
        ax.axvline(s * 2.0 ** k, color="k", lw=0.5, alpha=0.4)
  axes[1].set_title(f"after INQ: {len(values)} distinct values; lines mark "
                    f"+-2^k, {n2_min} <= k <= {n1_max}")
  axes[1].set_yscale("log")
  axes[1].set_xlabel("weight value")
  fig.tight_layout()
  path = os.path.join(workdir, "weights.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def summary_lines(results: dict) -> list:
  """Human-readable lines for the end of a run (and for a finished run's rerun)."""
  lines = [f"baseline (fp32): test accuracy {100 * results['baseline']['test_accuracy']:.2f}%"]
  for i, p in enumerate(results["phases"]):
    lines.append(f"phase {i + 1}: portion {p['portion']:g}, test accuracy "
                 f"{100 * p['test_accuracy']:.2f}%, train loss {p['train_loss']:.4f}, "
                 f"{p['seconds']:.1f}s")
  f = results.get("final")
  if f:
    lines.append(f"final {f['bits']}-bit: test accuracy {100 * f['test_accuracy']:.2f}%, "
                 f"all_pow2={f['all_pow2']}, max_distinct_values={f['max_distinct_values']}")
  return lines
