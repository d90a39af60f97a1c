"""Fixtures of the data tests: paths of the shared real files and a writer of small SPICE-layout files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from e2f_testing import SHARED_DATA, random_molecule

from train.data.units import BOHR_A, HARTREE_EV

SPICE_REAL = SHARED_DATA / "spice_real" / "SPICE-1.1.4_n2_modelforge.hdf5"
OMOL_DIR = SHARED_DATA / "omol25_format"


@pytest.fixture
def spice_real():
  if not SPICE_REAL.exists():
    pytest.skip(f"shared SPICE file not found: {SPICE_REAL}")
  return SPICE_REAL


@pytest.fixture
def omol_dir():
  if not (OMOL_DIR / "sample.aselmdb").exists():
    pytest.skip(f"shared OMol25-format sample not found: {OMOL_DIR}")
  return OMOL_DIR


def synthetic_molecules(seed: int, sizes, conformers: int):
  """[(numbers, positions [M, n, 3] A, energies [M] eV, forces [M, n, 3] eV/A, spin)] of random molecules.

  Energies are exactly linear in the composition plus a small conformer term, so reference
  energies are known; the spin is the lowest multiplicity the electron count allows.
  """
  rng = np.random.default_rng(seed)
  out = []
  for n in sizes:
    numbers, base = random_molecule(rng, n)
    positions = base[None] + rng.normal(0, 0.03, (conformers, n, 3))
    energies = (-10.0 * (numbers == 1).sum() - 1000.0 * (numbers == 6).sum()
                - 1500.0 * (numbers == 7).sum() - 2000.0 * (numbers == 8).sum()
                + rng.normal(0, 0.1, conformers))
    forces = rng.normal(0, 1.0, (conformers, n, 3))
    out.append((numbers, positions, energies, forces, 1 + int(numbers.sum()) % 2))
  return out


def write_spice(path, molecules, subsets=None, *, extra=None):
  """Writes molecules from synthetic_molecules in the SPICE layout (bohr, hartree, gradients).

  Args:
    path: output file.
    molecules: from synthetic_molecules.
    subsets: subset name per molecule (default "synthetic").
    extra: {group name: {dataset name: value}} written after the standard keys.
  """
  with h5py.File(path, "w") as f:
    for i, (numbers, positions, energies, forces, spin) in enumerate(molecules):
      g = f.create_group(f"mol{i}")
      g["atomic_numbers"] = numbers.astype(np.int16)
      g["conformations"] = (positions / BOHR_A).astype(np.float32)
      g["dft_total_energy"] = energies / HARTREE_EV
      g["dft_total_gradient"] = (-forces / (HARTREE_EV / BOHR_A)).astype(np.float32)
      g["smiles"] = np.array([b"C"], dtype=object)
      g["subset"] = np.array([(subsets[i] if subsets else "synthetic").encode()], dtype=object)
      g["spin_multiplicity"] = np.array([spin], np.int16)
    for name, datasets in (extra or {}).items():
      for key, value in datasets.items():
        if key in f[name]:
          del f[name][key]
        f[name][key] = value
  return path


@pytest.fixture
def make_molecules():
  """synthetic_molecules(seed, sizes, conformers) (a fixture: test modules do not import each other)."""
  return synthetic_molecules


@pytest.fixture
def spice_writer(tmp_path):
  """write(molecules, name=..., subsets=..., extra=...) -> path of a SPICE-layout file in tmp_path."""

  def write(molecules, name="synthetic.hdf5", **kwargs):
    return write_spice(tmp_path / name, molecules, **kwargs)

  return write
