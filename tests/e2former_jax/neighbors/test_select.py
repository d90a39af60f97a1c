"""Selection of the model's slots among candidates (jittable) against the host search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e2f_testing import random_molecule
from jax_md import partition, space

from e2former_jax.neighbors import neighbor_list, reference_neighbor_slots, select_neighbors

# Free-space systems sit at this offset inside a cell-list box of side BOX (angstrom).
OFFSET = 10.0
BOX = 40.0


def _brute_force_counts(positions: np.ndarray, cutoff: float) -> np.ndarray:
  d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  np.fill_diagonal(d, np.inf)
  return (d <= cutoff).sum(axis=1)


def _slot_sets(idx: np.ndarray, mask: np.ndarray, n: int) -> np.ndarray:
  return np.sort(np.where(mask, idx, n), axis=1)


def test_select_neighbors_matches_the_host_search(rng):
  """Same K nearest within the cutoff as the model's graph, from a cell list or from all pairs."""
  _, positions = random_molecule(rng, 60)
  cutoff, k = 4.5, 6
  counts = _brute_force_counts(positions, cutoff)
  assert counts.max() > k  # the designed truncation to the K nearest is exercised
  host = neighbor_list(positions, cutoff, k)
  displacement, _ = space.free()
  position = jnp.asarray(positions + OFFSET, jnp.float32)
  neighbor_fn = partition.neighbor_list(displacement, BOX, cutoff, dr_threshold=0.5,
                                        format=partition.NeighborListFormat.Dense)
  candidates = neighbor_fn.allocate(position).idx
  assert candidates.shape[1] > k
  select = jax.jit(lambda r, c: select_neighbors(r, c, displacement, cutoff=cutoff,
                                                 max_neighbors=k))
  for cand in (candidates, jnp.broadcast_to(jnp.arange(60), (60, 60))):
    nbrs = jax.device_get(select(position, cand))
    np.testing.assert_array_equal(_slot_sets(nbrs.idx, nbrs.mask, 60),
                                  _slot_sets(host.idx, host.mask, 60))
    np.testing.assert_array_equal(nbrs.count, counts)
    assert not np.any(nbrs.shift)  # free space: no image shifts
  with pytest.raises(ValueError, match="Dense neighbour list"):
    select_neighbors(position, candidates[:10], displacement, cutoff=cutoff, max_neighbors=k)


def test_reference_slots_from_all_pairs(rng):
  """The authors' slots (masked ones holding atoms beyond the cutoff) from every atom as a candidate
  equal the host's."""
  _, positions = random_molecule(rng, 40)
  cutoff, k = 3.0, 8
  host = reference_neighbor_slots(positions, cutoff, k)
  assert (host.idx < 40).sum() > host.mask.sum()  # masked slots hold atoms
  displacement, _ = space.free()
  nbrs = jax.device_get(select_neighbors(jnp.asarray(positions, jnp.float32), None, displacement,
                                         cutoff=cutoff, max_neighbors=k, reference_slots=True))
  np.testing.assert_array_equal(_slot_sets(nbrs.idx, nbrs.idx < 40, 40),
                                _slot_sets(host.idx, host.idx < 40, 40))
  np.testing.assert_array_equal(_slot_sets(nbrs.idx, nbrs.mask, 40),
                                _slot_sets(host.idx, host.mask, 40))
