"""Checkpoint an INQ run with orbax and resume it in a new process (Linen or NNX).

    python examples/orbax_resume.py --workdir /tmp/inq_ckpt [--model nnx] [--stop_after_phase 1]
    python examples/orbax_resume.py --workdir /tmp/inq_ckpt [--model nnx]   # resumes

After the float model and after every phase, one orbax checkpoint holds the
params, the `INQState` and the `INQConfig` (as JSON: the config is not a pytree
leaf). A rerun restores the newest one into targets that need no training:
`jax.eval_shape` of the model's init and `inq.abstract_state(params, config)`.
The state's seal binds the config it was made with, so restoring a checkpoint
with another config (say `--bits 4` for a 5-bit run) is refused at the first
`verify` instead of quietly running on as 4-bit. `--stop_after_phase N` exits
after phase N's checkpoint, as a killed run would. The last line prints a
SHA-256 of the final params: an interrupted and resumed run prints the same one
as an uninterrupted run.
"""

import argparse
import hashlib
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import fashion_mnist
import inq_jax
from inq_jax import quantize as inq


class LinenMLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x.reshape((x.shape[0], -1))))
    return nn.Dense(10)(x)


class NNXMLP(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(784, 128, rngs=rngs)
    self.out = nnx.Linear(128, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x.reshape((x.shape[0], -1)))))


def model_functions(kind: str):
  """(init() -> params, abstract params, apply(params, x) -> logits) for either API."""
  if kind == "linen":
    model = LinenMLP()
    init = lambda: model.init(jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32))["params"]
    return init, jax.eval_shape(init), lambda params, x: model.apply({"params": params}, x)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: NNXMLP(nnx.Rngs(0))), nnx.Param)
  init = lambda: nnx.state(NNXMLP(nnx.Rngs(0)), nnx.Param)
  apply = lambda params, x: nnx.merge(graphdef, params)(x)
  return init, jax.eval_shape(init), apply


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--model", choices=("linen", "nnx"), default="linen")
  parser.add_argument("--bits", type=int, default=5)
  parser.add_argument("--stop_after_phase", type=int, default=None)
  parser.add_argument("--data_dir", default=fashion_mnist.DEFAULT_DIR)
  args = parser.parse_args()
  train_x, train_y = fashion_mnist.load("train", 5_000, args.data_dir)
  config = inq.INQConfig(bits=args.bits, portions=(0.5, 0.75, 0.875, 1.0))
  init, abstract_params, apply = model_functions(args.model)

  @jax.jit
  def loss_and_grads(params, images, labels):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        apply(p, images), labels).mean()
    return jax.value_and_grad(loss)(params)

  def train(params, tx, seed):
    opt_state = tx.init(params)
    for images, labels in fashion_mnist.batches(train_x, train_y, 100, seed):
      _, grads = loss_and_grads(params, images, labels)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    return params

  manager = ocp.CheckpointManager(os.path.abspath(args.workdir),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=2))
  step = manager.latest_step()
  if step is None:  # a fresh run: the float model, then INQ's codebooks
    params = train(init(), optax.adam(1e-3), seed=0)
    state = inq.init(params, config)
    step = 0
    manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), inq=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())))
  else:  # resume: restore into targets, nothing trained or initialized first
    restored = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params),
        inq=ocp.args.StandardRestore(inq.abstract_state(abstract_params, config)),
        config=ocp.args.JsonRestore()))
    params, state = restored.params, restored.inq
    saved = inq.INQConfig.from_dict(restored.config)
    print(f"resuming after phase {step} (saved with bits={saved.bits})")
    inq.verify(params, state)  # refuses a state restored with another config
  for phase in range(step, config.num_steps):
    params, state = inq.advance(params, state)
    if phase + 1 < config.num_steps:  # the last step only quantizes
      tx = optax.chain(optax.sgd(0.05, momentum=0.9),
                       inq_jax.optim.elementwise_freeze(state.masks))
      params = train(params, tx, seed=1 + phase)
    manager.save(phase + 1, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), inq=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config.to_dict())))
    manager.wait_until_finished()
    print(f"phase {phase + 1}: portion {config.portions[phase]} quantized, checkpointed")
    if args.stop_after_phase == phase + 1 and phase + 1 < config.num_steps:
      print("stopping here, as a killed run would; rerun the command to resume")
      return
  inq.verify(params, state)
  digest = hashlib.sha256(b"".join(np.asarray(x).tobytes() for x in jax.tree.leaves(params)))
  print(f"done: every weight 0 or +-2^k; params sha256 {digest.hexdigest()}")


if __name__ == "__main__":
  main()
