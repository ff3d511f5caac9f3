"""The low-bit options of issue #32, each alone and together, from a study's fp32 baselines.

  python -m experiments.study.lowbit_options \
      --config=experiments/configs/sweep_lowbit_options_lenet.py \
      --workdir=workdirs/lowbit_options_lenet [--only=REGEX] [--report_only]

A cell is an ordinary run of `train.train_and_evaluate` in WORKDIR/seed{S}/{variant}{b}:
the config's `experiment` at `b` bits with the schedule `portions.b{b}`, the
variant's overrides of `experiment.inq` (e.g. `distill_weight`, `layer_bits`,
`bn_reestimate_batches`, or `portions=(1.0,)` with no finetune for
post-training quantization), starting from seed S's fp32 baseline. The
baselines are the cells `fp32` of the study named by `baseline.config`
(e.g. `sweep_fashion_mnist`, so the LeNet cells start from the very weights the
LeNet study's cells start from), in `baseline.workdir`/seed{S}/fp32; a missing
one is trained there first, exactly as that study trains it
(`sweep.cell_config`).

`grid` lists blocks of (seeds, variants, bit widths); cells run block by
block, seed by seed, variant by variant, in the listed order, so the cells
that matter most go first. Rerunning the command skips finished cells and
resumes an interrupted one from its checkpoint; `--only` runs the cells whose
name matches a regex. After each cell the report is rewritten:
`report_dir`/`report_name`.md (tables, commands, machine, wall times and load
averages) and .json.
"""

from __future__ import annotations

import copy
import datetime
import importlib
import json
import os
import re
import time
from typing import NamedTuple, Optional

import ml_collections
import numpy as np
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import checkpoints, recipe, reporting, train
from experiments.study import report as sweep_report
from experiments.study import sweep

CELLS_FILE = "cells.json"


class Cell(NamedTuple):
  seed: int
  variant: str
  bits: int

  @property
  def name(self) -> str:
    return f"seed{self.seed}/{self.variant}{self.bits}"


def cells(sc: ml_collections.ConfigDict) -> list:
  """Every cell of `sc.grid`, in order, each once."""
  out = []
  for seeds, variants, bits in sc.grid:
    for seed in seeds:
      for variant in variants:
        for b in bits:
          cell = Cell(int(seed), str(variant), int(b))
          if cell not in out:
            out.append(cell)
  return out


def check_study_config(sc: ml_collections.ConfigDict) -> None:
  """Every study-level error before anything runs (cells check their own configs)."""
  for cell in cells(sc):
    if cell.variant not in sc.variants:
      raise ValueError(f"grid names variant {cell.variant!r}; variants has "
                       f"{sorted(sc.variants.keys())}")
    if f"b{cell.bits}" not in sc.portions:
      raise ValueError(f"portions has no schedule 'b{cell.bits}' for cell {cell.name}")
  for name, overrides in sc.variants.items():
    unknown = sorted(set(overrides.keys()) - set(sc.experiment.inq.keys()))
    if unknown:
      raise ValueError(f"variant {name!r} overrides unknown inq fields {unknown}")


def baseline_study(sc: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The study whose fp32 cells are the baselines, on this study's data."""
  module = importlib.import_module(f"experiments.configs.{sc.baseline.config}")
  bc = module.get_config()
  bc.experiment.dataset.data_dir = sc.experiment.dataset.data_dir
  return bc


def baseline_dir(sc, seed: int) -> str:
  return os.path.join(sc.baseline.workdir, sweep.Cell(seed, "fp32", 0).name)


def cell_config(sc, cell: Cell) -> ml_collections.ConfigDict:
  """The experiment config of one cell."""
  c = copy.deepcopy(sc.experiment)
  c.unlock()
  c.seed = cell.seed
  c.init_checkpoint = os.path.join(baseline_dir(sc, cell.seed), checkpoints.BASELINE_DIR)
  c.inq.bits = cell.bits
  c.inq.portions = tuple(sc.portions[f"b{cell.bits}"])
  for key, value in sc.variants[cell.variant].items():
    c.inq[key] = tuple(tuple(v) for v in value) if key == "layer_bits" else value
  return c


def _load_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _finished(workdir: str) -> Optional[dict]:
  r = _load_json(os.path.join(workdir, reporting.RESULTS_FILE), None)
  return r if r and r.get("final") else None


def _ensure_baseline(sc, seed: int) -> dict:
  """Seed `seed`'s fp32 results, training the baseline study's fp32 cell if needed."""
  workdir = baseline_dir(sc, seed)
  results = _finished(workdir)
  if results is None:
    bc = baseline_study(sc)
    config = sweep.cell_config(bc, sweep.Cell(seed, "fp32", 0), sc.baseline.workdir)
    print(f"training the fp32 baseline {workdir} ({sc.baseline.config})", flush=True)
    results = train.train_and_evaluate(config, workdir)
  return results


def run_study(sc: ml_collections.ConfigDict, workdir: str, only: Optional[str] = None,
              report_dir: Optional[str] = None) -> dict:
  """Runs (or resumes) every cell (those matching `only`), rewriting the report after each."""
  check_study_config(sc)
  chosen = [c for c in cells(sc) if only is None or re.search(only, c.name)]
  for cell in chosen:  # every config error before any training
    probe = cell_config(sc, cell)
    probe.init_checkpoint = None
    try:
      recipe.check_config(probe)
    except (ValueError, TypeError) as e:
      raise type(e)(f"cell {cell.name}: {e}") from e
  os.makedirs(workdir, exist_ok=True)
  book_path = os.path.join(workdir, CELLS_FILE)
  book = _load_json(book_path, {})
  for i, cell in enumerate(chosen):
    cell_dir = os.path.join(workdir, cell.name)
    if _finished(cell_dir):
      continue
    _ensure_baseline(sc, cell.seed)
    entry = book.get(cell.name, {})
    prior, loads = entry.get("seconds", 0.0), list(entry.get("load_samples", []))
    start = time.perf_counter()

    def callback(event, _name=cell.name, _prior=prior, _start=start, _loads=loads, **info):
      del info
      if event in ("epoch", "phase_end", "advance"):
        _loads.append(round(os.getloadavg()[0], 2))
        book[_name] = {"seconds": _prior + time.perf_counter() - _start,
                       "load_samples": _loads}
        reporting.atomic_write_json(book_path, book)

    loads.append(round(os.getloadavg()[0], 2))
    results = train.train_and_evaluate(cell_config(sc, cell), cell_dir, callback=callback)
    loads.append(round(os.getloadavg()[0], 2))
    book[cell.name] = {"seconds": prior + time.perf_counter() - start, "load_samples": loads}
    reporting.atomic_write_json(book_path, book)
    f = results["final"]
    print(f"[{i + 1}/{len(chosen)}] {cell.name}: {100 * f['test_accuracy']:.2f}% "
          f"({reporting.bits_label(f)}; {book[cell.name]['seconds'] / 60:.1f} min, load "
          f"{np.mean(loads):.1f})", flush=True)
    write_report(sc, workdir, report_dir)
  return write_report(sc, workdir, report_dir)


# ------------------------------------------------------------------ the report


def collect(sc, workdir: str) -> dict:
  """{"fp32": {seed: accuracy}, "cells": [row, ...]} of the finished cells."""
  book = _load_json(os.path.join(workdir, CELLS_FILE), {})
  fp32, rows = {}, []
  for cell in cells(sc):
    r = _finished(os.path.join(workdir, cell.name))
    if r is None:
      continue
    base = _finished(baseline_dir(sc, cell.seed))
    if base is not None:
      fp32[cell.seed] = base["baseline"]["test_accuracy"]
    f, phases = r["final"], r["phases"]
    entry = book.get(cell.name, {})
    rows.append({
        "cell": cell.name, "seed": cell.seed, "variant": cell.variant, "bits": cell.bits,
        "test_accuracy": f["test_accuracy"],
        "fp32": fp32.get(cell.seed),
        "mean_bits": f.get("mean_bits", float(cell.bits)),
        "layer_bits": f.get("layer_bits", {}),
        "quantized_last": phases[-1].get("quantized_test_accuracy"),
        "before_last": phases[-2]["test_accuracy"] if len(phases) > 1 else None,
        "quantized_first": phases[0].get("quantized_test_accuracy"),
        "phases": [(p["portion"], p.get("quantized_test_accuracy"), p["test_accuracy"])
                   for p in phases],
        "seconds": entry.get("seconds"),
        "load": float(np.mean(entry["load_samples"])) if entry.get("load_samples") else None,
        "all_pow2": f["all_pow2"]})
  return {"fp32": fp32, "cells": rows}


def _pct(x) -> str:
  return "" if x is None else f"{100 * x:.2f}"


def _variant_text(overrides) -> str:
  if not overrides:
    return "the experiment as it is"
  return ", ".join(f"`{k}={tuple(map(tuple, v)) if k == 'layer_bits' else v!r}`"
                   for k, v in overrides.items())


def markdown(sc, data: dict, workdir: str) -> str:
  rows = data["cells"]
  e = sc.experiment
  lines = [f"# {sc.title}", "",
           f"Written by `experiments/study/lowbit_options.py` on "
           f"{datetime.date.today().isoformat()} from the finished cells of "
           f"`{sc.command_config}`. Every cell starts from its seed's fp32 baseline: the "
           f"cell `fp32` of `experiments/configs/{sc.baseline.config}.py` "
           f"({sc.baseline.workdir}/seed{{S}}/fp32). Δ is the cell's accuracy minus its "
           f"own baseline's, in points; bits/weight is the average code width per quantized "
           f"weight (each layer weighted by its weights); load is the host's 1-minute load "
           f"average, sampled at every epoch and quantization step of the cell.", "",
           "| cell | bits | variant | fp32 % | right after the last step % | final % | Δ | "
           "bits/weight | wall (min) | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    delta = "" if r["fp32"] is None else f"{100 * (r['test_accuracy'] - r['fp32']):+.2f}"
    wall = "" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"
    load = "" if r["load"] is None else f"{r['load']:.1f}"
    lines.append(
        f"| {r['cell']} | {r['bits']} | {r['variant']} | {_pct(r['fp32'])} | "
        f"{_pct(r['quantized_last'])} | **{_pct(r['test_accuracy'])}** | {delta} | "
        f"{r['mean_bits']:.3f} | {wall} | {load} |")
  groups = {}
  for r in rows:
    if r["fp32"] is not None:
      groups.setdefault((r["bits"], r["variant"]), []).append(r)
  multi = {k: v for k, v in groups.items() if len(v) > 1}
  if multi:
    lines += ["", "Over seeds (mean ± std of Δ, points):", "",
              "| bits | variant | seeds | final % (mean) | Δ mean ± std | per seed Δ |",
              "|---|---|---|---|---|---|"]
    for (b, v), rs in sorted(multi.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
      d = [100 * (r["test_accuracy"] - r["fp32"]) for r in rs]
      lines.append(f"| {b} | {v} | {', '.join(str(r['seed']) for r in rs)} | "
                   f"{100 * np.mean([r['test_accuracy'] for r in rs]):.2f} | "
                   f"{np.mean(d):+.2f} ± {np.std(d, ddof=1):.2f} | "
                   + ", ".join(f"{x:+.2f}" for x in d) + " |")
  lines += ["", "## Per phase", "",
            "Test accuracy right after quantizing each portion → after retraining it (%).", ""]
  for r in rows:
    lines.append(f"- {r['cell']}: " + ", ".join(
        f"{p:g}: {_pct(q)}→{_pct(a)}" for p, q, a in r["phases"]))
  lines += ["", "## Variants", ""]
  for name, overrides in sc.variants.items():
    lines.append(f"- `{name}`: {_variant_text(dict(overrides))}")
  lines += ["", "## Settings", "",
            f"- model {e.model}, batch {e.batch_size}, {e.optimizer} (momentum {e.momentum}, "
            f"weight decay {e.weight_decay}); calibration={e.inq.calibration!r}; every INQ "
            f"phase {e.inq.epochs:g} epochs at lr {e.inq.learning_rate} ({e.inq.lr_schedule}, "
            f"restarted each phase), the final phase {e.inq.final_finetune_epochs:g} epochs "
            f"(unless a variant says otherwise)",
            "- portions: " + "; ".join(f"{k[1:]} bits {tuple(v)}"
                                       for k, v in sorted(sc.portions.items(), reverse=True)),
            "", "## Commands", "", "```",
            ".venv/bin/python -m experiments.study.lowbit_options \\",
            f"    --config={sc.command_config} \\",
            f"    --workdir={workdir}" + (" \\" if e.dataset.data_dir else ""),
            *([f"    --config.experiment.dataset.data_dir={e.dataset.data_dir}"]
              if e.dataset.data_dir else []),
            "```", "",
            "One cell alone is an ordinary run: `python -m experiments.main "
            "--config=... --config.init_checkpoint=BASELINE/baseline_variables "
            "--config.inq.bits=... --config.inq.<option>=...`; each cell's directory holds "
            "its results.json, metrics.jsonl and plots.", "",
            "## Machine", "", f"- {sweep_report._machine()}"]  # pylint: disable=protected-access
  notes = os.path.join(sc.report_dir, f"{sc.report_name}_notes.md")
  if os.path.exists(notes):
    with open(notes) as f:
      lines += ["", f.read().rstrip()]
  return "\n".join(lines) + "\n"


def write_report(sc, workdir: str, report_dir: Optional[str] = None) -> dict:
  report_dir = report_dir or sc.report_dir
  data = collect(sc, workdir)
  if not data["cells"]:
    return data
  os.makedirs(report_dir, exist_ok=True)
  reporting.atomic_write_json(os.path.join(report_dir, f"{sc.report_name}.json"), data)
  reporting.atomic_write(os.path.join(report_dir, f"{sc.report_name}.md"),
                         markdown(sc, data, workdir))
  return data


def define_flags():
  """Defines this command's flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Directory holding every cell's run.")
  flags.DEFINE_string("only", None, "Run only the cells whose name matches this regex.")
  flags.DEFINE_string("report_dir", None, "Where the report goes (default: config.report_dir).")
  flags.DEFINE_bool("report_only", False, "Rewrite the report from the finished cells.")
  config_flags.DEFINE_config_file("config", None, "Study configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  sc, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if flags.FLAGS.report_only:
    write_report(sc, workdir, flags.FLAGS.report_dir)
  else:
    run_study(sc, workdir, flags.FLAGS.only, flags.FLAGS.report_dir)
  print(f"report: {os.path.join(flags.FLAGS.report_dir or sc.report_dir, sc.report_name)}.md",
        flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
