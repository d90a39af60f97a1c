"""Reader of the published SPICE HDF5 layout (and of files written in it, like the built-in set).

Layout: one group per molecule (named by the molecule; groups without ``conformations`` are
searched for molecule groups one level down and further), holding

* ``atomic_numbers`` [n] int, ``conformations`` [M, n, 3] in bohr,
* ``dft_total_energy`` [M] in hartree, ``dft_total_gradient`` [M, n, 3] in hartree/bohr,
* ``smiles`` [1] mapped SMILES (needed unless ``total_charge`` is stored), ``subset`` [1] subset
  name (``DEFAULT_SUBSET`` when absent),
* optionally ``total_charge`` and ``spin_multiplicity`` (or ``spin`` / ``multiplicity``), scalar,
  [1] or [M], which SPICE itself does not store.

Records are (molecule, conformer) pairs in file order; the group name is the molecule key. Units are converted on read: positions to
angstrom, energies to eV, forces = -gradient in eV/angstrom. Without a stored total charge the
charge is the sum of the formal charges of ``smiles``; the spin multiplicity defaults to 1 (SPICE
molecules are closed-shell singlets).

Opening reads only each group's dataset shapes and subset name; coordinates are read per record.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path

import h5py
import numpy as np

from e2former_jax.structure import Structure
from train.data import units
from train.data.records import Dataset, InvalidRecordError, OnError, Record, warn_skipped
from train.data.smiles import formal_charge

REQUIRED_KEYS = ("atomic_numbers", "conformations", "dft_total_energy", "dft_total_gradient")
CHARGE_KEYS = ("total_charge",)
SPIN_KEYS = ("spin_multiplicity", "spin", "multiplicity")
# Subset name of groups that store none.
DEFAULT_SUBSET = "default"
# Spin multiplicity of groups that store none: SPICE holds closed-shell singlets only.
DEFAULT_SPIN = 1
# Molecule groups whose constants and dataset handles are kept open: looking a dataset up by name
# costs more than reading a conformer from it.
_GROUP_CACHE_SIZE = 4096


class SpiceHDF5Dataset(Dataset):
  """Lazy reader of a SPICE-layout HDF5 file.

  Args:
    path: the ``.hdf5``/``.h5`` file.
    on_error: ``"raise"`` (default) or ``"skip"`` invalid groups/records (counted in a warning).

  Raises:
    ValueError: if the file cannot be opened as HDF5 (missing, truncated, not HDF5).
    InvalidRecordError: (with ``on_error="raise"``) for a group with missing keys or inconsistent
      shapes.
  """

  def __init__(self, path: str | Path, *, on_error: OnError = "raise"):
    super().__init__(path, on_error)
    try:
      self._file = h5py.File(self.path, "r")
    except OSError as e:
      raise ValueError(f"{self.path}: cannot open as an HDF5 file: {e}") from e
    self._groups: list[str] = []
    # Per group: the key holding its charge (a CHARGE_KEYS name, or "smiles") and spin (or None).
    self._group_keys: list[tuple[str, str | None]] = []
    self._group_cache: collections.OrderedDict[int, _GroupData] = collections.OrderedDict()
    group_of_record, conformer, num_atoms, subsets, errors = [], [], [], [], []
    for name in self._molecule_groups():
      try:
        n, m, subset, keys = self._index_group(name)
      except (InvalidRecordError, KeyError, OSError, ValueError, TypeError) as e:
        error = e if isinstance(e, InvalidRecordError) else InvalidRecordError(
            self.path, f"group {name!r}", str(e))
        if self.on_error == "raise":
          raise error from e
        errors.append(error)
        continue
      self._groups.append(name)
      self._group_keys.append(keys)
      group_of_record.append(np.full(m, len(self._groups) - 1, np.int64))
      conformer.append(np.arange(m, dtype=np.int64))
      num_atoms.append(np.full(m, n, np.int64))
      subsets.extend([subset] * m)
    warn_skipped(self.path, "groups", errors)
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.int64)
    self._group_of_record, self._conformer = cat(group_of_record), cat(conformer)
    self.num_atoms = cat(num_atoms)
    self._set_subsets(subsets)

  def _molecule_groups(self):
    """Names of the molecule groups (those holding ``conformations``), depth first in file order."""
    stack = [self._file]
    while stack:
      group = stack.pop()
      subgroups = []
      for child in [group.get(k) for k in group.keys()]:
        if not isinstance(child, h5py.Group):
          continue
        if "conformations" in child or "atomic_numbers" in child:
          yield child.name.lstrip("/")
        else:
          subgroups.append(child)
      stack.extend(reversed(subgroups))

  def _index_group(self, name: str) -> tuple[int, int, str, tuple[str, str | None]]:
    """(atoms, conformers, subset, (charge key, spin key)) of a molecule group, from shapes only."""
    group = self._file[name]
    present = set(group.keys())
    charge_key = next((k for k in CHARGE_KEYS + ("smiles",) if k in present), None)
    missing = [k for k in REQUIRED_KEYS if k not in present]
    if charge_key is None:
      missing.append(" or ".join(CHARGE_KEYS + ("smiles",)))
    if missing:
      raise InvalidRecordError(self.path, f"group {name!r}", f"missing keys {missing}")
    spin_key = next((k for k in SPIN_KEYS if k in present), None)
    n = group["atomic_numbers"].shape
    pos = group["conformations"].shape
    if len(n) != 1:
      raise InvalidRecordError(self.path, f"group {name!r}",
                               f"atomic_numbers has shape {n}, not [n]")
    m = pos[0] if pos else 0
    expected = {"conformations": (m, n[0], 3), "dft_total_energy": (m,),
                "dft_total_gradient": (m, n[0], 3)}
    for key, shape in expected.items():
      if group[key].shape != shape:
        raise InvalidRecordError(self.path, f"group {name!r}",
                                 f"{key} has shape {group[key].shape}, expected {shape}")
    subset = _string(group["subset"]) if "subset" in present else DEFAULT_SUBSET
    return n[0], m, subset, (charge_key, spin_key)

  def record_name(self, index: int) -> str:
    group = self._groups[self._group_of_record[index]]
    return f"group {group!r} conformer {self._conformer[index]}"

  def molecule_keys(self) -> np.ndarray:
    return np.asarray(self._groups, dtype=object)[self._group_of_record]

  def close(self) -> None:
    self._file.close()

  def _group_data(self, g: int) -> "_GroupData":
    """The per-molecule data of group ``g`` (least-recently-used cache of _GROUP_CACHE_SIZE)."""
    if g in self._group_cache:
      self._group_cache.move_to_end(g)
      return self._group_cache[g]
    group = self._file[self._groups[g]]
    conformations = group["conformations"]
    m = conformations.shape[0]
    charge_key, spin_key = self._group_keys[g]
    if charge_key == "smiles":
      charge = formal_charge(_string(group["smiles"]))
    else:
      charge = _integers(group[charge_key], m)
    data = _GroupData(numbers=np.asarray(group["atomic_numbers"][()]),
                      energies=np.asarray(group["dft_total_energy"][()], np.float64), charge=charge,
                      spin=DEFAULT_SPIN if spin_key is None else _integers(group[spin_key], m),
                      conformations=conformations, gradients=group["dft_total_gradient"])
    self._group_cache[g] = data
    if len(self._group_cache) > _GROUP_CACHE_SIZE:
      self._group_cache.popitem(last=False)
    return data

  def _read(self, index: int) -> Record:
    g, c = int(self._group_of_record[index]), int(self._conformer[index])
    name = self._groups[g]
    data = self._group_data(g)
    positions = np.asarray(data.conformations[c], np.float64) * units.BOHR_A
    energy = float(data.energies[c]) * units.HARTREE_EV
    forces = -np.asarray(data.gradients[c], np.float64) * units.HARTREE_PER_BOHR_EV_PER_A
    pick = lambda v: int(v if np.ndim(v) == 0 else v[c])
    structure = Structure(numbers=data.numbers, positions=positions, charge=pick(data.charge),
                          spin=pick(data.spin), key=f"{name}/{c}")
    return Record(structure=structure, energy=energy, forces=forces,
                  subset=self.subset_names[self.subset_ids[index]], molecule_key=name)


@dataclasses.dataclass(frozen=True)
class _GroupData:
  """What every conformer of a molecule group shares, plus open handles to its per-conformer data.

  charge and spin are ints, or [M] int arrays when stored per conformer.
  """

  numbers: np.ndarray
  energies: np.ndarray
  charge: int | np.ndarray
  spin: int | np.ndarray
  conformations: h5py.Dataset
  gradients: h5py.Dataset


def _string(dataset: h5py.Dataset) -> str:
  """The string in a scalar or [1] string dataset."""
  value = dataset[()]
  if isinstance(value, np.ndarray):
    if value.size != 1:
      raise ValueError(f"{dataset.name} holds {value.size} values, expected one string")
    value = value.reshape(-1)[0]
  return value.decode() if isinstance(value, bytes) else str(value)


def _integers(dataset: h5py.Dataset, m: int) -> int | np.ndarray:
  """An integer dataset as an int (scalar or [1]) or an [m] int array (one per conformer)."""
  value = np.asarray(dataset[()])
  if value.dtype.kind not in "iuf" or np.any(value != np.round(value)):
    raise ValueError(f"{dataset.name} must hold integers, got {value}")
  value = value.astype(np.int64)
  if value.size == 1:
    return int(value.reshape(-1)[0])
  if value.shape != (m,):
    raise ValueError(f"{dataset.name} has shape {value.shape}, expected a scalar, [1] or [{m}]")
  return value
