"""experiments.benchmarks.export_speed: runs on a small stand-in and prints its JSON line.

Timings are not checked here (shared CI machines); the keys and the sizes are.
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_export_speed_prints_one_json_line():
  run = subprocess.run([sys.executable, "-m", "experiments.benchmarks.export_speed",
                        "--width_divisor=64", "--zero_fraction=0.5"],
                       cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert run.returncode == 0, run.stderr[-3000:]
  lines = [l for l in run.stdout.splitlines() if l.strip()]
  assert len(lines) == 1, run.stdout
  line = json.loads(lines[0])
  for key in ("benchmark", "width_divisor", "quantized_weights", "save_seconds",
              "load_seconds", "bytes", "full_try_bytes", "size_ratio_vs_full_try", "layouts"):
    assert key in line, key
  assert line["benchmark"] == "export_speed" and line["width_divisor"] == 64
  assert line["quantized_weights"] > 0 and line["bytes"] > 0
  assert line["size_ratio_vs_full_try"] == round(line["bytes"] / line["full_try_bytes"], 4)
  assert line["size_ratio_vs_full_try"] <= 1.02


def test_export_speed_rejects_a_bad_width_divisor():
  run = subprocess.run([sys.executable, "-m", "experiments.benchmarks.export_speed",
                        "--width_divisor=5"], cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 2 and "width_divisor" in run.stderr
