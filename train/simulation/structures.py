"""Where a simulation starts: one record of a dataset, or one frame of a structure file."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from e2former_jax.structure import Structure


def molecule_key(name: str) -> str:
  """The dataset key of a built-in molecule given by name (e.g. "ethanol"); other strings as is.

  Names are those of the hand-curated molecules (``train.data.builtin.molecules``). The built-in
  dataset keys molecules by RDKit's canonical SMILES, so a name needs RDKit.
  """
  from train.data.builtin.molecules import CURATED_MOLECULES, canonical_key

  match = [m for m in CURATED_MOLECULES if m.name.lower() == name.lower()]
  return canonical_key(match[0]) if match else name


def dataset_structure(path: str | Path, molecule: str | None = None, conformer: int = 0
                      ) -> Structure:
  """One geometry of a dataset (SPICE HDF5, extxyz, OMol25 aselmdb).

  Args:
    path: the dataset.
    molecule: a built-in molecule name or a molecule key of the dataset; None = the first record.
    conformer: which of the molecule's records (in file order).

  Raises:
    ValueError: when the molecule or conformer is not in the dataset.
  """
  from train.data.formats import open_dataset

  with open_dataset(path) as dataset:
    if molecule is None:
      index = 0
    else:
      keys = dataset.molecule_keys()
      key = molecule_key(molecule)
      (records,) = np.nonzero(keys == key)
      if not len(records):
        raise ValueError(f"{path}: no molecule {molecule!r} (key {key!r}); first keys: "
                         f"{sorted(set(keys.tolist()))[:10]}")
      if not 0 <= conformer < len(records):
        raise ValueError(f"{path}: molecule {molecule!r} has {len(records)} conformers, asked for "
                         f"conformer {conformer}")
      index = int(records[conformer])
    return dataset.read(index).structure


def read_structure(path: str | Path, *, index: int = 0, charge: int | None = None,
                   spin: int | None = None) -> Structure:
  """Frame ``index`` of a structure file ASE reads (extxyz, xyz, ...); charge/spin from its info."""
  import ase.io

  if not Path(path).is_file():
    raise ValueError(f"structure file {path} does not exist")
  atoms = ase.io.read(path, index=index)
  return Structure.from_ase(atoms, charge=charge, spin=spin, key=f"{path}@{index}")
