"""Weight partition (paper Sec. 2.2): which still-float weights get frozen next.

The selection of the k largest keys is a threshold search, not a sort: a
binary search over the int32 bit patterns of the keys (non-negative floats
order like their bit patterns) costs ~31 fused compare-and-count passes, which
on CPU is ~30x faster than `lax.top_k` for a 2.4M-weight layer. Ties at the
threshold go to the lowest flat index, so the result is deterministic.

Reference: Zhou et al., ICLR 2017, arXiv:1702.03044, Sec. 2.2 (pruning-inspired
and random partition).
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("magnitude", "random")

# Keys are counted in blocks of SUB x LANES: summing SUB bools of each lane
# vertically (uint8, <= 255) and then the LANES partial counts vectorizes far
# better on CPU than summing along a row of LANES (4x in the partition's passes).
SUB, LANES = 16, 128
BLOCK = SUB * LANES
FROZEN_KEY = int(np.iinfo(np.int32).max)  # above every |w| bit pattern (inf is 0x7f800000)


def check_portion(portion) -> float:
  if isinstance(portion, bool) or not isinstance(portion, numbers.Real):
    raise TypeError(f"portion must be a Python float in (0, 1], got {portion!r}")
  portion = float(portion)
  if not 0.0 < portion <= 1.0:
    raise ValueError(f"portion must be in (0, 1], got {portion}")
  return portion


def check_strategy(strategy, key) -> None:
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown partition strategy {strategy!r}; expected one of {STRATEGIES}")
  if strategy == "random" and key is None:
    raise ValueError("strategy='random' needs a PRNG key: partition(..., key=jax.random.key(0))")


def frozen_count(size: int, portion: float, pruned: int = 0) -> int:
  """How many of `size` weights are frozen once `portion` is reached.

  Without pruning, round(portion * size). With `pruned` weights pruned before INQ
  (and frozen at zero from the start), the portion counts only the unpruned ones:
  pruned + round(portion * (size - pruned)), as in the paper's INQ + pruning runs
  where the portions apply to "the remaining non-zero weights".

  Example:
    >>> frozen_count(100, 0.5), frozen_count(100, 0.5, pruned=80)
    (50, 90)

  Reference: arXiv:1702.03044, Sec. 2.2 and Sec. 3.4 (INQ with network pruning).
  """
  unpruned = size - pruned
  return pruned + min(unpruned, int(round(portion * unpruned)))


def seg_sum(per_row, seg, n):
  return jax.ops.segment_sum(per_row, seg, n, indices_are_sorted=True)


def per_block(values, seg):
  """Per-segment `values` gathered for each block, shaped [blocks, 1, 1]."""
  return jnp.asarray(values)[seg][:, None, None]


def block_max(x):
  """[blocks, SUB, LANES] -> [blocks]: the maximum of each block.

  Over SUB first (vertical, lane-parallel), then over LANES: reducing both at
  once does not vectorize (4x slower on CPU), like the counts.
  """
  return jnp.max(jnp.max(x, axis=1), axis=1)


def seg_max(per_block_values, seg, n):
  return jax.ops.segment_max(per_block_values, seg, n, indices_are_sorted=True)


def count(cond, seg, n):
  """Per segment: how many entries of the bool [blocks, SUB, LANES] `cond` are True."""
  lanes = jnp.sum(cond.astype(jnp.uint8), axis=1, dtype=jnp.uint8)
  return seg_sum(jnp.sum(lanes, axis=1, dtype=jnp.int32), seg, n)


def counts(flags, seg, n):
  """int32 [n, len(flags)]: `count` of each bool array, in one reduction.

  Up to six flags: each takes 5 bits of a uint32, enough for a sum over SUB
  (<= 16) entries, whose fields are then summed per lane.
  """
  code = sum(f.astype(jnp.uint32) << (5 * i) for i, f in enumerate(flags))
  lanes = jnp.sum(code, axis=1, dtype=jnp.uint32)
  shifts = jnp.asarray(5 * np.arange(len(flags)), jnp.uint32)
  fields = (lanes[:, :, None] >> shifts) & jnp.uint32(31)
  return seg_sum(jnp.sum(fields, axis=1, dtype=jnp.int32), seg, n)


def search(keys, ks, seg, n, active):
  """For each `active` segment, its ks[segment]-th largest key (keys >= 0; -1 never counts).

  A binary search over int32 bit patterns (non-negative floats order like
  their bit patterns), every segment in one loop: each pass is one
  compare-and-count over `keys` [blocks, SUB, LANES], whose block b belongs to
  segment seg[b]; the loop keeps count(keys >= lo) >= k and ends when lo == hi
  (31 passes). Segments that are not active come back as 0.

  Interpolating the count instead of bisecting takes ~15 passes on trained
  weights, but finding where to start and where it ended takes min/max
  reductions that cost more than the passes saved (they vectorize worse than
  the counts), so bisection it is.
  """
  def body(lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # ceil midpoint, no int32 overflow
    ok = count(keys >= per_block(mid, seg), seg, n) >= ks
    return jnp.where(active & ok, mid, lo), jnp.where(active & ~ok, mid - 1, hi)

  lo, _ = jax.lax.while_loop(lambda c: jnp.any(active & (c[0] < c[1])), body,
                             (jnp.zeros(n, jnp.int32), jnp.full(n, FROZEN_KEY, jnp.int32)))
  return jnp.where(active, lo, 0)


def tally(keys, threshold, seg, n):
  """int32 [n, 2]: per segment, the keys above its threshold and the keys equal to it."""
  t = per_block(threshold, seg)
  return counts([keys > t, keys == t], seg, n)


def take(keys, threshold, ks, tallied, seg, n):
  """The ks[segment] largest keys of each segment, given its k-th largest `threshold`.

  Every key above the threshold, and of the keys equal to it the ones with the
  lowest flat index; `tallied` is `tally` of the same threshold. Usually every
  tied key is taken; only a real tie needs the (slower) running count.
  """
  above = keys > per_block(threshold, seg)
  tied = keys == per_block(threshold, seg)
  need = ks - tallied[:, 0]

  def lowest_tied():
    rank = jnp.cumsum(tied.reshape(-1), dtype=jnp.int32).reshape(tied.shape)
    before = jnp.cumsum(tallied[:, 1]) - tallied[:, 1]  # tied keys in earlier segments
    return tied & (rank - per_block(before, seg) <= per_block(need, seg))

  return above | jax.lax.cond(jnp.any(tallied[:, 1] > need), lowest_tied, lambda: tied)


def _select_largest(keys: jax.Array, k) -> jax.Array:
  """Boolean mask of the k largest int32 `keys` (>= 0), ties to the lowest index.

  `k` may be traced, so one compiled kernel serves every portion of a schedule.
  The -1 padding is never counted: every probed threshold is >= 1.
  """
  flat = keys.reshape(-1)
  blocks = jnp.pad(flat, (0, -flat.size % BLOCK), constant_values=-1).reshape(-1, SUB, LANES)
  seg = jnp.zeros(blocks.shape[0], jnp.int32)
  k = jnp.asarray(k, jnp.int32).reshape(1)
  t = search(blocks, k, seg, 1, jnp.ones(1, bool))
  selected = take(blocks, t, k, tally(blocks, t, seg, 1), seg, 1)
  return selected.reshape(-1)[:flat.size].reshape(keys.shape)


def _magnitude_keys(w):
  a = jnp.abs(w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w)
  return jax.lax.bitcast_convert_type(a.astype(jnp.float32), jnp.int32)


@functools.partial(jax.jit, static_argnames=("strategy",))
def _partition(w, frozen, key, k, *, strategy):
  if strategy == "magnitude":
    keys = _magnitude_keys(w)
  else:
    # 30 random bits: strictly below _FROZEN_KEY, so frozen weights always win.
    keys = (jax.random.bits(key, w.shape, jnp.uint32) >> 2).astype(jnp.int32)
  keys = jnp.where(frozen, FROZEN_KEY, keys)
  return _select_largest(keys, k) | frozen


@jax.jit
def keep_largest(w, keep, n_keep):
  """Magnitude pruning: keeps the `n_keep` largest |w| among the `keep` weights.

  Weights outside `keep` (pruned before) rank below every kept one, so they stay
  pruned as long as `n_keep <= keep.sum()`. Ties in |w| keep the lowest flat
  index. `w` must be finite.
  """
  keys = jnp.where(keep, _magnitude_keys(w) + 1, 0)  # +1: |w| = 0 ranks above pruned.
  return _select_largest(keys, n_keep)


def partition(w, frozen, portion, *, strategy="magnitude", key=None):
  """The frozen mask after one incremental step.

  Among the weights not yet frozen, freezes the ones with the largest |w|
  ("magnitude", the paper's pruning-inspired partition) or uniformly random ones
  drawn from `key` ("random") until `round(portion * w.size)` are frozen in all.
  Already-frozen weights stay frozen, so masks only grow across steps (both public
  INQ ports rebuild the mask from all weights each step, which can unfreeze one).
  Ties in |w| go to the lowest flat index.

  Args:
    w: the layer's current weights (any float dtype).
    frozen: bool array of `w.shape`, True where a weight is already frozen.
    portion: the accumulated portion sigma_n in (0, 1], a Python float.
    strategy: "magnitude" or "random".
    key: a `jax.random` key; required for "random" (same key, same mask).

  Returns:
    The new bool mask, a superset of `frozen`.

  Example:
    >>> partition(jnp.array([0.1, -0.9, 0.5, 0.2]), jnp.zeros(4, bool), 0.5)
    Array([False,  True,  True, False], dtype=bool)

  Reference: arXiv:1702.03044, Sec. 2.2.
  """
  portion = check_portion(portion)
  check_strategy(strategy, key)
  w = jnp.asarray(w)
  frozen = jnp.asarray(frozen)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise TypeError(f"partition needs floating-point weights, got dtype {w.dtype}")
  if frozen.dtype != jnp.bool_ or frozen.shape != w.shape:
    raise ValueError(f"frozen must be a bool array of shape {w.shape}, got "
                     f"{frozen.dtype}{list(frozen.shape)}")
  k = frozen_count(w.size, portion)
  if not isinstance(frozen, jax.core.Tracer):
    already = int(jnp.sum(frozen))
    if already > k:
      raise ValueError(f"{already} weights are already frozen, more than round({portion} * "
                       f"{w.size}) = {k}: portions must increase")
  if key is None:
    key = jax.random.key(0)  # unused by "magnitude"; keeps one jit signature
  return _partition(w, frozen, key, k, strategy=strategy)
