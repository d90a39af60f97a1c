"""SPICE HDF5 reader: the shared real file, unit conversions, optional keys and bad input."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from train.data import InvalidRecordError, SpiceHDF5Dataset, open_dataset

HARTREE_EV = 27.211386245988
BOHR_A = 0.529177210903


def test_real_file_round_trip(spice_real):
  ds = open_dataset(spice_real)
  assert isinstance(ds, SpiceHDF5Dataset) and len(ds) == 55
  assert ds.num_atoms.tolist() == [27] * 50 + [5] * 5
  assert ds.subset_names == ["SPICE DES370K Single Points Dataset Supplement v1.0",
                             "SPICE PubChem Set 6 Single Points Dataset v1.2"]
  with h5py.File(spice_real, "r") as f:
    for index, (group, c) in [(0, ("103147721", 0)), (37, ("103147721", 37)), (53, ("C#C.[Na+]", 3))]:
      record = ds.read(index)
      g = f[group]
      np.testing.assert_array_equal(record.structure.numbers, g["atomic_numbers"][()])
      np.testing.assert_allclose(record.structure.positions, g["conformations"][c].astype(np.float64) * BOHR_A, rtol=1e-12)
      assert record.energy == pytest.approx(g["dft_total_energy"][c] * HARTREE_EV, rel=1e-14)
      np.testing.assert_allclose(record.forces, -g["dft_total_gradient"][c].astype(np.float64) * HARTREE_EV / BOHR_A,
                                 rtol=1e-12)
      assert record.molecule_key == group and record.structure.key == f"{group}/{c}"
  na = ds.read(53)
  assert (na.structure.charge, na.structure.spin) == (1, 1)  # C#C.[Na+]: +1 from the SMILES
  assert na.subset == "SPICE DES370K Single Points Dataset Supplement v1.0"
  assert ds.read(0).structure.charge == 1  # the [N+] of the ammonium in 103147721
  # Known values: first conformer of C#C.[Na+], hartree -> eV; 1 bohr in angstrom.
  assert ds.read(50).energy == pytest.approx(-239.52140641 * 27.211386245988, abs=1e-5)
  assert ds.molecule_keys().tolist() == ["103147721"] * 50 + ["C#C.[Na+]"] * 5
  ds.close()


def test_stored_charge_and_spin_are_honoured(spice_writer, make_molecules):
  mols = make_molecules(1, [5, 6], conformers=3)
  path = spice_writer(mols, extra={
      "mol0": {"total_charge": np.array([2], np.int16), "spin_multiplicity": np.array(3, np.int16)},
      "mol1": {"total_charge": np.array([0, 2, 0], np.int16)}})
  ds = open_dataset(path)
  assert [(ds.read(i).structure.charge, ds.read(i).structure.spin) for i in range(3)] == [(2, 3)] * 3
  assert [ds.read(i).structure.charge for i in range(3, 6)] == [0, 2, 0]


def test_no_smiles_and_no_charge_is_a_missing_key(spice_writer, make_molecules):
  path = spice_writer(make_molecules(2, [4], conformers=2))
  with h5py.File(path, "a") as f:
    del f["mol0"]["smiles"]
  with pytest.raises(InvalidRecordError, match=r"group 'mol0'.*missing keys.*total_charge or smiles"):
    open_dataset(path)


def test_missing_key_raises_or_skips(spice_writer, make_molecules):
  path = spice_writer(make_molecules(3, [4, 5, 6], conformers=2))
  with h5py.File(path, "a") as f:
    del f["mol1"]["dft_total_gradient"]
  with pytest.raises(InvalidRecordError, match=r"synthetic\.hdf5: group 'mol1': missing keys \['dft_total_gradient'\]"):
    open_dataset(path)
  with pytest.warns(UserWarning, match=r"skipped 1 groups.*mol1.*dft_total_gradient"):
    ds = open_dataset(path, on_error="skip")
  assert ds.num_atoms.tolist() == [4, 4, 6, 6]


def test_inconsistent_shapes(spice_writer, make_molecules):
  path = spice_writer(make_molecules(4, [4], conformers=2))
  with h5py.File(path, "a") as f:
    del f["mol0"]["dft_total_energy"]
    f["mol0"]["dft_total_energy"] = np.zeros(3)
  with pytest.raises(InvalidRecordError, match=r"dft_total_energy has shape \(3,\), expected \(2,\)"):
    open_dataset(path)


@pytest.mark.parametrize("key, value, match", [
    ("dft_total_energy", np.array([np.nan, 0.0]), "non-finite energy"),
    ("conformations", None, "non-finite coordinates"),
    ("dft_total_gradient", None, "non-finite forces"),
    ("atomic_numbers", np.array([6, 1, 1, 130], np.int16), "unknown atomic number 130"),
])
def test_bad_values_name_file_and_record(spice_writer, key, value, match, make_molecules):
  mols = make_molecules(5, [4], conformers=2)
  path = spice_writer(mols)
  with h5py.File(path, "a") as f:
    data = f["mol0"][key][()] if value is None else value
    if value is None:
      data[0, 1, 2] = np.inf
    del f["mol0"][key]
    f["mol0"][key] = data
  ds = open_dataset(path)
  with pytest.raises(InvalidRecordError, match=rf"synthetic\.hdf5: group 'mol0' conformer 0: .*{match}"):
    ds.read(0)


def test_overlapping_atoms(spice_writer, make_molecules):
  mols = make_molecules(6, [4], conformers=1)
  mols[0][1][0, 2] = mols[0][1][0, 0] + 0.05
  ds = open_dataset(spice_writer(mols))
  with pytest.raises(InvalidRecordError, match=r"conformer 0: .*atoms 0 and 2 are 0\.0866 A apart"):
    ds.read(0)


def test_truncated_and_foreign_files(spice_real, tmp_path):
  truncated = tmp_path / "truncated.hdf5"
  truncated.write_bytes(spice_real.read_bytes()[:200_000])
  with pytest.raises(ValueError, match=r"truncated\.hdf5: cannot open as an HDF5 file"):
    open_dataset(truncated)
  garbage = tmp_path / "garbage.h5"
  garbage.write_bytes(b"not an hdf5 file" * 100)
  with pytest.raises(ValueError, match=r"garbage\.h5: cannot open as an HDF5 file"):
    open_dataset(garbage)
  copy = tmp_path / "copy.hdf5"
  shutil.copy(spice_real, copy)
  assert len(open_dataset(copy)) == 55


def test_open_dataset_dispatch_errors(tmp_path):
  with pytest.raises(ValueError, match="no such file"):
    open_dataset(tmp_path / "missing.hdf5")
  (tmp_path / "data.csv").write_text("x")
  with pytest.raises(ValueError, match=r"unknown dataset format '\.csv'"):
    open_dataset(tmp_path / "data.csv")
  with pytest.raises(ValueError, match="folder holds no .aselmdb files"):
    open_dataset(tmp_path)
