"""Start geometries of a simulation: a dataset record by molecule and conformer, a structure file's
frame, built-in names."""

from __future__ import annotations

import ase
import ase.io
import h5py
import numpy as np
import pytest
from tiny_training import CONFORMERS, write_dataset

from train.data.units import BOHR_A
from train.simulation import dataset_structure, molecule_key, read_structure


def test_dataset_structure_by_molecule_and_conformer(tmp_path):
  data = write_dataset(tmp_path / "data.hdf5", num_molecules=2)
  assert dataset_structure(data).key == "mol00/0"
  structure = dataset_structure(data, "mol01", 2)
  with h5py.File(data) as f:
    np.testing.assert_array_equal(structure.numbers, f["mol01/atomic_numbers"][()])
    np.testing.assert_allclose(structure.positions, f["mol01/conformations"][2] * BOHR_A, rtol=1e-6)
  with pytest.raises(ValueError, match="no molecule 'nope'"):
    dataset_structure(data, "nope")
  with pytest.raises(ValueError, match=f"has {CONFORMERS} conformers, asked for conformer 5"):
    dataset_structure(data, "mol01", 5)


def test_read_structure(tmp_path):
  xyz = tmp_path / "water.extxyz"
  ase.io.write(xyz, ase.Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]],
                              info={"charge": 0, "spin": 1}))
  structure = read_structure(xyz, spin=3)
  assert structure.num_atoms == 3 and structure.charge == 0 and structure.spin == 3
  with pytest.raises(ValueError, match="does not exist"):
    read_structure(tmp_path / "missing.xyz")


def test_builtin_names_map_to_dataset_keys():
  pytest.importorskip("rdkit")
  assert molecule_key("ethanol") == "CCO"
  assert molecule_key("Aspirin") == "CC(=O)Oc1ccccc1C(=O)O"
  assert molecule_key("CCO") == "CCO"  # not a name: a key as given
