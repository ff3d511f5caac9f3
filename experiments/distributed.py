"""Multi-host runs: one process per host, joined by `jax.distributed.initialize`."""

from __future__ import annotations

import os

import jax

from experiments.mesh import Devices


def _env_int(name):
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def initialize(coordinator_address=None, num_processes=None, process_id=None):
  """`jax.distributed.initialize`, before any JAX computation; unset values from the env.

  Anything still unset is left to JAX, which detects it on Cloud TPU VMs, Slurm
  and Open MPI. Cross-process collectives on CPU go over gloo (on GPU and TPU
  this setting is unused).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
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
