"""INQ over a whole parameter pytree: init, advance (one incremental step), verify."""

from __future__ import annotations

import dataclasses
import functools
import re
import zlib
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _codebook
from inq_jax import _partition
from inq_jax._config import INQConfig
from inq_jax.tree import leaves_with_paths, path_str


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["masks", "exponents", "step", "pruned"],
                   meta_fields=["config"])
@dataclasses.dataclass(frozen=True)
class INQState:
  """Where an INQ run stands; a pytree, so it jits and checkpoints.

  Attributes:
    masks: a pytree shaped like the params. For a quantized leaf, a bool array of
      the leaf's shape, True where the weight is quantized and frozen; for every
      other leaf a scalar False. Pass it to `inq_jax.optim.elementwise_freeze`.
    exponents: {path: n1} for each quantized leaf, int32; a scalar per layer or
      one entry per output channel. Fixed at `init` from the pretrained weights.
      n2 = n1 + 1 - 2^(bits-2); see `bounds`.
    step: int32 scalar, how many portions have been applied (0 after `init`).
    config: the `INQConfig` (static).
    pruned: {path: int32 scalar} for each quantized leaf, how many of its weights
      were pruned before INQ (`init(..., pruned=keep)`); those are frozen at zero
      from step 0 and the portions count only the other weights. Empty (`{}`, no
      pytree leaves) when `init` got no `pruned`, so an unpruned state flattens,
      jits and checkpoints exactly as before; a missing path means 0. Fixed at
      `init`; save and restore it with `masks`, `exponents` and `step` (a state
      rebuilt without it fails loudly at the next `advance`).
  """

  masks: Any
  exponents: Dict[str, jax.Array]
  step: jax.Array
  config: INQConfig
  pruned: Dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  def bounds(self, path: str):
    """(n1, n2) of the leaf at `path`."""
    n1 = self.exponents[path]
    return n1, n1 + jnp.int32(1 - _codebook.num_exponents(self.config.bits))

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
  n1: np.ndarray        # per layer: a scalar; per channel: one per output channel
  n2: np.ndarray


def _show(x) -> str:
  return np.array2string(np.asarray(x), threshold=8)


def _first_bad(bad: np.ndarray, values: np.ndarray) -> str:
  idx = tuple(int(i) for i in np.argwhere(bad)[0])
  return f"{float(values[idx]):.8g} at index {idx}"


@jax.jit
def _finite(x):
  return jnp.all(jnp.isfinite(x))


def _check_finite(path: str, leaf) -> None:
  if isinstance(leaf, jax.core.Tracer):
    return
  if not bool(_finite(leaf)):
    values = np.asarray(jnp.asarray(leaf, jnp.float32))
    raise ValueError(f"{path}: {int(np.sum(~np.isfinite(values)))} non-finite weights "
                     f"(NaN/Inf), first {_first_bad(~np.isfinite(values), values)}")


def _selected(params, config: INQConfig):
  """[(path, leaf)] of the leaves `config` quantizes, with every check on them."""
  flat, _ = leaves_with_paths(params)
  paths = [p for p, _ in flat]
  for name in ("include", "exclude"):
    pattern = getattr(config, name)
    if pattern is not None and not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"{name}={pattern!r} matches no parameter; paths look like "
                       f"{paths[:6]}")
  chosen = [(p, leaf) for p, leaf in flat if config.selects(p)]
  if not chosen:
    raise ValueError(f"include={config.include!r} minus exclude={config.exclude!r} "
                     "leaves no parameter to quantize")
  for path, leaf in chosen:
    dtype = jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise TypeError(f"{path}: dtype {dtype} is not floating point; only float weights "
                      "can be quantized (narrow `include` or add it to `exclude`)")
    if config.granularity == "channel" and jnp.ndim(leaf) < 1:
      raise ValueError(f"{path}: granularity='channel' needs at least one axis, got a "
                       "scalar")
  return chosen


def init(params, config: INQConfig, *, pruned=None) -> INQState:
  """Starts an INQ run: per-leaf codebooks from the pretrained `params`, no mask set.

  n1 comes from the pretrained max |w| (per layer or per output channel) and stays
  fixed for the whole run; weights that grow past 1.5 * 2^n1 while retraining
  saturate to +-2^n1 when quantized. An all-zero layer (or channel) is legal: its
  codebook is {0}, it quantizes to zeros and `verify` passes.

  INQ on a pruned model (paper Sec. 3.4): pass the pruning's keep mask as
  `pruned`. The pruned weights (keep False) must already be exactly zero (see
  `inq_jax.prune.apply`); they are frozen from step 0 (`state.masks` True), stay
  zero (0 is in every codebook), do not change n1 (zeros do not change max |w|),
  and the portions count only the unpruned weights: after the step with
  accumulated portion sigma a leaf has pruned + round(sigma * unpruned) frozen
  weights (`frozen_count(size, sigma, pruned)`), the new ones picked among the
  unpruned still-float weights by the strategy (largest |w| first, or random).

  Args:
    params: Linen `variables["params"]`, `nnx.state(model, nnx.Param)`, or any
      nested dict of arrays.
    config: an `INQConfig`.
    pruned: optional keep-mask pytree (True = kept, False = pruned), as returned
      by `inq_jax.prune.prune_masks`: shaped like `params`, a bool array of the
      leaf's shape or a scalar True (nothing pruned) per leaf. Only leaves that
      `config` quantizes may have pruned weights. None: no pruning (as before).

  Returns:
    An `INQState` at step 0; `state.pruned` holds the per-leaf pruned counts
    ({} when `pruned` is None).

  Raises:
    ValueError/TypeError naming the parameter path: a regex matching nothing, a
    non-float selected leaf, NaN/Inf weights, or a codebook 2^(n2-1)..2^n1 that
    the leaf's dtype cannot hold as normal numbers (e.g. float16 at 8 bits); with
    `pruned`: a mask of the wrong tree, shape or dtype, a pruned weight that is
    not zero, or pruned weights in a leaf `config` does not quantize.

  Example:
    >>> state = init({"dense": {"kernel": w, "bias": b}}, INQConfig(bits=5))
    >>> keep = inq_jax.prune.prune_masks(params, prune_config, step=3, previous=keep)
    >>> params = inq_jax.prune.apply(params, keep)   # (then retrain, frozen ~keep)
    >>> state = init(params, INQConfig(portions=portions), pruned=keep)

  Reference: arXiv:1702.03044, Sec. 2 and Sec. 3.4 (INQ with network pruning).
  """
  if not isinstance(config, INQConfig):
    raise TypeError(f"config must be an INQConfig, got {type(config).__name__}")
  chosen = _selected(params, config)
  pruned_masks = None if pruned is None else _pruned_masks(params, pruned, config)
  exponents = {}
  for path, leaf in chosen:
    _check_finite(path, leaf)
    a = jnp.abs(jnp.asarray(leaf))
    axes = tuple(range(a.ndim - 1)) if config.granularity == "channel" else None
    max_abs = jnp.max(a, axis=axes) if a.size else jnp.zeros(a.shape[-1:] if axes else ())
    if config.calibration == "mse" and a.size:
      n1, n2 = _codebook.mse_exponent_bounds(leaf, config.bits, axes)
    else:
      n1, n2 = _codebook.exponent_bounds(max_abs, config.bits)
    dtype = jnp.result_type(leaf)
    if not isinstance(leaf, jax.core.Tracer) and not _codebook.representable(n1, n2, dtype):
      lo, hi = _codebook.dtype_exponent_range(dtype)
      raise ValueError(
          f"{path}: the {config.bits}-bit codebook 2^{_show(n2)}..2^{_show(n1)} (max |w| "
          f"{_show(max_abs)}) needs exponents {_show(n2 - 1)}..{_show(n1)}, but {dtype} "
          f"holds normal numbers 2^{lo}..2^{hi}; use fewer bits or a wider dtype")
    exponents[path] = n1
  chosen_paths = set(exponents)
  counts = {}
  if pruned_masks is not None:
    counts = {path: jnp.sum(pruned_masks[path], dtype=jnp.int32)
              if path in pruned_masks else jnp.zeros((), jnp.int32) for path in exponents}

  def mask(p, leaf):
    path = path_str(p)
    if path in chosen_paths and pruned_masks is not None and path in pruned_masks:
      return _place_like(pruned_masks[path], leaf)
    return _mask_like(leaf, path in chosen_paths)

  masks = jax.tree_util.tree_map_with_path(mask, params)
  return INQState(masks=masks, exponents=exponents, step=jnp.zeros((), jnp.int32),
                  config=config, pruned=counts)


def _pruned_masks(params, keep, config: INQConfig):
  """{path: bool array, True = pruned} for the leaves of `keep` that prune anything.

  Checks `keep` against `params`: same tree, bool masks of the leaf's shape (or
  scalars), pruning only leaves `config` quantizes, pruned weights exactly zero.
  """
  flat, treedef = leaves_with_paths(params)
  kflat, ktreedef = leaves_with_paths(keep)
  if treedef != ktreedef:
    have, want = {p for p, _ in flat}, {p for p, _ in kflat}
    diff = sorted(have ^ want)
    where = f"; differing paths: {diff[:6]}" if diff else ""
    raise ValueError(f"pruned: the keep mask's tree does not match params ({len(kflat)} "
                     f"mask leaves, {len(flat)} params){where}")
  out = {}
  for (path, leaf), (_, m) in zip(flat, kflat):
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise TypeError(f"pruned: {path}: the keep mask must be bool (True = kept), got "
                      f"{m.dtype}")
    if m.ndim and m.shape != jnp.shape(leaf):
      raise ValueError(f"pruned: {path}: params have shape {jnp.shape(leaf)} but the "
                       f"keep mask has shape {m.shape}")
    if isinstance(m, jax.core.Tracer):
      if config.selects(path):
        out[path] = jnp.broadcast_to(~m, jnp.shape(leaf))
      continue
    if bool(jnp.all(m)):
      continue
    frozen = jnp.broadcast_to(~m, jnp.shape(leaf))
    if not config.selects(path):
      raise ValueError(f"pruned: {path} has {int(jnp.sum(frozen))} pruned weights but INQ "
                       "does not quantize it, so nothing would keep them frozen at zero; "
                       "add it to INQConfig.include or do not prune it (and pass the keep "
                       "mask, True = kept, not its inverse)")
    if not isinstance(leaf, jax.core.Tracer):
      bad = np.asarray(frozen & (jnp.asarray(leaf) != 0))
      if bad.any():
        values = np.asarray(jnp.asarray(leaf, jnp.float32))
        raise ValueError(
            f"pruned: {path}: {int(bad.sum())} pruned weights (keep mask False) are not "
            f"zero, first {_first_bad(bad, values)}; zero them with "
            "inq_jax.prune.apply(params, keep) and pass the keep mask (True = kept), "
            "not its inverse")
    out[path] = frozen
  return out


def _mask_like(leaf, selected: bool):
  if not selected:
    return jnp.zeros((), bool)
  return _place_like(jnp.zeros(jnp.shape(leaf), bool), leaf)


def _place_like(x, leaf):
  # Masks live where (and sharded how) their weights live: the per-leaf kernels
  # then see the same input shardings every phase and compile only once.
  if isinstance(leaf, jax.Array) and not isinstance(leaf, jax.core.Tracer):
    return jax.device_put(x, leaf.sharding)
  return x


def _aligned(params, state: INQState):
  """[(path, leaf, mask)] in flatten order; raises if `state` was made for other params."""
  if not isinstance(state, INQState):
    raise TypeError(f"state must be an INQState, got {type(state).__name__}")
  flat, treedef = leaves_with_paths(params)
  mflat, mtreedef = leaves_with_paths(state.masks)
  if treedef != mtreedef:
    have, want = {p for p, _ in flat}, {p for p, _ in mflat}
    diff = sorted(have ^ want)
    where = f"; differing paths: {diff[:6]}" if diff else ""
    raise ValueError(f"state does not match params: it was made by init() for another "
                     f"tree ({len(want)} leaves in the state, {len(flat)} in params){where}")
  out = []
  for (path, leaf), (_, mask) in zip(flat, mflat):
    quantized = path in state.exponents
    if quantized and jnp.shape(mask) != jnp.shape(leaf):
      raise ValueError(f"{path}: params have shape {jnp.shape(leaf)} but the state's "
                       f"mask has shape {jnp.shape(mask)}")
    out.append((path, leaf, mask if quantized else None))
  missing = set(state.exponents) - {p for p, _ in flat}
  if missing:
    raise ValueError(f"state quantizes {sorted(missing)[:6]} which are not in params")
  return out, treedef


@functools.partial(jax.jit, static_argnames=("strategy",))
def _advance_leaf(w, frozen, n1, n2, key, k, *, strategy):
  new = _partition._partition(w, frozen, key, k, strategy=strategy)
  # Earlier frozen weights are passed through untouched (bit-identical); only the
  # newly frozen ones are rounded.
  w = jnp.where(new & ~frozen, _codebook.round_to_pow2(w, n1, n2), w)
  return w, new


@jax.jit
def _count(mask):
  return jnp.sum(mask, dtype=jnp.int32)


def _check_frozen_count(path: str, mask, state: INQState, step: int) -> None:
  want = state.frozen_target(path, int(np.prod(jnp.shape(mask))), step)
  have = int(_count(mask))
  if have != want:
    pruned = state.pruned_count(path)
    how = f"{pruned} pruned + " if pruned else ""
    sigma = state.config.portions[step - 1] if step else 0.0
    raise ValueError(
        f"{path}: the state's mask has {have} frozen weights, but after {step} of "
        f"{state.config.num_steps} portions there should be {want} ({how}round({sigma} * "
        f"{int(np.prod(jnp.shape(mask))) - pruned})); the masks do not belong to this "
        "state (was it rebuilt or restored without its `pruned` counts?)")


def _leaf_key(seed: int, step: int, path: str):
  # Derived from the path, not from flatten order or the host: every process of a
  # multi-host run draws the same random partition.
  key = jax.random.fold_in(jax.random.key(seed), step)
  return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def advance(params, state: INQState):
  """One incremental step: partition, quantize and freeze the next portion.

  Every quantized leaf gets frozen up to `round(portions[step] * size)` weights,
  the new ones chosen among its still-float weights and replaced by their codebook
  values. Weights frozen earlier and every leaf that is not quantized come back
  bit-identical. Runs eagerly (once per phase) with a compiled kernel per leaf
  shape; all checks happen before anything is computed.

  After `init(..., pruned=keep)` a leaf with P pruned weights is frozen up to
  `P + round(portions[step] * (size - P))` (`frozen_count(size, portion, P)`);
  its pruned zeros are frozen already and come back bit-identical.

  Args:
    params: the current params (the same tree `init` saw, retrained or not).
    state: the `INQState` from `init` or the previous `advance`.

  Returns:
    `(params, state)` after the step; `state.masks` is what `freeze` needs next.

  Raises:
    ValueError naming the problem: all portions already applied, a state made for
    another tree, NaN/Inf in a quantized leaf (path and value), or masks whose
    frozen count is not the schedule's (e.g. a state rebuilt without `pruned`).

  Example:
    >>> params, state = advance(params, state)
    >>> tx = optax.chain(optax.sgd(1e-3, momentum=0.9), freeze(state.masks))

  Reference: arXiv:1702.03044, Sec. 2.2-2.3.
  """
  leaves, treedef = _aligned(params, state)
  if isinstance(state.step, jax.core.Tracer):
    raise TypeError("advance runs eagerly, once per phase; call it outside jax.jit")
  step = int(state.step)
  config = state.config
  if step >= config.num_steps:
    raise ValueError(f"all {config.num_steps} portions {config.portions} are already "
                     f"applied (state.step={step}); the model is fully quantized")
  portion = config.portions[step]
  for path, leaf, mask in leaves:
    if mask is not None:
      _check_finite(path, leaf)
      _check_frozen_count(path, mask, state, step)
  new_leaves, new_masks = [], []
  for path, leaf, mask in leaves:
    if mask is None:
      new_leaves.append(leaf)
      new_masks.append(jnp.zeros((), bool))
      continue
    n1, n2 = state.bounds(path)
    k = _partition.frozen_count(jnp.size(leaf), portion, state.pruned_count(path))
    w, m = _advance_leaf(leaf, _place_like(mask, leaf), n1, n2, _leaf_key(config.seed, step, path),
                         jnp.int32(k), strategy=config.strategy)
    new_leaves.append(w)
    new_masks.append(m)
  new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
  new_state = dataclasses.replace(
      state, masks=jax.tree_util.tree_unflatten(treedef, new_masks),
      step=jnp.asarray(step + 1, jnp.int32))
  return new_params, new_state


@jax.jit
def _codes(w, n1, n2):
  """(in codebook?, a small int naming the value): 0 for zero, +-(exponent+2048)."""
  ok = _codebook.in_codebook(w, n1, n2)
  x = w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w
  _, e = jnp.frexp(jnp.abs(x))
  code = jnp.where(x == 0, 0, jnp.sign(x).astype(jnp.int32) * (e.astype(jnp.int32) + 2048))
  return ok, code


def verify(params, state: INQState) -> Dict[str, LeafSummary]:
  """Checks that every frozen weight lies in its leaf's codebook.

  Args:
    params: params after one or more `advance` steps (and retraining).
    state: the matching `INQState`.

  Returns:
    {path: LeafSummary(total, frozen, distinct_values, zeros, n1, n2)} for every
    quantized leaf; distinct values are counted among the frozen weights.

  Raises:
    ValueError naming the leaf and an offending value and index if a frozen
    weight is not 0 or +-2^k with n2 <= k <= n1.

  Example:
    >>> summary = verify(params, state)
    >>> max(s.distinct_values for s in summary.values()) <= 2 ** (bits - 1) + 1
  """
  leaves, _ = _aligned(params, state)
  bits = state.config.bits
  out = {}
  for path, leaf, mask in leaves:
    if mask is None:
      continue
    n1, n2 = state.bounds(path)
    ok, code = _codes(jnp.asarray(leaf), n1, n2)
    mask = np.asarray(mask)
    bad = mask & ~np.asarray(ok)
    if bad.any():
      values = np.asarray(jnp.asarray(leaf, jnp.float32))
      raise ValueError(f"{path}: frozen weight {_first_bad(bad, values)} is not in its "
                       f"{bits}-bit codebook {{0, +-2^k: {_show(n2)} <= k <= {_show(n1)}}}")
    frozen_codes = np.asarray(code)[mask]
    distinct = int(np.count_nonzero(np.bincount(frozen_codes + 4096, minlength=1))) \
        if frozen_codes.size else 0
    out[path] = LeafSummary(total=int(mask.size), frozen=int(mask.sum()),
                            distinct_values=distinct,
                            zeros=int(np.sum(frozen_codes == 0)),
                            n1=np.asarray(n1), n2=np.asarray(n2))
  return out
