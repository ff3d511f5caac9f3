"""Runs an experiment config in a subprocess of a test (XLA_FLAGS must be set before JAX starts).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/experiments/run_config.py \
      CONFIG_MODULE WORKDIR DATA_DIR [key=value overrides]

Writes WORKDIR/masks.npz (every phase's masks, keyed "phase{p}/{path}") and
WORKDIR/final_params.npz. With KILL_AT_SAVE=N in the environment the process
SIGKILLs itself on its N-th checkpoint save, while orbax is still writing it.

Multi-process (optional): with the override distributed=True it calls
experiments.distributed.initialize first, which reads JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID from the environment; each process then
writes its own masks.p{I}.npz and final_params.p{I}.npz (I = process index).
"""

import importlib
import os
import signal
import sys

import numpy as np


def die_on_save(kill_at: int) -> None:
  """Makes this process SIGKILL itself on its `kill_at`-th checkpoint save (0: never).

  The save is started, then the process dies while orbax is still writing it.
  """
  if not kill_at:
    return
  from experiments import checkpoints  # pylint: disable=g-import-not-at-top
  original, calls = checkpoints.RunCheckpoints.save, [0]

  def save_then_die(self, state, meta):
    calls[0] += 1
    if calls[0] < kill_at:
      return original(self, state, meta)
    manager = self._manager  # pylint: disable=protected-access
    manager.save((manager.latest_step() or 0) + 1, args=checkpoints.ocp.args.Composite(
        state=checkpoints.ocp.args.StandardSave(state),
        meta=checkpoints.ocp.args.JsonSave({**meta, "format": checkpoints.RUN_FORMAT})))
    os.kill(os.getpid(), signal.SIGKILL)  # mid-write: the async save has not finished

  checkpoints.RunCheckpoints.save = save_then_die


def main(config_module, workdir, data_dir, *overrides):
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import recipe, train  # pylint: disable=g-import-not-at-top
  from inq_jax.tree import leaves_with_paths  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"experiments.configs.{config_module}").get_config()
  config.dataset.data_dir = data_dir
  for item in overrides:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value if node[leaf] is None else type(node[leaf])(value)
  if config.get("distributed", False):
    from experiments import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize()
  suffix = f".p{jax.process_index()}" if jax.process_count() > 1 else ""

  die_on_save(int(os.environ.get("KILL_AT_SAVE", "0")))

  masks = {}

  def callback(event, **info):
    if event == "phase_end":
      for path, m in leaves_with_paths(info["inq_state"].masks)[0]:
        if np.ndim(m):
          masks[f"phase{info['phase']}/{path}"] = np.asarray(m)
      if info["phase"] == recipe.inq_config(config).num_steps - 1:
        np.savez(os.path.join(workdir, f"final_params{suffix}.npz"),
                 **{p: np.asarray(x) for p, x in leaves_with_paths(info["params"])[0]})

  results = train.train_and_evaluate(config, workdir, callback=callback)
  if masks:
    np.savez(os.path.join(workdir, f"masks{suffix}.npz"), **masks)
  print("devices", jax.device_count(), "accuracy", results["final"]["test_accuracy"])


if __name__ == "__main__":
  main(*sys.argv[1:])
