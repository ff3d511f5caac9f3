"""The default job, run once and shared by the phase_compile and end_to_end benchmarks.

A finished run in `workdir` is read back, not rerun; its wall time comes from
`benchmark_wall.json`, written when this module ran it (a run resumed after a
kill has no honest wall time, so none is reported).
"""

import argparse
import json
import os
import time

from experiments import reporting, train
from experiments.configs import fashion_mnist_lenet

WALL_FILE = "benchmark_wall.json"


def ensure_run(workdir: str, data_dir=None) -> dict:
  """results.json of the default job in `workdir`, running it first if needed."""
  results_path = os.path.join(workdir, reporting.RESULTS_FILE)
  if os.path.exists(results_path):
    with open(results_path) as f:
      results = json.load(f)
    if results.get("final"):
      return results
  config = fashion_mnist_lenet.get_config()
  if data_dir:
    config.dataset.data_dir = data_dir
  fresh = not os.path.exists(os.path.join(workdir, "config.json"))
  start = time.perf_counter()
  results = train.train_and_evaluate(config, workdir)
  if fresh:
    reporting.atomic_write_json(os.path.join(workdir, WALL_FILE),
                                {"wall_seconds": time.perf_counter() - start})
  return results


def from_command_line(description: str):
  """(args, results): parses --workdir/--data_dir, then `ensure_run`."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  return args, ensure_run(args.workdir, args.data_dir)


def epochs(workdir: str) -> list:
  """The metrics.jsonl records of training epochs; a replayed epoch counts once."""
  latest = {}
  with open(os.path.join(workdir, reporting.METRICS_FILE)) as f:
    for line in f:
      r = json.loads(line)
      if "images" in r and "seconds" in r:
        latest[(r["stage"], r.get("phase", 0), r["epoch"])] = r
  return list(latest.values())


def wall_seconds(workdir: str):
  path = os.path.join(workdir, WALL_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["wall_seconds"]
