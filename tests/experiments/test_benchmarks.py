"""The stand-alone benchmarks run and print their JSON line (tiny sizes; no timing asserted)."""

import json
import subprocess
import sys

import numpy as np


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


def test_resnet50_shapes_match_torchvision_count():
  from experiments.benchmarks import quantize_speed
  shapes = quantize_speed.resnet50_shapes()
  kernels = sum(int(np.prod(s)) for p, s in shapes.items() if p.endswith("kernel"))
  # torchvision's resnet50 has 25,557,032 parameters: 53,120 of them are batch-norm
  # scales and biases and 1,000 the fc bias; the rest are conv and dense weights.
  assert kernels == 25_557_032 - 53_120 - 1_000
  assert len([p for p in shapes if p.endswith("kernel")]) == 54  # 53 convs + fc


def test_quantize_speed_prints_its_timings():
  line = _json_line("experiments.benchmarks.quantize_speed", "--width_divisor=16", "--bits=3")
  assert line["benchmark"] == "quantize_speed" and line["width_divisor"] == 16
  assert len(line["advance_seconds"]) == len(line["portions"]) == 4  # default portions
  assert line["advance_seconds_max"] == max(line["advance_seconds"]) > 0
  assert line["init_seconds"] > 0 and line["verify_seconds"] > 0
  from experiments.benchmarks import quantize_speed
  assert line["weights"] == sum(int(np.prod(s)) for p, s in
                                quantize_speed.resnet50_shapes(16).items()
                                if p.endswith("kernel"))


def test_quantize_speed_rejects_a_bad_width_divisor():
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.quantize_speed",
                        "--width_divisor=3"], capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "width_divisor must divide 64, got 3" in out.stderr
