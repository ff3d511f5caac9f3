"""Benchmark: wall time and images/s of the default job, baseline and INQ phases.

    python -m experiments.benchmarks.end_to_end --workdir=workdirs/fashion_mnist_lenet

Runs the default job in `--workdir` (or reads it back if it has finished there)
and prints one JSON line: training images/s of the fp32 baseline epochs and of
the INQ retraining epochs (from metrics.jsonl), each stage's seconds, the
job's total wall time (when this benchmark ran it start to finish), and the
device kind.
"""

import json

import jax

from experiments.benchmarks import default_job


def main():
  args, results = default_job.from_command_line(__doc__.split("\n")[0])
  out = {"benchmark": "end_to_end"}
  for stage in ("baseline", "inq"):
    records = [r for r in default_job.epochs(args.workdir) if r["stage"] == stage]
    seconds = sum(r["seconds"] for r in records)
    images = sum(r["images"] for r in records)
    out[stage] = {"epochs": len(records), "train_seconds": round(seconds, 1),
                  "images_per_second": round(images / seconds, 1) if seconds else None}
  out["inq"]["phase_seconds"] = round(sum(p["seconds"] for p in results["phases"]), 1)
  wall = default_job.wall_seconds(args.workdir)
  out.update({"wall_seconds": round(wall, 1) if wall else None,
              "final_test_accuracy": results["final"]["test_accuracy"],
              "baseline_test_accuracy": results["baseline"]["test_accuracy"],
              "device_kind": jax.devices()[0].device_kind,
              "num_devices": results["num_devices"]})
  print(json.dumps(out))


if __name__ == "__main__":
  main()
