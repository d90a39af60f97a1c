"""Per-element reference energies, fitted by least squares and subtracted from the targets.

E_total ~ sum_Z n_Z e_Z: the fit removes the large, composition-only part of the energy (about
-1000 eV per carbon atom) so the network learns the small remainder; predictions add it back, so
they come out as total energies. Stored with the model through :meth:`ReferenceEnergies.to_dict`.

The fit accumulates the normal equations (counts^T counts, counts^T E) in float64 while streaming
the records, so any number of records fits in O(Z^2) memory, and solves them with a minimum-norm
least-squares solve: elements whose counts are collinear (e.g. always present in a fixed ratio)
get the minimum-norm split of their joint reference, which fits every training energy equally well.

Elements absent from the fitting records have no reference: :meth:`ReferenceEnergies.energy`
raises for them rather than silently using 0 (which would offset that molecule's energy by ~1 keV).
Fit on records that cover every element the model will see.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable

import numpy as np

from train.data.records import Dataset, Record

# Atom-type table size: atomic numbers 0..118 (0 unused).
NUM_ELEMENTS = 119


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceEnergies:
  """Reference energy per element.

  Attributes:
    values: [NUM_ELEMENTS] float64 reference energy of each atomic number in eV (0 where unseen).
    seen: [NUM_ELEMENTS] bool, True for the elements present in the fitting records.
  """

  values: np.ndarray
  seen: np.ndarray

  @classmethod
  def fit(cls, records: Iterable[Record]) -> "ReferenceEnergies":
    """Least-squares fit of E_total = sum_Z n_Z e_Z over the records (float64).

    Raises:
      ValueError: if there are no records.
    """
    gram = np.zeros((NUM_ELEMENTS, NUM_ELEMENTS))  # counts^T counts
    rhs = np.zeros(NUM_ELEMENTS)  # counts^T energies
    num_records = 0
    for record in records:
      counts = np.bincount(np.asarray(record.structure.numbers), minlength=NUM_ELEMENTS)
      counts = counts[:NUM_ELEMENTS].astype(np.float64)
      gram += np.outer(counts, counts)
      rhs += counts * float(record.energy)
      num_records += 1
    if num_records == 0:
      raise ValueError("cannot fit reference energies to no records")
    seen = np.diag(gram) > 0
    values = np.zeros(NUM_ELEMENTS)
    # The normal equations restricted to the seen elements share the least-squares problem's
    # minimum-norm solution; lstsq handles rank deficiency.
    values[seen] = np.linalg.lstsq(gram[np.ix_(seen, seen)], rhs[seen], rcond=None)[0]
    return cls(values=values, seen=seen)

  def energy(self, numbers: np.ndarray) -> float:
    """Sum of the reference energies of the atoms, in eV.

    Raises:
      ValueError: for an atomic number without a fitted reference.
    """
    numbers = np.asarray(numbers)
    in_table = (numbers >= 0) & (numbers < NUM_ELEMENTS)
    known = np.zeros(numbers.shape, bool)
    known[in_table] = self.seen[numbers[in_table]]
    if not known.all():
      missing = sorted(set(numbers[~known].tolist()))
      raise ValueError(f"no reference energy for atomic numbers {missing}: they were absent from "
                       f"the records the references were fitted to")
    return float(self.values[numbers].sum())

  def to_dict(self) -> dict[str, Any]:
    """JSON-serialisable form: the reference energy in eV of every seen element, keyed by str(Z)."""
    energies = {str(z): float(self.values[z]) for z in np.flatnonzero(self.seen)}
    return {"unit": "eV", "energies": energies}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ReferenceEnergies":
    if data.get("unit", "eV") != "eV":
      raise ValueError(f"reference energies must be in eV, got unit {data['unit']!r}")
    values = np.zeros(NUM_ELEMENTS)
    seen = np.zeros(NUM_ELEMENTS, bool)
    for z, e in data["energies"].items():
      values[int(z)], seen[int(z)] = float(e), True
    return cls(values=values, seen=seen)


def fit_on_dataset(dataset: Dataset, indices: np.ndarray | None = None, *,
                   max_records: int | None = None, seed: int = 0) -> ReferenceEnergies:
  """Fits references on records ``indices`` of a dataset (at most ``max_records``, drawn at random).

  Invalid records raise, or with ``dataset.on_error="skip"`` are skipped (``dataset.skipped``).
  """
  indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
  if max_records is not None and len(indices) > max_records:
    indices = np.sort(np.random.default_rng(seed).choice(indices, max_records, replace=False))
  records = (dataset.read_or_skip(i) for i in indices)
  return ReferenceEnergies.fit(r for r in records if r is not None)
