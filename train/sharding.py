"""Data parallelism with ``jax.sharding``: a 1-D device mesh with a ``data`` axis.

A training step consumes S packed sub-batches stacked along a new leading axis, [S, ...]. That axis
is sharded over ``data`` (S is a multiple of the global device count, so every device holds S / D
whole sub-batches); parameters and optimiser state are replicated. Inside the jitted step the
per-sub-batch loss is ``jax.vmap``-ed over the leading axis, so neighbour gathers stay local to a
device, and XLA inserts the all-reduce of the gradient of the mean loss. Sharding parameters later
only means returning other specs from :func:`state_sharding`.

Multi-host: every process calls :func:`maybe_initialize_distributed` before touching devices and
feeds only its own S / process_count sub-batches (its data shard) to :func:`shard_batch`. On the
CPU, jax 0.11's default cross-process collectives (gloo over TCP) serve such a run as they are.
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
# Clusters whose environment ``jax.distributed.initialize()`` reads by itself (jax/_src/clusters).
AUTO_DETECTED_CLUSTERS = "SLURM, Open MPI, Kubernetes, Cloud TPU"


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, *, auto: bool = False) -> bool:
  """Calls ``jax.distributed.initialize`` only for a multi-process launch.

  Arguments take precedence over the ``E2F_*`` environment variables. An explicit launch needs all
  three and makes every process use all its local devices (no cluster auto-detection, which on
  SLURM would leave one device per process). ``auto`` lets jax read the cluster scheduler's
  environment for whatever is not given. A single-process run (nothing given, or one process)
  does nothing.

  Returns:
    True when the distributed runtime was initialised.

  Raises:
    ValueError: when a launch is incomplete or ``auto`` finds no cluster environment.
  """
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
  num_processes = num_processes if num_processes is not None else _int_from_env(NUM_PROCESSES_ENV)
  process_id = process_id if process_id is not None else _int_from_env(PROCESS_ID_ENV)
  if auto:
    try:
      jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                 process_id=process_id)
    except ValueError as err:  # jax: "coordinator_address should be defined." and the like
      raise ValueError(f"--auto-cluster: {err} (jax.distributed reads the environment of "
                       f"{AUTO_DETECTED_CLUSTERS}; elsewhere give --coordinator-address, "
                       "--num-processes and --process-id)") from err
    return True
  launch = {f"--coordinator-address or ${COORDINATOR_ENV}": coordinator_address,
            f"--num-processes or ${NUM_PROCESSES_ENV}": num_processes,
            f"--process-id or ${PROCESS_ID_ENV}": process_id}
  if num_processes == 1 or all(value is None for value in launch.values()):
    return False
  missing = [name for name, value in launch.items() if value is None]
  if missing:
    raise ValueError(f"a multi-process launch needs a coordinator address, the number of processes "
                     f"and this process's id; missing: {'; '.join(missing)}")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id, cluster_detection_method="deactivate")
  return True


def _int_from_env(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} is not an integer") from None


def make_mesh(num_devices: int | None = None) -> Mesh:
  """1-D mesh over the first ``num_devices`` devices (default: all, across processes).

  Raises:
    ValueError: when ``num_devices`` is out of range, or given in a multi-process run (whose mesh
      spans every process's devices; restrict those with ``JAX_LOCAL_DEVICE_IDS`` instead).
  """
  devices = jax.devices()
  if num_devices is not None:
    if jax.process_count() > 1:
      raise ValueError(f"num_devices={num_devices} (--devices) selects devices of a single-process run; "
                       f"this run has {jax.process_count()} processes, each using all its devices "
                       "(restrict them with $JAX_LOCAL_DEVICE_IDS or $CUDA_VISIBLE_DEVICES)")
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
