"""Tests of the built-in GFN2-xTB dataset (small build): layout, labels, determinism, cache, aselmdb copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

pytest.importorskip("rdkit", reason="the built-in dataset needs RDKit: pip install 'e2former-jax[chem]'")
pytest.importorskip("tblite", reason="the built-in dataset needs tblite: pip install 'e2former-jax[chem]'")

from rdkit import Chem  # noqa: E402
from tblite.interface import Calculator  # noqa: E402

from train.data import builtin  # noqa: E402

SPICE_REAL = (Path(__file__).resolve().parents[3].parent / "shared" / "data" / "spice_real"
              / "SPICE-1.1.4_n2_modelforge.hdf5")
# (dtype, rank, units) of every SPICE key the built-in file shares with the published SPICE files.
SPICE_KEYS = {
  "atomic_numbers": (np.int16, 1, None),
  "conformations": (np.float32, 3, "bohr"),
  "dft_total_energy": (np.float64, 1, "hartree"),
  "dft_total_gradient": (np.float32, 3, "hartree/bohr"),
  "smiles": (object, 1, None),
  "subset": (object, 1, None),
}
# Labels are recomputed from the stored float32 geometry; only SCF convergence noise may differ.
ENERGY_ATOL_HARTREE = 1e-7
GRADIENT_ATOL_HARTREE_PER_BOHR = 1e-5


@pytest.fixture(scope="module")
def small_build(tmp_path_factory) -> Path:
  return builtin.build_builtin_dataset(tmp_path_factory.mktemp("builtin") / "small", small=True,
                                       workers=2, progress=False)


def _read_groups(hdf5: Path) -> dict[str, dict[str, np.ndarray]]:
  with h5py.File(hdf5, "r") as f:
    return {name: {key: group[key][()] for key in group} for name, group in f.items()}


def test_molecule_table_is_valid_chemistry():
  names = [m.name for m in builtin.MOLECULES]
  assert len(set(names)) == len(names)
  assert 60 <= len(builtin.MOLECULES) <= 120
  assert {m.subset for m in builtin.MOLECULES} == set(builtin.SUBSETS)
  keys = set()
  for molecule in builtin.MOLECULES:
    mol = Chem.MolFromSmiles(molecule.smiles)
    assert Chem.GetFormalCharge(mol) == molecule.charge, molecule.name
    radicals = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    assert radicals + 1 == molecule.multiplicity, molecule.name
    assert (molecule.charge != 0) == (molecule.subset == builtin.CHARGED), molecule.name
    assert (molecule.multiplicity != 1) == (molecule.subset == builtin.RADICALS), molecule.name
    mol_h = Chem.AddHs(mol)
    assert 4 <= mol_h.GetNumAtoms() <= 40, molecule.name
    assert {a.GetSymbol() for a in mol_h.GetAtoms()} <= {"H", "C", "N", "O", "F", "P", "S", "Cl"}
    keys.add(Chem.MolToSmiles(mol))
  assert len(keys) == len(builtin.MOLECULES) and not any("/" in k for k in keys)
  assert len(builtin.builtin_molecules(small=True)) == len(builtin.SMALL_MOLECULE_NAMES) == 6


def test_displacement_sigma_stores_kt_in_a_bond_stretch():
  for temperature in builtin.TEMPERATURES_K:
    sigma = builtin.displacement_sigma_a(temperature)
    energy = builtin.BOND_STRETCH_K_EV_PER_A2 * sigma**2
    np.testing.assert_allclose(energy, builtin.KB_EV * temperature, rtol=1e-12)
  assert 0.02 < builtin.displacement_sigma_a(300.0) < 0.04


def test_layout_matches_spice(small_build):
  groups = _read_groups(small_build / builtin.HDF5_FILENAME)
  molecules = builtin.builtin_molecules(small=True)
  assert list(groups) == sorted(Chem.MolToSmiles(Chem.MolFromSmiles(m.smiles)) for m in molecules)
  with h5py.File(small_build / builtin.HDF5_FILENAME, "r") as f:
    assert f.attrs["level_of_theory"] == "GFN2-xTB (tblite 0.8.0)"
    assert "NOT SPICE" in f.attrs["note"]
    for name, group in f.items():
      n = group["atomic_numbers"].shape[0]
      m = group["dft_total_energy"].shape[0]
      assert m == builtin.SMALL_CONFORMERS_PER_MOLECULE
      for key, (dtype, rank, units) in SPICE_KEYS.items():
        data = group[key]
        assert data.dtype == dtype and data.ndim == rank, (name, key)
        assert data.attrs.get("units") == units, (name, key)
      assert group["conformations"].shape == group["dft_total_gradient"].shape == (m, n, 3)
      assert h5py.check_string_dtype(group["smiles"].dtype).encoding == "utf-8"
      assert group["subset"][0].decode() in builtin.SUBSETS
      assert group["total_charge"].shape == group["spin_multiplicity"].shape == (1,)


def test_layout_matches_the_real_spice_file(small_build):
  if not SPICE_REAL.is_file():
    pytest.skip(f"real SPICE sample not found at {SPICE_REAL}")
  with h5py.File(SPICE_REAL, "r") as real, h5py.File(small_build / builtin.HDF5_FILENAME, "r") as ours:
    real_group = next(iter(real.values()))
    for group in ours.values():
      for key in SPICE_KEYS:
        assert group[key].dtype == real_group[key].dtype, key
        assert group[key].ndim == real_group[key].ndim, key
        assert dict(group[key].attrs) == dict(real_group[key].attrs), key
        if group[key].dtype == object:
          assert h5py.check_string_dtype(group[key].dtype) == h5py.check_string_dtype(real_group[key].dtype)


def test_mapped_smiles_orders_atoms_and_carries_charge_and_spin(small_build):
  by_key = {Chem.MolToSmiles(Chem.MolFromSmiles(m.smiles)): m for m in builtin.builtin_molecules(small=True)}
  for key, group in _read_groups(small_build / builtin.HDF5_FILENAME).items():
    molecule = by_key[key]
    params = Chem.SmilesParserParams()
    params.removeHs = False  # keep the mapped hydrogens as rows
    mapped = Chem.MolFromSmiles(group["smiles"][0].decode(), params)
    rows = sorted((a.GetAtomMapNum() - 1, a.GetAtomicNum()) for a in mapped.GetAtoms())
    assert [r for r, _ in rows] == list(range(len(group["atomic_numbers"])))
    assert [z for _, z in rows] == group["atomic_numbers"].tolist()
    assert Chem.GetFormalCharge(mapped) == group["total_charge"][0] == molecule.charge
    radicals = sum(a.GetNumRadicalElectrons() for a in mapped.GetAtoms())
    assert radicals + 1 == group["spin_multiplicity"][0] == molecule.multiplicity
  charges = {m.charge for m in builtin.builtin_molecules(small=True)}
  spins = {m.multiplicity for m in builtin.builtin_molecules(small=True)}
  assert charges == {-1, 0, 1} and spins == {1, 2}


def test_labels_are_gfn2_xtb_single_points(small_build):
  for group in _read_groups(small_build / builtin.HDF5_FILENAME).values():
    numbers = group["atomic_numbers"].astype(np.int64)
    for k in (0, len(group["dft_total_energy"]) - 1):  # an MD snapshot and a Gaussian displacement
      calc = Calculator("GFN2-xTB", numbers, group["conformations"][k].astype(np.float64),
                        charge=float(group["total_charge"][0]), uhf=int(group["spin_multiplicity"][0]) - 1)
      calc.set("verbosity", 0)
      result = calc.singlepoint()
      assert abs(result.get("energy") - group["dft_total_energy"][k]) < ENERGY_ATOL_HARTREE
      np.testing.assert_allclose(group["dft_total_gradient"][k], result.get("gradient"),
                                 atol=GRADIENT_ATOL_HARTREE_PER_BOHR)


def test_geometries_are_thermal_not_broken(small_build):
  for name, group in _read_groups(small_build / builtin.HDF5_FILENAME).items():
    positions_a = group["conformations"].astype(np.float64) * builtin.BOHR_A  # [M, n, 3]
    n = positions_a.shape[1]
    dist = np.linalg.norm(positions_a[:, :, None] - positions_a[:, None], axis=-1) + 1e9 * np.eye(n)
    assert dist.min() >= builtin.MIN_DISTANCE_A, name
    forces = -group["dft_total_gradient"] * (builtin.HARTREE_EV / builtin.BOHR_A)  # [M, n, 3] eV/A
    rms = np.sqrt((forces**2).mean(axis=(1, 2)))  # [M]
    # Perturbed away from equilibrium, but not torn apart.
    assert np.all(rms > 0.05) and np.all(rms < 10.0), (name, rms)
    assert len(np.unique(group["dft_total_energy"])) == len(group["dft_total_energy"]), name
    # xTB forces of an isolated molecule sum to zero.
    np.testing.assert_allclose(forces.sum(axis=1), 0.0, atol=1e-3)


def test_aselmdb_copy_matches_hdf5(small_build):
  from ase.db import connect

  folder = small_build / builtin.ASELMDB_DIRNAME
  db = connect(str(folder / builtin.ASELMDB_FILENAME), readonly=True, use_lock_file=False)
  natoms = np.load(folder / builtin.ASELMDB_METADATA_FILENAME)["natoms"]
  assert natoms.dtype == np.int32
  rows = list(db.select())
  groups = _read_groups(small_build / builtin.HDF5_FILENAME)
  by_key = {Chem.MolToSmiles(Chem.MolFromSmiles(m.smiles)): m for m in builtin.builtin_molecules(small=True)}
  expected = []
  for molecule in builtin.builtin_molecules(small=True):
    group = groups[Chem.MolToSmiles(Chem.MolFromSmiles(molecule.smiles))]
    for k in range(len(group["dft_total_energy"])):
      expected.append((molecule, group, k))
  assert db.count() == len(rows) == len(natoms) == len(expected) == len(by_key) * 3
  for row, n, (molecule, group, k) in zip(rows, natoms, expected):
    atoms = row.toatoms()
    assert len(atoms) == n == len(group["atomic_numbers"])
    assert not atoms.pbc.any()
    assert row.data["charge"] == molecule.charge and row.data["spin"] == molecule.multiplicity
    np.testing.assert_array_equal(atoms.numbers, group["atomic_numbers"])
    np.testing.assert_allclose(atoms.positions, group["conformations"][k].astype(np.float64) * builtin.BOHR_A,
                               rtol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energy(),
                               group["dft_total_energy"][k] * builtin.HARTREE_EV, rtol=1e-14)
    np.testing.assert_allclose(atoms.get_forces(),
                               -group["dft_total_gradient"][k].astype(np.float64)
                               * (builtin.HARTREE_EV / builtin.BOHR_A), rtol=1e-12)
  assert not (folder / (builtin.ASELMDB_FILENAME + "-lock")).exists()


def test_cache_hit_does_not_rebuild(small_build):
  manifest_path = small_build / builtin.MANIFEST_FILENAME
  manifest = json.loads(manifest_path.read_text())
  assert manifest["version"] == builtin.BUILTIN_VERSION
  assert manifest["counts"]["conformers"] == 6 * builtin.SMALL_CONFORMERS_PER_MOLECULE
  before = {p: p.stat().st_mtime_ns for p in small_build.rglob("*")}
  again = builtin.build_builtin_dataset(small_build, small=True, workers=2, progress=False)
  assert again == small_build
  assert {p: p.stat().st_mtime_ns for p in small_build.rglob("*")} == before


def test_force_rebuild_is_deterministic_and_atomic(small_build, tmp_path):
  reference = _read_groups(small_build / builtin.HDF5_FILENAME)
  copy = tmp_path / "copy"
  shutil.copytree(small_build, copy)
  before = (copy / builtin.MANIFEST_FILENAME).stat().st_mtime_ns
  # One worker instead of two: a different schedule must give the same numbers.
  builtin.build_builtin_dataset(copy, small=True, workers=1, force=True, progress=False)
  assert (copy / builtin.MANIFEST_FILENAME).stat().st_mtime_ns != before
  rebuilt = _read_groups(copy / builtin.HDF5_FILENAME)
  assert rebuilt.keys() == reference.keys()
  for name in reference:
    assert rebuilt[name].keys() == reference[name].keys()
    for key in reference[name]:
      np.testing.assert_array_equal(rebuilt[name][key], reference[name][key])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no partial or stale folders left


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(builtin, "_write_aselmdb", interrupted)
  monkeypatch.setattr(builtin, "_sample_all", lambda *args: [])
  with pytest.raises(KeyboardInterrupt):
    builtin.build_builtin_dataset(tmp_path / "out", small=True, progress=False)
  assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("not a dataset")
  with pytest.raises(ValueError, match="not a built-in dataset folder"):
    builtin.build_builtin_dataset(tmp_path, small=True, progress=False)
  with pytest.raises(ValueError, match="num_conformers"):
    builtin.build_builtin_dataset(tmp_path / "new", num_conformers=0)


def test_default_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(builtin.DATA_DIR_ENV, str(tmp_path))
  assert builtin.default_builtin_dir() == tmp_path / "builtin-v1"
  assert builtin.default_builtin_dir(small=True) == tmp_path / "builtin-v1-small"
  monkeypatch.delenv(builtin.DATA_DIR_ENV)
  assert builtin.default_builtin_dir() == Path("~/.cache/e2former_jax/builtin-v1").expanduser()
