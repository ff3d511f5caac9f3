"""INQ on params sharded over a 2-device mesh (two fake CPU devices, in a subprocess).

Masks must live where their params live (a scalar placeholder replicated on the
params' mesh, not on device 0), so in_shardings read off the optimizer state
work; and `advance` must hand back copies of untouched leaves, so a jitted step
that donates its params does not delete the caller's pretrained biases.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    import inq_jax
    from inq_jax import quantize as inq

    assert jax.device_count() == 2, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("model",))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    k = jax.random.split(jax.random.key(0), 2)
    pretrained = {
        "dense": {"kernel": put(jax.random.normal(k[0], (16, 8)), P(None, "model")),
                  "bias": put(jnp.linspace(-1.0, 1.0, 8), P("model"))},
        "head": {"kernel": put(jax.random.normal(k[1], (8, 4)), P()),
                 "bias": put(jnp.arange(4.0), P())},
    }
    bias_values = {name: np.asarray(pretrained[name]["bias"]) for name in ("dense", "head")}

    state = inq.init(pretrained, inq.INQConfig(bits=5, portions=(0.5, 1.0)))
    params, state = inq.advance(pretrained, state)

    def devices(x):
      return x.sharding.device_set

    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(state.masks)):
      assert devices(m) == devices(p), (m.sharding, p.sharding)
    assert state.masks["dense"]["kernel"].sharding == params["dense"]["kernel"].sharding
    for name in ("dense", "head"):
      new, old = params[name]["bias"], pretrained[name]["bias"]
      assert new is not old and new.sharding == old.sharding
      ptrs = lambda a: {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}
      assert not ptrs(new) & ptrs(old)

    tx = optax.chain(optax.sgd(0.01, momentum=0.9),
                     inq_jax.optim.elementwise_freeze(state.masks))
    opt_state = tx.init(params)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(opt_state[1].masks)):
      assert devices(m) == devices(p), (m.sharding, p.sharding)
    p_shard = jax.tree.map(lambda x: x.sharding, params)
    o_shard = jax.tree.map(lambda x: x.sharding, opt_state)
    x = put(jnp.ones((4, 16)), P())

    def loss_fn(p):
      h = jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"])
      return jnp.sum((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)

    def train_step(p, s):
      grads = jax.grad(loss_fn)(p)
      updates, s = tx.update(grads, s, p)
      return optax.apply_updates(p, updates), s

    step = jax.jit(train_step, in_shardings=(p_shard, o_shard),
                   out_shardings=(p_shard, o_shard), donate_argnums=(0, 1))
    frozen = np.asarray(params["dense"]["kernel"])[np.asarray(state.masks["dense"]["kernel"])]
    for _ in range(3):
      params, opt_state = step(params, opt_state)
      jax.block_until_ready((params, opt_state))

    # The caller's pretrained params and the state's masks were not donated away.
    for name in ("dense", "head"):
      np.testing.assert_array_equal(np.asarray(pretrained[name]["bias"]), bias_values[name])
      assert not np.array_equal(np.asarray(params[name]["bias"]), bias_values[name])
    np.asarray(pretrained["dense"]["kernel"])
    assert int(jnp.sum(state.masks["dense"]["kernel"])) == 64
    after = np.asarray(params["dense"]["kernel"])[np.asarray(state.masks["dense"]["kernel"])]
    assert frozen.tobytes() == after.tobytes()
    params, state = inq.advance(params, state)
    jax.block_until_ready(params)
    inq.verify(params, state)
    print("SHARDING-OK")
""")


def run_on_two_devices(script: str, marker: str) -> None:
  """Runs `script` in a fresh Python with 2 fake CPU devices; it must print `marker`."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and marker in proc.stdout, (
      proc.stdout[-3000:] + proc.stderr[-6000:])


def test_sharded_params_masks_and_donation():
  run_on_two_devices(SCRIPT, "SHARDING-OK")


FOREIGN = textwrap.dedent("""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from inq_jax import quantize as inq
    import dataclasses

    mesh = Mesh(np.array(jax.devices()), ("model",))
    w = jax.device_put(jax.random.normal(jax.random.key(0), (16, 8)),
                       NamedSharding(mesh, P(None, "model")))
    params = {"dense": {"kernel": w}}
    config = inq.INQConfig(bits=5, portions=(0.5, 1.0), granularity="channel")
    state = inq.init(params, config)
    # Per-channel exponents: replicated on the leaf's devices, not sharded like it.
    n1 = state.exponents["dense/kernel"]
    assert n1.sharding.device_set == w.sharding.device_set and n1.sharding.is_fully_replicated
    params, state = inq.advance(params, state)
    # Masks that were moved to one device (e.g. restored by hand) are placed
    # where their weights are before anything is computed.
    one = jax.devices()[1]
    moved = dataclasses.replace(
        state, masks=jax.tree.map(lambda m: jax.device_put(m, one), state.masks))
    assert inq.verify(params, moved)["dense/kernel"].frozen == 64
    params, state = inq.advance(params, moved)
    assert state.masks["dense"]["kernel"].sharding == w.sharding
    assert int(jnp.sum(state.masks["dense"]["kernel"])) == 128
    print("FOREIGN-OK")
""")


def test_channel_exponents_and_masks_placed_on_the_params_mesh():
  run_on_two_devices(FOREIGN, "FOREIGN-OK")
