"""Orbax checkpoints of a run, and the guard that keeps one workdir to one config."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from inq_jax import export as inq_export
from inq_jax import quantize as inq

CONFIG_FILE = "config.json"


def config_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort())


# Config keys added after runs were recorded, with a test for the values that
# reproduce what those runs did: an old config.json without the key matches them.
LATER_DEFAULTS = {
    "inq.calibration": lambda v: v == "absmax",
    "prune": lambda v: isinstance(v, dict) and not v.get("sparsity"),  # no pruning stage
}
_ABSENT = "<absent>"


def config_diff(old, new, prefix="") -> list:
  """['key: old -> new'] for every differing key of two JSON configs."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for key in sorted(set(old) | set(new)):
      out += config_diff(old.get(key, _ABSENT), new.get(key, _ABSENT), f"{prefix}{key}.")
    return out
  key = prefix[:-1]
  if old == _ABSENT and any(ok(new) for k, ok in LATER_DEFAULTS.items()
                           if key == k or key.endswith("." + k)):  # also a sweep's experiment
    return []
  return [] if old == new else [f"{key}: {old!r} -> {new!r}"]


def claim_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks that the run already in `workdir` has this config.

  Raises:
    ValueError listing every differing key if `workdir` holds another run.
  """
  path = epath.Path(workdir) / CONFIG_FILE
  new = config_dict(config)
  if path.exists():
    old = json.loads(path.read_text())
    diff = config_diff(old, new)
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


# ------------------------------------------------------------- final model

FINAL_DIR = "final"
FINAL_STATE = "state"      # orbax checkpoint under WORKDIR/final/
FINAL_JSON = "inq.json"    # INQConfig, tree layout; written last: marks a complete save
EXPORT_FILE = "model.inq"  # what export_run writes by default (python -m inq_jax.verify_file)
_FINAL_VERSION = 1


def _spec(tree):
  """Nested dicts of [shape, dtype] leaves: the layout load_final restores into."""
  if isinstance(tree, dict):
    return {str(k): _spec(v) for k, v in tree.items()}
  return [list(jax.numpy.shape(tree)), str(jax.numpy.result_type(tree))]


def _abstract(spec, sharding):
  if isinstance(spec, dict):
    return {k: _abstract(v, sharding) for k, v in spec.items()}
  shape, dtype = spec
  return jax.ShapeDtypeStruct(tuple(shape), jax.numpy.dtype(dtype), sharding=sharding)


def _plain(tree):
  """Mappings (FrozenDict, ...) as dicts, so the layout is JSON-able."""
  if hasattr(tree, "items"):
    return {k: _plain(v) for k, v in tree.items()}
  return tree


def save_final(workdir: str, variables: Any, inq_state: Any) -> None:
  """Saves the finished model and its INQ state under `workdir/final/`.

  `final/state/` is an orbax checkpoint of {"variables": variables, "inq":
  {"masks", "exponents", "step", "pruned"}}; `final/inq.json` holds the
  INQConfig and the tree layout, so `load_final` needs no model code. The JSON
  is written last (atomically): a save killed half-way leaves no JSON and
  `load_final` refuses it.

  Args:
    workdir: the run's directory.
    variables: {"params": ..., "batch_stats": ...} (nested dicts of arrays).
    inq_state: the run's final `inq_jax.quantize.INQState`.
  """
  final = os.path.abspath(os.path.join(workdir, FINAL_DIR))
  meta_path = os.path.join(final, FINAL_JSON)
  if jax.process_index() == 0:
    os.makedirs(final, exist_ok=True)
    if os.path.exists(meta_path):
      os.remove(meta_path)
  tree = {"variables": _plain(variables),
          "inq": {"masks": _plain(inq_state.masks), "exponents": dict(inq_state.exponents),
                  "step": inq_state.step, "pruned": dict(inq_state.pruned)}}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.join(final, FINAL_STATE), tree, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    meta = {"version": _FINAL_VERSION, "inq_config": inq_state.config.to_dict(),
            "exponents": sorted(inq_state.exponents), "pruned": sorted(inq_state.pruned),
            "tree": _spec(tree)}
    tmp = meta_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(tmp, meta_path)


def load_final(workdir: str):
  """(variables, inq_state) that `save_final` wrote into `workdir/final/`.

  Arrays come back on the first local device; the INQState is rebuilt from the
  JSON's INQConfig, so no model code is needed.

  Raises:
    FileNotFoundError if `workdir` holds no complete final save.
  """
  final = os.path.abspath(os.path.join(workdir, FINAL_DIR))
  meta_path = os.path.join(final, FINAL_JSON)
  if not os.path.exists(meta_path):
    raise FileNotFoundError(
        f"{workdir} holds no finished model ({meta_path} is missing): the training "
        "script writes it with checkpoints.save_final at the end of a run")
  with open(meta_path) as f:
    meta = json.load(f)
  if meta.get("version") != _FINAL_VERSION:
    raise ValueError(f"{meta_path}: version {meta.get('version')!r}, expected "
                     f"{_FINAL_VERSION}")
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = _abstract(meta["tree"], sharding)
  tree = ocp.StandardCheckpointer().restore(os.path.join(final, FINAL_STATE), abstract)
  cfg = dict(meta["inq_config"])
  cfg["portions"] = tuple(cfg["portions"])
  state = inq.INQState(masks=tree["inq"]["masks"], exponents=dict(tree["inq"]["exponents"]),
                       step=tree["inq"]["step"], config=inq.INQConfig(**cfg),
                       pruned=dict(tree["inq"]["pruned"]))
  if sorted(state.exponents) != meta["exponents"]:
    raise ValueError(f"{final}: restored exponents {sorted(state.exponents)[:6]} do not "
                     f"match {meta['exponents'][:6]}")
  return tree["variables"], state


def load_done_checkpoint(workdir: str):
  """(variables, inq_state) from the last checkpoint of a finished run.

  For runs that finished before the training script wrote `final/`: reads the
  newest `checkpoints/<step>/` (read-only; it must be the "done" one), takes
  params, batch_stats and the INQ masks/exponents/step from it and rebuilds
  the INQConfig from `config.json`. No model code is needed.

  Raises:
    FileNotFoundError if `workdir` has no checkpoint or config.json; ValueError
    if the newest checkpoint is not of a finished run.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  config_path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isdir(directory) or not os.path.exists(config_path):
    raise FileNotFoundError(f"{workdir} holds neither final/ nor a run's checkpoints and "
                            f"{CONFIG_FILE}")
  options = ocp.CheckpointManagerOptions(read_only=True)
  manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no checkpoint")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
  if meta.get("stage") != "done":
    raise ValueError(f"{workdir}: the run is not finished (newest checkpoint {step} is at "
                     f"stage {meta.get('stage')!r}, phase {meta.get('phase')})")
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.metadata(path)
  tree = getattr(tree, "item_metadata", tree)
  tree = getattr(tree, "tree", tree)
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(tuple(x.shape), x.dtype, sharding=sharding), tree)
  tree = checkpointer.restore(path, abstract)
  with open(config_path) as f:
    c = json.load(f)
  config = inq.INQConfig(bits=c["inq"]["bits"], portions=tuple(c["inq"]["portions"]),
                         strategy=c["inq"]["strategy"], include=c["inq"]["include"],
                         exclude=c["inq"]["exclude"], granularity=c["inq"]["granularity"],
                         calibration=c["inq"].get("calibration", "absmax"),
                         seed=c["seed"])
  t = tree["inq"]
  state = inq.INQState(masks=t["masks"], exponents=dict(t["exponents"]), step=t["step"],
                       config=config, pruned=dict(t.get("pruned", {})))
  variables = {"params": tree["train"]["params"],
               "batch_stats": tree["train"].get("batch_stats", {}) or {}}
  return variables, state


def export_run(workdir: str, output: Optional[str] = None) -> Optional[dict]:
  """Exports the finished run in `workdir` to a `.inq` file (`inq_jax.export`).

  The file holds the params (every quantized kernel as b-bit codes) and the
  batch statistics as `extras["batch_stats"]`; `python -m experiments.evaluate
  --weights=FILE` evaluates it.

  Args:
    workdir: a run directory with a `final/` save (`save_final`), or, for runs
      finished before `final/` existed, with the finished run's checkpoints
      (`load_done_checkpoint`).
    output: the file to write; default `workdir/model.inq`, the file that
      `python -m inq_jax.verify_file WORKDIR` checks.

  Returns:
    `inq_jax.export.save`'s stats plus {"file": output} on process 0; None on
    the other processes of a multi-host run (only process 0 writes).
  """
  if os.path.exists(os.path.join(workdir, FINAL_DIR, FINAL_JSON)):
    variables, state = load_final(workdir)
  else:
    variables, state = load_done_checkpoint(workdir)
  if jax.process_index() != 0:
    return None
  output = output or os.path.join(workdir, EXPORT_FILE)
  extras = {"batch_stats": variables.get("batch_stats", {})}
  stats = inq_export.save(output, variables["params"], state, extras=extras)
  return {**stats, "file": output}
