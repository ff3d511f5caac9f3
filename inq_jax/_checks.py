"""Input checks and device placement shared by `quantize` (init/advance/verify) and `prune`.

Every check here runs eagerly on concrete arrays and names the parameter path
and an offending value, so bad input fails before anything is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

try:  # private, but the only check that costs nothing (see `check_eager`)
  from jax._src import core as _jax_core
  _EvalTrace = _jax_core.EvalTrace
except (ImportError, AttributeError):  # pragma: no cover (another jax)
  _jax_core = None


def show(x) -> str:
  return np.array2string(np.asarray(x), threshold=8)


def first_bad(bad: np.ndarray, values: np.ndarray) -> str:
  """'<value> at index (i, j)' of the first True entry of `bad`."""
  idx = tuple(int(i) for i in np.argwhere(bad)[0])
  return f"{float(values[idx]):.8g} at index {idx}"


def is_tracer(x) -> bool:
  return isinstance(x, jax.core.Tracer)


def check_eager(name: str, *trees) -> None:
  """Raises if `name` is called under a transformation: it runs eagerly only.

  Its checks need concrete values (a NaN weight under jit would silently get
  the codebook {0}), and it runs once per phase, so nothing is gained by
  tracing it. Caught both when an argument is a tracer and when the arguments
  are concrete arrays closed over by a function being traced.
  """
  traced = any(is_tracer(x) for tree in trees for x in jax.tree.leaves(tree))
  if traced or _tracing():
    raise TypeError(f"{name} runs eagerly (its input checks need concrete values); "
                    "call it outside jax.jit, jax.vmap and other transformations (also "
                    "not from inside a jitted function on closed-over arrays), once per "
                    "phase, between the train steps")


def _tracing() -> bool:
  """Whether a function is being traced (jit, vmap, grad...) right now."""
  try:
    return not isinstance(_jax_core.trace_ctx.trace, _EvalTrace)
  except AttributeError:  # another jax: an op is staged out only under a trace, though
    # compiling it costs ~50 ms on a process's first call
    return is_tracer(jnp.zeros((), bool))


def check_float_leaf(path: str, leaf, verb: str):
  """The dtype of a selected leaf, after checking that it can be `verb`-ed.

  Raises:
    TypeError for a leaf that is not an array (e.g. a string) or not floating
    point; ValueError for a float64 numpy leaf while jax's x64 mode is off,
    which jax would silently cast to float32 (a 1e-300 layer would become
    zeros, a 1e300 one infinite).
  """
  if isinstance(leaf, (str, bytes)) or not (hasattr(leaf, "dtype") or
                                            isinstance(leaf, (bool, int, float))):
    raise TypeError(f"{path}: a {type(leaf).__name__} leaf ({str(leaf)[:40]!r}) is not an "
                    f"array; only float arrays can be {verb}d (narrow `include` or add "
                    "it to `exclude`)")
  raw = getattr(leaf, "dtype", None)
  if (raw is not None and np.dtype(raw) == np.float64
      and not jax.config.read("jax_enable_x64")):
    raise ValueError(f"{path}: float64 weights while jax's x64 mode is off; jax would "
                     "cast them to float32 silently (values may turn to 0 or inf). Cast "
                     "the params to float32 (e.g. jax.tree.map(jnp.float32, params)) or "
                     "enable x64 (jax.config.update('jax_enable_x64', True))")
  dtype = jnp.result_type(leaf)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"{path}: dtype {dtype} is not floating point; only float weights "
                    f"can be {verb}d (narrow `include` or add it to `exclude`)")
  return dtype


@jax.jit
def _finite(x):
  return jnp.all(jnp.isfinite(x))


def check_finite(path: str, leaf) -> None:
  """Raises ValueError naming `path`, the count and the first NaN/Inf weight."""
  if is_tracer(leaf):
    return
  if not bool(_finite(leaf)):
    values = np.asarray(jnp.asarray(leaf, jnp.float32))
    raise ValueError(f"{path}: {int(np.sum(~np.isfinite(values)))} non-finite weights "
                     f"(NaN/Inf), first {first_bad(~np.isfinite(values), values)}")


def replicated(sharding):
  """A sharding that replicates a scalar on the devices of `sharding`."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(),
                                      memory_kind=sharding.memory_kind)
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  if len(devices) == 1:
    return jax.sharding.SingleDeviceSharding(devices[0], memory_kind=sharding.memory_kind)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("devices",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(),
                                    memory_kind=sharding.memory_kind)


def place_like(x, leaf, *, replicate=False):
  """`x` on the devices of `leaf`: sharded like it, or replicated if `x` is a scalar.

  With `replicate`, `x` (e.g. per-channel exponents) is replicated on the
  leaf's devices whatever its shape.

  Masks live where (and sharded how) their weights live: the quantization
  programs then see the same input shardings every phase and compile only once, and a
  jitted step whose in_shardings come from the optimizer state finds every mask
  on the params' devices (a scalar placeholder on device 0 would not be on a
  multi-device mesh).
  """
  if not isinstance(leaf, jax.Array) or is_tracer(leaf) or is_tracer(x):
    return x
  if not leaf.committed:
    # An uncommitted leaf lives on the default device and may move with its
    # computation; committing the mask would change the quantization programs'
    # signatures between the first and later phases and compile them twice.
    return x
  if replicate or (jnp.ndim(x) == 0 and jnp.ndim(leaf) != 0):
    return jax.device_put(x, replicated(leaf.sharding))
  return jax.device_put(x, leaf.sharding)


def put_all(values, likes, *, replicate=False) -> list:
  """Each host value `x` on the devices of its `like`, as a few batched transfers.

  Values bound for uncommitted (or non-jax) leaves go to the default device
  uncommitted, copied without compiling anything; the others are placed like
  `place_like` places them. Batching
  matters on the host side of `init` and `advance`: a transfer per leaf costs
  more than the copying itself for the small per-leaf arrays.
  """
  out = list(values)
  placed, shardings, plain = [], [], []
  for i, (x, like) in enumerate(zip(values, likes)):
    if is_tracer(x) or (isinstance(like, jax.Array) and is_tracer(like)):
      continue
    if isinstance(like, jax.Array) and like.committed:
      scalar = jnp.ndim(x) == 0 and jnp.ndim(like) != 0
      placed.append(i)
      shardings.append(replicated(like.sharding) if replicate or scalar else like.sharding)
    elif not isinstance(x, jax.Array):
      plain.append(i)
  if placed:
    for i, y in zip(placed, jax.device_put([values[i] for i in placed], shardings)):
      out[i] = y
  if plain:
    for i, y in zip(plain, jax.device_put([values[i] for i in plain])):
      out[i] = y
  return out


def on_cpu(x) -> bool:
  """Is the jax array `x` on CPU devices only?"""
  return isinstance(x, jax.Array) and all(d.platform == "cpu" for d in x.devices())


def fresh_copy(leaf):
  """A jax array leaf copied into new buffers (same sharding); other leaves as they are.

  Returned instead of the caller's own array, so that a step donating what it
  is given (e.g. `jax.jit(step, donate_argnums=0)`) never deletes buffers the
  caller still holds, such as the pretrained biases.
  """
  if isinstance(leaf, jax.Array) and not is_tracer(leaf):
    # device_put copies without compiling anything (jnp.array(copy=True) would
    # compile a program per shape); an uncommitted leaf stays uncommitted.
    if not leaf.committed:
      return jax.device_put(leaf, may_alias=False)
    return jax.device_put(leaf, leaf.sharding, may_alias=False)
  return leaf
