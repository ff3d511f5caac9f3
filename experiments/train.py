"""INQ training: fp32 baseline, optional pruning, then every incremental phase.

`train_and_evaluate` is the paper's loop (arXiv:1702.03044, Sec. 2.3):

  baseline epochs -> [pruning steps] -> for each accumulated portion sigma_n:
      advance (partition, quantize and freeze the next portion) -> a fresh
      optimizer and a re-jitted step -> retrain the float weights -> evaluate
  -> verify every quantized leaf -> final model, model.inq, results.json.

The whole run is one pytree, `steps.TrainState`, checkpointed after every
epoch and every quantization step. Rerunning the command resumes from the
newest checkpoint; data order, augmentation and dropout are pure functions of
(seed, stage, epoch, step), so a killed run ends with bit-identical params.
"""

from __future__ import annotations

import io
import re
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from experiments import checkpoints, models, reporting, steps
from experiments.data import input_pipeline
from experiments.steps import BASELINE, DONE, INQ, PRUNE, TrainState
from inq_jax import prune
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

Callback = Callable[..., None]
PLOT_FILE = "inq_start_layer.npz"  # the plotted layer's pretrained weights, for weights.png


# ----------------------------------------------------------------- config


def inq_config(config: ml_collections.ConfigDict) -> inq.INQConfig:
  c = config.inq
  return inq.INQConfig(bits=c.bits, portions=tuple(c.portions), strategy=c.strategy,
                       include=c.include, exclude=c.exclude, granularity=c.granularity,
                       calibration=c.calibration, seed=config.seed)


def prune_config(config: ml_collections.ConfigDict) -> Optional[prune.PruneConfig]:
  """The pruning stage's config, or None when `config.prune.sparsity` is empty."""
  c = config.prune
  if not c.sparsity:
    return None
  return prune.PruneConfig(sparsity=tuple(tuple(pair) for pair in c.sparsity),
                           include=config.inq.include, exclude=config.inq.exclude,
                           steps=c.steps, schedule=c.schedule)


def _positive_int(config, name: str) -> int:
  value = config[name]
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return value


def check_config(config: ml_collections.ConfigDict):
  """Every error in `config` that needs no data: (INQConfig, PruneConfig or None)."""
  inq_cfg, prune_cfg = inq_config(config), prune_config(config)
  if config.optimizer not in ("sgd", "adam"):
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
  for stage, key in (("baseline", "epochs"), ("prune", "epochs_per_step"),
                     ("inq", "epochs_per_phase"), ("inq", "final_finetune_epochs")):
    value = config[stage][key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
        0 <= value < float("inf"):
      raise ValueError(f"{stage}.{key} must be a number of epochs >= 0 (fractions "
                       f"allowed), got {value!r}")
    if config[stage].lr_schedule not in ("cosine", "step", "constant"):
      raise ValueError(f"{stage}.lr_schedule must be cosine, step or constant, got "
                       f"{config[stage].lr_schedule!r}")
  batch = _positive_int(config, "batch_size")
  _positive_int(config, "eval_batch_size")
  n = jax.device_count()
  if batch % n:
    raise ValueError(f"batch_size={batch} is not divisible by the {n} devices: set "
                     f"--config.batch_size to a multiple of {n}, e.g. {max(n, batch // n * n)}")
  if config.init_checkpoint and config.init_torchvision:
    raise ValueError("set at most one of init_checkpoint and init_torchvision")
  for name in ("init_checkpoint", "init_torchvision"):
    if config[name] and not checkpoints.path(config[name]).exists():
      raise FileNotFoundError(f"{name} {config[name]} does not exist")
  return inq_cfg, prune_cfg


# ------------------------------------------------------------------- run


def _get_dataset(dataset_config):
  """The dataset; with several processes, process 0 prepares it while the rest wait.

  Processes preparing one fresh TFDS data_dir at once would race on its renames.
  """
  if jax.process_count() == 1:
    return input_pipeline.get_dataset(dataset_config)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  data = input_pipeline.get_dataset(dataset_config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("inq_jax: dataset prepared")
  return data or input_pipeline.get_dataset(dataset_config)



class Run:
  """What a run reads (data, model, initial weights) and where it writes; no state."""

  def __init__(self, config, workdir: str, callback: Optional[Callback]):
    self.config, self.workdir = config, workdir
    self.inq_cfg, self.prune_cfg = check_config(config)
    self.callback = callback or (lambda event, **info: None)
    self.data = _get_dataset(config.dataset)
    self.steps_per_epoch = self.data.steps_per_epoch(config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={config.batch_size} is larger than the train split "
                       f"({self.data.train_size} examples)")
    self.model = models.get_model(config.model, self.data.num_classes,
                                  dtype=jnp.dtype(config.dtype))
    self.devices = steps.Devices()
    self.eval_step = steps.make_eval_step(self.model, self.devices,
                                          top5=self.data.num_classes > 10,
                                          normalization=self.data.normalization)
    self.initial = self._initial_variables()  # validates init_checkpoint before any write
    self.ckpt = self.writer = None
    self._last_eval = None  # (split, params, batch_stats, result) of the last evaluate

  def open(self):
    """Claims the workdir (config.json) and opens its checkpoints and metrics."""
    checkpoints.claim_workdir(self.workdir, self.config)
    self.ckpt = checkpoints.RunCheckpoints(self.workdir, self.config.max_checkpoints_to_keep)
    self.writer = reporting.MetricWriter(self.workdir)

  def close(self):
    for part in (self.ckpt, self.writer):
      if part is not None:
        part.close()

  def _initial_variables(self) -> dict:
    shape = (1,) + tuple(self.data.image_shape)
    variables = models.init_variables(self.model, shape, jax.random.key(self.config.seed))
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    if self.config.init_checkpoint:
      return checkpoints.load_variables(self.config.init_checkpoint, variables)
    if self.config.init_torchvision:
      from experiments.models import pretrained  # pylint: disable=g-import-not-at-top
      loaded = pretrained.load_torchvision_resnet(self.config.init_torchvision,
                                                  self.config.model)
      return {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    return variables

  @property
  def pretrained(self) -> bool:
    return bool(self.config.init_checkpoint or self.config.init_torchvision)

  def initial_state(self) -> TrainState:
    """The run's start, and the template every checkpoint restores into."""
    params = self.initial["params"]
    keep = None
    if self.prune_cfg is not None:  # nothing pruned yet; same structure as later masks
      keep = jax.tree.map(jnp.ones_like, prune.prune_masks(params, self.prune_cfg, 1))
    inq_state = inq.init(params, self.inq_cfg, pruned=keep)
    tx, _ = self.optimizer(self.config.baseline, 1, inq_state.masks)
    return self.devices.replicate(TrainState(
        step=jnp.int32(0), params=params, batch_stats=self.initial["batch_stats"],
        opt_state=tx.init(params), inq=inq_state, keep=keep, stage=jnp.int32(BASELINE),
        phase=jnp.int32(0), epoch=jnp.int32(0)))

  def optimizer(self, stage_config, epochs: float, masks):
    schedule = steps.learning_rate(stage_config, self.steps_per_epoch, epochs)
    return steps.make_optimizer(self.config, schedule, masks), schedule

  def evaluate(self, state: TrainState, split: str = "test") -> dict:
    # The same (immutable) arrays give the same result: a phase that does not
    # train evaluates what was evaluated right after quantizing, and a finetune's
    # end-of-phase evaluation is its last epoch's.
    last = self._last_eval
    if (last is not None and last[0] == split and last[1] is state.params
        and last[2] is state.batch_stats):
      return last[3]
    if split == "test":
      batches = steps.test_batches(self.data, self.config.eval_batch_size, self.devices)
    else:  # the train split in eval mode (a phase that does not train)
      batches = steps.train_split_eval_batches(self.data, self.config.eval_batch_size,
                                               self.devices, self.config.seed)
    result = steps.evaluate(self.eval_step, state.params, state.batch_stats, batches,
                            self.devices)
    self._last_eval = (split, state.params, state.batch_stats, result)
    return result

  def save(self, state: TrainState, results: dict, seconds: float) -> None:
    # Fields set on the host (epoch, stage) become global arrays, which a
    # multi-process orbax save needs; what is already replicated stays put.
    self.ckpt.save(self.devices.replicate(state), {"results": results, "seconds": seconds})

  def train(self, state: TrainState, stage_config, masks, *, epochs: float, data_seed: int,
            desc: str, results: dict, seconds: float, record: dict,
            eval_entry: Optional[dict] = None):
    """Trains the rest of a stage or phase, from `state.epoch`, saving after each epoch.

    A fresh jitted step for this stage's optimizer (its schedule and frozen `masks`),
    compiled ahead of time so that `compile_seconds` shows what rebuilding costs.
    With `eval_entry` (the final finetune's phase entry in `results`), the test
    split is evaluated after every epoch and kept in its "epoch_test_accuracy"
    list, so one run shows what each finetune epoch buys back.

    Returns:
      (state, seconds spent including earlier sessions, last epoch's metrics or None,
       seconds this session spent compiling the step).
    """
    tx, schedule = self.optimizer(stage_config, epochs, masks)
    chunks = steps.epoch_steps(epochs, self.steps_per_epoch)
    last = None
    if int(state.epoch) >= len(chunks):
      return state, seconds, last, 0.0
    train_step = steps.make_train_step(self.model, tx, self.devices, self.config.seed,
                                       normalization=self.data.normalization)
    train_step, compile_seconds = steps.compile_step(
        train_step, state, self.config.batch_size, self.data.image_shape, self.devices)
    seconds += compile_seconds
    for e in range(int(state.epoch), len(chunks)):
      batches = self.data.train_batches(self.config.batch_size, e, data_seed)
      state, last = steps.train_epoch(
          state, train_step, batches, steps=chunks[e], devices=self.devices,
          desc=f"{desc} epoch {e + 1}/{len(chunks)}",
          on_step=lambda s: self.callback("step", step=s))
      seconds += last["seconds"]
      last["images"] = last["steps"] * self.config.batch_size
      state = state.replace(epoch=jnp.int32(e + 1))
      lr = float(schedule(e * self.steps_per_epoch + last["steps"] - 1))  # at the epoch's end
      tested = None
      if eval_entry is not None:  # before the save, so a resume keeps it
        tested = self.evaluate(state)
        eval_entry.setdefault("epoch_test_accuracy", [])[e:] = [tested["accuracy"]]
      self.writer.write(int(state.step), epoch=e + 1, lr=lr, **record, **last,
                        **({"test_accuracy": tested["accuracy"]} if tested else {}))
      self.save(state, results, seconds)
      self.callback("epoch", stage=record["stage"], phase=record.get("phase", 0),
                    epoch=e + 1, ts=state)
    return state, seconds, last, compile_seconds


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
  restored = run.ckpt.restore(state)
  if restored is None:
    results = {"config": checkpoints.config_dict(run.config),
               "num_devices": run.devices.count, "baseline": None, "phases": []}
    seconds = 0.0
  else:
    state, meta = restored
    state, results, seconds = run.devices.replicate(state), meta["results"], meta["seconds"]
    logging.info("resuming at stage %s, phase %d, epoch %d",
                 steps.STAGE_NAMES[int(state.stage)], int(state.phase), int(state.epoch))
  if int(state.stage) == DONE:
    logging.info("%s holds a finished run", run.workdir)
    _write_outputs(run, results, None)
    return results

  if int(state.stage) == BASELINE:
    state, seconds = _baseline(run, state, results, seconds)
  if run.prune_cfg is not None and int(state.stage) <= PRUNE:
    state, seconds = _prune(run, state, results, seconds)
  if int(state.stage) < INQ or int(state.phase) < 0:  # INQ starts: codebooks from these weights
    state = state.replace(inq=inq.init(state.params, run.inq_cfg, pruned=state.keep))
    results["codebook"] = reporting.codebook_fit(state.params, state.inq)
    reporting.warn_mostly_zero(results["codebook"], run.inq_cfg.bits, run.inq_cfg.calibration)
    _keep_plot_layer(run, state)
    state, seconds = _advance(run, state, 0, results)
  n = run.inq_cfg.num_steps
  while True:
    p = int(state.phase)
    state = _retrain_phase(run, state, p, results, seconds)
    if p + 1 == n:
      break
    state, seconds = _advance(run, state, p + 1, results)

  results["final"] = _final(run, state, results)
  run.save(state.at(DONE), results, 0.0)
  _write_outputs(run, results, state)
  return results


def _baseline(run: Run, state: TrainState, results: dict, seconds: float):
  """Trains the float model (none when it comes pretrained), evaluates and saves it."""
  epochs = 0 if run.pretrained else run.config.baseline.epochs
  state, seconds, _, _ = run.train(state, run.config.baseline, state.inq.masks, epochs=epochs, data_seed=run.config.seed * 1000,
                                desc="baseline", results=results, seconds=seconds,
                                record={"stage": "baseline"})
  ev = run.evaluate(state)
  results["baseline"] = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                         "epochs": epochs, "seconds": round(seconds, 3),
                         **_top5(ev)}
  run.writer.write(int(state.step), stage="baseline", test_accuracy=ev["accuracy"],
                   test_loss=ev["loss"])
  logging.info("baseline (fp32): test accuracy %.4f", ev["accuracy"])
  checkpoints.save_variables(str(checkpoints.path(run.workdir) / checkpoints.BASELINE_DIR),
                             {"params": state.params, "batch_stats": state.batch_stats})
  return state.at(PRUNE if run.prune_cfg is not None else INQ, phase=-1), 0.0


def _prune(run: Run, state: TrainState, results: dict, seconds: float):
  """Iterative magnitude pruning, each step retrained with the pruned weights frozen at 0."""
  pcfg, c = run.prune_cfg, run.config.prune
  results.setdefault("prune", {"steps": []})
  for t in range(max(int(state.phase), 1), pcfg.steps + 1):
    if int(state.phase) < t:  # prune to this step's sparsity, then retrain
      start = time.perf_counter()
      keep = prune.prune_masks(state.params, pcfg, t, previous=state.keep)
      state = state.replace(params=prune.apply(state.params, keep), keep=keep)
      tx, _ = run.optimizer(c, c.epochs_per_step, _frozen(state))  # fresh momentum
      state = run.devices.replicate(state.replace(opt_state=tx.init(state.params)).at(PRUNE, t))
      seconds = time.perf_counter() - start
      run.save(state, results, seconds)
    state, seconds, _, _ = run.train(state, c, _frozen(state), epochs=c.epochs_per_step,
                                  data_seed=run.config.seed * 1000 + 500 + t,
                                  desc=f"pruning step {t}/{pcfg.steps}", results=results,
                                  seconds=seconds, record={"stage": "prune", "phase": t})
    ev = run.evaluate(state)
    counts = prune.summary(state.keep)
    total = sum(s.total for s in counts.values())
    sparsity = sum(s.pruned for s in counts.values()) / max(total, 1)
    entry = {"step": t, "sparsity": sparsity, "test_accuracy": ev["accuracy"],
             "seconds": round(seconds, 3),
             "layers": {p: s.pruned / max(s.total, 1) for p, s in counts.items()}}
    results["prune"]["steps"] = [x for x in results["prune"]["steps"] if x["step"] != t]
    results["prune"]["steps"].append(entry)
    run.writer.write(int(state.step), stage="prune", phase=t, sparsity=sparsity,
                     test_accuracy=ev["accuracy"])
    logging.info("pruning step %d/%d: sparsity %.4f, test accuracy %.4f", t, pcfg.steps,
                 sparsity, ev["accuracy"])
  return state.at(INQ, phase=-1), 0.0


def _frozen(state: TrainState):
  """Pruned weights as frozen masks, shaped like the INQ masks (one state structure)."""
  frozen = prune.frozen(state.keep)
  return jax.tree.map(lambda like, m: jnp.broadcast_to(m, jnp.shape(like)),
                      state.inq.masks, frozen)


def _phase_epochs(run: Run, p: int) -> float:
  last = p == run.inq_cfg.num_steps - 1
  return run.config.inq.final_finetune_epochs if last else run.config.inq.epochs_per_phase


def _advance(run: Run, state: TrainState, p: int, results: dict):
  """Quantizes and freezes portion p; a fresh optimizer (carrying momentum if asked)."""
  start = time.perf_counter()
  params, inq_state = inq.advance(state.params, state.inq)
  tx, _ = run.optimizer(run.config.inq, _phase_epochs(run, p), inq_state.masks)
  opt_state = tx.init(params)
  if run.config.inq.carry_optimizer_state and p > 0:
    opt_state = opt_state.copy()  # the chain's own mapping type: the step's signature
    opt_state["base"] = steps.reset_count(state.opt_state["base"])
  state = run.devices.replicate(
      state.replace(params=params, inq=inq_state, opt_state=opt_state).at(INQ, p))
  jax.block_until_ready(state)
  seconds = time.perf_counter() - start
  ev = run.evaluate(state)  # what this quantization step costs before retraining
  portion = run.inq_cfg.portions[p]
  results["phases"] = [x for x in results["phases"] if x["portion"] != portion] + [
      {"portion": portion, "quantized_test_accuracy": ev["accuracy"]}]
  run.writer.write(int(state.step), stage="inq", phase=p + 1, portion=portion,
                   quantized_test_accuracy=ev["accuracy"])
  run.save(state, results, seconds)
  logging.info("phase %d: quantized and froze %g of each layer in %.2fs; test accuracy "
               "%.4f before retraining", p + 1, portion, seconds, ev["accuracy"])
  run.callback("advance", phase=p, params=state.params, inq_state=state.inq)
  return state, seconds


def _retrain_phase(run: Run, state: TrainState, p: int, results: dict, seconds: float):
  """Retrains the still-float weights of phase p and evaluates."""
  portion, n = run.inq_cfg.portions[p], run.inq_cfg.num_steps
  epochs = _phase_epochs(run, p)
  entry = next(x for x in results["phases"] if x["portion"] == portion)
  finetune = p == n - 1 and epochs > 0  # every kernel frozen: biases and BN train on
  state, seconds, last, compile_seconds = run.train(
      state, run.config.inq, state.inq.masks, epochs=epochs, data_seed=run.config.seed * 1000 + p + 1,
      desc=f"phase {p + 1}/{n} (portion {portion:g})", results=results, seconds=seconds,
      record={"stage": "inq", "phase": p + 1, "portion": portion},
      eval_entry=entry if finetune else None)
  ev = run.evaluate(state)  # after a finetune: its last epoch's evaluation, reused
  if last is not None:
    train_loss = last["train_loss"]
  elif epochs == 0:  # quantize-only phase: the loss it leaves on the train split
    train_loss = run.evaluate(state, split="train")["loss"]
  else:  # resumed after the phase's last epoch: read back what was logged
    losses = [r["train_loss"] for r in reporting.read_metrics(run.workdir)
              if r.get("stage") == "inq" and r.get("phase") == p + 1 and "train_loss" in r]
    train_loss = losses[-1] if losses else float("nan")
  if last is not None:  # this session compiled and trained (not a resume after the end)
    entry["compile_seconds"] = round(compile_seconds, 3)
  entry.update({"test_accuracy": ev["accuracy"], "train_loss": train_loss,
                "seconds": round(seconds, 3), "epochs": epochs, "test_loss": ev["loss"],
                **_top5(ev)})
  entry.setdefault("compile_seconds", 0.0)
  run.writer.write(int(state.step), stage="inq", phase=p + 1, portion=portion,
                   test_accuracy=ev["accuracy"], test_loss=ev["loss"])
  logging.info("phase %d/%d (portion %g): test accuracy %.4f", p + 1, n, portion,
               ev["accuracy"])
  run.callback("phase_end", phase=p, params=state.params, inq_state=state.inq)
  return state


def _top5(ev: dict) -> dict:
  return {"top5_accuracy": ev["top5_accuracy"]} if "top5_accuracy" in ev else {}


def _final(run: Run, state: TrainState, results: dict) -> dict:
  """Verifies every quantized leaf, saves the final model and the packed .inq file."""
  try:
    summary = inq.verify(state.params, state.inq)
    all_pow2 = all(s.frozen == s.total for s in summary.values())
    distinct = max(s.distinct_values for s in summary.values())
  except ValueError as e:  # reported, not hidden: results.json says so
    logging.error("verify failed: %s", e)
    all_pow2, distinct = False, -1
  final = {"test_accuracy": results["phases"][-1]["test_accuracy"], "bits": run.inq_cfg.bits,
           "all_pow2": all_pow2, "max_distinct_values": distinct,
           "quantized_leaves": len(state.inq.exponents),
           "quantized_weights": int(sum(np.size(m) for p, m in
                                        leaves_with_paths(state.inq.masks)[0]
                                        if p in state.inq.exponents))}
  checkpoints.save_final(run.workdir, state.variables, state.inq)
  if all_pow2:
    stats = checkpoints.export_run(run.workdir)
    if stats is not None:
      final["export"] = {k: stats[k] for k in (
          "bytes", "float32_bytes", "ratio", "quantized_weights", "quantized_bytes")}
      logging.info("exported %s: %d bytes, %.1fx smaller than float32", stats["file"],
                   stats["bytes"], stats["ratio"])
  return final


# ---------------------------------------------------------------- outputs


def _keep_plot_layer(run: Run, state: TrainState) -> None:
  """Keeps the plotted layer's pretrained weights, for weights.png at the end."""
  flat = [(p, x) for p, x in leaves_with_paths(state.params)[0] if p in state.inq.exponents]
  pattern = run.config.plot_layer
  chosen = [(p, x) for p, x in flat if pattern and re.search(pattern, p)] or \
      [max(flat, key=lambda px: np.size(px[1]))]
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, path=chosen[0][0], weights=np.asarray(chosen[0][1], np.float32))
    (checkpoints.path(run.workdir) / PLOT_FILE).write_bytes(buffer.getvalue())


def _write_outputs(run: Run, results: dict, state: Optional[TrainState]) -> None:
  reporting.write_results(run.workdir, results)
  if jax.process_index() != 0:
    return
  reporting.plot_accuracy(run.workdir, results)
  source = checkpoints.path(run.workdir) / PLOT_FILE
  if state is not None and source.exists():
    saved = np.load(io.BytesIO(source.read_bytes()))
    name = str(saved["path"])
    after = dict(leaves_with_paths(state.params)[0])[name]
    n1, n2 = state.inq.bounds(name)
    reporting.plot_weights(run.workdir, name, saved["weights"], np.asarray(after, np.float32),
                           np.asarray(n1), np.asarray(n2))
