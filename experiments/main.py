"""Runs an INQ experiment.

  python -m experiments.main --config=experiments/configs/fashion_mnist_lenet.py \
      --workdir=workdirs/fashion_mnist_lenet [--config.inq.bits=4 ...]

Rerunning the same command resumes an interrupted run, or reprints a finished
one's results.

Multi-host (one process per host, every host runs the same command):

  # TPU VM slice, Slurm, Open MPI: JAX finds the coordinator and process ids itself
  python -m experiments.main --config=... --workdir=SHARED_DIR --config.distributed=True

  # anywhere else (e.g. 2 processes on one machine, CPU collectives over gloo):
  python -m experiments.main --config=... --workdir=SHARED_DIR --config.distributed=True \
      --coordinator_address=HOST0:PORT --num_processes=2 --process_id=I

The workdir must be one filesystem all processes see (a shared disk or gs://).
Instead of the three flags, JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID in the environment work too.

One run per workdir: a second command on a workdir that a live run holds is
refused, naming it (WORKDIR/run.lock, `experiments.workdir_lock`). Every
setting is checked before the workdir is touched; a mistake in the command
gets one message naming the key, the value and the fix, and exit status 2.
"""

import logging as pylogging

from absl import flags
from absl import logging
from ml_collections import config_flags

from experiments import errors


def define_flags():
  """Defines this command's flags (only when run as a program, so that
  importing several experiment modules in one process never clashes)."""
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
  config_flags.DEFINE_config_file("config", None, "Experiment configuration file.",
                                  lock_config=True)
  flags.DEFINE_string("coordinator_address", None,
                      "With --config.distributed=True: HOST:PORT of process 0 (default "
                      "$JAX_COORDINATOR_ADDRESS; on TPU VMs, Slurm, Open MPI: detected).")
  flags.DEFINE_integer("num_processes", None,
                       "With --config.distributed=True: how many processes (default "
                       "$JAX_NUM_PROCESSES, or detected).")
  flags.DEFINE_integer("process_id", None,
                       "With --config.distributed=True: this process's index, 0..n-1 "
                       "(default $JAX_PROCESS_ID, or detected).")
  flags.mark_flags_as_required(["config", "workdir"])


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise errors.UserError(f"unexpected arguments {argv[1:]}: settings are flags, e.g. "
                           "--config.inq.bits=4")
  logging.set_verbosity(logging.INFO)
  # Orbax logs every save step at INFO; keep its warnings, drop the chatter.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= pylogging.WARNING or "/orbax/" not in r.pathname)
  # Imported here, not at the top, so that --help and flag errors come at once:
  # jax and the trainer take seconds to import (measured).
  import jax  # pylint: disable=g-import-not-at-top
  from experiments import distributed, recipe, reporting, train, workdir_lock  # pylint: disable=g-import-not-at-top
  cluster = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes", "process_id")}
  # Every value before anything else: before the processes of a multi-host
  # run wait for one another, and before any data is read.
  recipe.check_values(FLAGS.config)
  if FLAGS.config.distributed:
    distributed.initialize(**cluster)  # multi-host slice / cluster; before any JAX call
  elif any(v is not None for v in cluster.values()):
    raise errors.UserError("--coordinator_address, --num_processes and --process_id need "
                           "--config.distributed=True")
  if jax.process_count() == 1:
    # A live run on this workdir: refused now, not after the data is read. (With
    # several processes process 0 decides, when it takes the lock.)
    workdir_lock.probe(FLAGS.workdir)
  logging.info("JAX %s on %d %s device(s), process %d of %d", jax.__version__,
               jax.device_count(), jax.devices()[0].device_kind, jax.process_index(),
               jax.process_count())
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    for line in reporting.summary_lines(results):
      print(line, flush=True)
    print(f"results: {FLAGS.workdir.rstrip('/')}/{reporting.RESULTS_FILE}", flush=True)


if __name__ == "__main__":
  define_flags()
  errors.run(main, "experiments.main")
