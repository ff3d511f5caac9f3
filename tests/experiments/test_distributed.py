"""The stock smoke config on 1, 3 and 8 (fake CPU) devices.

Each run is a subprocess (XLA_FLAGS must be set before JAX starts), driven by
run_config.py, with the stock config as the README runs it: only the data
directory is set (and, for 3 and 8 devices, the 1-device run's baseline as
init_checkpoint). The 1-device run is the `smoke_reference` fixture
(tests/conftest.py), run once for this test and test_multihost.py.

What must hold, whatever the machine:
- the same weights give the same test accuracy on any device count, exactly:
  the last eval batch is padded to the device count and the padding masked out;
- from the same weights, the partition gives identical masks on any device count,
  and the quantized model the same accuracy;
- INQ retrained on N devices from the 1-device baseline lands within 1 point of
  the 1-device run. Their weights differ in the last float bits after the first
  retraining step (an N-way all-reduce sums the gradients in another order), so
  near-tied weights may then cross a partition threshold; how many do depends
  on the machine and is not asserted.
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# INQ from the same baseline, retrained on 1 and on N devices: their final test
# accuracy over the smoke config's 500 test images may differ by this much (5 images).
TRAINED_TOLERANCE = 0.01


def run(workdir, devices, data_dir, *overrides, env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "run_config.py"), "smoke",
                         str(workdir), data_dir, *overrides], env=env, capture_output=True,
                        text=True, timeout=900, check=False, cwd=ROOT)
  return proc


def results_and_masks(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return results, dict(np.load(os.path.join(workdir, "masks.npz")))


def results_of(workdir, proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return results_and_masks(workdir)


def test_stock_smoke_config_on_1_3_and_8_devices(tmp_path, fmnist_data_dir, smoke_reference):
  one, one_masks = results_and_masks(smoke_reference)
  assert one["num_devices"] == 1
  start = f"init_checkpoint={smoke_reference / 'baseline_variables'}"
  for n in (3, 8):
    workdir = tmp_path / f"n{n}"
    results, masks = results_of(workdir, run(workdir, n, fmnist_data_dir, start))
    assert results["num_devices"] == n
    # The same weights: exact.
    assert results["baseline"]["test_accuracy"] == one["baseline"]["test_accuracy"]
    assert results["phases"][0]["quantized_test_accuracy"] == \
        one["phases"][0]["quantized_test_accuracy"]
    assert sorted(masks) == sorted(one_masks) and len(masks) == 16
    first = [key for key in one_masks if key.startswith("phase0/")]
    assert len(first) == 4
    for key in first:
      assert np.array_equal(one_masks[key], masks[key]), (n, key)
    # Retrained on n devices: fully quantized, close to the 1-device run.
    assert results["final"]["all_pow2"] and results["final"]["max_distinct_values"] > 3
    assert abs(one["final"]["test_accuracy"] - results["final"]["test_accuracy"]) \
        <= TRAINED_TOLERANCE, (n, one["final"], results["final"])
    print(n, "devices: final", results["final"]["test_accuracy"], "vs 1 device",
          one["final"]["test_accuracy"])


def test_train_batch_not_divisible_by_devices_says_what_to_set(tmp_path, fmnist_data_dir):
  proc = run(tmp_path / "w", 8, fmnist_data_dir, "batch_size=100")
  assert proc.returncode != 0
  assert "batch_size is not divisible by the 8 devices, got 100" in proc.stderr
  assert "--config.batch_size" in proc.stderr
  assert not (tmp_path / "w").exists()  # refused before the workdir is claimed
