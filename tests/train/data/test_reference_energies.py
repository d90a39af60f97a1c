"""Reference energies: exact least-squares recovery (elements, charges, spins), storage, unseen states."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from e2former_jax.reference_energies import ReferenceEnergies, UnfittedStateWarning
from e2former_jax.structure import Structure
from train.data import Record, fit_on_dataset, fit_reference_energies, open_dataset
from train.data.reference_energies import NUM_ELEMENTS

TRUE = {1: -13.6, 6: -1029.5, 7: -1484.2, 8: -2041.9}
# Known offsets: removing an electron costs ~ an ionisation energy, adding one gains ~ an affinity.
TRUE_CHARGE = {1: 7.3, -1: -2.1, 2: 19.0}
TRUE_SPIN = {2: 1.7, 3: 2.9}


def record(numbers, energy, charge=0, spin=1):
  numbers = np.asarray(numbers)
  structure = Structure(numbers=numbers, positions=np.arange(3 * len(numbers)).reshape(-1, 3) * 1.0,
                        charge=charge, spin=spin)
  return Record(structure=structure, energy=energy, forces=np.zeros((len(numbers), 3)), subset="s",
                molecule_key="m")


def true_energy(numbers, charge=0, spin=1):
  return sum(TRUE[z] for z in numbers) + TRUE_CHARGE.get(charge, 0.0) + TRUE_SPIN.get(spin, 0.0)


def charged_records(rng, count):
  """Random compositions in random states whose electron count allows the multiplicity."""
  records = []
  while len(records) < count:
    numbers = rng.choice(list(TRUE), rng.integers(2, 30))
    charge = int(rng.choice([0, 0, 1, -1, 2]))
    spin = 1 + (int(numbers.sum()) - charge) % 2 + 2 * int(rng.random() < 0.2)
    if spin - 1 > int(numbers.sum()) - charge:
      continue
    records.append(record(numbers, true_energy(numbers, charge, spin), charge, spin))
  return records


def test_exact_recovery_of_elements_charges_and_spins(rng):
  records = charged_records(rng, 80)
  ref = fit_reference_energies(records)
  for z, e in TRUE.items():
    assert ref.elements[z] == pytest.approx(e, abs=1e-7)
  assert set(ref.elements) == set(TRUE)
  for q, e in TRUE_CHARGE.items():
    assert ref.charges[q] == pytest.approx(e, abs=1e-7)
  for m, e in TRUE_SPIN.items():
    assert ref.multiplicities[m] == pytest.approx(e, abs=1e-7)
  assert 0 not in ref.charges and 1 not in ref.multiplicities  # the baseline takes no offset
  for r in records[:10]:
    s = r.structure
    assert ref.energy(s.numbers, s.charge, s.spin) == pytest.approx(r.energy, abs=1e-6)


def test_streaming_fit_equals_in_memory_least_squares(rng):
  """The normal equations accumulated record by record give the full design matrix's solution."""
  records = [record(r.structure.numbers, r.energy + rng.normal(0, 0.5), r.structure.charge,
                    r.structure.spin) for r in charged_records(rng, 60)]
  ref = fit_reference_energies(iter(records))  # a generator: one pass, nothing kept
  states = sorted({("q", r.structure.charge) for r in records if r.structure.charge != 0}
                  | {("m", r.structure.spin) for r in records if r.structure.spin != 1})
  design = np.array([np.concatenate([np.bincount(r.structure.numbers, minlength=NUM_ELEMENTS),
                                     [float(("q", r.structure.charge) == s or ("m", r.structure.spin) == s)
                                      for s in states]]) for r in records])
  used = design.any(axis=0)
  solution = np.linalg.lstsq(design[:, used], [r.energy for r in records], rcond=None)[0]
  fitted = dict(zip([("z", z) for z in np.flatnonzero(used[:NUM_ELEMENTS])] + states, solution))
  for (kind, key), value in fitted.items():
    table = {"z": ref.elements, "q": ref.charges, "m": ref.multiplicities}[kind]
    assert table[int(key)] == pytest.approx(value, abs=1e-6)


def test_collinear_elements_get_minimum_norm_split():
  # H and C always as CH4: only e_C + 4 e_H is determined; the fit reproduces every energy.
  records = [record([6, 1, 1, 1, 1] * k, k * -1100.0) for k in (1, 2, 3)]
  ref = fit_reference_energies(records)
  assert ref.elements[6] + 4 * ref.elements[1] == pytest.approx(-1100.0)
  assert ref.elements[6] / ref.elements[1] == pytest.approx(1 / 4)  # minimum norm: proportional to counts


def test_round_trip_through_json_and_earlier_formats(rng):
  ref = fit_reference_energies(charged_records(rng, 40))
  again = ReferenceEnergies.from_dict(json.loads(json.dumps(ref.to_dict())))
  assert again.to_dict() == ref.to_dict() and again.charges == ref.charges
  # Checkpoints of format 1 stored per-element references only, in two spellings.
  legacy = ReferenceEnergies.from_dict({"unit": "eV", "energies": {"1": -13.6, "8": -2041.9}})
  assert dict(legacy.elements) == {1: -13.6, 8: -2041.9}
  assert legacy.charges is None and legacy.multiplicities is None  # charge and spin not modelled:
  assert legacy.energy(np.array([8, 1]), charge=-1, multiplicity=2) == pytest.approx(-2055.5)  # no offsets
  assert dict(ReferenceEnergies.from_dict({"1": -13.6}).elements) == {1: -13.6}
  with pytest.raises(ValueError, match="must be in eV"):
    ReferenceEnergies.from_dict({"unit": "hartree", "elements": {}})
  with pytest.raises(ValueError, match="baseline"):
    ReferenceEnergies(elements={1: -13.6}, charges={0: 1.0})


def test_unseen_element_charge_or_spin_raises():
  ref = fit_reference_energies([record([1, 1], -27.2), record([8, 1, 1], -2069.1),
                                record([8, 1], -2060.0, charge=-1)])
  with pytest.raises(ValueError, match=r"no reference energy for element\(s\) Z=\[6, 7\]"):
    ref.energy(np.array([6, 1, 7, 8]))
  # A state without an offset gets none, with one warning per state (an element raises: above).
  with pytest.warns(UnfittedStateWarning, match=r"total charge 1 \(fitted: \[-1, 0\]\)"):
    assert ref.energy(np.array([8, 1, 1]), charge=1, multiplicity=2) == pytest.approx(ref.energy([8, 1, 1]))
  with pytest.warns(UnfittedStateWarning, match=r"spin multiplicity 3 \(fitted: \[1\]\)"):
    ref.energy(np.array([8, 1, 1]), multiplicity=3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ref.energy(np.array([8, 1, 1]), multiplicity=3)  # already said
  assert ref.energy(np.array([8, 1]), charge=-1, multiplicity=0) == pytest.approx(-2060.0)  # 0: unspecified
  with pytest.raises(ValueError, match="no records"):
    fit_reference_energies([])
  assert ReferenceEnergies().energy(np.array([6, 7]), charge=3) == 0.0  # empty: no references at all


def test_fit_on_real_sample(omol_dir):
  ds = open_dataset(omol_dir)
  ref = fit_on_dataset(ds)
  assert sorted(ref.elements) == [1, 6, 7, 8, 16]
  records = [ds.read(i) for i in range(len(ds))]
  residuals = [r.energy - ref.energy(r.structure.numbers, r.structure.charge, r.structure.spin)
               for r in records]
  energies = [r.energy for r in records]
  assert np.std(residuals) < 0.05 * np.std(energies)  # composition explains ~97 % (12 molecules, hot geometries)
  subsampled = fit_on_dataset(ds, np.arange(0, 60, 2), max_records=25, seed=3)
  assert len(subsampled.elements) >= 4
