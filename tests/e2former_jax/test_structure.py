"""Structure validation: every bad input gets one clear error."""

from __future__ import annotations

import time

import ase
import numpy as np
import pytest

from e2former_jax.neighbors import neighbor_list
from e2former_jax.structure import MIN_DISTANCE, Structure, validate_structure

METHANE = Structure(
    numbers=np.array([6, 1, 1, 1, 1]),
    positions=np.array([[0.0, 0.0, 0.0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                        [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]]),
    key="methane")


def replaced(**changes) -> Structure:
  fields = dict(numbers=METHANE.numbers, positions=METHANE.positions, charge=0, spin=1, key="methane")
  fields.update(changes)
  return Structure(**fields)


def test_valid_structure_passes():
  validate_structure(METHANE)
  validate_structure(METHANE, num_species=7)
  validate_structure(replaced(charge=1, spin=2))  # methane cation: 9 electrons, doublet
  validate_structure(replaced(spin=0))  # unspecified multiplicity


def test_coercion():
  s = Structure(numbers=[8, 1, 1], positions=[[0, 0, 0], [0.96, 0, 0], [0, 0.96, 0]], pbc=True)
  assert s.positions.dtype == np.float64 and s.pbc == (True, True, True) and s.num_atoms == 3


@pytest.mark.parametrize("changes, match", [
    (dict(numbers=np.zeros(0, int), positions=np.zeros((0, 3))), "empty structure"),
    (dict(positions=np.zeros((5, 2))), r"positions must have shape \[5, 3\]"),
    (dict(positions=np.zeros((4, 3))), r"positions must have shape \[5, 3\]"),
    (dict(numbers=np.ones((5, 1), int)), r"shape \[n\]"),
    (dict(numbers=np.array([6.0, 1, 1, 1, 1])), "must be integers"),
    (dict(numbers=np.array([6, 1, 0, 1, 1])), "unknown atomic number 0 at atom 2"),
    (dict(numbers=np.array([6, 1, 119, 1, 1])), "unknown atomic number 119 at atom 2"),
    (dict(positions=np.where(np.arange(15).reshape(5, 3) == 7, np.nan, METHANE.positions)),
     "non-finite coordinates .* at atom 2"),
    (dict(positions=np.where(np.arange(15).reshape(5, 3) == 3, np.inf, METHANE.positions)),
     "non-finite coordinates .* at atom 1"),
    (dict(charge=0.5), "charge must be an integer"),
    (dict(spin=-1), "spin multiplicity must be >= 1"),
    (dict(spin=2), "spin multiplicity 2 is impossible with 10 electrons"),
    (dict(charge=11), "exceeds the nuclear charge"),
    (dict(cell=np.eye(2)), r"cell must have shape \[3, 3\]"),
    (dict(pbc=(True, False, False)), "needs a cell"),
])
def test_bad_structure(changes, match):
  with pytest.raises(ValueError, match=match) as info:
    validate_structure(replaced(**changes))
  assert "'methane'" in str(info.value)


def test_num_species_limit():
  with pytest.raises(ValueError, match="unknown atomic number 6 at atom 0 .*num_species=6"):
    validate_structure(METHANE, num_species=6)


def test_overlapping_atoms_named():
  positions = METHANE.positions.copy()
  positions[3] = positions[1] + [0.05, 0.0, 0.0]
  with pytest.raises(ValueError, match=r"atoms 1 and 3 are 0\.05 A apart, closer than MIN_DISTANCE"):
    validate_structure(replaced(positions=positions))
  positions[3] = positions[1]
  with pytest.raises(ValueError, match="atoms 1 and 3 are 0 A apart"):
    validate_structure(replaced(positions=positions))
  positions[1], positions[3] = [0.0, 0.0, 1.0], [MIN_DISTANCE, 0.0, 1.0]  # exactly at the limit
  validate_structure(replaced(positions=positions))


def test_large_structure_uses_neighbour_search(rng):
  n = 100_000
  positions = rng.uniform(0, (n / 0.1) ** (1 / 3), (n, 3))
  numbers = np.full(n, 6)
  # Move the random cloud's accidental close pairs far away, each to its own spot.
  close = neighbor_list(positions, MIN_DISTANCE * 1.01, 1).mask[:, 0]
  positions[close] += 5e3 + 1e3 * np.arange(close.sum())[:, None]
  start = time.perf_counter()
  validate_structure(Structure(numbers=numbers, positions=positions))
  assert time.perf_counter() - start < 30.0  # ~0.3 s alone; generous for a loaded CI machine
  positions[98765] = positions[123] + [0.0, 0.02, 0.0]
  with pytest.raises(ValueError, match=r"atoms 123 and 98765 are 0\.02 A apart"):
    validate_structure(Structure(numbers=numbers, positions=positions))


def test_from_ase():
  atoms = ase.Atoms("CH4", positions=METHANE.positions, info={"charge": 1, "spin": 2})
  s = Structure.from_ase(atoms, key="m")
  assert (s.charge, s.spin, s.cell, s.pbc, s.key) == (1, 2, None, None, "m")
  np.testing.assert_array_equal(s.numbers, METHANE.numbers)
  periodic = ase.Atoms("C", positions=[[0, 0, 0]], cell=np.eye(3) * 5, pbc=[True, True, False])
  s = Structure.from_ase(periodic, charge=0, spin=1)
  assert s.pbc == (True, True, False) and np.allclose(s.cell, np.eye(3) * 5)
