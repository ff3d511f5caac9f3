"""The batch-normalized study of issue #14: ResNet-20 on Fashion-MNIST.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.study.sweep \
      --config=experiments/configs/sweep_fashion_mnist_resnet20.py \
      --workdir=workdirs/sweep_fashion_mnist_resnet20

Rerunning the command resumes; the report goes to results/resnet20/.

Cells (one seed): the fp32 baseline; INQ 5, 4, 3 and 2 bits with the paper's
codebook and schedules; 3 and 2 bits with the low-bit recipe's remedies
(calibration="mse" and a final finetune of the BN parameters, evaluated at
its end); post-training quantization at 3 and 2 bits with the paper's
codebook (PTQ with the mse codebooks, and with re-estimated BN statistics:
`python -m experiments.study.bn_reestimate`).

Hardware and budget: a 2-core CPU, about 2 hours alone (measured: 125 min of
cells while the LeNet last-step study shared the cores). XLA:CPU trains ResNet-20 at
about 2 s per step of 128 there (15 minutes per epoch), so the budget is tiny:
a 1.5-epoch baseline and 0.05 epochs (23 steps) of retraining per INQ phase.
The numbers compare codebooks and remedies from one start; they are not what
the stock config (30 + 2 per phase epochs, a GPU job) reaches.

Expected result (measured, results/resnet20/RESULTS.md): fp32 88.18%; the
paper's codebook holds at 5 and 4 bits (-0.09, -0.34) and fails at 3 and 2
bits (-3.87, -43.73) as on the LeNet; calibration="mse" with the final finetune ends at
-0.28 (3 bits) and -1.82 (2 bits).
"""

import ml_collections

from experiments.configs import fashion_mnist_resnet20
from experiments.configs import sweep_fashion_mnist


def get_config():
  c = ml_collections.ConfigDict()
  e = fashion_mnist_resnet20.get_config()
  e.baseline.epochs = 1.5
  e.inq.epochs = 0.05
  e.max_checkpoints_to_keep = 1
  c.experiment = e
  c.title = "INQ on Fashion-MNIST (ResNet-20, batch norm): bit widths, codebooks, remedies"
  c.command_config = "experiments/configs/sweep_fashion_mnist_resnet20.py"

  c.seeds = (0,)
  c.inq_bits = (5, 4, 3, 2)
  c.ptq_bits = (3, 2)
  c.inq_mse_ft_bits = (3, 2)   # the remedies: mse codebook + final finetune
  c.finetune_epochs = 0.25     # the ft cells' last phase; evaluated at its end
  c.portions = sweep_fashion_mnist.get_config().portions
  c.tail_portions = ml_collections.ConfigDict()
  c.report_dir = "results/resnet20"
  return c
