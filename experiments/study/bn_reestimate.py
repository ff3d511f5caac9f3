"""Post-training quantization of a BN network, with and without fresh BN statistics.

  python -m experiments.study.bn_reestimate \
      --baseline=workdirs/sweep_fashion_mnist_resnet20/seed0/fp32/baseline_variables

A diagnostic for results/resnet20/RESULTS.md: rounding every weight of the
ResNet-20 baseline at once (PTQ) costs far more than its codebooks' rounding
error suggests. This script rounds the study's fp32 baseline with each codebook
(every weight at once, as the sweep's ptq cells do), evaluates it with the
baseline's BN running statistics ("stale_bn"), then re-estimates those
statistics from `--batches` train batches in train mode (no gradient, no
weight changes; flax's BatchNorm momentum) and evaluates again. Prints one
JSON line.

The re-estimation is the trainer's own (`steps.make_bn_stats_step` over
`loops.bn_batches`, by `loops.reestimate_bn`), which a run applies after every
quantization step with `--config.inq.bn_reestimate_batches=N`; a PTQ run with
it (portions (1.0,), no retraining) gives the "bn_reestimated" number through
the trainer (experiments/configs/sweep_lowbit_options_resnet20.py's ptq_*_bnre cells).
"""

import argparse
import json

import jax

from experiments import checkpoints, loops, models, recipe, steps
from experiments.configs import sweep_fashion_mnist_resnet20
from experiments.data import input_pipeline
from experiments.mesh import Devices
from inq_jax import quantize


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--baseline", required=True, help="an fp32 run's baseline_variables")
  parser.add_argument("--batches", type=int, default=100, help="train batches of 128")
  parser.add_argument("--cells", default="5:absmax,3:absmax,3:mse,2:absmax,2:mse")
  args = parser.parse_args()
  cells = [(int(b), cal) for b, cal in (c.split(":") for c in args.cells.split(","))]

  config = sweep_fashion_mnist_resnet20.get_config().experiment
  data = input_pipeline.get_dataset(config.dataset)
  model = models.from_config(config, data.num_classes)
  template = models.init_variables(model, (1,) + tuple(data.image_shape), jax.random.key(0))
  variables = checkpoints.load_variables(args.baseline, {
      "params": template["params"], "batch_stats": template["batch_stats"]})
  devices = Devices()
  eval_step = steps.make_eval_step(model, devices, top5=False,
                                   normalization=data.normalization)

  def test(params, batch_stats):
    batches = loops.test_batches(data, config.eval_batch_size, devices)
    return loops.evaluate(eval_step, params, batch_stats, batches, devices)["accuracy"]

  bn_step = steps.make_bn_stats_step(model, devices, normalization=data.normalization)
  variables = devices.replicate(variables)

  out = {"baseline": args.baseline, "batches": args.batches,
         "fp32": test(variables["params"], variables["batch_stats"])}
  for bits, calibration in cells:
    c = config.copy_and_resolve_references()
    c.inq.bits, c.inq.calibration, c.inq.portions = bits, calibration, (1.0,)
    quantized, _ = quantize.advance(variables["params"],
                                    quantize.init(variables["params"], recipe.inq_config(c)))
    stats = variables["batch_stats"]
    stale = test(quantized, stats)
    stats = loops.reestimate_bn(bn_step, quantized, stats,
                                loops.bn_batches(data, 128, 7, args.batches), devices)
    out[f"ptq{bits}_{calibration}"] = {"stale_bn": stale,
                                       "bn_reestimated": test(quantized, stats)}
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
