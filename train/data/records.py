"""A labelled structure (record) and the lazy, indexed dataset interface the three readers share.

A dataset is indexed when it is opened: per record only its atom count, subset and location are
kept, so that batches can be packed without reading any coordinates; a record is read from disk
when :meth:`Dataset.read` asks for it. Every record that is read is validated, and a bad one
raises :class:`InvalidRecordError` naming the file and the record. With ``on_error="skip"`` the
consumers (indexing, the reference fit, the batch iterator) skip such records instead: those found
when the file is indexed are counted in one warning, those found when read are warned about once
each (:class:`SkippedRecords`, shared by every consumer and every epoch) and counted in
:meth:`SkippedRecords.summary`.
"""

from __future__ import annotations

import abc
import dataclasses
import threading
import warnings
from pathlib import Path
from typing import Literal, Sequence

import ase.formula
import numpy as np

from e2former_jax.structure import Structure, validate_structure

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES = ("raise", "skip")
# How many skipped records a summary warning names before it only counts.
_NAMED_IN_WARNING = 5
# Invalid records warned about one by one when read; later ones are only counted in the summary,
# so that a whole bad subset does not flood the log.
MAX_WARNED_RECORDS = 20


class InvalidRecordError(ValueError):
  """A record (or a whole group of records) that cannot be used, with where it is.

  The message is ``{path}: {record}: {reason}`` unless ``message`` words it otherwise.
  """

  def __init__(self, path: str | Path, record: str, reason: str, *, message: str | None = None):
    super().__init__(message or f"{path}: {record}: {reason}")
    self.path, self.record, self.reason = str(path), record, reason


@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  """One labelled structure.

  Attributes:
    structure: atoms, positions (angstrom), total charge and spin multiplicity; ``structure.key``
      names the record.
    energy: total energy in eV (no reference energies subtracted).
    forces: [n, 3] forces in eV/angstrom.
    subset: name of the subset it belongs to (per-subset evaluation).
    molecule_key: identity of the molecule (all conformers of a molecule share it; splits use it).
  """

  structure: Structure
  energy: float
  forces: np.ndarray
  subset: str
  molecule_key: str


def validate_record(record: Record, *, num_species: int | None = None) -> None:
  """Raises ValueError if the structure or its labels are unusable (see ``validate_structure``)."""
  validate_structure(record.structure, num_species=num_species)
  n = record.structure.num_atoms
  forces = np.asarray(record.forces)
  if forces.shape != (n, 3):
    raise ValueError(f"forces must have shape [{n}, 3], got {forces.shape}")
  if not np.isfinite(record.energy):
    raise ValueError(f"non-finite energy {record.energy}")
  if not np.isfinite(forces).all():
    i = int(np.argmax(~np.isfinite(forces).all(axis=1)))
    raise ValueError(f"non-finite forces (NaN or inf) at atom {i}: {forces[i]}")


def composition_key(symbols: Sequence[str], charge=None, spin=None) -> str:
  """A molecule identity from composition: Hill formula, charge and spin, e.g. ``CH4O|q=0|s=1``.

  Used where a format stores no molecule identity: all conformers (and isomers) of one composition
  then count as one molecule, which keeps any conformer of a molecule out of the other splits.
  """
  formula = ase.formula.Formula.from_list(list(symbols)).format("hill")
  return f"{formula}|q={0 if charge is None else int(charge)}|s={1 if spin is None else int(spin)}"


def as_int(value, name: str) -> int:
  """An integral number (int, float 1.0, numpy scalar, [1] array) as int; ValueError otherwise."""
  number = float(np.asarray(value).reshape(()))
  if number != round(number):
    raise ValueError(f"{name} must be an integer, got {value}")
  return int(round(number))


def check_on_error(on_error: str) -> OnError:
  if on_error not in ON_ERROR_CHOICES:
    raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
  return on_error  # type: ignore[return-value]


def warn_skipped(path: str | Path, what: str, errors: Sequence[InvalidRecordError]) -> None:
  """One warning that counts skipped records and names the first few with their reasons."""
  if not errors:
    return
  named = "; ".join(f"{e.record}: {e.reason}" for e in errors[:_NAMED_IN_WARNING])
  more = f"; and {len(errors) - _NAMED_IN_WARNING} more" if len(errors) > _NAMED_IN_WARNING else ""
  warnings.warn(f"{path}: skipped {len(errors)} {what} (on_error='skip'): {named}{more}",
                stacklevel=3)


class SkippedRecords:
  """The invalid records of one dataset met while reading it with ``on_error="skip"``.

  Each is warned about the first time it is met (up to ``MAX_WARNED_RECORDS``), whichever consumer
  meets it, and never read again; :meth:`summary` counts them all. Thread-safe (the prefetch thread
  adds to it).
  """

  def __init__(self, path: Path):
    self.path = path
    self._errors: dict[int, InvalidRecordError] = {}
    self._lock = threading.Lock()

  def __contains__(self, index: int) -> bool:
    return int(index) in self._errors

  def add(self, index: int, error: InvalidRecordError) -> None:
    with self._lock:
      if int(index) in self._errors:
        return
      self._errors[int(index)] = error
      count = len(self._errors)
    if count <= MAX_WARNED_RECORDS:
      warnings.warn(f"{error} (skipped, on_error='skip')", stacklevel=3)
    if count == MAX_WARNED_RECORDS:
      warnings.warn(f"{self.path}: {count} invalid records skipped; further ones are only counted",
                    stacklevel=3)

  def summary(self) -> str | None:
    """One line counting the skipped records (None when there are none)."""
    if not self._errors:
      return None
    return f"{self.path}: skipped {len(self._errors)} invalid record(s) in all (on_error='skip')"


class Dataset(abc.ABC):
  """Lazy, indexed, read-only access to the labelled structures of one source.

  Subclasses fill the index in their constructor (``num_atoms``, ``subset_ids``,
  ``subset_names``) and implement :meth:`_read`, :meth:`record_name` and :meth:`molecule_keys`.
  Reads are serialised by a lock, so a background prefetch thread and the main thread may share
  a dataset.

  Attributes:
    path: the file or folder the dataset was opened from.
    on_error: ``"raise"`` or ``"skip"`` (what consumers do with an invalid record).
    num_atoms: [R] int64 atoms of every record.
    subset_ids: [R] int32 index into ``subset_names`` of every record.
    subset_names: the subset names (sorted).
    skipped: the invalid records met while reading (``on_error="skip"``).
  """

  def __init__(self, path: str | Path, on_error: OnError = "raise"):
    self.path = Path(path)
    self.on_error = check_on_error(on_error)
    self.skipped = SkippedRecords(self.path)
    self.num_atoms = np.zeros(0, np.int64)
    self.subset_ids = np.zeros(0, np.int32)
    self.subset_names: list[str] = []
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.num_atoms)

  def __getitem__(self, index: int) -> Record:
    return self.read(index)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    """Releases open file handles (the dataset cannot be read afterwards)."""

  @abc.abstractmethod
  def record_name(self, index: int) -> str:
    """Human-readable location of record ``index`` (group and conformer, row id, frame)."""

  @abc.abstractmethod
  def molecule_keys(self) -> np.ndarray:
    """[R] object array of str: the molecule identity of every record (cached after first call)."""

  @abc.abstractmethod
  def _read(self, index: int) -> Record:
    """Reads record ``index`` from disk (unvalidated); raises on a corrupt or incomplete record."""

  def read(self, index: int, *, num_species: int | None = None) -> Record:
    """Reads and validates record ``index``.

    Args:
      index: record number in [0, len(self)).
      num_species: the model's ``num_species`` (atomic numbers must be below it), if known.

    Raises:
      IndexError: for an index out of range.
      InvalidRecordError: (a ValueError) naming the file and record, for a record that cannot be
        read (corrupt file, missing key) or fails validation (unknown element, NaN/inf, atoms
        closer than 0.1 A, wrong shapes).
    """
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self.path}: record {index} out of range [0, {len(self)})")
    try:
      with self._lock:
        record = self._read(index)
      validate_record(record, num_species=num_species)
    except InvalidRecordError:
      raise
    except (ValueError, KeyError, OSError, TypeError) as e:
      raise InvalidRecordError(self.path, self.record_name(index), _reason(e)) from e
    if record.structure.num_atoms != self.num_atoms[index]:
      raise InvalidRecordError(self.path, self.record_name(index),
                               f"has {record.structure.num_atoms} atoms but the index says "
                               f"{self.num_atoms[index]}")
    return record

  def read_or_skip(self, index: int, *, num_species: int | None = None) -> Record | None:
    """:meth:`read`, except that with ``on_error="skip"`` an invalid record gives None (warned about
    once, see :class:`SkippedRecords`)."""
    if index in self.skipped:
      return None
    try:
      return self.read(index, num_species=num_species)
    except InvalidRecordError as e:
      self.skip(index, e)
      return None

  def skip(self, index: int, error: InvalidRecordError) -> None:
    """Raises ``error`` with ``on_error="raise"``; otherwise records record ``index`` as skipped."""
    if self.on_error == "raise":
      raise error
    self.skipped.add(index, error)

  def _set_subsets(self, subset_per_record: Sequence[str]) -> None:
    """Fills ``subset_names`` (sorted) and ``subset_ids`` from one subset name per record."""
    names, ids = np.unique(np.asarray(list(subset_per_record), dtype=object).astype(str),
                           return_inverse=True)
    self.subset_names = [str(name) for name in names]
    self.subset_ids = ids.astype(np.int32).reshape(-1)


def _reason(error: BaseException) -> str:
  text = str(error)
  if isinstance(error, KeyError):
    return f"missing key {text}"
  return text if text else type(error).__name__
