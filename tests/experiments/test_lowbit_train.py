"""The low-bit options (issue #32) through the trainer and the tools, on real data slices.

- distillation: the loss each INQ phase trains on is the distillation loss against the
  run's own fp32 baseline (WORKDIR/baseline_variables) at the config's weight and
  temperature, recomputed here from the phase's batches; a distilling run killed mid-phase
  resumes bit-identically (the teacher is read back);
- per-layer widths: `inq.layer_bits` reaches the INQConfig, results.json (each layer's
  width, the weighted average), the summary lines, the .inq file, and the tools;
- BatchNorm re-estimation: in post-training quantization of a ResNet-20 the statistics are
  re-estimated from train batches in train mode, the weights are exactly the quantized
  ones, and the "quantized" accuracy is measured with the fresh statistics;
- the options are checked before anything is written, and off by default.
"""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import checkpoints, loops, models, recipe, reporting, steps, train
from experiments.configs import smoke
from experiments.data import input_pipeline
from experiments.mesh import Devices
from experiments.tools import codebook_report, evaluate, shift_check
from experiments.train_state import INQ
from inq_jax import export
from inq_jax import quantize as inq
from inq_jax.tree import leaves_with_paths

MIXED = (("^conv1/", 8), ("^fc2/", 8))


def tiny_config(data_dir, **overrides):
  c = smoke.get_config()
  c.dataset.data_dir = str(data_dir)
  c.dataset.train_split = "train[:1024]"
  c.dataset.test_split = "test[:300]"
  c.batch_size = 64  # 16 steps per epoch
  c.eval_batch_size = 100
  c.baseline.epochs = 1
  c.inq.epochs = 0.5
  c.inq.portions = (0.5, 1.0)
  c.update_from_flattened_dict(overrides)
  return c


class Recorder:
  def __init__(self, stop_at_steps=()):
    self.advanced, self.stop_at = {}, set(stop_at_steps)

  def __call__(self, event, **info):
    if event == "step" and info["step"] in self.stop_at:
      self.stop_at.discard(info["step"])
      raise KeyboardInterrupt(f"simulated kill at step {info['step']}")
    if event == "advance":
      self.advanced[info["phase"]] = jax.tree.map(np.asarray, info["params"])


@pytest.fixture(scope="module")
def baseline(fmnist_data_dir, tmp_path_factory):
  """A trained tiny LeNet run (5 bits, no options): its baseline_variables start the rest."""
  workdir = tmp_path_factory.mktemp("plain")
  results = train.train_and_evaluate(tiny_config(fmnist_data_dir), str(workdir))
  return workdir, results


# ------------------------------------------------------------ config


@pytest.mark.parametrize("key,value,match", [
    ("inq.distill_weight", 1.5, r"inq.distill_weight must be at most 1 .*got 1.5"),
    ("inq.distill_weight", -0.1, r"inq.distill_weight must be a number in \[0, 1\].*got -0.1"),
    ("inq.distill_temperature", 0.0, "inq.distill_temperature must be a number > 0, got 0.0"),
    ("inq.distill_temperature", float("inf"), "inq.distill_temperature must be finite"),
    ("inq.bn_reestimate_batches", -1, "inq.bn_reestimate_batches must be an int >= 0"),
    ("inq.layer_bits", (("^conv1/", 9),), r"layer_bits\['\^conv1/'\]"),
    ("inq.layer_bits", (("(", 8),), "layer_bits regex"),
])
def test_bad_lowbit_options_fail_before_writing(tmp_path, key, value, match):
  config = tiny_config(tmp_path / "no_data")
  node, leaf = config.inq, key.split(".")[1]
  node.unlock()
  node[leaf] = value
  with pytest.raises((ValueError, TypeError), match=match):
    recipe.check_config(config)
  with pytest.raises((ValueError, TypeError), match=match):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_options_are_off_by_default_and_reach_the_inq_config():
  c = smoke.get_config()
  assert c.inq.distill_weight == 0 and c.inq.bn_reestimate_batches == 0
  assert tuple(c.inq.layer_bits) == ()
  assert recipe.distill_options(c) is None
  c.inq.layer_bits = MIXED
  c.inq.bits = 3
  cfg = recipe.inq_config(c)
  assert cfg.layer_bits == MIXED
  assert [cfg.bits_for(p) for p in ("conv1/kernel", "conv2/kernel", "fc1/kernel",
                                    "fc2/kernel")] == [8, 3, 3, 8]
  c.inq.distill_weight, c.inq.distill_temperature = 0.7, 3.0
  assert recipe.distill_options(c) == steps.Distill(0.7, 3.0)


# ------------------------------------------------------------ distillation


def _phase_train_loss(workdir, phase):
  lines = [json.loads(l) for l in (workdir / reporting.METRICS_FILE).read_text().splitlines()]
  return [l["train_loss"] for l in lines
          if l.get("stage") == "inq" and l.get("phase") == phase and "train_loss" in l][-1]


@pytest.mark.filterwarnings("ignore::inq_jax.quantize.StaleParamsWarning")  # lr ~0: on purpose
def test_distillation_trains_against_the_runs_own_baseline(fmnist_data_dir, tmp_path):
  """With a learning rate of 1e-12 (0 is refused) the float32 params stay put
  (each update is far below their rounding step), so the loss each step reports
  is the distillation loss of the quantized student against the teacher,
  recomputed here."""
  a, t = 0.75, 2.5
  config = tiny_config(fmnist_data_dir, **{"inq.distill_weight": a,
                                           "inq.distill_temperature": t,
                                           "inq.learning_rate": 1e-12, "inq.epochs": 0.25,
                                           "inq.final_finetune_epochs": 0.25})
  rec = Recorder()
  train.train_and_evaluate(config, str(tmp_path), callback=rec)
  data = input_pipeline.get_dataset(config.dataset)
  model = models.from_config(config, data.num_classes)
  template = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))
  teacher = checkpoints.load_variables(str(tmp_path / checkpoints.BASELINE_DIR),
                                       {"params": template["params"], "batch_stats": {}})
  for phase in (1, 2):  # a phase, and the final finetune
    student = rec.advanced[phase - 1]  # the params right after quantizing the portion
    segment = next(s for s in recipe.plan(config) if s.stage == INQ and s.index == phase)
    losses = []
    for i, batch in enumerate(data.train_batches(config.batch_size, 0, segment.data_seed)):
      if i == 4:  # 0.25 epochs of 16 steps
        break
      x = steps.prepare_images(jnp.asarray(batch["image"]), data.normalization)
      s_logits = np.float64(model.apply({"params": student}, x, train=True))
      t_logits = np.float64(model.apply({"params": teacher["params"]}, x, train=False))
      losses.append([_numpy_distill(s_logits, t_logits, batch["label"], *at)
                     for at in ((a, t), (0.0, t), (a, 1.0))])
    want, labels_only, at_t1 = np.mean(losses, axis=0)
    assert _phase_train_loss(tmp_path, phase) == pytest.approx(want, rel=1e-5), phase
    # Not vacuous: the labels alone, or T = 1, give other losses.
    assert abs(labels_only - want) > 1e-3 and abs(at_t1 - want) > 1e-3


def _numpy_distill(s, t_logits, labels, a, t):
  def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -log_softmax(s)[np.arange(len(labels)), labels].mean()
  p = np.exp(log_softmax(t_logits / t))
  kl = (p * (np.log(p) - log_softmax(s / t))).sum(-1).mean()
  return (1 - a) * ce + a * t * t * kl


def test_a_distilling_run_killed_mid_phase_resumes_bit_identically(baseline, tmp_path):
  workdir, _ = baseline
  config = tiny_config(str(_data_dir(workdir)), **{
      "init_checkpoint": str(workdir / checkpoints.BASELINE_DIR), "inq.distill_weight": 0.5,
      "inq.final_finetune_epochs": 0.5})
  whole = train.train_and_evaluate(config, str(tmp_path / "whole"))
  # 8 steps a phase (0.5 epochs): kill in phase 1 after 5 steps and in the finetune.
  rec = Recorder(stop_at_steps=(5, 8 + 3))
  for _ in range(2):
    with pytest.raises(KeyboardInterrupt):
      train.train_and_evaluate(config, str(tmp_path / "killed"), callback=rec)
  resumed = train.train_and_evaluate(config, str(tmp_path / "killed"), callback=rec)
  a, b = (_model(tmp_path / name) for name in ("whole", "killed"))
  for (path, x), (_, y) in zip(leaves_with_paths(a)[0], leaves_with_paths(b)[0]):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  assert resumed["final"] == whole["final"]
  # Distillation changed the training: not the plain run's weights.
  plain = train.train_and_evaluate(
      tiny_config(str(_data_dir(workdir)), **{
          "init_checkpoint": str(workdir / checkpoints.BASELINE_DIR),
          "inq.final_finetune_epochs": 0.5}), str(tmp_path / "plain"))
  c = _model(tmp_path / "plain")
  assert any(np.any(np.asarray(x) != np.asarray(y))
             for (_, x), (_, y) in zip(leaves_with_paths(a)[0], leaves_with_paths(c)[0]))
  assert plain["final"]["bits"] == whole["final"]["bits"]


def _model(workdir):
  """The finished run's weights, as it shipped them: {"params", "batch_stats"} of model.inq."""
  params, extras = export.load_with_extras(str(workdir / checkpoints.EXPORT_FILE))
  return {"params": params, "batch_stats": extras.get("batch_stats", {})}


def _data_dir(workdir):
  return json.loads((workdir / "config.json").read_text())["dataset"]["data_dir"]


# ------------------------------------------------------------ per-layer widths


@pytest.fixture(scope="module")
def mixed(baseline, tmp_path_factory):
  workdir, _ = baseline
  out = tmp_path_factory.mktemp("mixed")
  config = tiny_config(_data_dir(workdir), **{
      "init_checkpoint": str(workdir / checkpoints.BASELINE_DIR), "inq.bits": 3,
      "inq.calibration": "mse", "inq.layer_bits": MIXED})
  return out, config, train.train_and_evaluate(config, str(out))


def test_layer_bits_reach_results_and_the_summary(mixed):
  workdir, _, results = mixed
  final = results["final"]
  assert final["bits"] == 3 and final["all_pow2"]
  assert final["layer_bits"] == {"conv1/kernel": 8, "conv2/kernel": 3, "fc1/kernel": 3,
                                 "fc2/kernel": 8}
  sizes = {"conv1/kernel": 5 * 5 * 20, "conv2/kernel": 5 * 5 * 20 * 50,
           "fc1/kernel": 800 * 500, "fc2/kernel": 500 * 10}
  want = sum(final["layer_bits"][p] * n for p, n in sizes.items()) / sum(sizes.values())
  assert final["mean_bits"] == pytest.approx(want) and 3.06 < want < 3.07
  assert {p: c["bits"] for p, c in results["codebook"].items()} == final["layer_bits"]
  lines = reporting.summary_lines(results)
  assert f"final 3-bit (mixed, {want:.2f} bits/weight): test accuracy" in lines[-2]
  assert lines[-1] == ("layer widths: 3 bits: conv2/kernel, fc1/kernel; 8 bits: "
                       "conv1/kernel, fc2/kernel")
  on_disk = json.loads((workdir / "results.json").read_text())
  assert on_disk["final"]["mean_bits"] == pytest.approx(want)
  # The 8-bit layers hold 8-bit codebooks: more than the 5 values of 3 bits.
  params = _model(workdir)["params"]
  assert len(np.unique(params["conv1"]["kernel"])) > 5 >= len(np.unique(params["fc1"]["kernel"]))


def test_a_uniform_run_reports_its_one_width(baseline):
  _, results = baseline
  final = results["final"]
  assert set(final["layer_bits"].values()) == {5} and final["mean_bits"] == 5.0
  assert reporting.bits_label(final) == "5-bit"
  assert reporting.summary_lines(results)[-1].startswith("final 5-bit: test accuracy")


def test_mean_bits_weighs_each_layer_by_its_weights():
  got = reporting.bits_entry({"a": (8, 100), "b": (2, 900)})
  assert got == {"layer_bits": {"a": 8, "b": 2}, "mean_bits": pytest.approx(2.6)}
  assert reporting.bits_label({"bits": 2, "layer_bits": {"a": 8, "b": 2},
                               "mean_bits": 2.6}) == "2-bit (mixed, 2.60 bits/weight)"
  assert not reporting.mixed_widths({"bits": 2, "layer_bits": {"a": 2}})


def test_the_export_and_the_tools_report_each_layers_width(mixed):
  workdir, config, results = mixed
  final = results["final"]
  codes = export.read_codes(str(workdir / "model.inq"))
  assert {p: q.bits for p, q in codes.items()} == final["layer_bits"]
  got = evaluate.evaluate(config, str(workdir / "model.inq"))
  assert got["test_accuracy"] == final["test_accuracy"]
  assert got["bits"] == 3 and got["layer_bits"] == final["layer_bits"]
  assert got["mean_bits"] == pytest.approx(final["mean_bits"])
  checked = shift_check.check(config, str(workdir / "model.inq"), limit=20)
  assert checked["layer_bits"] == final["layer_bits"]
  assert checked["mean_bits"] == pytest.approx(final["mean_bits"])
  assert checked["prediction_match_rate"] >= 0.9
  # The trainer's export (what experiments.tools.export runs) reports the widths too.
  params = _model(workdir)["params"]
  state = inq.init(params, recipe.inq_config(config))
  with warnings.catch_warnings():  # the params are quantized already: nothing retrains
    warnings.simplefilter("ignore", inq.StaleParamsWarning)
    for _ in state.config.portions:
      params, state = inq.advance(params, state)
  stats = checkpoints.export_model(str(workdir / "again.inq"), {"params": params}, state)
  assert stats["layer_bits"] == final["layer_bits"]
  assert stats["mean_bits"] == pytest.approx(final["mean_bits"])


def test_codebook_report_at_each_layers_width():
  rng = np.random.default_rng(0)
  params = {"conv1": {"kernel": rng.normal(0, 0.1, (5, 5, 1, 4)).astype(np.float32)},
            "fc": {"kernel": rng.normal(0, 0.05, (300, 10)).astype(np.float32)}}
  layer_bits = codebook_report.parse_layer_bits("^conv1/=8")
  assert layer_bits == (("^conv1/", 8),)
  table = codebook_report.rows(params, [3, 2], calibrations=("mse",), layer_bits=layer_bits)
  assert [(r["path"], r["config_bits"], r["bits"]) for r in table] == [
      ("conv1/kernel", 3, 8), ("conv1/kernel", 2, 8), ("fc/kernel", 3, 3), ("fc/kernel", 2, 2)]
  means = codebook_report.mean_bits(table)
  assert means[3] == pytest.approx((8 * 100 + 3 * 3000) / 3100)
  assert means[2] == pytest.approx((8 * 100 + 2 * 3000) / 3100)
  text = codebook_report.markdown(table)
  assert f"3 bits with the per-layer widths: {means[3]:.3f} bits per quantized weight" in text
  with pytest.raises(ValueError, match="REGEX=BITS"):
    codebook_report.parse_layer_bits("^conv1/")


# ------------------------------------------------------------ BatchNorm re-estimation


RESNET = {"model": "resnet20", "model_kwargs": {}, "dataset.train_split": "train[:192]",
          "dataset.test_split": "test[:100]", "batch_size": 32, "baseline.epochs": 0.0,
          "inq.portions": (1.0,), "inq.final_finetune_epochs": 0.0, "inq.bits": 3,
          "inq.calibration": "mse", "inq.epochs": 0.0}


def _resnet_config(data_dir, **overrides):
  config = tiny_config(data_dir)
  config.model_kwargs = {}
  for k, v in {**RESNET, **overrides}.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def test_ptq_re_estimates_batch_statistics_without_touching_the_weights(fmnist_data_dir,
                                                                        tmp_path):
  n = 4  # batches of 32, of the 6 in an epoch of 192 examples
  fresh = _resnet_config(fmnist_data_dir, **{"inq.bn_reestimate_batches": n})
  stale = _resnet_config(fmnist_data_dir)
  got = train.train_and_evaluate(fresh, str(tmp_path / "fresh"))
  old = train.train_and_evaluate(stale, str(tmp_path / "stale"))
  start = checkpoints.load_variables(str(tmp_path / "fresh" / checkpoints.BASELINE_DIR),
                                     _template(fresh))
  variables_fresh = _model(tmp_path / "fresh")
  variables_stale = _model(tmp_path / "stale")
  # The weights are exactly the baseline's, quantized: re-estimation moved none.
  want, _ = inq.advance(start["params"], inq.init(start["params"], recipe.inq_config(fresh)))
  for (path, x), (_, y) in zip(leaves_with_paths(want)[0],
                               leaves_with_paths(variables_fresh["params"])[0]):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  for (path, x), (_, y) in zip(leaves_with_paths(variables_stale["params"])[0],
                               leaves_with_paths(variables_fresh["params"])[0]):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  # Off: the baseline's statistics, as they were.
  for (path, x), (_, y) in zip(leaves_with_paths(start["batch_stats"])[0],
                               leaves_with_paths(variables_stale["batch_stats"])[0]):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes(), path
  # On: flax's train-mode update over the first n plain train batches of the phase's draw,
  # with the quantized weights.
  data = input_pipeline.get_dataset(fresh.dataset)
  model = models.from_config(fresh, data.num_classes)
  stats = start["batch_stats"]
  batches = data.train_batches(fresh.batch_size, 0, fresh.seed * 1000 + 700 + 1, augment=False)
  for _, batch in zip(range(n), batches):
    x = steps.prepare_images(jnp.asarray(batch["image"]), data.normalization)
    _, updates = model.apply({"params": want, "batch_stats": stats}, x, train=True,
                             mutable=["batch_stats"])
    stats = updates["batch_stats"]
  moved = 0
  for (path, x), (_, y), (_, s) in zip(leaves_with_paths(stats)[0],
                                       leaves_with_paths(variables_fresh["batch_stats"])[0],
                                       leaves_with_paths(start["batch_stats"])[0]):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=2e-4, atol=1e-5,
                               err_msg=path)
    moved += bool(np.any(np.abs(np.asarray(y) - np.asarray(s)) > 1e-3))
  assert moved == len(jax.tree.leaves(stats))
  # The accuracy "right after quantizing" is the fresh statistics' (the run's final one).
  devices = Devices()
  eval_step = steps.make_eval_step(model, devices, top5=False,
                                   normalization=data.normalization)
  fresh_eval = loops.evaluate(eval_step, variables_fresh["params"],
                              variables_fresh["batch_stats"],
                              loops.test_batches(data, fresh.eval_batch_size, devices), devices)
  phase = got["phases"][0]
  assert phase["quantized_test_accuracy"] == fresh_eval["accuracy"] == phase["test_accuracy"]
  assert old["phases"][0]["quantized_test_accuracy"] == old["final"]["test_accuracy"]


def _template(config):
  model = models.from_config(config, 10)
  t = models.init_variables(model, (1, 28, 28, 1), jax.random.key(0))
  return {"params": t["params"], "batch_stats": t.get("batch_stats", {})}
