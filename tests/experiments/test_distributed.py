"""The stock smoke config on 1, 3 and 8 (fake CPU) devices.

Each run is a subprocess (XLA_FLAGS must be set before JAX starts), driven by
run_config.py, with the stock config as the README runs it: only the data
directory is set.

What must hold, whatever the machine:
- the same weights give the same test accuracy on any device count, exactly:
  the last eval batch is padded to the device count and the padding masked out;
- from the same weights, the partition gives identical masks on any device count;
- a run trained on N devices quantizes fully and lands near the 1-device run.
  Their weights differ in the last float bits (an N-way all-reduce sums the
  gradients in another order), so near-tied weights may cross a partition
  threshold; how many does depends on the machine, and is not asserted.
"""

import json
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# Two smoke runs trained on different device counts: their final test accuracy
# over the 500 test images may differ by this much (10 images).
TRAINED_TOLERANCE = 0.02


def run(workdir, devices, data_dir, *overrides, env=None):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **(env or {}))
  proc = subprocess.run([sys.executable, os.path.join(HERE, "run_config.py"), "smoke",
                         str(workdir), data_dir, *overrides], env=env, capture_output=True,
                        text=True, timeout=900, check=False, cwd=ROOT)
  return proc


def results_of(workdir, proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  return results, dict(np.load(os.path.join(workdir, "masks.npz")))


def test_stock_smoke_config_on_1_3_and_8_devices(tmp_path, fmnist_data_dir):
  one, _ = results_of(tmp_path / "one", run(tmp_path / "one", 1, fmnist_data_dir))
  for n in (3, 8):
    trained, _ = results_of(tmp_path / f"n{n}", run(tmp_path / f"n{n}", n, fmnist_data_dir))
    assert trained["num_devices"] == n
    assert trained["final"]["all_pow2"] and trained["final"]["max_distinct_values"] > 3
    assert abs(one["final"]["test_accuracy"] - trained["final"]["test_accuracy"]) \
        <= TRAINED_TOLERANCE, (n, one["final"], trained["final"])

  # From the 1-device baseline: evaluation and partition are exact on any count.
  start = f"init_checkpoint={tmp_path / 'one' / 'baseline_variables'}"
  same = {}
  for n in (1, 3, 8):
    workdir = tmp_path / f"q{n}"
    same[n] = results_of(workdir, run(workdir, n, fmnist_data_dir, start,
                                      "inq.epochs_per_phase=0"))
  for n in (3, 8):
    results, masks = same[n]
    assert results["num_devices"] == n
    assert results["baseline"]["test_accuracy"] == one["baseline"]["test_accuracy"]
    assert [p["test_accuracy"] for p in results["phases"]] == \
        [p["test_accuracy"] for p in same[1][0]["phases"]]
    assert sorted(masks) == sorted(same[1][1]) and len(masks) == 16
    for key, m in same[1][1].items():
      assert np.array_equal(m, masks[key]), (n, key)


def test_train_batch_not_divisible_by_devices_says_what_to_set(tmp_path, fmnist_data_dir):
  proc = run(tmp_path / "w", 8, fmnist_data_dir, "batch_size=100")
  assert proc.returncode != 0
  assert "batch_size=100 is not divisible by the 8 devices" in proc.stderr
  assert "--config.batch_size" in proc.stderr
  assert not (tmp_path / "w").exists()  # refused before the workdir is claimed
