"""experiments.models.pretrained: torchvision ResNet state_dicts -> Flax variables.

The parity tests build torchvision's ResNet-18/50 in PyTorch (torchvision
itself is not installable next to this torch, so the few classes are copied
here with torchvision's module names), give every weight AND every BN running
statistic random values, and compare logits with the Flax model. The other
tests write torchvision-named numpy state_dicts and need no PyTorch.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from experiments import models
from experiments.models import pretrained

NUM_CLASSES = 7  # small classifier: the mapping is the same for 1000


def torchvision_shapes(arch, num_classes):
  """key -> shape of torchvision's resnet18/50 state_dict (torchvision/models/resnet.py)."""
  bottleneck = arch == "resnet50"
  stages, expansion = ((3, 4, 6, 3), 4) if bottleneck else ((2, 2, 2, 2), 1)
  shapes = {}

  def bn(prefix, c):
    for name in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{name}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  shapes["conv1.weight"] = (64, 3, 7, 7)
  bn("bn1", 64)
  inplanes = 64
  for i, blocks in enumerate(stages):
    planes = 64 * 2 ** i
    for j in range(blocks):
      p, stride = f"layer{i + 1}.{j}", (2 if i > 0 and j == 0 else 1)
      if bottleneck:
        shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
        bn(f"{p}.bn1", planes)
        shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
        shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
        bn(f"{p}.bn3", planes * 4)
      else:
        shapes[f"{p}.conv1.weight"] = (planes, inplanes, 3, 3)
        bn(f"{p}.bn1", planes)
        shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
        bn(f"{p}.bn2", planes)
      if stride != 1 or inplanes != planes * expansion:
        shapes[f"{p}.downsample.0.weight"] = (planes * expansion, inplanes, 1, 1)
        bn(f"{p}.downsample.1", planes * expansion)
      inplanes = planes * expansion
  shapes["fc.weight"] = (num_classes, 512 * expansion)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def numpy_state(arch, num_classes=NUM_CLASSES, seed=0):
  rng = np.random.default_rng(seed)
  state = {}
  for key, shape in torchvision_shapes(arch, num_classes).items():
    if key.endswith("num_batches_tracked"):
      state[key] = np.array(12345, np.int64)
    elif key.endswith("running_var"):
      state[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      state[key] = rng.standard_normal(shape).astype(np.float32)
  return state


def write(tmp_path, state, name="w.safetensors"):
  path = str(tmp_path / name)
  save_file(state, path)
  return path


def flat(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(k.key for k in path): leaf for path, leaf in leaves}


def test_reference_key_counts():
  # len(torchvision.models.resnet18().state_dict()) == 122, resnet50: 320.
  assert len(torchvision_shapes("resnet18", 1000)) == 122
  assert len(torchvision_shapes("resnet50", 1000)) == 320


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_safetensors_mapping(tmp_path, arch):
  state = numpy_state(arch)
  variables = pretrained.load_torchvision_resnet(write(tmp_path, state), arch)
  assert set(variables) == {"params", "batch_stats"}

  # Same tree, shapes and dtypes as the model's own init.
  model = models.get_model(arch, NUM_CLASSES)
  expected = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  got, want = flat(variables), flat(expected)
  assert got.keys() == want.keys()
  for path in want:
    assert got[path].shape == want[path].shape and got[path].dtype == jnp.float32, path

  p, s = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(p["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["bn1"]["scale"], state["bn1.weight"])
  np.testing.assert_array_equal(p["bn1"]["bias"], state["bn1.bias"])
  np.testing.assert_array_equal(s["bn1"]["mean"], state["bn1.running_mean"])
  np.testing.assert_array_equal(s["bn1"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(p["layer2_0"]["downsample_conv"]["kernel"][0, 0],
                                state["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(s["layer3_0"]["downsample_bn"]["var"],
                                state["layer3.0.downsample.1.running_var"])
  np.testing.assert_array_equal(p["layer4_1"]["conv2"]["kernel"][1, 2, 5, 9],
                                state["layer4.1.conv2.weight"][9, 5, 1, 2])
  np.testing.assert_array_equal(p["fc"]["kernel"], state["fc.weight"].T)
  np.testing.assert_array_equal(p["fc"]["bias"], state["fc.bias"])


def test_module_prefix(tmp_path):
  state = numpy_state("resnet18")
  plain = pretrained.load_torchvision_resnet(write(tmp_path, state), "resnet18")
  prefixed = {f"module.{k}": v for k, v in state.items()}
  loaded = pretrained.load_torchvision_resnet(write(tmp_path, prefixed, "dp.safetensors"),
                                              "ResNet18")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, plain)


def test_num_classes_from_fc(tmp_path):
  state = numpy_state("resnet18", num_classes=3)
  variables = pretrained.load_torchvision_resnet(write(tmp_path, state), "resnet18")
  assert variables["params"]["fc"]["kernel"].shape == (512, 3)


def test_missing_key(tmp_path):
  state = numpy_state("resnet18")
  del state["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing keys: layer3\.1\.bn2\.running_var \(256,\)"):
    pretrained.load_torchvision_resnet(write(tmp_path, state), "resnet18")


def test_wrong_shape(tmp_path):
  state = numpy_state("resnet18")
  state["layer1.0.conv2.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"layer1\.0\.conv2\.weight is \(64, 64, 1, 1\), "
                                       r"expected \(64, 64, 3, 3\)"):
    pretrained.load_torchvision_resnet(write(tmp_path, state), "resnet18")


def test_unexpected_key(tmp_path):
  state = numpy_state("resnet18")
  state["fc2.weight"] = np.zeros((3, 4), np.float32)
  with pytest.raises(ValueError, match=r"unexpected keys: fc2\.weight \(3, 4\)"):
    pretrained.load_torchvision_resnet(write(tmp_path, state), "resnet18")


def test_wrong_arch(tmp_path):
  path = write(tmp_path, numpy_state("resnet50"))
  with pytest.raises(ValueError, match=r"holds a torchvision resnet50 .* arch='resnet18'"):
    pretrained.load_torchvision_resnet(path, "resnet18")
  with pytest.raises(ValueError, match="arch must be one of"):
    pretrained.load_torchvision_resnet(path, "resnet34")


def test_bad_files(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match=r"\.safetensors, \.pth or \.pt"):
    pretrained.load_torchvision_resnet(str(tmp_path / "w.npz"), "resnet18")
  with pytest.raises(FileNotFoundError):
    pretrained.load_torchvision_resnet(str(tmp_path / "nope.safetensors"), "resnet18")
  # .pth without PyTorch: a clear ImportError (a None entry makes `import torch` fail).
  pth = tmp_path / "w.pth"
  pth.write_bytes(b"not read")
  monkeypatch.setitem(sys.modules, "torch", None)
  with pytest.raises(ImportError, match="needs PyTorch.*safetensors"):
    pretrained.load_torchvision_resnet(str(pth), "resnet18")


# ------------------------------------------------------------ PyTorch parity


def torch_resnet(arch, num_classes):
  """torchvision's ResNet-18/50 (v1.5), same module names, built with plain torch."""
  torch = pytest.importorskip("torch")
  nn = torch.nn

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.relu = nn.ReLU(inplace=True)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      return self.relu(self.bn2(self.conv2(out)) + identity)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      return self.relu(self.bn3(self.conv3(out)) + identity)

  class ResNet(nn.Module):

    def __init__(self, block, layers, num_classes):
      super().__init__()
      self.inplanes = 64
      self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
      self.bn1 = nn.BatchNorm2d(64)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, 2, 1)
      self.layer1 = self._make_layer(block, 64, layers[0])
      self.layer2 = self._make_layer(block, 128, layers[1], 2)
      self.layer3 = self._make_layer(block, 256, layers[2], 2)
      self.layer4 = self._make_layer(block, 512, layers[3], 2)
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(512 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
      downsample = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion))
      layers = [block(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * block.expansion
      layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.fc(torch.flatten(self.avgpool(x), 1))

  if arch == "resnet18":
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes)
  return ResNet(Bottleneck, (3, 4, 6, 3), num_classes)


def randomize(model, seed):
  """Random weights and BN statistics, scaled so activations stay O(1)."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.Conv2d):
        torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        m.weight.mul_(0.5)  # keeps the 16 residual additions from blowing up
      elif isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.1)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(1000)
      elif isinstance(m, torch.nn.Linear):
        m.weight.normal_(0.0, 0.05)
        m.bias.normal_(0.0, 0.1)
  return model.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_forward_parity_with_pytorch(tmp_path, arch):
  torch = pytest.importorskip("torch")
  net = randomize(torch_resnet(arch, NUM_CLASSES), seed=0)
  state = net.state_dict()
  # Our torch copy has exactly torchvision's keys and shapes.
  assert {k: tuple(v.shape) for k, v in state.items()} == torchvision_shapes(arch, NUM_CLASSES)

  pth = str(tmp_path / f"{arch}.pth")
  torch.save(state, pth)
  st = str(tmp_path / f"{arch}.safetensors")
  save_file({k: v.numpy() for k, v in state.items()}, st)
  from_pth = pretrained.load_torchvision_resnet(pth, arch)
  from_st = pretrained.load_torchvision_resnet(st, arch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, from_st)

  x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
  with torch.no_grad():
    want = net(torch.from_numpy(x)).numpy()
  model = models.get_model(arch, NUM_CLASSES)
  with jax.default_matmul_precision("highest"):
    got = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        from_pth, jnp.asarray(x.transpose(0, 2, 3, 1)))
  got = np.asarray(got)
  assert got.shape == (2, NUM_CLASSES)
  assert 0.1 < np.abs(want).max() < 100  # a meaningful, non-degenerate comparison
  diff = np.abs(got - want).max()
  print(f"{arch}: max |logit| {np.abs(want).max():.3f}, max abs diff {diff:.2e}")
  assert diff <= 1e-4


def test_pth_wrapped_and_prefixed(tmp_path):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in numpy_state("resnet18").items()}
  plain = pretrained.load_torchvision_resnet(write(tmp_path, numpy_state("resnet18")), "resnet18")
  path = str(tmp_path / "ckpt.pt")
  # e.g. a training checkpoint of a DataParallel model.
  torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 90}, path)
  loaded = pretrained.load_torchvision_resnet(path, "resnet18")
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, plain)
  # bfloat16 tensors (no numpy equivalent) are read as float32.
  torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in state.items()}, path)
  loaded = pretrained.load_torchvision_resnet(path, "resnet18")
  np.testing.assert_allclose(loaded["params"]["fc"]["bias"], state["fc.bias"].numpy(),
                             rtol=1e-2)
  # ... and so are bfloat16 .safetensors files.
  from safetensors.torch import save_file as save_torch  # pylint: disable=g-import-not-at-top
  st = str(tmp_path / "bf16.safetensors")
  save_torch({k: v.to(torch.bfloat16) if v.is_floating_point() else v
              for k, v in state.items()}, st)
  from_st = pretrained.load_torchvision_resnet(st, "resnet18")
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_st, loaded)
