"""The command line with bad data: one ``error:`` line, exit code 2, and nothing written.

Each case fails while the dataset is opened and checked, before any model is built, so these tests
run in a fraction of a second (the training-loop cases are in test_training.py).
"""

from __future__ import annotations

import shutil

import ase
import ase.io
import h5py
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from e2f_testing import SHARED_DATA

from train.cli import main as cli_main

SPICE_REAL = SHARED_DATA / "spice_real" / "SPICE-1.1.4_n2_modelforge.hdf5"
# Its 27-atom molecule: all 50 conformers land in the training split of the default split.
TRAIN_GROUP = "103147721"


@pytest.fixture
def spice(tmp_path):
  """A writable copy of the shared two-molecule SPICE file."""
  if not SPICE_REAL.exists():
    pytest.skip(f"shared SPICE file not found: {SPICE_REAL}")
  return shutil.copy(SPICE_REAL, tmp_path / "spice.hdf5")


def _train_fails(data, tmp_path, capsys, *overrides) -> str:
  """Runs ``e2former train`` on ``data``; checks exit code 2, one stderr line, no new file."""
  before = set(tmp_path.rglob("*"))
  code = cli_main(["train", "--data", str(data), "--workdir", str(tmp_path / "run"), "--quiet",
                   "--set", "model.preset=tiny", *overrides])
  err = capsys.readouterr().err.splitlines()
  assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
  assert set(tmp_path.rglob("*")) == before  # no run folder, no run_config.yaml, no checkpoints
  return err[0]


def test_truncated_hdf5(spice, tmp_path, capsys):
  data = spice.read_bytes()
  spice.write_bytes(data[:len(data) // 2])
  assert "cannot open as an HDF5 file" in _train_fails(spice, tmp_path, capsys)


def test_nan_energy_names_the_record(spice, tmp_path, capsys):
  with h5py.File(spice, "a") as f:
    f[TRAIN_GROUP]["dft_total_energy"][3] = np.nan
  assert _train_fails(spice, tmp_path, capsys) == (
      f"error: {spice}: group '{TRAIN_GROUP}' conformer 3: non-finite energy nan")


def test_molecule_over_the_atom_budget_names_the_setting(spice, tmp_path, capsys):
  line = _train_fails(spice, tmp_path, capsys, "data.atoms_per_batch=20")
  assert (f"group '{TRAIN_GROUP}' conformer 0 has 27 atoms, more than data.atoms_per_batch=20" in line
          and "--set data.atoms_per_batch=27" in line), line


def test_unknown_element_in_extxyz(tmp_path, capsys):
  rng = np.random.default_rng(0)
  frames = []
  for i in range(6):
    atoms = ase.Atoms("CH4", positions=[[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89],
                                        [-0.36, -0.51, -0.89]])
    atoms.calc = SinglePointCalculator(atoms, energy=-1100.0 + 0.01 * i, forces=rng.normal(size=(5, 3)))
    frames.append(atoms)
  path = tmp_path / "methane.xyz"
  ase.io.write(path, frames, format="extxyz")
  lines = path.read_text().splitlines(keepends=True)
  lines[4 * 7 + 2] = "Xx" + lines[4 * 7 + 2][1:]  # frame 4 (7 lines a frame): its first atom
  path.write_text("".join(lines))
  assert _train_fails(path, tmp_path, capsys) == f"error: unknown element 'Xx' in frame 4 of {path}"
