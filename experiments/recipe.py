"""What an experiment config asks for, checked before anything is read or written.

`inq_config` and `prune_config` are the library's configs of a run,
`distill_options` its distillation (issue #32's low-bit option) or None;
`check_config` every error that needs no data, `check_initial` those that need
the model's initial weights (both before the workdir is claimed); and `plan`
the segments a run trains (the baseline, each pruning step, each INQ phase)
with their epochs: the trainer runs them, the sweep counts their steps.

`SCHEMA` maps every key of an experiment config (`configs/common.py`'s
`base_config()`) to the `Rule` its value must pass. A key with no rule is
refused, and so is a key the config lacks, so a new setting cannot go
unchecked: tests/experiments/test_guards.py fails on a key of base_config()
without a rule, and tries every rule's bad values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import re
import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from experiments import models
from experiments import reporting
from experiments import steps
from experiments.configs import common
from experiments.data import builders
from experiments.errors import BUGS, ConfigError, InputError, InputNotFoundError
from experiments.errors import show as errors_show
from experiments.models import pretrained
from experiments.train_state import BASELINE, INQ, PRUNE
from inq_jax import prune
from inq_jax import quantize
from inq_jax import tree


def inq_config(config: ml_collections.ConfigDict) -> quantize.INQConfig:
  """The run's `INQConfig` (`config.inq.layer_bits`: per-layer widths, first match wins)."""
  c = config.inq
  return quantize.INQConfig(bits=c.bits, portions=tuple(c.portions), strategy=c.strategy,
                            include=c.include, exclude=c.exclude, granularity=c.granularity,
                            calibration=c.calibration, seed=config.seed,
                            layer_bits=_pairs(c.layer_bits))


def _pairs(layer_bits):
  # A config file or the command line gives lists; INQConfig checks the rest.
  if isinstance(layer_bits, (list, tuple)):
    return tuple(tuple(p) if isinstance(p, list) else p for p in layer_bits)
  return layer_bits


def distill_options(config: ml_collections.ConfigDict) -> Optional[steps.Distill]:
  """The INQ segments' distillation (`steps.Distill`), or None when `inq.distill_weight` is 0."""
  c = config.inq
  if not c.distill_weight:
    return None
  return steps.Distill(weight=float(c.distill_weight), temperature=float(c.distill_temperature))


def prune_config(config: ml_collections.ConfigDict) -> Optional[prune.PruneConfig]:
  """The pruning stage's config, or None when `config.prune.sparsity` is empty."""
  c = config.prune
  if not c.sparsity:
    return None
  return prune.PruneConfig(sparsity=tuple(tuple(pair) for pair in c.sparsity),
                           include=config.inq.include, exclude=config.inq.exclude,
                           steps=c.steps, schedule=c.schedule)


# ------------------------------------------------------------------ rules


class _Said(str):
  """A problem text that already shows the value (a library's own message)."""


class _Lib(str):
  """A problem text from a library check, which may not show the whole value."""


def said(text: str) -> str:
  """A rule's problem text that shows the value itself (so the message does not repeat it)."""
  return _Said(text)


class Rule(NamedTuple):
  """What one config key accepts.

  check: check(value, config) -> None when fine, else the problem ("must be
    ..."; a `_Said` text shows the value itself). `config` is the experiment
    config holding the key, for rules that depend on another key.
  bad: values the rule refuses; the tests try each one (with generic ones).
  fix: what to do, when the default value is no example (e.g. a path).
  optional: the key may be absent (read with `config.get`).
  exists: "dir" or "file": a path that must exist (checked by `check_config`,
    not by `check_values`, which touches no file).
  """
  check: Callable[[Any, Any], Optional[str]]
  bad: tuple
  fix: str = ""
  optional: bool = False
  exists: Optional[str] = None


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


# Upper bounds that no sensible run reaches; past them a typo (an extra zero,
# 1e9 for 1e-9) would exhaust host memory (a batch is built whole, a stage's
# steps are listed) or train for years before anything looks wrong.
MAX_BATCH = 2**17
MAX_EPOCHS = 10_000
MAX_LEARNING_RATE = 100.0


def number_rule(what: str, lo=None, hi=None, *, optional=False, **kwargs) -> Rule:
  """A `_number` rule (for other configs' schemas: the sweep's)."""
  return _number(what, lo, hi, **kwargs)._replace(optional=optional)


def _number(what: str, lo=None, hi=None, *, integer=False, lo_open=False, hi_open=False,
            none=False, extra_bad=()) -> Rule:
  """A number (an int with `integer`) in [lo, hi] (open ends as asked), finite; or None."""
  def check(v, config):
    del config
    if v is None and none:
      return None
    if not (_is_int(v) if integer else _is_real(v)):
      return f"must be {what}"
    if not integer and not math.isfinite(float(v)):
      return f"must be finite ({what})"
    if lo is not None and (v <= lo if lo_open else v < lo):
      return f"must be {what}"
    if hi is not None and (v >= hi if hi_open else v > hi):
      return f"must be {'below' if hi_open else 'at most'} {hi:g} ({what})"
    return None
  bad = ["1", True] + ([] if none else [None]) + (
      [1.5] if integer else [float("nan"), float("inf"), -float("inf")])
  if lo is not None:
    bad.append(lo if lo_open else (lo - 1 if integer else lo - 0.5))
  if hi is not None:
    bad.append(hi if hi_open else (hi + 1 if integer else hi * 2 + 1))
  return Rule(check, tuple(bad) + tuple(extra_bad))


def _choice(*values, optional=False) -> Rule:
  def check(v, config):
    del config
    if not isinstance(v, str) or v not in values:
      return f"must be one of {', '.join(values)}"
    return None
  return Rule(check, ("nope", values[0].upper() + "x", None, 1), optional=optional)


def _bool() -> Rule:
  def check(v, config):
    del config
    return None if isinstance(v, (bool, np.bool_)) else "must be True or False"
  return Rule(check, (1, "True", "yes", None))


def _path(what: str, exists: Optional[str], fix: str) -> Rule:
  """None (not set) or a path; with `exists` it must be there when set."""
  def check(v, config):
    del config
    if v is None:
      return None
    if not isinstance(v, str) or (v and not v.strip()) or "\0" in v:
      return f"must be {what}"
    if reporting.is_remote(v) and not re.match(r"^[a-z][a-z0-9+.-]*://[^/\s]+", v):
      return f"must be {what}, and a remote one must name its bucket (gs://BUCKET/...)"
    return None
  return Rule(check, (3, "   ", "a\0b", "gs://", "gs:///data"), fix=fix, exists=exists)


def _library(make: Callable[[Any], Any], bad: tuple, *, fix: str = "") -> Rule:
  """Whatever the library accepts: `make(value)` raises its own TypeError/ValueError."""
  def check(v, config):
    del config
    try:
      make(v)
    except (TypeError, ValueError) as e:
      return _Lib(str(e))
    return None
  return Rule(check, bad, fix=fix)


def _regex(none: bool) -> Rule:
  def check(v, config):
    del config
    if v is None and none:
      return None
    if not isinstance(v, str):
      return "must be a regex string" + (" or None" if none else "")
    try:
      tree.check_regex(v, "the pattern")
    except ValueError as e:
      return _Said(str(e))
    return None
  return Rule(check, ("(", "[a-", 3) + (() if none else (None,)))


def _split() -> Rule:
  """A TFDS split string (`train`, `train[:2048]`, `train[10%:]`, `train+test`)."""
  def check(v, config):
    del config
    if not isinstance(v, str) or not v.strip():
      return "must be a TFDS split such as 'train', 'train[:2048]' or 'train[90%:]'"
    try:
      tfds.core.ReadInstruction.from_spec(v)
    except (ValueError, AssertionError) as e:
      return _Said(f"{v!r} is not a TFDS split: " + str(e).splitlines()[-1].strip()
                   + " (e.g. 'train', 'train[:2048]', 'train[90%:]', 'train+test')")
    return None
  return Rule(check, ("", "train[", "train[::2]", "train[abc]", 3, None))


def _model_kwargs(v, config) -> Optional[str]:
  """The model's own options: fields of its class, each of its default's type."""
  if not isinstance(v, (dict, ml_collections.ConfigDict)):
    return "must be a dict of the model's options"
  model = models.MODELS.get(config.get("model"))
  if model is None:
    return None  # `model` itself is refused
  fields = {f.name: f for f in dataclasses.fields(model)
            if f.init and f.name not in ("parent", "name", "num_classes", "dtype")}
  for key, value in dict(v).items():
    if key not in fields:
      return _Lib(f"model {config.model!r} has no option {key!r}; its options: "
                  f"{sorted(fields) or 'none'}")
    default = fields[key].default
    if isinstance(default, bool) and not isinstance(value, bool):
      return _Lib(f"option {key!r} of model {config.model!r} must be True or False, "
                  f"got {value!r}")
  return None


def _init_torchvision(v, config) -> Optional[str]:
  problem = _path("a path", None, "").check(v, config)
  if problem or v is None:
    return problem
  if config.get("model") not in pretrained.ARCHS:
    return _Said(f"{v!r}: torchvision weights fit only models "
                 f"{', '.join(pretrained.ARCHS)}, not {config.get('model')!r}")
  if not v.endswith((".pth", ".pt", ".safetensors")):
    return "must be a .pth, .pt or .safetensors file of torchvision weights"
  return None


def _stage_rules(stage: str) -> dict:
  return {
      f"{stage}.epochs": _number("a number of epochs >= 0 (fractions allowed)", 0,
                                 MAX_EPOCHS),
      f"{stage}.learning_rate": _number("a number > 0", 0, MAX_LEARNING_RATE, lo_open=True),
      f"{stage}.lr_schedule": _choice("cosine", "step", "constant"),
      f"{stage}.step_epochs": _number("a number of epochs > 0", 0, MAX_EPOCHS, lo_open=True),
      # x step_factor every step_epochs: a factor above 1 grows the rate without end.
      f"{stage}.step_factor": _number("a number in (0, 1]", 0, 1, lo_open=True),
      f"{stage}.warmup_epochs": _number("a number of epochs >= 0", 0, MAX_EPOCHS),
  }


_PATH_FIX = "give an existing path, or leave it unset"

SCHEMA: dict = {
    "model": _choice(*models.MODELS),
    "model_kwargs": Rule(_model_kwargs, ({"no_such_option": True}, "lenet", 3)),
    # float64 needs jax's x64 mode (off), in which jax would silently compute in float32.
    "dtype": _choice("float32", "bfloat16", "float16"),
    "seed": _library(lambda v: quantize.INQConfig(seed=v), (-1, 2**32, 1.5, "0", None, True)),
    "distributed": _bool(),
    "dataset.name": _choice(*builders.NAMES),
    "dataset.data_dir": _path("a directory (local or gs://)", None, "e.g. ~/tensorflow_datasets"),
    "dataset.manual_dir": _path("a directory", "dir", _PATH_FIX),
    "dataset.train_split": _split(),
    "dataset.test_split": _split(),
    "dataset.augment": _bool(),
    "dataset.image_size": _number("an int number of pixels >= 8", 8, 1024, integer=True),
    "dataset.workers": _number("an int >= 0 (0: decode in this process; None: one per CPU)",
                               0, 1024, integer=True, none=True),
    "batch_size": _number("a positive int", 1, MAX_BATCH, integer=True),
    "eval_batch_size": _number("a positive int", 1, MAX_BATCH, integer=True),
    "optimizer": _choice("sgd", "adam"),
    "momentum": _number("a number in [0, 1)", 0, 1, hi_open=True),
    "nesterov": _bool(),
    "weight_decay": _number("a number in [0, 1)", 0, 1, hi_open=True),
    **_stage_rules("baseline"),
    "init_checkpoint": _path("a path", "dir", _PATH_FIX),
    "init_torchvision": Rule(_init_torchvision, (3, "weights.txt"), fix=_PATH_FIX,
                             exists="file"),
    **_stage_rules("inq"),
    "inq.bits": _library(lambda v: quantize.INQConfig(bits=v), (1, 9, 4.5, "5", True, None)),
    "inq.portions": _library(
        lambda v: quantize.INQConfig(portions=v),
        ((), (0.5,), (0.5, 0.4, 1.0), (0.0, 1.0), (0.5, 1.5), "0.5,1.0", (float("nan"), 1.0),
         None)),
    "inq.strategy": _library(lambda v: quantize.INQConfig(strategy=v), ("size", None, 1)),
    "inq.granularity": _library(lambda v: quantize.INQConfig(granularity=v),
                                ("tensor", None)),
    "inq.calibration": _library(lambda v: quantize.INQConfig(calibration=v), ("max", None)),
    "inq.include": _regex(none=False),
    "inq.exclude": _regex(none=True),
    "inq.carry_optimizer_state": _bool(),
    "inq.final_finetune_epochs": _number("a number of epochs >= 0 (fractions allowed)", 0,
                                         MAX_EPOCHS),
    # The low-bit options (issue #32).
    "inq.layer_bits": _library(
        lambda v: quantize.INQConfig(layer_bits=_pairs(v)),
        ((("^conv1/", 9),), (("(", 8),), (("^conv1/",),), ("^conv1/", 8), 8, "^conv1/=8",
         None)),
    "inq.distill_weight": _number("a number in [0, 1] (0 = no distillation)", 0, 1),
    "inq.distill_temperature": _number("a number > 0", 0, 1000, lo_open=True),
    "inq.bn_reestimate_batches": _number("an int >= 0 (0 = off)", 0, 100_000, integer=True),
    **_stage_rules("prune"),
    "prune.sparsity": _library(
        lambda v: v == () or v == [] or prune.PruneConfig(sparsity=v),
        ((("kernel", 1.0),), (("(", 0.5),), ("kernel",), 1.5, "0.5", (("kernel", -0.1),),
         None)),
    "prune.steps": _library(lambda v: prune.PruneConfig(sparsity=0.5, steps=v),
                            (0, -1, 1.5, True, None)),
    "prune.schedule": _library(lambda v: prune.PruneConfig(sparsity=0.5, schedule=v),
                               ("cubicc", None)),
    # 0 would keep no checkpoint, so a rerun could not resume.
    "max_checkpoints_to_keep": _number("an int >= 1", 1, 1000, integer=True),
    "plot_layer": _regex(none=False),
}


def _get(config, key: str):
  node = config
  for part in key.split("."):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def _cli(value) -> str:
  """`value` as a --config.KEY=VALUE override spells it."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(_cli(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value) if isinstance(value, str) else repr(value)


_DEFAULTS = common.base_config()


def _fix(key: str, rule: Rule, prefix: str) -> str:
  if rule.fix:
    return rule.fix
  try:
    default = _get(_DEFAULTS, key)
  except KeyError:
    return ""
  if isinstance(default, ml_collections.ConfigDict) or default is None:
    return ""
  return f"e.g. --config.{prefix}{key}={_cli(default)}"


def refuse(key: str, value, problem: str, rule: Optional[Rule] = None, prefix: str = ""):
  """The ConfigError for `key`'s `value` (`problem` as a rule says it)."""
  if isinstance(problem, _Lib):  # the library's words, after the value as it was given
    problem = _Said(f"{prefix}{key}={errors_show(value)}: {problem}")
  return ConfigError(prefix + key, value, problem,
                     _fix(key, rule, prefix) if rule is not None else "",
                     shows_value=isinstance(problem, _Said))


def leaf_keys(config, schema: dict, path: str = "") -> list:
  """Every key of `config` a rule covers (a rule's key may hold a whole dict)."""
  out = []
  for key in config.keys():
    full = f"{path}{key}"
    value = config[key]
    if full in schema or not isinstance(value, (dict, ml_collections.ConfigDict)):
      out.append(full)
    else:
      out += leaf_keys(value, schema, full + ".")
  return out


def check_values(config, schema: Optional[dict] = None, *, prefix: str = "") -> None:
  """Every key of `config` against its rule, touching no file and no device.

  Args:
    config: an experiment config (or, with `schema`, another config: the sweep's).
    schema: {dotted key: Rule}; `SCHEMA` by default.
    prefix: how the keys are named in messages (e.g. "experiment." in a sweep).

  Raises:
    ConfigError naming the first bad key (in the schema's order), its value and
    a fix; for a key no rule covers (e.g. a typo in a config file, which would
    leave the real key at its default), and for a missing key.
  """
  schema = SCHEMA if schema is None else schema
  for key in leaf_keys(config, schema):
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema), n=1)
      raise ConfigError(prefix + key, _get(config, key), "is not a setting of this config",
                        f"did you mean {prefix}{close[0]}?" if close else
                        "remove it (a misspelt key leaves the real one at its default)")
  for key, rule in schema.items():
    try:
      value = _get(config, key)
    except KeyError:
      if rule.optional:
        continue
      raise ConfigError(prefix + key, None, "is missing from the config",
                        "build configs on experiments/configs/common.py's base_config()"
                        ) from None
    problem = rule.check(value, config)
    if problem:
      raise refuse(key, value, problem, rule, prefix)


def check_paths(config, schema: Optional[dict] = None, *, prefix: str = "") -> None:
  """Every path a rule says must exist does (local or gs://)."""
  schema = SCHEMA if schema is None else schema
  for key, rule in schema.items():
    if rule.exists is None:
      continue
    try:
      value = _get(config, key)
    except KeyError:
      continue
    if not value:
      continue
    path = reporting.abs_path(value)
    try:  # is_dir only of a path that exists (on gs:// each is a request)
      exists = path.exists()
      is_dir = exists and path.is_dir()
    except BUGS:
      raise
    except Exception as e:  # pylint: disable=broad-except  (gcsfs/auth errors of any kind)
      raise InputError(f"{prefix}{key} {value} cannot be checked: {type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}; check the path, "
                       "the network and, for gs://, the credentials (gcloud auth "
                       "application-default login)") from None
    if not exists:
      raise InputNotFoundError(f"{prefix}{key} {value} does not exist; {_PATH_FIX}")
    if rule.exists == "dir" and not is_dir:
      raise refuse(key, value, "must be a directory, not a file", rule, prefix)
    if rule.exists == "file" and is_dir:
      raise refuse(key, value, "must be a file, not a directory", rule, prefix)


def check_config(config: ml_collections.ConfigDict):
  """Every error in `config` that needs no data: (INQConfig, PruneConfig or None).

  Each value against `SCHEMA`, then what depends on several keys, on the
  devices or on the file system. Raises ConfigError (or InputNotFoundError for
  a missing path) naming the key, the value and the fix.
  """
  check_values(config)
  if config.init_checkpoint and config.init_torchvision:
    raise ConfigError("init_torchvision", config.init_torchvision,
                      "cannot be set together with init_checkpoint "
                      f"({config.init_checkpoint!r})", "set at most one of the two",
                      shows_value=False)
  try:
    inq_cfg, prune_cfg = inq_config(config), prune_config(config)
  except (TypeError, ValueError) as e:  # what only the keys together get wrong
    raise ConfigError("inq", None, _Said(str(e)), shows_value=True) from None
  for stage in ("baseline", "prune", "inq"):
    c = config[stage]
    longest = max(c.epochs, config.inq.final_finetune_epochs) if stage == "inq" else c.epochs
    if 0 < longest < c.warmup_epochs:
      raise refuse(f"{stage}.warmup_epochs", c.warmup_epochs,
                   f"must not exceed the stage's {longest:g} epochs (the rate would never "
                   "reach learning_rate)")
  batch = config.batch_size
  n = jax.device_count()
  if batch % n:
    raise ConfigError("batch_size", batch, f"is not divisible by the {n} devices",
                      f"set --config.batch_size to a multiple of {n}, e.g. "
                      f"{max(n, batch // n * n)}")
  check_paths(config)
  return inq_cfg, prune_cfg


def check_initial(config: ml_collections.ConfigDict, variables: dict) -> None:
  """What needs the run's initial weights, before the workdir is claimed.

  `include`/`exclude` must select some of this model's weights, every
  `layer_bits` regex and `plot_layer` must match a quantized one; weights from
  a file (`init_checkpoint`, `init_torchvision`) must be finite, and the
  quantized ones the library's `quantize.init` accepts (no NaN, not all
  zero or subnormal).

  Raises:
    ConfigError naming the key (the pattern, or the file the weights came from).
  """
  inq_cfg = inq_config(config)
  params = variables["params"]
  try:
    selected = tree.select(params, inq_cfg.include, inq_cfg.exclude)
  except ValueError as e:  # a pattern matching nothing, or nothing left between the two
    message = str(e)
    key = "inq.include" if message.startswith("include=") and " minus " not in message \
        else "inq.exclude"
    value = inq_cfg.include if key == "inq.include" else inq_cfg.exclude
    raise ConfigError(key, value, _Said(message), "give a regex (re.search) over those '/'-joined paths",
                      shows_value=True) from None
  try:  # every layer_bits regex must match a quantized leaf (the library's own rule)
    quantize.abstract_state(params, inq_cfg)
  except ValueError as e:  # the selection passed above: only layer_bits is left to refuse
    raise ConfigError("inq.layer_bits", config.inq.layer_bits, _Said(str(e)),
                      "give regexes (re.search) over those '/'-joined paths, or ()",
                      shows_value=True) from None
  if config.plot_layer and not any(re.search(config.plot_layer, p) for p, _ in selected):
    raise refuse("plot_layer", config.plot_layer,
                 _Said(f"plot_layer={config.plot_layer!r} matches no quantized layer; they "
                       f"are {[p for p, _ in selected][:6]}"), SCHEMA["plot_layer"])
  source = next((k for k in ("init_checkpoint", "init_torchvision") if config[k]), None)
  if source is None:
    return  # freshly initialised weights: finite by construction
  for path, leaf in tree.leaves_with_paths(variables)[0]:
    values = np.asarray(leaf)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
      raise ConfigError(source, config[source], _Said(
          f"{config[source]}: {path} holds {int(np.sum(~np.isfinite(values)))} non-finite "
          "weights (NaN/Inf)"), "use a checkpoint of a run that did not diverge",
          shows_value=True)
  with warnings.catch_warnings():  # its advice about the codebooks comes again at INQ's start
    warnings.simplefilter("ignore")
    try:
      quantize.init(params, inq_cfg)
    except (TypeError, ValueError) as e:
      raise ConfigError(source, config[source], _Said(f"{config[source]}: {e}"),
                        shows_value=True) from None


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
