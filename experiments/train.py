"""INQ training: fp32 baseline, optional pruning, then every incremental phase.

`train_and_evaluate` is the paper's loop (arXiv:1702.03044, Sec. 2.3):

  baseline epochs -> [pruning steps] -> for each accumulated portion sigma_n:
      advance (partition, quantize and freeze the next portion) -> a fresh
      optimizer and a re-jitted step -> retrain the float weights -> evaluate
  -> verify every quantized leaf -> final model, model.inq, results.json.

Data flows one way: each stage (the baseline, a pruning step, an INQ phase,
the final model) takes the state and returns it with what it produced, and
`_train_and_evaluate` assembles results.json from those. `recipe.plan` lists
the segments a run trains; `runner.Run.train` trains one. The whole run is one
pytree, `train_state.TrainState`, checkpointed after every epoch and every
quantization step with a `runner.Progress` (the results so far); rerunning the
command resumes from the newest checkpoint. Data order, augmentation and dropout are
pure functions of (seed, stage, epoch, step), so a killed run ends with
bit-identical params.
"""

from __future__ import annotations

import io
import re
import time
import warnings
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from experiments import checkpoints, optimizer, reporting
from experiments.runner import Callback, Progress, Run
from experiments.train_state import BASELINE, DONE, INQ, PRUNE, STAGE_NAMES, TrainState
from inq_jax import prune
from inq_jax import quantize
from inq_jax import tree

PLOT_FILE = "inq_start_layer.npz"  # the plotted layer's pretrained histogram, for weights.png


# ------------------------------------------------------------------ loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       callback: Optional[Callback] = None) -> dict:
  """Runs (or resumes, or reads back) the experiment `config` in `workdir`.

  Args:
    config: an experiment config (`experiments/configs/*.py`).
    workdir: where checkpoints, metrics and results go (local or gs://).
    callback: optional `callback(event, **info)`, called at "step", "epoch",
      "advance" and "phase_end" (tests use it to inspect or interrupt a run).

  Returns:
    The results dict, also written to `workdir/results.json`.

  Raises:
    ValueError, TypeError or FileNotFoundError for a bad config or input, before
    anything is written to `workdir`.
  """
  run = Run(config, workdir, callback)  # every check first: a bad command claims nothing
  run.open()
  try:
    return _train_and_evaluate(run)
  finally:
    run.close()


def _train_and_evaluate(run: Run) -> dict:
  state = run.initial_state()
  restored = run.restore(state)
  if restored is None:
    progress = Progress(run.new_results())
  else:
    state, progress = restored
    logging.info("resuming at stage %s, phase %d, epoch %d",
                 STAGE_NAMES[int(state.stage)], int(state.phase), int(state.epoch))
  if int(state.stage) == DONE:
    logging.info("%s holds a finished run", run.workdir)
    _write_outputs(run, progress.results, None)
    return progress.results

  if int(state.stage) == BASELINE:
    state, baseline = _baseline(run, state, progress)
    state = state.at(PRUNE if run.prune_cfg is not None else INQ)
    progress = Progress({**progress.results, "baseline": baseline})
  if int(state.stage) == PRUNE:
    state, progress = _pruning(run, state, progress)
  state, results = _inq(run, state, progress)
  results = {**results, "final": _final(run, state, results)}
  run.save(state.at(DONE), Progress(results))
  _write_outputs(run, results, state)
  return results


def _top5(ev: dict) -> dict:
  return {"top5_accuracy": ev["top5_accuracy"]} if "top5_accuracy" in ev else {}


def _baseline(run: Run, state: TrainState, progress: Progress):
  """Trains the float model (none when it comes pretrained), evaluates and saves it.

  Returns:
    (state, results.json's "baseline" entry).
  """
  segment = run.segment(BASELINE)
  trained = run.train(state, segment, progress)
  state = trained.state
  ev = run.evaluate(state)
  entry = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"], "epochs": segment.epochs,
           "seconds": round(trained.progress.seconds, 3), **_top5(ev)}
  run.writer.write(int(state.step), stage="baseline", test_accuracy=ev["accuracy"],
                   test_loss=ev["loss"])
  logging.info("baseline (fp32): test accuracy %.4f", ev["accuracy"])
  checkpoints.save_variables(str(reporting.abs_path(run.workdir) / checkpoints.BASELINE_DIR),
                             state.variables)
  return state, entry


# --------------------------------------------------------------- pruning


def _pruning(run: Run, state: TrainState, progress: Progress):
  """Iterative magnitude pruning, each step retrained with the pruned weights frozen at 0.

  Returns:
    (state at the start of INQ, progress whose results hold the "prune" entry).
  """
  if int(state.phase) == 0:
    state, progress = _prune(run, state, progress.results)
  while True:
    state, entry = _retrain_pruned(run, state, progress)
    done = progress.results.get("prune", {"steps": []})["steps"]
    results = {**progress.results, "prune": {"steps": [*done, entry]}}
    if int(state.phase) == run.prune_cfg.steps:
      return state.at(INQ), Progress(results)
    state, progress = _prune(run, state, results)


def _prune(run: Run, state: TrainState, results: dict):
  """Prunes to the next step's sparsity, with a fresh optimizer: (state, progress)."""
  t = int(state.phase) + 1
  start = time.perf_counter()
  keep = prune.prune_masks(state.params, run.prune_cfg, t, previous=state.keep)
  state = state.replace(params=prune.apply(state.params, keep), keep=keep)
  tx, _ = run.optimizer(run.segment(PRUNE, t))  # fresh momentum
  state = run.devices.replicate(state.replace(opt_state=tx.init(state.params)).at(PRUNE, t))
  progress = Progress(results, time.perf_counter() - start)
  run.save(state, progress)
  return state, progress


def _retrain_pruned(run: Run, state: TrainState, progress: Progress):
  """Retrains the pruning step in progress: (state, its entry of results["prune"]["steps"])."""
  t = int(state.phase)
  trained = run.train(state, run.segment(PRUNE, t), progress)
  state = trained.state
  ev = run.evaluate(state)
  counts = prune.summary(state.keep)
  total = sum(s.total for s in counts.values())
  sparsity = sum(s.pruned for s in counts.values()) / max(total, 1)
  entry = {"step": t, "sparsity": sparsity, "test_accuracy": ev["accuracy"],
           "seconds": round(trained.progress.seconds, 3),
           "layers": {p: s.pruned / max(s.total, 1) for p, s in counts.items()}}
  run.writer.write(int(state.step), stage="prune", phase=t, sparsity=sparsity,
                   test_accuracy=ev["accuracy"])
  logging.info("pruning step %d/%d: sparsity %.4f, test accuracy %.4f", t,
               run.prune_cfg.steps, sparsity, ev["accuracy"])
  return state, entry


# ------------------------------------------------------------------- INQ


def _inq(run: Run, state: TrainState, progress: Progress):
  """Every INQ phase, from wherever the run stands: (state, results with every phase)."""
  evaluated = None  # the test evaluation of `state` as it is, when this session made one
  if state.inq_state is None:  # INQ starts: codebooks from the weights the stages before left
    state, results = _start_inq(run, state, progress.results)
    state, progress, evaluated = _advance(run, state, results)
  while True:
    state, entry = _retrain_phase(run, state, progress, evaluated)
    results = {**progress.results, "phases": [*progress.results["phases"], entry]}
    if int(state.phase) == run.inq_cfg.num_steps:
      return state, results
    state, progress, evaluated = _advance(run, state, results)


def _start_inq(run: Run, state: TrainState, results: dict):
  """The INQ state (codebooks from these weights) and results' "codebook" entry."""
  pruned = state.keep if run.prune_cfg is not None else None  # None: no pruned counts kept
  inq_state = quantize.init(state.params, run.inq_cfg, pruned=pruned)  # warns if a fit is poor
  codebook = reporting.codebook_entry(quantize.codebook_fit(state.params, inq_state))
  _keep_plot_layer(run, state.params, inq_state)
  return state.replace(inq_state=inq_state), {**results, "codebook": codebook}


def _advance(run: Run, state: TrainState, results: dict):
  """Quantizes and freezes the next portion; a fresh optimizer (carrying momentum if asked).

  Returns:
    (state, progress of the new phase, the test evaluation of the state returned).
  """
  k = int(state.phase) + 1
  start = time.perf_counter()
  with warnings.catch_warnings():
    if k > 1 and run.segment(INQ, k - 1).epochs == 0:  # nothing to retrain: stale on purpose
      warnings.simplefilter("ignore", quantize.StaleParamsWarning)
    params, inq_state = quantize.advance(state.params, state.inq_state)
  # The BatchNorm statistics of the weights just quantized (inq.bn_reestimate_batches),
  # so the accuracy below is the codebook's cost, not that of stale statistics.
  batch_stats = run.reestimate_bn(params, state.batch_stats, k)
  tx, _ = run.optimizer(run.segment(INQ, k))
  opt_state = tx.init(params)
  if run.config.inq.carry_optimizer_state and k > 1:
    opt_state = opt_state.copy()  # the chain's own mapping type: the step's signature
    opt_state["base"] = optimizer.reset_count(state.opt_state["base"])
  state = run.devices.replicate(
      state.replace(params=params, batch_stats=batch_stats, inq_state=inq_state,
                    opt_state=opt_state).at(INQ, k))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  evaluated = run.evaluate(state)  # what this quantization step costs before retraining
  portion = run.inq_cfg.portions[k - 1]
  progress = Progress(results, seconds,
                      {"portion": portion, "quantized_test_accuracy": evaluated["accuracy"]})
  run.writer.write(int(state.step), stage="inq", phase=k, portion=portion,
                   quantized_test_accuracy=evaluated["accuracy"])
  run.save(state, progress)
  logging.info("phase %d: quantized and froze %g of each layer in %.2fs; test accuracy "
               "%.4f before retraining", k, portion, seconds, evaluated["accuracy"])
  run.callback("advance", phase=k - 1, params=state.params, inq_state=state.inq_state)
  return state, progress, evaluated


def _retrain_phase(run: Run, state: TrainState, progress: Progress, evaluated):
  """Retrains the still-float weights of the phase in progress and evaluates.

  `evaluated`: the test evaluation of `state` as passed in, or None. It stands
  for the phase's own when the phase trains nothing in this session.

  Returns:
    (state, the phase's entry of results["phases"]).
  """
  k, n = int(state.phase), run.inq_cfg.num_steps
  segment = run.segment(INQ, k)
  finetune = k == n and segment.epochs > 0  # every kernel frozen: biases and BN train on
  trained = run.train(state, segment, progress, test_each_epoch=finetune)
  state = trained.state
  entry = dict(trained.progress.entry)
  if trained.metrics is not None:  # this session compiled and trained
    ev = trained.tested or run.evaluate(state)
    train_loss = trained.metrics["train_loss"]
    entry["compile_seconds"] = round(trained.compile_seconds, 3)
  else:
    ev = evaluated or run.evaluate(state)
    train_loss = _untrained_loss(run, state, segment)
  entry.update({"test_accuracy": ev["accuracy"], "train_loss": train_loss,
                "seconds": round(trained.progress.seconds, 3), "epochs": segment.epochs,
                "test_loss": ev["loss"], **_top5(ev)})
  entry.setdefault("compile_seconds", 0.0)
  run.writer.write(int(state.step), stage="inq", phase=k, portion=entry["portion"],
                   test_accuracy=ev["accuracy"], test_loss=ev["loss"])
  logging.info("phase %d/%d (portion %g): test accuracy %.4f", k, n, entry["portion"],
               ev["accuracy"])
  run.callback("phase_end", phase=k - 1, params=state.params, inq_state=state.inq_state)
  return state, entry


def _untrained_loss(run: Run, state: TrainState, segment) -> float:
  """The train loss of a phase this session did not train."""
  if segment.epochs == 0:  # quantize-only phase: the loss it leaves on the train split
    return run.evaluate(state, split="train")["loss"]
  # resumed after the phase's last epoch: read back what was logged
  losses = [r["train_loss"] for r in reporting.read_metrics(run.workdir)
            if r.get("stage") == "inq" and r.get("phase") == segment.index
            and "train_loss" in r]
  return losses[-1] if losses else float("nan")


def _final(run: Run, state: TrainState, results: dict) -> dict:
  """Verifies every quantized leaf, saves the final model and writes the packed .inq file."""
  inq_state = state.inq_state
  try:
    summary = quantize.verify(state.params, inq_state)
    all_pow2 = all(s.frozen == s.total for s in summary.values())
    distinct = max(s.distinct_values for s in summary.values())
  except ValueError as e:  # reported, not hidden: results.json says so
    logging.error("verify failed: %s", e)
    all_pow2, distinct = False, -1
  widths = reporting.bits_entry(
      {p: (inq_state.bits(p), int(np.size(m)))
       for p, m in tree.leaves_with_paths(inq_state.masks)[0] if p in inq_state.exponents})
  final = {"test_accuracy": results["phases"][-1]["test_accuracy"], "bits": run.inq_cfg.bits,
           **widths, "all_pow2": all_pow2, "max_distinct_values": distinct,
           "quantized_leaves": len(inq_state.exponents),
           "quantized_weights": int(sum(np.size(m) for p, m in
                                        tree.leaves_with_paths(inq_state.masks)[0]
                                        if p in inq_state.exponents))}
  checkpoints.save_final(run.workdir, state.variables, inq_state)
  if all_pow2:
    stats = checkpoints.export_model(checkpoints.export_path(run.workdir), state.variables,
                                     inq_state)
    if stats is not None:
      final["export"] = {k: stats[k] for k in (
          "bytes", "float32_bytes", "ratio", "quantized_weights", "quantized_bytes")}
      logging.info("exported %s: %d bytes, %.1fx smaller than float32", stats["file"],
                   stats["bytes"], stats["ratio"])
  return final


# ---------------------------------------------------------------- outputs


def _keep_plot_layer(run: Run, params, inq_state: quantize.INQState) -> None:
  """Keeps the plotted layer's pretrained histogram, for weights.png at the end."""
  flat = [(p, x) for p, x in tree.leaves_with_paths(params)[0] if p in inq_state.exponents]
  pattern = run.config.plot_layer
  chosen = [(p, x) for p, x in flat if pattern and re.search(pattern, p)] or \
      [max(flat, key=lambda px: np.size(px[1]))]
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, path=chosen[0][0], **reporting.weight_histogram(chosen[0][1]))
    (reporting.abs_path(run.workdir) / PLOT_FILE).write_bytes(buffer.getvalue())


def _write_outputs(run: Run, results: dict, state: Optional[TrainState]) -> None:
  reporting.write_results(run.workdir, results)
  if jax.process_index() != 0:
    return
  reporting.plot_accuracy(run.workdir, results)
  source = reporting.abs_path(run.workdir) / PLOT_FILE
  if state is not None and source.exists():
    saved = np.load(io.BytesIO(source.read_bytes()))
    name = str(saved["path"])
    after = dict(tree.leaves_with_paths(state.params)[0])[name]
    n1, n2 = state.inq_state.bounds(name)
    reporting.plot_weights(run.workdir, name, saved, np.asarray(after, np.float32),
                           np.asarray(n1), np.asarray(n2))
