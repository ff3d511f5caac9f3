"""INQ in your own Flax Linen loop: a CNN with BatchNorm, 5-bit, exported and reloaded.

    python examples/linen_batchnorm.py [--data_dir DIR] [--out model.inq]

Trains a small CNN with BatchNorm on Fashion-MNIST (a 6,000-image slice, so it
runs in well under a minute on a CPU), quantizes it to 5 bits with INQ (every
conv and dense kernel 0 or +-2^k; biases and BatchNorm stay float), exports the
packed model with its BatchNorm statistics, reads it back and checks that the
reloaded model computes the same predictions.
"""

import argparse
import os
import tempfile

import flax.linen as nn
import jax
import numpy as np
import optax

import fashion_mnist
import inq_jax
from inq_jax import export
from inq_jax import quantize as inq


class CNN(nn.Module):

  @nn.compact
  def __call__(self, x, train: bool):
    for features in (16, 32):
      x = nn.Conv(features, (3, 3))(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def make_train_step(model, tx):
  """A jitted step for optimizer `tx`; build a new one whenever `tx` changes."""

  @jax.jit
  def train_step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                    train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, updates["batch_stats"]

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  return train_step


def accuracy(model, variables, images, labels):
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  return float(np.mean(np.argmax(logits, -1) == labels))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", default=fashion_mnist.DEFAULT_DIR)
  parser.add_argument("--out", default=os.path.join(tempfile.mkdtemp(), "model.inq"))
  args = parser.parse_args()
  train_x, train_y = fashion_mnist.load("train", 6_000, args.data_dir)
  test_x, test_y = fashion_mnist.load("test", 2_000, args.data_dir)
  model = CNN()
  variables = model.init(jax.random.key(0), train_x[:1], train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]

  def train(params, batch_stats, tx, epochs, seed):
    train_step = make_train_step(model, tx)
    opt_state = tx.init(params)
    for epoch in range(epochs):
      for images, labels in fashion_mnist.batches(train_x, train_y, 128, seed + epoch):
        params, batch_stats, opt_state, loss = train_step(params, batch_stats, opt_state,
                                                          images, labels)
    return params, batch_stats

  # The float model: what INQ starts from (in practice, your pretrained model).
  params, batch_stats = train(params, batch_stats, optax.adam(1e-3), epochs=2, seed=0)
  fp32 = accuracy(model, {"params": params, "batch_stats": batch_stats}, test_x, test_y)
  print(f"fp32: test accuracy {fp32:.4f}")

  # INQ: pass variables["params"] (not the whole variables); BatchNorm stays float.
  config = inq.INQConfig(bits=5, portions=(0.5, 0.75, 0.875, 1.0))
  state = inq.init(params, config)
  for phase, portion in enumerate(config.portions):
    params, state = inq.advance(params, state)  # quantize + freeze the next portion
    if portion == 1.0:
      break  # the last step only quantizes
    # A fresh optimizer per phase, elementwise_freeze LAST in the chain.
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.01, momentum=0.9),
                     inq_jax.optim.elementwise_freeze(state.masks))
    params, batch_stats = train(params, batch_stats, tx, epochs=1, seed=10 + phase)
    acc = accuracy(model, {"params": params, "batch_stats": batch_stats}, test_x, test_y)
    print(f"portion {portion}: test accuracy {acc:.4f}")

  summary = inq.verify(params, state)  # every weight in its codebook, frozen values intact
  final = accuracy(model, {"params": params, "batch_stats": batch_stats}, test_x, test_y)
  print(f"5-bit INQ: test accuracy {final:.4f}; distinct values per layer: "
        f"{ {p: s.distinct_values for p, s in summary.items()} }")

  # Export: kernels as 5-bit codes, everything else (biases, BN) as float; the
  # BatchNorm statistics travel as extras. Reload and compare.
  stats = export.save(args.out, params, state, extras={"batch_stats": batch_stats},
                      sha256_file=True)
  loaded, extras = export.load_with_extras(args.out)
  reloaded = accuracy(model, {"params": loaded, "batch_stats": extras["batch_stats"]},
                      test_x, test_y)
  print(f"exported {args.out}: {stats['bytes']} bytes ({stats['ratio']:.1f}x smaller than "
        f"float32); reloaded: test accuracy {reloaded:.4f}")
  assert reloaded == final, (reloaded, final)
  print(f"check it: python -m inq_jax.verify_file {args.out} --sha256")


if __name__ == "__main__":
  main()
