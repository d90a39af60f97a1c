"""Tests of the built-in GFN2-xTB dataset: the molecule tables (no xTB) and the small build (layout,
labels, determinism, cache, aselmdb copy)."""

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

from train.data.builtin import build, enumeration, molecules, sampling, sizes, writers  # noqa: E402
from train.data.builtin.sizes import BuiltinSize  # noqa: E402
from train.data.units import BOHR_A, HARTREE_EV  # noqa: E402

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
  return build.build_builtin_dataset(tmp_path_factory.mktemp("builtin") / "small", size=BuiltinSize.SMALL,
                                     workers=2, progress=False)


def _read_groups(hdf5: Path) -> dict[str, dict[str, np.ndarray]]:
  with h5py.File(hdf5, "r") as f:
    return {name: {key: group[key][()] for key in group} for name, group in f.items()}


SMALL_MOLECULES = sizes.builtin_molecules(BuiltinSize.SMALL)
SMALL_CONFORMERS = sizes.SIZE_SPECS[BuiltinSize.SMALL].conformers_per_molecule


def _key(molecule) -> str:
  return Chem.MolToSmiles(Chem.MolFromSmiles(molecule.smiles))


def _assert_valid_table(table, max_heavy_atoms):
  """Every entry: charge and multiplicity as its SMILES says, allowed elements, size in range, the
  subset consistent with charge, spin and fragments; names and canonical keys unique."""
  names = [m.name for m in table]
  assert len(set(names)) == len(names)
  keys = set()
  for molecule in table:
    mol = Chem.MolFromSmiles(molecule.smiles)
    assert Chem.GetFormalCharge(mol) == molecule.charge, molecule.name
    radicals = sum(a.GetNumRadicalElectrons() for a in mol.GetAtoms())
    assert radicals + 1 == molecule.multiplicity, molecule.name
    assert (molecule.charge != 0) == (molecule.subset == molecules.CHARGED), molecule.name
    assert (molecule.multiplicity != 1) == (molecule.subset == molecules.RADICALS), molecule.name
    fragments = Chem.GetMolFrags(mol, asMols=True)
    assert (len(fragments) > 1) == (molecule.subset == molecules.ION_PAIRS), molecule.name
    if molecule.subset == molecules.ION_PAIRS:
      assert sorted(Chem.GetFormalCharge(f) for f in fragments) == [-1, 1], molecule.name
    assert abs(molecule.charge) <= 2 and molecule.multiplicity in (1, 2), molecule.name
    assert 1 <= mol.GetNumHeavyAtoms() <= max_heavy_atoms, molecule.name
    assert {a.GetSymbol() for a in mol.GetAtoms()} <= set(molecules.ELEMENTS)
    keys.add(Chem.MolToSmiles(mol))
  assert len(keys) == len(table) and not any("/" in k for k in keys)


def test_curated_table_is_valid_chemistry():
  assert len(molecules.CURATED_MOLECULES) == 120
  assert {m.subset for m in molecules.CURATED_MOLECULES} == set(molecules.SUBSETS) - {molecules.ION_PAIRS}
  _assert_valid_table(molecules.CURATED_MOLECULES, max_heavy_atoms=20)
  assert {m.name for m in SMALL_MOLECULES} >= set(molecules.SMALL_MOLECULE_NAMES)


@pytest.mark.parametrize("size", [BuiltinSize.DEFAULT, BuiltinSize.LARGE])
def test_enumerated_tables_are_valid_chemistry_with_the_intended_counts(size):
  spec = sizes.SIZE_SPECS[size]
  table = sizes.builtin_molecules(size)
  enumerated = table[len(molecules.CURATED_MOLECULES):]
  assert table[:len(molecules.CURATED_MOLECULES)] == molecules.CURATED_MOLECULES
  _assert_valid_table(table, max_heavy_atoms=20)
  assert all(Chem.MolFromSmiles(m.smiles).GetNumHeavyAtoms() <= enumeration.MAX_HEAVY_ATOMS for m in enumerated)
  assert all(m.smiles == _key(m) for m in enumerated)  # stored canonical
  for subset, count in spec.enumerated:
    assert sum(m.subset == subset for m in enumerated) == count, subset
  assert len(enumerated) == sum(count for _, count in spec.enumerated)
  assert {m.subset for m in table} == set(molecules.SUBSETS)
  # Both signs of charge, and a few doubly charged ions.
  charges = [m.charge for m in enumerated]
  assert min(charges.count(-1), charges.count(1)) >= 0.4 * (charges.count(-1) + charges.count(1))
  assert {-2, 2} <= set(charges)


def test_enumeration_is_deterministic_and_nested():
  quotas = sizes.SIZE_SPECS[BuiltinSize.DEFAULT].enumerated
  fresh = enumeration.enumerated_molecules.__wrapped__(quotas)  # recomputed, not the cached tuple
  assert fresh == enumeration.enumerated_molecules(quotas)
  # The sizes nest: the default build's molecules are part of the large build's.
  assert set(sizes.builtin_molecules(BuiltinSize.DEFAULT)) < set(sizes.builtin_molecules(BuiltinSize.LARGE))


def test_heldout_build_holds_no_molecule_of_a_default_sized_build():
  heldout = sizes.builtin_molecules(BuiltinSize.HELDOUT)
  assert [sum(m.subset == s for m in heldout) for s in molecules.SUBSETS] == (
      [sizes.HELDOUT_PER_SUBSET] * len(molecules.SUBSETS))
  doubled = tuple((subset, sizes.HELDOUT_SKIP_FACTOR * n) for subset, n in
                  sizes.SIZE_SPECS[BuiltinSize.DEFAULT].enumerated)
  assert not set(heldout) & (set(enumeration.enumerated_molecules(doubled)) | set(molecules.CURATED_MOLECULES))
  assert set(heldout) < set(sizes.builtin_molecules(BuiltinSize.LARGE))
  assert len({_key(m) for m in heldout}) == len(heldout)


def test_enumeration_fails_clearly_when_a_quota_cannot_be_filled():
  with pytest.raises(ValueError, match="yield only .* 'ion pairs' molecules; 1000 were requested"):
    enumeration.enumerated_molecules(((molecules.ION_PAIRS, 1000),))


def test_ions_and_radicals_come_from_unique_sites():
  def canonical(smiles):
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))

  def derived(smiles):
    mol = Chem.MolFromSmiles(smiles)
    parent = molecules.BuiltinMolecule("parent", smiles, 0, 1, molecules.SMALL_ORGANICS)
    radical = enumeration._radical(parent, mol)
    return ({(s, q) for _, s, q in enumeration._ions(parent, mol)}, radical and radical[1])

  ions, radical = derived("NCCO")  # a basic amine, one acidic O-H
  assert ions == {(canonical("[O-]CCN"), -1), (canonical("[NH3+]CCO"), 1)}
  assert radical in {canonical(s) for s in ("N[CH]CO", "NC[CH]O", "[NH]CCO", "NCC[O]")}
  assert derived("NCCN")[0] == set()  # two basic sites: the proton could move
  assert derived("CC(=O)NCCN")[0] == set()  # an amide beside the amine; no O-H or S-H
  assert derived("OCCO")[0] == set()  # two acidic sites
  assert derived("C[N+](=O)[O-]") == (set(), None)  # charge-separated: left alone
  assert derived("CC(=O)O")[1] == canonical("[CH2]C(=O)O")  # never the acyloxyl radical


def test_displacement_sigma_stores_kt_in_a_bond_stretch():
  for temperature in sampling.TEMPERATURES_K:
    sigma = sampling.displacement_sigma_a(temperature)
    energy = sampling.BOND_STRETCH_K_EV_PER_A2 * sigma**2
    np.testing.assert_allclose(energy, sampling.KB_EV * temperature, rtol=1e-12)
  assert 0.02 < sampling.displacement_sigma_a(300.0) < 0.04


def test_layout_matches_spice(small_build):
  groups = _read_groups(small_build / writers.HDF5_FILENAME)
  assert list(groups) == sorted(_key(m) for m in SMALL_MOLECULES)
  with h5py.File(small_build / writers.HDF5_FILENAME, "r") as f:
    assert f.attrs["level_of_theory"] == "GFN2-xTB (tblite 0.8.0)"
    assert "NOT SPICE" in f.attrs["note"]
    for name, group in f.items():
      n = group["atomic_numbers"].shape[0]
      m = group["dft_total_energy"].shape[0]
      assert m == SMALL_CONFORMERS
      for key, (dtype, rank, units) in SPICE_KEYS.items():
        data = group[key]
        assert data.dtype == dtype and data.ndim == rank, (name, key)
        assert data.attrs.get("units") == units, (name, key)
      assert group["conformations"].shape == group["dft_total_gradient"].shape == (m, n, 3)
      assert h5py.check_string_dtype(group["smiles"].dtype).encoding == "utf-8"
      assert group["subset"][0].decode() in molecules.SUBSETS
      assert group["total_charge"].shape == group["spin_multiplicity"].shape == (1,)


def test_layout_matches_the_real_spice_file(small_build):
  if not SPICE_REAL.is_file():
    pytest.skip(f"real SPICE sample not found at {SPICE_REAL}")
  with h5py.File(SPICE_REAL, "r") as real, h5py.File(small_build / writers.HDF5_FILENAME, "r") as ours:
    real_group = next(iter(real.values()))
    for group in ours.values():
      for key in SPICE_KEYS:
        assert group[key].dtype == real_group[key].dtype, key
        assert group[key].ndim == real_group[key].ndim, key
        assert dict(group[key].attrs) == dict(real_group[key].attrs), key
        if group[key].dtype == object:
          assert h5py.check_string_dtype(group[key].dtype) == h5py.check_string_dtype(real_group[key].dtype)


def test_mapped_smiles_orders_atoms_and_carries_charge_and_spin(small_build):
  by_key = {_key(m): m for m in SMALL_MOLECULES}
  for key, group in _read_groups(small_build / writers.HDF5_FILENAME).items():
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
  charges = {m.charge for m in SMALL_MOLECULES}
  spins = {m.multiplicity for m in SMALL_MOLECULES}
  assert charges == {-1, 0, 1} and spins == {1, 2}


def test_labels_are_gfn2_xtb_single_points(small_build):
  for group in _read_groups(small_build / writers.HDF5_FILENAME).values():
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
  by_key = {_key(m): m for m in SMALL_MOLECULES}
  for name, group in _read_groups(small_build / writers.HDF5_FILENAME).items():
    positions_a = group["conformations"].astype(np.float64) * BOHR_A  # [M, n, 3]
    n = positions_a.shape[1]
    dist = np.linalg.norm(positions_a[:, :, None] - positions_a[:, None], axis=-1) + 1e9 * np.eye(n)
    assert dist.min() >= sampling.MIN_DISTANCE_A, name
    forces = -group["dft_total_gradient"] * (HARTREE_EV / BOHR_A)  # [M, n, 3] eV/A
    rms = np.sqrt((forces**2).mean(axis=(1, 2)))  # [M]
    # Perturbed away from equilibrium, but not torn apart.
    assert np.all(rms > 0.05) and np.all(rms < 10.0), (name, rms)
    assert len(np.unique(group["dft_total_energy"])) == len(group["dft_total_energy"]), name
    # xTB forces of an isolated molecule sum to zero.
    np.testing.assert_allclose(forces.sum(axis=1), 0.0, atol=1e-3)
    mol_h = Chem.AddHs(Chem.MolFromSmiles(by_key[name].smiles))
    fragments = [list(f) for f in Chem.GetMolFrags(mol_h)]
    if len(fragments) > 1:
      # The ions of a pair touch (ETKDG alone embeds them on top of each other) and stay together.
      gaps = dist[:, fragments[0]][:, :, fragments[1]].min(axis=(1, 2))  # [M]
      assert np.all(gaps > 1.5) and np.all(gaps < 4.0), (name, gaps)


def test_aselmdb_copy_matches_hdf5(small_build):
  from ase.db import connect

  folder = small_build / writers.ASELMDB_DIRNAME
  db = connect(str(folder / writers.ASELMDB_FILENAME), readonly=True, use_lock_file=False)
  natoms = np.load(folder / writers.ASELMDB_METADATA_FILENAME)["natoms"]
  assert natoms.dtype == np.int32
  rows = list(db.select())
  groups = _read_groups(small_build / writers.HDF5_FILENAME)
  expected = []
  for molecule in SMALL_MOLECULES:
    group = groups[_key(molecule)]
    for k in range(len(group["dft_total_energy"])):
      expected.append((molecule, group, k))
  assert db.count() == len(rows) == len(natoms) == len(expected) == len(SMALL_MOLECULES) * SMALL_CONFORMERS
  for row, n, (molecule, group, k) in zip(rows, natoms, expected):
    atoms = row.toatoms()
    assert len(atoms) == n == len(group["atomic_numbers"])
    assert not atoms.pbc.any()
    assert row.data["charge"] == molecule.charge and row.data["spin"] == molecule.multiplicity
    np.testing.assert_array_equal(atoms.numbers, group["atomic_numbers"])
    np.testing.assert_allclose(atoms.positions, group["conformations"][k].astype(np.float64) * BOHR_A,
                               rtol=1e-12)
    np.testing.assert_allclose(atoms.get_potential_energy(),
                               group["dft_total_energy"][k] * HARTREE_EV, rtol=1e-14)
    np.testing.assert_allclose(atoms.get_forces(),
                               -group["dft_total_gradient"][k].astype(np.float64)
                               * (HARTREE_EV / BOHR_A), rtol=1e-12)
  assert not (folder / (writers.ASELMDB_FILENAME + "-lock")).exists()


def test_cache_hit_does_not_rebuild(small_build):
  manifest_path = small_build / build.MANIFEST_FILENAME
  manifest = json.loads(manifest_path.read_text())
  assert manifest["version"] == build.BUILTIN_VERSION
  assert manifest["counts"]["conformers"] == len(SMALL_MOLECULES) * SMALL_CONFORMERS
  assert sum(manifest["counts"]["molecules_per_subset"].values()) == len(SMALL_MOLECULES)
  before = {p: p.stat().st_mtime_ns for p in small_build.rglob("*")}
  again = build.build_builtin_dataset(small_build, size=BuiltinSize.SMALL, workers=2, progress=False)
  assert again == small_build
  assert {p: p.stat().st_mtime_ns for p in small_build.rglob("*")} == before


def test_cached_build_needs_no_chemistry_packages(small_build, tmp_path, monkeypatch):
  def missing():
    raise ImportError("building the built-in dataset needs rdkit")
  monkeypatch.setattr(build.sampling, "require_chemistry", missing)
  before = {p: p.stat().st_mtime_ns for p in small_build.rglob("*")}
  assert build.build_builtin_dataset(small_build, size=BuiltinSize.SMALL, progress=False) == small_build
  assert {p: p.stat().st_mtime_ns for p in small_build.rglob("*")} == before
  # Another size, or no build at all, still needs them.
  with pytest.raises(ImportError, match="rdkit"):
    build.build_builtin_dataset(small_build, size=BuiltinSize.DEFAULT, progress=False)
  with pytest.raises(ImportError, match="rdkit"):
    build.build_builtin_dataset(tmp_path / "empty", size=BuiltinSize.SMALL, progress=False)


def test_force_rebuild_is_deterministic_and_atomic(small_build, tmp_path):
  reference = _read_groups(small_build / writers.HDF5_FILENAME)
  copy = tmp_path / "copy"
  shutil.copytree(small_build, copy)
  before = (copy / build.MANIFEST_FILENAME).stat().st_mtime_ns
  # One worker instead of two: a different schedule must give the same numbers.
  build.build_builtin_dataset(copy, size=BuiltinSize.SMALL, workers=1, force=True, progress=False)
  assert (copy / build.MANIFEST_FILENAME).stat().st_mtime_ns != before
  rebuilt = _read_groups(copy / writers.HDF5_FILENAME)
  assert rebuilt.keys() == reference.keys()
  for name in reference:
    assert rebuilt[name].keys() == reference[name].keys()
    for key in reference[name]:
      np.testing.assert_array_equal(rebuilt[name][key], reference[name][key])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no partial or stale folders left


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(build, "write_aselmdb", interrupted)
  monkeypatch.setattr(build, "_sample_all", lambda *args: ([], {}))
  with pytest.raises(KeyboardInterrupt):
    build.build_builtin_dataset(tmp_path / "out", size=BuiltinSize.SMALL, progress=False)
  assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_foreign_folder(tmp_path):
  (tmp_path / "notes.txt").write_text("not a dataset")
  with pytest.raises(ValueError, match="not a built-in dataset folder"):
    build.build_builtin_dataset(tmp_path, size=BuiltinSize.SMALL, progress=False)
  with pytest.raises(ValueError, match="num_conformers"):
    build.build_builtin_dataset(tmp_path / "new", num_conformers=0)


def test_default_dir_follows_environment(monkeypatch, tmp_path):
  monkeypatch.setenv(build.DATA_DIR_ENV, str(tmp_path))
  assert build.default_builtin_dir() == tmp_path / "builtin-v2"
  assert build.default_builtin_dir(BuiltinSize.SMALL) == tmp_path / "builtin-v2-small"
  assert build.default_builtin_dir(BuiltinSize.LARGE) == tmp_path / "builtin-v2-large"
  monkeypatch.delenv(build.DATA_DIR_ENV)
  assert build.default_builtin_dir() == Path("~/.cache/e2former_jax/builtin-v2").expanduser()


def test_a_molecule_without_any_labelled_geometry_is_left_out_not_fatal(tmp_path, monkeypatch):
  """One molecule the xTB SCF cannot label (seen in the large build) must not stop the build."""
  def no_geometry(task):
    raise sampling.RejectedMolecule(f"molecule {task.index}: every geometry was rejected")

  monkeypatch.setattr(sampling, "sample_molecule", no_geometry)
  task = sampling.Task(3, sizes.builtin_molecules(BuiltinSize.SMALL)[0], 2)
  assert sampling.sample_or_reject(task) == (3, "molecule 3: every geometry was rejected")
  everything_rejected = lambda molecules, *args: ([None] * len(molecules),
                                                  {i: f"molecule {i}" for i in range(len(molecules))})
  monkeypatch.setattr(build, "_sample_all", everything_rejected)
  with pytest.raises(ValueError, match="every built-in molecule was rejected, e.g. molecule 0"):
    build.build_builtin_dataset(tmp_path / "out", size=BuiltinSize.SMALL, progress=False)
  assert list(tmp_path.iterdir()) == []
