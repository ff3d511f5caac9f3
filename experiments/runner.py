"""A run's fixed parts (data, model, initial weights, checkpoints, metrics) and its training.

`Run.train` trains one segment of the plan (`recipe.plan`) from wherever its
state stands, saving a checkpoint after every epoch. With distillation
(`config.inq.distill_weight` > 0) every INQ segment trains against the run's
own fp32 baseline, `Run.teacher` (read back from WORKDIR/baseline_variables,
so a resumed run has the same teacher). `Run.reestimate_bn` re-estimates the
BatchNorm statistics after a quantization step (`config.inq.bn_reestimate_batches`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from experiments import checkpoints, loops, models, optimizer, recipe, reporting, steps
from experiments.data import input_pipeline
from experiments.mesh import Devices
from experiments.models import pretrained
from experiments.recipe import Segment
from experiments.train_state import BASELINE, INQ, STAGE_NAMES, TrainState
from inq_jax import tree

Callback = Callable[..., None]


def _get_dataset(dataset_config):
  """The dataset; with several processes, process 0 prepares it while the rest wait.

  Processes preparing one fresh TFDS data_dir at once would race on its renames.
  """
  if jax.process_count() == 1:
    return input_pipeline.get_dataset(dataset_config)
  data = input_pipeline.get_dataset(dataset_config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("inq_jax: dataset prepared")
  return data or input_pipeline.get_dataset(dataset_config)


class Progress(NamedTuple):
  """What a checkpoint keeps beside the TrainState (as JSON).

  results: results.json's entries of every finished stage, pruning step and phase.
  seconds: wall time of the stage, pruning step or phase in progress, all sessions.
  entry: what the phase in progress has produced so far (its portion, the accuracy
    right after quantizing, a finetune's per-epoch test accuracies).
  """
  results: dict
  seconds: float = 0.0
  entry: Optional[dict] = None


class Trained(NamedTuple):
  """What `Run.train` returns."""
  state: TrainState
  progress: Progress
  metrics: Optional[dict]   # the last epoch's (None: nothing left to train)
  compile_seconds: float    # compiling the step, this session
  tested: Optional[dict]    # with test_each_epoch: the last epoch's test evaluation


class Run:
  """What a run reads (data, model, initial weights) and where it writes.

  The run's state is what its functions pass along (a TrainState and a
  Progress); a Run only holds the fixed parts, and the open checkpoints and
  metrics writer.
  """

  def __init__(self, config, workdir: str, callback: Optional[Callback]):
    self.config, self.workdir = config, workdir
    self.inq_cfg, self.prune_cfg = recipe.check_config(config)
    self.segments = {(s.stage, s.index): s for s in recipe.plan(config)}
    self.callback = callback or (lambda event, **info: None)
    self.data = _get_dataset(config.dataset)
    self.steps_per_epoch = self.data.steps_per_epoch(config.batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(f"batch_size={config.batch_size} is larger than the train split "
                       f"({self.data.train_size} examples)")
    self.model = models.from_config(config, self.data.num_classes)
    self.devices = Devices()
    self.eval_step = steps.make_eval_step(self.model, self.devices,
                                          top5=self.data.num_classes > 10,
                                          normalization=self.data.normalization)
    self.distill = recipe.distill_options(config)
    self._teacher = self._bn_stats_step = None  # made when first needed
    self.initial = self._initial_variables()  # validates init_checkpoint before any write
    # INQ's selection must pick some of this model's weights, and weights from a
    # file must be usable: checked now, not once the baseline has trained.
    recipe.check_initial(config, self.initial)
    self.ckpt = self.writer = None

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
      loaded = pretrained.load_torchvision_resnet(self.config.init_torchvision,
                                                  self.config.model)
      return {"params": loaded["params"], "batch_stats": loaded.get("batch_stats", {})}
    return variables

  def segment(self, stage: int, index: int = 0) -> Segment:
    return self.segments[(stage, index)]

  def initial_state(self) -> TrainState:
    """The run's start, and the template every checkpoint restores into."""
    params = self.initial["params"]
    # Nothing pruned yet, in the layout of the pruning's masks (whether or not
    # the run prunes): an array for every weight INQ selects. So the freeze
    # selects with masks the step receives as arguments from the first step on,
    # as in every later stage; an all-False constant would let XLA drop the
    # select and fuse the update otherwise, which changes its float rounding.
    keep = jax.tree_util.tree_map_with_path(
        lambda p, x: np.ones(np.shape(x) if self.inq_cfg.selects(tree.path_str(p)) else (),
                             bool), params)
    tx, _ = self.optimizer(self.segment(BASELINE))
    return self.devices.replicate(TrainState(
        step=jnp.int32(0), params=params, batch_stats=self.initial["batch_stats"],
        opt_state=tx.init(params), inq_state=None, keep=keep, stage=jnp.int32(BASELINE),
        phase=jnp.int32(0), epoch=jnp.int32(0)))

  def new_results(self) -> dict:
    return {"config": checkpoints.config_dict(self.config), "num_devices": self.devices.count,
            "baseline": None, "phases": []}

  def restore(self, template: TrainState) -> Optional[tuple]:
    """(state, progress) of the newest checkpoint, or None when there is none."""
    restored = self.ckpt.restore(template, complete=self._with_saved_inq_state)
    if restored is None:
      return None
    state, meta = restored
    return self.devices.replicate(state), Progress(meta["results"], meta["seconds"],
                                                   meta["entry"])

  def _with_saved_inq_state(self, abstract: TrainState, saved) -> TrainState:
    # Before INQ starts there is none; after, its layout is the checkpoint's.
    if saved["inq_state"] is None:
      return abstract
    return abstract.replace(inq_state=checkpoints.abstract_inq_state(
        saved["inq_state"], abstract.params, self.inq_cfg))

  def optimizer(self, segment: Segment):
    """(optimizer, learning-rate schedule) of `segment`: a fresh schedule every time."""
    schedule = optimizer.learning_rate(self.config[STAGE_NAMES[segment.stage]],
                                       self.steps_per_epoch, segment.epochs)
    return optimizer.make_optimizer(self.config, schedule), schedule

  def evaluate(self, state: TrainState, split: str = "test") -> dict:
    if split == "test":
      batches = loops.test_batches(self.data, self.config.eval_batch_size, self.devices)
    else:  # the train split in eval mode (a phase that does not train)
      batches = loops.train_split_eval_batches(self.data, self.config.eval_batch_size,
                                               self.devices, self.config.seed)
    return loops.evaluate(self.eval_step, state.params, state.batch_stats, batches,
                          self.devices)

  def teacher(self):
    """The distillation teacher's variables, replicated: the run's fp32 baseline.

    Read from WORKDIR/baseline_variables, which the baseline stage writes
    before any INQ checkpoint exists, so a fresh run and a resumed one get the
    same teacher: the float model INQ started from (with pruning: the dense
    baseline, before pruning). Loaded once per session.
    """
    if self._teacher is None:
      source = str(reporting.abs_path(self.workdir) / checkpoints.BASELINE_DIR)
      variables = checkpoints.load_variables(source, self.initial)
      self._teacher = self.devices.replicate(
          steps.model_variables(variables["params"], variables["batch_stats"]))
    return self._teacher

  def reestimate_bn(self, params, batch_stats, index: int):
    """The BatchNorm statistics of `params`, re-estimated from train batches.

    `config.inq.bn_reestimate_batches` batches of `batch_size` plain
    (unaugmented) train images, a fixed draw per phase `index`, each run
    forward in train mode (`steps.make_bn_stats_step`): every BatchNorm's
    running statistics move toward the batch's with the model's own momentum
    (flax: new = momentum * old + (1 - momentum) * batch; with momentum 0.9,
    50 batches leave 0.5% of the old statistics). No gradient: `params` are
    only read. Returns `batch_stats` as it is when the option is off (0) or
    the model has no BatchNorm.
    """
    n = self.config.inq.get("bn_reestimate_batches", 0)
    if not n or not jax.tree_util.tree_leaves(batch_stats):
      return batch_stats
    if self._bn_stats_step is None:
      self._bn_stats_step = steps.make_bn_stats_step(self.model, self.devices,
                                                     normalization=self.data.normalization)
    seed = self.config.seed * 1000 + 700 + index
    batches = loops.bn_batches(self.data, self.config.batch_size, seed, n)
    return loops.reestimate_bn(self._bn_stats_step, params, batch_stats, batches, self.devices)

  def save(self, state: TrainState, progress: Progress) -> None:
    # Fields set on the host (epoch, stage) become global arrays, which a
    # multi-process orbax save needs; what is already replicated stays put.
    self.ckpt.save(self.devices.replicate(state), progress._asdict())

  def train(self, state: TrainState, segment: Segment, progress: Progress, *,
            test_each_epoch: bool = False) -> Trained:
    """Trains the rest of `segment`, from `state.epoch`, saving after each epoch.

    A fresh jitted step for this segment's optimizer, compiled ahead of time so
    that `compile_seconds` shows what rebuilding costs. With `test_each_epoch`
    (a final finetune), the test split is evaluated after every epoch and kept
    in the entry's "epoch_test_accuracy" list, so one run shows what each
    finetune epoch buys back.
    """
    tx, schedule = self.optimizer(segment)
    chunks = optimizer.epoch_steps(segment.epochs, self.steps_per_epoch)
    if int(state.epoch) >= len(chunks):
      return Trained(state, progress, None, 0.0, None)
    # Distillation: every INQ segment (each phase and the final finetune).
    teacher = self.teacher() if self.distill and segment.stage == INQ else None
    train_step = steps.make_train_step(self.model, tx, self.devices, self.config.seed,
                                       normalization=self.data.normalization,
                                       distill=self.distill if teacher is not None else None)
    train_step, compile_seconds = steps.compile_step(
        train_step, state, self.config.batch_size, self.data.image_shape, self.devices,
        teacher=teacher)
    if teacher is not None:
      train_step = _with_teacher(train_step, teacher)
    seconds, entry = progress.seconds + compile_seconds, progress.entry
    metrics = tested = None
    for e in range(int(state.epoch), len(chunks)):
      batches = self.data.train_batches(self.config.batch_size, e, segment.data_seed)
      state, metrics = loops.train_epoch(
          state, train_step, batches, num_steps=chunks[e], devices=self.devices,
          desc=f"{segment.desc} epoch {e + 1}/{len(chunks)}",
          on_step=lambda s: self.callback("step", step=s))
      seconds += metrics["seconds"]
      metrics["images"] = metrics["steps"] * self.config.batch_size
      state = state.replace(epoch=jnp.int32(e + 1))
      lr = float(schedule(e * self.steps_per_epoch + metrics["steps"] - 1))  # at the epoch's end
      if test_each_epoch:  # before the save, so a resume keeps it
        tested = self.evaluate(state)
        curve = (entry or {}).get("epoch_test_accuracy", [])[:e] + [tested["accuracy"]]
        entry = {**(entry or {}), "epoch_test_accuracy": curve}
      self.writer.write(int(state.step), epoch=e + 1, lr=lr, **segment.record, **metrics,
                        **({"test_accuracy": tested["accuracy"]} if tested else {}))
      progress = Progress(progress.results, seconds, entry)
      self.save(state, progress)
      self.callback("epoch", stage=segment.record["stage"],
                    phase=segment.record.get("phase", 0), epoch=e + 1, ts=state)
    return Trained(state, progress, metrics, compile_seconds, tested)


def _with_teacher(compiled, teacher):
  """`step(state, batch)` of a distilling step `compiled(state, batch, teacher)`."""
  return lambda state, batch: compiled(state, batch, teacher)
