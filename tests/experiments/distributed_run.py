"""Runs the smoke config once and saves its masks; driven by test_distributed.py.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python \
      tests/experiments/distributed_run.py WORKDIR DATA_DIR [overrides as key=value]

Writes WORKDIR/masks.npz (every phase's masks, keyed "phase{p}/{path}").
"""

import os
import sys

import numpy as np


def main(workdir, data_dir, *overrides):
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import train  # pylint: disable=g-import-not-at-top
  from experiments.configs import smoke  # pylint: disable=g-import-not-at-top
  from inq_jax.tree import leaves_with_paths  # pylint: disable=g-import-not-at-top
  config = smoke.get_config()
  config.dataset.data_dir = data_dir
  config.eval_batch_size = 200  # divisible by 8 devices
  for item in overrides:
    key, value = item.split("=", 1)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value if node[leaf] is None else type(node[leaf])(value)
  masks = {}

  def callback(event, **info):
    if event == "phase_end":
      for path, m in leaves_with_paths(info["inq_state"].masks)[0]:
        if np.ndim(m):
          masks[f"phase{info['phase']}/{path}"] = np.asarray(m)

  results = train.train_and_evaluate(config, workdir, callback=callback)
  np.savez(os.path.join(workdir, "masks.npz"), **masks)
  print("devices", jax.device_count(), "accuracy", results["final"]["test_accuracy"])


if __name__ == "__main__":
  main(*sys.argv[1:])
