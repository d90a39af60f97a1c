"""Neighbour-slot bookkeeping shared by the gather kernels (plain jnp, runs outside the kernels).

A neighbour list is ``nbr_idx [N, K]`` (source of each slot, ``M`` = sentinel on empty slots) with
``nbr_mask [N, K]`` (True = real edge). A slot is *valid* when its mask is set and its index lies in
``[0, M)``; every op treats invalid slots as absent, whatever index they hold.

The kernels receive the list in a form that needs no extra masks and no out-of-range index:

* ``slots [N, K]``: the source of every valid slot and -1 elsewhere. Kernels map -1 to row 0 and mask
  the load, because Triton treats pointer offsets as unsigned (the interpreter would clamp -1).
* a reverse-neighbour CSR for the gather-only, deterministic scatter: ``edge_order [N*K]`` lists the
  flat slot ids ``n*K + k`` sorted by source (stable, so ties keep slot order and sums are
  reproducible; invalid slots sort last) and ``source_offsets [M+1]`` delimits each source's run.
  Both are O(N K) int32, built on device with one sort and one binary search.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import ArrayLike


class Neighbors(NamedTuple):
  """A neighbour list prepared for the kernels (a pytree of int32 arrays, never differentiated).

  Attributes:
    slots: [N, K] source index of each valid slot, -1 on invalid slots.
    edge_order: [N*K] flat slot ids sorted by source; the first ``source_offsets[M]`` are valid.
    source_offsets: [M+1] the valid slots pointing at source j are
      ``edge_order[source_offsets[j]:source_offsets[j + 1]]``.
  """

  slots: jax.Array
  edge_order: jax.Array
  source_offsets: jax.Array

  @property
  def num_sources(self) -> int:
    return self.source_offsets.shape[0] - 1


def check_neighbor_list(nbr_idx: ArrayLike, nbr_mask: ArrayLike, num_targets: int) -> None:
  """Raises ValueError unless nbr_idx/nbr_mask are a well-formed [num_targets, K] neighbour list."""
  if nbr_idx.ndim != 2 or nbr_idx.shape[0] != num_targets:
    raise ValueError(f"nbr_idx must be [N={num_targets}, K]; got {nbr_idx.shape=}")
  if nbr_mask.shape != nbr_idx.shape:
    raise ValueError(f"nbr_mask must match nbr_idx; got {nbr_mask.shape=}, {nbr_idx.shape=}")
  if not jnp.issubdtype(nbr_idx.dtype, jnp.integer):
    raise ValueError(f"nbr_idx must be an integer array; got {nbr_idx.dtype=}")
  if nbr_mask.dtype != jnp.bool_:
    raise ValueError(f"nbr_mask must be a bool array; got {nbr_mask.dtype=}")
  if nbr_idx.shape[1] == 0:
    raise ValueError(f"need at least one neighbour slot; got {nbr_idx.shape=}")


def check_attention_inputs(q, k, values, nbr_idx, nbr_mask, sink: float, **per_edge) -> None:
  """Raises ValueError unless the arrays of an attention op are consistent.

  q [N, D, H], k [M, D, H], values [M, X, H] and the neighbour list [N, K]; ``per_edge`` names the
  op's per-edge arrays, whose leading dimensions must be [N, K]: gate and post_weight [N, K, H],
  envelope [N, K], vectors [N, K, 3]. All arrays must be floating point and the sink >= 0.
  """
  named = dict(q=q, k=k, values=values, **per_edge)
  for name, x in named.items():
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a float array; got {name}.dtype={x.dtype}")
  if q.ndim != 3 or k.ndim != 3 or values.ndim != 3:
    raise ValueError(f"q, k, values must be 3-d; got {q.shape=}, {k.shape=}, {values.shape=}")
  num_targets, head_dim, num_heads = q.shape
  num_sources = k.shape[0]
  check_neighbor_list(nbr_idx, nbr_mask, num_targets)
  edge = (num_targets, nbr_idx.shape[1])
  trailing = {"gate": (num_heads,), "post_weight": (num_heads,), "envelope": (), "vectors": (3,)}
  expected = {"k": (num_sources, head_dim, num_heads),
              **{name: edge + trailing[name] for name in per_edge}}
  for name, shape in expected.items():
    if named[name].shape != shape:
      raise ValueError(f"{name} must be {shape} given {q.shape=}, {k.shape=}, {nbr_idx.shape=}; "
                       f"got {named[name].shape}")
  if values.shape[0] != num_sources or values.shape[2] != num_heads:
    raise ValueError(f"values must be [M={num_sources}, X, H={num_heads}]; got {values.shape=}")
  if sink < 0:
    raise ValueError(f"sink must be non-negative; got {sink=}")


def valid_slots(nbr_idx: ArrayLike, nbr_mask: ArrayLike, num_sources: int) -> ArrayLike:
  """[N, K] bool: slots that are real edges to an existing source."""
  return nbr_mask & (nbr_idx >= 0) & (nbr_idx < num_sources)


def prepare_neighbors(nbr_idx: ArrayLike, nbr_mask: ArrayLike, num_sources: int) -> Neighbors:
  """Builds the kernel-side neighbour list (see the module docstring)."""
  num_targets, num_slots = nbr_idx.shape
  valid = valid_slots(nbr_idx, nbr_mask, num_sources)
  slots = jnp.where(valid, nbr_idx, -1).astype(jnp.int32)  # [N, K]
  # Invalid slots get key M so that they sort after every real source.
  keys = jnp.where(valid, nbr_idx, num_sources).astype(jnp.int32).reshape(-1)  # [N*K]
  flat_ids = lax.iota(jnp.int32, num_targets * num_slots)  # [N*K]
  sorted_keys, edge_order = lax.sort((keys, flat_ids), num_keys=1, is_stable=True)
  source_offsets = jnp.searchsorted(
      sorted_keys, jnp.arange(num_sources + 1, dtype=jnp.int32), side="left"
  ).astype(jnp.int32)  # [M+1]
  return Neighbors(slots, edge_order, source_offsets)


def upcast(x: jax.Array) -> jax.Array:
  """x in at least float32 (float64 stays float64): the references' accumulation precision."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def gather_sources(x: jax.Array, nbr_idx: ArrayLike, valid: ArrayLike) -> jax.Array:
  """upcast(x)[idx], zero on invalid slots: [M, ...] -> [N, K, ...] (materialised; references only)."""
  safe = jnp.where(valid, nbr_idx, x.shape[0])
  return jnp.take(upcast(x), safe, axis=0, mode="fill", fill_value=0)

