"""experiments.models: shapes, forward passes, param naming, param counts.

The big ImageNet nets get their weights from numpy (shapes via jax.eval_shape)
rather than from `init_variables`: XLA:CPU compiles one RNG kernel per weight
shape, which alone would take longer than this whole file. `init_variables`
itself is tested on LeNet and ResNet-20.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models
from inq_jax.quantize import DEFAULT_INCLUDE

# name -> (input shape NHWC, num_classes). Smallest inputs the nets allow, so
# the forward passes stay cheap on CPU: AlexNet needs 63x63 (its last max pool
# then sees 3x3 and outputs 1x1); VGG16 and the ResNets need 32x32 (five
# stride-2 stages). BN models get batch 2 so train-mode batch statistics are
# not degenerate where the feature map is 1x1.
CASES = {
    "lenet": ((2, 28, 28, 1), 10),
    "resnet20": ((2, 32, 32, 3), 10),
    "alexnet": ((1, 63, 63, 3), 1000),
    "vgg16": ((1, 32, 32, 3), 1000),
    "googlenet": ((2, 32, 32, 3), 1000),
    "resnet18": ((2, 32, 32, 3), 1000),
    "resnet50": ((2, 32, 32, 3), 1000),
}
BN_MODELS = {"resnet20", "googlenet", "resnet18", "resnet50"}
DROPOUT_MODELS = {"alexnet", "vgg16", "googlenet"}


@functools.lru_cache(maxsize=None)
def variable_shapes(name):
  shape, num_classes = CASES[name]
  model = models.get_model(name, num_classes)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape), train=False))


def flat(tree):
  """{'a/b/kernel': leaf} over '/'-joined paths, as the quantizer sees them."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def numpy_variables(shapes, seed=0):
  """He-scaled random kernels, small random biases/BN params, random BN stats."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in flat(shapes).items():
    name = path.rsplit("/", 1)[-1]
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    else:  # bias, mean
      value = rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    node = out
    *parents, last = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = jnp.asarray(value)
  return out


def run_compiled(fn, *args):
  """``jax.jit(fn)(*args)``, compiled with XLA's backend optimizations off.

  On 2 CPU cores compilation dominates these tiny forward passes; level 0
  halves it (GoogLeNet ~10 s instead of ~20 s) and the runs stay < 1 s.
  """
  compiled = jax.jit(fn).lower(*args).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return compiled(*args)


def forward_both_modes(model, variables, x):
  """Eval logits, train logits and BN updates from one compiled program."""

  def f(variables, x, key):
    eval_logits = model.apply(variables, x, train=False)
    train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"],
                                        rngs={"dropout": key})
    return eval_logits, train_logits, updates

  return run_compiled(f, variables, x, jax.random.key(1))


def test_registry():
  assert set(models.MODELS) == set(CASES)
  for name in CASES:
    assert isinstance(models.get_model(name, 3), models.MODELS[name])
    assert models.get_model(name, 3).num_classes == 3
  assert models.get_model("lenet", 10, jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="resnet18.*resnet50|resnet50.*resnet18"):
    models.get_model("resnet101", 10)


@pytest.mark.parametrize("name", list(CASES))
def test_forward(name):
  shape, num_classes = CASES[name]
  model = models.get_model(name, num_classes)
  variables = numpy_variables(variable_shapes(name))
  x = jnp.asarray(np.random.default_rng(1).standard_normal(shape, np.float32))
  eval_logits, train_logits, updates = forward_both_modes(model, variables, x)

  for logits in (eval_logits, train_logits):
    assert logits.shape == (shape[0], num_classes)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
  assert float(jnp.std(eval_logits)) > 0  # not a constant output

  if name in BN_MODELS:
    old, new = flat(variables["batch_stats"]), flat(updates["batch_stats"])
    assert old.keys() == new.keys()
    assert all(new[k].shape == old[k].shape for k in old)
    changed = [k for k in old if not np.allclose(old[k], new[k])]
    assert len(changed) == len(old), f"BN stats not updated: {set(old) - set(changed)}"
  else:
    assert "batch_stats" not in variables and not updates.get("batch_stats")
  if name in DROPOUT_MODELS or name in BN_MODELS:
    assert not np.allclose(eval_logits, train_logits)  # train mode does something
  else:
    np.testing.assert_allclose(eval_logits, train_logits, rtol=1e-6)


def test_init_variables():
  model = models.get_model("resnet20", 10)
  variables = models.init_variables(model, (1, 32, 32, 3), jax.random.key(0))
  assert set(variables) == {"params", "batch_stats"}
  expected = variable_shapes("resnet20")
  assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(dict(expected))
  for path, leaf in flat(variables).items():
    assert leaf.shape == flat(expected)[path].shape and leaf.dtype == jnp.float32
    assert np.all(np.isfinite(leaf))
  stats = flat(variables["batch_stats"])
  assert all(np.all(v == 0) for k, v in stats.items() if k.endswith("mean"))
  assert all(np.all(v == 1) for k, v in stats.items() if k.endswith("var"))
  # He-initialised convs (std sqrt(2 / fan_out) = 0.118 for the first conv).
  assert 0.08 < float(jnp.std(variables["params"]["conv1"]["kernel"])) < 0.16
  # Models without BN have no 'batch_stats' (shapes only: same code path).
  assert "batch_stats" not in variable_shapes("lenet")


def test_bfloat16_compute_on_fashion_mnist_shape():
  # ResNet-20 in bfloat16 on 28x28x1 (odd 7x7 map in the last stage).
  model = models.get_model("resnet20", 10, dtype=jnp.bfloat16)
  x = jnp.ones((2, 28, 28, 1))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(shapes))
  logits = run_compiled(lambda v, x: model.apply(v, x), numpy_variables(shapes), x)
  assert logits.shape == (2, 10)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


# Number of conv + dense weights per model: every one must be a `kernel`.
KERNELS = {"lenet": 4, "resnet20": 20, "alexnet": 8, "vgg16": 16,
           "googlenet": 3 + 9 * 6 + 1, "resnet18": 21, "resnet50": 54}


@pytest.mark.parametrize("name", list(CASES))
def test_param_naming(name):
  variables = variable_shapes(name)
  params = flat(variables["params"])
  include = re.compile(DEFAULT_INCLUDE)
  for path, leaf in params.items():
    is_weight = len(leaf.shape) >= 2  # conv HWIO or dense (in, out)
    assert bool(include.search(path)) == is_weight, path
    assert path.endswith("/kernel") == is_weight, path
    if not is_weight:
      assert path.rsplit("/", 1)[-1] in ("bias", "scale"), path
  assert sum(bool(include.search(p)) for p in params) == KERNELS[name]
  stats = flat(variables.get("batch_stats", {}))
  assert bool(stats) == (name in BN_MODELS)
  for path in stats:
    assert path.rsplit("/", 1)[-1] in ("mean", "var"), path
  # Every BN has scale + bias params and mean + var stats, in the same modules.
  bn_modules = {p.rsplit("/", 1)[0] for p in stats}
  assert bn_modules == {p.rsplit("/", 1)[0] for p in params if p.endswith("/scale")}


def test_torchvision_names():
  params = flat(variable_shapes("resnet50")["params"])
  for path in ("conv1/kernel", "bn1/scale", "bn1/bias", "layer1_0/conv3/kernel",
               "layer1_0/downsample_conv/kernel", "layer1_0/downsample_bn/scale",
               "layer4_2/bn3/bias", "fc/kernel", "fc/bias"):
    assert path in params, path
  assert params["conv1/kernel"].shape == (7, 7, 3, 64)
  assert params["layer2_0/conv2/kernel"].shape == (3, 3, 128, 128)  # stride here (v1.5)
  assert params["fc/kernel"].shape == (2048, 1000)
  params18 = flat(variable_shapes("resnet18")["params"])
  assert "layer1_0/downsample_conv/kernel" not in params18  # 64 -> 64, stride 1
  assert params18["layer2_0/downsample_conv/kernel"].shape == (1, 1, 64, 128)


def googlenet_count(batch_norm: bool, num_classes: int = 1000) -> int:
  """Params of Inception v1 from Szegedy et al. 2015, Table 1 (no aux heads)."""
  def conv(cin, cout, k):
    return k * k * cin * cout + 2 * cout if batch_norm else k * k * cin * cout + cout

  total = conv(3, 64, 7) + conv(64, 64, 1) + conv(64, 192, 3)
  cin = 192
  table = [(64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64),
           (192, 96, 208, 16, 48, 64), (160, 112, 224, 24, 64, 64),
           (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
           (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128),
           (384, 192, 384, 48, 128, 128)]
  for c1, r3, c3, r5, c5, pp in table:
    total += (conv(cin, c1, 1) + conv(cin, r3, 1) + conv(r3, c3, 3) + conv(cin, r5, 1)
              + conv(r5, c5, 5) + conv(cin, pp, 1))
    cin = c1 + c3 + c5 + pp
  assert cin == 1024
  return total + 1024 * num_classes + num_classes


@pytest.mark.parametrize("name, expected", [
    # Caffe LeNet: 520 + 25,050 + 400,500 + 5,010.
    ("lenet", 431_080),
    # He et al. 2016, Table 6: ResNet-20 "0.27M" (option A shortcuts).
    ("resnet20", 269_722),
    # torchvision's documented parameter counts (1000 classes).
    ("alexnet", 61_100_840),
    ("vgg16", 138_357_544),
    ("resnet18", 11_689_512),
    ("resnet50", 25_557_032),
    ("googlenet", googlenet_count(batch_norm=True)),
])
def test_param_counts(name, expected):
  assert count(variable_shapes(name)["params"]) == expected


def test_googlenet_without_bn_count():
  model = models.GoogLeNet(num_classes=1000, batch_norm=False)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert "batch_stats" not in shapes
  assert count(shapes["params"]) == googlenet_count(batch_norm=False)  # 6,998,552


def test_adaptive_avg_pool_bins():
  # PyTorch bins: cell i covers [floor(i*n/out), ceil((i+1)*n/out)).
  x = jnp.arange(5.0).reshape(1, 5, 1, 1) * jnp.ones((1, 5, 5, 1))
  y = models.adaptive_avg_pool(x, (3, 2))
  np.testing.assert_allclose(y[0, :, 0, 0], [0.5, 2.0, 3.5])
  # Smaller than the output: replicated (AlexNet/VGG on small inputs).
  z = models.adaptive_avg_pool(jnp.full((1, 1, 1, 4), 3.0), (6, 6))
  assert z.shape == (1, 6, 6, 4) and np.all(z == 3.0)


def test_adaptive_avg_pool_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).standard_normal((2, 13, 9, 3)).astype(np.float32)
  for out in ((6, 6), (7, 7), (4, 5)):
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out)
    got = models.adaptive_avg_pool(jnp.asarray(x), out)
    np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-6)
