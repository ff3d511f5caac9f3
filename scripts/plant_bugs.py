#!/usr/bin/env python
"""Plants realistic single-line bugs, one at a time, and checks that the tests catch each one.

  .venv/bin/python scripts/plant_bugs.py                  # every bug, its listed test files
  .venv/bin/python scripts/plant_bugs.py ID [ID ...]      # only these
  .venv/bin/python scripts/plant_bugs.py --full           # survivors: also the whole suite
  .venv/bin/python scripts/plant_bugs.py --write-doc      # and put the table in the doc
  .venv/bin/python scripts/plant_bugs.py --check          # only: is every snippet still there?
  .venv/bin/python scripts/plant_bugs.py --baseline       # first: do the listed files pass unplanted?

The list is `BUGS` below; docs/planted_bugs.md shows it (between the
`catalogue` markers, written by `--write-doc` or `--catalogue`) and the last
run's results (between the `results` markers).

For each bug the script copies the working tree (tracked and untracked
non-ignored files, uncommitted changes included; the same copy as
scripts/mutation_test.sh) into a temporary directory, replaces the bug's
`original` snippet by its `replacement` there, and runs the bug's test files
with `pytest -x -p no:xdist` in the copy (the copy's packages are the ones
imported: the command runs from the copy, with PYTHONPATH set to it and no
bytecode written). With `--full`, a bug the listed files miss is then run
against the whole suite (`pytest -x`, `--workers N` for xdist). A bug is
caught when pytest fails (exit status 1, or 2 for a collection error); the
first failing test and the seconds are recorded. The copies are removed
afterwards (`--keep` keeps them).

The script refuses to run (exit status 2, naming every offender) if any
original snippet is not found exactly once in its file, if a replacement is
the original, if a planted file no longer compiles, or if a listed test file
is missing: the list cannot rot silently when the code changes. Exit status
1 if any bug was not caught.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from typing import List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join("docs", "planted_bugs.md")
MARKERS = {
    "catalogue": ("<!-- plant_bugs:catalogue:start -->", "<!-- plant_bugs:catalogue:end -->"),
    "results": ("<!-- plant_bugs:results:start -->", "<!-- plant_bugs:results:end -->"),
}

T = "tests/"
CNN = "experiments/models/cnn.py"
LAYERS = "experiments/models/layers.py"
RESNET = "experiments/models/resnet.py"
LENET = "experiments/models/lenet.py"
REFS = T + "experiments/models/test_references.py"
TEST_CNN = T + "experiments/models/test_cnn.py"
TEST_CPU_CONV = T + "experiments/models/test_cpu_conv.py"
TEST_PRETRAINED = T + "experiments/models/test_pretrained.py"
PIPELINE = "experiments/data/input_pipeline.py"
TEST_PIPELINE = T + "experiments/data/test_input_pipeline.py"
TEST_EPOCHS = T + "experiments/data/test_epochs_and_eval.py"
TEST_EXPORT_CLI = T + "experiments/tools/test_export_cli.py"
TEST_MAIN = T + "experiments/test_main_cli.py"
TRAIN = "experiments/train.py"
RUNNER = "experiments/runner.py"
STEPS = "experiments/steps.py"
LOOPS = "experiments/loops.py"
OPTIMIZER = "experiments/optimizer.py"
RECIPE = "experiments/recipe.py"
TEST_CONTRACT = T + "experiments/test_train_contract.py"
TEST_STEPS = T + "experiments/test_steps.py"
TEST_LOOPS = T + "experiments/test_loops.py"
TEST_OPTIMIZER = T + "experiments/test_optimizer.py"
TEST_RECIPE = T + "experiments/test_recipe.py"


@dataclasses.dataclass(frozen=True)
class Bug:
  id: str
  file: str          # relative to the repository root
  original: str      # must occur exactly once in `file`
  replacement: str
  breaks: str        # what goes wrong, in a sentence
  tests: Tuple[str, ...]  # test files (or node ids) expected to catch it


# The low-bit options of issue #32 (distillation, per-layer widths, BN re-estimation):
# a block of its own, appended to BUGS.
TEST_LOWBIT_STEPS = T + "experiments/test_lowbit_steps.py"
TEST_LOWBIT_TRAIN = T + "experiments/test_lowbit_train.py"
LOWBIT_BUGS: Tuple[Bug, ...] = (
    Bug("distill-teacher-train-mode", "experiments/steps.py",
        "teacher_logits = model.apply(teacher, images, train=False).astype(jnp.float32)",
        'teacher_logits = model.apply(teacher, images, train=True, mutable=["batch_stats"], '
        'rngs={"dropout": rng})[0].astype(jnp.float32)',
        "the distillation teacher runs in train mode (the student's call copied): batch "
        "statistics instead of its running ones, dropout on",
        (TEST_LOWBIT_STEPS,)),
    Bug("distill-student-untempered", "experiments/steps.py",
        "student_log_p = jax.nn.log_softmax(logits / t)",
        "student_log_p = jax.nn.log_softmax(logits)",
        "the temperature softens the teacher's predictions but not the student's",
        (TEST_LOWBIT_STEPS, TEST_LOWBIT_TRAIN)),
    Bug("distill-weight-ignored", "experiments/steps.py",
        "loss = (1 - a) * ce + a * t ** 2 * kl",
        "loss = ce + t ** 2 * kl",
        "the distillation weight is ignored: the labels' and the teacher's terms are summed",
        (TEST_LOWBIT_STEPS, TEST_LOWBIT_TRAIN)),
    Bug("distill-no-t-squared", "experiments/steps.py",
        "loss = (1 - a) * ce + a * t ** 2 * kl",
        "loss = (1 - a) * ce + a * kl",
        "the soft term is not scaled by T^2: its gradient shrinks as 1/T^2",
        (TEST_LOWBIT_STEPS, TEST_LOWBIT_TRAIN)),
    Bug("distill-kl-reversed", "experiments/steps.py",
        "kl = jnp.sum(jnp.exp(teacher_log_p) * (teacher_log_p - student_log_p), axis=-1).mean()",
        "kl = jnp.sum(jnp.exp(student_log_p) * (student_log_p - teacher_log_p), axis=-1).mean()",
        "KL(student || teacher) instead of KL(teacher || student)",
        (TEST_LOWBIT_STEPS, TEST_LOWBIT_TRAIN)),
    Bug("distill-teacher-initial", "experiments/runner.py",
        "variables = checkpoints.load_variables(source, self.initial)",
        "variables = self.initial",
        "the teacher is the run's initial variables (random for a run that trains its "
        "baseline), not the fp32 baseline",
        (TEST_LOWBIT_TRAIN,)),
    Bug("distill-not-in-finetune", "experiments/runner.py",
        "teacher = self.teacher() if self.distill and segment.stage == INQ else None",
        "teacher = self.teacher() if self.distill and segment.stage == INQ and "
        "segment.index < self.inq_cfg.num_steps else None",
        "the final finetune trains on the labels alone",
        (TEST_LOWBIT_TRAIN,)),
    Bug("layer-bits-not-passed", "experiments/recipe.py",
        "                            layer_bits=_pairs(c.layer_bits))",
        "                            )",
        "inq.layer_bits never reaches the INQConfig: every layer at the default width",
        (TEST_LOWBIT_TRAIN,)),
    Bug("mean-bits-unweighted", "experiments/reporting.py",
        'mean = sum(b * n for b, n in widths.values()) / total if total else float("nan")',
        'mean = sum(b for b, _ in widths.values()) / len(widths) if total else float("nan")',
        "the average bits per weight is the mean over layers, not over weights (LeNet's "
        "8-bit conv1 and fc2 would count half)",
        (TEST_LOWBIT_TRAIN,)),
    Bug("bits-label-never-mixed", "experiments/reporting.py",
        'return any(b != final.get("bits") for b in (final.get("layer_bits") or {}).values())',
        'return all(b != final.get("bits") for b in (final.get("layer_bits") or {}).values())',
        "a run of mixed widths is reported as a plain b-bit run (summary, plot title)",
        (TEST_LOWBIT_TRAIN,)),
    Bug("bnre-eval-mode", "experiments/steps.py",
        "_, updates = model.apply(model_variables(params, batch_stats), images, train=True,",
        "_, updates = model.apply(model_variables(params, batch_stats), images, train=False,",
        "BN re-estimation runs the model in evaluation mode: the statistics never move",
        (TEST_LOWBIT_STEPS, TEST_LOWBIT_TRAIN)),
    Bug("bnre-restart-each-batch", "experiments/loops.py",
        "stats = bn_stats_step(params, stats, devices.put_batch(batch))",
        "stats = bn_stats_step(params, batch_stats, devices.put_batch(batch))",
        "every re-estimation batch starts from the stale statistics: only the last batch "
        "counts, at 1 - momentum",
        (TEST_LOWBIT_TRAIN,)),
    Bug("bnre-float-weights", "experiments/train.py",
        "batch_stats = run.reestimate_bn(params, state.batch_stats, k)",
        "batch_stats = run.reestimate_bn(state.params, state.batch_stats, k)",
        "BN statistics re-estimated with the weights before the quantization step",
        (TEST_LOWBIT_TRAIN,)),
    Bug("bnre-discarded", "experiments/train.py",
        "state.replace(params=params, batch_stats=batch_stats, inq_state=inq_state,",
        "state.replace(params=params, inq_state=inq_state,",
        "the re-estimated statistics are computed and dropped: the quantized accuracy is the "
        "stale statistics' again",
        (TEST_LOWBIT_TRAIN,)),
)


BUGS: Tuple[Bug, ...] = (
    # ------------------------------------------------------------ models
    Bug("bn-momentum-pytorch", LAYERS,
        "momentum=0.9, epsilon=1e-5,", "momentum=0.1, epsilon=1e-5,",
        "PyTorch's BN momentum copied into Flax (whose momentum is the fraction kept): the "
        "running statistics become the last batch's, in every BN net",
        (REFS,)),
    Bug("resnet20-shortcut-grid", RESNET,
        "x = x[:, ::self.stride, ::self.stride, :]",
        "x = x[:, 1::self.stride, 1::self.stride, :]",
        "ResNet-20's option-A shortcut subsamples the odd rows and columns, off the grid of the "
        "stride-2 conv it is added to",
        (REFS,)),
    Bug("resnet20-shortcut-channels", RESNET,
        "(extra // 2, extra - extra // 2)", "(0, extra)",
        "ResNet-20's option-A shortcut puts the zero channels after the old ones instead of "
        "on both sides: the identity lands on other channels",
        (REFS,)),
    Bug("alexnet-conv1-padding", CNN,
        'conv(64, 11, 4, 2, "conv1")', 'conv(64, 11, 4, 0, "conv1")',
        "AlexNet's first conv loses its padding of 2 (torchvision's): other feature maps, "
        "other sizes",
        (REFS,)),
    Bug("vgg16-avg-pool", CNN,
        "x = nn.max_pool(x, (2, 2), (2, 2))", "x = nn.avg_pool(x, (2, 2), (2, 2))",
        "VGG-16 pools its stages by averaging instead of max pooling",
        (REFS,)),
    Bug("googlenet-pool-same", CNN,
        "pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding=layers.pad(1))",
        'pool = lambda y: nn.max_pool(y, (3, 3), (2, 2), padding="SAME")',
        "GoogLeNet's 3x3/2 max pools pad (0, 1) on even maps (Flax's SAME) instead of 1 on "
        "each side: same sizes, windows shifted by a pixel",
        (REFS,)),
    Bug("googlenet-concat-order", CNN,
        "jnp.concatenate([b1, b2, b3, b4], axis=-1)", "jnp.concatenate([b1, b3, b2, b4], axis=-1)",
        "Inception modules concatenate the 5x5 branch before the 3x3 one: the same channel "
        "count, so every shape still fits",
        (REFS,)),
    Bug("adaptive-pool-floor", LAYERS,
        "start, end = (i * size) // out, -((-(i + 1) * size) // out)",
        "start, end = (i * size) // out, ((i + 1) * size) // out",
        "adaptive_avg_pool ends its bins at floor((i+1)H/out) instead of PyTorch's ceil: "
        "bins lose their last row, or are empty when the map is smaller than the output",
        (TEST_CNN, REFS)),
    Bug("googlenet-dropout-inverted", CNN,
        "x = nn.Dropout(0.4, deterministic=not train)(x)",
        "x = nn.Dropout(0.4, deterministic=train)(x)",
        "GoogLeNet's dropout is on in evaluation and off in training",
        (TEST_CNN, REFS)),
    Bug("resnet-maxpool-same", RESNET,
        "x = nn.max_pool(x, (3, 3), (2, 2), padding=layers.pad(1))  # pads with -inf, as PyTorch",
        'x = nn.max_pool(x, (3, 3), (2, 2), padding="SAME")',
        "ResNet-18/50's stem max pool pads (0, 1) instead of (1, 1): torchvision weights "
        "give other logits",
        (TEST_PRETRAINED,)),
    Bug("bottleneck-relu-before-add", RESNET,
        'y = layers.batch_norm(train, self.dtype, "bn3")(y)',
        'y = nn.relu(layers.batch_norm(train, self.dtype, "bn3")(y))',
        "ResNet-50's bottleneck applies a ReLU to the residual branch before the addition",
        (TEST_PRETRAINED,)),
    Bug("lenet-fc1-no-relu", LENET,
        'x = nn.relu(nn.Dense(500, dtype=self.dtype, name="fc1")(x))',
        'x = nn.Dense(500, dtype=self.dtype, name="fc1")(x)',
        "LeNet's hidden fully connected layer loses its ReLU (two stacked linear layers)",
        (REFS, TEST_CPU_CONV)),
    Bug("lenet-pool-tie-gradient", LENET,
        "for k in (2, 1, 0):", "for k in (0, 1, 2):",
        "LeNet's 2x2 max pool sends the gradient of a tie to a later tap instead of the first "
        "(as nn.max_pool does)",
        (TEST_CPU_CONV,)),
    Bug("cpu-conv-kernel-transposed", "experiments/models/cpu_conv.py",
        "return ((y + i) * w * c + (x + j) * c + k)",
        "return ((y + j) * w * c + (x + i) * c + k)",
        "the matmul convolution reads each window transposed: LeNet's CPU path convolves with "
        "the transposed kernel",
        (TEST_CPU_CONV, REFS)),
    Bug("cpu-conv-input-gradient-sign", "experiments/models/cpu_conv.py",
        "dy = dy + _conv_xla(dx, kernel)", "dy = dy - _conv_xla(dx, kernel)",
        "the matmul convolution's input tangent has the wrong sign: LeNet's conv1 trains "
        "against the gradient",
        (TEST_CPU_CONV,)),
    Bug("cpu-conv-any-stride", "experiments/models/cpu_conv.py",
        "return (x.ndim == 4 and kernel.ndim == 4 and tuple(window_strides) == (1, 1)",
        "return (x.ndim == 4 and kernel.ndim == 4",
        "strided convolutions take the stride-1 matmul path: wrong output size and values",
        (TEST_CPU_CONV,)),
    Bug("pretrained-kernel-hw-swapped", "experiments/models/pretrained.py",
        "lambda a: a.transpose(2, 3, 1, 0)", "lambda a: a.transpose(3, 2, 1, 0)",
        "torchvision conv weights are imported with height and width swapped (square "
        "kernels: every shape still fits)",
        (TEST_PRETRAINED,)),
    # ------------------------------------------------------------ data
    Bug("same-order-every-epoch", PIPELINE,
        "order = np.random.default_rng([seed, int(epoch), 0])",
        "order = np.random.default_rng([seed, 0, 0])",
        "every epoch visits the train split in the same order",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("same-draw-every-batch", PIPELINE,
        "rng = np.random.default_rng([seed, int(epoch), step + 1]) if augment else None",
        "rng = np.random.default_rng([seed, int(epoch), 1]) if augment else None",
        "every batch of an epoch gets the same crops and flips, position by position",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("same-draw-every-epoch", PIPELINE,
        "rng = np.random.default_rng([seed, int(epoch), step + 1]) if augment else None",
        "rng = np.random.default_rng([seed, step + 1]) if augment else None",
        "batch k gets the same crops and flips in every epoch",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("crop-never-last-shift", PIPELINE,
        "offsets = rng.integers(0, 2 * pad + 1, size=(n, 2))[local]",
        "offsets = rng.integers(0, 2 * pad, size=(n, 2))[local]",
        "random crops never take the last offset: images never shift fully up or left",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("flips-per-process", PIPELINE,
        "flips = (rng.random(n) < 0.5)[local]", "flips = rng.random(len(images)) < 0.5",
        "flips are drawn per process slice, not per global batch: augmentation depends on the "
        "process count (and processes share draws)",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("partial-last-train-batch", PIPELINE,
        "return examples // batch_size", "return -(-examples // batch_size)",
        "the remainder of the split becomes a short last batch (another shape, a recompile, "
        "a mis-weighted step)",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("eval-drops-last-batch", PIPELINE,
        "steps = -(-self.test_size // batch_size)", "steps = self.test_size // batch_size",
        "evaluation drops the last, partial batch: the test accuracy is over fewer examples",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("eval-counts-a-pad", PIPELINE,
        '"mask": np.arange(b) < real}', '"mask": np.arange(b) <= real}',
        "the first padding example of the last eval batch is counted (an all-zero image "
        "labelled 0)",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("eval-augmented", PIPELINE,
        "images, labels = self.test_source.load(indices, None, local)",
        "images, labels = self.test_source.load(indices, np.random.default_rng(step), local)",
        "the test split is evaluated on randomly cropped and flipped images",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("every-process-first-slice", PIPELINE,
        "return slice(index * b, (index + 1) * b)", "return slice(0, b)",
        "every process reads the first slice of each global batch: half the data is never "
        "seen on two hosts, and evaluation counts some examples twice",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("idx-padded-file-accepted", "experiments/data/fashion_mnist_idx.py",
        "if len(body) != int(np.prod(shape)):", "if len(body) < int(np.prod(shape)):",
        "an IDX file with trailing bytes passes the size check and fails later with a bare "
        "numpy error instead of BadIdxFileError",
        (TEST_PIPELINE,)),
    Bug("idx-label-range", "experiments/data/fashion_mnist_idx.py",
        "if labels.max() >= len(CLASS_NAMES):", "if labels.max() > len(CLASS_NAMES):",
        "a label file holding label 10 (one past the classes) is accepted",
        (TEST_PIPELINE,)),
    Bug("imagenet-example-0-masked", "experiments/data/imagenet.py",
        "real = mine >= 0", "real = mine > 0",
        "ImageNet evaluation masks out example 0 as if it were padding",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("imagenet-same-draw-every-batch", "experiments/data/imagenet.py",
        "seeds = np.random.default_rng([self.seed, self.epoch, t + 1]).integers(",
        "seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(",
        "every ImageNet batch of an epoch gets the same per-position crop seeds",
        (TEST_PIPELINE, TEST_EPOCHS)),
    Bug("imagenet-vertical-flip", "experiments/data/imagenet.py",
        "return out[:, ::-1] if rng.random() < 0.5 else out",
        "return out[::-1] if rng.random() < 0.5 else out",
        "ImageNet's random flip mirrors top to bottom instead of left to right",
        (TEST_PIPELINE, TEST_EPOCHS)),
    # ------------------------------------------------------------ trainer
    # The two of issue #30 first; then the trainer's own, one per promise.
    Bug("bn-stats-never-updated", STEPS,
        'batch_stats=updates.get("batch_stats", state.batch_stats),',
        "batch_stats=state.batch_stats,",
        "the train step keeps the old BatchNorm statistics (issue #30): every BN network trains "
        "and evaluates with its initial running averages",
        (TEST_STEPS, TEST_CONTRACT)),
    Bug("optimizer-state-always-carried", TRAIN,
        "if run.config.inq.carry_optimizer_state and k > 1:", "if k > 1:",
        "every INQ phase carries the previous phase's momentum whatever "
        "inq.carry_optimizer_state says (issue #30; the paper restarts the optimizer)",
        (TEST_CONTRACT,)),
    Bug("carried-count-not-reset", TRAIN,
        'opt_state["base"] = optimizer.reset_count(state.opt_state["base"])',
        'opt_state["base"] = state.opt_state["base"]',
        "with inq.carry_optimizer_state the carried step count is not reset: the phase's "
        "schedule starts where the last one ended (a cosine at 0)",
        (TEST_CONTRACT,)),
    Bug("pruning-step-keeps-momentum", TRAIN,
        "state = run.devices.replicate(state.replace(opt_state=tx.init(state.params)).at(PRUNE, t))",
        "state = run.devices.replicate(state.at(PRUNE, t))",
        "a pruning step retrains with the previous stage's optimizer state: old momentum "
        "and a finished schedule",
        (TEST_CONTRACT,)),
    Bug("quantized-params-dropped", TRAIN,
        "state.replace(params=params, batch_stats=batch_stats, inq_state=inq_state,",
        "state.replace(batch_stats=batch_stats, inq_state=inq_state,",
        "advance's quantized weights are not written back: the frozen weights stay float "
        "(and frozen), the final model is not on the codebook",
        (TEST_CONTRACT,)),
    Bug("freeze-gets-pruning-masks", "experiments/train_state.py",
        "return self.inq_state.masks", "return prune.frozen(self.keep)",
        "the freeze gets the pruning masks in INQ too: the weights INQ froze keep training",
        (TEST_STEPS, TEST_CONTRACT)),
    Bug("dropout-key-not-folded", STEPS,
        "rng = jax.random.fold_in(dropout_key, state.step)", "rng = dropout_key",
        "dropout draws the same units at every step",
        (TEST_STEPS,)),
    Bug("loss-summed-over-batch", STEPS,
        'loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()',
        'loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()',
        "the train loss is summed over the batch: every gradient (and so the learning rate) "
        "is batch_size times too large",
        (TEST_STEPS,)),
    Bug("eval-in-train-mode", STEPS,
        "logits = model.apply(model_variables(params, batch_stats), images, train=False)",
        "logits = model.apply(model_variables(params, batch_stats), images, train=True)",
        "evaluation runs the model in training mode (batch statistics, dropout on)",
        (TEST_STEPS,)),
    Bug("eval-loss-counts-padding", STEPS,
        '"loss": jnp.sum(loss * mask), "count": jnp.sum(mask)}',
        '"loss": jnp.sum(loss), "count": jnp.sum(mask)}',
        "the test loss adds the padding examples' losses (divided by the real count)",
        (TEST_STEPS, TEST_LOOPS)),
    Bug("eval-sums-last-batch-only", LOOPS,
        "sums = out if sums is None else jax.tree.map(jnp.add, sums, out)", "sums = out",
        "evaluation keeps only the last batch's sums: the accuracy of a few examples",
        (TEST_STEPS, TEST_LOOPS)),
    Bug("eval-batch-not-rounded-to-devices", LOOPS,
        "return data.test_batches(devices.eval_batch_size(eval_batch_size))",
        "return data.test_batches(eval_batch_size)",
        "the eval batch is not rounded up to the device count: a batch size the devices do "
        "not divide cannot be sharded",
        (TEST_LOOPS,)),
    Bug("eval-batch-rounded-down", "experiments/mesh.py",
        "return -(-requested // self.count) * self.count",
        "return requested // self.count * self.count",
        "the eval batch is rounded down to the device count: 0 when it is smaller",
        (TEST_LOOPS,)),
    Bug("train-loss-sample-augmented", LOOPS,
        "batches = data.train_batches(size, 0, seed, augment=False)",
        "batches = data.train_batches(size, 0, seed)",
        "the train loss of a phase that does not train is measured on augmented images",
        (TEST_LOOPS,)),
    Bug("train-epoch-one-step-too-many", LOOPS,
        "if n == num_steps:", "if n > num_steps:",
        "a partial (last) epoch runs one step more than its share",
        (TEST_LOOPS,)),
    Bug("epoch-steps-off-by-one", OPTIMIZER,
        "full, rest = divmod(total, steps_per_epoch)",
        "full, rest = divmod(total - 1, steps_per_epoch)",
        "a segment trains one step fewer than its epochs (the last epoch is short by one)",
        (TEST_OPTIMIZER,)),
    Bug("cosine-over-one-epoch", OPTIMIZER,
        "total = max(1, sum(epoch_steps(epochs, steps_per_epoch)))",
        "total = max(1, steps_per_epoch)",
        "a segment's schedule lasts one epoch: a multi-epoch segment trains on at a rate of 0",
        (TEST_OPTIMIZER,)),
    Bug("sgd-momentum-dropped", OPTIMIZER,
        "optax.sgd(schedule, momentum=config.momentum or None,",
        "optax.sgd(schedule, momentum=None,",
        "the SGD optimizer ignores config.momentum: plain SGD where the paper uses 0.9",
        (TEST_STEPS, TEST_OPTIMIZER)),
    Bug("every-stage-on-the-inq-schedule", RUNNER,
        "schedule = optimizer.learning_rate(self.config[STAGE_NAMES[segment.stage]],",
        "schedule = optimizer.learning_rate(self.config.inq,",
        "the baseline and the pruning steps train with the INQ stage's learning rate and "
        "schedule",
        (TEST_CONTRACT,)),
    Bug("lr-logged-of-the-first-epoch", RUNNER,
        'lr = float(schedule(e * self.steps_per_epoch + metrics["steps"] - 1))',
        'lr = float(schedule(metrics["steps"] - 1))',
        "metrics.jsonl logs every epoch's learning rate as if it were the first epoch's",
        (TEST_CONTRACT,)),
    Bug("every-segment-on-the-run-seed", RUNNER,
        "batches = self.data.train_batches(self.config.batch_size, e, segment.data_seed)",
        "batches = self.data.train_batches(self.config.batch_size, e, self.config.seed)",
        "every segment shuffles and augments with the run's seed: each phase sees the "
        "baseline's epochs again, in the same order",
        (TEST_CONTRACT,)),
    Bug("resume-restarts-the-segment", RUNNER,
        "for e in range(int(state.epoch), len(chunks)):", "for e in range(len(chunks)):",
        "a resumed run retrains the segment in progress from its first epoch",
        (TEST_CONTRACT,)),
    Bug("epoch-saved-one-behind", RUNNER,
        "state = state.replace(epoch=jnp.int32(e + 1))", "state = state.replace(epoch=jnp.int32(e))",
        "the checkpoint after an epoch records the epoch before: a resumed run trains the "
        "last finished epoch again",
        (TEST_CONTRACT,)),
    Bug("restore-oldest-checkpoint", "experiments/checkpoints.py",
        "numbers = sorted(self._manager.all_steps(), reverse=True)",
        "numbers = sorted(self._manager.all_steps())",
        "a resumed run restores the oldest checkpoint kept, not the newest, and redoes "
        "the work in between",
        (T + "experiments/test_checkpoints.py", TEST_CONTRACT)),
    Bug("full-disk-asyncio-reports-shown", "experiments/checkpoints.py",
        'for _name in ("absl", "asyncio"):', 'for _name in ("absl",):',
        "a checkpoint write that runs out of space prints asyncio's tracebacks of orbax's "
        "unawaited write tasks beside the one-line error (when they are collected in time)",
        (T + "experiments/test_guards.py",)),
    Bug("asyncio-full-disk-reports-by-source-only", "experiments/checkpoints.py",
        'ours = record.name == "asyncio" or "/orbax/" in record.pathname',
        'ours = "/orbax/" in record.pathname or "/orbax/" in text',
        "asyncio's reports of failed writes are dropped only when they name orbax: a bare "
        "tensorstore future's report (no source in it) prints beside the one-line error",
        (T + "experiments/test_guards.py",)),
    Bug("save-variables-abandoned-writes-shown", "experiments/checkpoints.py",
        "_quiet_abandoned_writes()  # at import, before any save", "pass",
        "the abandoned writes of a save that ran out of space go unquieted: saving model "
        "variables (the baseline's, a converted init_checkpoint) or a checkpoint on a full "
        "disk prints a traceback for each beside the one-line error",
        (T + "experiments/test_guards.py",)),
    Bug("finetune-on-the-wrong-phase", RECIPE,
        "epochs = config.inq.final_finetune_epochs if k == len(portions) else config.inq.epochs",
        "epochs = config.inq.final_finetune_epochs if k == len(portions) - 1 else "
        "config.inq.epochs",
        "the final finetune's epochs go to the phase before the last, and the last (every "
        "kernel frozen) gets inq.epochs",
        (TEST_RECIPE,)),
    Bug("phases-reuse-the-baseline-seed", RECIPE,
        'out.append(Segment(INQ, k, epochs, seed + k, f"phase {k}/{len(portions)} (portion "',
        'out.append(Segment(INQ, k, epochs, seed, f"phase {k}/{len(portions)} (portion "',
        "every INQ phase gets the baseline's data seed: the same order and augmentation as "
        "the baseline's epochs",
        (TEST_RECIPE, TEST_CONTRACT)),
    Bug("pruning-seed-collides", RECIPE,
        "seed + 500 + t", "seed + t",
        "pruning step t gets INQ phase t's data seed",
        (TEST_RECIPE,)),
    Bug("torchvision-init-retrains-baseline", RECIPE,
        "pretrained_model = bool(config.init_checkpoint or config.init_torchvision)",
        "pretrained_model = bool(config.init_checkpoint)",
        "a run started from torchvision weights retrains a baseline for baseline.epochs "
        "(90 ImageNet epochs) before INQ",
        (TEST_RECIPE,)),
    # ------------------------------------------------------------ export reader (inq_jax)
    Bug("export-packed-length-loose", "inq_jax/_export_header.py",
        "(layout == _packing.LAYOUT_PACKED and length != least)",
        "(layout == _packing.LAYOUT_PACKED and length < least)",
        "the header check accepts a packed section longer than its codes need (issue #30: "
        "read_header passes, the file fails only later)",
        (T + "inq_jax/test_export.py", T + "inq_jax/test_export_hostile.py")),
    Bug("verify-skips-reencode", "inq_jax/verify_file.py",
        "if not valid.all() or not np.array_equal(codes, q.codes):",
        "if not valid.all():",
        "verify_file no longer checks that the decoded weights encode back to the stored "
        "codes (issue #30): a wrong decoder would pass as OK",
        (T + "inq_jax/test_verify_file.py",)),
    # ------------------------------------------------------------ command lines
    Bug("main-prints-on-other-processes", "experiments/main.py",
        "if jax.process_index() == 0:", "if jax.process_index() != 0:",
        "experiments.main prints the results on every process but the first (so a "
        "single-process run prints nothing)",
        (TEST_MAIN,)),
    Bug("main-cluster-flags-ignored", "experiments/main.py",
        "elif any(v is not None for v in cluster.values()):",
        "elif all(v is not None for v in cluster.values()):",
        "--num_processes or --process_id alone, without --config.distributed=True, is "
        "silently ignored and a single-process run starts",
        (TEST_MAIN,)),
    Bug("main-env-process-count", "experiments/distributed.py",
        'num_processes = _env_int("JAX_NUM_PROCESSES")',
        'num_processes = _env_int("JAX_PROCESS_ID")',
        "the process count is read from JAX_PROCESS_ID",
        (TEST_MAIN,)),
    Bug("evaluate-shape-check-dtype-only", "experiments/checkpoints.py",
        "if h[p] != w[p]])",
        "if h[p][-1] != w[p][-1]])",
        "the layout check compares only the dtypes when asked for them: evaluate accepts "
        "weights whose shapes do not fit the config's model (e.g. another class count) and "
        "fails later without naming the leaf",
        (TEST_EXPORT_CLI,)),
    Bug("export-cli-ignores-output", "experiments/tools/export.py",
        "output = FLAGS.output or checkpoints.export_path(FLAGS.workdir)",
        "output = checkpoints.export_path(FLAGS.workdir)",
        "the export command ignores --output and writes WORKDIR/model.inq",
        (TEST_EXPORT_CLI,)),
    Bug("codebook-report-signed-tail", "experiments/tools/codebook_report.py",
        '"tail": float(np.abs(w).max() / w.std())', '"tail": float(w.max() / w.std())',
        "codebook_report's max|w|/std ignores the negative weights",
        (T + "experiments/tools/test_codebook_report.py",)),
    Bug("shift-check-nchw-flatten", "experiments/tools/shift_check.py",
        "x = x.reshape(x.shape[0], -1)  # NHWC row-major, as LeNet's reshape",
        "x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)",
        "the integer LeNet flattens conv2's output channel-first (PyTorch's order), so fc1 "
        "multiplies the wrong activations",
        (T + "experiments/tools/test_shift_check.py",)),
    # ------------------------------------------------------------ low-bit options (issue #32)
    *LOWBIT_BUGS,
)


# ------------------------------------------------------------ checks


def problems(bugs: Sequence[Bug], root: str = REPO) -> List[str]:
  """Everything that makes the list unusable against the tree at `root`."""
  out = []
  ids = [b.id for b in bugs]
  for dup in sorted({i for i in ids if ids.count(i) > 1}):
    out.append(f"{dup}: the id is used twice")
  for bug in bugs:
    path = os.path.join(root, bug.file)
    if not os.path.isfile(path):
      out.append(f"{bug.id}: {bug.file} does not exist")
      continue
    with open(path, encoding="utf-8") as f:
      text = f.read()
    found = text.count(bug.original)
    if found != 1:
      out.append(f"{bug.id}: the original snippet occurs {found} times in {bug.file}, "
                 f"not once: {bug.original!r}")
      continue
    if bug.replacement == bug.original:
      out.append(f"{bug.id}: the replacement is the original")
    if "\n" in bug.original or "\n" in bug.replacement:
      out.append(f"{bug.id}: not a single-line bug")
    try:
      compile(text.replace(bug.original, bug.replacement), path, "exec")
    except SyntaxError as e:
      out.append(f"{bug.id}: the planted {bug.file} does not compile ({e})")
    if not bug.tests:
      out.append(f"{bug.id}: no test files listed")
    for test in bug.tests:
      if not os.path.isfile(os.path.join(root, test.split("::")[0])):
        out.append(f"{bug.id}: listed test file {test} does not exist")
  return out


# ------------------------------------------------------------ planting and running


def copy_tree(dest: str, root: str = REPO) -> None:
  """The working tree's tracked and untracked non-ignored files, as they are now."""
  files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, check=True, capture_output=True).stdout.split(b"\0")
  for name in files:
    if not name:
      continue
    rel = os.fsdecode(name)
    src = os.path.join(root, rel)
    if not os.path.lexists(src):
      continue  # deleted in the working tree
    target = os.path.join(dest, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(src):
      os.symlink(os.readlink(src), target)
    elif os.path.isfile(src):
      shutil.copy2(src, target)
  venv = os.path.join(root, ".venv")
  if os.path.exists(venv):  # tests that run .venv/bin/... find the same environment
    os.symlink(os.path.realpath(venv), os.path.join(dest, ".venv"))


def plant(bug: Bug, copy: str) -> None:
  path = os.path.join(copy, bug.file)
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.count(bug.original) != 1:
    raise SystemExit(f"{bug.id}: snippet not found exactly once in the copy of {bug.file}")
  with open(path, "w", encoding="utf-8") as f:
    f.write(text.replace(bug.original, bug.replacement))


@dataclasses.dataclass
class Run:
  caught: Optional[bool]  # None: could not tell (a pytest usage error, a timeout)
  status: str             # "caught", "NOT caught", "timeout", "error (exit N)"
  failing: str            # the first failing test's id, or ""
  seconds: float


def first_failure(junit: str) -> str:
  """The id of the first failed or errored test case in a JUnit XML report."""
  try:
    root = ET.parse(junit).getroot()
  except (OSError, ET.ParseError):
    return ""
  for case in root.iter("testcase"):
    for child in case:
      if child.tag in ("failure", "error"):
        cls = case.get("classname", "")
        name = case.get("name", "")
        # importlib mode: classname is the dotted path of the test module.
        module = cls.replace(".", "/") + ".py" if cls else ""
        when = " (setup)" if child.tag == "error" else ""
        return f"{module}::{name}{when}" if name else module
  return ""


def run_pytest(copy: str, targets: Sequence[str], timeout: float, workers: int = 0) -> Run:
  junit = os.path.join(copy, ".plant_bugs_junit.xml")
  cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         f"--junitxml={junit}", "-o", "junit_family=xunit2"]
  cmd += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
  cmd += list(targets)
  env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return Run(None, "timeout", "", time.perf_counter() - start)
  seconds = time.perf_counter() - start
  failing = first_failure(junit)
  if proc.returncode == 0:
    return Run(False, "NOT caught", "", seconds)
  if proc.returncode in (1, 2):  # test failures; interrupted (e.g. a collection error)
    if not failing:
      m = re.search(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)
      failing = m.group(1) if m else f"exit {proc.returncode}"
    return Run(True, "caught", failing, seconds)
  tail = (proc.stdout + proc.stderr)[-2000:]
  print(tail, file=sys.stderr)
  return Run(None, f"error (exit {proc.returncode})", "", seconds)


@dataclasses.dataclass
class Result:
  bug: Bug
  listed: Run
  full: Optional[Run] = None

  @property
  def caught(self) -> bool:
    return bool(self.listed.caught or (self.full is not None and self.full.caught))


def run_bug(bug: Bug, args) -> Result:
  with tempfile.TemporaryDirectory(prefix=f"plant_{bug.id}_") as copy:
    copy_tree(copy)
    plant(bug, copy)
    listed = run_pytest(copy, bug.tests, args.timeout)
    full = None
    if args.full and not listed.caught:
      full = run_pytest(copy, [], args.timeout, args.workers)
    if args.keep:
      kept = copy + ".kept"
      shutil.copytree(copy, kept, symlinks=True)
      print(f"  kept {kept}")
  return Result(bug, listed, full)


# ------------------------------------------------------------ the doc


def _cell(text: str) -> str:
  return text.replace("|", "\\|").replace("\n", " ")


def _code(text: str) -> str:
  return f"`` {_cell(text)} ``" if "`" in text else f"`{_cell(text)}`"


def catalogue(bugs: Sequence[Bug]) -> str:
  lines = ["| id | file | original | replacement | what it breaks | expected to fail |",
           "|---|---|---|---|---|---|"]
  for b in bugs:
    tests = "<br>".join(_code(t) for t in b.tests)
    lines.append(f"| {b.id} | `{b.file}` | {_code(b.original)} | {_code(b.replacement)} | "
                 f"{_cell(b.breaks)} | {tests} |")
  return "\n".join(lines)


def results_table(results: Sequence[Result], note: str = "") -> str:
  full = any(r.full is not None for r in results)
  head = "| id | file | listed test files | first failing test | seconds |"
  rule = "|---|---|---|---|---|"
  if full:
    head += " whole suite (`-x`) | first failing test | seconds |"
    rule += "---|---|---|"
  lines = [head, rule]
  for r in results:
    row = (f"| {r.bug.id} | `{r.bug.file}` | {r.listed.status} | "
           f"{_code(r.listed.failing) if r.listed.failing else ''} | {r.listed.seconds:.0f} |")
    if full:
      if r.full is None:
        row += " (not run) | | |"
      else:
        failing = _code(r.full.failing) if r.full.failing else ""
        row += f" {r.full.status} | {failing} | {r.full.seconds:.0f} |"
    lines.append(row)
  caught = sum(r.caught for r in results)
  lines.append("")
  lines.append(f"{caught} of {len(results)} planted bugs caught.{(' ' + note) if note else ''}")
  return "\n".join(lines)


def write_between(path: str, which: str, body: str) -> None:
  start, end = MARKERS[which]
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.count(start) != 1 or text.count(end) != 1:
    raise SystemExit(f"{path}: needs exactly one {start} and one {end}")
  before, rest = text.split(start)
  _, after = rest.split(end)
  with open(path, "w", encoding="utf-8") as f:
    f.write(f"{before}{start}\n{body}\n{end}{after}")


def run_stamp(root: str = REPO) -> str:
  """'Run on commit abc1234 (+ uncommitted changes), 2025-01-31, N CPUs.'"""
  def git(*args):
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                          check=False).stdout.strip()
  commit = git("rev-parse", "--short", "HEAD") or "(no git)"
  dirty = " + uncommitted changes" if git("status", "--porcelain", "--untracked-files=no") else ""
  return (f"Run on commit {commit}{dirty}, {time.strftime('%Y-%m-%d')}, "
          f"{os.cpu_count()} CPUs.")


# ------------------------------------------------------------ main


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("ids", nargs="*", help="bugs to plant (default: all)")
  parser.add_argument("--full", action="store_true",
                      help="run the whole suite (-x) for a bug its listed files miss")
  parser.add_argument("--workers", type=int, default=0,
                      help="xdist workers for --full runs (default: none)")
  parser.add_argument("--baseline", action="store_true",
                      help="first run the listed test files on the unplanted copy; stop if "
                           "they fail")
  parser.add_argument("--check", action="store_true",
                      help="only check that every snippet is found exactly once")
  parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
  parser.add_argument("--catalogue", action="store_true",
                      help="write the catalogue into the doc and exit")
  parser.add_argument("--write-doc", action="store_true",
                      help=f"write the catalogue and the results table into {DOC}")
  parser.add_argument("--json", help="also write the results as JSON to this file")
  parser.add_argument("--keep", action="store_true", help="keep the planted copies")
  parser.add_argument("--timeout", type=float, default=1800,
                      help="seconds per pytest run (default 1800)")
  args = parser.parse_args(argv)

  bugs = list(BUGS)
  if args.ids:
    known = {b.id: b for b in BUGS}
    unknown = [i for i in args.ids if i not in known]
    if unknown:
      parser.error(f"unknown ids: {', '.join(unknown)}")
    bugs = [known[i] for i in args.ids]
  bad = problems(BUGS)
  if bad:
    print("plant_bugs: the list does not match the code:\n  " + "\n  ".join(bad),
          file=sys.stderr)
    return 2
  if args.check:
    print(f"plant_bugs: all {len(BUGS)} snippets found exactly once")
    return 0
  if args.list:
    print(catalogue(bugs))
    return 0
  if args.catalogue:
    write_between(os.path.join(REPO, DOC), "catalogue", catalogue(BUGS))
    return 0

  if args.baseline:
    targets = sorted({t for b in bugs for t in b.tests})
    with tempfile.TemporaryDirectory(prefix="plant_baseline_") as copy:
      copy_tree(copy)
      base = run_pytest(copy, targets, args.timeout)
    status = "passed" if base.caught is False else f"FAILED ({base.status})"
    print(f"baseline (no bug planted): {len(targets)} test files {status} in "
          f"{base.seconds:.0f} s {base.failing}", flush=True)
    if base.caught is not False:
      print("plant_bugs: the listed test files fail without any bug planted", file=sys.stderr)
      return 2

  results = []
  for i, bug in enumerate(bugs, 1):
    print(f"[{i}/{len(bugs)}] {bug.id} ({bug.file}) ...", end=" ", flush=True)
    r = run_bug(bug, args)
    text = f"{r.listed.status} in {r.listed.seconds:.0f} s {r.listed.failing}"
    if r.full is not None:
      text += f"; whole suite: {r.full.status} in {r.full.seconds:.0f} s {r.full.failing}"
    print(text, flush=True)
    results.append(r)

  table = results_table(results, run_stamp())
  print()
  print(table)
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump([{"id": r.bug.id, "file": r.bug.file, "tests": list(r.bug.tests),
                  "listed": dataclasses.asdict(r.listed),
                  "full": dataclasses.asdict(r.full) if r.full else None} for r in results],
                f, indent=1)
  if args.write_doc:
    doc = os.path.join(REPO, DOC)
    write_between(doc, "catalogue", catalogue(BUGS))
    write_between(doc, "results", table)
  return 0 if all(r.caught for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
