"""The stand-alone benchmarks run and print their JSON line (tiny sizes; no timing asserted)."""

import json
import subprocess
import sys


def _json_line(*args):
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_overhead_prints_its_ratio():
  line = _json_line("experiments.benchmarks.step_overhead", "--batch=16", "--steps=1",
                    "--repeats=2")
  assert line["benchmark"] == "step_overhead" and line["target"] == 1.02
  assert line["ratio_min"] <= line["ratio"] <= line["ratio_max"]
  assert line["base_step_ms"] > 0 and line["freeze_step_ms"] > 0
