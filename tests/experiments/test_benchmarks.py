"""The stand-alone benchmarks run and print their JSON line (tiny sizes; no timing asserted)."""

import json
import subprocess
import sys
import types

import numpy as np
import pytest


def _json_line(*args):
  out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                       check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_step_overhead_prints_its_ratio():
  line = _json_line("experiments.benchmarks.step_overhead", "--batch=16", "--steps=1",
                    "--repeats=2")
  assert line["benchmark"] == "step_overhead" and line["target"] == 1.02
  # The keys and their types; timings are never asserted (a shared CPU is noisy).
  for key in ("ratio", "ratio_min", "ratio_max", "base_step_ms", "freeze_step_ms"):
    assert isinstance(line[key], float) and line[key] > 0, key
  assert (line["batch"], line["steps_per_round"], line["repeats"]) == (16, 1, 2)


def test_resnet50_shapes_match_torchvision_count():
  from experiments.benchmarks import quantize_speed
  shapes = quantize_speed.resnet50_shapes()
  kernels = sum(int(np.prod(s)) for p, s in shapes.items() if p.endswith("kernel"))
  # torchvision's resnet50 has 25,557,032 parameters: 53,120 of them are batch-norm
  # scales and biases and 1,000 the fc bias; the rest are conv and dense weights.
  assert kernels == 25_557_032 - 53_120 - 1_000
  assert len([p for p in shapes if p.endswith("kernel")]) == 54  # 53 convs + fc


def test_quantize_speed_prints_first_call_and_steady_timings():
  line = _json_line("experiments.benchmarks.quantize_speed", "--width_divisor=16", "--bits=3",
                    "--repeats=1")
  assert line["benchmark"] == "quantize_speed" and line["width_divisor"] == 16
  assert len(line["portions"]) == 4  # default portions
  for key in ("first_advance_seconds", "advance_seconds"):
    assert len(line[key]) == 4 and all(isinstance(t, float) for t in line[key]), key
  assert line["first_advance_seconds_max"] == max(line["first_advance_seconds"])
  assert line["advance_seconds_max"] == max(line["advance_seconds"])
  for key in ("first_init_seconds", "first_verify_seconds", "init_seconds", "verify_seconds",
              "first_init_cpu_seconds", "first_verify_cpu_seconds", "init_cpu_seconds",
              "verify_cpu_seconds", "later_advance_seconds_max", "advance_cpu_seconds_max"):
    assert isinstance(line[key], float), key
  for key in ("first_advance_cpu_seconds", "advance_cpu_seconds"):
    assert len(line[key]) == 4 and all(isinstance(t, float) for t in line[key]), key
  # Later advances are the first pass's compiled calls (portions 1..3).
  assert line["later_advance_seconds_max"] == max(line["first_advance_seconds"][1:])
  assert line["advance_cpu_seconds_max"] == max(line["advance_cpu_seconds"])
  assert isinstance(line["device"], str) and isinstance(line["jax"], str)
  assert len(line["load_average"]) == 3
  # Compilations are counted: the whole tree compiles a few programs on the
  # first init, advance and verify (not one per leaf shape: the divided
  # ResNet-50 has 54 kernels of 21 shapes), later advances reuse them, and
  # the steady-state calls (same shapes, all compiled) compile nothing.
  assert len(line["first_advance_compiles"]) == 4
  assert line["first_compiles"] == (line["first_init_compiles"] + line["first_verify_compiles"]
                                    + sum(line["first_advance_compiles"]))
  assert 1 <= line["first_init_compiles"] <= 3 and 1 <= line["first_verify_compiles"] <= 3
  assert 1 <= line["first_advance_compiles"][0] <= 3
  assert line["first_advance_compiles"][1:] == [0, 0, 0]
  assert line["steady_compiles"] == 0
  from experiments.benchmarks import quantize_speed
  assert line["weights"] == sum(int(np.prod(s)) for p, s in
                                quantize_speed.resnet50_shapes(16).items()
                                if p.endswith("kernel"))


def test_vs_pytorch_prints_both_models_figures_and_their_parity():
  line = _json_line("experiments.benchmarks.vs_pytorch", "--steps=1", "--repeats=2",
                    "--batch=8", "--resnet_steps=1", "--resnet_repeats=2")
  assert line["benchmark"] == "vs_pytorch"
  pytest.importorskip("torch")
  assert "skipped" not in line and line["target"] == 1.0
  assert line["models"] == ["lenet", "resnet20"]
  # LeNet: the top-level keys (as before ResNet-20 was added, so that the
  # comparison tool can set them against older commits).
  for key in ("ratio", "ratio_base", "ratio_q25", "ratio_q75", "matmul_conv_speedup",
              "jax_freeze_step_ms", "jax_base_step_ms", "jax_xla_conv_step_ms", "torch_step_ms"):
    assert isinstance(line[key], float) and line[key] > 0, key
  resnet = line["resnet20"]
  for key in ("ratio", "ratio_base", "ratio_q25", "ratio_q75", "jax_freeze_step_ms",
              "jax_base_step_ms", "torch_step_ms"):
    assert isinstance(resnet[key], float) and resnet[key] > 0, key
  assert resnet["target"] == 1.0
  assert (resnet["steps_per_round"], resnet["repeats"]) == (1, 2)
  # Both sides compute the same function from the same weights: LeNet's logits,
  # ResNet-20's loss with BN on batch statistics, and its loss after one SGD
  # update (gradients, weight decay, learning rate) agree to float32 rounding.
  assert line["max_logit_diff"] < 1e-3
  assert resnet["loss"] > 0 and abs(resnet["loss"] - resnet["torch_loss"]) < 1e-4
  assert resnet["loss_diff"] < 1e-4 and resnet["loss_after_step_diff"] < 1e-4
  assert line["threads"] == line["torch_threads"] == len(line["cpus"]) >= 1
  assert (line["batch"], line["steps_per_round"], line["repeats"]) == (8, 1, 2)
  assert isinstance(line["jax"], str) and isinstance(line["torch"], str)
  assert isinstance(line["cpu_model"], str) and len(line["load_average"]) == 3


def test_vs_pytorch_resnet20_parity_catches_a_different_update(monkeypatch):
  """The parity figures are not vacuous: a torch side with another learning rate shows."""
  torch = pytest.importorskip("torch")
  from experiments.benchmarks import vs_pytorch
  monkeypatch.setattr(vs_pytorch, "_interleaved",
                      lambda runners, *_: {name: np.ones(1) for name in runners})
  args = types.SimpleNamespace(batch=4, resnet_steps=1, resnet_repeats=1)
  real_runner = vs_pytorch._torch_runner  # pylint: disable=protected-access

  def faster_torch(torch_, net, x, y, losses=None):
    monkeypatch.setattr(vs_pytorch, "LR", 0.02)  # torch's SGD only: JAX's is built already
    try:
      return real_runner(torch_, net, x, y, losses)
    finally:
      monkeypatch.setattr(vs_pytorch, "LR", 0.01)
  monkeypatch.setattr(vs_pytorch, "_torch_runner", faster_torch)
  resnet20 = vs_pytorch._resnet20  # pylint: disable=protected-access
  other = resnet20(args, torch, vs_pytorch.steps.Devices())
  assert other["loss_diff"] < 1e-4  # same forward
  assert other["loss_after_step_diff"] > 1e-3  # another update (same: below 1e-4, above)


def test_vs_pytorch_rejects_an_unknown_model():
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.vs_pytorch",
                        "--models=lenet,vgg"], capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "--models 'lenet,vgg': choose from lenet, resnet20" in out.stderr


def test_vs_pytorch_rejects_more_threads_than_cpus():
  pytest.importorskip("torch")
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.vs_pytorch",
                        "--threads=4096"], capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "--threads 4096: this process may use only" in out.stderr


def test_quantize_speed_rejects_a_bad_width_divisor():
  out = subprocess.run([sys.executable, "-m", "experiments.benchmarks.quantize_speed",
                        "--width_divisor=3"], capture_output=True, text=True, check=False)
  assert out.returncode != 0 and "width_divisor must divide 64, got 3" in out.stderr


def test_input_pipeline_prints_rates_per_core_and_scaling(tmp_path):
  line = _json_line("experiments.benchmarks.input_pipeline", "--train=16", "--validation=8",
                    "--batch=4", "--image_size=32", "--repeats=1",
                    f"--data_dir={tmp_path / 'tfds'}")
  assert line["benchmark"] == "input_pipeline"
  assert (line["train_images"], line["eval_images"], line["batch"]) == (16, 8, 4)
  for split in ("train", "eval"):
    for pipeline in ("legacy", "workers"):
      for cores in ("1", "2"):
        figure = line["results"][split][pipeline][cores]
        assert figure["images_per_second"] > 0 and figure["startup_seconds"] >= 0
    rate = lambda p, c, s=split: line["results"][s][p][c]["images_per_second"]
    assert line["per_core_speedup"][split] == round(rate("workers", "1") / rate("legacy", "1"), 2)
    assert line["scaling_1_to_2"][split] == round(rate("workers", "2") / rate("workers", "1"), 2)
    assert line["projected_96_vcpu_images_per_second"][split] == round(rate("workers", "2") / 2 * 96)
  assert set(line["profile_ms"]) == {"read", "decode", "train_crop_resize", "eval_crop_resize"}
  overhead = line["loader_overhead_ms_per_batch"]
  assert set(overhead) == {"pool", "grain"}
  assert set(overhead["pool"]) == {"1", "2"} and all(v > 0 for v in overhead["pool"].values())
  assert overhead["grain"] is None or set(overhead["grain"]) == {"1", "2"}
  serial = line["serial_stage"]
  for pipeline in ("legacy", "workers"):
    assert serial["host_ceiling_images_per_second"][pipeline] == round(
        1000 / serial["ms_per_image"][pipeline])
  assert line["targets"] == {"per_core_speedup": 2.0, "scaling_1_to_2": 1.7}
