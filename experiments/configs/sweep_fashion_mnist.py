"""The study of issue #4: INQ bit widths, partitions, PTQ, per-channel codebooks.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.study.sweep \
      --config=experiments/configs/sweep_fashion_mnist.py \
      --workdir=workdirs/sweep_fashion_mnist

Rerunning the command resumes (finished cells are read back, an interrupted
one continues from its last checkpoint) and rewrites results/RESULTS.md,
results/sweep.json and the two plots.

Hardware: a 2-core CPU, about 2 hours for 3 seeds x 16 cells (measured: 119
minutes; numbers in results/RESULTS.md); minutes on a GPU.

Expected result (the paper's claims, scaled to LeNet on Fashion-MNIST): 5-bit
INQ at least as accurate as fp32; 4-bit within 0.3 points, 3-bit within 0.8,
2-bit within 2; the magnitude partition above the random one; INQ far above
post-training quantization at 3 and 2 bits. Measured: 5 and 4 bits within
0.2 points of fp32; 3 and 2 bits far off with the paper's codebook and 1.0 and
2.2 points below fp32 with calibration="mse" (RESULTS.md explains why).

What the budget forces: every cell starts from its seed's fp32 baseline (6
epochs, about 91%), and every INQ phase retrains for 0.5 epochs (234 steps of
128), not the default job's 3 epochs, so that the 43 retrained phases per seed
fit in the 2-hour budget.
"""

import ml_collections

from experiments.configs import fashion_mnist_lenet


def get_config():
  c = ml_collections.ConfigDict()
  e = fashion_mnist_lenet.get_config()
  e.baseline.epochs = 6
  e.inq.epochs = 0.5
  e.max_checkpoints_to_keep = 1
  c.experiment = e

  c.seeds = (0, 1, 2)
  c.inq_bits = (5, 4, 3, 2)       # magnitude partition, per-layer codebooks
  c.random_bits = (5,)            # random partition, same epochs
  c.ptq_bits = (5, 4, 3, 2)       # every weight rounded at once, no retraining
  c.channel_bits = (3, 2)         # magnitude partition, per-channel codebooks
  # Per-layer codebooks whose n1 minimises the rounding error, with and without
  # INQ: at 3 and 2 bits the paper's max|w| anchor zeroes most of this LeNet's
  # heavy-tailed layers (results/RESULTS.md).
  c.inq_mse_bits = (3, 2)
  c.ptq_mse_bits = (3, 2)

  # The paper's ResNet-18 schedules by bit width (its bit-width table).
  c.portions = ml_collections.ConfigDict({
      "b5": (0.5, 0.75, 0.875, 1.0),
      "b4": (0.3, 0.5, 0.8, 0.9, 0.95, 1.0),
      "b3": (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0),
      "b2": (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 1.0),
  })
  # Where RESULTS.md, sweep.json and the plots go.
  c.report_dir = "results"
  return c
