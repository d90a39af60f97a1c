"""Reader of OMol25-style ASE LMDB databases (``*.aselmdb``), one file or a split folder of them.

Each row (``ase.db`` with the LMDB backend of ``ase-db-backends``): numbers, positions (angstrom),
the single-point energy (eV) and forces (eV/angstrom), ``row.data["charge"]`` (total charge) and
``row.data["spin"]`` (spin multiplicity 2S+1); cell and pbc are kept on the structure when set.
Files are opened read-only without a lock file, so many readers can share them.

A folder's files are read in sorted name order. When the folder holds ``metadata.npz`` with
``natoms`` (one entry per row, in that order, as in OMol25's split folders), the atom counts come
from it and no row is opened until it is read; otherwise opening reads every row once to count its
atoms.

Subset: one per dataset, the folder's name (or the file's stem for a single file). Molecule keys
(for splits) are compositions (:func:`~train.data.records.composition_key`), since the rows store
no molecule identity; computing them reads every row once. OMol25's official split folders need no
further splitting.
"""

from __future__ import annotations

import os
import threading
import weakref
import zlib
from pathlib import Path

import ase.db
import lmdb
import numpy as np

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

EXTENSION = ".aselmdb"
METADATA_FILENAME = "metadata.npz"


class OMol25Dataset(Dataset):
  """Lazy reader of one ``.aselmdb`` file or a folder of them.

  Args:
    path: a ``.aselmdb`` file or a folder holding some.
    on_error: ``"raise"`` (default) or ``"skip"`` invalid rows (counted in a warning).

  Raises:
    ValueError: for a missing path, a folder without ``.aselmdb`` files, a file that is not a
      readable (or is a truncated) LMDB database, or a ``metadata.npz`` that does not match.
  """

  def __init__(self, path: str | Path, *, on_error: OnError = "raise"):
    super().__init__(path, on_error)
    if self.path.is_dir():
      self._files = sorted(self.path.glob(f"*{EXTENSION}"))
      if not self._files:
        raise ValueError(f"{self.path}: folder holds no {EXTENSION} files")
      metadata = self.path / METADATA_FILENAME
      subset = self.path.name
    elif self.path.is_file():
      self._files = [self.path]
      # A sibling metadata.npz describes this file only if it is the folder's only database.
      siblings = sorted(self.path.parent.glob(f"*{EXTENSION}"))
      metadata = self.path.parent / METADATA_FILENAME if siblings == [self.path] else None
      subset = self.path.stem
    else:
      raise ValueError(f"{self.path}: no such file or folder")
    self._dbs: list = []
    try:
      for f in self._files:
        self._dbs.append(_acquire(f))
    except ValueError:
      _release_all(self._files[:len(self._dbs)], self._dbs)
      raise
    self._finalizer = weakref.finalize(self, _release_all, list(self._files), self._dbs)
    ids = [np.asarray(db.ids, np.int64) for db in self._dbs]
    self._file_of_record = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(ids)])
    self._row_id = np.concatenate(ids)
    if metadata is not None and metadata.exists():
      self.num_atoms = self._metadata_natoms(metadata)
    else:
      self.num_atoms = self._count_atoms()
    self._set_subsets([subset] * len(self.num_atoms))
    self._molecule_keys: np.ndarray | None = None

  def _metadata_natoms(self, metadata: Path) -> np.ndarray:
    try:
      natoms = np.asarray(np.load(metadata)["natoms"], np.int64).reshape(-1)
    except (OSError, KeyError, ValueError, zlib.error) as e:
      raise ValueError(f"{metadata}: cannot read 'natoms': {e}") from e
    if len(natoms) != len(self._row_id):
      raise ValueError(f"{metadata}: has {len(natoms)} natoms entries but the {len(self._files)} "
                       f"{EXTENSION} file(s) hold {len(self._row_id)} rows")
    return natoms

  def _count_atoms(self) -> np.ndarray:
    """Atom count of every row, reading each row once (no metadata.npz)."""
    natoms = np.zeros(len(self._row_id), np.int64)
    keep = np.ones(len(self._row_id), bool)
    errors = []
    for index in range(len(self._row_id)):
      try:
        natoms[index] = len(self._row(index).numbers)
      except ValueError as e:
        error = InvalidRecordError(self._files[self._file_of_record[index]],
                                   self.record_name(index), str(e))
        if self.on_error == "raise":
          raise error from e
        errors.append(error)
        keep[index] = False
    warn_skipped(self.path, "rows", errors)
    self._file_of_record, self._row_id = self._file_of_record[keep], self._row_id[keep]
    return natoms[keep]

  def _row(self, index: int):
    """The ase.db row of record ``index``; ValueError for an unreadable row."""
    db = self._dbs[self._file_of_record[index]]
    try:
      return db.get(id=int(self._row_id[index]))
    except (lmdb.Error, zlib.error, KeyError, ValueError, TypeError) as e:
      raise ValueError(f"unreadable row ({type(e).__name__}: {e})") from e

  def record_name(self, index: int) -> str:
    return f"{self._files[self._file_of_record[index]].name} row id {self._row_id[index]}"

  def molecule_keys(self) -> np.ndarray:
    if self._molecule_keys is None:
      keys = []
      for index in range(len(self)):
        with self._lock:
          row = self._row(index)
        data = row.data
        keys.append(composition_key(row.symbols, data.get("charge"), data.get("spin")))
      self._molecule_keys = np.asarray(keys, dtype=object)
    return self._molecule_keys

  def close(self) -> None:
    self._finalizer()

  def _read(self, index: int) -> Record:
    row = self._row(index)
    energy, forces = row.get("energy"), row.get("forces")
    if energy is None or forces is None:
      raise ValueError(f"row has no {'energy' if energy is None else 'forces'}")
    data = row.data
    missing = [k for k in ("charge", "spin") if k not in data]
    if missing:
      raise ValueError(f"row.data has no {missing}")
    cell = np.asarray(row.cell, np.float64)
    pbc = tuple(bool(p) for p in row.pbc)
    structure = Structure(numbers=row.numbers, positions=row.positions,
                          charge=as_int(data["charge"], "charge"),
                          spin=as_int(data["spin"], "spin"),
                          cell=cell if np.any(cell) else None, pbc=pbc if any(pbc) else None,
                          key=self.record_name(index))
    return Record(structure=structure, energy=float(energy), forces=np.asarray(forces, np.float64),
                  subset=self.subset_names[self.subset_ids[index]],
                  molecule_key=composition_key(row.symbols, data["charge"], data["spin"]))


# LMDB allows one open environment per file and process, so datasets on the same file share it:
# resolved path -> [database, number of datasets using it].
_OPEN: dict[Path, list] = {}
_OPEN_LOCK = threading.Lock()


def _acquire(path: Path):
  key = path.resolve()
  with _OPEN_LOCK:
    if key not in _OPEN:
      _OPEN[key] = [_connect(path), 0]
    _OPEN[key][1] += 1
    return _OPEN[key][0]


def _release_all(paths: list[Path], dbs: list) -> None:
  """Releases a dataset's databases (``dbs``, emptied); the last user of one closes it.

  Also runs at exit, while the interpreter is intact: the backend's own __del__ fails during
  interpreter shutdown, so no database may survive until then.
  """
  dbs.clear()
  with _OPEN_LOCK:
    for path in paths:
      entry = _OPEN[path.resolve()]
      entry[1] -= 1
      if entry[1] == 0:
        entry[0].close()
        del _OPEN[path.resolve()]


def _connect(path: Path):
  """Opens one database read-only without a lock file, after checking that it is not truncated."""
  try:
    # LMDB memory-maps the file: touching a page past a truncated end kills the process (SIGBUS),
    # and the backend reads the B-tree as it opens. Check the size against the meta page first.
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    try:
      expected = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    finally:
      env.close()
    if os.path.getsize(path) < expected:
      raise ValueError(f"truncated LMDB file ({os.path.getsize(path)} bytes, its pages need "
                       f"{expected})")
    return ase.db.connect(str(path), readonly=True, use_lock_file=False)
  except (lmdb.Error, OSError, ValueError, zlib.error) as e:
    raise ValueError(f"{path}: cannot open as an ASE LMDB database: {e}") from e

