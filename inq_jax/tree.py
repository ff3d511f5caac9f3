"""'/'-joined parameter paths for Linen dicts, NNX States and plain nested dicts.

Also the two tree walks every part of the library shares: choosing leaves by
include/exclude regexes (`select`) and pairing a tree with a mask-like tree of
the same structure (`aligned`), so their checks and error messages are written
once.
"""

from __future__ import annotations

import re
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, FlattenedIndexKey, GetAttrKey, SequenceKey

# NNX wraps every array in a Variable whose child is reached through `.value`;
# that attribute is not part of the name a user would write a regex against.
_VARIABLE_ATTRS = ("value", "raw_value")


def _entry(k) -> str:
  if isinstance(k, DictKey):
    return str(k.key)
  if isinstance(k, SequenceKey):
    return str(k.idx)
  if isinstance(k, GetAttrKey):
    return k.name
  if isinstance(k, FlattenedIndexKey):
    return str(k.key)
  return str(k)


def path_str(path) -> str:
  """('params', 'Conv_0', 'kernel') -> 'params/Conv_0/kernel' (NNX `.value` dropped)."""
  names = [_entry(k) for k in path]
  if path and isinstance(path[-1], GetAttrKey) and names[-1] in _VARIABLE_ATTRS:
    names = names[:-1]
  return "/".join(names)


def check_regex(pattern, name: str) -> str:
  """`pattern` if it is a valid regex string, else a clear TypeError/ValueError."""
  if not isinstance(pattern, str):
    raise TypeError(f"{name} must be a regex string, got {pattern!r}")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{name}={pattern!r} is not a valid regex: {e}") from None
  return pattern


def leaves_with_paths(tree) -> Tuple[List[Tuple[str, Any]], Any]:
  """[(path string, leaf)] in flatten order, and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat], treedef


def matches(path: str, include: str, exclude: Optional[str] = None) -> bool:
  """Whether '/'-joined `path` matches `include` (re.search) and not `exclude`."""
  if not re.search(include, path):
    return False
  return exclude is None or not re.search(exclude, path)


def select(params, include: str, exclude: Optional[str] = None, *,
           what: str = "quantize", owner: str = "") -> List[Tuple[str, Any]]:
  """[(path, leaf)] of the leaves of `params` that `include` minus `exclude` selects.

  Args:
    params: a params pytree.
    include: regex (re.search) over '/'-joined paths; must match some leaf.
    exclude: optional regex removing leaves; must match some leaf if given.
    what: the verb for the error when nothing is left ("quantize", "prune").
    owner: prefix naming the config in errors (e.g. "PruneConfig ").

  Returns:
    The selected (path, leaf) pairs in flatten order (never empty).

  Raises:
    ValueError naming the pattern and example paths when a regex matches no
    parameter or the selection is empty.

  Example:
    >>> select({"d": {"kernel": w, "bias": b}}, r"kernel$")
    [('d/kernel', w)]
  """
  flat, _ = leaves_with_paths(params)
  paths = [p for p, _ in flat]
  for name, pattern in (("include", include), ("exclude", exclude)):
    if pattern is not None and not any(re.search(pattern, p) for p in paths):
      raise ValueError(f"{owner}{name}={pattern!r} matches no parameter; paths look "
                       f"like {paths[:6]}")
  chosen = [(p, leaf) for p, leaf in flat if matches(p, include, exclude)]
  if not chosen:
    raise ValueError(f"{owner}include={include!r} minus exclude={exclude!r} leaves no "
                     f"parameter to {what}; paths look like {paths[:6]}")
  return chosen


def aligned(params, other, *, what: str, noun: str = "mask", hint: str = ""):
  """Pairs each leaf of `params` with the leaf of `other` at the same path.

  `other` must have the params' tree structure; each of its leaves is either a
  scalar (a placeholder standing for the whole leaf) or has the leaf's shape.

  Args:
    params: a params pytree.
    other: a pytree of the same structure (masks, keep masks).
    what: prefix naming `other` in errors ("state", "previous", "pruned").
    noun: what one leaf of `other` is called in errors ("mask", "keep mask").
    hint: appended to the tree-mismatch error.

  Returns:
    `([(path, leaf, other_leaf)] in flatten order, the params' treedef)`.

  Raises:
    ValueError naming the differing paths, or the path and both shapes.
  """
  flat, treedef = leaves_with_paths(params)
  oflat, otreedef = leaves_with_paths(other)
  if treedef != otreedef:
    have, want = {p for p, _ in flat}, {p for p, _ in oflat}
    diff = sorted(have ^ want)
    where = f"; differing paths: {diff[:6]}" if diff else ""
    raise ValueError(f"{what}: the {noun}'s tree does not match params ({len(oflat)} "
                     f"leaves, params have {len(flat)}){where}{hint}")
  out = []
  for (path, leaf), (_, o) in zip(flat, oflat):
    oshape = jnp.shape(o)
    if oshape and oshape != jnp.shape(leaf):
      raise ValueError(f"{what}: {path}: params have shape {jnp.shape(leaf)} but "
                       f"the {noun} has shape {oshape}")
    out.append((path, leaf, o))
  return out, treedef


__all__ = ["aligned", "leaves_with_paths", "matches", "path_str", "select"]
