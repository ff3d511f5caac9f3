"""Orbax checkpoints of a run, its final model, and the one-config-per-workdir guard.

Every path goes through `etils.epath` and orbax, so a workdir may be local or
remote (`gs://bucket/...`).
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional, Tuple

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from experiments import reporting
from inq_jax import export as inq_export
from inq_jax import quantize as inq

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BASELINE_DIR = "baseline_variables"  # the fp32 model, reusable as config.init_checkpoint
FINAL_DIR = "final"
EXPORT_FILE = "model.inq"
# The layout of what a run checkpoints (steps.TrainState plus JSON meta). A
# workdir written with another layout is refused rather than misread.
RUN_FORMAT = 2
_FINAL_VERSION = 2


def path(p) -> epath.Path:
  """`p` as an absolute epath (orbax needs absolute paths; gs:// ones already are)."""
  p = str(p)
  return epath.Path(p if "://" in p else os.path.abspath(p))


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


def write_text_atomic(target: epath.Path, text: str) -> None:
  """Writes `target` so that it is never seen half-written (`reporting.atomic_write`)."""
  reporting.atomic_write(target, text)


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks that the run already in `workdir` has this config.

  Raises:
    ValueError listing every differing key if `workdir` holds another run.
  """
  file = path(workdir) / CONFIG_FILE
  new = config_dict(config)
  if file.exists():
    diff = config_diff(json.loads(file.read_text()), new)
    if diff:
      raise ValueError(
          f"{workdir} holds a run with a different config; refusing to mix them. "
          f"Use a new --workdir, or rerun with the old config. Differences "
          f"(old -> new): " + "; ".join(diff[:10]))
    return
  if jax.process_index() == 0:
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(file, json.dumps(new, indent=2, sort_keys=True))


class RunCheckpoints:
  """The run's checkpoints: a `steps.TrainState` plus JSON meta per save.

  Saves are numbered 1, 2, ...; the newest intact one is the resume point.
  Orbax writes each into a temporary directory and renames it when complete,
  so a kill during a save leaves the previous one as the newest.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    self._dir = path(workdir) / CHECKPOINT_DIR
    self._manager = ocp.CheckpointManager(self._dir, options=options,
                                          item_names=("state", "meta"))

  def restore(self, template: Any) -> Optional[Tuple[Any, dict]]:
    """(state, meta) of the newest intact checkpoint, or None if there is none.

    A damaged newer checkpoint (a disk error, a partial copy) is skipped with a
    warning naming it, and deleted so that it cannot push the intact one out.

    Raises:
      ValueError if checkpoints exist but none can be read with this layout.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    errors = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except  (any damage: try an older one)
        errors.append(f"{self._dir / str(step)}: {type(e).__name__}: {str(e)[:300]}")
        logging.warning("checkpoint %s is unreadable (%s); trying an older one",
                        self._dir / str(step), e)
        continue
      meta = restored.meta
      if not isinstance(meta, dict) or meta.get("format") != RUN_FORMAT:
        raise ValueError(
            f"{self._dir} was written by another version of this trainer (format "
            f"{meta.get('format') if isinstance(meta, dict) else None!r}, this one writes "
            f"{RUN_FORMAT}); start a new --workdir")
      for bad in steps[:steps.index(step)]:
        logging.warning("deleting unreadable checkpoint %s", self._dir / str(bad))
        self._manager.delete(bad)
      return restored.state, meta
    if errors:
      raise ValueError(f"no checkpoint in {self._dir} can be restored with this run's "
                       "layout (a damaged run, or one written by another version of this "
                       "trainer: start a new --workdir). " + " | ".join(errors[:3]))
    return None

  def save(self, state: Any, meta: dict) -> None:
    step = (self._manager.latest_step() or 0) + 1
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        meta=ocp.args.JsonSave({**meta, "format": RUN_FORMAT})))
    # Wait, so that a kill right after this line loses nothing already reported.
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_variables(target: str, variables: Any) -> None:
  """Saves model variables ({'params', 'batch_stats'}) for `config.init_checkpoint`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path(target), variables, force=True)
  checkpointer.wait_until_finished()


def _saved_tree(checkpointer, directory):
  meta = checkpointer.metadata(directory)
  tree = getattr(meta, "item_metadata", meta)
  return getattr(tree, "tree", tree)


def load_variables(source: str, template: Any) -> Any:
  """Restores what `save_variables` wrote into the structure of `template`.

  A checkpoint of `{"params": ...}` alone fits a model without batch statistics.

  Raises:
    FileNotFoundError if `source` is missing; ValueError naming the mismatch if
    the checkpoint's tree or shapes are not the model's.
  """
  directory = path(source)
  if not directory.exists():
    raise FileNotFoundError(f"init_checkpoint {source} does not exist")
  checkpointer = ocp.StandardCheckpointer()
  try:
    tree = _saved_tree(checkpointer, directory)
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
  flat = lambda t: {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  want, have = flat(template), flat(tree)
  if set(want) != set(have):
    raise ValueError(f"init_checkpoint {source} does not fit the model: missing "
                     f"{sorted(set(want) - set(have))[:5]}, unexpected "
                     f"{sorted(set(have) - set(want))[:5]}")
  bad = [f"{k}: {have[k]} vs model {want[k]}" for k in want if have[k] != want[k]]
  if bad:
    raise ValueError(f"init_checkpoint {source} has wrong shapes: {bad[:5]}")
  restored = checkpointer.restore(directory, jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                          template))
  return {"params": restored["params"], "batch_stats": restored.get("batch_stats", {})}


# ------------------------------------------------------------- final model


def _plain(tree):
  """Mappings (FrozenDict, ...) as dicts, so the layout is JSON-able."""
  if hasattr(tree, "items"):
    return {str(k): _plain(v) for k, v in tree.items()}
  return tree


def save_final(workdir: str, variables: Any, inq_state: inq.INQState) -> None:
  """Saves the finished model and its INQ state as one orbax checkpoint, `workdir/final/`.

  The checkpoint holds {"variables", "inq": {"masks", "exponents", "step",
  "pruned"}} and, as JSON beside it, the INQConfig, so `load_final` needs no
  model code.
  """
  tree = {"variables": _plain(variables),
          "inq": {"masks": _plain(inq_state.masks), "exponents": dict(inq_state.exponents),
                  "step": inq_state.step, "pruned": dict(inq_state.pruned)}}
  meta = {"version": _FINAL_VERSION, "inq_config": inq_state.config.to_dict()}
  # A new step, then the old one goes (max_to_keep=1): a save killed half-way
  # leaves the previous final model in place, never a mix.
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  with ocp.CheckpointManager(path(workdir) / FINAL_DIR, item_names=("tree", "meta"),
                             options=options) as mgr:
    mgr.save((mgr.latest_step() or 0) + 1, args=ocp.args.Composite(
        tree=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
    mgr.wait_until_finished()


def load_final(workdir: str):
  """(variables, inq_state) that `save_final` wrote, on the first local device.

  Raises:
    FileNotFoundError if `workdir` holds no finished model.
  """
  directory = path(workdir) / FINAL_DIR
  with ocp.CheckpointManager(directory, item_names=("tree", "meta"),
                             options=ocp.CheckpointManagerOptions(read_only=True)) as mgr:
    step = mgr.latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir} holds no finished model ({directory} is missing "
                              "or incomplete): it is written at the end of a run")
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if meta.get("version") != _FINAL_VERSION:
      raise ValueError(f"{directory}: version {meta.get('version')!r}, expected "
                       f"{_FINAL_VERSION}")
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding),
        mgr.item_metadata(step).tree)
    tree = mgr.restore(step, args=ocp.args.Composite(
        tree=ocp.args.StandardRestore(abstract))).tree
  cfg = dict(meta["inq_config"], portions=tuple(meta["inq_config"]["portions"]))
  state = inq.INQState(masks=tree["inq"]["masks"], exponents=dict(tree["inq"]["exponents"]),
                       step=tree["inq"]["step"], config=inq.INQConfig(**cfg),
                       pruned=dict(tree["inq"].get("pruned", {})))
  return tree["variables"], state


def export_run(workdir: str, output: Optional[str] = None) -> Optional[dict]:
  """Exports a finished run to a `.inq` file (`inq_jax.export`), `workdir/model.inq` by default.

  The file holds the params (every quantized kernel as b-bit codes) and the
  batch statistics as `extras["batch_stats"]`.

  Returns:
    `inq_jax.export.save`'s stats plus {"file": output} on process 0; None on
    the other processes of a multi-host run (only process 0 writes).
  """
  variables, state = load_final(workdir)
  if jax.process_index() != 0:
    return None
  output = str(output or path(workdir) / EXPORT_FILE)
  extras = {"batch_stats": variables.get("batch_stats", {})}
  if "://" in output:  # the file format writes locally; copy the finished file over
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, EXPORT_FILE)
      stats = inq_export.save(local, variables["params"], state, extras=extras)
      epath.Path(output).write_bytes(epath.Path(local).read_bytes())
  else:
    stats = inq_export.save(output, variables["params"], state, extras=extras)
  return {**stats, "file": output}
