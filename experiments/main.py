"""Runs an INQ experiment.

  python -m experiments.main --config=experiments/configs/fashion_mnist_lenet.py \
      --workdir=workdirs/fashion_mnist_lenet [--config.inq.bits=4 ...]

Rerunning the same command resumes an interrupted run, or reprints a finished
one's results.
"""

import logging as pylogging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.mark_flags_as_required(["config", "workdir"])


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
  # Imported here so that --help stays fast and flag errors come first.
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import reporting, train  # pylint: disable=g-import-not-at-top
  if FLAGS.config.get("distributed", False):
    jax.distributed.initialize()  # multi-host TPU slice / GPU cluster; before any JAX call
  logging.info("JAX %s on %d %s device(s)", jax.__version__, jax.device_count(),
               jax.devices()[0].device_kind)
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    for line in reporting.summary_lines(results):
      print(line, flush=True)
    print(f"results: {FLAGS.workdir.rstrip('/')}/{reporting.RESULTS_FILE}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
