"""Periodic cells end to end: graph, the node-centric image-shift term, forces, stress (issue 10).

Everything runs in float64 on graphs of one padded shape with cells (``periodic=True``), so each
jitted function compiles once. K is larger than every neighbour count here, so no test depends on
how ties at the K-th neighbour are broken.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e2f_testing import random_molecule

from e2former_jax.config import MessagePath, tiny_config
from e2former_jax.neighbors import build_graph, neighbor_list
from e2former_jax.nn.model import E2Former
from e2former_jax.potential import energy_and_forces, energy_forces_stress
from e2former_jax.structure import Structure, validate_structure

CUTOFF = 3.0
K = 32
NUM_NODES, NUM_MOLECULES = 24, 2

efs = jax.jit(energy_forces_stress, static_argnums=0)
ef = jax.jit(energy_and_forces, static_argnums=0)


def random_crystal(rng, cell, n, pbc=(True, True, True)) -> Structure:
  """n random atoms in the cell, no two (images included) closer than 0.9 A."""
  while True:
    positions = rng.uniform(0, 1, (n, 3)) @ cell
    if not neighbor_list(positions, 0.9, 1, cell=cell, pbc=pbc).mask.any():
      return Structure(numbers=rng.choice([1, 6, 7, 8], n), positions=positions, cell=cell, pbc=pbc)


def replaced(s: Structure, **changes) -> Structure:
  fields = dict(numbers=s.numbers, positions=s.positions, charge=s.charge, spin=s.spin, cell=s.cell,
                pbc=s.pbc)
  return Structure(**(fields | changes))


def supercell(s: Structure, reps) -> Structure:
  shifts = np.stack(np.meshgrid(*[np.arange(r) for r in reps], indexing="ij"), -1).reshape(-1, 3)
  positions = (s.positions[None] + (shifts @ s.cell)[:, None]).reshape(-1, 3)  # image-major
  return replaced(s, numbers=np.tile(s.numbers, len(shifts)), positions=positions,
                  cell=s.cell * np.asarray(reps)[:, None])


def graph_of(structures, periodic=True):
  graph = build_graph(structures, cutoff=CUTOFF, max_neighbors=K, num_nodes=NUM_NODES,
                      num_molecules=NUM_MOLECULES, dtype=np.float64, periodic=periodic)
  assert graph.nbr_mask.sum(axis=1).max() < K  # no truncation
  return jax.tree.map(jnp.asarray, graph)


def random_rotation(rng) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


@pytest.fixture(scope="module")
def setup():
  """A narrow triclinic cell (edges below 2 r_c, one below r_c: several images of one atom in a
  row, the atom's own included), a wider one, a tiny model; float64 for the whole module."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    small = random_crystal(rng, np.array([[2.9, 0.2, 0.0], [0.1, 4.0, 0.1], [0.0, 0.3, 4.1]]), 2)
    wide = random_crystal(rng, np.array([[6.3, 0.0, 0.5], [0.4, 6.6, 0.0], [0.3, -0.2, 6.4]]), 10)
    assert np.all(np.linalg.norm(small.cell, axis=1) < 2 * CUTOFF)
    graph = graph_of([small, wide])
    model = E2Former(tiny_config(cutoff=CUTOFF, max_neighbors=K))
    params = jax.jit(model.init)(jax.random.key(0), graph)
    yield small, wide, graph, model, params


def assert_same(result, expected, *, rtol=1e-10):
  """Energy [B], forces [N, 3], stress [B, 3, 3] equal up to float64 rounding."""
  for got, want in zip(result, expected):
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_node_centric_image_term_equals_per_edge(setup):
  """The node-centric identity with the image-shift term equals the per-edge message (D11)."""
  small, wide, graph, model, params = setup
  idx = np.where(graph.nbr_mask, graph.nbr_idx, -1)[:2]  # the narrow cell's rows
  assert (idx == np.arange(2)[:, None]).any(axis=1).all()  # own images
  assert all(np.bincount(row[row >= 0]).max() > 2 for row in idx)  # one source, several images
  per_edge = E2Former(model.config.replace(message_path=MessagePath.PER_EDGE))
  expected = efs(per_edge, params, graph)
  assert_same(efs(model, params, graph), expected)
  assert np.abs(expected[2][:2]).max() > 1e-3  # a real, non-zero stress was compared


def test_wrapping_and_translation(setup):
  small, wide, graph, model, params = setup
  expected = efs(model, params, graph)
  # Atom 1 moved by a lattice vector combination, atom 0 of the wide cell by another, everything
  # translated: the same periodic system.
  small_moved = small.positions.copy()
  small_moved[1] += small.cell[0] - 2 * small.cell[2]
  wide_moved = wide.positions.copy()
  wide_moved[0] -= wide.cell[1]
  offset = np.array([13.0, -7.0, 2.5])
  moved = graph_of([replaced(small, positions=small_moved + offset),
                    replaced(wide, positions=wide_moved - offset)])
  assert_same(efs(model, params, moved), expected, rtol=1e-9)


def test_rotation_of_positions_and_cell(setup):
  small, wide, graph, model, params = setup
  rot = random_rotation(np.random.default_rng(3))
  rotated = graph_of([replaced(s, positions=s.positions @ rot.T, cell=s.cell @ rot.T)
                      for s in (small, wide)])
  energy, forces, stress = efs(model, params, graph)
  assert_same(efs(model, params, rotated),
              (energy, forces @ rot.T, np.einsum("ij,bjk,lk->bil", rot, stress, rot)), rtol=1e-9)


def test_supercell_2x1x1(setup):
  small, wide, graph, model, params = setup
  energy, forces, stress = efs(model, params, graph)
  double = graph_of([supercell(wide, (2, 1, 1))])
  e2, f2, s2 = efs(model, params, double)
  np.testing.assert_allclose(e2[0], 2 * energy[1], rtol=1e-10)
  np.testing.assert_allclose(f2[:20], np.tile(forces[2:12], (2, 1)),
                             atol=1e-10 * np.abs(forces).max())
  np.testing.assert_allclose(s2[0], stress[1], atol=1e-10 * np.abs(stress).max())  # intensive


def test_narrow_cell_equals_its_supercell(setup):
  """A cell narrower than 2 r_c (multiple images) against its 3x2x2 supercell (wider than 2 r_c)."""
  small, wide, graph, model, params = setup
  energy, forces, stress = efs(model, params, graph)
  big = supercell(small, (3, 2, 2))
  assert np.all(np.linalg.norm(big.cell, axis=1) > 2 * CUTOFF)
  e12, f12, s12 = efs(model, params, graph_of([big]))
  np.testing.assert_allclose(e12[0], 12 * energy[0], rtol=1e-10)
  np.testing.assert_allclose(f12, np.tile(forces[:2], (12, 1)), atol=1e-10 * np.abs(forces).max())
  np.testing.assert_allclose(s12[0], stress[0], atol=1e-10 * np.abs(stress).max())


def test_stress_is_the_strain_derivative(setup):
  """sigma = (1/V) dE/d(eps) by central differences of rebuilt strained structures (ASE's own
  numerical-stress recipe: cell and atoms scaled together)."""
  small, wide, graph, model, params = setup
  _, _, stress = efs(model, params, graph)
  h = 1e-5
  for a, b in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
    eps = np.zeros((3, 3))
    eps[a, b] = eps[b, a] = h / 2 if a != b else h

    def energy(sign):
      strained = [replaced(s, positions=s.positions @ (np.eye(3) + sign * eps),
                           cell=s.cell @ (np.eye(3) + sign * eps)) for s in (small, wide)]
      return np.asarray(efs(model, params, graph_of(strained))[0])

    volume = np.abs(np.linalg.det(np.stack([small.cell, wide.cell])))
    fd = (energy(1) - energy(-1)) / (2 * h) / volume  # [2]
    np.testing.assert_allclose(stress[:, a, b], fd, rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(stress, np.swapaxes(stress, 1, 2), atol=1e-14)


def test_forces_match_finite_differences(setup):
  small, wide, graph, model, params = setup
  _, forces, _ = efs(model, params, graph)
  h = 1e-5
  for atom, axis in [(0, 0), (2, 1), (7, 2)]:
    step = jnp.zeros_like(graph.positions).at[atom, axis].set(h)
    e_plus = efs(model, params, graph.replace(positions=graph.positions + step))[0].sum()
    e_minus = efs(model, params, graph.replace(positions=graph.positions - step))[0].sum()
    np.testing.assert_allclose(forces[atom, axis], -(e_plus - e_minus) / (2 * h), rtol=1e-6,
                               atol=1e-9)


def test_molecule_in_a_periodic_batch_is_unchanged(setup):
  """A molecule next to a crystal: the same energy and forces as in a molecules-only graph (the
  molecular code path), zero stress."""
  small, wide, graph, model, params = setup
  z, x = random_molecule(np.random.default_rng(5), 8)
  molecule = Structure(numbers=z, positions=x)
  mixed = graph_of([molecule, small])
  alone = graph_of([molecule], periodic=None)
  assert alone.cell is None
  e_mixed, f_mixed, s_mixed = efs(model, params, mixed)
  e_alone, f_alone = ef(model, params, alone)
  np.testing.assert_allclose(e_mixed[0], e_alone[0], rtol=1e-12)
  np.testing.assert_allclose(f_mixed[:8], f_alone[:8], atol=1e-12 * np.abs(f_alone).max())
  np.testing.assert_array_equal(s_mixed[0], 0.0)
  energy, forces, stress = efs(model, params, graph)
  np.testing.assert_allclose(e_mixed[1], energy[0], rtol=1e-10)
  np.testing.assert_allclose(s_mixed[1], stress[0], atol=1e-10 * np.abs(stress).max())


# ----------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("changes, match", [
    (dict(cell=np.diag([4.0, 4.0, 0.0])), "singular"),
    (dict(cell=np.array([[4.0, 0, 0], [0, 4.0, 0], [8.0, 8.0, 0]])), "singular"),
    (dict(cell=np.where(np.eye(3) > 0, 4.0, np.nan)), "NaN"),
    (dict(cell=None), "needs a cell"),
    (dict(numbers=np.array([8]), positions=np.zeros((1, 3)), cell=np.eye(3) * 0.05),
     "atom 0 and its own image are 0.05 A apart"),
    (dict(positions=np.array([[0.1, 0.1, 0.1], [4.15, 0.1, 0.1], [2.0, 2.0, 2.0]])),
     r"atoms 0 and 1 are 0\.05 A apart \(lattice image"),
])
def test_bad_cells(changes, match):
  good = Structure(numbers=np.array([8, 1, 1]),
                   positions=np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]), cell=np.eye(3) * 4.0,
                   pbc=(True, True, True), key="box")
  validate_structure(good)
  with pytest.raises(ValueError, match=match) as info:
    validate_structure(replaced(good, **changes, key="box"))
  assert "'box'" in str(info.value)


def test_left_handed_cell():
  cell = np.diag([4.0, 4.0, -4.0])
  s = Structure(numbers=np.array([8]), positions=np.zeros((1, 3)), cell=cell, pbc=True)
  validate_structure(s)  # a valid lattice by default
  with pytest.raises(ValueError, match="left-handed"):
    validate_structure(s, allow_left_handed=False)


def test_stress_needs_a_periodic_graph(setup):
  small, wide, graph, model, params = setup
  with pytest.raises(ValueError, match="periodic graph"):
    energy_forces_stress(model, params, graph.replace(cell=None))
