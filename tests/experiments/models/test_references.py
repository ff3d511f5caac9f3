"""experiments.models against independent definitions of the same architectures.

Each net is written again here in plain PyTorch, from its paper or from the
original authors' code (torchvision's layouts for AlexNet and VGG-16, the
CIFAR ResNet of He et al. 2016 Sec. 4.2 as in the widely used
akamaster/pytorch_resnet_cifar10, Caffe's LeNet, Inception v1 from Szegedy et
al. 2015 Table 1 with the deviations `models.GoogLeNet` documents). Every
weight, bias and BatchNorm running statistic gets a random value; a generic
name mapping turns the torch state into Flax variables, and then:

  * the Flax model's own variable tree must be exactly that tree (every path
    and shape: the parameter shapes come from the reference, not the model);
  * eval-mode logits must match the reference computed in float64, so the
    convolutions' padding and strides, the pooling (max, average, adaptive),
    the shortcuts (ResNet-20's option A), the flatten order, BN in eval mode
    and dropout being off in eval are all checked by value;
  * where torchvision or the paper documents a parameter count, the reference
    itself has it (so the reference is the documented net).

ResNet-18/50 are checked the same way against torchvision's definition in
test_pretrained.py (weights through the state_dict importer, random BN
statistics, logits to 1e-4); their shapes against torchvision's state_dict
there too. Inputs are small (the nets' minimum sizes or a little more, batch
1-3) so that this file stays fast on a 2-core CPU; the big nets' compiles run
with XLA's backend optimizations off, as in test_cnn.py.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import models

torch = pytest.importorskip("torch")
tnn = torch.nn
F = torch.nn.functional

NUM_CLASSES = 7  # the classifier's size does not change the architecture


# ------------------------------------------------------------ references


class TorchLeNet(tnn.Module):
  """Caffe's LeNet (20-50-500) with ReLUs: conv5-pool2-conv5-pool2-fc-fc."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = tnn.Conv2d(1, 20, 5)
    self.conv2 = tnn.Conv2d(20, 50, 5)
    self.fc1 = tnn.Linear(50 * 4 * 4, 500)
    self.fc2 = tnn.Linear(500, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2, 2)
    x = F.relu(self.fc1(torch.flatten(x, 1)))
    return self.fc2(x)


class TorchCifarBlock(tnn.Module):
  """akamaster/pytorch_resnet_cifar10's BasicBlock with option A."""

  def __init__(self, in_planes, planes, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(planes)
    self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(planes)
    if stride != 1 or in_planes != planes:
      # "For CIFAR10 ResNet paper uses option A": subsample, pad planes//4 zero
      # channels on each side.
      self.shortcut = lambda x: F.pad(x[:, :, ::2, ::2],
                                      (0, 0, 0, 0, planes // 4, planes // 4), "constant", 0)
    else:
      self.shortcut = lambda x: x

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + self.shortcut(x))


class TorchResNet20(tnn.Module):
  """He et al. 2016 Sec. 4.2, n = 3: 3x3 conv 16, 3 stages of 3 blocks (16, 32, 64), GAP, fc."""

  def __init__(self, in_channels, num_classes):
    super().__init__()
    self.conv1 = tnn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(16)
    in_planes = 16
    self.blocks = []
    for stage, planes in enumerate((16, 32, 64)):
      for block in range(3):
        stride = 2 if stage > 0 and block == 0 else 1
        name = f"layer{stage + 1}_{block}"
        setattr(self, name, TorchCifarBlock(in_planes, planes, stride))
        self.blocks.append(name)
        in_planes = planes
    self.fc = tnn.Linear(64, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    for name in self.blocks:
      x = getattr(self, name)(x)
    return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TorchAlexNet(tnn.Module):
  """torchvision.models.AlexNet, with the Flax model's layer names."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = tnn.Conv2d(3, 64, 11, 4, 2)
    self.conv2 = tnn.Conv2d(64, 192, 5, padding=2)
    self.conv3 = tnn.Conv2d(192, 384, 3, padding=1)
    self.conv4 = tnn.Conv2d(384, 256, 3, padding=1)
    self.conv5 = tnn.Conv2d(256, 256, 3, padding=1)
    self.fc6 = tnn.Linear(256 * 6 * 6, 4096)
    self.fc7 = tnn.Linear(4096, 4096)
    self.fc8 = tnn.Linear(4096, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 3, 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 3, 2)
    x = F.relu(self.conv3(x))
    x = F.relu(self.conv4(x))
    x = F.max_pool2d(F.relu(self.conv5(x)), 3, 2)
    x = torch.flatten(F.adaptive_avg_pool2d(x, (6, 6)), 1)
    x = F.relu(self.fc6(F.dropout(x, 0.5, self.training)))
    x = F.relu(self.fc7(F.dropout(x, 0.5, self.training)))
    return self.fc8(x)


VGG16_D = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))  # Simonyan & Zisserman, Table 1 D


class TorchVGG16(tnn.Module):
  """torchvision.models.vgg16 (configuration D, no BN), with the Flax model's layer names."""

  def __init__(self, num_classes):
    super().__init__()
    self.convs = []
    cin = 3
    for stage, (features, n) in enumerate(VGG16_D):
      names = []
      for i in range(n):
        name = f"conv{stage + 1}_{i + 1}"
        setattr(self, name, tnn.Conv2d(cin, features, 3, padding=1))
        names.append(name)
        cin = features
      self.convs.append(names)
    self.fc6 = tnn.Linear(512 * 7 * 7, 4096)
    self.fc7 = tnn.Linear(4096, 4096)
    self.fc8 = tnn.Linear(4096, num_classes)

  def forward(self, x):
    for names in self.convs:
      for name in names:
        x = F.relu(getattr(self, name)(x))
      x = F.max_pool2d(x, 2, 2)
    x = torch.flatten(F.adaptive_avg_pool2d(x, (7, 7)), 1)
    x = F.relu(self.fc6(F.dropout(x, 0.5, self.training)))
    x = F.relu(self.fc7(F.dropout(x, 0.5, self.training)))
    return self.fc8(x)


class TorchConvBN(tnn.Module):

  def __init__(self, cin, cout, kernel, stride=1):
    super().__init__()
    self.conv = tnn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
    self.bn = tnn.BatchNorm2d(cout, eps=1e-5)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class TorchInception(tnn.Module):
  """1x1 | 1x1-3x3 | 1x1-5x5 | 3x3/1 max pool-1x1, concatenated in that order."""

  def __init__(self, cin, c1, r3, c3, r5, c5, pool_proj):
    super().__init__()
    self.branch1 = TorchConvBN(cin, c1, 1)
    self.branch2_reduce = TorchConvBN(cin, r3, 1)
    self.branch2 = TorchConvBN(r3, c3, 3)
    self.branch3_reduce = TorchConvBN(cin, r5, 1)
    self.branch3 = TorchConvBN(r5, c5, 5)
    self.branch4 = TorchConvBN(cin, pool_proj, 1)

  def forward(self, x):
    return torch.cat([self.branch1(x), self.branch2(self.branch2_reduce(x)),
                      self.branch3(self.branch3_reduce(x)),
                      self.branch4(F.max_pool2d(x, 3, 1, 1))], 1)


# Szegedy et al. 2015, Table 1: #1x1, #3x3 reduce, #3x3, #5x5 reduce, #5x5, pool proj.
INCEPTION_V1 = (
    ("inception3a", (64, 96, 128, 16, 32, 32)), ("inception3b", (128, 128, 192, 32, 96, 64)),
    "pool",
    ("inception4a", (192, 96, 208, 16, 48, 64)), ("inception4b", (160, 112, 224, 24, 64, 64)),
    ("inception4c", (128, 128, 256, 24, 64, 64)), ("inception4d", (112, 144, 288, 32, 64, 64)),
    ("inception4e", (256, 160, 320, 32, 128, 128)),
    "pool",
    ("inception5a", (256, 160, 320, 32, 128, 128)), ("inception5b", (384, 192, 384, 48, 128, 128)),
)


class TorchGoogLeNet(tnn.Module):
  """Inception v1 with BN after every conv, real 5x5 branches, symmetric-padded 3x3/2 max pools."""

  def __init__(self, num_classes):
    super().__init__()
    self.conv1 = TorchConvBN(3, 64, 7, 2)
    self.conv2 = TorchConvBN(64, 64, 1)
    self.conv3 = TorchConvBN(64, 192, 3)
    cin, self.stages = 192, []
    for spec in INCEPTION_V1:
      if spec == "pool":
        self.stages.append(None)
        continue
      name, (c1, r3, c3, r5, c5, pp) = spec
      setattr(self, name, TorchInception(cin, c1, r3, c3, r5, c5, pp))
      self.stages.append(name)
      cin = c1 + c3 + c5 + pp
    self.fc = tnn.Linear(cin, num_classes)

  def forward(self, x):
    pool = lambda y: F.max_pool2d(y, 3, 2, 1)
    x = pool(self.conv1(x))
    x = pool(self.conv3(self.conv2(x)))
    for name in self.stages:
      x = pool(x) if name is None else getattr(self, name)(x)
    x = F.dropout(x.mean((2, 3)), 0.4, self.training)
    return self.fc(x)


# ------------------------------------------------------------ torch -> Flax


def randomize(net, seed):
  """Random weights (He-scaled), biases, BN affine params and BN running statistics."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, (tnn.Conv2d, tnn.Linear)):
        fan_in = m.weight[0].numel()
        m.weight.normal_(0.0, float(np.sqrt(2.0 / fan_in)))
        if m.bias is not None:
          m.bias.normal_(0.0, 0.1)
      elif isinstance(m, tnn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.3)
        m.running_var.uniform_(0.5, 2.0)
  return net


def to_flax(net, flatten_from=None):
  """Flax variables of `net`: OIHW -> HWIO, (out, in) -> (in, out), BN -> scale/bias/mean/var.

  `flatten_from[name] = (C, H, W)` marks a Linear layer fed by torch's NCHW
  flatten; its rows are reordered to the (H, W, C) order of an NHWC flatten.
  """
  flatten_from = flatten_from or {}
  params, stats = {}, {}

  def put(tree, path, value):
    *parents, leaf = path
    for p in parents:
      tree = tree.setdefault(p, {})
    assert leaf not in tree, path
    tree[leaf] = np.asarray(value.detach().numpy(), np.float32)

  for name, m in net.named_modules():
    path = name.split(".") if name else []
    if isinstance(m, tnn.Conv2d):
      put(params, path + ["kernel"], m.weight.permute(2, 3, 1, 0))
    elif isinstance(m, tnn.Linear):
      w = m.weight
      if name in flatten_from:
        c, h, wd = flatten_from[name]
        w = w.reshape(-1, c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
      put(params, path + ["kernel"], w.T)
    elif isinstance(m, tnn.BatchNorm2d):
      put(params, path + ["scale"], m.weight)
      put(stats, path + ["mean"], m.running_mean)
      put(stats, path + ["var"], m.running_var)
    else:
      continue
    if getattr(m, "bias", None) is not None:
      put(params, path + ["bias"], m.bias)
  return {"params": params, **({"batch_stats": stats} if stats else {})}


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def assert_same_tree(variables, model, x_shape):
  """The model's own variables have exactly the reference's paths and shapes."""
  want = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x_shape), train=False))
  got, want = flat(variables), flat(dict(want))
  assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))
  wrong = {p: (got[p].shape, want[p].shape) for p in want if got[p].shape != want[p].shape}
  assert not wrong, f"shapes (reference, model): {wrong}"


def compiled_eval(model, variables, x):
  """Eval-mode logits, compiled with XLA's backend optimizations off (see test_cnn.py)."""
  fn = lambda v, x: model.apply(v, x, train=False)
  with jax.default_matmul_precision("highest"):
    compiled = jax.jit(fn).lower(variables, x).compile(
        compiler_options={"xla_backend_optimization_level": 0})
  return np.asarray(compiled(variables, x))


def reference_logits(net, x_nhwc, train=False):
  """float64 logits of the torch net on NHWC float32 images."""
  net = net.double().train(train)
  with torch.no_grad():
    out = net(torch.from_numpy(np.asarray(x_nhwc, np.float64).transpose(0, 3, 1, 2)))
  net.float()
  return out.numpy()


def assert_logits_close(got, want, rtol=1e-4):
  assert got.shape == want.shape and got.dtype == np.float32
  scale = np.abs(want).max()
  assert 0.1 < scale < 1e4, scale  # a meaningful, non-degenerate comparison
  assert np.std(want) > 1e-3 * scale  # logits differ between classes / examples
  diff = np.abs(got - want).max()
  assert diff <= rtol * scale, f"max |diff| {diff:.3g}, max |logit| {scale:.3g}"


def images(shape, seed=1):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def count(net):
  return sum(p.numel() for p in net.parameters())


def classifier_size(fan_in, classes):
  return fan_in * classes + classes


# ------------------------------------------------------------ tests


@pytest.mark.parametrize("matmul_conv", [False, True], ids=["xla_conv", "matmul_conv"])
def test_lenet(matmul_conv):
  net = randomize(TorchLeNet(NUM_CLASSES), seed=0)
  # Caffe's LeNet: 431,080 parameters with 10 classes (test_cnn's count).
  assert count(net) - classifier_size(500, NUM_CLASSES) + classifier_size(500, 10) == 431_080
  model = models.LeNet(num_classes=NUM_CLASSES, cpu_matmul_conv=matmul_conv,
                       cpu_select_pool=matmul_conv)
  x = images((3, 28, 28, 1))
  variables = to_flax(net, {"fc1": (50, 4, 4)})
  assert_same_tree(variables, model, x.shape)
  jaxpr = str(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x))
  # The flag picks the path: XLA's convolution, or (on the CPU) matrix products without one.
  matmul_path = matmul_conv and jax.default_backend() == "cpu"
  assert ("conv_general_dilated" in jaxpr) != matmul_path
  assert_logits_close(compiled_eval(model, variables, x), reference_logits(net, x))


@pytest.mark.parametrize("shape", [(2, 32, 32, 3), (2, 27, 27, 1)], ids=["cifar", "odd_27x27"])
def test_resnet20(shape):
  """Option-A shortcuts: the subsampling grid (odd sizes too) and where the zero channels go."""
  net = randomize(TorchResNet20(shape[-1], NUM_CLASSES), seed=1)
  if shape[-1] == 3:
    # He et al. 2016, Table 6: 0.27M parameters; 269,722 with CIFAR's 10 classes.
    assert count(net) - classifier_size(64, NUM_CLASSES) + classifier_size(64, 10) == 269_722
  model = models.ResNet20(num_classes=NUM_CLASSES)
  x = images(shape)
  variables = to_flax(net)
  assert_same_tree(variables, model, x.shape)
  assert_logits_close(compiled_eval(model, variables, x), reference_logits(net, x))


def test_resnet20_train_mode_batch_norm():
  """Train mode normalizes with the batch's statistics and moves the running ones as PyTorch.

  PyTorch's momentum 0.1 is Flax's 0.9. The running variance is the one
  deliberate difference: PyTorch averages in the unbiased batch variance,
  Flax the biased one, so Flax's is compared with PyTorch's rescaled by
  (n - 1) / n.
  """
  shape = (4, 16, 16, 3)
  net = randomize(TorchResNet20(3, NUM_CLASSES), seed=2)
  model = models.ResNet20(num_classes=NUM_CLASSES)
  x = images(shape, seed=3)
  variables = to_flax(net)
  old = flat(variables["batch_stats"])
  fn = lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])
  logits, updates = jax.jit(fn).lower(variables, x).compile(
      compiler_options={"xla_backend_optimization_level": 0})(variables, x)
  want = reference_logits(net, x, train=True)  # updates net's running statistics
  assert_logits_close(np.asarray(logits), want)
  new = flat(updates["batch_stats"])
  ref = flat(to_flax(net)["batch_stats"])
  for path in old:
    if path.endswith("/var"):
      continue
    module = path.rsplit("/", 1)[0]
    # n = batch x H x W of the BN's input: 16x16 in stage 1, 8x8 in 2, 4x4 in 3.
    stage = 1 if module == "bn1" else int(module[len("layer")])
    n = shape[0] * (16 // 2 ** (stage - 1)) ** 2
    np.testing.assert_allclose(new[path], ref[path], rtol=1e-4, atol=1e-5, err_msg=path)
    var = module + "/var"
    unbiased_step = ref[var] - 0.9 * old[var]  # 0.1 * unbiased batch variance
    np.testing.assert_allclose(new[var], 0.9 * old[var] + unbiased_step * (n - 1) / n,
                               rtol=1e-4, atol=1e-5, err_msg=var)
    assert not np.allclose(new[path], old[path])  # the statistics did move


def test_alexnet():
  net = randomize(TorchAlexNet(NUM_CLASSES), seed=4)
  # torchvision: 61,100,840 parameters at 1000 classes.
  assert count(net) - classifier_size(4096, NUM_CLASSES) + classifier_size(4096, 1000) \
      == 61_100_840
  model = models.AlexNet(num_classes=NUM_CLASSES)
  # 127x127: the last max pool leaves 3x3, which the 6x6 adaptive pool spreads
  # over overlapping bins (a 1x1 map would hide the flatten order).
  x = images((1, 127, 127, 3), seed=5)
  variables = to_flax(net, {"fc6": (256, 6, 6)})
  assert_same_tree(variables, model, x.shape)
  assert_logits_close(compiled_eval(model, variables, x), reference_logits(net, x))


def test_vgg16():
  net = randomize(TorchVGG16(NUM_CLASSES), seed=6)
  # torchvision: 138,357,544 parameters at 1000 classes.
  assert count(net) - classifier_size(4096, NUM_CLASSES) + classifier_size(4096, 1000) \
      == 138_357_544
  model = models.VGG16(num_classes=NUM_CLASSES)
  x = images((1, 64, 64, 3), seed=7)  # a 2x2 map before the 7x7 adaptive pool
  variables = to_flax(net, {"fc6": (512, 7, 7)})
  assert_same_tree(variables, model, x.shape)
  assert_logits_close(compiled_eval(model, variables, x), reference_logits(net, x))


def test_googlenet():
  net = randomize(TorchGoogLeNet(NUM_CLASSES), seed=8)
  model = models.GoogLeNet(num_classes=NUM_CLASSES)
  # 64x64: 32 after conv1, then pools to 16, 8 (inception3), 4 (inception4)
  # and 2 (inception5): no stage is 1x1 before the global average.
  x = images((2, 64, 64, 3), seed=9)
  variables = to_flax(net)
  assert_same_tree(variables, model, x.shape)
  assert_logits_close(compiled_eval(model, variables, x), reference_logits(net, x))
