"""Issue #32 on a batch-normalized net: ResNet-20 at 3 and 2 bits with BN re-estimation,
distillation and mixed widths, from the ResNet-20 study's fp32 baseline.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.study.lowbit_options \
      --config=experiments/configs/sweep_lowbit_options_resnet20.py \
      --workdir=workdirs/lowbit_options_resnet20

Rerunning the command resumes; the report goes to results/lowbit_options/resnet20.md.

The ResNet-20 study's budget and start (`sweep_fashion_mnist_resnet20.py`: its
seed-0 fp32 cell, a 1.5-epoch baseline; 0.05 epochs of retraining per phase,
the paper's portions for the width), and its best cell, `mse_ft` here
(calibration="mse" and a 0.25-epoch final finetune of the BN parameters and
biases), with:
- bnre: BN statistics re-estimated from 50 train batches after every
  quantization step (so the "right after quantizing" accuracies are the
  codebook's cost, and each phase retrains from fresh statistics);
- bnre_distill / bnre_mixed / all: with distillation from the fp32 baseline,
  with the first conv and the classifier at 8 bits, with both;
- ptq_mse, ptq_mse_bnre (and the paper's codebook at 5 bits, ptq, ptq_bnre):
  every weight rounded at once, no retraining, with stale and with
  re-estimated BN statistics.

Hardware: a 2-core CPU shared with other work: the baseline about 30 minutes
(trained first if missing), 15-25 minutes per INQ cell, 1-3 per PTQ cell.
Expected result (results/lowbit_options/RESULTS.md): re-estimation recovers
most of PTQ's loss on this net, and the right-after-quantizing accuracies rise.
"""

import ml_collections

from experiments.configs import sweep_fashion_mnist
from experiments.configs import sweep_fashion_mnist_resnet20

MIXED = (("^conv1/", 8), ("^fc/", 8))  # the first conv and the classifier
BNRE = {"bn_reestimate_batches": 50}
DISTILL = {"distill_weight": 0.5, "distill_temperature": 4.0}
FT = {"calibration": "mse", "final_finetune_epochs": 0.25}  # the study's inq_mse_ft cells
PTQ = {"portions": (1.0,), "final_finetune_epochs": 0.0, "epochs": 0.0}


def get_config():
  c = ml_collections.ConfigDict()
  c.title = ("Low-bit options on Fashion-MNIST (ResNet-20, batch norm): BN re-estimation, "
             "distillation, mixed widths")
  c.command_config = "experiments/configs/sweep_lowbit_options_resnet20.py"
  c.experiment = sweep_fashion_mnist_resnet20.get_config().experiment
  c.portions = ml_collections.ConfigDict(
      {**sweep_fashion_mnist.get_config().portions.to_dict()})
  c.baseline = ml_collections.ConfigDict({"config": "sweep_fashion_mnist_resnet20",
                                          "workdir": "workdirs/sweep_fashion_mnist_resnet20"})
  c.variants = ml_collections.ConfigDict({
      "ptq": {**PTQ, "calibration": "absmax"},
      "ptq_bnre": {**PTQ, "calibration": "absmax", **BNRE},
      "ptq_mse": {**PTQ, "calibration": "mse"},
      "ptq_mse_bnre": {**PTQ, "calibration": "mse", **BNRE},
      "mse_ft": dict(FT),
      "bnre": {**FT, **BNRE},
      "bnre_distill": {**FT, **BNRE, **DISTILL},
      "bnre_mixed": {**FT, **BNRE, "layer_bits": MIXED},
      "all": {**FT, **BNRE, **DISTILL, "layer_bits": MIXED},
  })
  c.grid = (((0,), ("ptq", "ptq_bnre"), (5,)),
            ((0,), ("ptq_mse", "ptq_mse_bnre", "mse_ft", "bnre", "all"), (3, 2)),
            ((0,), ("bnre_distill", "bnre_mixed"), (3, 2)))
  c.report_dir = "results/lowbit_options"
  c.report_name = "resnet20"
  return c
