"""Graph builders: structures packed into a padded Graph (host) and one system's Graph on device."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from e2f_testing import brute_force_graph, random_cell, random_molecule

from benchmarks.structures import water_box
from e2former_jax.neighbors import build_graph, neighbor_list, spatial_order
from e2former_jax.structure import Structure

def test_build_graph_matches_brute_force(rng, x64):  # x64: the reference keeps float64 positions
  mols = [(*random_molecule(rng, n), q, s) for n, q, s in [(7, 0, 1), (12, 1, 2), (1, -1, 1)]]
  structures = [Structure(numbers=z, positions=x, charge=q, spin=s) for z, x, q, s in mols]
  graph = build_graph(structures, cutoff=3.0, max_neighbors=6, num_nodes=26, num_molecules=5,
                      dtype=np.float64)
  ref = brute_force_graph(mols, cutoff=3.0, max_neighbors=6, num_nodes=26, num_molecules=5)
  for field in ("positions", "species", "node_mask", "molecule_index", "nbr_idx", "nbr_mask",
                "nbr_shift", "charge", "spin", "molecule_mask"):
    np.testing.assert_array_equal(getattr(graph, field), np.asarray(getattr(ref, field)), err_msg=field)
  assert graph.nbr_idx.dtype == np.int32 and graph.positions.dtype == np.float64
  # Padding: atoms 20..25 point at the last molecule slot, have no edges; slots 3, 4 are empty.
  assert np.all(graph.molecule_index[20:] == 4) and not graph.nbr_mask[20:].any()
  assert np.all(graph.nbr_idx[~graph.nbr_mask] == 26)
  assert graph.charge.tolist() == [0, 1, -1, 0, 0] and graph.spin.tolist() == [1, 2, 1, 0, 0]


def test_build_graph_defaults_and_errors(rng):
  z, x = random_molecule(rng, 5)
  s = Structure(numbers=z, positions=x)
  graph = build_graph([s, s], cutoff=2.0, max_neighbors=3)
  assert graph.positions.shape == (10, 3) and graph.charge.shape == (2,)
  assert graph.positions.dtype == np.float32
  rows = np.nonzero(graph.nbr_mask)[0]
  assert np.all(graph.nbr_idx[graph.nbr_mask] // 5 == rows // 5)  # edges stay inside their molecule
  with pytest.raises(ValueError, match="num_nodes"):
    build_graph([s, s], cutoff=2.0, max_neighbors=3, num_nodes=9)
  with pytest.raises(ValueError, match="num_molecules"):
    build_graph([s, s], cutoff=2.0, max_neighbors=3, num_molecules=1)
  assert graph.cell is None  # molecules only: the model's molecular path
  periodic = Structure(numbers=z, positions=x, cell=np.eye(3) * 10, pbc=(True, True, True))
  with pytest.raises(ValueError, match="periodic=False"):
    build_graph([periodic], cutoff=2.0, max_neighbors=3, periodic=False)


def test_build_graph_periodic(rng):
  z, x = random_molecule(rng, 6)
  molecule = Structure(numbers=z, positions=x)
  cell = random_cell(rng, 5.0)
  crystal = Structure(numbers=np.array([8, 1, 1]), positions=rng.uniform(0, 1, (3, 3)) @ cell,
                      cell=cell, pbc=(True, True, True))
  graph = build_graph([molecule, crystal], cutoff=3.0, max_neighbors=40, num_nodes=12,
                      num_molecules=3, dtype=np.float64)
  np.testing.assert_array_equal(graph.cell, np.stack([np.zeros((3, 3)), cell, np.zeros((3, 3))]))
  # The molecule's rows are exactly those of a molecules-only graph.
  alone = build_graph([molecule], cutoff=3.0, max_neighbors=40, num_nodes=12, dtype=np.float64)
  assert alone.cell is None
  for field in ("nbr_idx", "nbr_mask", "nbr_shift"):
    np.testing.assert_array_equal(getattr(graph, field)[:6], getattr(alone, field)[:6])
  # The crystal's slots: its own atoms, Cartesian shifts = S @ cell, edge lengths from the search.
  nl = neighbor_list(crystal.positions, 3.0, 40, cell=cell, pbc=True)
  np.testing.assert_array_equal(graph.nbr_idx[6:9], np.where(nl.mask, nl.idx + 6, 12))
  np.testing.assert_allclose(graph.nbr_shift[6:9], nl.shifts @ cell, atol=1e-12)
  lengths = np.linalg.norm(graph.edge_vectors(), axis=-1)[6:9]
  np.testing.assert_allclose(np.where(nl.mask, lengths, np.inf), nl.distances, atol=1e-12)
  forced = build_graph([molecule], cutoff=3.0, max_neighbors=40, periodic=True)
  np.testing.assert_array_equal(forced.cell, np.zeros((1, 3, 3)))


def _reference_slots_brute_force(positions, cutoff, k):
  """The authors' rule written out: K_mol = max(1, min(K, max_i #in-cutoff)) nearest atoms per atom."""
  n = len(positions)
  dist = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
  np.fill_diagonal(dist, np.inf)
  k_mol = max(1, min(k, int((dist <= cutoff).sum(1).max())))
  order = np.lexsort((np.tile(np.arange(n), (n, 1)), dist), axis=1)[:, :min(k_mol, n - 1)]
  return order, np.take_along_axis(dist, order, 1) <= cutoff


def test_reference_slots_per_molecule(rng):
  """Masked slots hold the next-nearest atoms beyond the cutoff, K_mol per molecule (not per batch):
  a packed batch has each molecule's own slots."""
  mols = [random_molecule(rng, n) for n in (9, 14, 2, 1)]
  structures = [Structure(numbers=z, positions=x) for z, x in mols]
  cutoff, k = 2.5, 6
  graph = build_graph(structures, cutoff=cutoff, max_neighbors=k, num_nodes=30, num_molecules=5,
                      reference_slots=True)
  plain = build_graph(structures, cutoff=cutoff, max_neighbors=k, num_nodes=30, num_molecules=5)
  np.testing.assert_array_equal(graph.nbr_mask, plain.nbr_mask)
  np.testing.assert_array_equal(np.where(plain.nbr_mask, graph.nbr_idx, -1),
                                np.where(plain.nbr_mask, plain.nbr_idx, -1))
  start, widths = 0, []
  for z, x in mols:
    n = len(z)
    order, within = _reference_slots_brute_force(x, cutoff, k)
    width = order.shape[1]
    rows = slice(start, start + n)
    np.testing.assert_array_equal(graph.nbr_idx[rows, :width], order + start)
    np.testing.assert_array_equal(graph.nbr_mask[rows, :width], within)
    assert np.all(graph.nbr_idx[rows, width:] == 30)
    widths.append(width)
    start += n
  assert widths[0] != widths[1] and widths[2:] == [1, 0]  # K_mol differs between the molecules
  cell = Structure(numbers=mols[0][0], positions=mols[0][1], cell=np.eye(3) * 9.0, pbc=True)
  with pytest.raises(ValueError, match="reproduced for molecules only"):
    build_graph([cell], cutoff=cutoff, max_neighbors=k, reference_slots=True)


def test_spatial_order_is_a_permutation_that_keeps_consecutive_atoms_close(rng):
  _, positions, _ = water_box(3000, seed=1)
  positions = positions[rng.permutation(len(positions))]
  order = np.asarray(spatial_order(jnp.asarray(positions, jnp.float32)))
  assert sorted(order.tolist()) == list(range(len(positions)))

  def mean_step(p):
    return float(np.linalg.norm(np.diff(p, axis=0), axis=1).mean())

  # Random order: steps of ~20 A in this 31 A cube; Morton order: ~3 A.
  assert mean_step(positions[order]) < 0.2 * mean_step(positions)
