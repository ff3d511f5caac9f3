"""`init`: codebooks from the pretrained weights, and how well they fit (`codebook_fit`)."""

from __future__ import annotations

import warnings
from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from inq_jax import _checks
from inq_jax import _codebook
from inq_jax import _packed
from inq_jax import _state
from inq_jax import tree
from inq_jax._checks import first_bad as _first_bad
from inq_jax._checks import show as _show
from inq_jax._config import INQConfig
from inq_jax._state import INQState

# A codebook that rounds more than this share of a layer's pretrained weights to
# zero loses the layer once the last portions are quantized: `init` warns.
MOSTLY_ZERO = 0.5

# Top-level keys of a Flax `variables` dict other than "params".
_FLAX_COLLECTIONS = ("batch_stats", "cache", "intermediates", "losses", "constants",
                     "quantization", "stats")


def init(params, config: INQConfig, *, pruned=None) -> INQState:
  """Starts an INQ run: per-leaf codebooks from the pretrained `params`, no mask set.

  n1 comes from the pretrained max |w| (per layer or per output channel) and stays
  fixed for the whole run; weights that grow past 1.5 * 2^n1 while retraining
  saturate to +-2^n1 when quantized. An all-zero layer (or channel) is legal: its
  codebook is {0}, it quantizes to zeros and `verify` passes.

  Warns (`CodebookFitWarning`, naming each layer and its share) when a codebook
  rounds most of a layer's pretrained weights to zero: the last portions would
  zero that layer, and retraining cannot bring it back. `codebook_fit` gives the
  numbers for every layer.

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
      nested dict of arrays (not the whole Linen `variables`: the optimizer sees
      only the params).
    config: an `INQConfig`.
    pruned: optional keep-mask pytree (True = kept, False = pruned), as returned
      by `inq_jax.prune.prune_masks`: shaped like `params`, a bool array of the
      leaf's shape or a scalar True (nothing pruned) per leaf. Only leaves that
      `config` quantizes may have pruned weights. None: no pruning.

  Returns:
    An `INQState` at step 0.

  Raises:
    ValueError/TypeError naming the parameter path: a whole Linen `variables`
    dict, a regex matching nothing, a selected leaf that is not a float array,
    float64 numpy weights while jax's x64 mode is off (jax would cast them to
    float32 silently), NaN/Inf weights, a layer (or channel) whose nonzero
    weights are all subnormal, or a codebook 2^(n2-1)..2^n1 that the leaf's
    dtype cannot hold as normal numbers (e.g. float16 at 8 bits); with
    `pruned`: a mask of the wrong tree, shape or dtype, a pruned weight that is
    not zero, or pruned weights in a leaf `config` does not quantize. TypeError
    under `jax.jit` or another transformation: `init` runs eagerly (its checks
    need concrete values); call it outside jit.

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
  _check_not_variables(params)
  chosen = _selected(params, config)
  pruned_masks = None if pruned is None else _pruned_masks(params, pruned, config)
  frozen = pruned_masks or {}
  live = [(path, leaf) for path, leaf in chosen if jnp.size(leaf)]
  stats = _packed.init_stats(
      [jnp.asarray(leaf) for _, leaf in live],
      None if pruned_masks is None else
      [frozen.get(path, jnp.zeros((), bool)) for path, _ in live],
      bits=tuple(config.bits_for(path) for path, _ in live),
      channel=config.granularity == "channel",
      mse=config.calibration == "mse") if live else None
  per_leaf, top, n1s = jax.device_get(stats) if live else (np.zeros((0, 4)), (), ())
  found = _codebooks(live, per_leaf, top, n1s, config)
  exponents, checksums, fit, counts = {}, {}, {}, {}
  for path, leaf in chosen:
    shape = tuple(jnp.shape(leaf)[-1:]) if config.granularity == "channel" else ()
    if path in found:
      n1, row = found[path]
    else:  # an empty leaf: the codebook {0}
      n1, row = np.full(shape, _codebook.ZERO_CODEBOOK, np.int64), np.zeros(4, np.int64)
    size = max(int(np.prod(jnp.shape(leaf))), 1)
    exponents[path] = n1.astype(np.int32)
    # The float weights' checksum is first compared after the first advance.
    checksums[path] = _packed.unsigned([row[3], 0])
    fit[path] = np.asarray([row[1] / size, row[2] / size], np.float32)
    if pruned_masks is not None:
      counts[path] = np.int32(np.sum(np.asarray(frozen[path]))) if path in frozen else \
          np.int32(0)
  quantized = [(p, jnp.shape(leaf), jnp.result_type(leaf)) for p, leaf in chosen]
  seal = _state.seal_of(config, quantized, exponents, counts)
  _warn_mostly_zero(config, fit)
  chosen_paths = {p for p, _ in chosen}
  leaf_of = dict(chosen)
  flat, treedef = tree.leaves_with_paths(params)
  # All-False masks from host zeros (jnp.zeros would compile a program per
  # shape), pruned masks as they are; placed like their leaves.
  masks = _checks.put_all(
      [frozen[p] if p in frozen else np.zeros(jnp.shape(leaf) if p in chosen_paths else (), bool)
       for p, leaf in flat], [leaf for _, leaf in flat])
  small = {"exponents": exponents, "checksums": checksums, "fit": fit, "pruned": counts}
  keys = [(field, p) for field, d in small.items() for p in d]
  anchor = chosen[0][1]
  placed = _checks.put_all(
      [small[f][p] for f, p in keys] + [np.zeros((), np.int32), seal],
      [leaf_of[p] for _, p in keys] + [anchor, anchor], replicate=True)
  fields = {f: {} for f in small}
  for (f, p), x in zip(keys, placed):
    fields[f][p] = x
  return INQState(masks=jax.tree_util.tree_unflatten(treedef, masks), step=placed[-2],
                  seal=placed[-1], config=config, **fields)


def _check_not_variables(params) -> None:
  """Raises for a whole Flax `variables` dict ({"params": ..., "batch_stats": ...})."""
  keys = set(params) if isinstance(params, dict) or hasattr(params, "keys") else set()
  others = sorted(k for k in keys if k in _FLAX_COLLECTIONS)
  if "params" in keys and others:
    raise ValueError(
        f"init got a Flax variables dict (top-level keys {sorted(map(str, keys))}); pass "
        "variables['params'] instead: the optimizer and elementwise_freeze see only the "
        f"params, and {others} are not weights to quantize (BatchNorm statistics stay "
        "float and go to export.save(..., extras=...))")


def _selected(params, config: INQConfig):
  """[(path, leaf)] of the leaves `config` quantizes, with every check on them."""
  chosen = tree.select(params, config.include, config.exclude, what="quantize")
  for path, leaf in chosen:
    _checks.check_float_leaf(path, leaf, "quantize")
    if config.granularity == "channel" and jnp.ndim(leaf) < 1:
      raise ValueError(f"{path}: granularity='channel' needs at least one axis, got a "
                       "scalar")
  _state.check_layer_bits(config, {p for p, _ in chosen}, params)
  return chosen


def _codebooks(live, per_leaf, top, n1s, config: INQConfig):
  """{path: (n1, stats row)} for the non-empty quantized leaves, every check on them.

  Raises (naming the path) on NaN/Inf weights, a leaf or channel whose nonzero
  weights are all subnormal, or a codebook the leaf's dtype cannot hold.
  """
  channel = config.granularity == "channel"
  found, end = {}, 0
  for (path, leaf), row in zip(live, per_leaf):
    unit = jnp.shape(leaf)[-1] if channel else 1
    t, n1 = top[end:end + unit], n1s[end:end + unit].astype(np.int64)
    end += unit
    if row[0]:
      _checks.check_finite(path, leaf)
    dtype = jnp.dtype(jnp.result_type(leaf))
    t = t.astype(np.uint64)
    subnormal = (t > 0) & (t < np.uint64(1) << np.uint64(jnp.finfo(dtype).nmant))
    max_abs = t.astype(_codebook.UINT[dtype.itemsize]).view(dtype).astype(np.float64)
    if subnormal.any():
      c = int(np.argwhere(subnormal)[0][0])
      where = f" output channel {c}:" if channel else ""
      raise ValueError(
          f"{path}:{where} every weight is 0 or subnormal (max |w| = {float(max_abs[c])!r} < "
          f"{float(jnp.finfo(dtype).smallest_normal)!r}, the smallest normal {dtype}); "
          "its codebook would be {0} and every weight would be zeroed. Rescale the layer "
          "or exclude it from quantization")
    shape = (unit,) if channel else ()
    n1 = n1.reshape(shape)
    bits = config.bits_for(path)
    n2 = _codebook.n2_from_n1(n1, bits)
    if _codebook.unrepresentable(n1, n2, dtype).any():
      lo, hi = _codebook.dtype_exponent_range(dtype)
      raise ValueError(
          f"{path}: the {bits}-bit codebook 2^{_show(n2)}..2^{_show(n1)} (max |w| "
          f"{_show(max_abs.reshape(shape))}) needs exponents {_show(n2 - 1)}..{_show(n1)}, "
          f"but {dtype} holds normal numbers 2^{lo}..2^{hi}; use fewer bits or a wider dtype")
    found[path] = (n1, np.asarray(row, np.int64))
  return found


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


def _warn_mostly_zero(config: INQConfig, fit: Dict[str, np.ndarray]) -> None:
  bad = sorted(p for p, f in fit.items() if f[0] > MOSTLY_ZERO)
  if not bad:
    return
  layers = ", ".join(f"{p} {100 * float(fit[p][0]):.0f}% ({config.bits_for(p)}-bit)"
                     for p in bad)
  hint = ("try calibration='mse' (each layer's n1 for the least rounding error), more "
          "bits for these layers (layer_bits), or excluding them" if config.calibration ==
          "absmax" else "try more bits for these layers (layer_bits) or excluding them")
  warnings.warn(
      f"the INQ codebooks round most pretrained weights of {len(bad)} layer(s) to zero: "
      f"{layers}. The last portions will zero these layers and retraining cannot bring "
      f"them back; {hint}. inq.codebook_fit(params, state) gives every layer's numbers.",
      _state.CodebookFitWarning, stacklevel=3)


class CodebookFit(NamedTuple):
  """How one layer's codebook fits its weights (rounded all at once, nothing frozen)."""
  bits: int
  n1: object             # int per layer, int array per channel
  zero_share: float      # weights that round to 0
  saturated_share: float # weights with |w| >= 1.5 * 2^n1 (rounded down to +-2^n1)
  relative_error: float  # ||round(w) - w|| / ||w||


def codebook_fit(params, state: INQState) -> Dict[str, CodebookFit]:
  """{path: CodebookFit} for every quantized leaf: what rounding it all at once would do.

  For the params `init` saw, this is how well each layer's codebook fits its
  pretrained weights (`init` warns when most of a layer rounds to zero); for
  later params, how well it fits them now. One compiled program for all layers.

  Example:
    >>> for path, f in inq.codebook_fit(params, state).items():
    ...   print(path, f.bits, f"{f.zero_share:.0%} zeros, error {f.relative_error:.3f}")
  """
  _checks.check_eager("codebook_fit", params, state)
  leaves, _ = _state.aligned(params, state)
  layers = [(path, jnp.asarray(leaf)) for path, leaf, mask in leaves
            if mask is not None and jnp.size(leaf)]
  out = {}
  if layers:
    bounds = [tuple(jnp.asarray(b) for b in state.bounds(p)) for p, _ in layers]
    counts, norms = jax.device_get(_fit_stats([w for _, w in layers], bounds))
    for (path, w), (n1, _), c, (err, norm) in zip(layers, bounds, counts, norms):
      out[path] = CodebookFit(
          bits=state.bits(path), n1=_state.exponent_value(n1),
          zero_share=int(c[0]) / w.size, saturated_share=int(c[1]) / w.size,
          relative_error=float(err) / float(norm) if norm else 0.0)
  for path, leaf, mask in leaves:
    if mask is not None and path not in out:
      out[path] = CodebookFit(state.bits(path), _state.exponent_value(state.exponents[path]),
                              0.0, 0.0, 0.0)
  return out


@jax.jit
def _fit_stats(ws, bounds):
  """(int32 [layers, 2]: zeros, saturated; float32 [layers, 2]: ||round(w) - w||, ||w||)."""
  counts, norms = [], []
  for w, (n1, n2) in zip(ws, bounds):
    x = w.astype(jnp.float32)
    q = _codebook.round_to_pow2(x, n1, n2)
    top = jnp.asarray(1.5, jnp.float32) * jnp.ldexp(jnp.float32(1), n1)
    counts.append(jnp.stack([jnp.sum(q == 0, dtype=jnp.int32),
                             jnp.sum((n1 != _codebook.ZERO_CODEBOOK) & (jnp.abs(x) >= top),
                                     dtype=jnp.int32)]))
    norms.append(jnp.stack([jnp.linalg.norm(q - x), jnp.linalg.norm(x)]))
  return jnp.stack(counts), jnp.stack(norms)
