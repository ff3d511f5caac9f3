"""Pruning + INQ on the default LeNet: prune, keep the zeros, quantize the rest.

The paper's strongest result (Sec. 3.4): prune first, keep the pruned weights
fixed at zero, then run INQ on the remaining weights with finer portions
(0.05, 0.1, ..., 0.95, 1). Here the pruning is iterative magnitude pruning with
retraining (3 steps on a cubic ramp, 1 epoch each) to a per-layer sparsity.

Command (after the default job, whose fp32 weights it starts from):

  .venv/bin/python -m experiments.main \
      --config=experiments/configs/fashion_mnist_lenet_pruned.py \
      --config.init_checkpoint=workdirs/fashion_mnist_lenet/baseline_variables \
      --workdir=workdirs/fashion_mnist_lenet_pruned_5bit [--config.inq.bits=4 ...]

Hardware: a 2-core CPU, about 10 minutes per bit width. Expected result (README
"Pruning + INQ"; measured from the study's seed-0 baseline, 89.88%): 93.8% of
the weights pruned; 5-bit 89.47% in 30.7 kB (56x smaller than float32), 4-bit
89.40% (56x); 3-bit 85.23% (102x) with the paper's codebook, or 88.94% (59x)
with --config.inq.calibration=mse.
"""

from experiments.configs import fashion_mnist_lenet


def get_config():
  c = fashion_mnist_lenet.get_config()
  # Per-layer targets: the 400k-weight fc1 holds 93% of the weights and is the
  # most redundant; the 500-weight first conv is barely pruned.
  c.prune.sparsity = (("conv1/", 0.3), ("conv2/", 0.8), ("fc1/", 0.95), ("fc2/", 0.7))
  c.prune.steps = 3
  c.prune.epochs = 1.0
  c.prune.learning_rate = 0.01
  c.inq.portions = tuple(round(0.05 * i, 2) for i in range(1, 21))
  c.inq.epochs = 0.25
  return c
