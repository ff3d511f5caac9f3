"""experiments.tools.shift_check: the integer-only LeNet against the float one.

A LeNet from `init_variables`, quantized by INQ in one step (no training) and
exported, runs on random images: the integer logits must agree with float32
up to the rounding the fixed point implies, and equal, bit for bit, float64
multiply-adds of the same fixed-point model.
"""

import ml_collections
import numpy as np
import pytest

from experiments import models
from experiments.tools import shift_check
from inq_jax import export
from inq_jax import quantize as inq


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
  params = models.init_variables(models.LeNet(), (1, 28, 28, 1), 0)["params"]
  state = inq.init(params, inq.INQConfig(bits=5, portions=(1.0,)))
  while int(state.step) < len(state.config.portions):
    params, state = inq.advance(params, state)
  path = tmp_path_factory.mktemp("shift") / "lenet.inq"
  export.save(str(path), params, state, compress=False)
  return str(path)


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(64, 28, 28, 1)).astype(np.float32),
          rng.integers(0, 10, 64))


def compare(lenet_file, x, y, frac_bits, batch_size):
  """`check`'s comparison (`compare_batches`) on in-memory batches of random images."""
  batches = ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size))
  return shift_check.compare_batches(shift_check.lenet_layers(lenet_file), batches, frac_bits,
                                     models.LeNet())


def test_int_lenet_matches_float_up_to_rounding(lenet_file, images):
  x, y = images
  r8 = compare(lenet_file, x, y, frac_bits=8, batch_size=32)
  r20 = compare(lenet_file, x, y, frac_bits=20, batch_size=64)
  for r, f in ((r8, 8), (r20, 20)):
    assert r["examples"] == 64 and r["frac_bits"] == f
    # Shifts and int64 adds are exactly float64 multiply-adds of the same fixed point.
    assert r["exact_logit_match_rate"] == 1.0 and r["float64_sums_exact"]
    assert r["prediction_match_rate"] >= 0.95
    # The worst-case bound from the roundings holds (float32's own roundoff aside)...
    assert r["max_abs_logit_error"] <= r["logit_error_bound"] + 1e-5
    assert r["mean_abs_logit_error"] <= r["max_abs_logit_error"]
  # ...and in practice the error is a few units of 2^-F (measured: ~1.2 at F=8).
  assert 0 < r8["max_abs_logit_error"] <= 4 * 2.0**-8
  assert r8["logits_within_lsb_rate"] > 0.5
  # 12 more fractional bits: the error shrinks ~4096x (float32 roundoff limits it).
  assert r20["max_abs_logit_error"] < r8["max_abs_logit_error"] / 256
  assert r20["logit_error_bound"] == pytest.approx(r8["logit_error_bound"] / 4096, rel=1e-3)
  assert r20["prediction_match_rate"] == 1.0
  assert r20["int_accuracy"] == r20["float_accuracy"]


def test_int_forward_is_integer_and_matches_emulation(lenet_file, images):
  layers = shift_check.lenet_layers(lenet_file)
  assert [l.codes.exp.shape for l in layers.values()] == [
      (5, 5, 1, 20), (5, 5, 20, 50), (800, 500), (500, 10)]
  logits, bits = shift_check.int_forward(layers, images[0][:4], 6)
  assert logits.dtype == np.int64 and logits.shape == (4, 10) and bits > 6
  emulated, exact = shift_check.emulate_float64(layers, images[0][:4], 6)
  assert exact
  np.testing.assert_array_equal(np.ldexp(logits.astype(np.float64), -bits), emulated)


def test_rejects_models_other_than_lenet(lenet_file):
  config = ml_collections.ConfigDict({"model": "resnet20"})
  with pytest.raises(shift_check.NotLeNetError, match="only LeNet.*'resnet20'"):
    shift_check.check(config, lenet_file)


class _FakeData:
  test_size = 7

  def test_batches(self, batch_size):
    for start in range(0, 8, batch_size):  # last batch padded, as input_pipeline does
      idx = np.arange(start, start + batch_size)
      yield {"image": idx.astype(np.uint8), "label": idx, "mask": idx < self.test_size}

  def normalize(self, images):  # the float images shift_check computes on
    return images.astype(np.float32) / 2


def test_test_batches_drops_padding_and_honours_limit():
  got = lambda limit: np.concatenate(
      [l for _, l in shift_check._test_batches(_FakeData(), 4, limit)])  # pylint: disable=protected-access
  np.testing.assert_array_equal(got(None), np.arange(7))
  images = np.concatenate([i for i, _ in shift_check._test_batches(_FakeData(), 4, None)])  # pylint: disable=protected-access
  np.testing.assert_array_equal(images, np.arange(7, dtype=np.float32) / 2)  # normalized
  np.testing.assert_array_equal(got(5), np.arange(5))
  np.testing.assert_array_equal(got(100), np.arange(7))
