"""What an experiment config asks for, checked before any data is read.

`inq_config` and `prune_config` are the library's configs of a run,
`distill_options` its distillation (or None), `check_config` every error that
needs no data (`check_lowbit_options` those of the low-bit options), and
`plan` the segments a run trains (the baseline, each pruning step, each INQ
phase) with their epochs: the trainer runs them, the sweep counts their steps.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional

import jax
import ml_collections

from experiments import reporting
from experiments import steps
from experiments.train_state import BASELINE, INQ, PRUNE
from inq_jax import prune
from inq_jax import quantize


def inq_config(config: ml_collections.ConfigDict) -> quantize.INQConfig:
  """The run's `INQConfig` (`config.inq.layer_bits`: per-layer widths, first match wins)."""
  c = config.inq
  layer_bits = tuple(tuple(pair) for pair in c.get("layer_bits", ()))
  return quantize.INQConfig(bits=c.bits, portions=tuple(c.portions), strategy=c.strategy,
                            include=c.include, exclude=c.exclude, granularity=c.granularity,
                            calibration=c.calibration, seed=config.seed,
                            layer_bits=layer_bits)


def distill_options(config: ml_collections.ConfigDict) -> Optional[steps.Distill]:
  """The INQ segments' distillation (`steps.Distill`), or None when `inq.distill_weight` is 0."""
  c = config.inq
  weight = c.get("distill_weight", 0.0)
  if not weight:
    return None
  return steps.Distill(weight=float(weight), temperature=float(c.get("distill_temperature", 1.0)))


def check_lowbit_options(config: ml_collections.ConfigDict) -> None:
  """The errors of the low-bit options (issue #32) that need no data.

  `inq.distill_weight` in [0, 1], `inq.distill_temperature` > 0 and finite,
  `inq.bn_reestimate_batches` an int >= 0. (`inq.layer_bits` is checked by
  `INQConfig`, built by `inq_config`.)
  """
  c = config.inq
  number = lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool)
  weight = c.get("distill_weight", 0.0)
  if not number(weight) or not 0 <= weight <= 1:
    raise ValueError(f"inq.distill_weight must be a number in [0, 1] (0 = no distillation), "
                     f"got {weight!r}")
  temperature = c.get("distill_temperature", 1.0)
  if not number(temperature) or not 0 < temperature < math.inf:
    raise ValueError(f"inq.distill_temperature must be a number > 0, got {temperature!r}")
  batches = c.get("bn_reestimate_batches", 0)
  if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
    raise ValueError(f"inq.bn_reestimate_batches must be an int >= 0 (0 = off), got "
                     f"{batches!r}")


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
  check_lowbit_options(config)
  if config.optimizer not in ("sgd", "adam"):
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {config.optimizer!r}")
  for key in ("baseline.epochs", "prune.epochs", "inq.epochs", "inq.final_finetune_epochs"):
    stage, name = key.split(".")
    value = config[stage][name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not \
        0 <= value < float("inf"):
      raise ValueError(f"{key} must be a number of epochs >= 0 (fractions allowed), got "
                       f"{value!r}")
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
    if config[name] and not reporting.abs_path(config[name]).exists():
      raise FileNotFoundError(f"{name} {config[name]} does not exist")
  return inq_cfg, prune_cfg


class Segment(NamedTuple):
  """One stretch of training with one optimizer: the baseline, a pruning step or an INQ phase."""
  stage: int       # BASELINE, PRUNE or INQ
  index: int       # the pruning step or the INQ phase, from 1 (0 for the baseline)
  epochs: float
  data_seed: int   # with the epoch, fixes the data order and augmentation
  desc: str        # for logs and progress bars
  record: dict     # the fields of its lines in metrics.jsonl


def plan(config: ml_collections.ConfigDict) -> list:
  """Every `Segment` a run of `config` trains, in order (what the trainer and the sweep count)."""
  seed = config.seed * 1000
  pretrained_model = bool(config.init_checkpoint or config.init_torchvision)
  out = [Segment(BASELINE, 0, 0 if pretrained_model else config.baseline.epochs, seed,
                 "baseline", {"stage": "baseline"})]
  prune_cfg = prune_config(config)
  if prune_cfg is not None:
    n = prune_cfg.steps
    out += [Segment(PRUNE, t, config.prune.epochs, seed + 500 + t, f"pruning step {t}/{n}",
                    {"stage": "prune", "phase": t}) for t in range(1, n + 1)]
  portions = inq_config(config).portions
  for k, portion in enumerate(portions, 1):
    # After the last portion every kernel is frozen: a finetune of the rest.
    epochs = config.inq.final_finetune_epochs if k == len(portions) else config.inq.epochs
    out.append(Segment(INQ, k, epochs, seed + k, f"phase {k}/{len(portions)} (portion "
                       f"{portion:g})", {"stage": "inq", "phase": k, "portion": portion}))
  return out
