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
"""

import logging as pylogging
import os

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


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """`jax.distributed.initialize`, before any JAX computation; unset values from the env.

  Anything still unset is left to JAX, which detects it on Cloud TPU VMs, Slurm
  and Open MPI. Cross-process collectives on CPU go over gloo (on GPU and TPU
  this setting is unused).
  """
  import jax  # pylint: disable=g-import-not-at-top
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    _connect_cpu_collectives()


def _connect_cpu_collectives():
  """One all-reduce over every device, right after `initialize` while the processes are in step.

  Gloo connects a set of devices on its first collective and gives up if one
  process comes more than 30 s after another (a fixed limit in XLA), e.g.
  when one host is still compiling the train step. Once connected, a
  collective waits for late processes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top
  mesh = Mesh(np.array(jax.devices()), ("data",))  # the mesh of steps.Devices
  ones = jax.make_array_from_process_local_data(
      NamedSharding(mesh, PartitionSpec("data")), np.ones(jax.local_device_count(), np.int32))
  total = jax.jit(lambda x: x.sum(), out_shardings=NamedSharding(mesh, PartitionSpec()))(ones)
  if int(total) != jax.device_count():
    raise RuntimeError(f"all-reduce over {jax.device_count()} devices gave {int(total)}")


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
  cluster = {k: FLAGS[k].value for k in ("coordinator_address", "num_processes", "process_id")}
  if FLAGS.config.get("distributed", False):
    initialize_distributed(**cluster)  # multi-host slice / cluster; before any JAX call
  elif any(v is not None for v in cluster.values()):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id need "
                         "--config.distributed=True")
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
  app.run(main)
