"""benchmarks/structures.py: the model's neighbour relation, densities, separate clusters."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import structures
from e2former_jax.neighbors import neighbor_list

CUTOFF, K = 4.5, 12


def test_neighbor_slots_are_the_models_relation():
  positions = structures.random_box(300, CUTOFF, seed=1)
  idx, mask, dist = structures.neighbor_slots(positions, CUTOFF, K)
  expected = neighbor_list(positions, CUTOFF, K)
  np.testing.assert_array_equal(mask, expected.mask)
  np.testing.assert_array_equal(np.sort(idx, axis=1), np.sort(expected.idx, axis=1))
  np.testing.assert_allclose(dist[mask], expected.distances[expected.mask])
  assert (idx[~mask] == len(positions)).all() and (dist[~mask] == CUTOFF).all()


def test_cluster_batch_keeps_clusters_apart():
  graph = structures.cluster_batch(structures.Batch.parse("3x20"), CUTOFF, K)
  assert graph.positions.shape == (60, 3) and graph.nbr_idx.shape == (60, K)
  sources = graph.nbr_idx[graph.nbr_mask]
  targets = np.repeat(np.arange(60), K).reshape(60, K)[graph.nbr_mask]
  np.testing.assert_array_equal(graph.molecule_index[sources], graph.molecule_index[targets])
  assert graph.nbr_mask.any(axis=1).all()  # every atom of a cluster has a neighbour


def test_water_box_has_liquid_density_and_whole_molecules():
  numbers, positions, side = structures.water_box(300, seed=0, periodic=True)
  assert len(numbers) == 300 and list(numbers[:3]) == [8, 1, 1]
  assert 300 / 3 / side**3 == pytest.approx(structures.WATER_DENSITY)
  assert (positions >= 0).all() and (positions < side).all()


@pytest.mark.parametrize("text, batch", [("10000", (1, 10000)), ("64x30", (64, 30))])
def test_batch_parse(text, batch):
  parsed = structures.Batch.parse(text)
  assert (parsed.molecules, parsed.atoms_per_molecule) == batch


@pytest.mark.parametrize("text", ["", "x30", "64x", "ten", "0x5"])
def test_batch_parse_rejects_malformed(text):
  with pytest.raises(ValueError, match="structure"):
    structures.Batch.parse(text)
