"""Evaluates an exported `.inq` model on its config's test split.

  python -m experiments.tools.evaluate --config=experiments/configs/fashion_mnist_lenet.py \
      --weights=workdirs/fashion_mnist_lenet/model.inq [--config.dataset.data_dir=...]

Builds the config's model and test split exactly as training does and runs the
trainer's own evaluation (`steps.make_eval_step` and `steps.evaluate`, same
batches, same compiled step), so the accuracy equals the run's final test
accuracy bit for bit. Prints one JSON line: {"test_accuracy", "test_loss",
("top5_accuracy",) "weights", "model", "dataset", "test_split", "test_examples",
"bits"}. The weights come from `inq_jax.export.load_with_extras` (the params and
extras["batch_stats"]); the file is checked (CRCs, codebooks) as it is read.
"""

import json

from absl import app
from absl import flags
from ml_collections import config_flags


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("weights", None, "The exported model (.inq), e.g. WORKDIR/model.inq.")
  flags.mark_flags_as_required(["config", "weights"])


FLAGS = flags.FLAGS


def _layout(tree, prefix=""):
  import jax  # pylint: disable=g-import-not-at-top
  from inq_jax.tree import leaves_with_paths  # pylint: disable=g-import-not-at-top
  return {f"{prefix}{p}": (tuple(jax.numpy.shape(x)), str(jax.numpy.result_type(x)))
          for p, x in leaves_with_paths(tree)[0]}


def _check_fits(model, data, params, batch_stats, weights: str, model_name: str):
  """Raises ValueError naming every leaf where the file and the model disagree."""
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import models  # pylint: disable=g-import-not-at-top
  shape = (1,) + tuple(data.image_shape)
  template = jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))
  want = _layout(template["params"], "params/")
  want.update(_layout(template.get("batch_stats", {}), "batch_stats/"))
  have = {**_layout(params, "params/"), **_layout(batch_stats, "batch_stats/")}
  problems = [f"missing {p}" for p in sorted(set(want) - set(have))]
  problems += [f"unexpected {p}" for p in sorted(set(have) - set(want))]
  problems += [f"{p}: {have[p]} in the file, {want[p]} in the model"
               for p in sorted(set(want) & set(have)) if have[p] != want[p]]
  if problems:
    raise ValueError(f"{weights} does not fit model {model_name!r}: " + "; ".join(problems[:8]))


def evaluate(config, weights: str) -> dict:
  """Test-split metrics of the exported model `weights` under `config`.

  Returns:
    {"test_accuracy", "test_loss", ("top5_accuracy",) "weights", "model",
     "dataset", "test_split", "test_examples", "bits"}.

  Raises:
    ValueError if the file is damaged or does not fit the config's model.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from experiments import models, steps  # pylint: disable=g-import-not-at-top
  from experiments.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from inq_jax import export  # pylint: disable=g-import-not-at-top
  if "://" in weights:  # inq_jax.export reads local files: evaluate a local copy
    import os, tempfile  # pylint: disable=g-import-not-at-top,multiple-imports
    from etils import epath  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory() as tmp:
      local = os.path.join(tmp, os.path.basename(weights))
      epath.Path(local).write_bytes(epath.Path(weights).read_bytes())
      return {**evaluate(config, local), "weights": weights}
  params, extras = export.load_with_extras(weights)
  batch_stats = extras.get("batch_stats", {})
  data = input_pipeline.get_dataset(config.dataset)
  model = models.get_model(config.model, data.num_classes, dtype=jnp.dtype(config.dtype))
  _check_fits(model, data, params, batch_stats, weights, config.model)
  devices = steps.Devices()
  eval_step = steps.make_eval_step(model, devices, top5=data.num_classes > 10,
                                   normalization=data.normalization)
  variables = devices.replicate({"params": params, "batch_stats": batch_stats})
  result = steps.evaluate(eval_step, variables["params"], variables["batch_stats"],
                          steps.test_batches(data, config.eval_batch_size, devices), devices)
  out = {"test_accuracy": result["accuracy"], "test_loss": result["loss"]}
  if "top5_accuracy" in result:
    out["top5_accuracy"] = result["top5_accuracy"]
  out.update({"weights": weights, "model": config.model, "dataset": config.dataset.name,
              "test_split": config.dataset.test_split, "test_examples": data.test_size,
              "bits": export.read_header(weights)["bits"]})
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(json.dumps(evaluate(FLAGS.config, FLAGS.weights)), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
