"""Evaluates an exported `.inq` model on its config's test split.

  python -m experiments.tools.evaluate --config=experiments/configs/fashion_mnist_lenet.py \
      --weights=workdirs/fashion_mnist_lenet/model.inq [--config.dataset.data_dir=...]

Builds the config's model and test split exactly as training does and runs the
trainer's own evaluation (`steps.make_eval_step` and `loops.evaluate`, same
batches, same compiled step), so the accuracy equals the run's final test
accuracy bit for bit. Prints one JSON line: {"test_accuracy", "test_loss",
("top5_accuracy",) "weights", "model", "dataset", "test_split", "test_examples",
"bits", "layer_bits", "mean_bits"}: "bits" is the file's default width,
"layer_bits" each quantized leaf's own width and "mean_bits" the average
width per quantized weight (they differ with `inq.layer_bits`). The weights come from `inq_jax.export.load_with_extras` (the params and
extras["batch_stats"]); the file is checked (CRCs, codebooks) as it is read.
"""

import json

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from experiments import checkpoints, errors, loops, models, recipe, reporting, steps
from experiments.data import input_pipeline
from experiments.mesh import Devices
from inq_jax import export


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("weights", None, "The exported model (.inq), e.g. WORKDIR/model.inq.")
  flags.mark_flags_as_required(["config", "weights"])


FLAGS = flags.FLAGS


def _check_fits(model, data, variables, weights: str, model_name: str):
  """Raises ValueError naming every leaf where the file and the model disagree."""
  shape = (1,) + tuple(data.image_shape)
  template = jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))
  template = {"params": template["params"], "batch_stats": template.get("batch_stats", {})}
  problems = checkpoints.layout_problems(template, variables, dtypes=True,
                                        names=("the file", "the model"))
  if problems:
    raise errors.InputError(f"--weights {weights} does not fit model {model_name!r}: "
                            + "; ".join(problems[:8]))


def read_weights(weights: str):
  """(params, extras, widths) of the exported file `weights` (local or gs://).

  `widths` is `file_bits` of its header: {"bits", "layer_bits", "mean_bits"}.

  Raises:
    InputNotFoundError if it is missing; InputError (a ValueError) naming the
    file if it is not a readable `.inq` file (the reader's own reason).
  """
  if not reporting.abs_path(weights).exists():
    raise errors.InputNotFoundError(f"--weights {weights} does not exist")
  try:
    with reporting.read_locally(weights) as local:  # inq_jax.export reads local files
      params, extras = export.load_with_extras(local)
      widths = file_bits(export.read_header(local))
  except (ValueError, OSError) as e:  # the reader names what is wrong with the file
    raise errors.InputError(f"--weights {weights} cannot be used: {e}") from None
  return params, extras, widths


def evaluate(config, weights: str) -> dict:
  """Test-split metrics of the exported model `weights` under `config`.

  Returns:
    {"test_accuracy", "test_loss", ("top5_accuracy",) "weights", "model",
     "dataset", "test_split", "test_examples", "bits", "layer_bits", "mean_bits"}.

  Raises:
    ConfigError for a bad config value; InputError (a ValueError) if the file is
    damaged or does not fit the config's model.
  """
  recipe.check_values(config)  # the settings it reads (model, dataset, batch, dtype) too
  params, extras, widths = read_weights(weights)
  variables = {"params": params, "batch_stats": extras.get("batch_stats", {})}
  data = input_pipeline.get_dataset(config.dataset)
  model = models.from_config(config, data.num_classes)
  _check_fits(model, data, variables, weights, config.model)
  devices = Devices()
  eval_step = steps.make_eval_step(model, devices, top5=data.num_classes > 10,
                                   normalization=data.normalization)
  variables = devices.replicate(variables)
  result = loops.evaluate(eval_step, variables["params"], variables["batch_stats"],
                          loops.test_batches(data, config.eval_batch_size, devices), devices)
  out = {"test_accuracy": result["accuracy"], "test_loss": result["loss"]}
  if "top5_accuracy" in result:
    out["top5_accuracy"] = result["top5_accuracy"]
  out.update({"weights": weights, "model": config.model, "dataset": config.dataset.name,
              "test_split": config.dataset.test_split, "test_examples": data.test_size,
              **widths})
  return out


def file_bits(header: dict) -> dict:
  """{"bits", "layer_bits", "mean_bits"} of an export file's (checked) header."""
  leaves = [leaf for leaf in header["leaves"] if leaf["kind"] == "quantized"]
  return {"bits": header["bits"], **reporting.bits_entry(
      {leaf["path"]: (leaf["bits"], int(np.prod(leaf["shape"], dtype=np.int64)))
       for leaf in leaves})}


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(evaluate(FLAGS.config, FLAGS.weights)), flush=True)


if __name__ == "__main__":
  define_flags()
  errors.run(main, "experiments.tools.evaluate")
