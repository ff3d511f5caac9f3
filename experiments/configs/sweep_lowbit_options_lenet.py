"""Issue #32 on the LeNet: the low-bit recipe with distillation and mixed widths, 3 and 2 bits.

Command (from the repository root, after `bash scripts/setup.sh`):

  .venv/bin/python -m experiments.study.lowbit_options \
      --config=experiments/configs/sweep_lowbit_options_lenet.py \
      --workdir=workdirs/lowbit_options_lenet

Rerunning the command resumes; the report goes to results/lowbit_options/lenet.md.

Every cell is the low-bit recipe (`fashion_mnist_lenet_lowbit.py`:
calibration="mse", the paper's portions for the width, 2 epochs per portion:
16 epochs at 3 bits, 20 at 2) from the LeNet study's fp32 baseline of its seed
(the `fp32` cells of `sweep_fashion_mnist.py`: 6 epochs, about 90%), with:
- recipe: one width for every layer (the reference: the recipe without its
  mixed widths);
- distill: distillation from that baseline in every phase and the finetune;
- mixed: the first conv and the classifier at 8 bits (3.06 bits per weight on
  average at 3 bits, 2.08 at 2: they hold 1% of the weights), which is the
  recipe as `fashion_mnist_lenet_lowbit.py` now stands;
- both: distillation and mixed widths.
Seed 0 first (every variant), then seeds 1 and 2 for the recommended variant
(mixed: it beat the others on seed 0) and the reference.

Hardware: a 2-core CPU shared with other work: 12-20 minutes per cell (the
report gives each cell's wall time and the host's load). Expected result
(results/lowbit_options/RESULTS.md): every option alone within a few tenths of
a point of the recipe; the recommended variant at least fp32 - 0.1 at 3 bits and
fp32 - 1.0 at 2 bits on seed 0.
"""

import ml_collections

from experiments.configs import fashion_mnist_lenet_lowbit

MIXED = fashion_mnist_lenet_lowbit.MIXED_WIDTHS  # the first and the last layer at 8 bits
DISTILL = {"distill_weight": 0.5, "distill_temperature": 4.0}


def get_config():
  c = ml_collections.ConfigDict()
  c.title = "Low-bit options on Fashion-MNIST (LeNet): distillation and mixed widths"
  c.command_config = "experiments/configs/sweep_lowbit_options_lenet.py"
  c.experiment = fashion_mnist_lenet_lowbit.get_config("3")  # bits and portions per cell
  c.experiment.max_checkpoints_to_keep = 1
  c.experiment.inq.layer_bits = ()  # the reference: one width for every layer
  c.portions = ml_collections.ConfigDict(
      {f"b{b}": p for b, p in fashion_mnist_lenet_lowbit.PORTIONS.items()})
  c.baseline = ml_collections.ConfigDict({"config": "sweep_fashion_mnist",
                                          "workdir": "workdirs/sweep_fashion_mnist"})
  c.variants = ml_collections.ConfigDict({
      "recipe": {},
      "distill": dict(DISTILL),
      "mixed": {"layer_bits": MIXED},
      "both": {**DISTILL, "layer_bits": MIXED},
  })
  c.grid = (((0,), ("recipe", "distill", "mixed", "both"), (3, 2)),
            ((1, 2), ("mixed",), (3, 2)),
            ((1, 2), ("recipe",), (3, 2)))
  c.report_dir = "results/lowbit_options"
  c.report_name = "lenet"
  return c
