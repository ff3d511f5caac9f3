"""Runs a study of many INQ cells from one fp32 baseline per seed; resumable.

  python -m experiments.study.sweep --config=experiments/configs/sweep_fashion_mnist.py \
      --workdir=workdirs/sweep_fashion_mnist

Every cell is an ordinary run of `train.train_and_evaluate` in its own
directory, WORKDIR/seed{S}/{cell}:

  fp32        the baseline (trained here; its weights seed every other cell)
  inq{b}      INQ, b bits, the magnitude (pruning-inspired) partition
  random{b}   INQ, b bits, the random partition, same schedule and epochs
  ptq{b}      post-training quantization: every weight rounded at once with the
              same b-bit codebooks, no retraining (portions = (1,))
  channel{b}  INQ, b bits, one codebook per output channel
  inq_mse{b}  INQ, b bits, per-layer codebooks with calibration="mse" (n1 chosen
              for least rounding error instead of from max |w|; an extension)
  ptq_mse{b}  post-training quantization with those codebooks
  inq_ft{b}, inq_mse_ft{b}
              INQ (either codebook) whose last phase is a final finetune of
              `finetune_epochs` (every kernel frozen; biases and BN train),
              evaluated after each of its epochs: what the last quantization
              step costs, and what each finetune epoch buys back
  tail{b}, tail_mse{b}
              the same with the finer tail of portions `tail_portions.b{b}`

A kill loses at most the epoch in flight: rerunning the command skips finished
cells and resumes the interrupted one from its checkpoint. At the end (and
while cells run, at most once a minute) the report is rewritten: RESULTS.md,
sweep.json, sweep_details.json and two plots under `config.report_dir`.
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import NamedTuple, Optional

import ml_collections
from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import checkpoints, errors, optimizer, recipe, reporting, train, workdir_lock
from experiments.data import input_pipeline
from experiments.recipe import Rule
from experiments.study import report as sweep_report
from inq_jax import quantize

KINDS = ("fp32", "ptq", "ptq_mse", "inq", "random", "channel", "inq_mse", "inq_ft",
         "inq_mse_ft", "tail", "tail_mse")  # a seed's cells run in this order
# The config keys listing each kind's bit widths; a finished study may grow more cells.
BITS_KEYS = {kind: f"{kind}_bits" for kind in KINDS[1:]}
FINETUNED = ("inq_ft", "inq_mse_ft", "tail", "tail_mse")  # last phase: finetune_epochs
CELLS_FILE = "cells.json"
REPORT_EVERY_SECONDS = 60.0  # the report while cells run: at most this often


class Cell(NamedTuple):
  seed: int
  kind: str   # one of KINDS
  bits: int   # 0 for fp32

  @property
  def name(self) -> str:
    return f"seed{self.seed}/{self.kind}{self.bits or ''}"


def _seeds(v, config):
  del config
  if (not isinstance(v, (tuple, list)) or not v or len(set(v)) != len(v)
      or any(isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < 2**32 for x in v)):
    return "must be distinct ints in [0, 2**32), at least one"
  return None


def _bits(v, config):
  del config
  if not isinstance(v, (tuple, list)):
    return "must be a tuple of bit widths, e.g. (5, 4)"
  for b in v:
    try:
      quantize.INQConfig(bits=b)  # the library's own rule for a bit width
    except (TypeError, ValueError) as e:
      return recipe.said(str(e))
  return None


def _schedules(v, config):
  del config
  if v is None:
    return None
  if not isinstance(v, (dict, ml_collections.ConfigDict)):
    return "must map 'b<bits>' to portions, e.g. {'b5': (0.5, 0.75, 0.875, 1.0)}"
  for name, portions in dict(v).items():
    try:
      quantize.INQConfig(bits=int(name[1:]) if name[1:].isdigit() else -1, portions=portions)
    except (TypeError, ValueError) as e:
      return recipe.said(f"{name}: {e}")
  return None


def _text(optional: bool) -> Rule:
  def check(v, config):
    del config
    return None if isinstance(v, str) and v.strip() else "must be a non-empty string"
  return Rule(check, ("", 3, None), optional=optional)


# Every key of a sweep config (`experiment` holds a whole experiment config,
# checked against recipe.SCHEMA with its own rules).
SCHEMA = {
    "experiment": Rule(lambda v, c: None if isinstance(v, ml_collections.ConfigDict)
                       else "must be an experiment config", (None, 3)),
    "seeds": Rule(_seeds, ((), (0, 0), (-1,), (1.5,), 0, None), fix="e.g. (0, 1, 2)"),
    **{key: Rule(_bits, ((9,), (1,), ("5",), 5, (True,)), optional=True)
       for key in BITS_KEYS.values()},
    "portions": Rule(_schedules, ({"b5": (0.5, 0.9)}, {"b5": ()}, {"x": (1.0,)}, (1.0,), None)),
    "tail_portions": Rule(_schedules, ({"b3": (0.5, 0.4, 1.0)}, (1.0,)), optional=True),
    "finetune_epochs": recipe.number_rule("a number > 0", 0, recipe.MAX_EPOCHS, lo_open=True,
                                          optional=True),
    "report_dir": _text(optional=False),
    "title": _text(optional=True),
    "command_config": _text(optional=True),
}


def check_sweep_config(sc: ml_collections.ConfigDict) -> None:
  """Every sweep-level error before anything runs (cells check their own).

  Raises:
    ConfigError naming the key (experiment keys as `experiment.KEY`), the
    value and the fix.
  """
  recipe.check_values(sc, SCHEMA)
  recipe.check_values(sc.experiment, prefix="experiment.")
  retrained = {b for kind, key in BITS_KEYS.items() if kind not in ("ptq", "ptq_mse")
               for b in sc.get(key, ())}
  for b in sorted(retrained):
    if f"b{b}" not in sc.portions:
      raise errors.ConfigError("portions", sc.portions.to_dict(),
                               f"portions has no schedule 'b{b}' for {b}-bit cells; it has "
                               f"{sorted(sc.portions.keys())}", shows_value=True)
  tails = sc.get("tail_portions") or {}
  for kind in ("tail", "tail_mse"):
    for b in sc.get(BITS_KEYS[kind], ()):
      if f"b{b}" not in tails:
        raise errors.ConfigError("tail_portions", dict(tails),
                                 f"tail_portions has no schedule 'b{b}' for the {kind}{b} "
                                 f"cell; it has {sorted(tails.keys())}", shows_value=True)
  if any(sc.get(BITS_KEYS[kind], ()) for kind in FINETUNED) and "finetune_epochs" not in sc:
    raise errors.ConfigError("finetune_epochs", None, "must be set (a number > 0) for the "
                             f"{'/'.join(FINETUNED)} cells")


def cells(sc: ml_collections.ConfigDict) -> list:
  """Every cell, seed by seed, the baseline first and cheap cells early."""
  out = []
  for seed in sc.seeds:
    out.append(Cell(seed, "fp32", 0))
    for kind in KINDS[1:]:
      out += [Cell(seed, kind, b) for b in sc.get(BITS_KEYS[kind], ())]
  return out


def cell_config(sc, cell: Cell, workdir: str) -> ml_collections.ConfigDict:
  """The experiment config of one cell."""
  c = copy.deepcopy(sc.experiment)
  c.unlock()
  c.seed = cell.seed
  if cell.kind == "fp32":
    c.inq.portions = (1.0,)  # the run needs some INQ; this cell reports fp32 only
    return c
  c.init_checkpoint = os.path.join(baseline_dir(workdir, cell.seed), checkpoints.BASELINE_DIR)
  c.inq.bits = cell.bits
  c.inq.calibration = "mse" if "_mse" in cell.kind else "absmax"
  if cell.kind in ("ptq", "ptq_mse"):
    c.inq.portions = (1.0,)
    c.inq.final_finetune_epochs = 0.0
  else:
    schedules = sc.tail_portions if cell.kind.startswith("tail") else sc.portions
    c.inq.portions = tuple(schedules[f"b{cell.bits}"])
    if cell.kind in FINETUNED:
      c.inq.final_finetune_epochs = float(sc.finetune_epochs)
    c.inq.strategy = "random" if cell.kind == "random" else "magnitude"
    c.inq.granularity = "channel" if cell.kind == "channel" else "layer"
  return c


def baseline_dir(workdir: str, seed: int) -> str:
  return os.path.join(workdir, Cell(seed, "fp32", 0).name)


def cell_steps(config, steps_per_epoch: int) -> int:
  """Train steps a cell runs (for the overall progress bar): every segment of its plan."""
  return sum(sum(optimizer.epoch_steps(segment.epochs, steps_per_epoch))
             for segment in recipe.plan(config))


def load_json(path: str, default):
  """The JSON file at `path`, or `default` when there is none."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def finished_results(workdir: str) -> Optional[dict]:
  """A finished cell's results.json (None while the cell is unfinished)."""
  r = load_json(os.path.join(workdir, reporting.RESULTS_FILE), None)
  return r if r and r.get("final") else None


def run_sweep(sc: ml_collections.ConfigDict, workdir: str, *,
              report_dir: Optional[str] = None) -> dict:
  """Runs (or resumes) every cell, then writes the report; returns sweep.json's dict."""
  check_sweep_config(sc)
  all_cells = cells(sc)
  configs = {cell: cell_config(sc, cell, workdir) for cell in all_cells}
  for cell, config in configs.items():  # every config error before any training
    probe = copy.deepcopy(config)
    probe.init_checkpoint = None  # written later, by the seed's fp32 cell
    try:
      recipe.check_config(probe)
    except errors.ConfigError as e:
      raise errors.ConfigError(f"experiment.{e.key}", e.value,
                               f"(sweep cell {cell.name}) {e}", shows_value=True) from None
  workdir_lock.probe(workdir, "study")  # a live study here: refused before any data is read
  # Adding bit widths or kinds to a finished study reruns only the new cells
  # (each cell still refuses a changed config of its own).
  lock = checkpoints.claim_workdir(workdir, sc, what="study", may_change=BITS_KEYS.values())
  try:
    return _run_cells(sc, workdir, all_cells, configs, report_dir or sc.report_dir)
  finally:
    if lock is not None:
      lock.release()


def _run_cells(sc, workdir: str, all_cells: list, configs: dict, report_dir: str) -> dict:

  per_epoch = input_pipeline.steps_per_epoch(sc.experiment.dataset, sc.experiment.batch_size)
  counts = {cell: cell_steps(configs[cell], per_epoch) for cell in all_cells}
  book_path = os.path.join(workdir, CELLS_FILE)
  book = load_json(book_path, {})
  done = {cell for cell in all_cells if finished_results(os.path.join(workdir, cell.name))}
  bar = reporting.progress_bar(sum(counts.values()), "sweep")
  bar.update(sum(counts[c] for c in done))
  start_all = last_report = time.perf_counter()

  for i, cell in enumerate(all_cells):
    cell_dir = os.path.join(workdir, cell.name)
    if cell in done:
      continue
    bar.set_postfix_str(cell.name)
    prior = book.get(cell.name, {}).get("seconds", 0.0)
    start = time.perf_counter()

    def callback(event, _cell=cell, _prior=prior, _start=start, **info):
      del info
      if event == "step":
        bar.update(1)
      elif event in ("epoch", "phase_end"):  # a kill loses at most this much wall time
        book[_cell.name] = {"seconds": _prior + time.perf_counter() - _start}
        reporting.atomic_write_json(book_path, book)

    results = train.train_and_evaluate(configs[cell], cell_dir, callback=callback)
    book[cell.name] = {"seconds": prior + time.perf_counter() - start}
    reporting.atomic_write_json(book_path, book)
    acc = (results["baseline"] if cell.kind == "fp32" else results["final"])["test_accuracy"]
    elapsed = time.perf_counter() - start_all
    print(f"[{i + 1}/{len(all_cells)}] {cell.name}: test accuracy {100 * acc:.2f}% "
          f"({book[cell.name]['seconds']:.0f}s; this invocation {elapsed / 60:.1f} min)",
          flush=True)
    # The report while a long study runs, so it can be read; at most once a
    # minute (each write redraws the plots, about a second), and always at the end.
    if time.perf_counter() - last_report >= REPORT_EVERY_SECONDS:
      sweep_report.write(sc, workdir, report_dir, _collect(workdir, all_cells, book))
      last_report = time.perf_counter()
  bar.close()
  summary = sweep_report.write(sc, workdir, report_dir,
                               _collect(workdir, all_cells, book))
  print(f"report: {os.path.join(report_dir, sweep_report.RESULTS_MD)}", flush=True)
  return summary


def report(sc: ml_collections.ConfigDict, workdir: str, *,
           report_dir: Optional[str] = None) -> dict:
  """Rewrites the report from whatever cells have finished (e.g. after editing notes)."""
  check_sweep_config(sc)
  book = load_json(os.path.join(workdir, CELLS_FILE), {})
  report_dir = report_dir or sc.report_dir
  summary = sweep_report.write(sc, workdir, report_dir, _collect(workdir, cells(sc), book))
  print(f"report: {os.path.join(report_dir, sweep_report.RESULTS_MD)}", flush=True)
  return summary


def _collect(workdir: str, all_cells, book: dict) -> dict:
  """{cell: (results, seconds)} of the finished cells."""
  out = {}
  for cell in all_cells:
    r = finished_results(os.path.join(workdir, cell.name))
    if r is not None:
      out[cell] = (r, book.get(cell.name, {}).get("seconds", float("nan")))
  return out


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  flags.DEFINE_string("workdir", None, "Directory holding every cell's run.")
  flags.DEFINE_string("report_dir", None, "Where RESULTS.md and results/ go "
                      "(default: config.report_dir).")
  flags.DEFINE_bool("report_only", False, "Rewrite the report from the finished cells "
                    "without running or checking anything else.")
  config_flags.DEFINE_config_file("config", None, "Sweep configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}: settings are flags, e.g. "
                           "--config.seeds=(0,1)")
  # Per-cell INFO logs would bury the progress bar; each cell keeps metrics.jsonl.
  logging.set_verbosity(logging.WARNING)
  if flags.FLAGS.report_only:
    report(flags.FLAGS.config, flags.FLAGS.workdir, report_dir=flags.FLAGS.report_dir)
  else:
    run_sweep(flags.FLAGS.config, flags.FLAGS.workdir, report_dir=flags.FLAGS.report_dir)


if __name__ == "__main__":
  define_flags()
  errors.run(main, "experiments.study.sweep")
