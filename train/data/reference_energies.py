"""Least-squares fit of the reference energies (``e2former_jax.reference_energies``) to training records.

E_total ~ sum_Z n_Z e_Z + c_q + s_m: per-element energies plus one offset per total charge q != 0 and
one per spin multiplicity m != 1. The fit removes the large composition part of the energy (about
-1000 eV per carbon atom) and the nearly constant cost of adding or removing an electron or
unpairing one, so the network learns the small remainder; predictions add it back.

The fit accumulates the normal equations (X^T X, X^T E over the design columns: element counts,
then one indicator column per charge/multiplicity seen) in float64 while streaming the records, so
any number of records fits in memory independent of their number, and solves them with a
minimum-norm least-squares solve: elements whose counts are collinear (e.g. always present in a
fixed ratio) get the minimum-norm split of their joint reference, which fits every training energy
equally well.

Elements, charges and multiplicities absent from the fitting records have no reference:
``ReferenceEnergies.energy`` raises for them rather than silently using 0. Fit on records that cover
everything the model will see.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from e2former_jax.reference_energies import NEUTRAL_CHARGE, SINGLET, UNSPECIFIED_MULTIPLICITY
from e2former_jax.reference_energies import ReferenceEnergies
from train.data.records import Dataset, InvalidRecordError, Record, warn_skipped

# Atom-type table size: atomic numbers 0..118 (0 unused).
NUM_ELEMENTS = 119


class _NormalEquations:
  """X^T X and X^T y of a growing design: element counts, then indicator columns added on first use."""

  def __init__(self):
    self.states: list[tuple[str, int]] = []  # ("charge", q) or ("multiplicity", m) per extra column
    self.gram = np.zeros((NUM_ELEMENTS, NUM_ELEMENTS))
    self.rhs = np.zeros(NUM_ELEMENTS)
    self.rows = 0

  def _column(self, state: tuple[str, int]) -> int:
    if state not in self.states:
      self.states.append(state)
      self.gram = np.pad(self.gram, ((0, 1), (0, 1)))
      self.rhs = np.pad(self.rhs, (0, 1))
    return NUM_ELEMENTS + self.states.index(state)

  def add(self, numbers: np.ndarray, charge: int, multiplicity: int, energy: float) -> None:
    columns = []
    if charge != NEUTRAL_CHARGE:
      columns.append(self._column(("charge", charge)))
    if multiplicity not in (SINGLET, UNSPECIFIED_MULTIPLICITY):
      columns.append(self._column(("multiplicity", multiplicity)))
    x = np.zeros(len(self.rhs))
    x[:NUM_ELEMENTS] = np.bincount(numbers, minlength=NUM_ELEMENTS)[:NUM_ELEMENTS]
    x[columns] = 1.0
    self.gram += np.outer(x, x)
    self.rhs += x * energy
    self.rows += 1

  def solve(self) -> ReferenceEnergies:
    seen = np.diag(self.gram) > 0
    values = np.zeros(len(self.rhs))
    # The normal equations restricted to the seen columns share the least-squares problem's
    # minimum-norm solution; lstsq handles rank deficiency.
    values[seen] = np.linalg.lstsq(self.gram[np.ix_(seen, seen)], self.rhs[seen], rcond=None)[0]
    extra = dict(zip(self.states, values[NUM_ELEMENTS:]))
    return ReferenceEnergies(
        elements={z: values[z] for z in np.flatnonzero(seen[:NUM_ELEMENTS])},
        charges={q: e for (kind, q), e in extra.items() if kind == "charge"},
        multiplicities={m: e for (kind, m), e in extra.items() if kind == "multiplicity"})


def fit_reference_energies(records: Iterable[Record]) -> ReferenceEnergies:
  """Least-squares fit of E_total = sum_Z n_Z e_Z + c_q + s_m over the records (float64).

  Raises:
    ValueError: if there are no records.
  """
  equations = _NormalEquations()
  for record in records:
    s = record.structure
    equations.add(np.asarray(s.numbers), int(s.charge), int(s.spin), float(record.energy))
  if equations.rows == 0:
    raise ValueError("cannot fit reference energies to no records")
  return equations.solve()


def fit_on_dataset(dataset: Dataset, indices: np.ndarray | None = None, *,
                   max_records: int | None = None, seed: int = 0) -> ReferenceEnergies:
  """Fits references on records ``indices`` of a dataset (at most ``max_records``, drawn at random).

  Invalid records raise, or are skipped and counted in a warning with ``dataset.on_error="skip"``.
  """
  indices = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
  if max_records is not None and len(indices) > max_records:
    indices = np.sort(np.random.default_rng(seed).choice(indices, max_records, replace=False))
  errors: list[InvalidRecordError] = []

  def records():
    for i in indices:
      try:
        yield dataset.read(i)
      except InvalidRecordError as e:
        if dataset.on_error == "raise":
          raise
        errors.append(e)

  references = fit_reference_energies(records())
  warn_skipped(dataset.path, "records", errors)
  return references
