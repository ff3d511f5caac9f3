"""Runs an exported INQ LeNet with integer shift-adds only and compares it with float.

  python -m experiments.tools.shift_check --config=experiments/configs/fashion_mnist_lenet.py \
      --weights=workdirs/fashion_mnist_lenet/model.inq [--frac_bits=8] [--limit=N]

The model's test split (the config's, as `experiments.tools.evaluate` reads it) goes
through two forward passes of the same exported weights (every conv/dense
weight 0 or +-2^k, loaded with `inq_jax.export`):

  float  the config's Flax `LeNet` applied in float32 (what training evaluates);
  int    an integer-only LeNet built from `inq_jax.shift`: the input images are
         rounded to fixed point with F = --frac_bits fractional bits
         (`quantize_activations`), each conv/dense is `shift_conv`/`shift_dense`
         (a product is the activation shifted by the weight's exponent, with
         its sign; the sums are exact in int64), the bias is added on the
         accumulator's fixed-point grid, ReLU and the 2x2 max pool are integer
         max operations, and conv1, conv2 and fc1 outputs are rounded (half to
         even) back to F fractional bits before the next layer. The fc2 logits
         are kept at the accumulator's precision (not rounded).

It prints one JSON line:

  examples               test examples compared (all of the split, or --limit).
  frac_bits              F.
  prediction_match_rate  fraction of examples whose int and float argmax agree.
  int_accuracy           test accuracy of the int logits.
  float_accuracy         test accuracy of the float32 logits (equals the run's
                         test accuracy; the split is the config's test_split).
  max_abs_logit_error    max over examples and classes of |int - float| logits
                         (the int logits dequantized to float64).
  mean_abs_logit_error   the mean of the same.
  logit_error_bound      a worst-case bound on that error from the roundings
                         alone (below), in real arithmetic.
  logits_within_lsb_rate fraction of logits with |int - float| <= 2^-F.
  exact_logit_match_rate fraction of examples whose int logits equal, bit for
                         bit, float64 logits of the same fixed-point model:
                         float64 multiply-adds of the same rounded inputs and
                         (exactly representable) weights, the bias rounded to
                         the same accumulator grid and each hidden output
                         rounded half to even to 2^-F, exactly where the int
                         path rounds. 1.0 means the shifts and adds are the
                         multiply-adds exactly; `float64_sums_exact` says that
                         the float64 sums could not round (every partial sum
                         below 2^53 accumulator units), which makes it a
                         bit-exact reference.
  float64_sums_exact     see above.
  bits, layer_bits, mean_bits
                         the file's default width, each kernel's own width and
                         the average per weight (`experiments.tools.evaluate`'s).
  weights                the file.
  seconds                wall time of both passes.

Why the int path differs from float only by rounding: the weights are the
same numbers on both paths (0 or +-2^k, exact in float32 and as shifts), and
a shift of an integer, and a sum of integers in int64, are exact (shift.py
refuses inputs that could overflow). So every difference comes from where the
int path rounds: (1) the input pixels, to 2^-F, error <= 2^-(F+1) each;
(2) conv1, conv2 and fc1 outputs, requantized to 2^-F, <= 2^-(F+1) each; and
(3) the biases, rounded to the accumulator grid 2^-(F - k0) (k0 = the layer's
smallest weight exponent, e.g. -8), <= 2^-(F - k0 + 1), 2^k0 times smaller
than (2). ReLU and max pool do not grow an error (both are 1-Lipschitz in
the max norm), and a layer multiplies it by at most its largest row sum
||W||_1 = max over outputs of sum |w|. Hence a bound

  e_0 = 2^-(F+1);  e_l = ||W_l||_1 e_(l-1) + 2^-(F - k0_l + 1) + [l hidden] 2^-(F+1)

which halves with each extra fractional bit; `logit_error_bound` is the same
recursion per channel (e_l[o] = sum_i |w_l[i, o]| e_(l-1)[i] + ...), never
larger. It is a worst case (every rounding error with the sign that hurts),
so it is typically 10^3-10^5 times the measured error. The float32 reference adds its
own roundoff (about 1e-7 relative), far below 2^-F for F <= 16.

Not supported: anything but the config's model 'lenet' with all four
kernels quantized (a clear error says so).

Speed: numpy int64 matmuls (no BLAS for integers), one per weight exponent
per layer (8 for 5 bits), in `--workers` threads over batches (numpy releases
the GIL); about 18M integer multiply-adds per image. The float64 and float32
passes cost little beside it. Measured times are in the README.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
from typing import Dict, NamedTuple, Optional

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import errors, models, recipe
from experiments.data import input_pipeline
from experiments.tools import evaluate
from inq_jax import export
from inq_jax import quantize
from inq_jax import shift

LAYERS = ("conv1", "conv2", "fc1", "fc2")
_CONVS = ("conv1", "conv2")


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("weights", None, "The exported LeNet (.inq), e.g. WORKDIR/model.inq.")
  flags.DEFINE_integer("frac_bits", 8, "Fractional bits of the fixed-point activations.")
  flags.DEFINE_integer("limit", None, "Compare only the first N test examples.")
  flags.DEFINE_integer("batch_size", 250, "Examples per batch.")
  flags.DEFINE_integer("workers", None, "Threads for the integer pass (default: CPUs).")
  flags.mark_flags_as_required(["config", "weights"])


FLAGS = flags.FLAGS


class Layer(NamedTuple):
  """One LeNet conv/dense: shift codes of its kernel and its float bias."""
  codes: shift.Codes
  bias: np.ndarray        # float32 [out]
  kernel: np.ndarray      # float64, the exact weights (from_codes(codes))


class NotLeNetError(errors.UserError, ValueError):
  """The model or the file is not a fully quantized LeNet."""


# ------------------------------------------------------------------ loading


def lenet_layers(weights) -> Dict[str, Layer]:
  """{conv1, conv2, fc1, fc2: Layer} of an exported LeNet, checked against its codebooks.

  Raises:
    NotLeNetError if the file's params are not LeNet's or a kernel is not quantized;
    ValueError (from `inq_jax.export`) if the file is damaged.
  """
  try:
    params, _ = export.load_with_extras(weights)
  except (ValueError, OSError) as e:  # the reader names what is wrong with the file
    raise errors.InputError(f"--weights {weights} cannot be used: {e}") from None
  if sorted(params) != sorted(LAYERS) or any(
      not isinstance(params[n], dict) or sorted(params[n]) != ["bias", "kernel"]
      for n in LAYERS):
    raise NotLeNetError(f"{weights} is not a LeNet: its params are {_layout(params)}; "
                        f"expected {{{', '.join(f'{n}: {{bias, kernel}}' for n in LAYERS)}}}")
  stored = export.read_codes(weights, check_all=False)
  out = {}
  for name in LAYERS:
    kernel = np.asarray(params[name]["kernel"])
    want = 4 if name in _CONVS else 2
    if kernel.ndim != want:
      raise NotLeNetError(f"{weights}: {name}/kernel has shape {kernel.shape}, not "
                          f"{want}-D as in LeNet")
    q = stored.get(f"{name}/kernel")
    if q is None:
      raise NotLeNetError(f"{weights}: {name}/kernel is stored as floats, not as INQ "
                          "codes; the integer path needs every kernel quantized")
    n2 = quantize.n2_from_n1(q.n1, q.bits)
    codes = shift.to_codes(kernel, q.n1, n2)
    out[name] = Layer(codes, np.asarray(params[name]["bias"], np.float32),
                      shift.from_codes(codes))
  return out


def _layout(params) -> str:
  return str(jax.tree.map(lambda a: tuple(np.shape(a)), params))


def float_params(layers: Dict[str, Layer]) -> dict:
  """The Flax params {name: {kernel, bias}} (float32) of `layers`."""
  return {n: {"kernel": l.kernel.astype(np.float32), "bias": l.bias}
          for n, l in layers.items()}


# ------------------------------------------------------------------ forward passes


def _pool(x):
  """2x2 max pool, stride 2, NHWC, any dtype (LeNet's, `lenet.select_max_pool_2x2`)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def int_forward(layers: Dict[str, Layer], images, frac_bits: int):
  """Integer-only LeNet logits.

  Returns:
    (logits int64 [B, classes], their fractional bits): `shift.dequantize`
    of the two is the float value.
  """
  x = shift.quantize_activations(images, frac_bits)
  for name in _CONVS:
    layer = layers[name]
    x = shift.shift_conv(x, layer.codes, layer.bias, frac_bits=frac_bits, padding="VALID")
    x = _pool(np.maximum(x, 0))
  x = x.reshape(x.shape[0], -1)  # NHWC row-major, as LeNet's reshape
  fc1, fc2 = layers["fc1"], layers["fc2"]
  x = np.maximum(shift.shift_dense(x, fc1.codes, fc1.bias, frac_bits=frac_bits), 0)
  out_frac = shift.accumulator_frac_bits(fc2.codes, frac_bits)
  logits = shift.shift_dense(x, fc2.codes, fc2.bias, frac_bits=frac_bits,
                             out_frac_bits=out_frac)
  return logits, out_frac


def _patches(x, kh, kw):
  windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  return windows.transpose(0, 1, 2, 4, 5, 3).reshape(windows.shape[:3] + (-1,))


def emulate_float64(layers: Dict[str, Layer], images, frac_bits: int):
  """The int path's fixed-point model in float64 multiply-adds (see the module doc).

  Returns:
    (logits float64 [B, classes], float64_sums_exact: bool).
  """
  def grid(v, bits):
    return np.ldexp(np.rint(np.ldexp(v, bits)), -bits)

  exact = True

  def affine(x, layer, out_bits):
    nonlocal exact
    acc = shift.accumulator_frac_bits(layer.codes, frac_bits)
    w = layer.kernel.reshape(-1, layer.kernel.shape[-1])
    bias = grid(layer.bias.astype(np.float64), acc)
    # Every partial sum is at most sum|x||w| + |b|; below 2^53 units of 2^-acc, exact.
    top = np.abs(x).max(initial=0.0) * np.abs(w).sum(axis=0).max() + np.abs(bias).max()
    exact &= bool(np.ldexp(top, acc) < 2.0**53)
    y = x @ w + bias
    return y if out_bits is None else grid(y, out_bits)

  x = grid(np.asarray(images, np.float64), frac_bits)
  for name in _CONVS:
    kh, kw = layers[name].kernel.shape[:2]
    p = _patches(x, kh, kw)
    x = _pool(np.maximum(affine(p, layers[name], frac_bits), 0))
  x = x.reshape(x.shape[0], -1)
  x = np.maximum(affine(x, layers["fc1"], frac_bits), 0)
  return affine(x, layers["fc2"], None), exact


def error_bound(layers: Dict[str, Layer], frac_bits: int) -> float:
  """Worst-case |int - real-arithmetic| logit error from the roundings (module doc).

  Propagated per channel (the input error is the same at every pixel, and VALID
  convs and 2x2 pools keep it so): e_out[o] = sum_i |w[i, o]| e_in[i] + bias
  rounding + requantization, which is at most the module doc's scalar bound.
  """
  e = np.full(layers[LAYERS[0]].kernel.shape[-2], 2.0**-(frac_bits + 1))
  for name in LAYERS:
    kernel = np.abs(layers[name].kernel)
    if name == "fc1" and kernel.shape[0] != e.size:   # flattened HWC: channel fastest
      e = np.tile(e, kernel.shape[0] // e.size)
    if kernel.ndim == 4:
      kernel = kernel.sum(axis=(0, 1))                 # [cin, out]
    acc = shift.accumulator_frac_bits(layers[name].codes, frac_bits)
    e = e @ kernel + 2.0**-(acc + 1)
    if name != LAYERS[-1]:
      e = e + 2.0**-(frac_bits + 1)
  return float(e.max())


def float_forward_fn(model):
  """The jitted float32 apply of a Flax `LeNet`: f(params, images) -> logits."""
  return jax.jit(lambda params, x: model.apply({"params": params}, x))


# ------------------------------------------------------------------ comparison


class _Totals:
  """Running sums of the statistics over batches."""

  def __init__(self, frac_bits: int):
    self.frac_bits = frac_bits
    self.n = self.match = self.int_ok = self.float_ok = self.exact = 0
    self.logits = self.within = 0
    self.abs_sum, self.abs_max = 0.0, 0.0
    self.sums_exact = True

  def add(self, int_logits, emulated, sums_exact, float_logits, labels):
    float_logits = np.asarray(float_logits, np.float64)
    err = np.abs(int_logits - float_logits)
    pi, pf = int_logits.argmax(-1), float_logits.argmax(-1)
    self.n += len(labels)
    self.match += int((pi == pf).sum())
    self.int_ok += int((pi == labels).sum())
    self.float_ok += int((pf == labels).sum())
    self.exact += int((int_logits == emulated).all(axis=-1).sum())
    self.logits += err.size
    self.within += int((err <= 2.0**-self.frac_bits).sum())
    self.abs_sum += float(err.sum())
    self.abs_max = max(self.abs_max, float(err.max(initial=0.0)))
    self.sums_exact &= sums_exact

  def result(self) -> dict:
    n = max(self.n, 1)
    return {"examples": self.n, "frac_bits": self.frac_bits,
            "prediction_match_rate": self.match / n, "int_accuracy": self.int_ok / n,
            "float_accuracy": self.float_ok / n, "max_abs_logit_error": self.abs_max,
            "mean_abs_logit_error": self.abs_sum / max(self.logits, 1),
            "logits_within_lsb_rate": self.within / max(self.logits, 1),
            "exact_logit_match_rate": self.exact / n,
            "float64_sums_exact": self.sums_exact}


def _int_and_emulated(layers, images, frac_bits):
  logits, bits = int_forward(layers, images, frac_bits)
  emulated, sums_exact = emulate_float64(layers, images, frac_bits)
  return shift.dequantize(logits, bits), emulated, sums_exact


def compare_batches(layers: Dict[str, Layer], batches, frac_bits: int, model,
                    workers: Optional[int] = None) -> dict:
  """Statistics (the module doc's keys, less weights/seconds) over (images, labels) pairs.

  Args:
    layers: from `lenet_layers`.
    batches: an iterable of (images float [B, 28, 28, 1], labels int [B]).
    frac_bits: F.
    model: the Flax LeNet of the float pass (the config's, as training built it).
    workers: threads for the integer pass (default: os.cpu_count()).
  """
  frac_bits = int(frac_bits)
  forward = float_forward_fn(model)
  params = float_params(layers)
  totals = _Totals(frac_bits)
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
    pending = []
    for images, labels in batches:
      images = np.asarray(images, np.float32)
      pending.append((pool.submit(_int_and_emulated, layers, images, frac_bits),
                      forward(params, images), np.asarray(labels)))
    for future, float_logits, labels in pending:
      totals.add(*future.result(), np.asarray(float_logits), labels)
  out = totals.result()
  out["logit_error_bound"] = error_bound(layers, frac_bits)
  return out


def _test_batches(data, batch_size: int, limit: Optional[int]):
  left = data.test_size if limit is None else min(limit, data.test_size)
  for batch in data.test_batches(batch_size):
    if left <= 0:
      return
    keep = np.flatnonzero(batch["mask"])[:left]
    left -= len(keep)
    yield data.normalize(batch["image"][keep]), batch["label"][keep]


def check(config, weights, frac_bits: int = 8, limit: Optional[int] = None,
          batch_size: int = 250, workers: Optional[int] = None) -> dict:
  """The module's JSON result for `config`'s test split and the exported `weights`.

  Raises:
    NotLeNetError if `config.model` is not 'lenet' or the file is not a
    quantized LeNet; ValueError for a damaged file or a bad --limit.
  """
  if config.model != "lenet":
    raise NotLeNetError(f"shift_check supports only LeNet; the config's model is "
                        f"{config.model!r}")
  for name, value, low in (("limit", limit, 1), ("batch_size", batch_size, 1),
                           ("workers", workers, 1), ("frac_bits", frac_bits, 0)):
    if value is not None and value < low:
      raise errors.InputError(f"--{name} must be >= {low}, got {value}")
  recipe.check_values(config)
  start = time.perf_counter()
  layers = lenet_layers(weights)
  data = input_pipeline.get_dataset(config.dataset)
  if tuple(data.image_shape) != (28, 28, 1):
    raise NotLeNetError(f"LeNet needs 28x28x1 images; {config.dataset.name} has "
                        f"{tuple(data.image_shape)}")
  classes = layers["fc2"].kernel.shape[-1]
  if classes != data.num_classes:
    raise NotLeNetError(f"{weights} has {classes} classes, {config.dataset.name} has "
                        f"{data.num_classes}")
  model = models.from_config(config, classes)
  out = compare_batches(layers, _test_batches(data, batch_size, limit), frac_bits, model,
                        workers)
  out.update(evaluate.file_bits(export.read_header(weights)))
  out["weights"] = str(weights)
  out["seconds"] = round(time.perf_counter() - start, 2)
  return out


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {argv[1:]}")
  result = check(FLAGS.config, FLAGS.weights, FLAGS.frac_bits, FLAGS.limit,
                 FLAGS.batch_size, FLAGS.workers)
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  define_flags()
  errors.run(main, "experiments.tools.shift_check")
