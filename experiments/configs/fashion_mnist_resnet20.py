"""Fashion-MNIST, ResNet-20 (batch norm): fp32 baseline then 5-bit INQ.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.main \
      --config=experiments/configs/fashion_mnist_resnet20.py \
      --workdir=workdirs/fashion_mnist_resnet20

The batch-normalized counterpart of the default LeNet job (the paper's claims
were made on BN networks): the CIFAR ResNet-20 of He et al. (option-A
shortcuts, 0.27M parameters) on 28x28x1 images, the default job's
augmentation (2-pixel shifts, mirror images). Every conv and the classifier
are quantized; BN scales, offsets and statistics stay float and train on.
Other bit widths: `--config.inq.bits=B --config.inq.portions=...` (the
paper's schedules are in experiments/configs/sweep_fashion_mnist.py), or the
low-bit recipe's settings (`--config.inq.calibration=mse`,
`--config.inq.final_finetune_epochs=...`).

Hardware: one GPU or TPU chip, well under an hour (30 + 3 x 2 epochs). Not a
CPU job: XLA:CPU trains ResNet-20 at about 2 s per step of 128 on the 2-core
project machine (15 minutes per epoch). Expected result: fp32 about 93-94%
and the 5-bit model within a few tenths of it. Not run to the end here; the
reduced-budget study `experiments/configs/sweep_fashion_mnist_resnet20.py`
(results/resnet20/RESULTS.md) was.
"""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.model = "resnet20"
  c.dataset.name = "fashion_mnist"
  c.dataset.augment = True
  c.batch_size = 128
  c.eval_batch_size = 500
  c.weight_decay = 1e-4
  c.baseline.epochs = 30
  c.baseline.learning_rate = 0.1
  c.inq.bits = 5
  c.inq.portions = (0.5, 0.75, 0.875, 1.0)
  c.inq.epochs = 2
  c.inq.learning_rate = 0.01
  return c
