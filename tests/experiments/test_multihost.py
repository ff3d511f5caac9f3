"""Multi-host for real: the stock smoke config as 2 JAX processes x 2 CPU devices.

A TPU slice is several hosts, one JAX process each. Here the README's
multi-host recipe runs as 2 processes on this machine (`jax.distributed` over
127.0.0.1, CPU collectives over gloo, 2 fake devices per process), against
the stock smoke config on 1 process with 1 device (the `smoke_reference`
fixture in tests/conftest.py, which test_distributed.py shares).

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \\
  python -m experiments.main --config=experiments/configs/smoke.py --workdir=W \\
      --config.dataset.data_dir=D --config.distributed=True \\
      --coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I   # I = 0, 1

The 2-process runs start from the 1-process run's baseline (`init_checkpoint`):
a baseline trained on 2 processes x 2 devices drifts from the 1-device one in
the last float bits (the all-reduce sums the gradients in another order), so
only runs from the same weights can be compared exactly.

What must hold, and is asserted:
- the same weights give exactly the same test accuracy on 2 processes as on 1,
  and the first quantization step gives exactly the same masks and accuracy;
  INQ retrained from there on 2 processes ends within 1 point of the 1-process
  run. Each process feeds only its own half of every batch, so had both read
  the same half, or the halves been swapped against the devices' rows, counts
  and accuracy would not match exactly;
- both processes hold identical masks after every phase;
- orbax checkpoints are written once, collectively, into the shared workdir;
- the README's command, SIGKILLed on both processes mid-phase and then run
  again on both, ends with the uninterrupted 2-process run's accuracies and a
  bit-identical model.inq.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SAME_START_TOLERANCE = 0.01  # 5 test images: INQ from the same baseline
# From an init_checkpoint the saves are: 1 phase 1 quantized, 2 its epoch, 3 phase 2
# quantized (killed after it, during phase 2's retraining), ..., 7 phase 4, 8 done.
KILL_AFTER_CHECKPOINT = 3
TIMEOUT = 900


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices, **extra):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", **extra)


def readme_command(workdir, data_dir, port, process_id, *flags):
  """The README's multi-host recipe, for process `process_id` of 2."""
  return [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data_dir}",
          "--config.distributed=True", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", f"--process_id={process_id}", *flags]


def start(cmd, env, log):
  with open(log, "w") as f:
    return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)


def start_readme_pair(workdir, data_dir, logs, tag, *flags):
  port = free_port()
  return [start(readme_command(workdir, data_dir, port, i, *flags), env_for(2),
                logs / f"{tag}.{i}.log")
          for i in (0, 1)]


def start_run_config_pair(workdir, data_dir, logs, tag, *overrides):
  port = free_port()
  return [start([sys.executable, os.path.join(HERE, "run_config.py"), "smoke", str(workdir),
                 data_dir, "distributed=True", *overrides],
                env_for(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                        JAX_PROCESS_ID=str(i)),
                logs / f"{tag}.{i}.log")
          for i in (0, 1)]


def finish(procs, logs, tag):
  """Waits for every process; all must succeed. Returns process 0's output."""
  deadline = time.monotonic() + TIMEOUT
  try:
    for p in procs:
      p.wait(timeout=max(1, deadline - time.monotonic()))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  outputs = [(logs / f"{tag}.{i}.log").read_text() for i in range(len(procs))]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"{tag} process {i} exited {p.returncode}:\n{out[-4000:]}"
  return outputs[0]


def results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


def exported(workdir):
  """{path: array} of the run's model.inq: every param, bit-exact, and the batch stats."""
  from inq_jax import export  # pylint: disable=g-import-not-at-top
  from inq_jax.tree import leaves_with_paths  # pylint: disable=g-import-not-at-top
  params, extras = export.load_with_extras(str(workdir / "model.inq"))
  return {p: np.asarray(x) for p, x in leaves_with_paths({"params": params, **extras})[0]}


def test_smoke_config_on_2_processes_matches_1_process_and_resumes(tmp_path, fmnist_data_dir,
                                                                   smoke_reference):
  logs = tmp_path / "logs"
  logs.mkdir()
  killed, same = (tmp_path / n for n in ("killed", "same"))

  # 1 process x 1 device: the reference, and the baseline the 2-process runs start from.
  one = smoke_reference
  r1 = results(one)
  assert r1["num_devices"] == 1
  start_from = f"init_checkpoint={one / 'baseline_variables'}"

  # On 2 processes x 2 devices from that baseline, side by side: INQ uninterrupted
  # (run_config.py, which also records every phase's masks on each process), and
  # the README's recipe, SIGKILLed on both processes mid-phase, then rerun.
  exact = start_run_config_pair(same, fmnist_data_dir, logs, "same", start_from)
  pair = start_readme_pair(killed, fmnist_data_dir, logs, "killed", f"--config.{start_from}")
  marker = killed / "checkpoints" / str(KILL_AFTER_CHECKPOINT)
  deadline = time.monotonic() + TIMEOUT
  while not marker.is_dir():
    assert all(p.poll() is None for p in pair), "a process ended before it could be killed"
    assert time.monotonic() < deadline, "no checkpoint to kill after"
    time.sleep(0.05)
  for p in pair:
    os.kill(p.pid, signal.SIGKILL)
  for p in pair:
    assert p.wait() == -signal.SIGKILL
  assert not (killed / "results.json").exists()
  resumed = start_readme_pair(killed, fmnist_data_dir, logs, "resumed", f"--config.{start_from}")
  finish(exact, logs, "same")
  out = finish(resumed, logs, "resumed")
  assert "resuming at stage inq" in out
  assert "final 5-bit: test accuracy" in out and "results:" in out  # process 0 reports
  assert "process 1 of 2" in (logs / "resumed.1.log").read_text()

  # Same weights, 1 vs 2 processes: identical accuracy and first masks; INQ
  # retrained on 2 processes within 1 point; identical masks on both processes.
  rs = results(same)
  assert rs["num_devices"] == 4 and len(rs["phases"]) == 4
  assert rs["baseline"]["test_accuracy"] == r1["baseline"]["test_accuracy"]
  assert rs["phases"][0]["quantized_test_accuracy"] == r1["phases"][0]["quantized_test_accuracy"]
  assert rs["final"]["all_pow2"] and rs["final"]["max_distinct_values"] > 3
  assert abs(rs["final"]["test_accuracy"] - r1["final"]["test_accuracy"]) <= \
      SAME_START_TOLERANCE, (rs["final"], r1["final"])
  m0, m1 = dict(np.load(same / "masks.p0.npz")), dict(np.load(same / "masks.p1.npz"))
  ref_masks = dict(np.load(one / "masks.npz"))
  assert sorted(m0) == sorted(m1) == sorted(ref_masks) and len(m0) == 16
  for key in m0:
    assert np.array_equal(m0[key], m1[key]), key
    if key.startswith("phase0/"):
      assert np.array_equal(m0[key], ref_masks[key]), key

  # One collective set of checkpoints: the run's (max_to_keep=2) and the final model.
  assert sorted(os.listdir(same / "checkpoints")) == ["7", "8"]
  assert not [n for n in os.listdir(same / "checkpoints") if "tmp" in n]
  assert (same / "model.inq").is_file()

  # Killed and resumed ends as the uninterrupted run: accuracies and model.inq, bit for bit.
  rk = results(killed)
  assert rk["final"]["test_accuracy"] == rs["final"]["test_accuracy"]
  assert [p["test_accuracy"] for p in rk["phases"]] == [p["test_accuracy"] for p in rs["phases"]]
  want, got = exported(same), exported(killed)
  assert sorted(want) == sorted(got) and want
  for key, value in want.items():
    assert np.array_equal(value, got[key]), key
