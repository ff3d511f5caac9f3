"""Orbax checkpoints of a run, its final model, and the one-run-one-config workdir guard.

Every path goes through `etils.epath` and orbax, so a workdir may be local or
remote (`gs://bucket/...`). `claim_workdir` takes the workdir's lock
(`workdir_lock`) and checks its config.json; the checkpoints refuse to write
once another run has taken the lock over, and a write that runs out of space
is reported once, naming what was being written (`errors.OutOfSpaceError`).
"""

from __future__ import annotations

import json
import logging as pylogging
import os
import sys
import traceback
from typing import Any, Callable, Iterable, Optional, Tuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from experiments import reporting
from experiments import workdir_lock
from experiments.configs import common
from experiments.errors import (BUGS, ConfigError, InputNotFoundError, Reported, WorkdirError,
                                WorkdirInUseError, is_out_of_space, out_of_space)
from inq_jax import export as inq_export
from inq_jax import quantize
from inq_jax.tree import leaves_with_paths

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BASELINE_DIR = "baseline_variables"  # the fp32 model, reusable as config.init_checkpoint
FINAL_DIR = "final"
EXPORT_FILE = "model.inq"
# The layout of what a run checkpoints (train_state.TrainState plus JSON meta).
# A workdir written with another layout is refused rather than misread.
RUN_FORMAT = 3
_FINAL_VERSION = 2


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def config_diff(old, new, prefix="") -> list:
  """['key: old -> new'] for every differing key of two JSON configs."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += config_diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


class _QuietOutOfSpace(pylogging.Filter):
  """Drops orbax's own reports of a write that ran out of space.

  Orbax logs the failure with a traceback from each of its writer threads
  (dozens of tracebacks for one full disk), and asyncio logs each of orbax's
  write tasks and tensorstore's futures whose failure nobody awaited ("Task
  exception was never retrieved", "Future exception ...", when the object is
  garbage-collected: whether and when depends on timing). The save raises the
  failure once, and `RunCheckpoints.save` reports it in one line naming the
  checkpoint. asyncio's reports are dropped whatever their source (a bare
  future names none): in this process the async writers are orbax's, and a
  full disk ends the run with the one-line error anyway.
  """

  def filter(self, record):
    if record.levelno < pylogging.ERROR:
      return True
    text = record.getMessage()
    if record.exc_info:
      text += "".join(traceback.format_exception(*record.exc_info))
    ours = record.name == "asyncio" or "/orbax/" in record.pathname
    return not (ours and is_out_of_space(Exception(text)))


# A filter acts on the records of its own logger only (not on those that
# propagate to it), so it goes on both loggers that carry orbax's reports.
for _name in ("absl", "asyncio"):
  pylogging.getLogger(_name).addFilter(_QuietOutOfSpace())


def _quiet_abandoned_writes() -> None:
  """Drops the 'Event loop is closed' reports of writes a failed save abandoned.

  When a save fails part-way (out of space), tensorstore still completes or
  fails the rest of its writes after orbax has closed the asyncio loop they
  report to; each prints a traceback as an unraisable error (one per write,
  beside the one error that says what happened). Nothing can act on them:
  the save itself raises.
  """
  previous = sys.unraisablehook
  if getattr(previous, "inq_jax_quiet", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value):
      return
    previous(unraisable)

  hook.inq_jax_quiet = True
  sys.unraisablehook = hook


# Every orbax save of this module (a run's checkpoints, `save_variables`) can
# abandon writes; the reports can come before the save's own error.
_quiet_abandoned_writes()  # at import, before any save


def _check_workdir(workdir: str, *, create: bool) -> None:
  """Refuses a workdir that is a file or cannot be written; with `create`, makes it.

  Raises:
    WorkdirError naming the path and the reason.
  """
  root = reporting.abs_path(workdir)
  if reporting.is_remote(workdir):
    return  # a bucket has no directories to check; the lock's write says if it is usable
  if root.exists() and not root.is_dir():
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory; pass a directory "
                       "(it is created if missing)")
  if not create:
    return
  try:
    root.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    if is_out_of_space(e):
      raise out_of_space(f"the workdir {workdir}", e) from None
    raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror or e}") from None
  if not os.access(root, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir {workdir} is not writable by this user; pass a "
                       "directory you can write")


def _broadcast_text(text: str) -> str:
  """Process 0's `text` on every process (at most 4 kB; one collective)."""
  data = np.zeros(4096, np.uint8)
  raw = text.encode()[:4096]
  data[:len(raw)] = np.frombuffer(raw, np.uint8)
  out = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(out).rstrip(b"\0").decode(errors="replace")


def lock_workdir(workdir: str, what: str = "run") -> Optional[workdir_lock.WorkdirLock]:
  """Takes the workdir's lock for this run: every process, or none, goes on.

  Process 0 takes it (and creates the workdir); with several processes it
  tells the others whether it did, so that a refused run stops everywhere.
  Returns the lock on process 0, None on the others.

  Raises:
    WorkdirInUseError (a live run holds it) or WorkdirError (not usable).
  """
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      _check_workdir(workdir, create=True)
      lock = workdir_lock.acquire(workdir, what)
    except BaseException as e:  # pylint: disable=broad-except  (told to the others, raised)
      error = e
  else:
    _check_workdir(workdir, create=False)
  if jax.process_count() > 1:
    told = _broadcast_text(f"{type(error).__name__}: {error}" if error is not None else "")
    if told and error is None:
      error = WorkdirInUseError(f"process 0 could not claim {workdir}: {told}")
  if error is not None:
    raise error
  return lock


def _with_defaults(old: dict, new: dict) -> dict:
  """`old` with the experiment keys it lacks (added to the trainer since) at their defaults.

  A workdir written before a setting existed then resumes, unless the
  command sets that key to something else.
  """
  defaults = config_dict(common.base_config())

  def fill(o, d):
    if not isinstance(o, dict) or not isinstance(d, dict):
      return o
    return {**{k: v for k, v in d.items() if k not in o},
            **{k: fill(v, d.get(k)) for k, v in o.items()}}

  if "experiment" in new and isinstance(old.get("experiment"), dict):  # a study's config
    return {**old, "experiment": fill(old["experiment"], defaults)}
  return fill(old, defaults) if "inq" in new else old


def claim_workdir(workdir: str, config: ml_collections.ConfigDict, *, what: str = "run",
                  may_change: Iterable[str] = ()) -> Optional[workdir_lock.WorkdirLock]:
  """Takes the workdir's lock, then writes config.json or checks that it holds this config.

  Args:
    workdir: the run's (or the study's) directory.
    config: its config.
    what: what the workdir holds, for the error ("run", "study").
    may_change: top-level keys that may differ from the stored config (a study's
      lists of cells may grow); config.json is then rewritten with the new ones.

  Returns:
    The lock (on process 0; None on the others). `RunCheckpoints.close`
    releases a run's; whoever claims a study releases its own.

  Raises:
    WorkdirInUseError if a live run holds the workdir; WorkdirError if it
    holds another config (listing every differing key), a config.json that is
    not JSON, or cannot be written.
  """
  lock = lock_workdir(workdir, what)
  try:
    _write_config(workdir, config, what, may_change)
  except BaseException:
    if lock is not None:
      lock.release()
    raise
  return lock


def _write_config(workdir: str, config, what: str, may_change: Iterable[str]) -> None:
  file = reporting.abs_path(workdir) / CONFIG_FILE
  new = config_dict(config)
  if file.exists():
    try:
      old = json.loads(file.read_text())
      if not isinstance(old, dict):
        raise ValueError(f"a JSON {type(old).__name__}, not an object")
    except (ValueError, UnicodeDecodeError) as e:
      raise WorkdirError(
          f"{file} is damaged ({e}); it records the config of the {what} in {workdir}. "
          "Restore it, or use a new --workdir") from None
    old = _with_defaults(old, new)
    fixed = lambda d: {k: v for k, v in d.items() if k not in may_change}
    diff = config_diff(fixed(old), fixed(new))
    if diff:
      raise WorkdirError(
          f"{workdir} holds a {what} with a different config; refusing to mix them. "
          f"Use a new --workdir, or rerun with the old config. Differences "
          f"(old -> new): " + "; ".join(diff[:10]))
    if old == new:
      return
  if jax.process_index() == 0:
    try:
      file.parent.mkdir(parents=True, exist_ok=True)
      reporting.atomic_write(file, json.dumps(new, indent=2, sort_keys=True))
    except OSError as e:
      if is_out_of_space(e):
        raise out_of_space(str(file), e) from None
      raise WorkdirError(f"cannot write {file}: {e.strerror or e}") from None


def _tree(metadata):
  """The tree of shapes and dtypes inside orbax's metadata of one saved item."""
  tree = getattr(metadata, "item_metadata", metadata)
  return getattr(tree, "tree", tree)


class RunCheckpoints:
  """The run's checkpoints: a `train_state.TrainState` plus JSON meta per save.

  Saves are numbered 1, 2, ...; the newest intact one is the resume point.
  Orbax writes each into a temporary directory and renames it when complete,
  so a kill during a save leaves the previous one as the newest.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    self._workdir, self._failed = workdir, False
    self._dir = reporting.abs_path(workdir) / CHECKPOINT_DIR
    # The handlers named up front, so that a fresh session can read a
    # checkpoint's metadata (`restore`'s `complete`) before saving anything.
    self._manager = ocp.CheckpointManager(self._dir, options=options, item_handlers={
        "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def restore(self, template: Any, complete: Optional[Callable[[Any, Any], Any]] = None
              ) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest intact checkpoint, or None if there is none.

    A damaged newer checkpoint (a disk error, a partial copy) is skipped with a
    warning naming it, and deleted so that it cannot push the intact one out.

    Args:
      template: a state of the layout to restore (its arrays give the shapes,
        dtypes and shardings).
      complete: optional `complete(abstract, saved)`: the abstract state to
        restore into, from the template's (`abstract`) and the checkpoint's own
        tree of shapes and dtypes (`saved`), for the parts whose layout only the
        checkpoint knows.

    Raises:
      ValueError if checkpoints exist but none can be read with this layout.
    """
    numbers = sorted(self._manager.all_steps(), reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    errors = []
    for number in numbers:
      try:
        target = abstract
        if complete is not None:
          target = complete(abstract, _tree(self._manager.item_metadata(number)["state"]))
        restored = self._manager.restore(number, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any damage: try an older one)
        errors.append(f"{self._dir / str(number)}: {type(e).__name__}: {str(e)[:300]}")
        logging.warning("checkpoint %s is unreadable (%s); trying an older one",
                        self._dir / str(number), e)
        continue
      meta = restored.meta
      if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        raise WorkdirError(
            f"{self._dir} was written by another version of this trainer (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, this one writes "
            f"{RUN_FORMAT}); start a new --workdir")
      for bad in numbers[:numbers.index(number)]:
        logging.warning("deleting unreadable checkpoint %s", self._dir / str(bad))
        self._manager.delete(bad)
      return restored.state, meta
    if errors:
      raise WorkdirError(f"no checkpoint in {self._dir} can be restored with this run's "
                       "layout (a damaged run, or one written by another version of this "
                       "trainer: start a new --workdir). " + " | ".join(errors[:3]))
    return None

  def save(self, state: Any, meta: dict) -> None:
    """Saves checkpoint latest+1 and waits for it.

    Raises:
      WorkdirInUseError if another run has taken the workdir's lock over;
      OutOfSpaceError naming the checkpoint if the disk is full (the earlier
      checkpoints stay intact: a rerun resumes from the newest).
    """
    lock = workdir_lock.held(self._workdir)
    if lock is not None:
      lock.check()
    number = (self._manager.latest_step() or 0) + 1
    try:
      self._manager.save(number, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          meta=ocp.args.JsonSave({**meta, "format": RUN_FORMAT})))
      # Wait, so that a kill right after this line loses nothing already reported.
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (re-raised, named if out of space)
      self._failed = True
      if is_out_of_space(e):
        raise out_of_space(f"checkpoint {self._dir / str(number)}", e) from None
      raise

  def close(self) -> None:
    """Waits for the last save and releases the workdir's lock (if this run holds it)."""
    try:
      self._manager.wait_until_finished()
      self._manager.close()
    except Exception:  # pylint: disable=broad-except
      if not self._failed:  # else `save` has raised this already; raising it again here
        raise             # would hide that report behind orbax's
    finally:
      lock = workdir_lock.held(self._workdir)
      if lock is not None:
        lock.release()


# --------------------------------------------------------------- variables


def save_variables(target: str, variables: Any) -> None:
  """Saves model variables ({'params', 'batch_stats'}) for `config.init_checkpoint`."""
  checkpointer = ocp.StandardCheckpointer()
  with _named_if_out_of_space(target):
    checkpointer.save(reporting.abs_path(target), variables, force=True)
    checkpointer.wait_until_finished()


class _named_if_out_of_space:  # pylint: disable=invalid-name  (a context manager)
  """Re-raises a write that ran out of space as one OutOfSpaceError naming `what`."""

  def __init__(self, what: str):
    self.what = what

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is not None and not isinstance(e, Reported) and is_out_of_space(e):
      raise out_of_space(self.what, e) from None
    return False


def layout_problems(want: Any, have: Any, *, dtypes: bool = False,
                    names: Tuple[str, str] = ("the checkpoint", "the model")) -> list:
  """['missing P', 'unexpected P', 'P: <have's> in HAVE, <want's> in WANT'] by path.

  Compares two trees leaf by leaf: their '/'-joined paths, and each leaf's
  shape ('()' for a leaf without one) and, with `dtypes`, its dtype. `names`
  says what `have` and `want` are. [] when they agree.
  """
  def layout(t):
    return {p: (tuple(getattr(x, "shape", ())),) + ((str(getattr(x, "dtype", None)),)
                                                   if dtypes else ())
            for p, x in leaves_with_paths(t)[0]}
  w, h = layout(want), layout(have)
  show = lambda v: v[0] if len(v) == 1 else v
  return ([f"missing {p}" for p in sorted(set(w) - set(h))]
          + [f"unexpected {p}" for p in sorted(set(h) - set(w))]
          + [f"{p}: {show(h[p])} in {names[0]}, {show(w[p])} in {names[1]}"
             for p in sorted(set(w) & set(h)) if h[p] != w[p]])


def _what_folder(directory) -> str:
  """What a directory that is not a variables checkpoint is, with the path to pass instead."""
  try:
    names = {p.name for p in directory.iterdir()}
  except OSError:
    return ""
  if not names:
    return "an empty directory"
  if CHECKPOINT_DIR in names or CONFIG_FILE in names:
    return (f"a run's workdir; pass {directory / BASELINE_DIR} (its fp32 model), written "
            "once its baseline is trained")
  if any(n.isdigit() for n in names):
    return (f"a run's {CHECKPOINT_DIR}/ folder; pass WORKDIR/{BASELINE_DIR} of that run "
            f"({directory.parent / BASELINE_DIR})")
  if {"state", "meta"} <= names:
    return (f"one save of a run's {CHECKPOINT_DIR}/; pass WORKDIR/{BASELINE_DIR} of that "
            f"run ({directory.parent.parent / BASELINE_DIR})")
  return ""


def load_variables(source: str, template: Any, *, key: str = "init_checkpoint") -> Any:
  """Restores what `save_variables` wrote into the structure of `template`.

  A checkpoint of `{"params": ...}` alone fits a model without batch statistics.

  Raises:
    InputNotFoundError (a FileNotFoundError) if `source` is missing; ConfigError
    (a ValueError) naming `key`, the path and what to pass instead if it is not
    such a checkpoint (a file, an empty folder, a workdir, a run's checkpoints),
    if its tree or shapes are not the model's, or if its data cannot be read
    (truncated, damaged).
  """
  directory = reporting.abs_path(source)
  if not directory.exists():
    raise InputNotFoundError(f"{key} {source} does not exist")

  def refuse(problem: str, fix: str = "") -> ConfigError:
    return ConfigError(key, source, f"{key} {source} {problem}", fix, shows_value=True)

  wanted = (f"the directory of an orbax checkpoint of {{'params', 'batch_stats'}} "
            f"(a run's WORKDIR/{BASELINE_DIR}, or experiments.checkpoints.save_variables)")
  if not directory.is_dir():
    raise refuse(f"is a file; it must be {wanted}")
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = _tree(checkpointer.metadata(directory))
  except Exception as e:  # pylint: disable=broad-except  (any reason: not a checkpoint)
    tree, error = None, f" ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
  else:
    error = ""
  if not isinstance(tree, dict) or "params" not in tree or "opt_state" in tree:
    what = _what_folder(directory)
    if isinstance(tree, dict) and "opt_state" in tree:
      what = (f"a run's training state, not model variables; pass WORKDIR/{BASELINE_DIR} "
              "of that run")
    raise refuse(f"is {what}" if what else
                 f"is not {wanted}: it holds no readable checkpoint metadata (not an "
                 f"orbax checkpoint, or a damaged or partly copied one){error}")
  template = dict(template)
  if "batch_stats" not in tree and not template.get("batch_stats"):
    template.pop("batch_stats", None)  # a BN-free model saved as {"params": ...}
  elif "batch_stats" not in tree:
    raise refuse("has no batch_stats but the model has BatchNorm: save {'params': ..., "
                 "'batch_stats': ...}")
  problems = layout_problems(template, tree)
  if problems:
    raise refuse("does not fit the model: " + "; ".join(problems[:8]),
                 "is it a checkpoint of this config's model and dataset?")
  try:
    restored = checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                            template))
  except BUGS:
    raise
  except Exception as e:  # pylint: disable=broad-except  (tensorstore's bare Exception too)
    raise refuse(f"cannot be read: its data is truncated or damaged "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                 "copy it again, or use another checkpoint") from None
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


# -------------------------------------------------------------- INQ state


def _plain(tree):
  """Mappings (FrozenDict, ...) as dicts, so the layout is JSON-able."""
  if hasattr(tree, "items"):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def abstract_inq_state(saved: Any, params: Any, config: quantize.INQConfig) -> quantize.INQState:
  """The INQState to restore a checkpoint's saved one into: `quantize.abstract_state`.

  `saved` is the checkpoint's tree of the state (it says whether the run kept
  pruned counts); `params` the (abstract) params the state was made for. A
  state saved with another config restores, but its seal refuses it at the
  next `advance` or `verify`.
  """
  return quantize.abstract_state(params, config, pruned=bool(saved.get("pruned")))


# ------------------------------------------------------------- final model


def _final_handlers() -> dict:
  # Named up front: a fresh process's manager can read the saved tree's
  # metadata (shapes, dtypes) only with its handler already registered.
  return {"tree": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


def save_final(workdir: str, variables: Any, inq_state: quantize.INQState) -> None:
  """Saves the finished model and its INQ state as one orbax checkpoint, `workdir/final/`.

  The checkpoint holds {"variables", "inq": the INQState} and, as JSON beside
  it, the INQConfig (the state's static part), so `load_final` needs no model
  code.
  """
  tree = {"variables": _plain(variables), "inq": inq_state}
  meta = {"version": _FINAL_VERSION, "inq_config": inq_state.config.to_dict()}
  # A new step, then the old one goes (max_to_keep=1): a save killed half-way
  # leaves the previous final model in place, never a mix.
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  directory = reporting.abs_path(workdir) / FINAL_DIR
  with _named_if_out_of_space(f"the final model {directory}"):
    with ocp.CheckpointManager(directory, options=options,
                               item_handlers=_final_handlers()) as mgr:
      mgr.save((mgr.latest_step() or 0) + 1, args=ocp.args.Composite(
          tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
      mgr.wait_until_finished()


def load_final(workdir: str):
  """(variables, inq_state) that `save_final` wrote, on the first local device.

  Raises:
    InputNotFoundError (a FileNotFoundError) if `workdir` holds no finished
    model; WorkdirError (a ValueError) if it is of another version or damaged.
  """
  directory = reporting.abs_path(workdir) / FINAL_DIR
  if not reporting.is_remote(workdir) and reporting.abs_path(workdir).is_file():
    raise WorkdirError(f"--workdir {workdir} is a file; pass a run's directory")
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers=_final_handlers()) as mgr:
    number = mgr.latest_step()
    if number is None:
      raise InputNotFoundError(f"{workdir} holds no finished model ({directory} is missing "
                               "or incomplete): it is written at the end of a run")
    with _damaged_data(f"{directory / str(number)}", "rerun the training command in that "
                       "workdir to write it again"):
      meta = mgr.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      saved = _tree(mgr.item_metadata(number)["tree"])
    if not isinstance(meta, dict) or meta.get("version") != _FINAL_VERSION:
      raise WorkdirError(f"{directory}: version "
                         f"{meta.get('version') if isinstance(meta, dict) else None!r}, "
                         f"expected {_FINAL_VERSION} (written by another version of this "
                         "trainer)")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding),
        saved["variables"])
    config = quantize.INQConfig.from_dict(meta["inq_config"])
    abstract = {"variables": variables,
                "inq": abstract_inq_state(saved["inq"], variables["params"], config)}
    with _damaged_data(f"{directory / str(number)}", "rerun the training command in that "
                       "workdir to write it again"):
      tree = mgr.restore(number, args=ocp.args.Composite(
          tree=ocp.args.StandardRestore(abstract))).tree
  return tree["variables"], tree["inq"]


class _damaged_data:  # pylint: disable=invalid-name  (a context manager)
  """Re-raises a failed read of `what` as a WorkdirError naming it and `fix`."""

  def __init__(self, what: str, fix: str):
    self.what, self.fix = what, fix

  def __enter__(self):
    return self

  def __exit__(self, kind, e, tb):
    if e is None or isinstance(e, (Reported, *BUGS)) or not isinstance(e, Exception):
      return False
    first = str(e).splitlines()[0][:200] if str(e) else ""
    raise WorkdirError(f"{self.what} cannot be read: it is damaged or truncated "
                       f"({type(e).__name__}: {first}); {self.fix}") from None


def export_path(workdir: str) -> str:
  """Where a run's `.inq` file goes: WORKDIR/model.inq."""
  return str(reporting.abs_path(workdir) / EXPORT_FILE)


def export_model(output: str, variables: Any, inq_state: quantize.INQState
                 ) -> Optional[dict]:
  """Writes the finished model as a `.inq` file (`inq_jax.export`) to `output`.

  The file holds the params (every quantized kernel as b-bit codes) and the
  batch statistics as `extras["batch_stats"]`; its SHA-256 goes beside it in
  `output + ".sha256"` (`python -m inq_jax.verify_file FILE --sha256` checks
  it). The arrays may be the trainer's own (replicated over the mesh) or
  `load_final`'s.

  Returns:
    `inq_jax.export.save`'s stats plus {"file": output} on process 0; None on
    the other processes of a multi-host run (only process 0 writes).
  """
  if jax.process_index() != 0:
    return None
  # This process's own copy of each (replicated) array: the writer computes on
  # it alone, with no collective the other processes would have to join.
  variables, inq_state = jax.tree.map(
      lambda x: x.addressable_data(0) if isinstance(x, jax.Array) else x, (variables, inq_state))
  extras = {"batch_stats": variables.get("batch_stats", {})}
  with reporting.written_locally(output, companions=(inq_export.SHA256_SUFFIX,)) as local:
    stats = inq_export.save(local, variables["params"], inq_state, extras=extras,
                            sha256_file=True)
  return {**stats, "file": output}
