"""save_final / load_final / export_model, and the export and evaluate commands."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints, loops, models, recipe, steps
from experiments.data import input_pipeline
from experiments.mesh import Devices
from experiments.tools import evaluate
from experiments.configs import smoke
from inq_jax import export, verify_file
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def run_inq(params, config, pruned=None):
  state = inq.init(params, config, pruned=pruned)
  for _ in state.config.portions:
    params, state = inq.advance(params, state)
  return params, state


def export_workdir(workdir):
  """What `python -m experiments.tools.export --workdir=WORKDIR` does: the trainer's export
  of the finished model read back from WORKDIR/final/."""
  variables, state = checkpoints.load_final(str(workdir))
  return checkpoints.export_model(checkpoints.export_path(str(workdir)), variables, state)


def assert_same(a, b):
  fa, fb = dict(leaves_with_paths(a)[0]), dict(leaves_with_paths(b)[0])
  assert sorted(fa) == sorted(fb)
  for path in fa:
    x, y = np.asarray(fa[path]), np.asarray(fb[path])
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), path


def small_variables():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"block": {"conv": {"kernel": jax.random.normal(k[0], (3, 3, 2, 4)) * 0.2},
                      "bn": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}},
            "head": {"kernel": jax.random.normal(k[1], (16, 3)) * 0.1,
                     "bias": jnp.arange(3, dtype=jnp.float32)}}
  batch_stats = {"block": {"bn": {"mean": jax.random.normal(k[2], (4,)),
                                  "var": jnp.full(4, 0.5)}}}
  return params, batch_stats


def test_save_final_load_final_export_round_trip(tmp_path, capsys):
  params, batch_stats = small_variables()
  keep = inq.prune_masks(params, inq.PruneConfig(sparsity=0.5), 1)
  params = jax.tree.map(lambda w, m: jnp.where(m, w, 0.0), params, keep)
  config = inq.INQConfig(bits=4, portions=(0.5, 1.0), granularity="channel", seed=3)
  params, state = run_inq(params, config, pruned=keep)
  checkpoints.save_final(str(tmp_path), {"params": params, "batch_stats": batch_stats}, state)
  assert sorted(os.listdir(tmp_path / "final")) == ["1"]  # one orbax checkpoint

  variables, back = checkpoints.load_final(str(tmp_path))
  assert_same(variables, {"params": params, "batch_stats": batch_stats})
  assert back.config == config and int(back.step) == 2
  assert_same(back.masks, state.masks)
  assert_same(back.exponents, state.exponents)
  assert_same(back.pruned, state.pruned) and back.pruned
  inq.verify(variables["params"], back)  # a usable INQState

  stats = export_workdir(tmp_path)
  assert stats["file"] == str(tmp_path / "model.inq") and stats["bits"] == 4
  assert stats["quantized_weights"] == 3 * 3 * 2 * 4 + 16 * 3
  loaded, extras = export.load_with_extras(tmp_path / "model.inq")
  assert_same(loaded, params)
  assert_same(extras, {"batch_stats": batch_stats})
  assert verify_file.main([str(tmp_path / "model.inq")]) == 0
  assert "OK" in capsys.readouterr().out


def test_save_final_overwrites_and_load_final_refuses_incomplete(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no finished model"):
    checkpoints.load_final(str(tmp_path))
  params, batch_stats = small_variables()
  p5, s5 = run_inq(params, inq.INQConfig(bits=5, portions=(1.0,)))
  checkpoints.save_final(str(tmp_path), {"params": p5, "batch_stats": batch_stats}, s5)
  p3, s3 = run_inq(params, inq.INQConfig(bits=3, portions=(1.0,)))
  checkpoints.save_final(str(tmp_path), {"params": p3, "batch_stats": batch_stats}, s3)
  variables, state = checkpoints.load_final(str(tmp_path))
  assert state.config.bits == 3 and state.pruned == {}
  assert_same(variables["params"], p3)
  # As if killed mid-save: orbax leaves only its temporary directory.
  assert sorted(os.listdir(tmp_path / "final")) == ["2"]  # the first one replaced
  os.rename(tmp_path / "final" / "2", tmp_path / "final" / "2.orbax-checkpoint-tmp-1")
  with pytest.raises(FileNotFoundError, match="holds no finished model"):
    checkpoints.load_final(str(tmp_path))


def test_export_refuses_unfinished_run(tmp_path):
  params, batch_stats = small_variables()
  state = inq.init(params, inq.INQConfig(bits=5))
  params, state = inq.advance(params, state)
  checkpoints.save_final(str(tmp_path), {"params": params, "batch_stats": batch_stats}, state)
  with pytest.raises(ValueError, match="only .* weights are quantized and frozen"):
    export_workdir(tmp_path)
  assert not (tmp_path / "model.inq").exists()


def test_export_command(tmp_path):
  params, batch_stats = small_variables()
  params, state = run_inq(params, inq.INQConfig(bits=5))
  checkpoints.save_final(str(tmp_path), {"params": params, "batch_stats": batch_stats}, state)
  out = tmp_path / "out.inq"
  run = subprocess.run([sys.executable, "-m", "experiments.tools.export", f"--workdir={tmp_path}",
                        f"--output={out}"], cwd=REPO, capture_output=True, text=True,
                       timeout=180)
  assert run.returncode == 0, run.stderr[-3000:]
  stats = json.loads(run.stdout.strip().splitlines()[-1])
  assert stats["file"] == str(out) and stats["bytes"] == os.path.getsize(out)
  assert_same(export.load(out), params)


def test_export_refuses_a_workdir_without_a_finished_model(tmp_path):
  config = smoke.get_config()
  checkpoints.claim_workdir(str(tmp_path), config)  # a run that has not finished
  with pytest.raises(FileNotFoundError, match="holds no finished model"):
    export_workdir(tmp_path)
  assert not (tmp_path / "model.inq").exists()


# ------------------------------------------------------------ evaluation


def lenet_config(data_dir):
  c = smoke.get_config()
  c.dataset.data_dir = str(data_dir)
  c.dataset.test_split = "test[:300]"
  c.eval_batch_size = 128  # 300 = 2 full batches + a padded one
  return c


def test_evaluate_equals_the_runs_own_evaluation(fmnist_data_dir, tmp_path):
  config = lenet_config(fmnist_data_dir)
  model = models.from_config(config, 10)  # the model training builds from this config
  variables = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))
  params, state = run_inq(variables["params"], recipe.inq_config(config))
  checkpoints.save_final(str(tmp_path), {"params": params, "batch_stats": {}}, state)
  stats = export_workdir(tmp_path)

  # The trainer's evaluation of the in-memory quantized params.
  data = input_pipeline.get_dataset(config.dataset)
  devices = Devices()
  eval_step = steps.make_eval_step(model, devices, top5=False, normalization=data.normalization)
  want = loops.evaluate(eval_step, devices.replicate(params), {},
                        loops.test_batches(data, config.eval_batch_size, devices), devices)

  # The exported file through the command line, with config overrides.
  cli = subprocess.run(
      [sys.executable, "-m", "experiments.tools.evaluate",
       "--config=experiments/configs/smoke.py", f"--config.dataset.data_dir={fmnist_data_dir}",
       "--config.dataset.test_split=test[:300]", "--config.eval_batch_size=128",
       f"--weights={stats['file']}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert cli.returncode == 0, cli.stderr[-3000:]
  got = json.loads(cli.stdout.strip().splitlines()[-1])
  assert got["test_accuracy"] == want["accuracy"] and got["test_loss"] == want["loss"]
  assert got["weights"] == stats["file"] and got["test_examples"] == 300
  assert got["bits"] == 5 and got["model"] == "lenet"


def test_evaluate_refuses_weights_of_another_model(fmnist_data_dir, tmp_path):
  params, batch_stats = small_variables()
  params, state = run_inq(params, inq.INQConfig(bits=5, portions=(1.0,)))
  export.save(tmp_path / "m.inq", params, state, extras={"batch_stats": batch_stats})
  with pytest.raises(ValueError, match=r"does not fit model 'lenet': missing params/conv1/"):
    evaluate.evaluate(lenet_config(fmnist_data_dir), str(tmp_path / "m.inq"))


def test_evaluate_names_leaves_whose_shapes_do_not_fit(fmnist_data_dir, tmp_path):
  # A LeNet exported with 7 classes, evaluated under a 10-class config: every
  # path exists, only fc2's shapes differ.
  model = models.get_model("lenet", 7)
  shapes = jax.eval_shape(lambda: models.init_variables(model, (1, 28, 28, 1),
                                                        jax.random.key(0)))["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.05,
                                              jnp.float32), shapes)
  params, state = run_inq(params, inq.INQConfig(bits=5, portions=(1.0,)))
  export.save(tmp_path / "m.inq", params, state, extras={"batch_stats": {}})
  with pytest.raises(ValueError, match=r"does not fit model 'lenet': "
                                       r"params/fc2/bias: \(\(7,\), 'float32'\) in the file, "
                                       r"\(\(10,\), 'float32'\) in the model; "
                                       r"params/fc2/kernel: \(\(500, 7\), 'float32'\) in the "
                                       r"file, \(\(500, 10\), 'float32'\) in the model$"):
    evaluate.evaluate(lenet_config(fmnist_data_dir), str(tmp_path / "m.inq"))
