"""Reader of extended-XYZ files in the MACE-OFF style (SPICE converted to eV and eV/angstrom).

Each frame: an atom-count line, a ``key=value`` comment line and one line per atom
(``Properties=species:S:1:pos:R:3:forces:R:3 ...``). Read per frame:

* energy (eV) from the first present of ``energy_keys`` (comment line or ASE's calculator
  results); forces (eV/angstrom) from the first present of ``forces_keys``;
* ``config_type`` = subset (``DEFAULT_SUBSET`` when absent);
* charge from ``charge``/``total_charge`` and spin multiplicity from ``spin``/``multiplicity``/
  ``spin_multiplicity`` when present, else 0 and 1 (MACE-OFF's SPICE files are neutral singlets;
  an ion without a stored charge then fails validation, as its electron count contradicts the
  singlet, instead of training with a wrong charge);
* the molecule identity from the first present of ``MOLECULE_KEYS``, else the formula with charge
  and spin (every conformer of one composition is then one "molecule" for the splits).

Opening scans the file once (line by line, never holding it whole), checks every element symbol
and keeps per frame its byte offset, atom count, subset and molecule key; a frame's text is parsed
by ASE when it is read.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Sequence

import ase.data
import ase.io
import numpy as np
from ase.io.extxyz import key_val_str_to_dict

from e2former_jax.structure import Structure
from train.data.records import (
  Dataset,
  InvalidRecordError,
  OnError,
  Record,
  as_int,
  composition_key,
  warn_skipped,
)

ENERGY_KEYS = ("energy", "REF_energy")
FORCES_KEYS = ("forces", "REF_forces")
CHARGE_KEYS = ("charge", "total_charge")
SPIN_KEYS = ("spin", "multiplicity", "spin_multiplicity")
MOLECULE_KEYS = ("molecule_key", "smiles", "mol_id")
SUBSET_KEY = "config_type"
DEFAULT_SUBSET = "default"


class ExtXYZDataset(Dataset):
  """Lazy reader of an extended-XYZ file.

  Args:
    path: the ``.xyz``/``.extxyz`` file.
    on_error: ``"raise"`` (default) or ``"skip"`` invalid frames (counted in a warning).
    energy_keys: names tried, in order, for the energy.
    forces_keys: names tried, in order, for the forces.

  Raises:
    ValueError: if the file cannot be read.
    InvalidRecordError: (with ``on_error="raise"``) for a malformed or truncated frame.
  """

  def __init__(self, path: str | Path, *, on_error: OnError = "raise",
               energy_keys: Sequence[str] = ENERGY_KEYS, forces_keys: Sequence[str] = FORCES_KEYS):
    super().__init__(path, on_error)
    self.energy_keys, self.forces_keys = tuple(energy_keys), tuple(forces_keys)
    try:
      self._file = open(self.path, "rb")  # pylint: disable=consider-using-with
    except OSError as e:
      raise ValueError(f"{self.path}: cannot open: {e}") from e
    self._offsets: list[int] = []
    self._frame_numbers: list[int] = []
    self._molecule_keys: list[str] = []
    num_atoms, subsets, errors = [], [], []
    for offset, frame, result in self._scan():
      if isinstance(result, InvalidRecordError):
        if self.on_error == "raise":
          raise result
        errors.append(result)
        continue
      n, subset, key = result
      self._offsets.append(offset)
      self._frame_numbers.append(frame)
      num_atoms.append(n)
      subsets.append(subset)
      self._molecule_keys.append(key)
    warn_skipped(self.path, "frames", errors)
    self.num_atoms = np.asarray(num_atoms, np.int64)
    self._set_subsets(subsets)

  def _scan(self):
    """Yields (byte offset, frame number, (atoms, subset, molecule key) or InvalidRecordError)."""
    f, frame = self._file, 0
    while True:
      offset = f.tell()
      head = f.readline()
      if not head:
        return
      if not head.strip():
        continue  # blank lines between frames
      try:
        n = int(head)
        if n < 0:
          raise ValueError(f"negative atom count {n}")
        info = key_val_str_to_dict(f.readline().decode())
        lines = [f.readline() for _ in range(n)]
        if not all(line.strip() for line in lines):
          raise ValueError(f"file ends inside the frame ({n} atom lines expected)")
      except (ValueError, UnicodeDecodeError) as e:
        # A malformed frame loses the frame boundaries: nothing after it can be trusted.
        yield offset, frame, InvalidRecordError(self.path, f"frame {frame} (byte {offset})",
                                                f"malformed frame, file not read further: {e}")
        return
      symbols = [line.split(None, 1)[0].decode() for line in lines]
      unknown = next((s for s in symbols if s not in ase.data.atomic_numbers), None)
      if unknown is not None:  # the frame is intact: later frames can still be read
        yield offset, frame, InvalidRecordError(
            self.path, f"frame {frame} (byte {offset})", f"unknown element {unknown!r}",
            message=f"unknown element {unknown!r} in frame {frame} of {self.path}")
        frame += 1
        continue
      subset = str(info.get(SUBSET_KEY, DEFAULT_SUBSET))
      key = next((str(info[k]) for k in MOLECULE_KEYS if k in info), None)
      if key is None:
        key = composition_key(symbols, _first(CHARGE_KEYS, info), _first(SPIN_KEYS, info))
      yield offset, frame, (n, subset, key)
      frame += 1

  def record_name(self, index: int) -> str:
    return f"frame {self._frame_numbers[index]} (byte {self._offsets[index]})"

  def molecule_keys(self) -> np.ndarray:
    return np.asarray(self._molecule_keys, dtype=object)

  def close(self) -> None:
    self._file.close()

  def _read(self, index: int) -> Record:
    self._file.seek(self._offsets[index])
    n = int(self._file.readline())
    text = b"".join([f"{n}\n".encode()] + [self._file.readline() for _ in range(n + 1)]).decode()
    atoms = ase.io.read(io.StringIO(text), index=0, format="extxyz")
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    info, arrays = atoms.info, atoms.arrays
    energy = _first(self.energy_keys, results, info)
    forces = _first(self.forces_keys, results, arrays)
    if energy is None:
      raise ValueError(f"no energy (looked for {list(self.energy_keys)})")
    if forces is None:
      raise ValueError(f"no forces (looked for {list(self.forces_keys)})")
    charge = _first(CHARGE_KEYS, info)
    spin = _first(SPIN_KEYS, info)
    cell = np.asarray(atoms.cell[:], np.float64)
    pbc = tuple(bool(p) for p in atoms.pbc)
    structure = Structure(numbers=atoms.numbers, positions=atoms.positions,
                          charge=as_int(0 if charge is None else charge, "charge"),
                          spin=as_int(1 if spin is None else spin, "spin"),
                          cell=cell if np.any(cell) else None, pbc=pbc if any(pbc) else None,
                          key=f"frame {self._frame_numbers[index]}")
    return Record(structure=structure, energy=float(np.asarray(energy).reshape(())),
                  forces=np.asarray(forces, np.float64),
                  subset=self.subset_names[self.subset_ids[index]],
                  molecule_key=self._molecule_keys[index])


def _first(keys: Sequence[str], *sources: dict):
  for key in keys:
    for source in sources:
      if key in source:
        return source[key]
  return None

