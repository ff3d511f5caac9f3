"""Shared ImageNet (ILSVRC-2012) settings for the paper's five networks.

Learning rate and epochs per INQ phase: the paper gives neither ("no more than 8
epochs" for the 5-bit results, 4 epochs in its partition comparison). We follow
the public PyTorch port, which reran ResNet-18: SGD momentum 0.9, lr 1e-3 at the
start of every phase, x0.1 after 2 epochs, 4 epochs per phase; the paper's
per-network portions, batch sizes and weight decay are kept. Training the fp32
baseline from scratch uses the usual recipe (lr 0.1 x batch/256, step x0.1 every
30 epochs, 90 epochs), but INQ is meant to start from a pretrained model:
`--config.init_torchvision=resnet18.pth` (ResNet-18/50) or
`--config.init_checkpoint=DIR` (an orbax checkpoint of {'params', 'batch_stats'}).
"""

from experiments.configs import common


def imagenet_config(model: str, batch_size: int, weight_decay: float, portions):
  c = common.base_config()
  c.model = model
  c.dataset.name = "imagenet2012"
  c.dataset.train_split = "train"
  c.dataset.test_split = "validation"
  c.dataset.augment = True
  c.dataset.image_size = 224
  c.batch_size = batch_size
  c.eval_batch_size = 200
  c.weight_decay = weight_decay
  c.baseline.epochs = 90
  c.baseline.learning_rate = 0.1 * batch_size / 256
  c.baseline.lr_schedule = "step"
  c.baseline.step_epochs = 30.0
  c.inq.bits = 5
  c.inq.portions = tuple(portions)
  c.inq.epochs = 4
  c.inq.learning_rate = 1e-3
  c.inq.lr_schedule = "step"
  c.inq.step_epochs = 2.0
  c.inq.step_factor = 0.1
  c.plot_layer = ""
  return c
