"""Where a run computes: a 1-D mesh over every device, batches sharded, state replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


class Devices:
  """A 1-D mesh over every device: batch sharded on `data`, state replicated."""

  def __init__(self):
    self.mesh = Mesh(np.array(jax.devices()), ("data",))
    self.replicated = NamedSharding(self.mesh, P())
    self.batch = NamedSharding(self.mesh, P("data"))
    self.count = jax.device_count()
    # Fake multi-device CPU backends can deadlock in the all-reduce unless each
    # step is waited for; real accelerators keep their async dispatch.
    self.sync_each_step = jax.default_backend() == "cpu" and self.count > 1

  def put_batch(self, batch: dict) -> dict:
    return {k: jax.make_array_from_process_local_data(self.batch, np.asarray(v))
            for k, v in batch.items()}

  def replicate(self, tree):
    if jax.process_count() == 1:
      return jax.device_put(tree, self.replicated)
    # Several processes: an array on this process's own device cannot be
    # device_put onto the global mesh (no cross-host transfers); every process
    # holds the same values, so each fills its devices' replicas from its copy.
    def put(x):
      if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return jax.device_put(x, self.replicated)
      return jax.make_array_from_process_local_data(self.replicated, np.asarray(x))
    return jax.tree.map(put, tree)

  def eval_batch_size(self, requested: int) -> int:
    """`requested` rounded up to a multiple of the devices; the padding is masked out."""
    return -(-requested // self.count) * self.count

  def check_all_reduce(self) -> None:
    """Sums a one from every device over the mesh; raises unless it gives the device count."""
    ones = self.put_batch({"x": np.ones(jax.local_device_count(), np.int32)})["x"]
    total = jax.jit(lambda x: x.sum(), out_shardings=self.replicated)(ones)
    if int(total) != self.count:
      raise RuntimeError(f"all-reduce over {self.count} devices gave {int(total)}")
