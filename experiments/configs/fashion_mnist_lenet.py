"""The default job: Fashion-MNIST, LeNet, fp32 baseline then 5-bit INQ.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.main \
      --config=experiments/configs/fashion_mnist_lenet.py \
      --workdir=workdirs/fashion_mnist_lenet

Hardware: a 2-core CPU, about 15 minutes (see README "Results"); any GPU/TPU
is much faster. Expected result: fp32 baseline about 91% test accuracy, and the
5-bit model (portions 0.5, 0.75, 0.875, 1; pruning-inspired partition; SGD
momentum 0.9, weight decay 5e-4) at least as accurate, every conv/dense weight
0 or +-2^k with at most 17 distinct values per layer.
"""

import ml_collections

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.model = "lenet"
  # A CPU job: LeNet's CPU speed-ups (experiments/models/lenet.py). They change
  # float sums by about 1e-6, so they are part of the config, not of the host.
  c.model_kwargs = ml_collections.ConfigDict({"cpu_matmul_conv": True,
                                              "cpu_select_pool": True})
  c.dataset.name = "fashion_mnist"
  # Random 2-pixel shifts and mirror images: without them LeNet overfits in 8
  # epochs and quantizing the overfitted model costs accuracy that retraining
  # cannot buy back (README, "The default job").
  c.dataset.augment = True
  c.batch_size = 128
  c.baseline.epochs = 8
  c.baseline.learning_rate = 0.05
  c.inq.bits = 5
  c.inq.portions = (0.5, 0.75, 0.875, 1.0)
  c.inq.epochs = 3
  c.inq.learning_rate = 0.01
  return c
