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
import os
import re
import time
from typing import NamedTuple, Optional

import ml_collections
import numpy as np
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import checkpoints, errors, recipe, reporting, train, workdir_lock
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


def _grid(v, config):
  del config
  problem = ("must be blocks of (seeds, variants, bit widths), e.g. "
             "(((0,), ('recipe',), (3, 2)),)")
  if not isinstance(v, (tuple, list)) or not v:
    return problem
  for block in v:
    if not isinstance(block, (tuple, list)) or len(block) != 3:
      return problem
    seeds, variants, bits = block
    if sweep._seeds(seeds, None) or sweep._bits(bits, None):  # pylint: disable=protected-access
      return sweep._seeds(seeds, None) or sweep._bits(bits, None)  # pylint: disable=protected-access
    if not isinstance(variants, (tuple, list)) or not variants or not all(
        isinstance(x, str) for x in variants):
      return problem
  return None


def _variants(v, config):
  del config
  if not isinstance(v, (dict, ml_collections.ConfigDict)) or not v:
    return "must map each variant's name to its overrides of experiment.inq, e.g. {'recipe': {}}"
  return None


def _baseline_config(v, config):
  del config
  if not isinstance(v, str) or not os.path.exists(
      os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{v}.py")):
    return "must name a study config of experiments/configs (e.g. 'sweep_fashion_mnist')"
  return None


# Every key of a study config (`experiment` is checked against recipe.SCHEMA,
# each variant's overrides against its `inq.*` rules).
SCHEMA = {
    "experiment": sweep.SCHEMA["experiment"],
    "portions": sweep.SCHEMA["portions"],
    "baseline.config": recipe.Rule(_baseline_config, ("no_such_study", 3, None)),
    "baseline.workdir": sweep.SCHEMA["report_dir"],
    "variants": recipe.Rule(_variants, ({}, (), None)),
    "grid": recipe.Rule(_grid, ((), (((0,), ("recipe",)),), (((0,), ("recipe",), (9,)),),
                                (((-1,), ("recipe",), (3,)),), None)),
    "report_dir": sweep.SCHEMA["report_dir"],
    "report_name": sweep.SCHEMA["report_dir"],
    "title": sweep.SCHEMA["title"],
    "command_config": sweep.SCHEMA["command_config"],
}


def check_study_config(sc: ml_collections.ConfigDict) -> None:
  """Every study-level error before anything runs (cells check their whole configs).

  Raises:
    ConfigError naming the key, the value and the fix.
  """
  recipe.check_values(sc, SCHEMA)
  recipe.check_values(sc.experiment, prefix="experiment.")
  for cell in cells(sc):
    if cell.variant not in sc.variants:
      raise errors.ConfigError("grid", None, f"names variant {cell.variant!r}; variants has "
                               f"{sorted(sc.variants.keys())}", shows_value=True)
    if f"b{cell.bits}" not in sc.portions:
      raise errors.ConfigError("portions", None, f"has no schedule 'b{cell.bits}' for cell "
                               f"{cell.name}", shows_value=True)
  for name, overrides in sc.variants.items():
    unknown = sorted(set(overrides.keys()) - set(sc.experiment.inq.keys()))
    if unknown:
      raise errors.ConfigError(f"variants.{name}", None, f"overrides unknown inq fields "
                               f"{unknown}", f"use keys of experiment.inq, e.g. "
                               f"{sorted(sc.experiment.inq.keys())[:4]}", shows_value=True)
    for key, value in overrides.items():
      rule = recipe.SCHEMA[f"inq.{key}"]
      problem = rule.check(value, sc.experiment)
      if problem:
        raise recipe.refuse(f"variants.{name}.{key}", value, problem, rule)


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


# A finished cell's results.json (None while unfinished), and a JSON file or a default.
_finished = sweep.finished_results
_load_json = sweep.load_json


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
    except errors.ConfigError as e:
      raise errors.ConfigError(f"experiment.{e.key}", e.value,
                               f"(study cell {cell.name}) {e}", shows_value=True) from None
  workdir_lock.probe(workdir, "study")  # a live study here: refused before any data is read
  # New cells or variants may join a study; each cell refuses a changed config of its own.
  lock = checkpoints.claim_workdir(workdir, sc, what="study", may_change=("grid", "variants"))
  try:
    return _run_cells(sc, workdir, chosen, report_dir)
  finally:
    if lock is not None:
      lock.release()


def _run_cells(sc, workdir: str, chosen: list, report_dir: Optional[str]) -> dict:
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
    raise errors.UserError(f"unexpected arguments {argv[1:]}: settings are flags, e.g. "
                           "--only='^seed0/'")
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
  errors.run(main, "experiments.study.lowbit_options")
