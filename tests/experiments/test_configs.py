"""Every shipped config: valid, documented, and a full INQ run on TFDS mock data."""

import importlib
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from experiments.data import builders
from experiments.data import input_pipeline as ip
from experiments.data import synthetic_imagenet
from experiments import models, recipe, train
from inq_jax import tree

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "configs"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                 if p.stem not in ("__init__", "common", "imagenet_common")
                 and not p.stem.startswith("sweep_"))  # sweeps: tests/experiments/test_sweep.py
MOCKED = [c for c in CONFIGS if c.startswith(("imagenet_", "cifar10_"))]
PAPER = {  # shared/paper: portions, batch, weight decay
    "imagenet_alexnet": ((0.3, 0.6, 0.8, 1.0), 256, 5e-4),
    "imagenet_vgg16": ((0.5, 0.75, 0.875, 1.0), 32, 5e-4),
    "imagenet_googlenet": ((0.2, 0.4, 0.6, 0.8, 1.0), 80, 2e-4),
    "imagenet_resnet18": ((0.5, 0.75, 0.875, 1.0), 80, 5e-4),
    "imagenet_resnet50": ((0.5, 0.75, 0.875, 1.0), 32, 5e-4),
}


def load(name):
  return importlib.import_module(f"experiments.configs.{name}")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_and_documented(name):
  module = load(name)
  config = module.get_config()
  recipe.inq_config(config)  # validates the INQ part
  doc = module.__doc__
  assert "experiments.main" in doc and f"configs/{name}.py" in doc, "command missing"
  assert "Expected result" in doc or "expected result" in doc.lower()
  if name in PAPER:
    portions, batch, wd = PAPER[name]
    assert (tuple(config.inq.portions), config.batch_size, config.weight_decay) == (
        portions, batch, wd)
    assert config.inq.bits == 5 and config.momentum == 0.9


@pytest.fixture
def mock_tfds(monkeypatch, tmp_path):
  # TFDS 4.9's mock `__getitems__` receives its keys in the wrong argument.
  monkeypatch.setattr(mocking, "_getitems",
                      lambda keys, generator, serialized=False: [generator[k] for k in keys])
  monkeypatch.setattr(builders, "tensorflow_available", lambda: True)
  for tar in ip.IMAGENET_TARS:
    (tmp_path / tar).touch()
  return tmp_path


# The big ImageNet nets take minutes each on a 2-core CPU (XLA compile time and
# 60-140M-parameter checkpoints); they run with `pytest -m slow`.
SLOW = {"imagenet_alexnet", "imagenet_vgg16", "imagenet_googlenet", "imagenet_resnet18",
        "imagenet_resnet50"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n
                                  for n in MOCKED])
def test_full_run_on_mock_data(name, mock_tfds, tmp_path):
  config = load(name).get_config()
  config.dataset.manual_dir = str(mock_tfds)
  config.dataset.data_dir = str(tmp_path / "tfds")
  config.dataset.image_size = 64
  config.batch_size = config.eval_batch_size = 2 * jax.device_count()
  config.baseline.epochs = 1
  config.inq.epochs = 1
  config.max_checkpoints_to_keep = 1
  if name.startswith("imagenet_"):
    # Real JPEG bytes through the stock worker processes (TFDS's mocks hand out
    # decoded arrays and cannot skip decoding).
    synthetic_imagenet.prepare(config.dataset.data_dir, train=4, validation=4)
    results = train.train_and_evaluate(config, str(tmp_path / "work"))
  else:
    with tfds.testing.mock_data(num_examples=4):
      results = train.train_and_evaluate(config, str(tmp_path / "work"))
  assert [p["portion"] for p in results["phases"]] == list(config.inq.portions)
  assert results["final"]["all_pow2"] is True
  assert results["final"]["max_distinct_values"] <= 17
  if name.startswith("imagenet_"):
    assert "top5_accuracy" in results["phases"][-1]


@pytest.mark.parametrize("bits", ["3", "2"])
def test_lowbit_recipe_stays_within_the_retraining_budget(bits):
  # Issue #14: no more retraining than 2 epochs per portion of the paper's
  # schedule for the bit width (16 epochs at 3 bits, 20 at 2 bits).
  module = load("fashion_mnist_lenet_lowbit")
  config = module.get_config(bits)
  recipe.inq_config(config)
  portions = tuple(config.inq.portions)
  assert config.inq.bits == int(bits) and portions == module.PORTIONS[int(bits)]
  assert config.inq.calibration == "mse"
  retraining = (len(portions) - 1) * config.inq.epochs \
      + config.inq.final_finetune_epochs
  assert retraining == {"3": 16, "2": 20}[bits]
  # The mixed widths: conv1 and fc2 at 8 bits, 1% of the weights, so the
  # model averages 3.06 (2.08) bits per weight, as the docstrings say.
  model = models.from_config(config, 10)
  shapes = jax.eval_shape(lambda: models.init_variables(model, (1, 28, 28, 1),
                                                        jax.random.key(0)))["params"]
  inq_cfg = recipe.inq_config(config)
  widths = {p: (inq_cfg.bits_for(p), int(np.prod(s.shape)))
            for p, s in tree.leaves_with_paths(shapes)[0] if inq_cfg.selects(p)}
  assert {p: b for p, (b, _) in widths.items() if b == 8} == {"conv1/kernel": 8,
                                                              "fc2/kernel": 8}
  mean = sum(b * n for b, n in widths.values()) / sum(n for _, n in widths.values())
  assert round(mean, 2) == {"3": 3.06, "2": 2.08}[bits]


def test_lowbit_recipe_refuses_other_bit_widths():
  with pytest.raises(ValueError, match="bits must be one of"):
    load("fashion_mnist_lenet_lowbit").get_config("4")
