"""OMol25 ASE-LMDB reader: the shared sample, metadata.npz, folders and bad input."""

from __future__ import annotations

import shutil

import ase
import ase.db
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from train.data import InvalidRecordError, OMol25Dataset, open_dataset

# (first row, atoms, charge, spin) of some molecules of the sample (README table; 5 rows each).
SAMPLE = {"methanol": (0, 6, 0, 1), "toluene": (15, 15, 0, 1), "methylammonium": (30, 8, 1, 1),
          "acetate": (40, 7, -1, 1), "ethyl radical": (50, 7, 0, 2)}


def write_db(path, rows):
  """Writes [(atoms, data)] as an ASE LMDB database and closes it."""
  db = ase.db.connect(str(path), use_lock_file=False)
  for atoms, data in rows:
    db.write(atoms, data=data)
  db.close()
  return path


def methane(energy=-1.0, forces=None):
  atoms = ase.Atoms("CH4", positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63],
                                      [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]])
  atoms.calc = SinglePointCalculator(atoms, energy=energy,
                                     forces=np.zeros((5, 3)) if forces is None else forces)
  return atoms


def test_sample_round_trip(omol_dir):
  # Reference rows straight from ase.db, closed before the dataset opens the file: LMDB allows one
  # open environment per file and process.
  db = ase.db.connect(str(omol_dir / "sample.aselmdb"), readonly=True, use_lock_file=False)
  reference = {i: db.get(id=i + 1).toatoms() for i in range(60)}
  db.close()
  del db
  ds = open_dataset(omol_dir / "sample.aselmdb")
  assert isinstance(ds, OMol25Dataset) and len(ds) == 60
  np.testing.assert_array_equal(ds.num_atoms, np.load(omol_dir / "metadata.npz")["natoms"])
  assert ds.subset_names == ["sample"]
  for name, (row, natoms, charge, spin) in SAMPLE.items():
    for index in (row, row + 4):
      record = ds.read(index)
      atoms = reference[index]
      assert record.structure.num_atoms == natoms, name
      assert (record.structure.charge, record.structure.spin) == (charge, spin), name
      np.testing.assert_array_equal(record.structure.positions, atoms.positions)
      assert record.energy == atoms.get_potential_energy()
      np.testing.assert_array_equal(record.forces, atoms.get_forces())
      assert record.structure.cell is None and record.structure.pbc is None
  keys = ds.molecule_keys()
  assert len(set(keys)) == 12 and all(len(set(keys[i:i + 5])) == 1 for i in range(0, 60, 5))
  assert keys[30] == "CH6N|q=1|s=1"


def test_folder_and_without_metadata(omol_dir, tmp_path):
  folder = open_dataset(omol_dir)
  assert folder.subset_names == [omol_dir.name] and len(folder) == 60
  shutil.copy(omol_dir / "sample.aselmdb", tmp_path / "copy.aselmdb")
  counted = open_dataset(tmp_path / "copy.aselmdb")  # no metadata.npz: reads every row once
  np.testing.assert_array_equal(counted.num_atoms, folder.num_atoms)
  assert counted.read(57).energy == folder.read(57).energy


def test_metadata_mismatch(omol_dir, tmp_path):
  shutil.copy(omol_dir / "sample.aselmdb", tmp_path / "a.aselmdb")
  np.savez(tmp_path / "metadata.npz", natoms=np.full(59, 6, np.int32))
  with pytest.raises(ValueError, match=r"metadata\.npz: has 59 natoms entries but the 1 .aselmdb file\(s\) hold 60 rows"):
    open_dataset(tmp_path)
  natoms = np.load(omol_dir / "metadata.npz")["natoms"].copy()
  natoms[7] += 1
  np.savez(tmp_path / "metadata.npz", natoms=natoms)
  ds = open_dataset(tmp_path)
  with pytest.raises(InvalidRecordError, match=r"a\.aselmdb row id 8: has 6 atoms but the index says 7"):
    ds.read(7)


def test_truncated_and_foreign_files(omol_dir, tmp_path):
  data = (omol_dir / "sample.aselmdb").read_bytes()
  for size in (len(data) // 2, len(data) - 4096):  # would crash the process (SIGBUS) if mapped
    (tmp_path / "cut.aselmdb").write_bytes(data[:size])
    with pytest.raises(ValueError, match=rf"cut\.aselmdb: .*truncated LMDB file \({size} bytes"):
      open_dataset(tmp_path / "cut.aselmdb")
  (tmp_path / "junk.aselmdb").write_bytes(b"\x00junk" * 5000)
  with pytest.raises(ValueError, match=r"junk\.aselmdb: cannot open as an ASE LMDB database"):
    open_dataset(tmp_path / "junk.aselmdb")


def test_missing_keys_and_bad_values(tmp_path):
  forces = np.zeros((5, 3))
  forces[2, 1] = np.inf
  path = write_db(tmp_path / "bad.aselmdb", [
      (methane(), {"charge": 0, "spin": 1}),
      (methane(), {"charge": 0}),
      (methane(energy=np.nan), {"charge": 0, "spin": 1}),
      (methane(forces=forces), {"charge": 0, "spin": 1}),
      (ase.Atoms("CH4", positions=methane().positions), {"charge": 0, "spin": 1}),
  ])
  ds = open_dataset(path)
  assert len(ds) == 5 and ds.read(0).structure.spin == 1
  with pytest.raises(InvalidRecordError, match=r"bad\.aselmdb: bad\.aselmdb row id 2: row\.data has no \['spin'\]"):
    ds.read(1)
  with pytest.raises(InvalidRecordError, match=r"row id 3: non-finite energy"):
    ds.read(2)
  with pytest.raises(InvalidRecordError, match=r"row id 4: non-finite forces .* at atom 2"):
    ds.read(3)
  with pytest.raises(InvalidRecordError, match=r"row id 5: row has no energy"):
    ds.read(4)


def test_same_file_opened_twice(omol_dir):
  # LMDB allows one environment per file and process: the datasets share it.
  first = open_dataset(omol_dir / "sample.aselmdb")
  second = open_dataset(omol_dir / "sample.aselmdb")
  second.close()
  assert first.read(3).energy == open_dataset(omol_dir).read(3).energy
