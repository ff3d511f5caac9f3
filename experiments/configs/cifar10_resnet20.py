"""CIFAR-10, ResNet-20: fp32 baseline then 5-bit INQ.

Command:

  .venv/bin/python -m experiments.main --config=experiments/configs/cifar10_resnet20.py \
      --workdir=workdirs/cifar10_resnet20

Needs TFDS's cifar10 prepared (TFDS downloads it with TensorFlow installed, or
pass --config.dataset.data_dir to a prepared copy). Hardware: one GPU or TPU
chip, about 30 minutes; on a 2-core CPU a ResNet-20 epoch takes about 10
minutes, so this is not a CPU job. Expected result: fp32 about 91-92% (He et al.
report 91.25% with 160 epochs; 60 here), 5-bit INQ within a few tenths of it.
Not run here (no CIFAR-10 offline); smoke-tested on mock data.
"""

from experiments.configs import common


def get_config():
  c = common.base_config()
  c.model = "resnet20"
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.batch_size = 128
  c.eval_batch_size = 500
  c.weight_decay = 1e-4
  c.baseline.epochs = 60
  c.baseline.learning_rate = 0.1
  c.inq.epochs = 4
  c.inq.learning_rate = 0.01
  return c
