"""fp32 baseline, then every INQ phase; resumable from the workdir at any epoch.

The run is a small state machine whose position (stage, phase, epoch) is saved
with every checkpoint:

  baseline epochs -> evaluate -> [optional pruning: for t in 1..T, prune to
  sparsity s_t, retrain with the pruned weights frozen at zero] -> for each
  portion sigma_n:
      advance (partition + quantize + freeze) -> fresh optimizer, re-jitted step,
      learning-rate schedule restarted -> retrain the float weights -> evaluate
  -> verify every quantized leaf -> results.json, plots.

Everything random is a pure function of (config.seed, stage, epoch, step), so a
rerun after a kill replays the interrupted epoch bit-for-bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import inq_jax
from experiments import checkpoints, input_pipeline, models, reporting
from inq_jax import prune
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

Callback = Callable[..., None]


def inq_config(config: ml_collections.ConfigDict) -> inq.INQConfig:
  c = config.inq
  return inq.INQConfig(bits=c.bits, portions=tuple(c.portions), strategy=c.strategy,
                       include=c.include, exclude=c.exclude, granularity=c.granularity,
                       calibration=c.get("calibration", "absmax"), seed=config.seed)


def prune_config(config: ml_collections.ConfigDict) -> Optional[prune.PruneConfig]:
  """The pruning stage's config, or None when `config.prune.sparsity` is empty."""
  c = config.get("prune")
  if c is None or not c.sparsity:
    return None
  return prune.PruneConfig(sparsity=tuple(tuple(pair) for pair in c.sparsity),
                           include=config.inq.include, exclude=config.inq.exclude,
                           steps=c.steps, schedule=c.schedule)


def check_config(config: ml_collections.ConfigDict) -> inq.INQConfig:
  """Every config error, before anything is read or written."""
  inq_cfg = inq_config(config)
  prune_config(config)
  if config.optimizer not in ("sgd", "adam"):
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
  for stage in ("baseline", "prune", "inq"):
    if stage in config and config[stage].lr_schedule not in ("cosine", "step", "constant"):
      raise ValueError(f"{stage}.lr_schedule must be cosine, step or constant, got "
                       f"{config[stage].lr_schedule!r}")
  for name in ("baseline.epochs", "inq.epochs_per_phase", "inq.final_finetune_epochs",
               "prune.epochs_per_step"):
    if name.split(".")[0] not in config:
      continue
    value = config[name.split(".")[0]][name.split(".")[1]]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
        or value == float("inf"):
      raise ValueError(f"{name} must be a number of epochs >= 0 (fractions allowed), "
                       f"got {value!r}")
  n = jax.device_count()
  for name in ("batch_size", "eval_batch_size"):
    if config[name] % n:
      raise ValueError(f"{name}={config[name]} is not divisible by the {n} devices")
  if config.init_checkpoint and config.init_torchvision:
    raise ValueError("set at most one of init_checkpoint and init_torchvision")
  return inq_cfg


def epoch_steps(epochs: float, steps_per_epoch: int) -> list:
  """Steps in each (possibly partial, last) epoch of a stage of `epochs` epochs.

  Fractional epochs let a study give every INQ phase, say, 0.4 epochs: the
  last chunk is the first part of a fresh shuffle, and resuming works per chunk.
  """
  total = int(round(epochs * steps_per_epoch))
  full, rest = divmod(total, steps_per_epoch)
  return [steps_per_epoch] * full + ([rest] if rest else [])


def learning_rate(config, steps_per_epoch: int, epochs: float):
  """The schedule of one stage/phase; `config` is `config.baseline` or `config.inq`."""
  base_lr = config.learning_rate
  total = max(1, sum(epoch_steps(epochs, steps_per_epoch)))
  if config.lr_schedule == "cosine":
    schedule = optax.cosine_decay_schedule(base_lr, total)
  elif config.lr_schedule == "step":
    every = max(1, int(steps_per_epoch * config.step_epochs))
    schedule = optax.piecewise_constant_schedule(
        base_lr, {every * i: config.step_factor for i in range(1, total // every + 1)})
  else:
    schedule = optax.constant_schedule(base_lr)
  warmup = int(config.warmup_epochs * steps_per_epoch)
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, base_lr, warmup), schedule], [warmup])
  return schedule


def make_optimizer(config, schedule, masks=None) -> optax.GradientTransformation:
  """Base optimizer, with `inq_jax.optim.elementwise_freeze(masks)` last when given."""
  if config.optimizer == "sgd":
    base = optax.chain(optax.add_decayed_weights(config.weight_decay),
                       optax.sgd(schedule, momentum=config.momentum or None,
                                 nesterov=config.nesterov))
  else:
    base = optax.adamw(schedule, weight_decay=config.weight_decay)
  if masks is None:
    return base
  return optax.chain(base, inq_jax.optim.elementwise_freeze(masks))


class Devices:
  """A 1-D mesh over every device: batch sharded on `data`, state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))
    self.count = jax.device_count()
    # Fake multi-device CPU backends can deadlock in the all-reduce unless each
    # step is waited for; real accelerators keep their async dispatch.
    self.sync_each_step = jax.default_backend() == "cpu" and self.count > 1

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
            for k, v in batch.items()}

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)


def _variables(params, batch_stats):
  return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def make_train_step(model, tx, devices: Devices, seed: int):
  """The jitted step; rebuilt for every phase because `tx` changes."""
  dropout_key = jax.random.key(seed)

  def step(ts, batch):
    rng = jax.random.fold_in(dropout_key, ts["step"])

    def loss_fn(params):
      logits, updates = model.apply(_variables(params, ts["batch_stats"]), batch["image"],
                                    train=True, mutable=["batch_stats"],
                                    rngs={"dropout": rng})
      logits = logits.astype(jnp.float32)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(ts["params"])
    deltas, opt_state = tx.update(grads, ts["opt_state"], ts["params"])
    new = {"step": ts["step"] + 1, "params": optax.apply_updates(ts["params"], deltas),
           "batch_stats": updates.get("batch_stats", ts["batch_stats"]),
           "opt_state": opt_state}
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return new, {"loss": loss, "accuracy": accuracy}

  return jax.jit(step, in_shardings=(devices.replicated, devices.batch),
                 out_shardings=(devices.replicated, devices.replicated), donate_argnums=0)


def make_eval_step(model, devices: Devices, top5: bool):
  def step(params, batch_stats, batch):
    logits = model.apply(_variables(params, batch_stats), batch["image"], train=False)
    logits = logits.astype(jnp.float32)
    mask = batch["mask"].astype(jnp.float32)
    label = batch["label"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    out = {"correct1": jnp.sum((jnp.argmax(logits, -1) == label) * mask),
           "loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}
    if top5:
      hit = jnp.any(jax.lax.top_k(logits, 5)[1] == label[:, None], axis=-1)
      out["correct5"] = jnp.sum(hit * mask)
    return out

  return jax.jit(step, in_shardings=(devices.replicated, devices.replicated, devices.batch),
                 out_shardings=devices.replicated)


class Run:
  """One run in one workdir: data, model, devices, checkpoints, metrics."""

  def __init__(self, config, workdir, inq_cfg, callback: Optional[Callback]):
    self.config, self.workdir, self.inq_cfg = config, workdir, inq_cfg
    self.prune_cfg = prune_config(config)
    self.callback = callback or (lambda event, **info: None)
    self.data = input_pipeline.get_dataset(config.dataset)
    self.model = models.get_model(config.model, self.data.num_classes,
                                  dtype=jnp.dtype(config.dtype))
    self.devices = Devices()
    self.steps_per_epoch = self.data.steps_per_epoch(config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={config.batch_size} is larger than the train split "
                       f"({self.data.train_size} examples)")
    self.top5 = self.data.num_classes > 10
    self.eval_step = make_eval_step(self.model, self.devices, self.top5)
    self.ckpt = checkpoints.RunCheckpoints(workdir, config.max_checkpoints_to_keep)
    self.writer = reporting.MetricWriter(workdir)

  # ------------------------------------------------------------------ pieces

  def init_variables(self):
    variables = models.init_variables(
        self.model, (1,) + tuple(self.data.image_shape), jax.random.key(self.config.seed))
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    if self.config.init_checkpoint:
      variables = checkpoints.load_variables(self.config.init_checkpoint, variables)
    elif self.config.init_torchvision:
      from experiments import pretrained  # pylint: disable=g-import-not-at-top
      loaded = pretrained.load_torchvision_resnet(self.config.init_torchvision,
                                                  self.config.model)
      variables = {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    return variables

  def train_state(self, variables, tx, step=0):
    return self.devices.replicate({
        "step": jnp.asarray(step, jnp.int32), "params": variables["params"],
        "batch_stats": variables["batch_stats"], "opt_state": tx.init(variables["params"])})

  def compile_step(self, train_step, ts):
    """Compiles this phase's step ahead of time: (executable, seconds).

    Timed on its own so results.json can show what rebuilding the step for
    every phase costs (`compile_seconds`).
    """
    start = time.perf_counter()
    shape = (self.config.batch_size,) + tuple(self.data.image_shape)
    batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=self.devices.batch),
             "label": jax.ShapeDtypeStruct(shape[:1], jnp.int32, sharding=self.devices.batch)}
    compiled = train_step.lower(ts, batch).compile()
    return compiled, time.perf_counter() - start

  def run_epoch(self, ts, train_step, *, data_seed, epoch, desc, schedule, steps=None):
    """One epoch, or its first `steps` steps (the partial last epoch of a stage)."""
    steps = self.steps_per_epoch if steps is None else steps
    bar = reporting.progress(steps, desc)
    sums, n, pending = {"loss": 0.0, "accuracy": 0.0}, 0, []

    def drain():  # fetch metrics in groups: no host sync per step
      for m in jax.device_get(pending):
        for key in sums:
          sums[key] += float(m[key])
      pending.clear()

    step = int(ts["step"])
    start = time.perf_counter()
    for batch in self.data.train_batches(self.config.batch_size, epoch, data_seed):
      ts, metrics = train_step(ts, self.devices.put_batch(batch))
      if self.devices.sync_each_step:
        jax.block_until_ready(ts)
      pending.append(metrics)
      n += 1
      bar.update(1)
      self.callback("step", step=step + n)
      if len(pending) >= 20:
        drain()
        bar.set_postfix(loss=f"{sums['loss'] / n:.4f}", acc=f"{sums['accuracy'] / n:.3f}")
      if n == steps:
        break
    drain()
    bar.close()
    jax.block_until_ready(ts)
    seconds = time.perf_counter() - start
    loss, acc = sums["loss"] / max(n, 1), sums["accuracy"] / max(n, 1)
    lr = float(schedule(epoch * self.steps_per_epoch + n - 1))  # at the epoch's end
    logging.info("%s: train loss %.4f, train accuracy %.4f, lr %.2e, %.1fs (%.0f img/s)",
                 desc, loss, acc, lr, seconds, n * self.config.batch_size / seconds)
    return ts, {"train_loss": loss, "train_accuracy": acc, "lr": lr, "seconds": seconds,
                "images": n * self.config.batch_size}

  def evaluate(self, ts, split="test") -> dict:
    sums = None
    if split == "test":
      batches = self.data.test_batches(self.config.eval_batch_size)
    else:  # the train split in eval mode (used where a phase has no training)
      batches = ({**b, "mask": np.ones(len(b["label"]), bool)} for b in
                 self.data.train_batches(self.config.eval_batch_size, 0, self.config.seed,
                                         augment=False))
    for batch in batches:
      out = self.eval_step(ts["params"], ts["batch_stats"], self.devices.put_batch(batch))
      if self.devices.sync_each_step:
        jax.block_until_ready(out)
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    sums = jax.device_get(sums)
    count = float(sums["count"])
    result = {"accuracy": float(sums["correct1"]) / count, "loss": float(sums["loss"]) / count}
    if self.top5:
      result["top5_accuracy"] = float(sums["correct5"]) / count
    return result

  def save(self, ts, inq_state, meta, keep=None):
    tree = {"train": ts, "inq": _inq_tree(inq_state) if keep is None else {"keep": keep}}
    self.ckpt.save(tree, meta)

  def restore(self, ts_template, inq_template):
    tree = self.ckpt.restore_state({"train": ts_template, "inq": _inq_tree(inq_template)})
    ts = self.devices.replicate(tree["train"])
    inq_state = None
    if inq_template is not None:
      inq_state = inq.INQState(masks=tree["inq"]["masks"], exponents=tree["inq"]["exponents"],
                               step=tree["inq"]["step"], config=inq_template.config,
                               pruned=tree["inq"].get("pruned", {}))
    return ts, inq_state


def _inq_tree(state):
  if state is None:
    return {}
  tree = {"masks": state.masks, "exponents": state.exponents, "step": state.step}
  if state.pruned:  # only pruned runs: older checkpoints keep their layout
    tree["pruned"] = state.pruned
  return tree


def _meta(stage, phase, epoch, seconds, results):
  return {"stage": stage, "phase": phase, "epoch": epoch, "seconds": seconds,
          "results": results}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       callback: Optional[Callback] = None) -> dict:
  """Runs (or resumes, or reprints) the experiment `config` in `workdir`.

  Args:
    config: an experiment ConfigDict (see experiments/configs/).
    workdir: where checkpoints, results.json, metrics and plots go. Rerunning
      the same command resumes; a different config in the same workdir is refused.
    callback: optional `callback(event, **info)`, called at "step", "epoch",
      "advance" and "phase_end" (tests use it to inspect or interrupt a run).

  Returns:
    The results dict that is also written to `workdir/results.json`.
  """
  inq_cfg = check_config(config)
  checkpoints.claim_workdir(workdir, config)
  run = Run(config, workdir, inq_cfg, callback)
  try:
    return _train_and_evaluate(run)
  finally:
    run.ckpt.close()
    run.writer.close()


def _train_and_evaluate(run: Run) -> dict:
  config, workdir, inq_cfg = run.config, run.workdir, run.inq_cfg
  meta = run.ckpt.latest_meta()
  if meta is not None and meta["stage"] == "done":
    logging.info("%s holds a finished run; its results:", workdir)
    results = meta["results"]
    _finish_outputs(run, results, None, None)
    return results

  variables = run.init_variables()
  pretrained = bool(config.init_checkpoint or config.init_torchvision)
  results = meta["results"] if meta else {
      "config": checkpoints.config_dict(config), "num_devices": run.devices.count,
      "baseline": None, "phases": []}
  stage = meta["stage"] if meta else "baseline"
  ts = None

  # ---------------------------------------------------------------- baseline
  if stage == "baseline":
    epochs = 0 if pretrained else config.baseline.epochs
    schedule = learning_rate(config.baseline, run.steps_per_epoch, epochs)
    chunks = epoch_steps(epochs, run.steps_per_epoch)
    tx = make_optimizer(config, schedule)
    ts = run.train_state(variables, tx)
    start_epoch, seconds = 0, 0.0
    if meta is not None:
      ts, _ = run.restore(ts, None)
      start_epoch, seconds = meta["epoch"], meta["seconds"]
      logging.info("resuming the baseline after epoch %d", start_epoch)
    train_step = make_train_step(run.model, tx, run.devices, config.seed)
    if start_epoch < len(chunks):
      train_step, _ = run.compile_step(train_step, ts)
    for epoch in range(start_epoch, len(chunks)):
      ts, m = run.run_epoch(ts, train_step, data_seed=config.seed * 1000, epoch=epoch,
                            desc=f"baseline epoch {epoch + 1}/{len(chunks)}",
                            schedule=schedule, steps=chunks[epoch])
      seconds += m["seconds"]
      run.writer.write(int(ts["step"]), stage="baseline", epoch=epoch + 1, **m)
      run.save(ts, None, _meta("baseline", 0, epoch + 1, seconds, results))
      run.callback("epoch", stage="baseline", epoch=epoch + 1, ts=ts)
    ev = run.evaluate(ts)
    results["baseline"] = {"test_accuracy": ev["accuracy"], "test_loss": ev["loss"],
                           "epochs": epochs, "seconds": round(seconds, 3),
                           **({"top5_accuracy": ev["top5_accuracy"]} if run.top5 else {})}
    run.writer.write(int(ts["step"]), stage="baseline", test_accuracy=ev["accuracy"],
                     test_loss=ev["loss"])
    logging.info("baseline (fp32): test accuracy %.4f", ev["accuracy"])
    # The fp32 model on its own, reusable as `config.init_checkpoint` (e.g. to
    # run several INQ settings from one baseline).
    checkpoints.save_variables(os.path.join(workdir, BASELINE_DIR),
                               {"params": ts["params"], "batch_stats": ts["batch_stats"]})

  # ----------------------------------------------------------- pruning (optional)
  keep = None
  if stage in ("baseline", "prune") and run.prune_cfg is not None:
    ts, keep = _prune_stage(run, ts, variables, results,
                            meta if stage == "prune" else None)
  if stage in ("baseline", "prune"):  # INQ starts: codebooks from these weights
    inq_state = inq.init(ts["params"], inq_cfg, pruned=keep)
    _save_plot_layer(run, ts["params"], inq_state)
    phase, epoch, advanced, seconds = 0, 0, False, 0.0
  else:
    phase, epoch, advanced, seconds = meta["phase"], meta["epoch"], True, meta["seconds"]
    ts = None
    inq_state = None

  # -------------------------------------------------------------------- INQ
  n_phases = inq_cfg.num_steps
  for p in range(phase, n_phases):
    portion = inq_cfg.portions[p]
    last = p == n_phases - 1
    epochs = config.inq.final_finetune_epochs if last else config.inq.epochs_per_phase
    schedule = learning_rate(config.inq, run.steps_per_epoch, epochs)
    chunks = epoch_steps(epochs, run.steps_per_epoch)
    if advanced:  # resuming inside phase p: rebuild the templates, then restore
      template_inq = inq.init(variables["params"], inq_cfg)
      if run.prune_cfg is not None:  # the checkpoint also holds the pruned counts
        template_inq = dataclasses.replace(template_inq, pruned={
            path: jnp.zeros((), jnp.int32) for path in template_inq.exponents})
      tx = make_optimizer(config, schedule, template_inq.masks)
      ts, inq_state = run.restore(run.train_state(variables, tx), template_inq)
      logging.info("resuming phase %d (portion %g) after %d epochs", p + 1, portion, epoch)
    else:
      start = time.perf_counter()
      prev_opt_state = ts["opt_state"]
      params, inq_state = inq.advance(ts["params"], inq_state)
      tx = make_optimizer(config, schedule, inq_state.masks)
      opt_state = tx.init(params)
      if config.inq.carry_optimizer_state and p > 0:
        # Keep momentum, restart the schedule (count) and take the new masks.
        inner = optax.tree_utils.tree_set(prev_opt_state[0], count=jnp.zeros([], jnp.int32))
        opt_state = (inner, opt_state[1])  # freeze's own copy of the new masks
      ts = run.devices.replicate({**ts, "params": params, "opt_state": opt_state})
      jax.block_until_ready(ts)
      seconds, epoch = time.perf_counter() - start, 0
      run.save(ts, inq_state, _meta("inq", p, 0, seconds, results))
      logging.info("phase %d/%d: quantized and froze %g of each layer in %.2fs "
                   "(checkpoint %.2fs)", p + 1, n_phases, portion, seconds,
                   time.perf_counter() - start - seconds)
      run.callback("advance", phase=p, params=ts["params"], inq_state=inq_state)
    advanced = False
    train_step = make_train_step(run.model, tx, run.devices, config.seed)  # per phase
    compile_seconds = 0.0
    if epoch < len(chunks):
      train_step, compile_seconds = run.compile_step(train_step, ts)
      seconds += compile_seconds
      logging.info("phase %d/%d: train step compiled in %.2fs", p + 1, n_phases,
                   compile_seconds)
    last_metrics = None
    for e in range(epoch, len(chunks)):
      ts, last_metrics = run.run_epoch(
          ts, train_step, data_seed=config.seed * 1000 + p + 1, epoch=e, schedule=schedule,
          steps=chunks[e],
          desc=f"phase {p + 1}/{n_phases} (portion {portion:g}) epoch {e + 1}/{len(chunks)}")
      seconds += last_metrics["seconds"]
      run.writer.write(int(ts["step"]), stage="inq", phase=p + 1, portion=portion,
                       epoch=e + 1, **last_metrics)
      run.save(ts, inq_state, _meta("inq", p, e + 1, seconds, results))
      run.callback("epoch", stage="inq", phase=p, epoch=e + 1, ts=ts)
    ev = run.evaluate(ts)
    if last_metrics is not None:
      train_loss = last_metrics["train_loss"]
    elif not chunks:  # quantize-only phase: measure the loss it leaves on the train split
      train_loss = run.evaluate(ts, split="train")["loss"]
    else:  # resumed after the last epoch's checkpoint: read it back from the metrics
      train_loss = _last_logged_train_loss(workdir, p + 1)
    entry = {"portion": portion, "test_accuracy": ev["accuracy"], "train_loss": train_loss,
             "seconds": round(seconds, 3), "epochs": epochs, "test_loss": ev["loss"],
             "compile_seconds": round(compile_seconds, 3),
             **({"top5_accuracy": ev["top5_accuracy"]} if run.top5 else {})}
    results["phases"] = [x for x in results["phases"] if x["portion"] != portion] + [entry]
    run.writer.write(int(ts["step"]), stage="inq", phase=p + 1, portion=portion,
                     test_accuracy=ev["accuracy"], test_loss=ev["loss"])
    logging.info("phase %d/%d (portion %g): test accuracy %.4f", p + 1, n_phases, portion,
                 ev["accuracy"])
    run.callback("phase_end", phase=p, params=ts["params"], inq_state=inq_state)

  # ------------------------------------------------------------------ final
  results["final"] = _final(inq_cfg, ts, inq_state, results)
  # The deployable model: float weights + INQ state, then the packed b-bit file.
  checkpoints.save_final(workdir, {"params": ts["params"], "batch_stats": ts["batch_stats"]},
                         inq_state)
  if results["final"]["all_pow2"]:
    stats = checkpoints.export_run(workdir)
    if stats is not None:
      results["final"]["export"] = {k: stats[k] for k in (
          "bytes", "float32_bytes", "ratio", "quantized_weights", "quantized_bytes")}
      logging.info("exported %s: %d bytes, %.1fx smaller than float32",
                   os.path.join(workdir, checkpoints.EXPORT_FILE), stats["bytes"], stats["ratio"])
  run.save(ts, inq_state, _meta("done", n_phases, 0, seconds, results))
  _finish_outputs(run, results, ts["params"], inq_state)
  return results


def _prune_stage(run: Run, ts, variables, results, meta):
  """Iterative magnitude pruning with retraining; returns (train state, keep mask).

  Step t prunes each layer to sparsity s_t (prune.PruneConfig), zeroes the pruned
  weights and retrains for `prune.epochs_per_step` epochs with them frozen, so
  they stay exactly zero. Resumable at any epoch, like the other stages.
  """
  config, pcfg = run.config, run.prune_cfg
  schedule = learning_rate(config.prune, run.steps_per_epoch, config.prune.epochs_per_step)
  chunks = epoch_steps(config.prune.epochs_per_step, run.steps_per_epoch)
  first, epoch, seconds, keep = 1, 0, 0.0, None
  if meta is not None:  # resuming inside pruning step meta["phase"]
    template = prune.prune_masks(variables["params"], pcfg, 1)
    tx = make_optimizer(config, schedule, prune.frozen(template))
    tree = run.ckpt.restore_state({"train": run.train_state(variables, tx),
                                   "inq": {"keep": template}})
    ts, keep = run.devices.replicate(tree["train"]), tree["inq"]["keep"]
    first, epoch, seconds = meta["phase"], meta["epoch"], meta["seconds"]
    logging.info("resuming pruning step %d after %d epochs", first, epoch)
  results.setdefault("prune", {"steps": []})
  for t in range(first, pcfg.steps + 1):
    if meta is None or t > first:
      start = time.perf_counter()
      keep = prune.prune_masks(ts["params"], pcfg, t, previous=keep)
      params = prune.apply(ts["params"], keep)
      tx = make_optimizer(config, schedule, prune.frozen(keep))
      ts = run.devices.replicate({**ts, "params": params, "opt_state": tx.init(params)})
      epoch, seconds = 0, time.perf_counter() - start
      run.save(ts, None, _meta("prune", t, 0, seconds, results), keep=keep)
    train_step = make_train_step(run.model, tx, run.devices, config.seed)
    if epoch < len(chunks):
      train_step, compile_seconds = run.compile_step(train_step, ts)
      seconds += compile_seconds
    for e in range(epoch, len(chunks)):
      ts, m = run.run_epoch(ts, train_step, data_seed=config.seed * 1000 + 500 + t, epoch=e,
                            schedule=schedule, steps=chunks[e],
                            desc=f"pruning step {t}/{pcfg.steps} epoch {e + 1}/{len(chunks)}")
      seconds += m["seconds"]
      run.writer.write(int(ts["step"]), stage="prune", phase=t, epoch=e + 1, **m)
      run.save(ts, None, _meta("prune", t, e + 1, seconds, results), keep=keep)
      run.callback("epoch", stage="prune", phase=t, epoch=e + 1, ts=ts)
    ev = run.evaluate(ts)
    counts = prune.summary(keep)
    total = sum(c.total for c in counts.values())
    sparsity = sum(c.pruned for c in counts.values()) / max(total, 1)
    entry = {"step": t, "sparsity": sparsity, "test_accuracy": ev["accuracy"],
             "seconds": round(seconds, 3),
             "layers": {p: c.pruned / max(c.total, 1) for p, c in counts.items()}}
    results["prune"]["steps"] = [x for x in results["prune"]["steps"] if x["step"] != t]
    results["prune"]["steps"].append(entry)
    run.writer.write(int(ts["step"]), stage="prune", phase=t, sparsity=sparsity,
                     test_accuracy=ev["accuracy"])
    logging.info("pruning step %d/%d: sparsity %.4f, test accuracy %.4f", t, pcfg.steps,
                 sparsity, ev["accuracy"])
  return ts, keep


def _final(inq_cfg, ts, inq_state, results) -> dict:
  try:
    summary = inq.verify(ts["params"], inq_state)
    all_pow2 = all(s.frozen == s.total for s in summary.values())
    distinct = max(s.distinct_values for s in summary.values())
  except ValueError as e:  # reported, not hidden: results.json says so
    logging.error("verify failed: %s", e)
    all_pow2, distinct = False, -1
  return {"test_accuracy": results["phases"][-1]["test_accuracy"], "bits": inq_cfg.bits,
          "all_pow2": all_pow2, "max_distinct_values": distinct,
          "quantized_leaves": len(inq_state.exponents),
          "quantized_weights": int(sum(np.size(m) for p, m in _mask_leaves(inq_state)))}


def _mask_leaves(inq_state):
  flat, _ = leaves_with_paths(inq_state.masks)
  return [(p, m) for p, m in flat if p in inq_state.exponents]


def _last_logged_train_loss(workdir, phase) -> float:
  loss = float("nan")
  with open(os.path.join(workdir, reporting.METRICS_FILE)) as f:
    for line in f:
      r = json.loads(line)
      if r.get("phase") == phase and "train_loss" in r:
        loss = r["train_loss"]
  return loss


PLOT_FILE = "inq_start_layer.npz"
BASELINE_DIR = "baseline_variables"


def _save_plot_layer(run, params, inq_state):
  """Keeps the pretrained weights of the plotted layer for weights.png."""
  flat = [(p, x) for p, x in leaves_with_paths(params)[0] if p in inq_state.exponents]
  pattern = run.config.plot_layer
  chosen = [(p, x) for p, x in flat if pattern and re.search(pattern, p)] or \
      [max(flat, key=lambda px: np.size(px[1]))]
  path, w = chosen[0]
  if jax.process_index() == 0:
    tmp = os.path.join(run.workdir, PLOT_FILE + ".tmp.npz")
    np.savez(tmp, path=path, weights=np.asarray(w, np.float32))
    os.replace(tmp, os.path.join(run.workdir, PLOT_FILE))


def _finish_outputs(run, results, params, inq_state):
  workdir = run.workdir
  reporting.write_results(workdir, results)
  if jax.process_index() == 0:
    reporting.plot_accuracy(workdir, results)
    plot_src = os.path.join(workdir, PLOT_FILE)
    if params is not None and os.path.exists(plot_src):
      saved = np.load(plot_src)
      path = str(saved["path"])
      after = dict(leaves_with_paths(params)[0])[path]
      n1, n2 = inq_state.bounds(path)
      reporting.plot_weights(workdir, path, saved["weights"], np.asarray(after, np.float32),
                             np.asarray(n1), np.asarray(n2))
  for line in reporting.summary_lines(results):
    print(line, flush=True)
  print(f"results: {os.path.join(workdir, reporting.RESULTS_FILE)}", flush=True)
