"""The user programs in examples/ run, as a user runs them, against the installed wheel.

Each runs in a fresh process whose `inq_jax` is the built wheel (installed
without dependencies into a folder of its own; jax, flax, optax and orbax come
from the test environment), from a folder outside the checkout, on the real
Fashion-MNIST; afterwards nothing of `experiments`, TFDS or torch may have been
imported. What each prints is checked, and the orbax example is interrupted
and resumed in new processes.
"""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")

# Runs an example as `python examples/NAME.py ARGS` would, then checks where
# inq_jax came from and what was imported.
RUNNER = """
import runpy, sys
site, example = sys.argv[1], sys.argv[2]
sys.argv = [example] + sys.argv[3:]
runpy.run_path(example, run_name="__main__")
import inq_jax
assert inq_jax.__file__.startswith(site), f"inq_jax from {inq_jax.__file__}, not the wheel"
loaded = sorted(m for m in ("experiments", "tensorflow", "tensorflow_datasets", "torch")
                if m in sys.modules)
assert not loaded, f"an example imported {loaded}"
print("EXAMPLE-OK")
"""


@pytest.fixture(scope="module")
def site(inq_wheel, tmp_path_factory):
  """A folder holding the installed wheel alone (no dependencies)."""
  target = tmp_path_factory.mktemp("site")
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                  str(target), inq_wheel], check=True, capture_output=True, timeout=300)
  return str(target)


def run_example(site, name, *args, cwd, expect_ok=True):
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env["PYTHONPATH"] = os.pathsep.join([site, EXAMPLES])
  proc = subprocess.run([sys.executable, "-c", RUNNER, site, os.path.join(EXAMPLES, name),
                         *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=900, check=False)
  out = proc.stdout + proc.stderr
  if expect_ok:
    assert proc.returncode == 0 and "EXAMPLE-OK" in proc.stdout, out[-4000:]
    assert "generated images" not in out  # the real data set was read
  else:
    assert proc.returncode != 0, out[-4000:]
  return out


def accuracies(out, label):
  return [float(a) for a in re.findall(label + r".*?test accuracy (\d\.\d+)", out)]


def test_linen_batchnorm_quantizes_exports_and_reloads(site, fmnist_idx_dir, tmp_path):
  out = run_example(site, "linen_batchnorm.py", "--data_dir", fmnist_idx_dir, "--out",
                    tmp_path / "model.inq", cwd=tmp_path)
  (fp32,) = accuracies(out, "fp32")
  (final,) = accuracies(out, "5-bit INQ")
  (reloaded,) = accuracies(out, "reloaded")
  assert fp32 > 0.8 and final > fp32 - 0.03 and reloaded == final, out
  assert (tmp_path / "model.inq.sha256").exists()
  check = subprocess.run([sys.executable, "-m", "inq_jax.verify_file", str(tmp_path / "model.inq"),
                          "--sha256"], env={**os.environ, "PYTHONPATH": site}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, check=False)
  assert check.returncode == 0 and "OK: SHA-256" in check.stdout, check.stdout + check.stderr


def test_nnx_loop_keeps_every_phase_of_training(site, fmnist_idx_dir, tmp_path):
  out = run_example(site, "nnx_loop.py", "--data_dir", fmnist_idx_dir, cwd=tmp_path)
  (fp32,) = accuracies(out, "fp32")
  (final,) = accuracies(out, "4-bit INQ")
  assert fp32 > 0.75 and final > fp32 - 0.03, out
  assert "StaleParamsWarning" not in out and "all 0 or +-2^k" in out


@pytest.mark.parametrize("model", ["linen", "nnx"])
def test_orbax_resume_mid_run_is_bit_identical_and_refuses_another_config(
    site, fmnist_idx_dir, tmp_path, model):
  common = ("--model", model, "--data_dir", fmnist_idx_dir)
  whole = run_example(site, "orbax_resume.py", "--workdir", tmp_path / "whole", *common,
                      cwd=tmp_path)
  digest = re.search(r"params sha256 ([0-9a-f]{64})", whole).group(1)
  part = tmp_path / "part"
  out = run_example(site, "orbax_resume.py", "--workdir", part, "--stop_after_phase", 1,
                    *common, cwd=tmp_path)
  assert "stopping here" in out and "done" not in out
  wrong = run_example(site, "orbax_resume.py", "--workdir", part, "--bits", 4, *common,
                      cwd=tmp_path, expect_ok=False)
  assert "this INQState does not belong to its config or to these params" in wrong
  resumed = run_example(site, "orbax_resume.py", "--workdir", part, *common, cwd=tmp_path)
  assert "resuming after phase 1 (saved with bits=5)" in resumed
  assert f"params sha256 {digest}" in resumed
