"""Device memory of energy + forces, and the cheapest computation that fits it
(``E2FormerConfig.auto_memory``).

Three computations of the same numbers, in increasing memory saving and time: the config's own
(every activation kept for the backward pass, unless it asks for more), the radial MLPs in chunks of
atoms (``edge_chunk_atoms``: no [N, K, hidden] activation), and chunks with every transformer block
rematerialised (``remat``: the backward pass keeps the block inputs). The model takes the first
whose estimated bytes fit the free memory of the device, and the last when none does. Choices the
config makes itself are never undone: the plan only adds savings.
"""

from __future__ import annotations

import os

import jax

from e2former_jax import ops
from e2former_jax.config import AttentionImpl, E2FormerConfig

# Target atoms per chunk when the plan turns chunks on: one [4096, 32, 128] float32 activation is
# 64 MiB, small against any accelerator's memory, and each chunk's matrix products have 131k rows.
AUTO_EDGE_CHUNK_ATOMS = 4096
# The share of the free memory planned for: room for fragmentation and for the estimate's error.
MEMORY_HEADROOM = 0.8

# Floats per atom that energy + forces hold, per computation, as coefficients of four sizes: a
# non-negative least-squares fit to the slope in N of XLA's CPU memory plan (temporaries, 256 and 512
# atoms) of the paper configuration and six variants (edge_hidden 64, channels 128, K 16, 2 layers,
# lmax 1, 32 heads), within 10 % of every one:
#   radial MLPs  K * edge_hidden * (num_layers + lmax + 1)  the MLPs' activations
#   gates        K * 2 * num_heads * num_layers              the attention gates (MLP outputs)
#   embedding    K * channels * (lmax + 1)                   per-edge, per-channel work
#   nodes        num_rows * channels * num_layers            the blocks' node features
_FLOATS_PER_SIZE = {  # (every activation kept, chunks, remat, chunks + remat)
    "radial MLPs": (15.3, 0.0, 0.1, 0.0),
    "gates": (12.2, 10.5, 2.3, 2.3),
    "embedding": (10.0, 8.2, 10.6, 9.7),
    "nodes": (30.7, 30.6, 2.9, 3.4),
}
# The GPU plan is smaller than the CPU's (fewer, larger fusions): on an H100 the paper
# configuration's energy + forces peaked at 0.23 (every activation kept: 12.98 GB at 10k atoms) and
# 0.30 (blocks rematerialised: 43.7 GB at 100k) of the CPU plan's bytes per atom (benchmarks/
# RESULTS.md); the larger ratio keeps the estimate on the safe side.
_PLATFORM_SCALE = {"cpu": 1.0, "gpu": 0.30}
# Mixed precision (bfloat16 storage and products, E2FormerConfig.precision) holds this share of
# float32's bytes. On one H100, energy + forces at 10k atoms with every activation kept: 7.89
# against 12.33 GB (0.64, 24e1300); in chunks with rematerialised blocks at 100k: 27.95 against
# 41.55 GB (0.67, 528ede6 and f9d15ae). Rounded up, on the safe side.
MIXED_PRECISION_SHARE = 0.7


def _sizes(config: E2FormerConfig, num_neighbors: int) -> dict[str, int]:
  k, degrees = num_neighbors, config.lmax + 1
  return {"radial MLPs": k * config.edge_hidden * (config.num_layers + degrees),
          "gates": k * 2 * config.num_heads * config.num_layers,
          "embedding": k * config.channels * degrees,
          "nodes": config.num_rows * config.channels * config.num_layers}


def _fused_radial_mlps(config: E2FormerConfig) -> bool:
  """Whether energy + forces differentiate the radial MLPs through fused kernels (a Pallas
  implementation with ``radial_vjp_kernel``): then they hold no [N, K, hidden] activation whether
  or not they are chunked (ops.radial_mlp)."""
  return (config.radial_vjp_kernel
          and ops.resolve_impl(config.radial_impl) is not AttentionImpl.XLA)


def candidates(config: E2FormerConfig) -> list[E2FormerConfig]:
  """The computations the plan chooses from, in increasing memory saving: the config's own, then
  with radial MLPs in chunks (not where they are fused kernels: chunks would save nothing), then
  also rematerialised blocks (each only where the config has not chosen it already)."""
  chunks = config if _fused_radial_mlps(config) else config.replace(
      edge_chunk_atoms=config.edge_chunk_atoms or AUTO_EDGE_CHUNK_ATOMS)
  options = [config, chunks, chunks.replace(remat=True)]
  return [c for i, c in enumerate(options) if c not in options[:i]]


def forces_bytes(config: E2FormerConfig, num_atoms: int, num_neighbors: int, itemsize: int,
                 platform: str) -> float:
  """Estimated bytes that energy + forces of ``num_atoms`` hold beyond the weights and inputs
  (``itemsize``: bytes of the inputs' floats; mixed precision scales that by its measured share).
  Fused radial MLPs hold what chunked ones do."""
  chunked = config.edge_chunk_atoms is not None or _fused_radial_mlps(config)
  column = 2 * config.remat + chunked
  floats = sum(_FLOATS_PER_SIZE[name][column] * size
               for name, size in _sizes(config, num_neighbors).items())
  share = 1.0 if config.compute_dtype is None else MIXED_PRECISION_SHARE
  return floats * itemsize * share * num_atoms * _PLATFORM_SCALE.get(platform, 1.0)


def free_bytes(device: jax.Device) -> int | None:
  """Bytes the device can still allocate: its allocator's limit minus what is in use; for the CPU,
  the host's free physical memory. None when unknown."""
  stats = device.memory_stats()
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  if device.platform == "cpu":
    try:
      return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # no such variable on this system
      return None
  return None


def plan(config: E2FormerConfig, num_atoms: int, num_neighbors: int, itemsize: int,
         device: jax.Device | None = None) -> E2FormerConfig:
  """The first of :func:`candidates` whose estimated energy + forces fit ``MEMORY_HEADROOM`` of the
  device's free memory (the last when none does; ``config`` itself when the free memory is unknown).

  Args:
    config: the model's configuration.
    num_atoms, num_neighbors: the graph's padded sizes N and K.
    itemsize: bytes of one float of the computation.
    device: where it runs (default: this process's first device; another process's devices
      report no memory).
  """
  device = device or jax.local_devices()[0]
  budget = free_bytes(device)
  options = candidates(config)
  if budget is None:
    return config
  for option in options:
    needed = forces_bytes(option, num_atoms, num_neighbors, itemsize, device.platform)
    if needed <= MEMORY_HEADROOM * budget:
      return option
  return options[-1]
