"""Magnitude pruning before INQ: prune, keep the zeros fixed, then quantize the rest.

The paper combines INQ with network pruning (Sec. 3.4, Table 4): the model is
pruned first, the pruned zeros stay fixed, and INQ then quantizes the remaining
weights with finer portions (0.05, 0.1, ..., 0.95, 1.0). This module does the
pruning part as iterative per-layer magnitude pruning with retraining (Han et
al. 2015), the sparsity ramping to its target over `steps` pruning steps on
Zhu & Gupta's cubic schedule. (The paper used dynamic network surgery, Guo et
al. 2016, which can also splice pruned weights back in; here pruning is
monotone: a pruned weight stays pruned.)

    from inq_jax import optim, prune, quantize as inq

    pcfg = prune.PruneConfig(sparsity=0.9, steps=4)
    keep = None
    for t in range(1, pcfg.steps + 1):
      keep = prune.prune_masks(params, pcfg, t, previous=keep)  # True = kept
      params = prune.apply(params, keep)                          # pruned -> +0.0
      tx = optax.chain(base, optim.elementwise_freeze(prune.frozen(keep)))    # zeros stay zero
      ...retrain...
    portions = tuple(round(0.05 * i, 2) for i in range(1, 21))
    state = inq.init(params, inq.INQConfig(bits=5, portions=portions), pruned=keep)

Masks follow one convention throughout: a keep-mask pytree shaped like the
params, with a bool array (True = kept) for every pruned (selected) leaf and a
scalar True for every other leaf. `frozen(keep)` negates it into the frozen-mask
convention of `inq_jax.optim.elementwise_freeze` and `INQState.masks` (True = frozen, scalar
False for leaves never frozen).

References: Zhou et al., ICLR 2017, arXiv:1702.03044, Sec. 3.4; Han et al.,
"Learning both Weights and Connections", NeurIPS 2015; Zhu & Gupta, "To prune,
or not to prune", arXiv:1710.01878; Guo et al., "Dynamic Network Surgery",
NeurIPS 2016.
"""

from __future__ import annotations

import dataclasses
import decimal
import math
import numbers
import re
from typing import Dict, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _checks
from inq_jax import _partition
from inq_jax import tree
from inq_jax._config import DEFAULT_INCLUDE
from inq_jax.tree import leaves_with_paths
from inq_jax.tree import path_str

SCHEDULES = ("cubic", "linear")

Sparsity = Union[float, Tuple[Tuple[str, float], ...]]


def _check_sparsity(value, where: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(f"sparsity must be a float in [0, 1), got {value!r}{where}")
  value = float(value)
  if not 0.0 <= value < 1.0:
    raise ValueError(f"sparsity must be in [0, 1), got {value}{where}")
  return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class PruneConfig:
  """Configuration of iterative magnitude pruning (validated on construction).

  Attributes:
    sparsity: the target fraction of each selected leaf's weights to prune, in
      [0, 1): one float for every leaf, or a sequence of (regex, float) pairs
      (a dict works too) matched with re.search against '/'-joined paths, the
      first matching pair winning. A selected leaf matching no pattern is an
      error; add a catch-all such as ('.*', 0.0) last.
    include: regex selecting the leaves to prune; default: every `kernel`, the
      same leaves INQ quantizes by default.
    exclude: optional regex removing leaves from the selection. Each regex (and
      each sparsity pattern) must match at least one selected leaf.
    steps: number of pruning steps T >= 1 (1: one-shot), each usually followed
      by retraining; the sparsity reaches its target at step T.
    schedule: how the sparsity ramps over the steps. "cubic" (Zhu & Gupta):
      s_t = s_f * (1 - (1 - t/T)^3), pruning much early while many redundant
      weights remain and little near the end; "linear": s_t = s_f * t/T.

  Example:
    >>> cfg = PruneConfig(sparsity=(("Conv_0", 0.3), (".*", 0.9)), steps=4)
    >>> [round(cfg.sparsity_at("Dense_0/kernel", t), 4) for t in range(1, 5)]
    [0.5203, 0.7875, 0.8859, 0.9]

  Reference: arXiv:1702.03044, Sec. 3.4; Zhu & Gupta, arXiv:1710.01878, Eq. 1.
  """

  sparsity: Sparsity
  include: str = DEFAULT_INCLUDE
  exclude: Optional[str] = None
  steps: int = 1
  schedule: str = "cubic"

  def __post_init__(self):
    sparsity = self.sparsity
    if isinstance(sparsity, dict):
      sparsity = tuple(sparsity.items())
    if isinstance(sparsity, (str, bytes)):
      raise TypeError(f"sparsity must be a float in [0, 1) or (regex, float) pairs, got "
                      f"{sparsity!r}")
    if isinstance(sparsity, numbers.Real) and not isinstance(sparsity, bool):
      sparsity = _check_sparsity(sparsity, "")
    elif hasattr(sparsity, "__iter__"):
      pairs = []
      for pair in sparsity:
        if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
          raise TypeError(f"sparsity pairs must be (regex, float), got {pair!r}")
        pattern, value = pair
        tree.check_regex(pattern, "sparsity pattern")
        pairs.append((pattern, _check_sparsity(value, f" for pattern {pattern!r}")))
      if not pairs:
        raise ValueError("sparsity has no (regex, float) pairs; give a float or at least "
                         "one pair, e.g. (('.*', 0.9),)")
      sparsity = tuple(pairs)
    else:
      raise TypeError(f"sparsity must be a float in [0, 1) or (regex, float) pairs, got "
                      f"{sparsity!r}")
    object.__setattr__(self, "sparsity", sparsity)
    tree.check_regex(self.include, "include")
    if self.exclude is not None:
      tree.check_regex(self.exclude, "exclude")
    if isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral):
      raise TypeError(f"steps must be an int >= 1, got {self.steps!r}")
    if self.steps < 1:
      raise ValueError(f"steps must be >= 1, got {self.steps}")
    object.__setattr__(self, "steps", int(self.steps))
    if self.schedule not in SCHEDULES:
      raise ValueError(f"unknown pruning schedule {self.schedule!r}; expected one of "
                       f"{SCHEDULES}")

  @property
  def patterns(self) -> Tuple[str, ...]:
    """The sparsity regexes, in order (empty for a single float)."""
    return tuple(p for p, _ in self.sparsity) if isinstance(self.sparsity, tuple) else ()

  def selects(self, path: str) -> bool:
    """Whether the leaf at '/'-joined `path` is pruned under this config."""
    return tree.matches(path, self.include, self.exclude)

  def target_sparsity(self, path: str) -> float:
    """The final sparsity s_f of the (selected) leaf at `path`."""
    if not isinstance(self.sparsity, tuple):
      return self.sparsity
    for pattern, value in self.sparsity:
      if re.search(pattern, path):
        return value
    raise ValueError(f"{path}: matches none of the sparsity patterns {list(self.patterns)}; "
                     "add a pattern for it (e.g. ('.*', 0.0) last) or exclude it")

  def ramp(self, step: int) -> float:
    """The fraction of the target sparsity reached after pruning step `step`."""
    step = _check_step(step, self.steps)
    if step == self.steps:
      return 1.0
    if self.schedule == "cubic":
      return 1.0 - (1.0 - step / self.steps) ** 3
    return step / self.steps

  def sparsity_at(self, path: str, step: int) -> float:
    """The sparsity of the leaf at `path` after pruning step `step` (1..steps)."""
    return self.target_sparsity(path) * self.ramp(step)


def _check_step(step, steps: int) -> int:
  if isinstance(step, bool) or not isinstance(step, numbers.Integral):
    raise TypeError(f"step must be an int in [1, {steps}], got {step!r}")
  if not 1 <= step <= steps:
    raise ValueError(f"step must be in [1, {steps}] (the config's pruning steps), got "
                     f"{step}")
  return int(step)


def pruned_count(size: int, sparsity: float) -> int:
  """How many of `size` weights a leaf at `sparsity` prunes: floor(sparsity * size).

  The product is taken on the shortest decimal that prints `sparsity` (its repr),
  so floor(0.29 * 100) is 29, not the 28 that float multiplication would give.

  Example:
    >>> pruned_count(100, 0.29), pruned_count(7, 0.5)
    (29, 3)
  """
  return min(size, math.floor(decimal.Decimal(repr(float(sparsity))) * size))


class PruneSummary(NamedTuple):
  """How much of one leaf a keep mask prunes."""
  total: int
  pruned: int

  @property
  def sparsity(self) -> float:
    return self.pruned / self.total if self.total else 0.0


def _selected(params, config: PruneConfig):
  """[(path, leaf, target sparsity)] of the leaves `config` prunes, all checked."""
  chosen = tree.select(params, config.include, config.exclude, what="prune",
                       owner="PruneConfig ")
  for pattern in config.patterns:
    if not any(re.search(pattern, p) for p, _ in chosen):
      raise ValueError(f"sparsity pattern {pattern!r} matches no selected parameter; "
                       f"selected paths: {[p for p, _ in chosen][:6]}")
  out = []
  for path, leaf in chosen:
    _checks.check_float_leaf(path, leaf, "prune")
    out.append((path, leaf, config.target_sparsity(path)))
  return out


def _aligned_masks(params, masks, what: str):
  """[(path, leaf, mask)] in flatten order, with tree, shape and dtype checks."""
  leaves, treedef = tree.aligned(params, masks, what=what, noun="keep mask")
  out = []
  for path, leaf, m in leaves:
    m = jnp.asarray(m)
    if m.dtype != jnp.bool_:
      raise TypeError(f"{what}: {path}: the keep mask must be bool (True = kept), got "
                      f"{m.dtype}")
    out.append((path, leaf, m))
  return out, treedef


def prune_masks(params, config: PruneConfig, step: int, *, previous=None):
  """The keep mask after pruning step `step`: per-layer magnitude pruning.

  Each selected leaf of n weights keeps all but `pruned_count(n, s)` of them,
  s = `config.sparsity_at(path, step)`: the ones pruned are the smallest |w|
  among the weights `previous` still keeps, plus every weight `previous` pruned
  (masks only shrink: a pruned weight stays pruned, even if `params` moved it).
  The threshold is found by the same ~31-pass bit-pattern search as INQ's
  partition, not a sort. Ties in |w| keep the lowest flat index (so the
  highest indices are pruned first): the result is deterministic.

  Args:
    params: the current params (Linen, NNX State or nested dict), e.g. after the
      previous pruning step's retraining.
    config: a `PruneConfig`.
    step: the pruning step, 1..config.steps; the target sparsity is reached at
      `config.steps`.
    previous: the keep mask from the previous step (None before the first).

  Returns:
    A keep-mask pytree shaped like `params`: for each selected leaf a bool array
    of its shape, True = kept; a scalar True for every other leaf. Pass it to
    `apply`, to `frozen` (for `inq_jax.optim.elementwise_freeze`) and, after the last step,
    as `inq_jax.quantize.init(..., pruned=keep)`.

  Raises:
    ValueError/TypeError naming the path or value: a step outside 1..steps, a
    regex or sparsity pattern matching nothing, a selected leaf no sparsity
    pattern matches, a non-float leaf, NaN/Inf weights, a `previous` mask of the
    wrong tree/shape/dtype, pruning more than this step's count, or pruning a
    leaf this config does not select.

  Example:
    >>> keep = prune_masks({"d": {"kernel": jnp.array([0.1, -0.9, 0.5, 0.2])}},
    ...                    PruneConfig(sparsity=0.5), step=1)
    >>> keep["d"]["kernel"]
    Array([False,  True,  True, False], dtype=bool)

  Reference: Han et al. 2015 (magnitude pruning); Zhu & Gupta, arXiv:1710.01878.
  """
  if not isinstance(config, PruneConfig):
    raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
  step = _check_step(step, config.steps)
  chosen = {path: target for path, _, target in _selected(params, config)}
  flat, treedef = leaves_with_paths(params)
  if previous is None:
    prev = [(path, leaf, jnp.ones((), bool)) for path, leaf in flat]
  else:
    prev, _ = _aligned_masks(params, previous, "previous")
  plan = []
  for path, leaf, keep in prev:
    if path not in chosen:
      if keep.ndim and not isinstance(keep, jax.core.Tracer) and not bool(jnp.all(keep)):
        raise ValueError(f"previous: {path} has pruned weights but this PruneConfig does "
                         "not select it; use the config that made `previous`")
      plan.append((path, leaf, None, None))
      continue
    _checks.check_finite(path, leaf)
    size = int(np.prod(jnp.shape(leaf)))
    sparsity = config.sparsity_at(path, step)
    n_pruned = pruned_count(size, sparsity)
    if not isinstance(keep, jax.core.Tracer):
      already = size - int(jnp.sum(jnp.broadcast_to(keep, jnp.shape(leaf))))
      if already > n_pruned:
        raise ValueError(f"{path}: `previous` already prunes {already} of {size} weights, "
                         f"more than step {step}'s floor({sparsity:.6g} * {size}) = "
                         f"{n_pruned}; pass the mask of the previous step of this config")
    plan.append((path, leaf, keep, size - n_pruned))
  out = []
  for path, leaf, keep, n_keep in plan:
    if keep is None:
      out.append(_checks.place_like(jnp.ones((), bool), leaf))
      continue
    keep = jnp.broadcast_to(keep, jnp.shape(leaf))
    mask = _partition.keep_largest(jnp.asarray(leaf), keep, jnp.int32(n_keep))
    out.append(_checks.place_like(mask, leaf))
  return jax.tree_util.tree_unflatten(treedef, out)


def apply(params, keep):
  """Zeroes the pruned weights: +0.0 where `keep` is False, the rest untouched.

  Leaves whose mask is a scalar True come back as they are (the same object).

  Args:
    params: a params pytree.
    keep: a keep-mask pytree from `prune_masks` (True = kept).

  Returns:
    The params with every pruned weight exactly +0.0 (dtypes unchanged).

  Example:
    >>> apply({"k": jnp.array([1.0, -2.0])}, {"k": jnp.array([False, True])})
    {'k': Array([ 0., -2.], dtype=float32)}
  """
  leaves, treedef = _aligned_masks(params, keep, "apply")
  out = []
  for _, leaf, m in leaves:
    if m.ndim == 0 and not isinstance(m, jax.core.Tracer) and bool(m):
      out.append(leaf)
      continue
    x = jnp.asarray(leaf)
    out.append(jnp.where(m, x, jnp.zeros((), x.dtype)))
  return jax.tree_util.tree_unflatten(treedef, out)


def frozen(keep):
  """The frozen masks for `inq_jax.optim.elementwise_freeze` while retraining a pruned model.

  Negates a keep mask: True where a weight is pruned (its update is zeroed, so
  it stays exactly zero through momentum and weight decay), scalar False for the
  leaves never pruned, the same convention as `INQState.masks`.

  Example:
    >>> tx = optax.chain(optax.add_decayed_weights(5e-4),
    ...                  optax.sgd(1e-2, momentum=0.9),
    ...                  inq_jax.optim.elementwise_freeze(frozen(keep)))
  """
  return jax.tree.map(lambda m: jnp.logical_not(jnp.asarray(m, bool)), keep)


def summary(keep) -> Dict[str, PruneSummary]:
  """{path: PruneSummary(total, pruned)} for every leaf with an array keep mask."""
  out = {}
  for p, m in jax.tree_util.tree_flatten_with_path(keep)[0]:
    m = np.asarray(m)
    if m.ndim:
      out[path_str(p)] = PruneSummary(total=int(m.size), pruned=int(m.size - m.sum()))
  return out


__all__ = [
    "PruneConfig", "PruneSummary", "SCHEDULES", "apply", "frozen", "prune_masks",
    "pruned_count", "summary",
]
