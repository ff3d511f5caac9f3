"""The low-bit options study (experiments/study/lowbit_options.py): cells, configs, report."""

import importlib
import json
import os

import pytest

from experiments import checkpoints, recipe, train
from experiments.configs import smoke
from experiments.configs import sweep_lowbit_options_lenet as lenet_study
from experiments.configs import sweep_lowbit_options_resnet20 as resnet_study
from experiments.configs import sweep_fashion_mnist
from experiments.study import lowbit_options as lo
from experiments.study import report as sweep_report
from experiments.study import sweep

MIXED = (("^conv1/", 8), ("^fc2/", 8))


@pytest.mark.parametrize("module", [lenet_study, resnet_study])
def test_shipped_studies_are_valid_and_documented(module, tmp_path):
  sc = module.get_config()
  lo.check_study_config(sc)
  assert f"--config={sc.command_config}" in module.__doc__
  assert "Expected result" in module.__doc__ and "Hardware" in module.__doc__
  importlib.import_module(f"experiments.configs.{sc.baseline.config}")
  for cell in lo.cells(sc):
    config = lo.cell_config(sc, cell)
    assert config.init_checkpoint == os.path.join(
        sc.baseline.workdir, f"seed{cell.seed}", "fp32", checkpoints.BASELINE_DIR)
    config.init_checkpoint = None
    recipe.check_config(config)


def test_lenet_cells_are_the_recipe_with_each_option():
  sc = lenet_study.get_config()
  names = [c.name for c in lo.cells(sc)]
  assert names[:8] == [f"seed0/{v}{b}" for v in ("recipe", "distill", "mixed", "both")
                       for b in (3, 2)]
  assert len(names) == len(set(names))
  recipe3 = lo.cell_config(sc, lo.Cell(0, "recipe", 3))
  both2 = lo.cell_config(sc, lo.Cell(2, "both", 2))
  assert recipe3.inq.calibration == "mse" and recipe3.inq.final_finetune_epochs == 2
  assert len(recipe3.inq.portions) == 8 and len(both2.inq.portions) == 10
  assert recipe3.inq.distill_weight == 0 and tuple(recipe3.inq.layer_bits) == ()
  assert both2.seed == 2 and both2.inq.bits == 2 and both2.inq.distill_weight > 0
  assert recipe.inq_config(both2).layer_bits == MIXED


def test_resnet_ptq_cells_do_not_retrain():
  sc = resnet_study.get_config()
  ptq = lo.cell_config(sc, lo.Cell(0, "ptq_mse_bnre", 3))
  assert tuple(ptq.inq.portions) == (1.0,) and ptq.inq.final_finetune_epochs == 0
  assert ptq.inq.bn_reestimate_batches > 0 and ptq.inq.calibration == "mse"
  assert sum(s.epochs for s in recipe.plan(ptq) if s.stage == 2) == 0


@pytest.mark.parametrize("change,match", [
    (lambda sc: sc.__setattr__("grid", (((0,), ("nope",), (3,)),)), "variant 'nope'"),
    (lambda sc: sc.__setattr__("grid", (((0,), ("recipe",), (4,)),)), "schedule 'b4'"),
    (lambda sc: sc.variants.__setattr__("bad", {"distill_wieght": 0.5}),
     r"unknown inq fields \['distill_wieght'\]"),
    (lambda sc: sc.variants.__setattr__("bad", {"distill_weight": 1.5}),
     r"variants.bad.distill_weight must be at most 1 .*got 1.5"),
    (lambda sc: sc.variants.__setattr__("bad", {"layer_bits": (("(", 8),)}),
     r"variants.bad.layer_bits.*layer_bits regex"),
    (lambda sc: sc.__setattr__("grid", (((0,), ("recipe",)),)), "grid must be blocks"),
    (lambda sc: sc.__setattr__("report_nmae", "x"), "did you mean report_name"),
])
def test_bad_study_config(change, match):
  sc = lenet_study.get_config()
  change(sc)
  with pytest.raises(ValueError, match=match):
    lo.check_study_config(sc)


def test_a_tiny_study_runs_resumes_and_reports(fmnist_data_dir, tmp_path):
  experiment = smoke.get_config()
  experiment.dataset.data_dir = fmnist_data_dir
  experiment.dataset.train_split = "train[:512]"
  experiment.dataset.test_split = "test[:200]"
  experiment.batch_size = 64
  experiment.inq.epochs = 0.25
  experiment.inq.calibration = "mse"
  sc = lenet_study.get_config()
  sc.experiment = experiment
  sc.baseline.workdir = str(tmp_path / "baselines")
  sc.portions = {"b3": (0.5, 1.0)}
  sc.grid = (((0,), ("recipe", "mixed"), (3,)),)
  sc.report_dir = str(tmp_path / "report")
  # The seed's baseline, made here (the study reads a finished fp32 cell as it is).
  base = experiment.copy_and_resolve_references()
  base.baseline.epochs = 1
  base.inq.portions = (1.0,)
  fp32 = train.train_and_evaluate(base, os.path.join(sc.baseline.workdir, "seed0", "fp32"))
  data = lo.run_study(sc, str(tmp_path / "study"))
  rows = {r["cell"]: r for r in data["cells"]}
  assert sorted(rows) == ["seed0/mixed3", "seed0/recipe3"]
  assert rows["seed0/recipe3"]["mean_bits"] == 3.0
  assert 3.06 < rows["seed0/mixed3"]["mean_bits"] < 3.07
  assert rows["seed0/mixed3"]["layer_bits"]["fc2/kernel"] == 8
  assert data["fp32"] == {0: fp32["baseline"]["test_accuracy"]}
  md = (tmp_path / "report" / "lenet.md").read_text()
  assert "| seed0/mixed3 | 3 | mixed |" in md and "| 3.064 |" in md
  assert f"{100 * fp32['baseline']['test_accuracy']:.2f}" in md
  on_disk = json.loads((tmp_path / "report" / "lenet.json").read_text())
  assert len(on_disk["cells"]) == 2
  book = json.loads((tmp_path / "study" / "cells.json").read_text())
  assert book["seed0/mixed3"]["seconds"] > 0 and book["seed0/mixed3"]["load_samples"]
  # Finished cells are read back, not rerun.
  mtime = os.path.getmtime(tmp_path / "study" / "seed0" / "mixed3" / "results.json")
  again = lo.run_study(sc, str(tmp_path / "study"))
  assert os.path.getmtime(tmp_path / "study" / "seed0" / "mixed3" / "results.json") == mtime
  assert [r["test_accuracy"] for r in again["cells"]] == [
      r["test_accuracy"] for r in data["cells"]]


def _results(acc, bits, layer_bits=None):
  layer_bits = layer_bits or {"conv1/kernel": bits, "fc1/kernel": bits}
  sizes = {"conv1/kernel": 500, "fc1/kernel": 400000}
  mean = sum(layer_bits[p] * n for p, n in sizes.items()) / sum(sizes.values())
  return {"baseline": {"test_accuracy": 0.9},
          "phases": [{"portion": 0.5, "test_accuracy": acc, "quantized_test_accuracy": acc},
                     {"portion": 1.0, "test_accuracy": acc, "quantized_test_accuracy": acc}],
          "final": {"test_accuracy": acc, "bits": bits, "layer_bits": layer_bits,
                    "mean_bits": mean}}


def test_the_sweep_report_gives_the_bits_per_weight_of_mixed_widths(tmp_path):
  sc = sweep_fashion_mnist.get_config()
  finished = {sweep.Cell(0, "fp32", 0): (_results(0.9, 5), 60.0),
              sweep.Cell(0, "inq", 3): (_results(0.89, 3), 60.0)}
  summary, details = sweep_report.aggregate(finished)
  md = sweep_report.markdown(sc, summary, details, "w", str(tmp_path))
  assert "bits per weight" not in md  # one width: the table as before
  finished[sweep.Cell(0, "inq", 2)] = (
      _results(0.88, 2, {"conv1/kernel": 8, "fc1/kernel": 2}), 60.0)
  summary, details = sweep_report.aggregate(finished)
  assert summary["inq"]["2"]["mean_bits"] == pytest.approx((8 * 500 + 2 * 400000) / 400500)
  md = sweep_report.markdown(sc, summary, details, "w", str(tmp_path))
  assert "| bits per weight (average) |" in md
  row = next(line for line in md.splitlines() if line.startswith("| INQ 2-bit |"))
  assert row.endswith("| 2.007 |")
  assert next(line for line in md.splitlines()
              if line.startswith("| INQ 3-bit |")).endswith("| 3.000 |")
