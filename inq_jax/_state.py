"""INQ over a whole parameter pytree: init, advance (one incremental step), verify."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _checks
from inq_jax import _codebook
from inq_jax import _packed
from inq_jax import _partition
from inq_jax import tree
from inq_jax._checks import first_bad as _first_bad
from inq_jax._checks import show as _show
from inq_jax._config import INQConfig


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
    return n1, _codebook.n2_from_n1(n1, self.config.bits_for(path))

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


def _selected(params, config: INQConfig):
  """[(path, leaf)] of the leaves `config` quantizes, with every check on them."""
  chosen = tree.select(params, config.include, config.exclude, what="quantize")
  for path, leaf in chosen:
    _checks.check_float_leaf(path, leaf, "quantize")
    if config.granularity == "channel" and jnp.ndim(leaf) < 1:
      raise ValueError(f"{path}: granularity='channel' needs at least one axis, got a "
                       "scalar")
  return chosen


_UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


@functools.partial(jax.jit, static_argnames=("axes",))
def _max_magnitude_bits(w, axes):
  # The largest |w| as a bit pattern: integer compares are immune to the
  # flush-to-zero that makes a float max of subnormals read as 0.
  dtype = jnp.dtype(w.dtype)
  bits = jax.lax.bitcast_convert_type(w, _UINT[dtype.itemsize])
  sign = jnp.asarray(1 << (8 * dtype.itemsize - 1), bits.dtype)
  return jnp.max(bits & ~sign, axis=axes)


def _check_not_subnormal(path: str, leaf, axes) -> None:
  """Raises if the leaf (or an output channel) is nonzero but has no normal weight.

  Such a layer would silently get the codebook {0} (its max |w| reads as 0
  where subnormals are flushed) and be zeroed.
  """
  dtype = jnp.dtype(jnp.result_type(leaf))
  top = np.asarray(_max_magnitude_bits(jnp.asarray(leaf), axes)).astype(np.uint64)
  smallest_normal_bits = np.uint64(1) << np.uint64(jnp.finfo(dtype).nmant)
  bad = (top > 0) & (top < smallest_normal_bits)
  if bad.any():
    x = np.abs(np.asarray(leaf).astype(np.float64))
    where = ""
    if axes is not None:
      c = int(np.argwhere(bad)[0][0])
      x, where = x[..., c], f" output channel {c}:"
    raise ValueError(
        f"{path}:{where} every weight is 0 or subnormal (max |w| = {float(x.max())!r} < "
        f"{float(jnp.finfo(dtype).smallest_normal)!r}, the smallest normal {dtype}); "
        "its codebook would be {0} and every weight would be zeroed. Rescale the layer "
        "or exclude it from quantization")


def _check_exponents(path: str, leaf, n1, config: INQConfig) -> None:
  """Raises if a state's n1 for `path` is not one `init` could have produced.

  An edited (or foreign) exponent makes `advance` round every weight to a
  codebook the dtype cannot hold, silently zeroing or overflowing them.
  """
  n1 = np.asarray(n1)  # concrete: advance and verify refuse traced states first
  want = jnp.shape(leaf)[-1:] if config.granularity == "channel" else ()
  if not np.issubdtype(n1.dtype, np.integer) or n1.shape != tuple(want):
    raise ValueError(f"{path}: the state's exponent n1 must be an int array of shape "
                     f"{tuple(want)} (granularity={config.granularity!r}), got "
                     f"{n1.dtype}{list(n1.shape)}; the state does not belong to these params")
  n1 = n1.astype(np.int64)
  n2 = _codebook.n2_from_n1(n1, config.bits)
  dtype = jnp.result_type(leaf)
  if not _codebook.representable(n1, n2, dtype):
    lo, hi = _codebook.dtype_exponent_range(dtype)
    real = n1 != _codebook.ZERO_CODEBOOK
    ok = (n1 <= hi) & (n2 - 1 >= lo)
    bad = np.argwhere(np.atleast_1d(real & ~ok))[0]
    v = int(np.atleast_1d(n1)[tuple(bad)])
    raise ValueError(f"{path}: the state's exponent n1={v} gives the {config.bits}-bit "
                     f"codebook 2^{int(_codebook.n2_from_n1(v, config.bits))}..2^{v}, but "
                     f"{dtype} holds normal numbers 2^{lo}..2^{hi} (init never makes such "
                     "an exponent); the state's exponents were edited or belong to "
                     "another model")


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
    selected leaf that is not a float array (e.g. a string or ints), float64
    numpy weights while jax's x64 mode is off (jax would cast them to float32
    silently), NaN/Inf weights, a layer (or channel) whose nonzero weights are
    all subnormal, or a codebook 2^(n2-1)..2^n1 that the leaf's dtype cannot
    hold as normal numbers (e.g. float16 at 8 bits); with `pruned`: a mask of
    the wrong tree, shape or dtype, a pruned weight that is not zero, or pruned
    weights in a leaf `config` does not quantize. TypeError under `jax.jit` or
    another transformation: `init` runs eagerly (its checks need concrete
    values); call it outside jit.

  Example:
    >>> state = init({"dense": {"kernel": w, "bias": b}}, INQConfig(bits=5))
    >>> keep = inq_jax.prune.prune_masks(params, prune_config, step=3, previous=keep)
    >>> params = inq_jax.prune.apply(params, keep)   # (then retrain, frozen ~keep)
    >>> state = init(params, INQConfig(portions=portions), pruned=keep)

  Reference: arXiv:1702.03044, Sec. 2 and Sec. 3.4 (INQ with network pruning).
  """
  if not isinstance(config, INQConfig):
    raise TypeError(f"config must be an INQConfig, got {type(config).__name__}")
  _checks.check_eager("init", params, pruned)
  if config.layer_bits:  # TODO(per-layer bits): remove once init/advance/verify honour it
    raise NotImplementedError("INQConfig.layer_bits is not supported yet")
  chosen = _selected(params, config)
  pruned_masks = None if pruned is None else _pruned_masks(params, pruned, config)
  exponents = _init_exponents(chosen, config)
  chosen_paths = set(exponents)
  counts = {}
  if pruned_masks is not None:
    counts = {path: jnp.sum(pruned_masks[path], dtype=jnp.int32)
              if path in pruned_masks else jnp.zeros((), jnp.int32) for path in exponents}

  def mask(p, leaf):
    path = tree.path_str(p)
    if path in chosen_paths and pruned_masks is not None and path in pruned_masks:
      return _checks.place_like(pruned_masks[path], leaf)
    return _mask_like(leaf, path in chosen_paths)

  masks = jax.tree_util.tree_map_with_path(mask, params)
  return INQState(masks=masks, exponents=exponents, step=jnp.zeros((), jnp.int32),
                  config=config, pruned=counts)


def _init_exponents(chosen, config: INQConfig):
  """{path: n1} for the chosen leaves, all computed by one compiled program.

  Raises (naming the path) on NaN/Inf weights, a leaf or channel whose nonzero
  weights are all subnormal, or a codebook the leaf's dtype cannot hold; the
  detailed messages come from the per-leaf checks, run only on failure.
  """
  live = [(path, leaf) for path, leaf in chosen if jnp.size(leaf)]
  channel = config.granularity == "channel"
  stats = _packed.init_stats([jnp.asarray(leaf) for _, leaf in live], bits=config.bits,
                             channel=channel, mse=config.calibration == "mse") if live else None
  nonfinite, top, n1s = jax.device_get(stats) if live else ((), (), ())
  units = [jnp.shape(leaf)[-1] if channel else 1 for _, leaf in live]
  ends = np.cumsum(units, dtype=np.int64)
  found = {}
  for (path, leaf), end, unit in zip(live, ends, units):
    found[path] = (top[end - unit:end], n1s[end - unit:end].astype(np.int64))
  for (path, leaf), bad in zip(live, nonfinite):
    if bad:
      _checks.check_finite(path, leaf)
  for path, leaf in live:
    dtype = jnp.dtype(jnp.result_type(leaf))
    t = found[path][0].astype(np.uint64)
    if np.any((t > 0) & (t < np.uint64(1) << np.uint64(jnp.finfo(dtype).nmant))):
      _check_not_subnormal(path, leaf, _axes(leaf, config))
  exponents = {}
  for path, leaf in chosen:
    dtype = jnp.dtype(jnp.result_type(leaf))
    shape = jnp.shape(leaf)[-1:] if channel else ()
    if path not in found:  # an empty leaf: the codebook {0}
      n1 = np.full(shape, _codebook.ZERO_CODEBOOK, np.int64)
    else:
      t, n1 = found[path]
      n1 = n1.reshape(shape)
      n2 = _codebook.n2_from_n1(n1, config.bits)
      if not _codebook.representable(n1, n2, dtype):
        lo, hi = _codebook.dtype_exponent_range(dtype)
        max_abs = t.astype(_packed.UINT[dtype.itemsize]).view(dtype).reshape(shape)
        raise ValueError(
            f"{path}: the {config.bits}-bit codebook 2^{_show(n2)}..2^{_show(n1)} (max |w| "
            f"{_show(max_abs)}) needs exponents {_show(n2 - 1)}..{_show(n1)}, but {dtype} "
            f"holds normal numbers 2^{lo}..2^{hi}; use fewer bits or a wider dtype")
    # Placed where the leaf's codebook is used, without compiling anything.
    exponents[path] = _checks.place_like(jax.device_put(n1.astype(np.int32)), leaf,
                                         replicate=True)
  return exponents


def _axes(leaf, config: INQConfig):
  """The axes one codebook spans: all (per layer) or all but the last (per channel)."""
  return tuple(range(jnp.ndim(leaf) - 1)) if config.granularity == "channel" else None


def _pruned_masks(params, keep, config: INQConfig):
  """{path: bool array, True = pruned} for the leaves of `keep` that prune anything.

  Checks `keep` against `params`: same tree, bool masks of the leaf's shape (or
  scalars), pruning only leaves `config` quantizes, pruned weights exactly zero.
  """
  leaves, _ = tree.aligned(params, keep, what="pruned", noun="keep mask")
  out = {}
  for path, leaf, m in leaves:
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise TypeError(f"pruned: {path}: the keep mask must be bool (True = kept), got "
                      f"{m.dtype}")
    if bool(jnp.all(m)):
      continue
    frozen = jnp.broadcast_to(~m, jnp.shape(leaf))
    if not config.selects(path):
      raise ValueError(f"pruned: {path} has {int(jnp.sum(frozen))} pruned weights but INQ "
                       "does not quantize it, so nothing would keep them frozen at zero; "
                       "add it to INQConfig.include or do not prune it (and pass the keep "
                       "mask, True = kept, not its inverse)")
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
  # Unquantized leaves get a scalar False, replicated on the leaf's devices.
  # From host zeros: jnp.zeros would compile a program per shape.
  return _checks.place_like(
      jax.device_put(np.zeros(jnp.shape(leaf) if selected else (), bool)), leaf)


def _aligned(params, state: INQState):
  """[(path, leaf, mask)] in flatten order; raises if `state` was made for other params.

  The mask is None for leaves the state does not quantize. Quantized leaves are
  checked as `init` checked them (float dtype, exponent shape and range).
  """
  if not isinstance(state, INQState):
    raise TypeError(f"state must be an INQState, got {type(state).__name__}")
  leaves, treedef = tree.aligned(
      params, state.masks, what="state", noun="mask",
      hint="; the state was made by init() for another tree")
  out = []
  for path, leaf, mask in leaves:
    quantized = path in state.exponents
    if quantized:
      if jnp.shape(mask) != jnp.shape(leaf):
        raise ValueError(f"{path}: params have shape {jnp.shape(leaf)} but the state's "
                         f"mask has shape {jnp.shape(mask)}")
      _checks.check_float_leaf(path, leaf, "quantize")
      _check_exponents(path, leaf, state.exponents[path], state.config)
    out.append((path, leaf, mask if quantized else None))
  missing = set(state.exponents) - {p for p, _, _ in leaves}
  if missing:
    raise ValueError(f"state quantizes {sorted(missing)[:6]} which are not in params")
  return out, treedef


def _check_frozen_count(path: str, have: int, size: int, state: INQState, step: int):
  want = state.frozen_target(path, size, step)
  if have != want:
    pruned = state.pruned_count(path)
    how = f"{pruned} pruned + " if pruned else ""
    sigma = state.config.portions[step - 1] if step else 0.0
    raise ValueError(
        f"{path}: the state's mask has {have} frozen weights, but after {step} of "
        f"{state.config.num_steps} portions there should be {want} ({how}round({sigma} * "
        f"{size - pruned})); the masks do not belong to this state (was it rebuilt or "
        "restored without its `pruned` counts?)")


def advance(params, state: INQState):
  """One incremental step: partition, quantize and freeze the next portion.

  Every quantized leaf gets frozen up to `round(portions[step] * size)` weights,
  the new ones chosen among its still-float weights and replaced by their codebook
  values. Weights frozen earlier and every leaf that is not quantized come back
  bit-identical; unquantized leaves come back as copies (new buffers on the
  same devices, same sharding), so a jitted step may donate the returned params
  without deleting arrays the caller still holds. Runs eagerly (once per
  phase) as one compiled program over every quantized leaf (inq_jax/_packed.py),
  compiled on the first call and reused by every later step. It measures what
  the checks need in the same pass and returns nothing unless every check
  passes; nothing the caller holds is changed either way. Call it outside
  `jax.jit`.

  After `init(..., pruned=keep)` a leaf with P pruned weights is frozen up to
  `P + round(portions[step] * (size - P))` (`frozen_count(size, portion, P)`);
  its pruned zeros are frozen already and come back bit-identical.

  Args:
    params: the current params (the same tree `init` saw, retrained or not).
    state: the `INQState` from `init` or the previous `advance`.

  Returns:
    `(params, state)` after the step; `state.masks` is what
    `inq_jax.optim.elementwise_freeze` needs next.

  Raises:
    ValueError naming the problem: all portions already applied, a state made for
    another tree, NaN/Inf or float64-without-x64 in a quantized leaf (path and
    value), a state exponent `init` could not have made (edited, or from another
    model: path and value), or masks whose frozen count is not the schedule's
    (e.g. a state rebuilt without `pruned`). TypeError under `jax.jit` (call
    `advance` outside jit).

  Example:
    >>> params, state = advance(params, state)
    >>> tx = optax.chain(optax.sgd(1e-3, momentum=0.9),
    ...                  inq_jax.optim.elementwise_freeze(state.masks))

  Reference: arXiv:1702.03044, Sec. 2.2-2.3.
  """
  _checks.check_eager("advance", params, state)
  leaves, treedef = _aligned(params, state)
  step = int(state.step)
  config = state.config
  if step >= config.num_steps:
    raise ValueError(f"all {config.num_steps} portions {config.portions} are already "
                     f"applied (state.step={step}); the model is fully quantized")
  portion = config.portions[step]
  pruned = {path: int(c) for path, c in jax.device_get(state.pruned).items()}
  live = [i for i, (_, leaf, mask) in enumerate(leaves) if mask is not None and jnp.size(leaf)]
  live_set = set(live)
  # Other jax arrays come back as copies, never the caller's buffers: a jitted
  # step that donates the params `advance` returned must not delete arrays the
  # caller still holds (e.g. the pretrained biases).
  copied = [i for i, (_, leaf, mask) in enumerate(leaves)
            if i not in live_set and isinstance(leaf, jax.Array) and not _checks.is_tracer(leaf)]
  ks = [_partition.frozen_count(int(np.prod(jnp.shape(leaves[i][1]))), portion,
                                pruned.get(leaves[i][0], 0)) for i in live]
  # One program for the whole tree (see _packed): it also measures what the
  # checks below need, so nothing is read back leaf by leaf, and its result is
  # dropped if a check fails.
  arrays = [jnp.asarray(leaves[i][1]) for i in live]
  # On CPU the per-leaf arrays are cut out of the packed results on the host
  # (zero-copy views, one copy each into new buffers): XLA would compile one
  # kernel per output array, which on CPU costs more than the rest of the
  # program together. Elsewhere the program cuts them on the device.
  on_host = bool(live) and all(_checks.on_cpu(a) for a in arrays)
  new_w, new_m, stats = _packed.advance(
      arrays, [_checks.place_like(leaves[i][2], leaves[i][1]) for i in live],
      [state.exponents[leaves[i][0]] for i in live], np.asarray(ks, np.int32),
      np.asarray([config.seed, step], np.uint32), bits=config.bits,
      strategy=config.strategy, unpack=not on_host) if live else ([], [], ((),) * 3)
  for i, bad, have, outside in zip(live, *jax.device_get(stats)):
    path, leaf, mask = leaves[i]
    if bad:
      _checks.check_finite(path, leaf)
    _check_frozen_count(path, int(have), int(np.prod(jnp.shape(leaf))), state, step)
    # Frozen weights must still be in their codebook: an edited exponent or
    # weights moved by an optimizer that does not freeze them would otherwise
    # be carried along silently.
    if outside:
      _check_frozen_in_codebook(path, leaf, mask, state)
  new_leaves = [leaf for _, leaf, _ in leaves]
  new_masks = [None if i in live_set else _mask_like(leaf, mask is not None)
               for i, (_, leaf, mask) in enumerate(leaves)]
  if on_host:
    host_w, host_m = jax.device_get((new_w, new_m))
    new_w, new_m = [None] * len(arrays), [None] * len(arrays)
    for group, w, m in zip(_packed.groups(arrays), host_w, host_m):
      for j, a, b in zip(group.index, _packed.split(w, group), _packed.split(m, group)):
        new_w[j], new_m[j] = a, b
  for i, w, m in zip(live, new_w, new_m):
    new_leaves[i] = _checks.put_like(w, leaves[i][1])
    new_masks[i] = _checks.put_like(m, leaves[i][1])
  for i in copied:
    new_leaves[i] = _checks.fresh_copy(leaves[i][1])
  new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
  new_state = dataclasses.replace(
      state, masks=jax.tree_util.tree_unflatten(treedef, new_masks),
      step=jnp.asarray(step + 1, jnp.int32))
  return new_params, new_state


@jax.jit
def _codes(w, n1, n2):
  """(in codebook?, a small int naming the value): 0 for zero, +-(exponent+2048)."""
  x = w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w
  k, ok = _codebook.codebook_exponents(x, n1, n2, xp=jnp)
  code = jnp.where(x == 0, 0, jnp.sign(x).astype(jnp.int32) * (k.astype(jnp.int32) + 2048))
  return ok, code


def _check_frozen_in_codebook(path: str, leaf, mask, state: INQState):
  """Raises naming `path` and a value if a frozen weight is outside its codebook.

  Returns the value codes of `_codes`.
  """
  n1, n2 = state.bounds(path)
  ok, code = _codes(jnp.asarray(leaf), n1, n2)
  mask = np.asarray(mask)
  bad = mask & ~np.asarray(ok)
  if bad.any():
    values = np.asarray(jnp.asarray(leaf, jnp.float32))
    raise ValueError(f"{path}: frozen weight {_first_bad(bad, values)} is not in its "
                     f"{state.config.bits}-bit codebook {{0, +-2^k: {_show(n2)} <= k <= "
                     f"{_show(n1)}}} ({int(bad.sum())} such weights). If these params are "
                     "an optimizer's copy (EMA, schedule-free eval params, lookahead), "
                     "elementwise_freeze does not protect copies: round them with "
                     "round_to_pow2 where state.masks is True, then verify")
  return mask, code


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
    weight is not 0 or +-2^k with n2 <= k <= n1, or if a state exponent is one
    `init` could not have made. `elementwise_freeze` keeps only the params
    themselves frozen: an optimizer's own copies (EMA, schedule-free eval
    params, lookahead slow weights) drift and must be rounded and verified
    separately. TypeError under `jax.jit` (call `verify` outside jit).

  Example:
    >>> summary = verify(params, state)
    >>> max(s.distinct_values for s in summary.values()) <= 2 ** (bits - 1) + 1
  """
  _checks.check_eager("verify", params, state)
  leaves, _ = _aligned(params, state)
  quantized = [(path, leaf, mask) for path, leaf, mask in leaves if mask is not None]
  live = [(path, leaf, mask) for path, leaf, mask in quantized if jnp.size(leaf)]
  arrays = [jnp.asarray(leaf) for _, leaf, _ in live]
  ids, outside = _packed.value_ids(
      arrays, [_checks.place_like(mask, leaf) for _, leaf, mask in live],
      [state.exponents[path] for path, _, _ in live],
      bits=state.config.bits) if live else ([], ())
  for (path, leaf, mask), bad in zip(live, jax.device_get(outside)):
    if bad:
      _check_frozen_in_codebook(path, leaf, mask, state)
  found = {}
  for group, packed in zip(_packed.groups(arrays), jax.device_get(ids)):
    for i, leaf_ids in zip(group.index, _packed.split(packed, group)):
      found[live[i][0]] = leaf_ids
  out = {}
  for path, leaf, mask in quantized:
    n1, n2 = state.bounds(path)
    frozen, distinct, zeros = (_packed.distinct_and_zeros(found[path]) if path in found
                               else (0, 0, 0))
    out[path] = LeafSummary(total=int(np.prod(jnp.shape(leaf))), frozen=frozen,
                            distinct_values=distinct, zeros=zeros,
                            n1=np.asarray(n1), n2=np.asarray(n2))
  return out
