"""experiments.main as a command: flags, what it prints, the cluster settings it passes on.

The trainer is replaced by a stand-in (a fake `experiments.train` and
`experiments.reporting` installed before the command imports them), so these
tests check the command's own logic in a couple of seconds each, whatever the
trainer does; whole runs through the command are in test_train.py and
test_multihost.py.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from experiments import distributed

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Runs experiments.main with the trainer replaced: the fake train_and_evaluate
# prints what it was given and returns a small results dict, the fake
# summary_lines prints it back. FAKE_PROCESS_INDEX pretends to be process i.
DRIVER = textwrap.dedent("""
    import json, os, sys, types
    import experiments
    calls = []
    def train_and_evaluate(config, workdir):
      print("TRAIN " + json.dumps({"workdir": workdir, "model": config.model,
                                   "bits": config.inq.bits}), flush=True)
      return {"final": {"test_accuracy": 0.5}}
    train = types.ModuleType("experiments.train")
    train.train_and_evaluate = train_and_evaluate
    reporting = types.ModuleType("experiments.reporting")
    reporting.RESULTS_FILE = "results.json"
    reporting.summary_lines = lambda results: ["SUMMARY " + json.dumps(results)]
    for name, module in (("train", train), ("reporting", reporting)):
      sys.modules["experiments." + name] = module
      setattr(experiments, name, module)
    import jax
    index = int(os.environ.get("FAKE_PROCESS_INDEX", "0"))
    jax.process_index = lambda: index
    from absl import app
    from experiments import main
    main.define_flags()
    sys.argv = ["experiments.main"] + sys.argv[1:]
    app.run(main.main)
""")


def run_main(*flags, process_index=0):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             FAKE_PROCESS_INDEX=str(process_index))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(name, None)
  return subprocess.run([sys.executable, "-c", DRIVER, *flags], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


def train_calls(out):
  return [json.loads(line[len("TRAIN "):]) for line in out.stdout.splitlines()
          if line.startswith("TRAIN ")]


def test_runs_the_config_and_prints_the_results(tmp_path):
  workdir = str(tmp_path / "run") + "/"
  out = run_main("--config=experiments/configs/smoke.py", f"--workdir={workdir}",
                 "--config.inq.bits=4")
  assert out.returncode == 0, out.stderr[-3000:]
  assert train_calls(out) == [{"workdir": workdir, "model": "lenet", "bits": 4}]
  lines = out.stdout.splitlines()
  assert 'SUMMARY {"final": {"test_accuracy": 0.5}}' in lines
  assert f"results: {tmp_path}/run/results.json" in lines  # one slash


def test_only_process_0_prints(tmp_path):
  out = run_main("--config=experiments/configs/smoke.py", f"--workdir={tmp_path}",
                 process_index=1)
  assert out.returncode == 0, out.stderr[-3000:]
  assert len(train_calls(out)) == 1  # every process trains
  assert not any(line.startswith(("SUMMARY", "results:")) for line in out.stdout.splitlines())


@pytest.mark.parametrize("flag", ["--num_processes=2",
                                  "--coordinator_address=127.0.0.1:1234"])
def test_cluster_flags_need_distributed(tmp_path, flag):
  out = run_main("--config=experiments/configs/smoke.py", f"--workdir={tmp_path}", flag)
  assert out.returncode != 0
  assert "need --config.distributed=True" in out.stderr
  assert train_calls(out) == []  # refused before training


def test_required_flags_and_stray_arguments(tmp_path):
  out = run_main("--config=experiments/configs/smoke.py")
  assert out.returncode != 0 and "workdir" in out.stderr and train_calls(out) == []
  out = run_main("--config=experiments/configs/smoke.py", f"--workdir={tmp_path}", "extra")
  assert out.returncode != 0 and "unexpected arguments" in out.stderr
  assert train_calls(out) == []


@pytest.fixture
def recorded_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda name, value: calls.append({name: value}))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  return calls


def test_initialize_distributed_reads_the_environment(recorded_initialize, monkeypatch):
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:4321")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  distributed.initialize()
  assert recorded_initialize == [
      {"jax_cpu_collectives_implementation": "gloo"},
      {"coordinator_address": "10.0.0.1:4321", "num_processes": 3, "process_id": 2}]


def test_initialize_distributed_flags_win_and_unset_is_left_to_jax(recorded_initialize,
                                                                   monkeypatch):
  monkeypatch.setenv("JAX_NUM_PROCESSES", "3")
  monkeypatch.setenv("JAX_PROCESS_ID", "")  # set but empty: unset
  distributed.initialize(coordinator_address="h:1", num_processes=4)
  assert recorded_initialize[-1] == {"coordinator_address": "h:1", "num_processes": 4,
                                     "process_id": None}
  recorded_initialize.clear()
  monkeypatch.delenv("JAX_NUM_PROCESSES")
  distributed.initialize(process_id=0)
  assert recorded_initialize[-1] == {"coordinator_address": None, "num_processes": None,
                                     "process_id": 0}
