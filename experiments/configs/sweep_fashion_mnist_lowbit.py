"""The last-step study of issue #14: final finetune and finer tails, 3 and 2 bits.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.study.sweep \
      --config=experiments/configs/sweep_fashion_mnist_lowbit.py \
      --workdir=workdirs/sweep_fashion_mnist_lowbit

Rerunning the command resumes; the report goes to results/lowbit/.

The LeNet study's budget (sweep_fashion_mnist.py: a 6-epoch fp32 baseline per
seed, 0.5 epochs of retraining per phase, the paper's schedules), at 3 and 2
bits, with each codebook (the paper's max |w| anchor, calibration="mse"):
- inq_ft / inq_mse_ft: the paper's portions, then a final finetune of
  `finetune_epochs` (every kernel frozen, biases train), evaluated after each
  epoch: the last step's cost and what each finetune epoch buys back;
- tail: the paper's codebook with a finer tail of portions (..., 0.95, 0.975,
  0.99, 1): smaller last steps, each retrained. (The sweep also has tail_mse
  cells; they are not in this study, see below.)
The accuracy right after the last quantization step is the result without a
finetune, so no separate no-finetune cells are run.

Hardware: a 2-core CPU, about 40 minutes per seed alone (55-60 sharing the
cores with another study); minutes on a GPU. Expected result (measured,
results/lowbit/RESULTS.md): with calibration="mse" the last step costs about 0.1
points and the finetune buys back less than 0.1; with the paper's codebook the
accuracy is lost over the whole schedule, not at the last step, and neither
the finetune (+1.6 points at 3 bits) nor the finer tail (+0.2, one seed)
brings it back.
"""

import ml_collections

from experiments.configs import sweep_fashion_mnist


def get_config():
  c = ml_collections.ConfigDict()
  base = sweep_fashion_mnist.get_config()
  c.experiment = base.experiment
  c.title = "INQ at 3 and 2 bits on Fashion-MNIST (LeNet): the last step, final finetune, finer tails"
  c.command_config = "experiments/configs/sweep_fashion_mnist_lowbit.py"

  c.seeds = (0, 1, 2)
  c.inq_ft_bits = (3, 2)
  c.inq_mse_ft_bits = (3, 2)
  c.tail_bits = (3, 2)
  # No tail_mse cells: with calibration="mse" the last step costs about 0.1 points
  # (the inq_mse_ft cells), which leaves a finer tail nothing to buy back.
  c.finetune_epochs = 2.0
  c.portions = base.portions
  c.tail_portions = ml_collections.ConfigDict({
      "b3": (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99, 1.0),
      "b2": (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0),
  })
  c.report_dir = "results/lowbit"
  return c
