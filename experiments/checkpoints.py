"""Orbax checkpoints of a run, and the guard that keeps one workdir to one config."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

CONFIG_FILE = "config.json"


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def _diff(old, new, prefix=""):
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += _diff(old.get(key, "<absent>"), new.get(key, "<absent>"), f"{prefix}{key}.")
    return out
  return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks that the run already in `workdir` has this config.

  Raises:
    ValueError listing every differing key if `workdir` holds another run.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  new = config_dict(config)
  if path.exists():
    old = json.loads(path.read_text())
    diff = _diff(old, new)
    if diff:
      raise ValueError(
          f"{workdir} holds a run with a different config; refusing to mix them. "
          f"Use a new --workdir, or rerun with the old config. Differences "
          f"(old -> new): " + "; ".join(diff[:10]))
    return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(new, indent=2, sort_keys=True))
    tmp.replace(path)  # atomic: a half-written config can never be read back


class RunCheckpoints:
  """Checkpoints of one run: a state pytree plus JSON metadata per save.

  Saves are numbered 1, 2, ... in order; the newest one is the resume point.
  Writes are atomic (orbax renames a finished temporary directory), so a kill
  during a save leaves the previous checkpoint as the newest.
  """

  def __init__(self, workdir: str, max_to_keep: int = 2):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "checkpoints")), options=options,
        item_names=("state", "meta"))

  def latest_meta(self) -> Optional[dict]:
    step = self._manager.latest_step()
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored.meta

  def restore_state(self, template: Any) -> Any:
    step = self._manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    return restored.state

  def save(self, state: Any, meta: dict) -> None:
    step = (self._manager.latest_step() or 0) + 1
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
    # Wait, so that a kill right after this line loses nothing already reported.
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def save_variables(path: str, variables: Any) -> None:
  """Saves model variables ({'params', 'batch_stats'?}) for `config.init_checkpoint`."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(path), variables, force=True)
  checkpointer.wait_until_finished()


def load_variables(path: str, template: Any) -> Any:
  """Restores what `save_variables` wrote into the structure of `template`.

  Raises:
    FileNotFoundError if `path` is missing; ValueError naming the mismatch if the
    checkpoint's tree or shapes are not the model's.
  """
  path = os.path.abspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_checkpoint {path} does not exist")
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  want = {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(template)[0]}
  have = {jax.tree_util.keystr(p): tuple(getattr(x, "shape", ()))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  if set(want) != set(have):
    raise ValueError(f"init_checkpoint {path} does not fit the model: missing "
                     f"{sorted(set(want) - set(have))[:5]}, unexpected "
                     f"{sorted(set(have) - set(want))[:5]}")
  bad = [f"{k}: {have[k]} vs model {want[k]}" for k in want if tuple(have[k]) != tuple(want[k])]
  if bad:
    raise ValueError(f"init_checkpoint {path} has wrong shapes: {bad[:5]}")
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
  return checkpointer.restore(path, abstract)
