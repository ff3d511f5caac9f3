"""Benchmark: compiling the rebuilt train step, as a fraction of each INQ phase.

    python -m experiments.benchmarks.phase_compile --workdir=workdirs/fashion_mnist_lenet

Runs the default job in `--workdir` (or reads it back if it has finished there)
and prints one JSON line: for every retrained phase, `compile_seconds` (the
ahead-of-time compile of that phase's step, timed by train.py) over the phase's
wall time (advance + compile + retraining). Target: every fraction <= 0.05.
"""

import json

import jax

from experiments.benchmarks import default_job


def main():
  args, results = default_job.from_command_line(__doc__.split("\n")[0])
  phases = [p for p in results["phases"] if p["epochs"] > 0]
  if any("compile_seconds" not in p for p in phases):
    raise SystemExit(f"{args.workdir}: results.json predates compile timing; use a new "
                     "--workdir")
  fractions = [p["compile_seconds"] / p["seconds"] for p in phases]
  print(json.dumps({
      "benchmark": "phase_compile", "max_fraction": round(max(fractions), 4), "target": 0.05,
      "phases": [{"portion": p["portion"], "compile_seconds": p["compile_seconds"],
                  "phase_seconds": p["seconds"], "fraction": round(f, 4)}
                 for p, f in zip(phases, fractions)],
      "device_kind": jax.devices()[0].device_kind, "num_devices": results["num_devices"]}))


if __name__ == "__main__":
  main()
