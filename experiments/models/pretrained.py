"""torchvision ResNet-18/50 weights -> Flax variables of experiments.models.

The INQ paper starts from pretrained ImageNet models; this reads a torchvision
``state_dict`` from a local file (nothing is downloaded) into the variables of
``cnn.ResNet18`` / ``cnn.ResNet50``, whose layouts are torchvision's:

  torchvision key                      Flax variable
  conv1.weight          [O, I, H, W] -> params/conv1/kernel        [H, W, I, O]
  bn1.weight / bn1.bias                -> params/bn1/scale, params/bn1/bias
  bn1.running_mean / running_var       -> batch_stats/bn1/mean, batch_stats/bn1/var
  layer2.0.conv1.weight                -> params/layer2_0/conv1/kernel
  layer2.0.downsample.0.weight         -> params/layer2_0/downsample_conv/kernel
  layer2.0.downsample.1.*              -> .../layer2_0/downsample_bn/*
  fc.weight [out, in] / fc.bias        -> params/fc/kernel [in, out], params/fc/bias

``num_batches_tracked`` buffers are ignored and a ``module.`` prefix
(``nn.DataParallel``) is accepted. The mapping is strict: every Flax leaf must
be filled with the right shape and every torchvision key used, otherwise a
ValueError names the offending keys and shapes.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.models import cnn

ARCHS = ("resnet18", "resnet50")

# (block type, blocks per stage) -> torchvision name; used to say which model a
# file holds when it is not the requested one.
_KNOWN_LAYOUTS = {
    ("BasicBlock", (2, 2, 2, 2)): "resnet18",
    ("BasicBlock", (3, 4, 6, 3)): "resnet34",
    ("Bottleneck", (3, 4, 6, 3)): "resnet50",
    ("Bottleneck", (3, 4, 23, 3)): "resnet101",
    ("Bottleneck", (3, 8, 36, 3)): "resnet152",
}

_MAX_LISTED = 20  # keys listed per error group; a wrong file can have hundreds


def load_torchvision_resnet(path: str, arch: str) -> dict:
  """Flax variables of ``cnn.ResNet18``/``ResNet50`` from a torchvision file.

  Args:
    path: a local ``.safetensors`` file (read with safetensors' numpy API, no
      PyTorch needed) or ``.pth``/``.pt`` file (read with
      ``torch.load(..., weights_only=True)``, so no arbitrary unpickling). The
      file holds a ``state_dict`` (optionally wrapped as ``{'state_dict': ...}``
      or ``{'model': ...}``).
    arch: 'resnet18' or 'resnet50'.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` of float32 arrays for
    ``cnn.get_model(arch, num_classes)``, where num_classes is the number of
    rows of ``fc.weight``.

  Raises:
    ValueError: unknown arch or file type, a file holding another ResNet, or
      any missing, unexpected or wrongly shaped key.
    ImportError: a .pth/.pt file without PyTorch installed.
    FileNotFoundError: no such file.
  """
  arch = arch.lower()
  if arch not in ARCHS:
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
  state = _read_state_dict(path)
  _check_arch(state, arch, path)
  if "fc.weight" not in state or state["fc.weight"].ndim != 2:
    got = state["fc.weight"].shape if "fc.weight" in state else "missing"
    raise ValueError(f"{path}: need a 2-D 'fc.weight' [num_classes, features] "
                     f"to size the classifier, got {got}")
  num_classes = int(state["fc.weight"].shape[0])

  expected = _expected_keys(arch, num_classes)
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  wrong = sorted(k for k in set(expected) & set(state)
                 if tuple(state[k].shape) != expected[k][2])
  if missing or unexpected or wrong:
    problems = []
    if missing:
      problems.append("missing keys: " + _listing(
          [f"{k} {expected[k][2]}" for k in missing]))
    if unexpected:
      problems.append("unexpected keys: " + _listing(
          [f"{k} {tuple(state[k].shape)}" for k in unexpected]))
    if wrong:
      problems.append("wrong shapes: " + _listing(
          [f"{k} is {tuple(state[k].shape)}, expected {expected[k][2]}" for k in wrong]))
    raise ValueError(f"{path} does not match torchvision {arch} with {num_classes} "
                     f"classes; " + "; ".join(problems))

  variables: dict[str, Any] = {}
  for key, (collection, flax_path, _, convert) in expected.items():
    node = variables.setdefault(collection, {})
    for name in flax_path[:-1]:
      node = node.setdefault(name, {})
    node[flax_path[-1]] = jnp.asarray(np.ascontiguousarray(convert(state[key]), np.float32))
  return variables


# ------------------------------------------------------------------ reading


def _read_state_dict(path: str) -> dict[str, np.ndarray]:
  """The file's tensors as float32 numpy arrays, without num_batches_tracked."""
  ext = os.path.splitext(path)[1].lower()
  if ext not in (".safetensors", ".pth", ".pt"):
    raise ValueError(f"{path}: expected a .safetensors, .pth or .pt file")
  if not os.path.isfile(path):
    raise FileNotFoundError(path)
  # safetensors and torch are optional dependencies, imported only for a file
  # that needs them.
  if ext == ".safetensors":
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    try:
      raw = safetensors.numpy.load_file(path)
    except TypeError:
      # numpy has no bfloat16; the JAX reader has (via ml_dtypes).
      import safetensors.flax  # pylint: disable=g-import-not-at-top
      raw = safetensors.flax.load_file(path)
  else:
    raw = _torch_load(path)

  state = {}
  for key, value in raw.items():
    # DataParallel checkpoints prefix every key; the layout is otherwise the same.
    key = key[len("module."):] if key.startswith("module.") else key
    if key.endswith("num_batches_tracked"):
      continue  # BN step counter, unused by Flax BatchNorm (fixed momentum)
    value = np.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):  # jnp: knows bfloat16
      raise ValueError(f"{path}: {key} has dtype {value.dtype}, expected floating point")
    state[key] = value.astype(np.float32)
  return state


def _torch_load(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs PyTorch (pip install torch); or convert it "
                      "once to .safetensors, which is read without PyTorch") from e
  # weights_only: tensors and plain containers only, never arbitrary objects.
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "fc.weight" not in obj and "module.fc.weight" not in obj:
    for wrapper in ("state_dict", "model"):
      if isinstance(obj.get(wrapper), dict):
        obj = obj[wrapper]
        break
  if not isinstance(obj, dict):
    raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(obj).__name__}")
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{path}: {key} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    # numpy has no bfloat16; float32 is what the Flax params hold anyway.
    out[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
  return out


# ----------------------------------------------------------------- mapping


def _check_arch(state: dict[str, np.ndarray], arch: str, path: str) -> None:
  """A clear error for a file holding another ResNet than ``arch``."""
  blocks = [set() for _ in range(4)]
  for key in state:
    m = re.match(r"layer([1-4])\.(\d+)\.", key)
    if m:
      blocks[int(m.group(1)) - 1].add(int(m.group(2)))
  if not any(blocks):
    return  # not a ResNet layout at all; the key check lists what is wrong
  block = "Bottleneck" if any(re.fullmatch(r"layer\d\.\d+\.conv3\.weight", k) for k in state) \
      else "BasicBlock"
  counts = tuple(len(b) for b in blocks)
  found = _KNOWN_LAYOUTS.get((block, counts))
  if found is not None and found != arch:
    raise ValueError(f"{path} holds a torchvision {found} state_dict ({block} blocks "
                     f"{list(counts)}), but arch={arch!r}")


@functools.lru_cache(maxsize=None)
def _flax_shapes(arch: str, num_classes: int) -> dict:
  model = cnn.get_model(arch, num_classes)
  # Shapes only: nothing is computed, and they do not depend on the input size.
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                           train=False))


def _expected_keys(arch: str, num_classes: int
                   ) -> dict[str, tuple[str, tuple[str, ...], tuple[int, ...], Callable]]:
  """torchvision key -> (collection, Flax path, torchvision shape, converter)."""
  expected = {}
  leaves = jax.tree_util.tree_flatten_with_path(_flax_shapes(arch, num_classes))[0]
  for key_path, leaf in leaves:
    collection, *flax_path = (k.key for k in key_path)
    torch_key, shape, convert = _torch_name(collection, tuple(flax_path), leaf.shape)
    expected[torch_key] = (collection, tuple(flax_path), shape, convert)
  return expected


_LEAF_NAMES = {("params", "kernel"): "weight", ("params", "scale"): "weight",
               ("params", "bias"): "bias", ("batch_stats", "mean"): "running_mean",
               ("batch_stats", "var"): "running_var"}


def _torch_name(collection: str, flax_path: tuple[str, ...], shape: tuple[int, ...]):
  """torchvision key, torchvision shape and torch->Flax converter of one leaf."""
  parts = []
  for name in flax_path[:-1]:
    m = re.fullmatch(r"(layer\d+)_(\d+)", name)
    if m:
      parts += [m.group(1), m.group(2)]
    elif name == "downsample_conv":
      parts += ["downsample", "0"]
    elif name == "downsample_bn":
      parts += ["downsample", "1"]
    else:
      parts.append(name)
  parts.append(_LEAF_NAMES[(collection, flax_path[-1])])
  if len(shape) == 4:    # conv: torch OIHW <-> Flax HWIO
    h, w, i, o = shape
    return ".".join(parts), (o, i, h, w), lambda a: a.transpose(2, 3, 1, 0)
  if len(shape) == 2:    # linear: torch (out, in) <-> Flax (in, out)
    return ".".join(parts), (shape[1], shape[0]), lambda a: a.T
  return ".".join(parts), tuple(shape), lambda a: a


def _listing(items: list[str]) -> str:
  more = len(items) - _MAX_LISTED
  return ", ".join(items[:_MAX_LISTED]) + (f", ... and {more} more" if more > 0 else "")
