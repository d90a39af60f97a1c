"""The all-images neighbour list of narrow periodic cells: rebuild test, overflow, re-allocation by
the run loop, and its slots against the host search."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_md import space

from e2former_jax.interop.jax_md import MIN_EXTRA_CAPACITY, run
from e2former_jax.neighbors import (image_neighbor_list, needs_all_images, neighbor_list,
                                    select_image_neighbors)


class _Positions(NamedTuple):
  position: jax.Array


def _slot_set(idx, mask, image) -> list[set]:
  return [{(int(j), tuple(s)) for j, s in zip(idx[i][mask[i]], image[i][mask[i]].tolist())}
          for i in range(len(idx))]


def test_run_reallocates_an_overflowing_image_list(rng):
  """A narrow cell's list with its bin capacity made too small on purpose: update() keeps it within
  the skin and flags the overflow of a rebuild; run() re-allocates (one compilation per allocation)
  and the final list holds exactly the images within the cutoff."""
  side, cutoff, skin, n = 3.0, 1.6, 0.2, 12
  cell = np.eye(3) * side
  positions = rng.uniform(0.0, side, (n, 3))
  assert needs_all_images(side, cutoff)
  _, shift = space.periodic(side)
  neighbor_fn = image_neighbor_list(side, cutoff, dr_threshold=skin)
  nbrs = neighbor_fn.allocate(jnp.asarray(positions))
  assert nbrs.grid.bins == (1, 1, 1) and not nbrs.did_buffer_overflow
  # Within the skin the list is kept; beyond it (a move of skin / 2, or a 10% larger cell) rebuilt.
  direction = rng.normal(size=(n, 3))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  needs_rebuild = jax.jit(lambda position, box: nbrs.needs_rebuild(position, box=box))
  for move, box, stale in ((0.45 * skin, side, False), (0.55 * skin, side, True),
                           (0.0, 1.1 * side, True)):
    assert bool(needs_rebuild(jnp.asarray(positions + move * direction), box)) == stale
  # A rebuild in a bin too small on purpose overflows: run() re-allocates.
  cramped = nbrs.replace(grid=dataclasses.replace(nbrs.grid, capacity=1))

  centre = jnp.full(3, side / 2)
  seen = []

  def contract(state, neighbor=None):
    seen.append((neighbor.grid.capacity, neighbor.max_occupancy))  # trace time
    return _Positions(shift(state.position, 0.05 * (centre - state.position)))

  runs = list(run(contract, _Positions(jnp.asarray(positions)), num_chunks=3, steps_per_chunk=10,
                  neighbors=cramped, neighbor_fn=neighbor_fn))
  final_state, final = runs[-1][1], runs[-1][2]
  assert not final.did_buffer_overflow
  assert seen[0][0] == 1 and len(seen) == len(set(seen)) >= 2, seen  # once per allocation
  # Re-allocations add MIN_EXTRA_CAPACITY (then twice as much) to both the bins and the slots.
  assert seen[1][0] >= nbrs.grid.capacity + MIN_EXTRA_CAPACITY
  assert seen[1][1] >= nbrs.max_occupancy

  position = np.asarray(final_state.position)
  host = neighbor_list(position, cutoff, 200, cell=cell, pbc=True)
  select = jax.jit(select_image_neighbors, static_argnames=("cutoff", "max_neighbors"))
  slots = select(jnp.asarray(position), jnp.asarray(cell), jnp.asarray(position / side), final,
                 cutoff=cutoff, max_neighbors=final.max_occupancy)
  image = np.rint(np.asarray(slots.shift) / side).astype(int)
  assert host.mask.sum(axis=1).max() < final.max_occupancy
  assert _slot_set(np.asarray(slots.idx), np.asarray(slots.mask), image) == _slot_set(
      host.idx, host.mask, host.shifts)
