"""Later phases reuse the programs the first compiled (issue #13).

`init` and the first `advance` each compile one program for the whole tree; every later
`advance` (after a jitted retraining step) must find them all cached, so its
inputs must have the same signature (shape, dtype, sharding, committedness) as
in the first phase.
"""

import logging

import jax
import jax.numpy as jnp
import optax

import inq_jax
from inq_jax import quantize as inq


def test_later_advances_compile_nothing(caplog):
  k = jax.random.split(jax.random.key(0), 2)
  params = {"a": {"kernel": jax.random.normal(k[0], (37, 11)), "bias": jnp.zeros(11)},
            "b": {"kernel": jax.random.normal(k[1], (11, 3)), "bias": jnp.zeros(3)}}
  config = inq.INQConfig(portions=(0.25, 0.5, 0.75, 1.0))
  state = inq.init(params, config)
  compiled = []
  for step in range(config.num_steps):
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.DEBUG, logger="jax"):
      params, state = inq.advance(params, state)
      jax.block_until_ready(params)
    compiled.append([r.getMessage()[:80] for r in caplog.records
                     if r.getMessage().startswith("Compiling")])
    if step + 1 == config.num_steps:
      break
    tx = optax.chain(optax.sgd(0.1), inq_jax.optim.elementwise_freeze(state.masks))
    opt_state = tx.init(params)

    @jax.jit
    def train_step(p, s):
      updates, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
      return optax.apply_updates(p, updates), s

    params, opt_state = train_step(params, opt_state)
  assert any("advance" in m for m in compiled[0]), compiled  # the log is captured
  assert compiled[1:] == [[]] * (config.num_steps - 1), compiled
  inq.verify(params, state)
