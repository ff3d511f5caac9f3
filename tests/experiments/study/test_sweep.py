"""The sweep on a real-data slice: cells, resume, sweep.json schema, report."""

import json
import os

import pytest

from experiments import optimizer, recipe
from experiments.study import report as sweep_report
from experiments.study import sweep
from experiments.configs import sweep_fashion_mnist
from experiments.configs import sweep_fashion_mnist_lowbit


def tiny_config(data_dir, **overrides):
  sc = sweep_fashion_mnist.get_config()
  e = sc.experiment
  e.dataset.data_dir = data_dir
  e.dataset.train_split = "train[:1024]"
  e.dataset.test_split = "test[:500]"
  e.batch_size = 64
  e.baseline.epochs = 1.0
  e.inq.epochs = 0.5
  sc.seeds = (0, 1)
  sc.inq_bits = (2,)
  sc.random_bits = (2,)
  sc.ptq_bits = (2,)
  sc.channel_bits = ()
  sc.inq_mse_bits = ()
  sc.ptq_mse_bits = ()
  sc.portions.b2 = (0.5, 1.0)
  sc.finetune_epochs = 2.0
  sc.tail_portions = {"b2": (0.5, 0.75, 1.0)}
  for k, v in overrides.items():
    sc[k] = v
  return sc


def test_cells_and_configs(tmp_path):
  sc = sweep_fashion_mnist.get_config()
  names = [c.name for c in sweep.cells(sc)]
  assert len(names) == 3 * 16 and names[0] == "seed0/fp32"
  # the baseline of each seed comes before every cell that starts from it
  for seed in sc.seeds:
    assert names.index(f"seed{seed}/fp32") < names.index(f"seed{seed}/inq2")
  c = sweep.cell_config(sc, sweep.Cell(1, "channel", 3), str(tmp_path))
  assert c.seed == 1 and c.inq.granularity == "channel" and c.inq.bits == 3
  assert tuple(c.inq.portions) == (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
  assert c.init_checkpoint.endswith(os.path.join("seed1", "fp32", "baseline_variables"))
  ptq = sweep.cell_config(sc, sweep.Cell(0, "ptq", 2), str(tmp_path))
  assert tuple(ptq.inq.portions) == (1.0,) and ptq.inq.final_finetune_epochs == 0
  rnd = sweep.cell_config(sc, sweep.Cell(0, "random", 5), str(tmp_path))
  assert rnd.inq.strategy == "random" and rnd.inq.epochs == 0.5
  assert rnd.inq.calibration == "absmax"
  mse = sweep.cell_config(sc, sweep.Cell(2, "inq_mse", 3), str(tmp_path))
  assert mse.inq.calibration == "mse" and mse.inq.granularity == "layer"
  assert tuple(mse.inq.portions) == tuple(c.inq.portions)
  ptq_mse = sweep.cell_config(sc, sweep.Cell(2, "ptq_mse", 2), str(tmp_path))
  assert ptq_mse.inq.calibration == "mse" and tuple(ptq_mse.inq.portions) == (1.0,)
  assert mse.inq.final_finetune_epochs == 0 == c.inq.final_finetune_epochs


def test_cell_steps_count_every_segment_of_the_trainers_plan():
  """The progress bar's count is the trainer's own plan, not arithmetic of its own."""
  sc = tiny_config("unused")
  fp32 = sweep.cell_config(sc, sweep.Cell(0, "fp32", 0), "w")
  inq2 = sweep.cell_config(sc, sweep.Cell(0, "inq", 2), "w")  # from the baseline: no training
  ft2 = sweep.cell_config(sc, sweep.Cell(0, "inq_ft", 2), "w")
  per_epoch = 16  # 1024 examples in batches of 64
  assert sweep.cell_steps(fp32, per_epoch) == 16  # 1 baseline epoch, portion 1: nothing
  assert sweep.cell_steps(inq2, per_epoch) == 8   # portions (0.5, 1): 0.5 epochs, then none
  assert sweep.cell_steps(ft2, per_epoch) == 8 + 2 * 16  # and a 2-epoch finetune
  assert sweep.cell_steps(ft2, per_epoch) == sum(
      sum(optimizer.epoch_steps(s.epochs, per_epoch)) for s in recipe.plan(ft2))


def test_last_step_cells():
  sc = sweep_fashion_mnist_lowbit.get_config()
  names = [c.name for c in sweep.cells(sc)]
  assert names[:8] == ["seed0/fp32", "seed0/inq_ft3", "seed0/inq_ft2", "seed0/inq_mse_ft3",
                       "seed0/inq_mse_ft2", "seed0/tail3", "seed0/tail2", "seed1/fp32"]
  assert len(names) == 21
  get = lambda kind, b: sweep.cell_config(sc, sweep.Cell(1, kind, b), "w")
  ft, mse_ft = get("inq_ft", 3), get("inq_mse_ft", 2)
  assert ft.inq.calibration == "absmax" and mse_ft.inq.calibration == "mse"
  assert tuple(ft.inq.portions) == tuple(sc.portions.b3)
  assert ft.inq.final_finetune_epochs == 2.0 == mse_ft.inq.final_finetune_epochs
  tail, tail_mse = get("tail", 3), get("tail_mse", 2)
  assert tuple(tail.inq.portions)[-4:] == (0.95, 0.975, 0.99, 1.0)
  assert tuple(tail_mse.inq.portions) == tuple(sc.tail_portions.b2)
  assert tail.inq.calibration == "absmax" and tail_mse.inq.calibration == "mse"
  assert tail.inq.final_finetune_epochs == 2.0 and tail.inq.epochs == 0.5


@pytest.mark.parametrize("key,value,match", [
    ("seeds", (0, 0), "distinct"),
    ("inq_bits", (9,), r"inq_bits: bits must be in \[2, 8\], got 9"),
    ("channel_bits", (6,), "b6"),
    ("tail_bits", (4,), "tail_portions has no schedule 'b4'"),
    ("finetune_epochs", 0.0, "finetune_epochs must be a number > 0"),
])
def test_bad_sweep_config(tmp_path, key, value, match):
  sc = sweep_fashion_mnist_lowbit.get_config()
  sc[key] = value
  with pytest.raises(ValueError, match=match):
    sweep.run_sweep(sc, str(tmp_path / "w"), report_dir=str(tmp_path / "r"))
  assert not os.path.exists(tmp_path / "w")


def test_sweep_runs_resumes_and_reports(tmp_path, fmnist_data_dir, capsys):
  sc = tiny_config(fmnist_data_dir)
  work, report = str(tmp_path / "w"), str(tmp_path / "r")
  summary = sweep.run_sweep(sc, work, report_dir=report)
  with open(os.path.join(report, sweep_report.SWEEP_JSON)) as f:
    on_disk = json.load(f)
  assert on_disk == summary
  assert set(summary) == {"fp32", "inq", "random", "ptq"}
  for cell in [summary["fp32"], summary["inq"]["2"], summary["random"]["2"],
               summary["ptq"]["2"]]:
    assert set(cell) == {"mean", "std", "values", "seconds"}
    assert len(cell["values"]) == 2 and all(0 < v <= 1 for v in cell["values"])
    assert cell["seconds"] > 0
  # every cell's values are the finished runs' own results
  for seed, value in zip((0, 1), summary["inq"]["2"]["values"]):
    with open(os.path.join(work, f"seed{seed}", "inq2", "results.json")) as f:
      r = json.load(f)
    assert r["final"]["test_accuracy"] == value and r["final"]["all_pow2"]
    assert r["final"]["bits"] == 2
    with open(os.path.join(work, f"seed{seed}", "fp32", "results.json")) as f:
      base = json.load(f)
    # INQ cells start from the seed's baseline: same fp32 accuracy before phase 1
    assert r["baseline"]["test_accuracy"] == base["baseline"]["test_accuracy"]
  md = open(os.path.join(report, sweep_report.RESULTS_MD)).read()
  assert "INQ 2-bit" in md and "no retraining (PTQ) 2-bit" in md
  for png in (sweep_report.BITS_PNG, sweep_report.PHASES_PNG):
    assert os.path.getsize(os.path.join(report, png)) > 1000
  capsys.readouterr()

  # Resume: a finished sweep reruns nothing and reports the same cells.
  again = sweep.run_sweep(sc, work, report_dir=report)
  out = capsys.readouterr().out
  assert "test accuracy" not in out  # no cell ran again
  assert again["inq"]["2"]["values"] == summary["inq"]["2"]["values"]

  # The report alone, from the finished cells.
  assert sweep.report(sc, work, report_dir=report) == summary

  # A study may grow: new cells run, finished ones are read back.
  grown = sweep.run_sweep(tiny_config(fmnist_data_dir, ptq_mse_bits=(2,), inq_ft_bits=(2,),
                                      tail_bits=(2,)), work, report_dir=report)
  out = capsys.readouterr().out
  assert out.count("test accuracy") == 6 and "ptq_mse2" in out and "tail2" in out
  assert grown["inq"]["2"]["values"] == summary["inq"]["2"]["values"]
  assert len(grown["ptq_mse"]["2"]["values"]) == 2
  md = open(os.path.join(report, sweep_report.RESULTS_MD)).read()
  assert "calibration=mse" in md and "## The last step, and the final finetune" in md
  # the per-layer codebook table: one column per calibration and bit width
  assert "| layer | 2-bit absmax | 2-bit mse |" in md
  with open(os.path.join(work, "seed0", "ptq_mse2", "results.json")) as f:
    fit = json.load(f)["codebook"]["conv1/kernel"]
  assert ("| `conv1/kernel` | " in md and f"{100 * fit['zero_fraction']:.0f}% / "
          f"{fit['relative_error']:.2f} (n1={fit['n1']}) |" in md)
  with open(os.path.join(report, sweep_report.DETAILS_JSON)) as f:
    last = json.load(f)["last_step"]
  for kind, portions in (("inq_ft", (0.5, 1.0)), ("tail", (0.5, 0.75, 1.0))):
    got = last[kind]["2"]
    assert got["portion_before"] == portions[-2] and len(got["finetune"]) == 2
    for i, seed in enumerate((0, 1)):
      with open(os.path.join(work, f"seed{seed}", f"{kind}2", "results.json")) as f:
        r = json.load(f)
      phases = r["phases"]
      assert [p["portion"] for p in phases] == list(portions)
      assert phases[-1]["epochs"] == 2.0
      # the finetune's curve: one test evaluation per epoch, the last one the result
      curve = phases[-1]["epoch_test_accuracy"]
      assert len(curve) == 2 and curve[-1] == r["final"]["test_accuracy"]
      assert [got["before"][i], got["quantized"][i], got["finetune"][1][i]] == [
          phases[-2]["test_accuracy"], phases[-1]["quantized_test_accuracy"], curve[-1]]
  # the kernels stayed frozen through the finetune: the tail cell's .inq file holds
  # every weight in its codebook (all_pow2 is checked from the trained params)
  assert all(json.load(open(os.path.join(work, f"seed{s}", "tail2", "results.json")))
             ["final"]["all_pow2"] for s in (0, 1))

  # A changed sweep config in the same workdir is refused.
  with pytest.raises(ValueError, match="different config"):
    sweep.run_sweep(tiny_config(fmnist_data_dir, seeds=(0, 1, 2)), work, report_dir=report)


def test_target_checks():
  cell = lambda *v: {"mean": sum(v) / len(v), "std": 0.0, "values": list(v), "seconds": 1.0}
  summary = {"fp32": cell(0.90, 0.90),
             "inq": {"5": cell(0.90, 0.91), "3": cell(0.89, 0.80), "2": cell(0.50, 0.40)},
             "random": {"5": cell(0.89, 0.90)},
             "ptq": {"3": cell(0.60, 0.795), "2": cell(0.10, 0.10)},
             "inq_mse": {"3": cell(0.895, 0.894)}}
  got = {claim: (measured, ok) for claim, measured, ok in sweep_report.target_checks(summary)}
  assert got["INQ 5-bit >= fp32 +0.0 points"] == ("+0.50 points", True)
  assert got["INQ 3-bit >= fp32 -0.8 points"][1] is False  # -5.5 points
  assert got["INQ 3-bit (calibration=mse, an extension) >= fp32 -0.8 points"] == (
      "-0.55 points", True)
  assert got["magnitude partition above random (5-bit)"] == ("+1.00 points", True)
  # Paired by seed: seed 1's INQ is only 0.5 points above its PTQ.
  assert got["INQ clearly above no-retraining at 3 bits (every seed, > 1 point)"] == (
      "+14.75 points (per seed +29.00, +0.50)", False)
  assert got["INQ clearly above no-retraining at 2 bits (every seed, > 1 point)"][1] is True
  assert not any("calibration=mse (every seed" in c for c in got)  # no ptq_mse cells


@pytest.mark.parametrize("study,stock,budget", [
    ("sweep_fashion_mnist", "fashion_mnist_lenet",
     {"baseline.epochs": 6.0, "inq.epochs": 0.5, "max_checkpoints_to_keep": 1}),
    ("sweep_fashion_mnist_lowbit", "fashion_mnist_lenet",
     {"baseline.epochs": 6.0, "inq.epochs": 0.5, "max_checkpoints_to_keep": 1}),
    ("sweep_fashion_mnist_resnet20", "fashion_mnist_resnet20",
     {"baseline.epochs": 1.5, "inq.epochs": 0.05, "max_checkpoints_to_keep": 1}),
])
def test_a_study_measures_its_stock_config_on_a_smaller_budget(study, stock, budget):
  """What a study reports is the stock config's recipe; only the epochs differ."""
  import importlib  # pylint: disable=g-import-not-at-top
  from experiments import checkpoints  # pylint: disable=g-import-not-at-top
  studied = importlib.import_module(f"experiments.configs.{study}").get_config().experiment
  config = importlib.import_module(f"experiments.configs.{stock}").get_config()
  flat = lambda c: dict(_flatten(checkpoints.config_dict(c)))
  got, want = flat(studied), flat(config)
  assert {k: v for k, v in got.items() if got[k] != want.get(k)} == budget


def _flatten(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield f"{prefix}{k}", v


def test_target_checks_compare_a_cell_with_its_own_seeds_baselines():
  cell = lambda *v: {"mean": sum(v) / len(v), "std": 0.0, "values": list(v), "seconds": 1.0}
  summary = {"fp32": cell(0.90, 0.92), "inq_mse_ft": {"3": cell(0.915)}}
  seeds = {"fp32": [0, 1], "inq_mse_ft3": [1]}  # the cell ran with seed 1 only
  claim = "INQ 3-bit (calibration=mse, final finetune) >= fp32 -0.8 points"
  got = {c: (m, ok) for c, m, ok in sweep_report.target_checks(summary, seeds)}
  assert got[claim] == ("-0.50 points", True)  # against seed 1's 92%, not the 91% mean
  unpaired = {c: m for c, m, _ in sweep_report.target_checks(summary)}
  assert unpaired[claim] == "+0.50 points"
