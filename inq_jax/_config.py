"""INQConfig: what to quantize, to how many bits, on which schedule."""

from __future__ import annotations

import dataclasses
import numbers
import re
from typing import Optional, Tuple

from inq_jax import _codebook
from inq_jax import _partition
from inq_jax import tree

# Flax Linen and NNX both name Dense/Conv/DenseGeneral/Einsum weights "kernel";
# biases, batch-norm scale/bias and embeddings are left float, as in the paper.
DEFAULT_INCLUDE = r"(^|/)kernel$"
GRANULARITIES = ("layer", "channel")
CALIBRATIONS = ("absmax", "mse")


@dataclasses.dataclass(frozen=True, kw_only=True)
class INQConfig:
  """Configuration of an INQ run (validated on construction).

  Attributes:
    bits: codebook bit-width b in [2, 8]: zero plus 2^(b-2) signed powers of two.
    portions: accumulated portions sigma_1 < ... < sigma_N = 1.0 of each layer's
      weights that are quantized and frozen after each step. The paper's 5-bit
      schedule (0.5, 0.75, 0.875, 1.0) is the default.
    strategy: "magnitude" (pruning-inspired: largest |w| first) or "random".
    include: regex (re.search) over '/'-joined parameter paths selecting the
      leaves to quantize; default: every `kernel` (conv and dense weights).
    exclude: optional regex removing leaves from the selection (e.g. the first
      layer). Each regex must match at least one leaf.
    granularity: "layer" (one n1 per layer, the paper) or "channel" (one n1 per
      output channel, i.e. per entry of the last kernel axis; an extension).
    calibration: how n1 is chosen from the pretrained weights: "absmax" (the
      paper: n1 = floor(log2(4 max|w| / 3))) or "mse" (the n1 at or below that
      one with the least squared rounding error, so heavy-tailed layers keep
      their bulk at low bit-widths; an extension, see `mse_exponent_bounds`).
    seed: seeds the "random" partition, in [0, 2**32); every host derives the
      same masks.
    layer_bits: per-layer bit widths, an extension: (regex, bits) pairs (or a
      dict) over '/'-joined parameter paths; the first regex that matches a
      quantized leaf gives its width, `bits` the rest. E.g. the first conv and
      the classifier at 8 bits, the rest at 3: `bits=3, layer_bits={"^conv1/":
      8, "^fc2/": 8}`. Each regex must match a quantized leaf.

  Example:
    >>> cfg = INQConfig(bits=4, portions=(0.3, 0.5, 0.8, 0.9, 0.95, 1.0))
    >>> INQConfig(bits=3, layer_bits={"^conv1/": 8}).bits_for("conv1/kernel")
    8

  Reference: arXiv:1702.03044, Sec. 2 and 3.
  """

  bits: int = 5
  portions: Tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
  strategy: str = "magnitude"
  include: str = DEFAULT_INCLUDE
  exclude: Optional[str] = None
  granularity: str = "layer"
  calibration: str = "absmax"
  seed: int = 0
  layer_bits: Tuple[Tuple[str, int], ...] = ()

  def __post_init__(self):
    _codebook.check_bits(self.bits)
    portions = self.portions
    if isinstance(portions, (str, bytes)) or not hasattr(portions, "__iter__"):
      raise TypeError(f"portions must be a sequence of floats, got {portions!r}")
    portions = tuple(portions)
    if not portions:
      raise ValueError("portions is empty; give accumulated portions ending at 1.0, "
                       "e.g. (0.5, 0.75, 0.875, 1.0)")
    for p in portions:
      if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"portions must hold floats, got {p!r} in {portions}")
      if not 0.0 < p <= 1.0:
        raise ValueError(f"portion {p} in {portions} is outside (0, 1]")
    for a, b in zip(portions, portions[1:]):
      if not a < b:
        raise ValueError(f"portions must be strictly increasing, got {a} then {b} in "
                         f"{portions}")
    if portions[-1] != 1.0:
      raise ValueError(f"portions must end at 1.0 (every weight quantized), got "
                       f"{portions[-1]} last in {portions}")
    object.__setattr__(self, "portions", tuple(float(p) for p in portions))
    _partition.check_strategy(self.strategy, key=0)
    for name in ("include", "exclude"):
      pattern = getattr(self, name)
      if pattern is None and name == "exclude":
        continue
      tree.check_regex(pattern, name)
    if self.granularity not in GRANULARITIES:
      raise ValueError(f"unknown granularity {self.granularity!r}; expected one of "
                       f"{GRANULARITIES}")
    if self.calibration not in CALIBRATIONS:
      raise ValueError(f"unknown calibration {self.calibration!r}; expected one of "
                       f"{CALIBRATIONS}")
    if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
      raise TypeError(f"seed must be an int, got {self.seed!r}")
    # jax.random.key keeps only the low 32 bits of a seed (without x64), so
    # seeds outside uint32 would silently share masks with others.
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"seed must be in [0, 2**32) (a uint32, what jax.random.key "
                       f"keeps), got {self.seed}")
    object.__setattr__(self, "seed", int(self.seed))
    object.__setattr__(self, "layer_bits", _layer_bits(self.layer_bits))

  @property
  def num_steps(self) -> int:
    return len(self.portions)

  def selects(self, path: str) -> bool:
    """Whether the leaf at '/'-joined `path` is quantized under this config."""
    return tree.matches(path, self.include, self.exclude)

  def bits_for(self, path: str) -> int:
    """The bit width of the leaf at '/'-joined `path`: its `layer_bits` entry, or `bits`."""
    for pattern, bits in self.layer_bits:
      if re.search(pattern, path):
        return bits
    return self.bits

  def to_dict(self) -> dict:
    """Plain JSON data (lists for tuples); `INQConfig.from_dict` reads it back."""
    return dataclasses.asdict(self) | {"portions": list(self.portions),
                                       "layer_bits": [list(p) for p in self.layer_bits]}

  @classmethod
  def from_dict(cls, data: dict) -> "INQConfig":
    """The config `to_dict` wrote (unknown keys are refused, missing ones default)."""
    if not isinstance(data, dict):
      raise TypeError(f"INQConfig.from_dict needs a dict, got {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
      raise ValueError(f"INQConfig.from_dict: unknown keys {unknown}; known: {sorted(fields)}")
    data = dict(data)
    if "portions" in data and isinstance(data["portions"], list):
      data["portions"] = tuple(data["portions"])
    if "layer_bits" in data and isinstance(data["layer_bits"], list):
      data["layer_bits"] = tuple(tuple(p) if isinstance(p, list) else p
                                 for p in data["layer_bits"])
    return cls(**data)


def _layer_bits(pairs) -> Tuple[Tuple[str, int], ...]:
  """`layer_bits` as a tuple of (regex, bits) pairs, every one checked."""
  if isinstance(pairs, dict):
    pairs = tuple(pairs.items())
  if isinstance(pairs, (str, bytes)) or not hasattr(pairs, "__iter__"):
    raise TypeError(f"layer_bits must be a dict or a sequence of (regex, bits) pairs, got "
                    f"{pairs!r}")
  out = []
  for pair in pairs:
    if isinstance(pair, (str, bytes)) or not hasattr(pair, "__len__") or len(pair) != 2:
      raise TypeError(f"layer_bits entries must be (regex, bits) pairs, got {pair!r}")
    pattern, bits = pair
    tree.check_regex(pattern, f"layer_bits regex {pattern!r}")
    try:
      bits = _codebook.check_bits(bits)
    except (TypeError, ValueError) as e:
      raise type(e)(f"layer_bits[{pattern!r}]: {e}") from None
    out.append((pattern, bits))
  return tuple(out)
