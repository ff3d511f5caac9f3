"""INQ in your own Flax NNX loop: the model's own Params are what INQ quantizes.

    python examples/nnx_loop.py [--data_dir DIR]

`inq_jax.nnx` reads the model's params afresh at every call and writes the
quantized values back into the model, so training between the steps (an
`nnx.Optimizer` updating the model in place) is never lost. Trains a small NNX
CNN on a Fashion-MNIST slice (6,000 images), then runs 4-bit INQ.
"""

import argparse

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import fashion_mnist
import inq_jax.nnx as inq_nnx
from inq_jax import quantize as inq


class CNN(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), rngs=rngs)
    self.head = nnx.Linear(7 * 7 * 32, 10, rngs=rngs)

  def __call__(self, x):
    for conv in (self.conv1, self.conv2):
      x = nnx.max_pool(nnx.relu(conv(x)), (2, 2), (2, 2))
    return self.head(x.reshape((x.shape[0], -1)))


def loss_fn(model, images, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(images), labels).mean()


@nnx.jit
def train_step(model, optimizer, images, labels):
  loss, grads = nnx.value_and_grad(loss_fn)(model, images, labels)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def predict(model, images):
  return jnp.argmax(model(images), -1)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=fashion_mnist.DEFAULT_DIR)
  args = parser.parse_args()
  train_x, train_y = fashion_mnist.load("train", 6_000, args.data_dir)
  test_x, test_y = fashion_mnist.load("test", 2_000, args.data_dir)
  accuracy = lambda: float(np.mean(np.asarray(predict(model, test_x)) == test_y))

  model = CNN(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
  for epoch in range(2):
    for images, labels in fashion_mnist.batches(train_x, train_y, 128, epoch):
      train_step(model, optimizer, images, labels)
  print(f"fp32: test accuracy {accuracy():.4f}")

  config = inq.INQConfig(bits=4, portions=(0.5, 0.75, 0.875, 1.0))
  state = inq_nnx.init(model, config)
  for phase, portion in enumerate(config.portions):
    state = inq_nnx.advance(model, state)  # quantizes the model's own Params in place
    if portion == 1.0:
      break
    # A fresh optimizer per phase: base optimizer, then elementwise_freeze (last).
    optimizer = inq_nnx.optimizer(model, optax.sgd(0.01, momentum=0.9), state)
    for images, labels in fashion_mnist.batches(train_x, train_y, 128, 10 + phase):
      train_step(model, optimizer, images, labels)
    print(f"portion {portion}: test accuracy {accuracy():.4f}")

  summary = inq_nnx.verify(model, state)
  print(f"4-bit INQ: test accuracy {accuracy():.4f}; "
        f"{sum(s.frozen for s in summary.values())} weights, all 0 or +-2^k; distinct "
        f"values per layer: { {p: s.distinct_values for p, s in summary.items()} }")


if __name__ == "__main__":
  main()
