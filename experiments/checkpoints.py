"""Orbax checkpoints of a run, its final model, and the one-config-per-workdir guard.

Every path goes through `etils.epath` and orbax, so a workdir may be local or
remote (`gs://bucket/...`).
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterable, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from experiments import reporting
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


def claim_workdir(workdir: str, config: ml_collections.ConfigDict, *, what: str = "run",
                  may_change: Iterable[str] = ()) -> None:
  """Writes config.json, or checks that what `workdir` already holds has this config.

  Args:
    workdir: the run's (or the study's) directory.
    config: its config.
    what: what the workdir holds, for the error ("run", "study").
    may_change: top-level keys that may differ from the stored config (a study's
      lists of cells may grow); config.json is then rewritten with the new ones.

  Raises:
    ValueError listing every differing key if `workdir` holds another config.
  """
  file = reporting.abs_path(workdir) / CONFIG_FILE
  new = config_dict(config)
  if file.exists():
    old = json.loads(file.read_text())
    fixed = lambda d: {k: v for k, v in d.items() if k not in may_change}
    diff = config_diff(fixed(old), fixed(new))
    if diff:
      raise ValueError(
          f"{workdir} holds a {what} with a different config; refusing to mix them. "
          f"Use a new --workdir, or rerun with the old config. Differences "
          f"(old -> new): " + "; ".join(diff[:10]))
    if old == new:
      return
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    reporting.atomic_write(file, json.dumps(new, indent=2, sort_keys=True))


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
        raise ValueError(
            f"{self._dir} was written by another version of this trainer (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, this one writes "
            f"{RUN_FORMAT}); start a new --workdir")
      for bad in numbers[:numbers.index(number)]:
        logging.warning("deleting unreadable checkpoint %s", self._dir / str(bad))
        self._manager.delete(bad)
      return restored.state, meta
    if errors:
      raise ValueError(f"no checkpoint in {self._dir} can be restored with this run's "
                       "layout (a damaged run, or one written by another version of this "
                       "trainer: start a new --workdir). " + " | ".join(errors[:3]))
    return None

  def save(self, state: Any, meta: dict) -> None:
    number = (self._manager.latest_step() or 0) + 1
    self._manager.save(number, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "format": RUN_FORMAT})))
    # Wait, so that a kill right after this line loses nothing already reported.
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


# --------------------------------------------------------------- variables


def save_variables(target: str, variables: Any) -> None:
  """Saves model variables ({'params', 'batch_stats'}) for `config.init_checkpoint`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(reporting.abs_path(target), variables, force=True)
  checkpointer.wait_until_finished()


def layout_problems(want: Any, have: Any, *, dtypes: bool = False) -> list:
  """['missing P', 'unexpected P', 'P: <have's> vs <want's>'] by '/'-joined path.

  Compares two trees leaf by leaf: their paths, and each leaf's shape ('()'
  for a leaf without one) and, with `dtypes`, its dtype. [] when they agree.
  """
  def layout(t):
    return {p: (tuple(getattr(x, "shape", ())),) + ((str(getattr(x, "dtype", None)),)
                                                   if dtypes else ())
            for p, x in leaves_with_paths(t)[0]}
  w, h = layout(want), layout(have)
  show = lambda v: v[0] if len(v) == 1 else v
  return ([f"missing {p}" for p in sorted(set(w) - set(h))]
          + [f"unexpected {p}" for p in sorted(set(h) - set(w))]
          + [f"{p}: {show(h[p])} vs {show(w[p])}" for p in sorted(set(w) & set(h))
             if h[p] != w[p]])


def load_variables(source: str, template: Any) -> Any:
  """Restores what `save_variables` wrote into the structure of `template`.

  A checkpoint of `{"params": ...}` alone fits a model without batch statistics.

  Raises:
    FileNotFoundError if `source` is missing; ValueError naming the mismatch if
    the checkpoint's tree or shapes are not the model's.
  """
  directory = reporting.abs_path(source)
  if not directory.exists():
    raise FileNotFoundError(f"init_checkpoint {source} does not exist")
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = _tree(checkpointer.metadata(directory))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"init_checkpoint {source} is not an orbax checkpoint of "
                     f"{{'params', 'batch_stats'}} (experiments.checkpoints.save_variables): "
                     f"{e}") from e
  template = dict(template)
  if "batch_stats" not in tree and not template.get("batch_stats"):
    template.pop("batch_stats", None)  # a BN-free model saved as {"params": ...}
  elif "batch_stats" not in tree:
    raise ValueError(f"init_checkpoint {source} has no batch_stats but the model has "
                     "BatchNorm: save {'params': ..., 'batch_stats': ...}")
  problems = layout_problems(template, tree)
  if problems:
    raise ValueError(f"init_checkpoint {source} does not fit the model: "
                     + "; ".join(problems[:8]) + " (shapes: checkpoint vs model)")
  restored = checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          template))
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
  with ocp.CheckpointManager(reporting.abs_path(workdir) / FINAL_DIR, options=options,
                             item_handlers=_final_handlers()) as mgr:
    mgr.save((mgr.latest_step() or 0) + 1, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()


def load_final(workdir: str):
  """(variables, inq_state) that `save_final` wrote, on the first local device.

  Raises:
    FileNotFoundError if `workdir` holds no finished model.
  """
  directory = reporting.abs_path(workdir) / FINAL_DIR
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                             item_handlers=_final_handlers()) as mgr:
    number = mgr.latest_step()
    if number is None:
      raise FileNotFoundError(f"{workdir} holds no finished model ({directory} is missing "
                              "or incomplete): it is written at the end of a run")
    meta = mgr.restore(number, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("version") != _FINAL_VERSION:
      raise ValueError(f"{directory}: version {meta.get('version')!r}, expected "
                       f"{_FINAL_VERSION}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    saved = _tree(mgr.item_metadata(number)["tree"])
    variables = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding),
        saved["variables"])
    config = quantize.INQConfig.from_dict(meta["inq_config"])
    abstract = {"variables": variables,
                "inq": abstract_inq_state(saved["inq"], variables["params"], config)}
    tree = mgr.restore(number, args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(abstract))).tree
  return tree["variables"], tree["inq"]


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
