"""The built-in dataset's files: the SPICE-layout HDF5 file and the OMol25-style ASE LMDB copy.

- ``HDF5_FILENAME``: the SPICE HDF5 layout (one group per molecule keyed by its canonical SMILES;
  ``atomic_numbers`` (n,) int16, ``conformations`` (M, n, 3) float32 bohr, ``dft_total_energy``
  (M,) float64 hartree, ``dft_total_gradient`` (M, n, 3) float32 hartree/bohr, ``smiles`` (1,)
  mapped SMILES with formal charges, ``subset`` (1,)), plus ``total_charge`` and
  ``spin_multiplicity`` (1,) int16 per group, which SPICE does not store. The ``dft_*`` names are kept
  for layout compatibility only: the labels are GFN2-xTB, not SPICE's DFT (the file attributes say so).
- ``ASELMDB_DIRNAME/ASELMDB_FILENAME`` and ``ASELMDB_DIRNAME/ASELMDB_METADATA_FILENAME``: the same
  geometries as an OMol25-style ASE LMDB database (eV, eV/angstrom, ``row.data["charge"]``,
  ``row.data["spin"]``) with ``natoms`` per row.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Sequence

import h5py
import numpy as np

from train.data.builtin.molecules import BuiltinMolecule
from train.data.builtin.sampling import MoleculeSamples
from train.data.units import BOHR_A, HARTREE_PER_BOHR_EV_PER_A, HARTREE_EV

HDF5_FILENAME = "builtin_gfn2xtb.hdf5"
ASELMDB_DIRNAME = "aselmdb"
ASELMDB_FILENAME = "builtin_gfn2xtb.aselmdb"
ASELMDB_METADATA_FILENAME = "metadata.npz"

LEVEL_OF_THEORY_TEMPLATE = "GFN2-xTB (tblite {version})"
THEORY_NOTE = (
  "Labels are GFN2-xTB semi-empirical tight-binding energies and gradients computed with tblite; "
  "they are NOT SPICE's wB97M-D3(BJ)/def2-TZVPPD DFT. The SPICE key names (dft_total_energy, "
  "dft_total_gradient) are kept only so that SPICE readers load this file unchanged."
)


def level_of_theory() -> str:
  return LEVEL_OF_THEORY_TEMPLATE.format(version=importlib.metadata.version("tblite"))


def write_hdf5(path: Path, molecules: Sequence[BuiltinMolecule], samples: Sequence[MoleculeSamples],
               version: str) -> None:
  """Writes the SPICE-layout HDF5 file, one group per molecule; ``version`` goes in its attributes."""
  text = h5py.string_dtype(encoding="utf-8")
  with h5py.File(path, "w") as f:
    f.attrs["level_of_theory"] = level_of_theory()
    f.attrs["note"] = THEORY_NOTE
    f.attrs["builtin_version"] = version
    for molecule, sample in zip(molecules, samples):
      if "/" in sample.key or sample.key in f:
        raise ValueError(f"built-in molecule {molecule.name!r}: canonical SMILES {sample.key!r} "
                         "is not a unique HDF5 group name")
      group = f.create_group(sample.key)
      group.create_dataset("atomic_numbers", data=sample.atomic_numbers)
      group.create_dataset("conformations", data=sample.conformations).attrs["units"] = "bohr"
      group.create_dataset("dft_total_energy", data=sample.energy).attrs["units"] = "hartree"
      group.create_dataset("dft_total_gradient", data=sample.gradient).attrs["units"] = "hartree/bohr"
      group.create_dataset("smiles", data=[sample.mapped_smiles], dtype=text)
      group.create_dataset("subset", data=[molecule.subset], dtype=text)
      group.create_dataset("total_charge", data=np.array([molecule.charge], dtype=np.int16)
                           ).attrs["units"] = "elementary_charge"
      group.create_dataset("spin_multiplicity", data=np.array([molecule.multiplicity], dtype=np.int16))


def write_aselmdb(folder: Path, molecules: Sequence[BuiltinMolecule],
                  samples: Sequence[MoleculeSamples]) -> None:
  """Writes the OMol25-style ASE LMDB copy (eV, eV/angstrom) and its ``metadata.npz``."""
  from ase import Atoms
  from ase.calculators.singlepoint import SinglePointCalculator
  from ase.db import connect

  folder.mkdir()
  db_path = folder / ASELMDB_FILENAME
  natoms = []
  db = connect(str(db_path))  # the .aselmdb suffix selects ase-db-backends' LMDB backend
  with db:
    for molecule, sample in zip(molecules, samples):
      for positions, energy, gradient in zip(sample.conformations, sample.energy, sample.gradient):
        atoms = Atoms(numbers=sample.atomic_numbers.astype(np.int64),
                      positions=positions.astype(np.float64) * BOHR_A, pbc=False)
        forces = -gradient.astype(np.float64) * HARTREE_PER_BOHR_EV_PER_A
        atoms.calc = SinglePointCalculator(atoms, energy=float(energy) * HARTREE_EV, forces=forces)
        db.write(atoms, data={"charge": int(molecule.charge), "spin": int(molecule.multiplicity)})
        natoms.append(len(atoms))
  if hasattr(db, "close"):
    db.close()
  # Readers open the database read-only without a lock file; do not leave a stale one behind.
  Path(str(db_path) + "-lock").unlink(missing_ok=True)
  np.savez(folder / ASELMDB_METADATA_FILENAME, natoms=np.asarray(natoms, dtype=np.int32))
