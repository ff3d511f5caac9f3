"""Every quantized leaf in one packed array per dtype: one compiled program per run.

XLA compiles one program per distinct input signature, so per-leaf kernels mean
dozens of compilations for a ResNet-50, and a program holding one fusion per
leaf is no better: its compile time grows with the number of leaves. Here the
leaves of one dtype are flattened, each padded to a multiple of `BLOCK` and
stacked into one `[blocks, SUB, LANES]` array, so `init`, `advance` and
`verify` are a handful of fusions over that array whatever the model: block b
belongs to leaf `seg[b]`, per-leaf quantities (the partition's k, n1, the bit
width) are gathered per block, and per-leaf results are segment sums over
blocks (see `_partition.count` for why blocks are SUB x LANES).

Padding is weight 0 and frozen: the selection takes it first (its key is the
frozen key), so each leaf's k grows by its padding, and rounding never touches it.

The partition's threshold search reads its keys ~31 times. Over a whole model
the keys do not fit in any cache and every pass would stream them from memory,
so the search runs bin by bin: a bin is a run of whole leaves of at most
`BIN_BLOCKS` blocks, searched in a loop over one fixed-size window (one compiled
body for every bin, so compile time does not grow with the model), and only
leaves larger than a bin are searched in place. Everything else reads the
weights once or twice.

Checksums: every quantized leaf carries two uint32 sums of a hash of (bit
pattern, index in the leaf): over all its frozen weights, and over the
still-float weights among the first LANES of each block (a sample, one
sixteenth of the weights: enough to tell retrained params from untouched
ones, which is all it is for). Sums modulo 2^32 do not depend on the order of
addition, so they are the same on any device count and sharding; +0.0 and
-0.0 hash alike (a frozen zero plus a zero update may change its sign bit).
`inq_jax._state` compares them with the state's to notice frozen weights that
moved and params that were not retrained.

Reference: arXiv:1702.03044, Sec. 2 (the algorithm is unchanged; this is layout).
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _codebook
from inq_jax import _partition
from inq_jax._partition import counts as _counts
from inq_jax._partition import per_block as _per_block
from inq_jax._partition import seg_sum as _seg_sum

SUB, LANES, BLOCK = _partition.SUB, _partition.LANES, _partition.BLOCK
# Blocks of one cache-resident search window: 2^21 weights, 8 MB of int32 keys.
BIN_BLOCKS = (1 << 21) // BLOCK
FROZEN_KEY = _partition.FROZEN_KEY

# XLA:CPU options for these programs: a user waits for their compilation at
# `init`, at the first `advance` and at `verify`. Without the new fusion
# emitters and with one codegen split, the programs compile in about 0.7x the
# time and run as fast; LLVM's optimization level 1 (of 3; the default 2) takes
# another 0.2 s off the advance program's 1.4 s compile, again at the same run
# time: these programs spend their time in memory traffic, not in arithmetic
# that a deeper pass would tighten (ResNet-50 shapes, 2-core CPU;
# docs/performance.md). Other backends compile with their defaults.
CPU_COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False,
                        "xla_cpu_parallel_codegen_split_count": 1,
                        "xla_backend_optimization_level": 1}


def _program(static_argnames):
  """`jax.jit` with `CPU_COMPILER_OPTIONS` when the first array argument lives on a CPU."""
  def wrap(fn):
    plain = jax.jit(fn, static_argnames=static_argnames)
    cpu = jax.jit(fn, static_argnames=static_argnames, compiler_options=CPU_COMPILER_OPTIONS)

    @functools.wraps(fn)
    def call(*args, **kwargs):
      return (cpu if _on_cpu(args) else plain)(*args, **kwargs)
    call.lower = lambda *args, **kwargs: (cpu if _on_cpu(args) else plain).lower(
        *args, **kwargs)
    return call
  return wrap


def _on_cpu(args) -> bool:
  for leaf in jax.tree.leaves(args):
    if isinstance(leaf, jax.Array):
      return next(iter(leaf.devices())).platform == "cpu"
  return jax.default_backend() == "cpu"


# Stats `advance` measures before the step, one int per leaf each (see `advance`).
BEFORE = ("nonfinite", "frozen", "outside", "zeros", "saturated", "frozen_sum", "float_sum")


class Group(NamedTuple):
  """Static layout of the leaves of one dtype (their positions in the leaf list).

  Leaves are packed in `index` order: leaves of at most `BIN_BLOCKS` blocks
  first, in bins of whole leaves, then the larger ones.
  """
  index: Tuple[int, ...]
  shapes: Tuple[Tuple[int, ...], ...]
  blocks: Tuple[int, ...]            # blocks of each leaf
  bins: Tuple[Tuple[int, int], ...]  # (first block, end block) of each bin
  big_start: int                     # first block of the leaves larger than a bin

  @property
  def pads(self):
    return tuple(b * BLOCK - int(np.prod(s)) for b, s in zip(self.blocks, self.shapes))

  @property
  def starts(self):
    return tuple(int(s) for s in np.cumsum((0,) + self.blocks[:-1]))

  @property
  def total_blocks(self) -> int:
    return sum(self.blocks)


def groups(leaves) -> List[Group]:
  """Leaves grouped by dtype, in order of first appearance; every leaf non-empty."""
  by_dtype = {}
  for i, leaf in enumerate(leaves):
    by_dtype.setdefault(jnp.dtype(leaf.dtype), []).append(i)
  return [_layout(leaves, index) for index in by_dtype.values()]


def _blocks(shape) -> int:
  return -(-int(np.prod(shape)) // BLOCK)


def _layout(leaves, index) -> Group:
  small = [i for i in index if _blocks(leaves[i].shape) <= BIN_BLOCKS]
  big = [i for i in index if _blocks(leaves[i].shape) > BIN_BLOCKS]
  bins, start, end = [], 0, 0
  for i in small:
    b = _blocks(leaves[i].shape)
    if end + b - start > BIN_BLOCKS:
      bins.append((start, end))
      start = end
    end += b
  if end > start:
    bins.append((start, end))
  order = tuple(small + big)
  shapes = tuple(tuple(leaves[i].shape) for i in order)
  return Group(order, shapes, tuple(_blocks(s) for s in shapes), tuple(bins), end)


def _pack(arrays, group: Group, fill):
  parts = []
  for a, pad in zip(arrays, group.pads):
    parts.append(jax.lax.reshape(a, (a.size,)))
    if pad:
      parts.append(jax.lax.full((pad,), fill, a.dtype))
  return jax.lax.concatenate(parts, 0).reshape(-1, SUB, LANES)


def _unpack(packed, group: Group):
  """The per-leaf arrays of a packed group (jax arrays in a program, numpy views on the host)."""
  flat, out = packed.reshape(-1), []
  for shape, start in zip(group.shapes, group.starts):
    out.append(flat[start * BLOCK:start * BLOCK + int(np.prod(shape))].reshape(shape))
  return out


def _segments(group: Group):
  """int32 [blocks]: which leaf of the group (its position in `group.index`) each block is.

  Computed in the program (a search of each block among the leaves' first
  blocks) rather than embedded as a constant of one int per block.
  """
  block = jax.lax.iota(jnp.int32, group.total_blocks)
  firsts = np.asarray(group.starts[1:], np.int32)
  if firsts.size * group.total_blocks > (1 << 24):  # too many for one compare each
    return jnp.searchsorted(jnp.asarray(group.starts, jnp.int32), block, side="right",
                            method="scan") - 1
  return jnp.sum(block[:, None] >= firsts[None, :], axis=1, dtype=jnp.int32)


def _local_index(group: Group, seg, rows=SUB):
  """uint32 [blocks, rows, LANES]: each weight's flat index in its own leaf."""
  shape = (group.total_blocks, rows, LANES)
  block = jax.lax.broadcasted_iota(jnp.uint32, shape, 0)
  within = (jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * jnp.uint32(LANES)
            + jax.lax.broadcasted_iota(jnp.uint32, shape, 2))
  first = _per_block(np.asarray(group.starts, np.uint32), seg)
  return (block - first) * jnp.uint32(BLOCK) + within


def _compute(w):
  return w.astype(jnp.float32) if jnp.dtype(w.dtype).itemsize < 4 else w


def _bounds(n1s, bits, group: Group, seg):
  """(n1, n2) broadcastable against the packed group: per block, or per weight.

  `n1s`: per leaf of the leaf list, its n1 (a scalar, or one per output
  channel); or an int32 [leaves of the group] array, in group order.
  """
  shift = _per_block(np.asarray([1 - _codebook.num_exponents(bits[i]) for i in group.index],
                                np.int32), seg)
  if isinstance(n1s, jax.Array):
    n1 = _per_block(n1s.astype(jnp.int32), seg)
  else:
    n1s = [n1s[i] for i in group.index]
    if all(jnp.ndim(n) == 0 for n in n1s):
      n1 = _per_block(jnp.stack(n1s).astype(jnp.int32), seg)
    else:  # one codebook per output channel: broadcast along each leaf
      n1 = _pack([jnp.broadcast_to(n, s).astype(jnp.int32)
                  for n, s in zip(n1s, group.shapes)], group, 0)
  # The empty codebook keeps its marker; its n2 is never used (nothing rounds into it).
  return n1, n1 + shift


class _Codebook(NamedTuple):
  """A packed group's codebook bounds as bit patterns of its compute dtype.

  Non-negative floats order like their bit patterns, so with the magnitude's
  bit pattern `a` of a weight every question below is an integer compare; the
  bounds are made once per block (per weight with per-channel codebooks), the
  only float arithmetic. Valid for codebooks `init` accepts, whose values and
  bin edges are normal numbers.
  """
  lowest: jax.Array    # 2^n2
  highest: jax.Array   # 2^n1
  zero_below: jax.Array  # 2^(n2-1): smaller magnitudes round to 0
  saturate_from: jax.Array  # 1.5 * 2^n1: larger ones round to 2^n1
  real: jax.Array      # False for the codebook {0}


def _codebook_bits(n1, n2, dtype) -> _Codebook:
  """The bounds' bit patterns: 2^k is the biased exponent k + bias in the exponent field."""
  info = jnp.finfo(dtype)
  uint = _codebook.UINT[jnp.dtype(dtype).itemsize]
  bias, nmant = int(info.maxexp) - 1, int(info.nmant)
  # Clipped so that the {0} codebook's marker gives harmless patterns (`real` masks them).
  power = lambda k: jnp.clip(k + bias, 0, 2 * bias + 1).astype(uint) << nmant
  real = n1 != _codebook.ZERO_CODEBOOK
  return _Codebook(power(n2), power(n1), power(n2 - 1),
                   power(n1) | jnp.asarray(1 << (nmant - 1), uint), real)


def _magnitude(x):
  """The bit pattern of |x| (x in its compute dtype, float32 or float64)."""
  itemsize = jnp.dtype(x.dtype).itemsize
  bits = jax.lax.bitcast_convert_type(x, _codebook.UINT[itemsize])
  return bits & jnp.asarray((1 << (8 * itemsize - 1)) - 1, bits.dtype)


def _inf_bits(dtype):
  return jax.lax.bitcast_convert_type(jnp.asarray(np.inf, dtype),
                                      _codebook.UINT[jnp.dtype(dtype).itemsize])


def _classify(a, book: _Codebook, dtype):
  """(non-finite, in the codebook, rounds to 0, saturates): bool arrays from magnitudes `a`."""
  inf = _inf_bits(dtype)
  mantissa = jnp.asarray((1 << (jnp.finfo(dtype).nmant)) - 1, a.dtype)
  power_of_two = (a & mantissa) == 0
  member = (a == 0) | (power_of_two & book.real & (a >= book.lowest) & (a <= book.highest))
  zero = (a <= inf) & (~book.real | (a < book.zero_below))
  saturated = book.real & (a >= book.saturate_from) & (a <= inf)
  return a >= inf, member, zero, saturated


def _round(x, a, book: _Codebook):
  """`_codebook.round_to_pow2` of x (compute dtype, magnitudes `a`) in integer arithmetic.

  The nearest power of two, ties up, is 2^e (e from the exponent field) when
  the mantissa is below 1.5, else 2^(e+1): the exponent field plus the top
  mantissa bit. Clipped to the codebook, zero below 2^(n2-1); NaN stays NaN.
  """
  nmant = jnp.finfo(x.dtype).nmant
  exponent = (a >> nmant) + ((a >> (nmant - 1)) & 1)
  exponent = jnp.clip(exponent, book.lowest >> nmant, book.highest >> nmant)
  magnitude = jnp.where(book.real & (a >= book.zero_below), exponent << nmant, 0)
  sign = jax.lax.bitcast_convert_type(x, a.dtype) & ~jnp.asarray(
      (1 << (8 * jnp.dtype(x.dtype).itemsize - 1)) - 1, a.dtype)
  q = jax.lax.bitcast_convert_type(jnp.where(magnitude == 0, 0, magnitude | sign), x.dtype)
  return jnp.where(a > _inf_bits(x.dtype), x, q)


# --- checksums ------------------------------------------------------------------------

_MIX = (np.uint32(0x9E3779B1), np.uint32(0x85EBCA6B), np.uint32(0xC2B2AE35))


def _hash(w, group: Group, seg, rows=SUB):
  """uint32, shaped like `w`: a hash of each weight's bit pattern and its index in its leaf.

  `w` is [blocks, rows, LANES]: the packed group, or its first `rows` rows of each block.
  """
  itemsize = jnp.dtype(w.dtype).itemsize
  bits = jax.lax.bitcast_convert_type(w, _codebook.UINT[itemsize])
  if itemsize == 8:
    bits = (bits ^ (bits >> 32)).astype(jnp.uint32)
  bits = jnp.where(w == 0, jnp.uint32(0), bits.astype(jnp.uint32))  # +0.0 and -0.0 alike
  index = _local_index(group, seg, rows)
  h = (bits ^ (index * _MIX[0])) * _MIX[1]
  return (h ^ (h >> 15)) * _MIX[2]


def _hash_sums(h, where, seg, n):
  lanes = jnp.sum(jnp.where(where, h, jnp.uint32(0)), axis=1, dtype=jnp.uint32)
  return _seg_sum(jnp.sum(lanes, axis=1, dtype=jnp.uint32), seg, n)


def _checksums(w, frozen, valid, group: Group, seg, n):
  """int32 [n, 2] (uint32 bit patterns): hash sums of the frozen and of the sampled float weights."""
  full = _hash_sums(_hash(w, group, seg), frozen & valid, seg, n)
  head = lambda a: a[:, :1]  # the first LANES of each block
  h = _hash(head(w), group, seg, rows=1)
  sample = _hash_sums(h, head(~frozen & valid), seg, n)
  return jnp.stack([_as_int(full), _as_int(sample)], axis=1)


def checksum_reference(w: np.ndarray, where: np.ndarray, sampled: bool = False) -> int:
  """numpy: the checksum `_checksums` computes for one leaf (for tests and messages).

  `sampled`: only the weights at flat indices i with i % BLOCK < LANES count.
  """
  w = np.asarray(w)
  where = np.broadcast_to(np.asarray(where, bool), w.shape).ravel()
  if sampled:
    where = where & (np.arange(where.size) % BLOCK < LANES)
  w = w.ravel()
  bits = w.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[w.dtype.itemsize])
  if w.dtype.itemsize == 8:
    bits = bits ^ (bits >> np.uint64(32))
  bits = np.where(w == 0, 0, bits).astype(np.uint32)
  index = np.arange(w.size, dtype=np.uint32)
  with np.errstate(over="ignore"):
    h = (bits ^ (index * _MIX[0])) * _MIX[1]
    h = (h ^ (h >> np.uint32(15))) * _MIX[2]
  return int(np.sum(h[where], dtype=np.uint32))


# --- init -----------------------------------------------------------------------------


def _top_bits(w):
  # The largest |w| as a bit pattern: integer compares are immune to the
  # flush-to-zero that makes a float max of subnormals read as 0.
  bits = jax.lax.bitcast_convert_type(w, _codebook.UINT[jnp.dtype(w.dtype).itemsize])
  return bits & ~jnp.asarray(1 << (8 * jnp.dtype(w.dtype).itemsize - 1), bits.dtype)


def _from_bits(bits, dtype):
  return jax.lax.bitcast_convert_type(bits, dtype)


@_program(("bits", "channel", "mse"))
def init_stats(leaves, frozen, *, bits, channel, mse):
  """What `init` needs from the pretrained weights, in one program.

  Args:
    leaves: the quantized (non-empty) leaves.
    frozen: None, or per leaf a bool mask of its pruned weights (or a scalar False).
    bits: per leaf, its codebook's bit width (static).
    channel: one codebook per output channel instead of one per leaf.
    mse: calibration "mse" instead of "absmax".

  Returns:
    (per_leaf, top, n1): per_leaf is int32 [leaves, 4]: non-finite weights,
    weights the codebook rounds to 0, weights it saturates, and the checksum of
    the frozen (pruned) weights (the uint32 sum's bit pattern; 0 without
    `frozen`); top (the largest |w| as a bit pattern, one unsigned type) and
    n1 have one entry per codebook, i.e. per leaf or, with `channel`, per
    output channel, leaf after leaf.
  """
  top, n1 = [None] * len(leaves), [None] * len(leaves)  # per channel: per leaf
  per_group, tops_g, n1_g = [], [], []
  group_list = groups(leaves)
  for group in group_list:
    codebooks = [None] * len(leaves)  # n1 per leaf: a scalar, or one per output channel
    seg, n = _segments(group), len(group.index)
    ws = [leaves[i] for i in group.index]
    packed = _pack(ws, group, 0)
    if channel:
      # Per-channel reductions stay per leaf (a channel is strided in the packed blocks).
      for j, (i, w) in enumerate(zip(group.index, ws)):
        axes = tuple(range(w.ndim - 1))
        top[i] = jnp.max(_top_bits(w), axis=axes)
        n1[i] = codebooks[i] = (
            _codebook.mse_exponent_bounds(w, bits[i], axes)[0] if mse else
            _codebook.top_exponent(_compute(_from_bits(top[i], w.dtype))))
    else:
      tops = _partition.seg_max(_partition.block_max(_top_bits(packed)), seg, n)
      n1_max = _codebook.top_exponent(_compute(_from_bits(tops, packed.dtype)))
      shift = _per_block(np.asarray([1 - _codebook.num_exponents(bits[i])
                                     for i in group.index], np.int32), seg)
      best = n1_max if not mse else _codebook.mse_search(
          _compute(packed), n1_max, shift, lambda v: _per_block(v, seg),
          lambda err: _seg_sum(jnp.sum(err, axis=(1, 2)), seg, n))
      tops_g.append(tops)
      n1_g.append(best)
      codebooks = best
    n1b, n2b = _bounds(codebooks, bits, group, seg)
    x = _compute(packed)
    nonfinite, _, zero, saturated = _classify(_magnitude(x), _codebook_bits(n1b, n2b, x.dtype),
                                              x.dtype)
    pads = jnp.asarray(group.pads, jnp.int32)
    counts = _counts([nonfinite, zero, saturated], seg, n)
    if frozen is None:  # nothing pruned: nothing frozen to sum
      sums = jnp.zeros((n, 1), jnp.int32)
    else:
      frozen_p = _pack([jnp.broadcast_to(frozen[i], leaves[i].shape) for i in group.index],
                       group, False)
      sums = _checksums(packed, frozen_p, _valid(group, seg), group, seg, n)[:, :1]
    per_group.append(jnp.concatenate(
        [counts - jnp.stack([0 * pads, pads, 0 * pads], axis=1), sums], axis=1))
  per_leaf = _in_leaf_order(per_group, group_list)
  if channel:
    return per_leaf, jnp.concatenate(top), jnp.concatenate(n1)
  return per_leaf, _in_leaf_order(tops_g, group_list), _in_leaf_order(n1_g, group_list)


def _in_leaf_order(per_group, group_list):
  """Rows of per-group [leaves of the group, ...] arrays, in the order of the leaf list."""
  order = np.argsort(np.concatenate([g.index for g in group_list]), kind="stable")
  stacked = jnp.concatenate(per_group) if len(per_group) > 1 else per_group[0]
  return stacked if np.array_equal(order, np.arange(order.size)) else stacked[order]


def _valid(group: Group, seg):
  """bool [blocks, SUB, LANES]: True for weights, False for the padding after each leaf."""
  return _local_index(group, seg) < _per_block(
      np.asarray([int(np.prod(s)) for s in group.shapes], np.uint32), seg)


def _as_int(u):
  return jax.lax.bitcast_convert_type(u, jnp.int32)


# --- advance --------------------------------------------------------------------------


def _thresholds(keys, ks, seg, group: Group):
  """Per leaf: the k-th largest key (k = ks[leaf]) and its `_partition.tally`, bin by bin.

  See the module doc; the tally is counted while a bin's keys are in cache.
  """
  n = len(group.index)
  threshold, tallied = jnp.zeros(n, jnp.int32), jnp.zeros((n, 2), jnp.int32)
  small = sum(b <= BIN_BLOCKS for b in group.blocks)  # leaves packed into bins come first
  if group.bins:
    window = max(end - start for start, end in group.bins)
    firsts = jnp.asarray(np.asarray([s for s, _ in group.bins], np.int32))
    starts = np.asarray(group.starts)
    leaf_bin = np.full(n, -1, np.int32)
    for b, (start, end) in enumerate(group.bins):
      leaf_bin[(starts >= start) & (starts < end)] = b
    leaf_bin = jnp.asarray(leaf_bin)

    def one_bin(b, carry):
      # dynamic_slice clamps a window that would run past the end to end there:
      # it still covers the bin, and blocks of other leaves in it are inactive.
      threshold, tallied = carry
      first = firsts[b]
      k = jax.lax.dynamic_slice(keys, (first, 0, 0), (window, SUB, LANES))
      s = jax.lax.dynamic_slice(seg, (first,), (window,))
      active = leaf_bin == b
      t = _partition.search(k, ks, s, n, active)
      return (jnp.where(active, t, threshold),
              jnp.where(active[:, None], _partition.tally(k, t, s, n), tallied))

    threshold, tallied = jax.lax.fori_loop(0, len(group.bins), one_bin, (threshold, tallied))
  if group.big_start < group.total_blocks:
    big = jnp.asarray(np.arange(n) >= small)
    k, s = keys[group.big_start:], seg[group.big_start:]
    t = _partition.search(k, ks, s, n, big)
    threshold = jnp.where(big, t, threshold)
    tallied = jnp.where(big[:, None], _partition.tally(k, t, s, n), tallied)
  return threshold, tallied


def _random_keys(group: Group, seg, leaf_ids, seed_step):
  """30 random bits per weight from (seed, step, leaf, index in leaf); below the frozen key.

  Counter-based, so a leaf's draw does not depend on how the leaves are packed.
  """
  index = _local_index(group, seg)
  salt = seed_step[0] * _MIX[2] ^ seed_step[1] * _MIX[1]
  x = index ^ (_per_block(leaf_ids, seg) * _MIX[0]) ^ salt
  for mult in (np.uint32(0x7FEB352D), np.uint32(0x846CA68B)):  # a 32-bit finalizer
    x = (x ^ (x >> 16)) * mult
  x = x ^ (x >> 16)
  return (x >> 2).astype(jnp.int32)


@_program(("bits", "strategy", "unpack"))
def advance(leaves, masks, n1s, ks, seed_step, *, bits, strategy, unpack=True):
  """One INQ step over every quantized leaf; see `inq_jax._state.advance`.

  Args:
    leaves, masks, n1s: per quantized (non-empty) leaf: weights, frozen mask, n1.
    ks: int32 [len(leaves)], each leaf's frozen count after this step.
    seed_step: uint32 [seed, step]; the random partition draws from it.
    bits: per leaf, its codebook's bit width (static).
    strategy: "magnitude" or "random" (static).
    unpack: cut the per-leaf arrays out of the packed results here. False:
      return the packed (weights, masks) of each dtype group instead, for
      `split` on the host (see `inq_jax._state.advance`: on CPU that saves the
      one compiled kernel per output array that cutting them here costs).

  Returns:
    (new leaves, new masks, before, after). `before` is int32 [leaves,
    len(BEFORE)], measured before the step: non-finite weights, frozen weights,
    frozen weights outside their codebook, weights that round to 0, weights that
    saturate, and the checksums of the frozen and the still-float weights.
    `after` is int32 [leaves, 2]: the checksums after the step. The caller
    checks them and discards the step if anything is wrong. With `unpack=False`
    the first two are lists of packed arrays, one per group.
  """
  new_leaves, new_masks = [None] * len(leaves), [None] * len(leaves)
  packed_w, packed_m = [], []
  before, after = [], []
  for group in groups(leaves):
    seg, n = _segments(group), len(group.index)
    w = _pack([leaves[i] for i in group.index], group, 0)
    frozen = _pack([masks[i].astype(bool) for i in group.index], group, True)
    n1, n2 = _bounds(n1s, bits, group, seg)
    x = _compute(w)
    pads = jnp.asarray(group.pads, jnp.int32)
    valid = _valid(group, seg)
    a = _magnitude(x)
    book = _codebook_bits(n1, n2, x.dtype)
    nonfinite, member, zero, saturated = _classify(a, book, x.dtype)
    counts = _counts([nonfinite, frozen, frozen & ~member, zero, saturated], seg, n)
    stats = jnp.concatenate([counts - jnp.stack([0 * pads, pads, 0 * pads, pads, 0 * pads], 1),
                             _checksums(w, frozen, valid, group, seg, n)], axis=1)
    if strategy == "magnitude":  # |w| as float32, whose bit patterns order like it
      keys = (a if x.dtype == jnp.float32 else _magnitude(jnp.abs(x).astype(jnp.float32))
              ).astype(jnp.int32)
    else:
      keys = _random_keys(group, seg, np.asarray(group.index, np.uint32), seed_step)
    keys = jnp.where(frozen, FROZEN_KEY, keys)
    k = ks[np.asarray(group.index)] + pads
    threshold, tallied = _thresholds(keys, k, seg, group)
    selected = _partition.take(keys, threshold, k, tallied, seg, n)
    # Earlier frozen weights pass through bit-identical; only new ones are rounded.
    new = selected | frozen
    w = jnp.where(new & ~frozen, _round(x, a, book).astype(w.dtype), w)
    done = _checksums(w, new, valid, group, seg, n)
    before.append(stats)
    after.append(done)
    if not unpack:
      packed_w.append(w)
      packed_m.append(new)
      continue
    for i, a, m in zip(group.index, _unpack(w, group), _unpack(new, group)):
      new_leaves[i], new_masks[i] = a, m
  if not unpack:
    new_leaves, new_masks = packed_w, packed_m
  group_list = groups(leaves)
  return (new_leaves, new_masks, _in_leaf_order(before, group_list),
          _in_leaf_order(after, group_list))


# --- verify ---------------------------------------------------------------------------


_ZERO_ID = 4096  # the id of the value 0; +-2^k is 4096 +- (k + 2048), in [1, 8191]


@_program(("bits",))
def value_ids(leaves, masks, n1s, *, bits):
  """(int32 value ids, packed per dtype group; int32 [leaves, 2]: outside count, checksum).

  The id of a frozen weight in its codebook names its value, the same in every
  channel: `_ZERO_ID` for 0, `_ZERO_ID +- (k + 2048)` for +-2^k (k >= -1100 in
  float64); 0 for weights that are not frozen or not in the codebook. The
  packed ids come back whole (one transfer per group); `split` cuts them. The
  second result holds, per leaf, its frozen weights outside the codebook and
  the checksum of its frozen weights.
  """
  ids, stats = [], []
  for group in groups(leaves):
    seg, n = _segments(group), len(group.index)
    raw = _pack([leaves[i] for i in group.index], group, 0)
    w = _compute(raw)
    frozen = _pack([masks[i].astype(bool) for i in group.index], group, False)
    n1, n2 = _bounds(n1s, bits, group, seg)
    a = _magnitude(w)
    _, member, _, _ = _classify(a, _codebook_bits(n1, n2, w.dtype), w.dtype)
    k = (a >> jnp.finfo(w.dtype).nmant).astype(jnp.int32) - (jnp.finfo(w.dtype).maxexp - 1)
    value = jnp.where(w == 0, 0, jnp.sign(w).astype(jnp.int32) * (k + 2048))
    ids.append(jnp.where(frozen & member, value + _ZERO_ID, 0))
    valid = _valid(group, seg)
    per_leaf = jnp.concatenate([_counts([frozen & ~member], seg, n),
                                _checksums(raw, frozen, valid, group, seg, n)[:, :1]], axis=1)
    stats.append(per_leaf)
  return ids, _in_leaf_order(stats, groups(leaves))


def split(packed, group: Group):
  """Host side of `_unpack`: the per-leaf numpy views of a packed group."""
  return _unpack(np.asarray(packed), group)


def distinct_and_zeros(ids: np.ndarray) -> Tuple[int, int, int]:
  """(frozen, distinct values, zeros) of one leaf's `value_ids` (host side)."""
  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=2 * _ZERO_ID)
  counts[0] = 0  # not frozen
  return int(counts.sum()), int(np.count_nonzero(counts)), int(counts[_ZERO_ID])


def unsigned(sums) -> np.ndarray:
  """The uint32 checksums of an int32 array of their bit patterns (host side)."""
  return np.asarray(sums, np.int32).view(np.uint32)
