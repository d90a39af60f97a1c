"""Per-element reference energies: exact least-squares recovery, storage, unseen elements."""

from __future__ import annotations

import json

import numpy as np
import pytest

from e2former_jax.structure import Structure
from train.data import Record, ReferenceEnergies, fit_on_dataset, open_dataset

TRUE = {1: -13.6, 6: -1029.5, 7: -1484.2, 8: -2041.9}


def record(numbers, energy):
  numbers = np.asarray(numbers)
  structure = Structure(numbers=numbers, positions=np.arange(3 * len(numbers)).reshape(-1, 3) * 1.0)
  return Record(structure=structure, energy=energy, forces=np.zeros((len(numbers), 3)), subset="s",
                molecule_key="m")


def test_exact_recovery_and_residuals(rng):
  records = []
  for _ in range(40):
    numbers = rng.choice(list(TRUE), rng.integers(2, 30))
    records.append(record(numbers, sum(TRUE[z] for z in numbers)))
  ref = ReferenceEnergies.fit(records)
  for z, e in TRUE.items():
    assert ref.values[z] == pytest.approx(e, abs=1e-8)
  assert ref.seen.sum() == 4
  numbers = np.array([6, 6, 1, 8])
  assert ref.energy(numbers) == pytest.approx(2 * TRUE[6] + TRUE[1] + TRUE[8], abs=1e-8)
  # With noise: the references minimise the squared residual (normal equations hold).
  noisy = [record(r.structure.numbers, r.energy + rng.normal(0, 0.5)) for r in records]
  ref = ReferenceEnergies.fit(noisy)
  counts = np.array([np.bincount(r.structure.numbers, minlength=119) for r in noisy], float)
  residual = np.array([r.energy for r in noisy]) - counts @ ref.values
  np.testing.assert_allclose(counts.T @ residual, 0.0, atol=1e-6)


def test_collinear_elements_get_minimum_norm_split():
  # H and C always as CH4: only e_C + 4 e_H is determined; the fit reproduces every energy.
  records = [record([6, 1, 1, 1, 1] * k, k * -1100.0) for k in (1, 2, 3)]
  ref = ReferenceEnergies.fit(records)
  assert ref.values[6] + 4 * ref.values[1] == pytest.approx(-1100.0)
  assert ref.values[6] / ref.values[1] == pytest.approx(1 / 4)  # minimum norm: proportional to counts


def test_round_trip_through_json():
  ref = ReferenceEnergies.fit([record([1, 1], -27.2), record([8, 1, 1], -2069.1), record([8], -2041.9)])
  again = ReferenceEnergies.from_dict(json.loads(json.dumps(ref.to_dict())))
  np.testing.assert_array_equal(again.values, ref.values)
  np.testing.assert_array_equal(again.seen, ref.seen)
  assert set(ref.to_dict()["energies"]) == {"1", "8"}


def test_unseen_element_raises():
  ref = ReferenceEnergies.fit([record([1, 1], -27.2), record([8, 1, 1], -2069.1)])
  with pytest.raises(ValueError, match=r"no reference energy for atomic numbers \[6, 7\]"):
    ref.energy(np.array([6, 1, 7, 8]))
  with pytest.raises(ValueError, match="no records"):
    ReferenceEnergies.fit([])


def test_fit_on_real_sample(omol_dir):
  ds = open_dataset(omol_dir)
  ref = fit_on_dataset(ds)
  assert np.flatnonzero(ref.seen).tolist() == [1, 6, 7, 8, 16]
  residuals = [ds.read(i).energy - ref.energy(ds.read(i).structure.numbers) for i in range(len(ds))]
  energies = [ds.read(i).energy for i in range(len(ds))]
  assert np.std(residuals) < 0.05 * np.std(energies)  # composition explains ~97 % (12 molecules, hot geometries)
  subsampled = fit_on_dataset(ds, np.arange(0, 60, 2), max_records=25, seed=3)
  assert subsampled.seen.sum() >= 4
