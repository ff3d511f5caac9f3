"""`init_torchvision` through the trainer: the stock ImageNet ResNet-18 config from a
torchvision state_dict (.safetensors, no PyTorch needed), on generated JPEGs.

Overridden for a 2-core CPU only: the image size (32), the batch (2 per device)
and no retraining epochs; everything else is the stock config, worker processes
included.
"""

import importlib
import importlib.util
import os

import jax
import numpy as np

from experiments import checkpoints
from experiments import train
from experiments.data import synthetic_imagenet
from experiments.models import pretrained
from inq_jax import quantize as inq
from inq_jax import tree

_spec = importlib.util.spec_from_file_location(
    "_test_pretrained", os.path.join(os.path.dirname(__file__), "models", "test_pretrained.py"))
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)


def test_resnet18_starts_from_the_torchvision_weights_and_quantizes_them(tmp_path):
  data_dir = str(tmp_path / "tfds")
  synthetic_imagenet.prepare(data_dir, train=4, validation=4)
  weights = _helpers.write(tmp_path, _helpers.numpy_state("resnet18", num_classes=1000, seed=3))
  config = importlib.import_module("experiments.configs.imagenet_resnet18").get_config()
  config.dataset.data_dir = data_dir
  config.dataset.image_size = 32
  config.init_torchvision = weights
  config.batch_size = config.eval_batch_size = 2 * jax.device_count()
  config.inq.epochs = 0
  workdir = str(tmp_path / "work")
  results = train.train_and_evaluate(config, workdir)

  loaded = pretrained.load_torchvision_resnet(weights, "resnet18")
  assert results["baseline"]["epochs"] == 0  # pretrained: no baseline training
  baseline = checkpoints.load_variables(os.path.join(workdir, checkpoints.BASELINE_DIR),
                                        {"params": loaded["params"],
                                         "batch_stats": loaded["batch_stats"]})
  for got, want in zip(jax.tree.leaves(baseline), jax.tree.leaves(loaded)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Nothing retrained: every final kernel is the paper's rounding of the
  # torchvision kernel itself, n1 from its largest |w|.
  assert results["final"]["all_pow2"] is True
  variables, _ = checkpoints.load_final(workdir)
  got = dict(tree.leaves_with_paths(variables["params"])[0])
  kernels = [(p, w) for p, w in tree.leaves_with_paths(loaded["params"])[0]
             if p.endswith("kernel")]
  assert len(kernels) == 21  # 20 convolutions and the classifier
  for path, w in kernels:
    n1, n2 = inq.exponent_bounds(np.abs(np.asarray(w)).max(), 5)
    np.testing.assert_array_equal(np.asarray(got[path]),
                                  np.asarray(inq.round_to_pow2(w, n1, n2)), err_msg=path)
