"""AlexNet on ImageNet: 5-bit INQ with the paper's schedule (arXiv:1702.03044).

Command, on a TPU VM (e.g. v4-8 / v5e-8; one host) with ILSVRC-2012 prepared by
TFDS in gs://BUCKET/tensorflow_datasets (or the two ILSVRC2012 tars in a manual
dir) and a pretrained model:

  python -m experiments.main --config=experiments/configs/imagenet_alexnet.py \
      --workdir=gs://BUCKET/inq/alexnet \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
      --config.init_checkpoint=DIR

Paper settings kept: portions (0.3, 0.6, 0.8, 1.0), batch 256, weight decay 5e-4, SGD
momentum 0.9. Chosen here (the paper gives none): lr 1e-3 per phase, x0.1 after
2 epochs, 4 epochs per phase (see imagenet_common.py).

Expected result (paper, ImageNet val top-1 / top-5 error %): fp32 42.76 / 19.77,
INQ 5-bit 42.61 / 19.54. Not run here (no ImageNet, no TPU); only smoke-tested on mock data.
"""

from experiments.configs import imagenet_common


def get_config():
  return imagenet_common.imagenet_config("alexnet", batch_size=256, weight_decay=5e-4,
                                         portions=(0.3, 0.6, 0.8, 1.0))
