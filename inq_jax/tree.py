"""'/'-joined parameter paths for Linen dicts, NNX States and plain nested dicts."""

from __future__ import annotations

from typing import Any, List, Tuple

import jax
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


def leaves_with_paths(tree) -> Tuple[List[Tuple[str, Any]], Any]:
  """[(path string, leaf)] in flatten order, and the treedef."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return [(path_str(p), leaf) for p, leaf in flat], treedef
