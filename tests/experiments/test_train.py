"""End to end: the smoke pipeline through every phase, resume, refusal, outputs."""

import json
import os
import signal
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest

from experiments import checkpoints, loops, models, reporting, train
from experiments.configs import smoke
from experiments.data import input_pipeline
from experiments.mesh import Devices
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(data_dir, **overrides):
  c = smoke.get_config()
  c.dataset.data_dir = str(data_dir)
  c.dataset.train_split = "train[:1024]"
  c.dataset.test_split = "test[:300]"
  c.batch_size = 64
  c.eval_batch_size = 100
  c.baseline.epochs = 2
  c.inq.epochs = 1
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


class Recorder:
  """Callback that keeps params/masks at each phase end and can interrupt."""

  def __init__(self, stop_at_steps=()):
    self.phase_end, self.steps, self.stop_at = {}, 0, set(stop_at_steps)

  def __call__(self, event, **info):
    if event == "step":
      self.steps += 1
      if info["step"] in self.stop_at:
        self.stop_at.discard(info["step"])
        raise KeyboardInterrupt(f"simulated kill at step {info['step']}")
    if event == "phase_end":
      self.phase_end[info["phase"]] = (
          jax.tree.map(np.asarray, info["params"]),
          jax.tree.map(np.asarray, info["inq_state"].masks))


@pytest.fixture(scope="module")
def finished(fmnist_data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  rec = Recorder()
  results = train.train_and_evaluate(tiny_config(fmnist_data_dir), str(workdir), callback=rec)
  return workdir, results, rec


def test_results_contract(finished):
  workdir, results, _ = finished
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk == json.loads(json.dumps(results))
  assert on_disk["config"]["inq"]["bits"] == 5
  assert on_disk["num_devices"] == jax.device_count()
  assert 0.0 <= on_disk["baseline"]["test_accuracy"] <= 1.0
  assert [p["portion"] for p in on_disk["phases"]] == [0.5, 0.75, 0.875, 1.0]
  for p in on_disk["phases"]:
    assert 0.0 <= p["test_accuracy"] <= 1.0
    assert np.isfinite(p["train_loss"]) and p["seconds"] > 0
  final = on_disk["final"]
  assert final["bits"] == 5 and final["all_pow2"] is True
  assert 1 < final["max_distinct_values"] <= 17
  assert final["test_accuracy"] == on_disk["phases"][-1]["test_accuracy"]
  # Better than chance after two small epochs: the pipeline really trains.
  assert on_disk["baseline"]["test_accuracy"] > 0.5
  # Every phase records the accuracy right after quantizing, before retraining.
  assert all(0.0 <= p["quantized_test_accuracy"] <= 1.0 for p in on_disk["phases"])
  assert on_disk["phases"][-1]["quantized_test_accuracy"] == final["test_accuracy"]


# How far 5-bit INQ may land below the float model on the tiny run (300 test
# images, one epoch per phase). A quantizer that rounds to the wrong codebook
# (e.g. only {0, +-2^n1}) loses far more than this.
INQ_TOLERANCE = 0.03


def test_inq_keeps_the_accuracy_and_the_codebook(finished):
  _, results, rec = finished
  assert results["final"]["test_accuracy"] >= \
      results["baseline"]["test_accuracy"] - INQ_TOLERANCE, results
  final, _ = rec.phase_end[3]
  for path, w in leaves_with_paths(final)[0]:
    if path.endswith("kernel"):
      assert len(np.unique(w)) > 3, path  # a real b-bit codebook, not ternary


def test_codebook_warning_at_3_bits_not_at_5(finished):
  """The paper's codebook zeroes most of a trained LeNet's layers at 3 bits: init warns."""
  workdir, results, _ = finished
  fit = results["codebook"]  # recorded at INQ start, 5 bits
  assert sorted(fit) == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"]
  assert all(f["zero_fraction"] < 0.5 for f in fit.values())
  model = models.get_model("lenet", 10)
  template = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))
  params = checkpoints.load_variables(str(workdir / "baseline_variables"),
                                      {"params": template["params"], "batch_stats": {}})["params"]
  for bits, calibration, warned in ((5, "absmax", False), (3, "absmax", True),
                                    (3, "mse", False)):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      state = inq.init(params, inq.INQConfig(bits=bits, calibration=calibration))
    fit = reporting.codebook_entry(inq.codebook_fit(params, state))
    # Independent of codebook_fit: numpy's rounding count for one layer.
    n1, n2 = (int(x) for x in state.bounds("fc1/kernel"))
    w = np.asarray(params["fc1"]["kernel"], np.float64)
    assert fit["fc1/kernel"]["zero_fraction"] == pytest.approx(
        np.mean(np.abs(w) < 2.0 ** (n2 - 1)), abs=1e-9)
    fit_warnings = [w for w in caught if issubclass(w.category, inq.CodebookFitWarning)]
    assert bool(fit_warnings) is warned, (bits, fit)
    if warned:
      assert "fc1/kernel" in str(fit_warnings[0].message)


def test_outputs_written(finished):
  workdir, _, _ = finished
  for name in ("accuracy.png", "weights.png", "metrics.jsonl", "config.json"):
    assert (workdir / name).stat().st_size > 0, name
  assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any("test_accuracy" in l and l.get("phase") == 4 for l in lines)
  assert any("train_loss" in l and l["stage"] == "baseline" for l in lines)


def test_frozen_kernels_kept_through_next_phase(finished):
  _, _, rec = finished
  assert sorted(rec.phase_end) == [0, 1, 2, 3]
  for p in range(3):
    params_a, masks_a = rec.phase_end[p]
    params_b, masks_b = rec.phase_end[p + 1]
    flat_a, flat_b = dict(leaves_with_paths(params_a)[0]), dict(leaves_with_paths(params_b)[0])
    masks_a, masks_b = dict(leaves_with_paths(masks_a)[0]), dict(leaves_with_paths(masks_b)[0])
    kernels = [k for k in flat_a if k.endswith("kernel")]
    assert len(kernels) == 4
    for k in kernels:
      m = masks_a[k].astype(bool)
      assert m.any() and masks_b[k][m].all()
      assert flat_a[k][m].tobytes() == flat_b[k][m].tobytes(), k
      if p < 2:  # weights still float after phase p + 1 moved while retraining
        still = ~masks_b[k].astype(bool)
        assert np.any(flat_a[k][still] != flat_b[k][still])
  final, _ = rec.phase_end[3]
  for path, w in leaves_with_paths(final)[0]:
    if path.endswith("kernel"):  # independent check: every nonzero is exactly 2^k
      nz = np.abs(w[w != 0]).astype(np.float64)
      np.testing.assert_array_equal(np.exp2(np.round(np.log2(nz))), nz)


def _data_dir(workdir):
  return json.loads((workdir / "config.json").read_text())["dataset"]["data_dir"]


TINY_FLAGS = ("--config.dataset.train_split=train[:1024]", "--config.dataset.test_split=test[:300]",
              "--config.batch_size=64", "--config.eval_batch_size=100",
              "--config.baseline.epochs=2", "--config.inq.epochs=1")


def test_finished_run_reprints_without_training(finished):
  workdir, results, _ = finished
  rec = Recorder()
  again = train.train_and_evaluate(tiny_config(_data_dir(workdir)), str(workdir), callback=rec)
  assert rec.steps == 0
  assert again == json.loads(json.dumps(results))
  # The command itself, as a user runs it: it reads the run back and prints it.
  out = subprocess.run(
      [sys.executable, "-m", "experiments.main", "--config=experiments/configs/smoke.py",
       f"--workdir={workdir}", f"--config.dataset.data_dir={_data_dir(workdir)}", *TINY_FLAGS],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "final 5-bit: test accuracy" in out.stdout
  assert f"results: {workdir}/results.json" in out.stdout


def test_changed_config_is_refused(finished):
  workdir, _, _ = finished
  before = sorted(os.listdir(workdir / "checkpoints"))
  config = tiny_config(_data_dir(workdir), **{"inq.bits": 4})
  with pytest.raises(ValueError, match=r"different config.*inq.bits: 5 -> 4"):
    train.train_and_evaluate(config, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_kill_and_resume_gives_identical_params(finished, fmnist_data_dir, tmp_path):
  _, results, rec_full = finished
  config = tiny_config(fmnist_data_dir)
  # 16 steps per epoch: kill in baseline epoch 2 (after its first checkpoint, so
  # the restore runs), then mid-way through phase 2's epoch.
  rec = Recorder(stop_at_steps=(16 + 5, 32 + 16 + 5))
  for _ in range(2):
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path), callback=rec)
  resumed = train.train_and_evaluate(config, str(tmp_path), callback=rec)
  want, _ = rec_full.phase_end[3]
  got, _ = rec.phase_end[3]
  for (path, a), (_, b) in zip(leaves_with_paths(want)[0], leaves_with_paths(got)[0]):
    assert a.tobytes() == b.tobytes(), path
  assert resumed["final"] == json.loads(json.dumps(results["final"]))
  assert [p["test_accuracy"] for p in resumed["phases"]] == \
      [p["test_accuracy"] for p in results["phases"]]


def test_sigkill_while_a_checkpoint_is_written_resumes_bit_identically(finished, tmp_path):
  workdir, results, rec_full = finished
  command = [sys.executable, os.path.join(ROOT, "tests", "experiments", "run_config.py"),
             "smoke", str(tmp_path), _data_dir(workdir),
             *(f.removeprefix("--config.") for f in TINY_FLAGS)]
  env = dict(os.environ, PYTHONPATH=ROOT, KILL_AT_SAVE="4")  # phase 1's epoch checkpoint
  killed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  env.pop("KILL_AT_SAVE")
  resumed = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=600, check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  got = dict(np.load(tmp_path / "final_params.npz"))
  want, _ = rec_full.phase_end[3]
  for path, a in leaves_with_paths(want)[0]:
    assert a.tobytes() == got[path].tobytes(), path
  again = json.loads((tmp_path / "results.json").read_text())
  assert again["final"] == json.loads(json.dumps(results["final"]))


def test_bad_config_fails_before_writing(tmp_path, fmnist_data_dir):
  with pytest.raises(ValueError, match="portions must end at 1.0"):
    train.train_and_evaluate(tiny_config(fmnist_data_dir, **{"inq.portions": (0.5, 0.9)}),
                             str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("override, error", [
    ({"batch_size": 0}, "batch_size must be a positive int, got 0"),
    ({"eval_batch_size": -5}, "eval_batch_size must be a positive int"),
    ({"batch_size": 4096}, r"batch_size=4096 is larger than the train split \(1024"),
    ({"init_checkpoint": "/nonexistent/ckpt"}, "init_checkpoint /nonexistent/ckpt does not exist"),
    ({"inq.epochs": -1.0}, "inq.epochs must be a number of epochs >= 0"),
])
def test_bad_input_claims_nothing_and_the_fixed_command_runs(tmp_path, fmnist_data_dir,
                                                             override, error):
  with pytest.raises((ValueError, FileNotFoundError), match=error):
    train.train_and_evaluate(tiny_config(fmnist_data_dir, **override), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # so the corrected command may use this workdir


def test_from_init_checkpoint_with_carry_and_final_finetune(finished, tmp_path):
  workdir, results, rec = finished
  config = tiny_config(_data_dir(workdir), **{
      "init_checkpoint": str(workdir / "baseline_variables"),
      "inq.portions": (0.5, 1.0), "inq.carry_optimizer_state": True,
      "inq.final_finetune_epochs": 1})
  rec2 = Recorder()
  out = train.train_and_evaluate(config, str(tmp_path), callback=rec2)
  # The restored baseline is the finished run's fp32 model, not retrained.
  assert out["baseline"]["epochs"] == 0
  assert out["baseline"]["test_accuracy"] == results["baseline"]["test_accuracy"]
  assert out["final"]["all_pow2"] is True
  assert rec2.steps == 2 * 16  # one epoch after portion 0.5, one finetune epoch
  # The finetune moved biases only: every kernel is identical to the phase-1 end
  # except the weights quantized by the last step.
  final, masks = rec2.phase_end[1]
  flat = dict(leaves_with_paths(final)[0])
  assert all(m.all() for p, m in leaves_with_paths(masks)[0] if p.endswith("kernel"))
  before, _ = rec2.phase_end[0]
  before = dict(leaves_with_paths(before)[0])
  assert any(np.any(before[p] != flat[p]) for p in flat if p.endswith("bias"))
  # The finetune is evaluated after each epoch (one here): results and metrics.jsonl.
  last = out["phases"][-1]
  assert last["epoch_test_accuracy"] == [out["final"]["test_accuracy"]]
  tested = [r for r in reporting.read_metrics(str(tmp_path))
            if r.get("phase") == 2 and "epoch" in r]
  assert [r["test_accuracy"] for r in tested] == last["epoch_test_accuracy"]
  assert "epoch_test_accuracy" not in out["phases"][0]  # ordinary phases: at the end only


def test_train_loss_of_a_phase_without_training_is_on_a_fixed_sample(fmnist_data_dir,
                                                                     monkeypatch):
  data = input_pipeline.get_dataset(tiny_config(fmnist_data_dir).dataset)
  monkeypatch.setattr(loops, "TRAIN_LOSS_EXAMPLES", 250)
  devices = Devices()
  got = list(loops.train_split_eval_batches(data, 100, devices, seed=3))
  # whole batches until at least 250 examples: 3 of 100, all counted
  assert [len(b["label"]) for b in got] == [100] * 3 and all(b["mask"].all() for b in got)
  # the first batches of the split's seeded shuffle, not augmented: the same twice
  again = list(loops.train_split_eval_batches(data, 100, devices, seed=3))
  assert all((a["image"] == b["image"]).all() for a, b in zip(got, again))
  full = list(data.train_batches(100, 0, 3, augment=False))[:3]
  assert all((a["image"] == b["image"]).all() for a, b in zip(got, full))
  # a split smaller than the sample is evaluated whole
  monkeypatch.setattr(loops, "TRAIN_LOSS_EXAMPLES", 10**6)
  assert sum(len(b["label"]) for b in loops.train_split_eval_batches(
      data, 100, devices, seed=3)) == 1000


def test_pruning_stage_then_inq_resumes_bit_identically(finished, tmp_path):
  """Pruning (2 steps) then INQ; pruned weights stay +0.0; a killed run resumes exactly."""
  workdir, results, _ = finished
  config = tiny_config(_data_dir(workdir), **{
      "init_checkpoint": str(workdir / "baseline_variables"),
      "prune.sparsity": ((r"conv1/", 0.3), (r".*", 0.8)), "prune.steps": 2,
      "prune.epochs": 0.5, "inq.portions": (0.5, 0.75, 1.0),
      "inq.epochs": 0.5})
  rec = Recorder()
  out = train.train_and_evaluate(config, str(tmp_path / "a"), callback=rec)
  assert rec.steps == 2 * 8 + 2 * 8  # 0.5 epochs (8 steps) per pruning step and phase
  assert [s["step"] for s in out["prune"]["steps"]] == [1, 2]
  layers = out["prune"]["steps"][-1]["layers"]
  assert layers["conv1/kernel"] == pytest.approx(0.3, abs=1e-3)
  assert layers["fc1/kernel"] == pytest.approx(0.8, abs=1e-6)
  assert out["final"]["all_pow2"] is True
  final, masks = rec.phase_end[2]
  fc1 = final["fc1"]["kernel"]
  zeros = np.sum(fc1 == 0)
  assert zeros >= int(0.8 * fc1.size)  # the pruned weights are still exactly zero
  assert np.all(np.signbit(fc1[fc1 == 0]) == False)  # +0.0, noqa: E712
  # After phase 1 (portion 0.5) each kernel has pruned + half of the rest frozen.
  _, masks1 = rec.phase_end[0]
  m = masks1["fc1"]["kernel"]
  pruned = int(0.8 * m.size)
  assert int(m.sum()) == pruned + round(0.5 * (m.size - pruned))

  # Killed in pruning step 2 and in INQ phase 1, resumed: the same final params.
  rec2 = Recorder(stop_at_steps=(12, 20))
  for _ in range(2):
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path / "b"), callback=rec2)
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"), callback=rec2)
  got, _ = rec2.phase_end[2]
  for (path, a), (_, b) in zip(leaves_with_paths(final)[0], leaves_with_paths(got)[0]):
    assert a.tobytes() == b.tobytes(), path
  assert resumed["final"]["test_accuracy"] == out["final"]["test_accuracy"]


@pytest.mark.parametrize("benchmark", ["phase_compile", "end_to_end"])
def test_benchmarks_read_a_finished_run(finished, benchmark):
  workdir, results, _ = finished
  out = subprocess.run([sys.executable, "-m", f"experiments.benchmarks.{benchmark}",
                        f"--workdir={workdir}"], capture_output=True, text=True, check=True)
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line["benchmark"] == benchmark and line["num_devices"] == 1
  if benchmark == "phase_compile":
    retrained = [p for p in results["phases"] if p["epochs"] > 0]
    assert [p["portion"] for p in line["phases"]] == [p["portion"] for p in retrained]
    assert line["max_fraction"] == max(p["fraction"] for p in line["phases"]) > 0
  else:
    assert line["final_test_accuracy"] == results["final"]["test_accuracy"]
    assert line["baseline"]["images_per_second"] > 0 and line["inq"]["epochs"] > 0


def test_tensorboard_writer_loads_without_torch_and_leaves_torch_importable(tmp_path):
  """tensorboardX imports torch if installed (seconds per run start); the writer hides it."""
  code = ("import sys\n"
          "from experiments import reporting\n"
          f"w = reporting.MetricWriter({str(tmp_path)!r})\n"
          "w.write(1, loss=0.5)\n"
          "w.close()\n"
          "assert 'tensorboardX' in sys.modules and 'torch' not in sys.modules, 'torch imported'\n"
          "import importlib.util\n"
          "if importlib.util.find_spec('torch'):\n"
          "  import torch\n"
          "  print('torch', torch.__version__)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert any(f.startswith("events") for f in os.listdir(tmp_path / "tensorboard"))
