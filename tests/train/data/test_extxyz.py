"""MACE-OFF style extxyz reader: round trip, info keys, lazy frames and bad input."""

from __future__ import annotations

import io

import ase
import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from train.data import ExtXYZDataset, InvalidRecordError, open_dataset


def frames(make_molecules, *, with_info=True):
  """ASE Atoms of 3 molecules x 2 conformers, energies/forces in a SinglePointCalculator."""
  out = []
  for i, (numbers, positions, energies, forces, spin) in enumerate(make_molecules(0, [5, 3, 7], 2)):
    for c in range(2):
      atoms = ase.Atoms(numbers=numbers, positions=positions[c])
      if with_info:
        atoms.info.update(config_type=["PubChem", "DES370K Monomers"][i % 2], charge=0, spin=spin)
      atoms.calc = SinglePointCalculator(atoms, energy=energies[c], forces=forces[c])
      out.append(atoms)
  return out


def extxyz_text(atoms) -> str:
  buffer = io.StringIO()
  ase.io.write(buffer, atoms, format="extxyz")
  return buffer.getvalue()


def test_round_trip(tmp_path, make_molecules):
  written = frames(make_molecules)
  path = tmp_path / "spice.xyz"
  ase.io.write(path, written, format="extxyz")
  ds = open_dataset(path)
  assert isinstance(ds, ExtXYZDataset) and len(ds) == 6
  assert ds.num_atoms.tolist() == [5, 5, 3, 3, 7, 7]
  assert ds.subset_names == ["DES370K Monomers", "PubChem"]
  for index in [5, 0, 3]:  # out of order: frames are read by offset
    record, atoms = ds.read(index), written[index]
    np.testing.assert_array_equal(record.structure.numbers, atoms.numbers)
    np.testing.assert_allclose(record.structure.positions, atoms.positions, atol=1e-7)
    assert record.energy == pytest.approx(atoms.get_potential_energy(), abs=1e-7)
    np.testing.assert_allclose(record.forces, atoms.get_forces(), atol=1e-7)
    assert record.structure.spin == atoms.info["spin"] and record.subset == atoms.info["config_type"]
  keys = ds.molecule_keys()
  assert keys[0] == keys[1] != keys[2] == keys[3] and keys[0].endswith("|q=0|s=" + str(written[0].info["spin"]))


def test_defaults_and_ref_keys(tmp_path, make_molecules):
  written = frames(make_molecules, with_info=False)
  path = tmp_path / "plain.extxyz"
  text = extxyz_text(written).replace("energy=", "REF_energy=").replace(
      ":forces:", ":REF_forces:")
  path.write_text(text)
  ds = open_dataset(path)
  assert ds.subset_names == ["default"]
  record = ds.read(0)
  assert (record.structure.charge, record.structure.spin) == (0, 1)
  assert record.energy == pytest.approx(written[0].get_potential_energy(), abs=1e-7)
  np.testing.assert_allclose(record.forces, written[0].get_forces(), atol=1e-7)


def test_missing_energy(tmp_path, make_molecules):
  atoms = frames(make_molecules)[0]
  atoms.calc = None
  path = tmp_path / "noenergy.xyz"
  ase.io.write(path, atoms, format="extxyz")
  with pytest.raises(InvalidRecordError, match=r"noenergy\.xyz: frame 0 \(byte 0\): no energy"):
    open_dataset(path).read(0)


def test_truncated_file_raises_or_keeps_complete_frames(tmp_path, make_molecules):
  path = tmp_path / "cut.xyz"
  ase.io.write(path, frames(make_molecules), format="extxyz")
  lines = path.read_text().splitlines(keepends=True)
  path.write_text("".join(lines[:-2]))  # the last frame loses two atom lines
  with pytest.raises(InvalidRecordError, match=r"cut\.xyz: frame 5 .*file ends inside the frame"):
    ExtXYZDataset(path)
  with pytest.warns(UserWarning, match="skipped 1 frames"):
    ds = ExtXYZDataset(path, on_error="skip")
  assert len(ds) == 5


def test_nan_forces_name_the_frame(tmp_path, make_molecules):
  written = frames(make_molecules)
  written[2].calc.results["forces"][1, 0] = np.nan
  path = tmp_path / "nan.xyz"
  ase.io.write(path, written, format="extxyz")
  with pytest.raises(InvalidRecordError, match=r"nan\.xyz: frame 2 .*non-finite forces .* at atom 1"):
    open_dataset(path).read(2)


def test_unknown_element_names_the_frame(tmp_path, make_molecules):
  text = extxyz_text(frames(make_molecules))
  frame_4 = text.index("\n", text.index("Properties", text.index("\n7\n"))) + 1  # first atom of frame 4
  path = tmp_path / "xx.xyz"
  path.write_text(text[:frame_4] + "Xx" + text[frame_4 + 1:])
  with pytest.raises(InvalidRecordError, match=rf"^unknown element 'Xx' in frame 4 of {path}$"):
    open_dataset(path)
  with pytest.warns(UserWarning, match="skipped 1 frames .*frame 4 .*unknown element 'Xx'"):
    ds = open_dataset(path, on_error="skip")
  assert ds.num_atoms.tolist() == [5, 5, 3, 3, 7]  # the frames after it are still read
