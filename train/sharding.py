"""Data parallelism with ``jax.sharding``: a 1-D device mesh with a ``data`` axis.

A training step consumes S packed sub-batches stacked along a new leading axis, [S, ...]. That axis
is sharded over ``data`` (S is a multiple of the global device count, so every device holds S / D
whole sub-batches); parameters and optimiser state are replicated. Inside the jitted step the
per-sub-batch loss is ``jax.vmap``-ed over the leading axis, so neighbour gathers stay local to a
device, and XLA inserts the all-reduce of the gradient of the mean loss. Sharding parameters later
only means returning other specs from :func:`state_sharding`.

Multi-host: every process calls :func:`maybe_initialize_distributed` before touching devices and
feeds only its own S / process_count sub-batches (its data shard) to :func:`shard_batch`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Environment variables that request a multi-process launch (set by the launcher on every process).
COORDINATOR_ENV = "E2F_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "E2F_NUM_PROCESSES"
PROCESS_ID_ENV = "E2F_PROCESS_ID"


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` only for a multi-process launch.

  Arguments take precedence over the ``E2F_*`` environment variables. A single-process run (no
  coordinator, or one process) does nothing.

  Returns:
    True when the distributed runtime was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
  if num_processes is None and NUM_PROCESSES_ENV in os.environ:
    num_processes = int(os.environ[NUM_PROCESSES_ENV])
  if process_id is None and PROCESS_ID_ENV in os.environ:
    process_id = int(os.environ[PROCESS_ID_ENV])
  if coordinator_address is None or (num_processes or 1) <= 1:
    return False
  if process_id is None:
    raise ValueError(f"multi-process launch with {num_processes} processes needs a process id "
                     f"(--process-id or ${PROCESS_ID_ENV})")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def make_mesh(num_devices: int | None = None) -> Mesh:
  """1-D mesh over the first ``num_devices`` devices (default: all, across processes)."""
  devices = jax.devices()
  if num_devices is not None:
    if not 1 <= num_devices <= len(devices):
      raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def state_sharding(mesh: Mesh, state) -> object:
  """Sharding pytree for the train state: everything replicated."""
  replicated = NamedSharding(mesh, P())
  return jax.tree.map(lambda _: replicated, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (sub-batch) axis split over ``data``; the rest of every array local."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batches_per_step(mesh: Mesh, batches_per_step: int) -> int:
  """Sub-batches this process contributes per step: its share of the global S."""
  num_devices = mesh.devices.size
  if batches_per_step % num_devices:
    raise ValueError(f"data.batches_per_step={batches_per_step} must be a multiple of the "
                     f"{num_devices} devices of the mesh")
  return batches_per_step // jax.process_count()


def stack(items: list) -> object:
  """Stack same-shaped pytrees of host arrays along a new leading axis: [S, ...]."""
  return jax.tree.map(lambda *xs: np.stack(xs), *items)


def shard_batch(mesh: Mesh, local_stacked) -> object:
  """Global [S, ...] arrays from this process's [S / process_count, ...] host arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_stacked)


def to_host_local(mesh: Mesh, global_tree) -> object:
  """This process's rows of leading-axis-sharded outputs, as numpy arrays."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, global_tree)
  local = multihost_utils.global_array_to_host_local_array(global_tree, mesh, P(DATA_AXIS))
  return jax.tree.map(np.asarray, local)


def sum_across_processes(x: np.ndarray) -> np.ndarray:
  """Elementwise sum of a host array over processes (identity for one process)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x)).sum(axis=0)
