"""JAX MD's Dense list in free space, with the atoms placed in its cell-list box."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e2f_testing import random_molecule
from jax_md import space

from e2former_jax.neighbors import free_space_neighbor_list

BOX = 40.0


def _candidate_sets(nbrs, n: int) -> list[set[int]]:
  idx = np.asarray(nbrs.idx)
  return [set(row[row < n].tolist()) - {i} for i, row in enumerate(idx)]


def test_free_space_list_places_the_atoms_itself(rng):
  """Atoms far outside [0, box) and moved further between updates: the list still holds every pair
  within cutoff + skin (JAX MD's own list would wrap them into wrong cells), and it flags an
  overflow when they spread wider than its box."""
  _, positions = random_molecule(rng, 60)
  positions = positions - 1000.0  # nowhere near the cell-list box
  cutoff, skin = 3.0, 0.5
  displacement, _ = space.free()
  neighbor_fn = free_space_neighbor_list(displacement, None, cutoff, dr_threshold=skin)

  def expected(p):
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)
    return [set(np.flatnonzero(row <= cutoff + skin).tolist()) - {i} for i, row in enumerate(d)]

  nbrs = neighbor_fn.allocate(jnp.asarray(positions))
  assert nbrs.cell_list_fn is not None  # the cell list is in use
  assert _candidate_sets(nbrs, 60) == expected(positions)
  # Moved by 2 km and stretched by 5 %: rebuilt (some atom moved more than half the skin relative to
  # the others).
  moved = positions.mean(axis=0) + 1.05 * (positions - positions.mean(axis=0)) + 2000.0
  nbrs = jax.jit(lambda p, n: n.update(p))(jnp.asarray(moved), nbrs)
  assert not nbrs.did_buffer_overflow
  assert _candidate_sets(nbrs, 60) == expected(moved)
  # One atom 100 A away: wider than the box, so run() would re-allocate; the new list fits it.
  spread = moved.copy()
  spread[0] += 100.0
  assert neighbor_fn.update(jnp.asarray(spread), nbrs).did_buffer_overflow
  assert _candidate_sets(neighbor_fn.allocate(jnp.asarray(spread)), 60) == expected(spread)
  with pytest.raises(ValueError, match="more than the cell-list box of 40.0 A"):
    free_space_neighbor_list(displacement, BOX, cutoff).allocate(jnp.asarray(spread))
