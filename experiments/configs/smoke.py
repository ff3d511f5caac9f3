"""Smoke test: the default pipeline on a small slice of Fashion-MNIST, tiny budget.

  .venv/bin/python -m experiments.main --config=experiments/configs/smoke.py \
      --workdir=/tmp/inq_smoke

Hardware: a 2-core CPU, well under 2 minutes. Expected result: it finishes every
phase with all_pow2 true; accuracy is whatever 2 epochs on 2048 images give
(roughly 60-75%), not a benchmark.
"""

from experiments.configs import fashion_mnist_lenet


def get_config():
  c = fashion_mnist_lenet.get_config()
  c.dataset.train_split = "train[:2048]"
  c.dataset.test_split = "test[:500]"
  c.batch_size = 96  # divisible by 1, 2, 3, 4 and 8 devices
  c.baseline.epochs = 2
  c.inq.epochs = 1
  return c
