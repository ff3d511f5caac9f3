"""GoogLeNet on ImageNet: 5-bit INQ with the paper's schedule (arXiv:1702.03044).

Command, on a TPU VM (e.g. v4-8 / v5e-8; one host) with ILSVRC-2012 prepared by
TFDS in gs://BUCKET/tensorflow_datasets (or the two ILSVRC2012 tars in a manual
dir) and a pretrained model:

  python -m experiments.main --config=experiments/configs/imagenet_googlenet.py \
      --workdir=gs://BUCKET/inq/googlenet \
      --config.dataset.data_dir=gs://BUCKET/tensorflow_datasets \
      --config.init_checkpoint=DIR

Paper settings kept: portions (0.2, 0.4, 0.6, 0.8, 1.0), batch 80, weight decay 2e-4, SGD
momentum 0.9. Chosen here (the paper gives none): lr 1e-3 per phase, x0.1 after
2 epochs, 4 epochs per phase (see imagenet_common.py).

Expected result (paper, ImageNet val top-1 / top-5 error %): fp32 31.11 / 10.97,
INQ 5-bit 30.98 / 10.72. Not run here (no ImageNet, no TPU); only smoke-tested on mock data.
"""

from experiments.configs import imagenet_common


def get_config():
  return imagenet_common.imagenet_config("googlenet", batch_size=80, weight_decay=2e-4,
                                         portions=(0.2, 0.4, 0.6, 0.8, 1.0))
