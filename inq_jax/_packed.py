"""Every quantized leaf in one packed array: one compiled program per run, not per shape.

XLA compiles one program per distinct input signature. Per-leaf kernels meant
~70 compilations for ResNet-50's 54 kernels on the first `advance` and ~90 in
`init` (25 s and 9 s on a 2-core CPU), and a program holding one fusion per leaf
is no better: its compile time grows with the number of leaves. Here the leaves
of one dtype are flattened, each padded to a multiple of `ROW` and stacked into
one `[rows, ROW]` array, so `init`, `advance` and `verify` are a handful of
fusions over that array whatever the model: row r belongs to leaf `seg[r]`, and
per-leaf quantities (the partition's k, n1) are gathered per row; per-leaf
results are segment sums over rows.

Padding is weight 0 and frozen: the selection takes it first (its key is the
frozen key), so each leaf's k grows by its padding, and rounding never touches it.

Reference: arXiv:1702.03044, Sec. 2 (the algorithm is unchanged; this is layout).
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _codebook

ROW = 128  # weights per row; per-row counts fit a uint8 (<= 255)
_FROZEN_KEY = np.iinfo(np.int32).max  # above every |w| bit pattern (inf is 0x7f800000)
UINT = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


class Group(NamedTuple):
  """Static layout of the leaves of one dtype (their positions in the leaf list)."""
  index: Tuple[int, ...]
  shapes: Tuple[Tuple[int, ...], ...]
  rows: Tuple[int, ...]

  @property
  def pads(self):
    return tuple(r * ROW - int(np.prod(s)) for r, s in zip(self.rows, self.shapes))


def groups(leaves) -> List[Group]:
  """Leaves grouped by dtype, in order of first appearance; every leaf non-empty."""
  by_dtype = {}
  for i, leaf in enumerate(leaves):
    by_dtype.setdefault(jnp.dtype(leaf.dtype), []).append(i)
  out = []
  for index in by_dtype.values():
    shapes = tuple(tuple(leaves[i].shape) for i in index)
    out.append(Group(tuple(index), shapes,
                     tuple(-(-int(np.prod(s)) // ROW) for s in shapes)))
  return out


def _pack(arrays, group: Group, fill):
  flat = [jnp.pad(jnp.ravel(a), (0, pad), constant_values=fill)
          for a, pad in zip(arrays, group.pads)]
  return jnp.concatenate(flat).reshape(-1, ROW)


def _unpack(packed, group: Group):
  """The per-leaf arrays of a packed group (jax arrays in a program, numpy views on the host)."""
  flat, out, start = packed.reshape(-1), [], 0
  for shape, rows in zip(group.shapes, group.rows):
    out.append(flat[start:start + int(np.prod(shape))].reshape(shape))
    start += rows * ROW
  return out


def _segments(group: Group):
  """int32 [rows]: which leaf of the group each row belongs to."""
  starts = jnp.asarray(np.cumsum(group.rows)[:-1], jnp.int32)
  row = jax.lax.iota(jnp.int32, sum(group.rows))
  return jnp.sum(row[:, None] >= starts[None, :], axis=1, dtype=jnp.int32)


def _seg_sum(per_row, seg, n):
  return jax.ops.segment_sum(per_row, seg, n, indices_are_sorted=True)


def _count(cond, seg, n):
  """Per leaf: how many entries of the bool [rows, ROW] `cond` are True."""
  per_row = jnp.sum(cond.astype(jnp.uint8), axis=1, dtype=jnp.uint8)
  return _seg_sum(per_row.astype(jnp.int32), seg, n)


def _compute(w):
  return w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w


def _per_row(values, seg):
  return values[seg][:, None]


def _bounds(n1s, group: Group, seg, bits):
  """(n1, n2) broadcastable against the packed group: per row, or per weight."""
  n1s = [n1s[i] for i in group.index]
  if all(jnp.ndim(n) == 0 for n in n1s):
    n1 = _per_row(jnp.stack(n1s).astype(jnp.int32), seg)
  else:  # one codebook per output channel: broadcast along each leaf
    n1 = _pack([jnp.broadcast_to(n, s).astype(jnp.int32) for n, s in zip(n1s, group.shapes)],
               group, 0)
  return n1, _codebook.n2_from_n1(n1, bits)


# --- init ---------------------------------------------------------------------------


def _top_bits(w):
  # The largest |w| as a bit pattern: integer compares are immune to the
  # flush-to-zero that makes a float max of subnormals read as 0.
  bits = jax.lax.bitcast_convert_type(w, UINT[jnp.dtype(w.dtype).itemsize])
  return bits & ~jnp.asarray(1 << (8 * jnp.dtype(w.dtype).itemsize - 1), bits.dtype)


@functools.partial(jax.jit, static_argnames=("bits", "channel", "mse"))
def init_stats(leaves, *, bits, channel, mse):
  """(non-finite counts, top |w| bit patterns, n1) of the pretrained weights.

  Three flat arrays, so that reading them back is one transfer: non-finite
  counts one per leaf; top bit patterns (widened to one unsigned type) and n1
  one per codebook, i.e. per leaf, or with `channel` per output channel, leaf
  after leaf. Checks on these (finite, not all subnormal, representable) are
  the caller's.
  """
  nonfinite, top, n1 = ([None] * len(leaves) for _ in range(3))
  for group in groups(leaves):
    seg, n = _segments(group), len(group.index)
    ws = [leaves[i] for i in group.index]
    packed = _pack(ws, group, 0)
    counts = _count(~jnp.isfinite(packed), seg, n)
    if channel:
      # Per-channel reductions stay per leaf (a channel is strided in the packed rows).
      for j, (i, w) in enumerate(zip(group.index, ws)):
        axes = tuple(range(w.ndim - 1))
        top[i] = jnp.max(_top_bits(w), axis=axes)
        n1[i] = (_codebook.mse_exponent_bounds(w, bits, axes)[0] if mse else
                 _codebook.exponent_bounds(_from_bits(top[i], w.dtype), bits)[0])
    else:
      tops = jax.ops.segment_max(jnp.max(_top_bits(packed), axis=1), seg, n,
                                 indices_are_sorted=True)
      n1_max = _codebook.exponent_bounds(_from_bits(tops, packed.dtype), bits)[0]
      best = n1_max if not mse else _mse_search(_compute(packed), n1_max, seg, n, bits)
      for j, i in enumerate(group.index):
        top[i], n1[i] = tops[j:j + 1], best[j:j + 1]
    for j, i in enumerate(group.index):
      nonfinite[i] = counts[j:j + 1]
  return tuple(jnp.concatenate(x) for x in (nonfinite, top, n1))


def _from_bits(bits, dtype):
  return jax.lax.bitcast_convert_type(bits, dtype)


def _mse_search(x, n1_max, seg, n, bits):
  """`_codebook.mse_exponent_bounds` for every leaf of a packed group at once."""
  return _codebook.mse_search(x, n1_max, bits, lambda n1: _per_row(n1, seg),
                              lambda err: _seg_sum(jnp.sum(err, axis=1), seg, n))


# --- advance ------------------------------------------------------------------------


def _select_largest(keys, ks, seg, n, finish):
  """finish(mask) for the mask of the ks[leaf] largest int32 keys of each leaf.

  Ties go to the lowest index. A binary search over bit patterns per leaf, all
  leaves in one loop: each pass is one compare-and-count over the packed keys
  (see `_partition`). `finish` runs inside the branches of a conditional, so
  its results are materialized once, not recomputed inside every per-leaf
  slice that reads them (XLA would otherwise fuse them into each, and compile
  time would grow with the leaf count again).
  """
  def body(lo_hi):
    lo, hi = lo_hi
    mid = lo + (hi - lo) // 2 + (hi - lo) % 2  # ceil midpoint, no int32 overflow
    ok = _count(keys >= _per_row(mid, seg), seg, n) >= ks
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

  lo, _ = jax.lax.while_loop(lambda c: jnp.any(c[0] < c[1]), body,
                             (jnp.zeros(n, jnp.int32), jnp.full(n, _FROZEN_KEY, jnp.int32)))
  threshold = _per_row(lo, seg)
  above = keys > threshold
  tied = keys == threshold
  need = ks - _count(above, seg, n)

  def lowest_tied():
    # Position of each tied key among its leaf's tied keys, by flat index.
    rank = jnp.cumsum(tied.reshape(-1), dtype=jnp.int32).reshape(tied.shape)
    before = _seg_sum(jnp.sum(tied, axis=1, dtype=jnp.int32), seg, n)
    before = jnp.cumsum(before) - before  # tied keys in earlier leaves
    return tied & (rank - _per_row(before, seg) <= _per_row(need, seg))

  return jax.lax.cond(jnp.any(_count(tied, seg, n) > need),
                      lambda: finish(above | lowest_tied()), lambda: finish(above | tied))


@functools.partial(jax.jit, static_argnames=("bits", "strategy", "unpack"))
def advance(leaves, masks, n1s, ks, key, *, bits, strategy, unpack=True):
  """One INQ step over every quantized leaf; see `inq_jax._state.advance`.

  Args:
    leaves, masks, n1s: per quantized (non-empty) leaf: weights, frozen mask, n1.
    ks: int32 [len(leaves)], each leaf's frozen count after this step.
    key: uint32 [seed, step]; the random partition draws from it (strategy "random").

    unpack: cut the per-leaf arrays out of the packed results here. False:
      return the packed (weights, masks) of each dtype group instead, for
      `split` on the host (see `inq_jax._state.advance`: on CPU that saves the
      one compiled kernel per output array that cutting them here costs).

  Returns:
    (new leaves, new masks, stats) where stats holds three int32 vectors, one
    entry per leaf, measured before the step: the non-finite weights, the
    frozen weights and the frozen weights outside their codebook. The caller
    checks them and discards the step if anything is wrong. With
    `unpack=False` the first two are lists of packed arrays, one per group.
  """
  new_leaves, new_masks = [None] * len(leaves), [None] * len(leaves)
  packed_w, packed_m = [], []
  nonfinite, frozen_count, outside = ([None] * len(leaves) for _ in range(3))
  for g, group in enumerate(groups(leaves)):
    seg, n = _segments(group), len(group.index)
    w = _pack([leaves[i] for i in group.index], group, 0)
    frozen = _pack([masks[i].astype(bool) for i in group.index], group, True)
    n1, n2 = _bounds(n1s, group, seg, bits)
    x = _compute(w)
    pads = jnp.asarray(group.pads, jnp.int32)
    member = _codebook.codebook_exponents(x, n1, n2, xp=jnp)[1]
    stats = (_count(~jnp.isfinite(x), seg, n), _count(frozen, seg, n) - pads,
             _count(frozen & ~member, seg, n))
    if strategy == "magnitude":
      keys = jax.lax.bitcast_convert_type(jnp.abs(x).astype(jnp.float32), jnp.int32)
    else:
      # 30 random bits: strictly below the frozen key, so frozen weights always win.
      step_key = jax.random.fold_in(jax.random.key(key[0]), key[1])
      bits_ = jax.random.bits(jax.random.fold_in(step_key, g), w.shape, jnp.uint32)
      keys = (bits_ >> 2).astype(jnp.int32)
    keys = jnp.where(frozen, _FROZEN_KEY, keys)

    def finish(selected, w=w, frozen=frozen, n1=n1, n2=n2):
      # Earlier frozen weights pass through bit-identical; only new ones are rounded.
      new = selected | frozen
      return jnp.where(new & ~frozen, _codebook.round_to_pow2(w, n1, n2), w), new

    w, new = _select_largest(keys, ks[np.asarray(group.index)] + pads, seg, n, finish)
    for j, i in enumerate(group.index):
      nonfinite[i], frozen_count[i], outside[i] = (s[j:j + 1] for s in stats)
    if not unpack:
      packed_w.append(w)
      packed_m.append(new)
      continue
    for i, a, m in zip(group.index, _unpack(w, group), _unpack(new, group)):
      new_leaves[i], new_masks[i] = a, m
  if not unpack:
    new_leaves, new_masks = packed_w, packed_m
  return new_leaves, new_masks, tuple(
      jnp.concatenate(x) for x in (nonfinite, frozen_count, outside))


# --- verify -------------------------------------------------------------------------


_ZERO_ID = 4096  # the id of the value 0; +-2^k is 4096 +- (k + 2048), in [1, 8191]


@functools.partial(jax.jit, static_argnames=("bits",))
def value_ids(leaves, masks, n1s, *, bits):
  """(int32 value ids, packed per dtype group; per-leaf outside-codebook counts).

  The id of a frozen weight in its codebook names its value, the same in every
  channel: `_ZERO_ID` for 0, `_ZERO_ID +- (k + 2048)` for +-2^k (k >= -1100 in
  float64); 0 for weights that are not frozen or not in the codebook. The
  packed ids come back whole (one transfer per group); `split` cuts them.
  """
  ids, outside = [], [None] * len(leaves)
  for group in groups(leaves):
    seg, n = _segments(group), len(group.index)
    w = _compute(_pack([leaves[i] for i in group.index], group, 0))
    frozen = _pack([masks[i].astype(bool) for i in group.index], group, False)
    n1, n2 = _bounds(n1s, group, seg, bits)
    k, member = _codebook.codebook_exponents(w, n1, n2, xp=jnp)
    value = jnp.where(w == 0, 0, jnp.sign(w).astype(jnp.int32) * (k.astype(jnp.int32) + 2048))
    ids.append(jnp.where(frozen & member, value + _ZERO_ID, 0))
    bad = _count(frozen & ~member, seg, n)
    for jj, i in enumerate(group.index):
      outside[i] = bad[jj:jj + 1]
  return ids, jnp.concatenate(outside)


def split(packed, group: Group):
  """Host side of `_unpack`: the per-leaf numpy views of a packed group."""
  return _unpack(np.asarray(packed), group)


def distinct_and_zeros(ids: np.ndarray) -> Tuple[int, int, int]:
  """(frozen, distinct values, zeros) of one leaf's `value_ids` (host side)."""
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=2 * _ZERO_ID)
  counts[0] = 0  # not frozen
  return int(counts.sum()), int(np.count_nonzero(counts)), int(counts[_ZERO_ID])
