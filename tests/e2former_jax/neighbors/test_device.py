"""Device (jittable) periodic neighbour list against the host search."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.neighbors.device import cell_grid, device_neighbor_list
from e2former_jax.neighbors.host import neighbor_list

CUTOFF = 3.0
# One padded shape for every case, so the jitted search compiles once per grid.
NUM_ATOMS, K = 40, 48


def slot_sets(idx, mask, shifts):
  """Per row, the set of (source, shift) of the real slots (the model does not see slot order)."""
  idx, mask, shifts = np.asarray(idx), np.asarray(mask), np.asarray(shifts)
  return [{(int(j), tuple(s)) for j, s in zip(idx[i][mask[i]], shifts[i][mask[i]].tolist())}
          for i in range(len(idx))]


def case(rng, width, pbc, n):
  cell = np.eye(3) * width + rng.normal(size=(3, 3)) * 0.2 * width
  positions = rng.uniform(-1.0, 2.0, (n, 3)) @ cell  # up to a cell outside: not wrapped
  return positions, cell, pbc


@pytest.mark.parametrize("width, pbc", [
    (7.0, (True, True, True)),  # several bins per axis
    (2.5, (True, True, True)),  # narrower than the cutoff: one bin, several images, self images
    (7.0, (True, True, False)),  # slab: clamped bins along the free axis
])
def test_matches_host_search(width, pbc):
  rng = np.random.default_rng(int(width * 10) + sum(pbc))
  n = 30 if width > 3 else 3
  positions, cell, pbc = case(rng, width, pbc, n)
  host = neighbor_list(positions, CUTOFF, 400, cell=cell, pbc=pbc)
  assert host.mask.sum(axis=1).max() < K  # K does not truncate: the slot sets must agree
  padded = np.zeros((NUM_ATOMS, 3))
  padded[:n] = positions
  node_mask = np.arange(NUM_ATOMS) < n
  grid = cell_grid(positions, cell, pbc, CUTOFF)
  out = device_neighbor_list(jnp.asarray(padded), jnp.asarray(cell), pbc=pbc, cutoff=CUTOFF,
                             max_neighbors=K, grid=grid, node_mask=jnp.asarray(node_mask))
  assert not bool(out.overflow)
  assert slot_sets(out.idx, out.mask, out.shifts)[:n] == slot_sets(host.idx, host.mask, host.shifts)
  idx, mask, shifts = np.asarray(out.idx), np.asarray(out.mask), np.asarray(out.shifts)
  assert not mask[n:].any() and np.all(idx[~mask] == NUM_ATOMS)
  vectors = padded[:, None] - (padded[np.minimum(idx, NUM_ATOMS - 1)] + shifts @ cell)
  assert np.all(np.linalg.norm(vectors, axis=-1)[mask] <= CUTOFF + 1e-5)


def test_overflow():
  rng = np.random.default_rng(0)
  positions, cell, pbc = case(rng, 7.0, (True, True, True), NUM_ATOMS)
  grid = cell_grid(positions, cell, pbc, CUTOFF)
  run = lambda grid, cell: device_neighbor_list(jnp.asarray(positions), jnp.asarray(cell), pbc=pbc,
                                                cutoff=CUTOFF, max_neighbors=K, grid=grid)
  assert not bool(run(grid, cell).overflow)
  assert bool(run(dataclasses.replace(grid, capacity=1), cell).overflow)  # a bin is too full
  assert bool(run(grid, cell * 0.8).overflow)  # the cell shrank below the grid's bin width
  # A margin keeps the grid valid for the shrunk cell.
  roomy = cell_grid(positions, cell, pbc, CUTOFF, margin=0.3)
  assert not bool(run(roomy, cell * 0.8).overflow)
