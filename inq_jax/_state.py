"""INQState: where an INQ run stands, and the checks that tie a state to its params.

A state is made by `init` for one params tree and one `INQConfig`. It carries a
seal (a hash of the config, the quantized leaves' paths, shapes and dtypes, and
the exponents and pruned counts `init` computed), so a state whose config was
changed, whose exponents were edited or swapped, or that was restored into a
target built with another config is refused instead of quietly used; and per
leaf the checksums of its frozen and still-float weights, so frozen weights
that moved are noticed even when they are still in the codebook. The seal and
the checksums guard against mistakes, not against someone who recomputes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _checks
from inq_jax import _codebook
from inq_jax import _partition
from inq_jax import tree
from inq_jax._config import INQConfig


class CodebookFitWarning(UserWarning):
  """A codebook rounds most of a layer's weights to zero, or saturates them."""


class StaleParamsWarning(UserWarning):
  """`advance` got params bit-identical to what the previous `advance` returned."""


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["masks", "exponents", "step", "seal", "checksums", "fit",
                                "pruned"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class INQState:
  """Where an INQ run stands; a pytree, so it jits and checkpoints like any Flax state.

  Made by `init` (or, as a restore target, `abstract_state`); never build one by
  hand. Save and restore every field together (e.g. one orbax item), and keep
  `config.to_dict()` beside it: `config` is static (not a pytree leaf), so a
  checkpoint holds only the seal, which refuses a state restored into a target
  built with another config.

  Attributes:
    masks: a pytree shaped like the params. For a quantized leaf, a bool array of
      the leaf's shape, True where the weight is quantized and frozen; for every
      other leaf a scalar False. Pass it to `inq_jax.optim.elementwise_freeze`.
    exponents: {path: n1} for each quantized leaf, int32; a scalar per layer or
      one entry per output channel. Fixed at `init` from the pretrained weights.
      n2 = n1 + 1 - 2^(bits-2) with the leaf's own bit width; see `bounds`.
    step: int32 scalar, how many portions have been applied (0 after `init`).
    config: the `INQConfig` (static).
    seal: uint32 [2]: hashes of (the config and the quantized leaves' paths,
      shapes and dtypes) and of (the exponents and pruned counts), checked by
      `advance` and `verify`.
    checksums: {path: uint32 [2]}: checksums of the leaf's frozen and of its
      still-float weights as the last `init`/`advance` left them.
    fit: {path: float32 [2]}: the shares of the pretrained weights that the
      codebook rounds to zero and that it saturates (|w| >= 1.5 * 2^n1).
    pruned: {path: int32 scalar} for each quantized leaf, how many of its weights
      were pruned before INQ (`init(..., pruned=keep)`); those are frozen at zero
      from step 0 and the portions count only the other weights. Empty (`{}`)
      when `init` got no `pruned`; a missing path means 0.
  """

  masks: Any
  exponents: Dict[str, jax.Array]
  step: jax.Array
  config: INQConfig
  seal: jax.Array
  checksums: Dict[str, jax.Array]
  fit: Dict[str, jax.Array]
  pruned: Dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  def bits(self, path: str) -> int:
    """The bit width of the leaf at `path` (`config.bits_for`)."""
    return self.config.bits_for(path)

  def bounds(self, path: str):
    """(n1, n2) of the leaf at `path`."""
    n1 = self.exponents[path]
    return n1, _codebook.n2_from_n1(n1, self.bits(path))

  @property
  def done(self) -> bool:
    return int(self.step) >= self.config.num_steps

  def pruned_count(self, path: str) -> int:
    """How many weights of the leaf at `path` were pruned before INQ (0 if none)."""
    return int(self.pruned[path]) if path in self.pruned else 0

  def frozen_target(self, path: str, size: int, step: int) -> int:
    """Frozen weights in the leaf at `path` (of `size` weights) after `step` portions.

    pruned + round(sigma_step * (size - pruned)), with sigma_0 = 0.
    """
    pruned = self.pruned_count(path)
    if step == 0:
      return pruned
    return _partition.frozen_count(size, self.config.portions[step - 1], pruned)


class LeafSummary(NamedTuple):
  """What `verify` found in one quantized leaf."""
  total: int            # weights in the leaf
  frozen: int           # of which quantized and frozen
  distinct_values: int  # distinct values among the frozen weights
  zeros: int            # frozen weights equal to 0
  n1: Any               # per layer an int; per channel an int array, one per output channel
  n2: Any
  bits: int             # the leaf's bit width


def exponent_value(n1):
  """n1 (or n2) for people: an int per layer, an int array per channel."""
  n1 = np.asarray(n1)
  return int(n1) if n1.ndim == 0 else n1.astype(np.int64)


# --- the seal -------------------------------------------------------------------------


def _digest(data: bytes) -> int:
  return int.from_bytes(hashlib.sha256(data).digest()[:4], "little")


def layout_key(config: INQConfig, quantized) -> bytes:
  """What the seal's first word binds: the config and every quantized leaf's layout.

  `quantized`: [(path, shape, dtype)] of the quantized leaves.
  """
  rows = sorted((p, list(map(int, s)), str(jnp.dtype(d)), config.bits_for(p))
                for p, s, d in quantized)
  return json.dumps({"config": config.to_dict(), "leaves": rows}, sort_keys=True).encode()


def exponents_key(exponents: Dict[str, np.ndarray], pruned: Dict[str, int]) -> bytes:
  """What the seal's second word binds: each leaf's n1 values and pruned count."""
  parts = []
  for path in sorted(exponents):
    n1 = np.asarray(exponents[path], "<i4")
    parts.append(f"{path}:{list(n1.shape)}:{int(pruned.get(path, 0))}:".encode()
                 + n1.tobytes())
  return b"\0".join(parts)


def seal_of(config: INQConfig, quantized, exponents, pruned) -> np.ndarray:
  """uint32 [2]: the seal of a state with these contents (host values)."""
  return np.asarray([_digest(layout_key(config, quantized)),
                     _digest(exponents_key(exponents, pruned))], np.uint32)


def check_seal(state: INQState, quantized, exponents, pruned) -> None:
  """Raises if `state.seal` is not the seal of what the state holds now."""
  have = np.asarray(state.seal)
  if have.shape != (2,) or have.dtype != np.uint32:
    raise ValueError(f"the state's seal must be uint32 [2], got {have.dtype}{list(have.shape)}; "
                     "make states with inq.init (or restore into inq.abstract_state)")
  want = seal_of(state.config, quantized, exponents, pruned)
  if have[0] != want[0]:
    raise ValueError(
        "this INQState does not belong to its config or to these params: it was made by "
        f"init for another INQConfig, or for params of other shapes or dtypes (its config "
        f"now reads {state.config}). If you restored it from a checkpoint, build the "
        "restore target with the INQConfig it was saved with (save config.to_dict() "
        "beside the state; INQConfig.from_dict reads it back); never change state.config "
        "after init: start again with init(params, new_config)")
  if have[1] != want[1]:
    raise ValueError(
        "this INQState's exponents (n1) or pruned counts are not the ones init computed "
        "for it: they were edited, swapped between layers, or taken from another state. "
        "Restore the state as it was saved, or start again with init")


# --- abstract states ------------------------------------------------------------------


def abstract_state(params, config: INQConfig, *, pruned: bool = False) -> INQState:
  """The shape of `init(params, config)` without running it: a target for restoring.

  Works on concrete params or on abstract ones (`jax.ShapeDtypeStruct`s, e.g.
  from `jax.eval_shape` of a model's init); nothing is computed or checked but
  the selection. Shardings follow the params' where they have one (masks
  sharded like their leaf, the small per-leaf arrays replicated on its devices).

  Args:
    params: the params the state was made for (or their shapes).
    config: the `INQConfig` the state was made with.
    pruned: whether the state was made with `init(..., pruned=keep)`.

  Returns:
    An `INQState` whose array fields are `jax.ShapeDtypeStruct`s. Restoring a
    checkpoint into it with another config succeeds, but the next `advance`
    or `verify` refuses the state (its seal does not match).

  Example:
    >>> target = inq.abstract_state(params, config)
    >>> state = checkpointer.restore(path, target)
  """
  if not isinstance(config, INQConfig):
    raise TypeError(f"config must be an INQConfig, got {type(config).__name__}")
  chosen = {p for p, _ in tree.select(params, config.include, config.exclude,
                                      what="quantize")}
  check_layer_bits(config, chosen, params)
  channel = config.granularity == "channel"

  def struct(shape, dtype, leaf, like=False):
    sharding = getattr(leaf, "sharding", None)
    if sharding is not None and not like:
      sharding = _checks.replicated(sharding)
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)

  flat, treedef = tree.leaves_with_paths(params)
  masks, exponents, checksums, fit, counts = [], {}, {}, {}, {}
  first = None
  for path, leaf in flat:
    shape = tuple(jnp.shape(leaf))
    if path in chosen:
      masks.append(struct(shape, jnp.bool_, leaf, like=True))
      exponents[path] = struct(shape[-1:] if channel else (), jnp.int32, leaf)
      checksums[path] = struct((2,), jnp.uint32, leaf)
      fit[path] = struct((2,), jnp.float32, leaf)
      if pruned:
        counts[path] = struct((), jnp.int32, leaf)
      first = first if first is not None else leaf
    else:
      masks.append(struct((), jnp.bool_, leaf))
  return INQState(masks=jax.tree_util.tree_unflatten(treedef, masks), exponents=exponents,
                  step=struct((), jnp.int32, first), config=config,
                  seal=struct((2,), jnp.uint32, first), checksums=checksums, fit=fit,
                  pruned=counts)


def check_layer_bits(config: INQConfig, chosen, params) -> None:
  """Raises if a `layer_bits` regex matches no quantized leaf."""
  for pattern, bits in config.layer_bits:
    if not any(re.search(pattern, p) for p in chosen):
      paths = [p for p, _ in tree.leaves_with_paths(params)[0]]
      raise ValueError(f"layer_bits regex {pattern!r} (-> {bits} bits) matches no quantized "
                       f"parameter; quantized paths look like {sorted(chosen)[:6]} "
                       f"(all paths: {paths[:6]})")


# --- a state against its params -------------------------------------------------------


def aligned(params, state: INQState):
  """[(path, leaf, mask)] in flatten order; raises if `state` does not fit `params`.

  The mask is None for leaves the state does not quantize. Quantized leaves are
  checked as `init` checked them (float dtype, exponent shape and range), and
  the state's seal against what it holds.
  """
  if not isinstance(state, INQState):
    hint = ""
    if isinstance(state, dict) and {"masks", "exponents"} <= set(state):
      hint = (": a checkpoint restored without a target comes back as a dict; restore "
              "into inq.abstract_state(params, config) instead")
    raise TypeError(f"state must be an INQState, got {type(state).__name__}{hint}")
  leaves, treedef = tree.aligned(
      params, state.masks, what="state", noun="mask",
      hint="; the state was made by init() for another tree")
  out, quantized = [], []
  for path, leaf, mask in leaves:
    if path in state.exponents:
      if jnp.shape(mask) != jnp.shape(leaf):
        raise ValueError(f"{path}: params have shape {jnp.shape(leaf)} but the state's "
                         f"mask has shape {jnp.shape(mask)}")
      quantized.append((path, jnp.shape(leaf), _checks.check_float_leaf(path, leaf,
                                                                        "quantize")))
    out.append((path, leaf, mask if path in state.exponents else None))
  missing = set(state.exponents) - {p for p, _, _ in leaves}
  if missing:
    raise ValueError(f"state quantizes {sorted(missing)[:6]} which are not in params")
  host = jax.device_get((state.exponents, state.pruned))
  exponents = {p: np.asarray(n) for p, n in host[0].items()}
  for path, leaf, mask in out:
    if mask is not None:
      check_exponents(path, leaf, exponents[path], state.config)
  check_seal(state, quantized, exponents, {p: int(c) for p, c in host[1].items()})
  return out, treedef


def check_exponents(path: str, leaf, n1: np.ndarray, config: INQConfig) -> None:
  """Raises if a state's n1 for `path` is not one `init` could have produced.

  An exponent of the wrong shape or one the dtype cannot hold would make
  `advance` round every weight to a codebook that silently zeroes or overflows.
  """
  want = tuple(jnp.shape(leaf)[-1:]) if config.granularity == "channel" else ()
  if not np.issubdtype(n1.dtype, np.integer) or n1.shape != want:
    raise ValueError(f"{path}: the state's exponent n1 must be an int array of shape "
                     f"{want} (granularity={config.granularity!r}), got "
                     f"{n1.dtype}{list(n1.shape)}; the state does not belong to these params")
  bits = config.bits_for(path)
  n2 = _codebook.n2_from_n1(n1.astype(np.int64), bits)
  dtype = jnp.result_type(leaf)
  bad = _codebook.unrepresentable(n1, n2, dtype)
  if bad.any():
    lo, hi = _codebook.dtype_exponent_range(dtype)
    v = int(np.atleast_1d(n1)[np.argwhere(np.atleast_1d(bad))[0][0]])
    raise ValueError(f"{path}: the state's exponent n1={v} gives the {bits}-bit "
                     f"codebook 2^{int(_codebook.n2_from_n1(v, bits))}..2^{v}, but "
                     f"{dtype} holds normal numbers 2^{lo}..2^{hi} (init never makes such "
                     "an exponent); the state's exponents were edited or belong to "
                     "another model")


def frozen_causes() -> str:
  """The usual reasons why frozen weights moved, most common first."""
  return ("Frozen weights must not move between init/advance and the next call. The "
          "usual causes: (1) inq_jax.optim.elementwise_freeze is not the LAST transform "
          "of the optax chain (weight decay or momentum after it moves frozen weights); "
          "(2) the optimizer was not re-created after advance: build the chain with the "
          "new state.masks and call tx.init(params) after every advance (the old "
          "optimizer state still frees the weights this advance froze); (3) the params "
          "and the state come from different runs or checkpoints; (4) these params are "
          "an optimizer's copy (EMA, schedule-free eval params, lookahead), which "
          "elementwise_freeze does not protect: round them with round_to_pow2 where "
          "state.masks is True and check them with verify(..., "
          "check_frozen_values=False)")


def check_frozen_checksum(path: str, have: int, want: int) -> None:
  """Raises if the checksum of the frozen weights of `path` is not the state's."""
  if have != want:
    raise ValueError(
        f"{path}: the frozen weights changed since the last init/advance (their checksum "
        f"is {have:#010x}, the state recorded {want:#010x}); they may still be in the "
        "codebook, but they are not the values INQ froze. " + frozen_causes())
