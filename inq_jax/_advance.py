"""`advance` (one incremental step) and `verify` (every frozen weight where INQ put it)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _checks
from inq_jax import _codebook
from inq_jax import _packed
from inq_jax import _partition
from inq_jax import _state
from inq_jax._checks import first_bad as _first_bad
from inq_jax._checks import show as _show
from inq_jax._state import INQState
from inq_jax._state import LeafSummary

# `advance` warns when, beyond what the pretrained weights gave (`INQState.fit`),
# this much more of a layer rounds to zero or saturates, and more than half of it.
SCALE_DRIFT = 0.25


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

  Warns (`StaleParamsWarning`) when the params are bit-identical to what the
  previous `advance` returned: no retraining happened in between, usually
  because the retrained params were not the ones passed (with NNX, pass
  `nnx.state(model, nnx.Param)` afresh, or use `inq_jax.nnx.advance(model,
  state)`). Warns (`CodebookFitWarning`) when most of a layer now rounds to zero
  or saturates although its pretrained weights did not: the weights' scale moved
  (n1 is fixed at `init`).

  Args:
    params: the current params (the same tree `init` saw, retrained or not).
    state: the `INQState` from `init` or the previous `advance`.

  Returns:
    `(params, state)` after the step; `state.masks` is what
    `inq_jax.optim.elementwise_freeze` needs next (build a new optimizer chain
    and `tx.init(params)` after every advance).

  Raises:
    ValueError naming the problem: all portions already applied, a state made for
    another tree or config (or restored into a target built with another
    config), exponents edited or swapped, NaN/Inf or float64-without-x64 in a
    quantized leaf (path and value), frozen weights that moved since the last
    call (outside the codebook, or inside it but changed: the message names
    the usual causes), or masks whose frozen count is not the schedule's.
    TypeError under `jax.jit` (call `advance` outside jit).

  Example:
    >>> params, state = advance(params, state)
    >>> tx = optax.chain(optax.sgd(1e-3, momentum=0.9),
    ...                  inq_jax.optim.elementwise_freeze(state.masks))

  Reference: arXiv:1702.03044, Sec. 2.2-2.3.
  """
  _checks.check_eager("advance", params, state)
  leaves, treedef = _state.aligned(params, state)
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
  sizes = [int(np.prod(jnp.shape(leaves[i][1]))) for i in live]
  ks = [_partition.frozen_count(size, portion, pruned.get(leaves[i][0], 0))
        for i, size in zip(live, sizes)]
  arrays = [jnp.asarray(leaves[i][1]) for i in live]
  # On CPU the per-leaf arrays are cut out of the packed results on the host
  # (zero-copy views, one copy each into new buffers): XLA would compile one
  # kernel per output array, which on CPU costs more than the rest of the
  # program together. Elsewhere the program cuts them on the device.
  on_host = bool(live) and all(_checks.on_cpu(a) for a in arrays)
  new_w, new_m, before, after = _packed.advance(
      arrays, [_checks.place_like(leaves[i][2], leaves[i][1]) for i in live],
      [state.exponents[leaves[i][0]] for i in live], np.asarray(ks, np.int32),
      np.asarray([config.seed, step], np.uint32),
      bits=tuple(config.bits_for(leaves[i][0]) for i in live), strategy=config.strategy,
      unpack=not on_host) if live else ([], [], np.zeros((0, 7)), np.zeros((0, 2)))
  before, after, recorded, fit = jax.device_get(
      (before, after, {leaves[i][0]: state.checksums[leaves[i][0]] for i in live},
       {leaves[i][0]: state.fit[leaves[i][0]] for i in live}))
  stale = step > 0
  for i, size, row in zip(live, sizes, before):
    path, leaf, mask = leaves[i]
    stats = dict(zip(_packed.BEFORE, row))
    if stats["nonfinite"]:
      _checks.check_finite(path, leaf)
    _check_frozen_count(path, int(stats["frozen"]), size, state, step)
    if stats["outside"]:
      _check_frozen_in_codebook(path, leaf, mask, state)
    sums = _packed.unsigned([stats["frozen_sum"], stats["float_sum"]])
    want = np.asarray(recorded[path]).astype(np.uint32)
    _state.check_frozen_checksum(path, int(sums[0]), int(want[0]))
    stale &= bool(sums[1] == want[1]) and size > stats["frozen"]
    _warn_scale(path, stats, size, fit[path], state)
  if stale and live:
    warnings.warn(
        f"advance got params bit-identical to what the previous advance returned (step "
        f"{step} of {config.num_steps}): nothing was retrained in between. Pass the params "
        "your training updated (with Flax NNX, nnx.state(model, nnx.Param) read again after "
        "training, or inq_jax.nnx.advance(model, state), which reads the model itself); if "
        "skipping retraining is intended, ignore this StaleParamsWarning",
        _state.StaleParamsWarning, stacklevel=2)
  if on_host:
    host_w, host_m = jax.device_get((new_w, new_m))
    new_w, new_m = [None] * len(arrays), [None] * len(arrays)
    for group, w, m in zip(_packed.groups(arrays), host_w, host_m):
      for j, a, b in zip(group.index, _packed.split(w, group), _packed.split(m, group)):
        new_w[j], new_m[j] = a, b
  # Every new array in as few transfers as possible: the quantized leaves and
  # their masks, the other leaves' fresh masks, the checksums and the step.
  others = [i for i, (_, _, mask) in enumerate(leaves) if i not in live_set]
  likes = [leaves[i][1] for i in live]
  placed = _checks.put_all(
      list(new_w) + list(new_m) + [np.zeros(jnp.shape(leaves[i][1]) if leaves[i][2] is not None
                                            else (), bool) for i in others],
      likes + likes + [leaves[i][1] for i in others])
  small = _checks.put_all([_packed.unsigned(row) for row in after] +
                          [np.asarray(step + 1, np.int32)], likes + [state.step], replicate=True)
  new_leaves = [leaf for _, leaf, _ in leaves]
  new_masks = [None] * len(leaves)
  for j, i in enumerate(live):
    new_leaves[i], new_masks[i] = placed[j], placed[len(live) + j]
  for j, i in enumerate(others):
    new_masks[i] = placed[2 * len(live) + j]
  for i in copied:
    new_leaves[i] = _checks.fresh_copy(leaves[i][1])
  checksums = dict(state.checksums)
  checksums.update({leaves[i][0]: x for i, x in zip(live, small)})
  new_params = jax.tree_util.tree_unflatten(treedef, new_leaves)
  new_state = dataclasses.replace(
      state, masks=jax.tree_util.tree_unflatten(treedef, new_masks), checksums=checksums,
      step=small[-1])
  return new_params, new_state


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


def _warn_scale(path: str, stats: dict, size: int, fit, state: INQState) -> None:
  """Warns when most of a layer now rounds to zero or saturates, unlike at init."""
  for name, key, now_of in (("round to zero", "zeros", 0), ("saturate", "saturated", 1)):
    share = float(stats[key]) / size
    if share > 0.5 and share > float(fit[now_of]) + SCALE_DRIFT:
      n1, n2 = state.bounds(path)
      warnings.warn(
          f"{path}: {100 * share:.0f}% of the weights {name} in its {state.bits(path)}-bit "
          f"codebook {{0, +-2^k: {_show(n2)} <= k <= {_show(n1)}}} (at init: "
          f"{100 * float(fit[now_of]):.0f}%): the weights' scale has moved since init "
          "(rescaled params, a learning rate far too high?) and n1 stays fixed at init's "
          "value. Check the params, or start again with init on the rescaled weights",
          _state.CodebookFitWarning, stacklevel=3)


@jax.jit
def _codes(w, n1, n2):
  x = w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w
  return _codebook.codebook_exponents(x, n1, n2, xp=jnp)[1]


def _check_frozen_in_codebook(path: str, leaf, mask, state: INQState):
  """Raises naming `path` and a value if a frozen weight is outside its codebook."""
  n1, n2 = state.bounds(path)
  ok = _codes(jnp.asarray(leaf), n1, n2)
  bad = np.asarray(mask) & ~np.asarray(ok)
  if bad.any():
    values = np.asarray(jnp.asarray(leaf, jnp.float32))
    raise ValueError(f"{path}: frozen weight {_first_bad(bad, values)} is not in its "
                     f"{state.bits(path)}-bit codebook {{0, +-2^k: {_show(n2)} <= k <= "
                     f"{_show(n1)}}} ({int(bad.sum())} such weights). "
                     + _state.frozen_causes())


def verify(params, state: INQState, *, check_frozen_values: bool = True
           ) -> Dict[str, LeafSummary]:
  """Checks that every frozen weight lies in its codebook, with the value INQ froze.

  What it checks: the state belongs to these params and its config (tree,
  shapes, dtypes, seal, exponents the dtype can hold); every frozen weight is 0
  or +-2^k with n2 <= k <= n1 of its leaf's own codebook; and, unless
  `check_frozen_values=False`, the frozen weights are the values the last
  `advance` left (a per-leaf checksum: a frozen weight moved to another
  codebook value is caught too). What it does not check: the still-float
  weights, and anything about the model's accuracy.

  Args:
    params: params after one or more `advance` steps (and retraining).
    state: the matching `INQState`.
    check_frozen_values: False for params that are not the ones `advance`
      returned but should be in the codebook too, e.g. an optimizer's EMA copy
      rounded with `round_to_pow2` where `state.masks` is True.

  Returns:
    {path: LeafSummary(total, frozen, distinct_values, zeros, n1, n2, bits)} for
    every quantized leaf; distinct values are counted among the frozen weights.

  Raises:
    ValueError naming the leaf and an offending value and index if a frozen
    weight is not in its codebook, or (naming the usual causes) if the frozen
    weights changed since the last `advance`; and for a state that does not
    belong to these params or its config. TypeError under `jax.jit`.

  Example:
    >>> summary = verify(params, state)
    >>> max(s.distinct_values for s in summary.values()) <= 2 ** (bits - 1) + 1
  """
  _checks.check_eager("verify", params, state)
  leaves, _ = _state.aligned(params, state)
  quantized = [(path, leaf, mask) for path, leaf, mask in leaves if mask is not None]
  live = [(path, leaf, mask) for path, leaf, mask in quantized if jnp.size(leaf)]
  arrays = [jnp.asarray(leaf) for _, leaf, _ in live]
  ids, stats = _packed.value_ids(
      arrays, [_checks.place_like(mask, leaf) for _, leaf, mask in live],
      [state.exponents[path] for path, _, _ in live],
      bits=tuple(state.bits(path) for path, _, _ in live)) if live else ([], ())
  stats, recorded = jax.device_get((stats, {p: state.checksums[p] for p, _, _ in live}))
  for (path, leaf, mask), (outside, checksum) in zip(live, stats):
    if outside:
      _check_frozen_in_codebook(path, leaf, mask, state)
    if check_frozen_values:
      _state.check_frozen_checksum(path, int(_packed.unsigned(checksum)),
                                   int(np.asarray(recorded[path]).astype(np.uint32)[0]))
  found = {}
  for group, packed in zip(_packed.groups(arrays), jax.device_get(ids)):
    for i, leaf_ids in zip(group.index, _packed.split(packed, group)):
      found[live[i][0]] = leaf_ids
  out = {}
  for path, leaf, mask in quantized:
    n1, n2 = jax.device_get(state.bounds(path))
    frozen, distinct, zeros = (_packed.distinct_and_zeros(found[path]) if path in found
                               else (0, 0, 0))
    out[path] = LeafSummary(total=int(np.prod(jnp.shape(leaf))), frozen=frozen,
                            distinct_values=distinct, zeros=zeros,
                            n1=_state.exponent_value(n1), n2=_state.exponent_value(n2),
                            bits=state.bits(path))
  return out
