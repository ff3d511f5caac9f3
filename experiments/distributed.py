"""Multi-host runs: one process per host, joined by `jax.distributed.initialize`."""

from __future__ import annotations

import os
import re

import jax

from experiments.errors import UserError
from experiments.mesh import Devices


def _env_int(name):
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"${name}={value!r} is not an integer") from None


def check_cluster(coordinator_address, num_processes, process_id) -> None:
  """Refuses cluster settings JAX would fail on late or hang with (a user's mistake).

  Raises:
    UserError naming the setting, its value and what it must be.
  """
  if coordinator_address is not None and not re.fullmatch(r"\[?[\w.:-]+\]?:\d{1,5}",
                                                           coordinator_address):
    raise UserError(f"--coordinator_address={coordinator_address!r} must be HOST:PORT of "
                    "process 0, e.g. 10.0.0.2:1234")
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes={num_processes} must be at least 1")
  if process_id is not None and process_id < 0:
    raise UserError(f"--process_id={process_id} must be >= 0")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise UserError(f"--process_id={process_id} must be in [0, --num_processes="
                    f"{num_processes}) (each process of the run has its own)")


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """`jax.distributed.initialize`, before any JAX computation; unset values from the env.

  Anything still unset is left to JAX, which detects it on Cloud TPU VMs, Slurm
  and Open MPI. Cross-process collectives on CPU go over gloo (on GPU and TPU
  this setting is unused).

  Raises:
    UserError for settings that cannot describe a cluster (`check_cluster`).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  check_cluster(coordinator_address, num_processes, process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  if jax.default_backend() == "cpu" and jax.process_count() > 1:
    # One all-reduce over every device, right after `initialize` while the
    # processes are in step. Gloo connects a set of devices on its first
    # collective and gives up if one process comes more than 30 s after another
    # (a fixed limit in XLA), e.g. when one host is still compiling the train
    # step. Once connected, a collective waits for late processes.
    Devices().check_all_reduce()
