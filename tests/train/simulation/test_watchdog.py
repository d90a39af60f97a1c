"""The MD watchdog on hand-made trajectories: the collapsing ethanol it must catch, healthy motion it
must not flag, and a bond that crosses a periodic boundary."""

from __future__ import annotations

import ase
import numpy as np
import pytest
from ase.build import molecule

from train.simulation.watchdog import (BOND_FACTOR, TEMPERATURE_FACTOR, TEMPERATURE_WINDOW_FRAMES,
                                       Finding, Watchdog, report_line)

RECORD_EVERY = 10
FRAMES = 16
# ase's ethanol: C0 (methyl), C1 (bonded to O2), O2, H3 on O2, the other H on C0 and C1.
METHYL, CARBINOL, OXYGEN = 0, 1, 2
METHYL_GROUP = [0, 6, 7, 8]
RADII_CO = 0.76 + 0.66  # covalent radii of C and O (A)


def _rotation(axis: np.ndarray, angle: float) -> np.ndarray:
  """Rodrigues' rotation matrix about a unit axis."""
  k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
  return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _collapsing_ethanol():
  """Frames in which the methyl group swings about C1 until the C-C-O angle is 63 degrees, while
  the temperature climbs from 300 to 900 K: (positions [F, 9, 3], temperatures [F], C0-O2 [F])."""
  atoms = molecule("CH3CH2OH")
  p = atoms.positions
  to_methyl, to_oxygen = p[METHYL] - p[CARBINOL], p[OXYGEN] - p[CARBINOL]
  axis = np.cross(to_methyl, to_oxygen)
  axis /= np.linalg.norm(axis)
  start = np.arccos(to_methyl @ to_oxygen / np.linalg.norm(to_methyl) / np.linalg.norm(to_oxygen))
  frames, distances = [], []
  for angle in np.linspace(start, np.radians(63.0), FRAMES):
    frame = p.copy()
    frame[METHYL_GROUP] = p[CARBINOL] + (p[METHYL_GROUP] - p[CARBINOL]) @ _rotation(axis, start - angle).T
    frames.append(frame)
    distances.append(np.linalg.norm(frame[METHYL] - frame[OXYGEN]))
  return atoms, np.array(frames), np.linspace(300.0, 900.0, FRAMES), np.array(distances)


def test_collapsing_ethanol_is_reported_at_the_right_steps():
  atoms, frames, temperatures, c_o = _collapsing_ethanol()
  last = atoms.copy()
  last.positions = frames[-1]
  assert np.isclose(atoms.get_angle(METHYL, CARBINOL, OXYGEN), 107.1, atol=0.1)  # degrees
  assert np.isclose(last.get_angle(METHYL, CARBINOL, OXYGEN), 63.0)
  watchdog = Watchdog(atoms.numbers, frames[0], temperature_k=300.0)
  found = {}
  for f, (frame, temperature) in enumerate(zip(frames, temperatures)):
    for event in watchdog.check(f * RECORD_EVERY, frame, temperature_k=temperature):
      found.setdefault(event.finding, []).append(event)
  # The new C-O contact: at the first frame where C0-O2 is within the bonding distance.
  formed = found[Finding.BOND_FORMED]
  first_bonded = int(np.argmax(c_o < BOND_FACTOR * RADII_CO))
  assert [(e.step, e.atoms) for e in formed] == [(first_bonded * RECORD_EVERY, (METHYL, OXYGEN))]
  assert formed[0].text.startswith(f"bond C0-O2 formed ({c_o[first_bonded]:.2f} A; {c_o[0]:.2f} A")
  # The temperature: when the mean of the last frames first passes twice the 300 K target.
  window = [temperatures[max(0, f - TEMPERATURE_WINDOW_FRAMES + 1):f + 1].mean() for f in range(FRAMES)]
  first_hot = int(np.argmax(np.asarray(window) > TEMPERATURE_FACTOR * 300.0))
  assert [e.step for e in found[Finding.HOT]] == [first_hot * RECORD_EVERY]
  # Nothing else: the methyl group moves rigidly, so no bond of the start breaks.
  assert set(found) == {Finding.BOND_FORMED, Finding.HOT}
  line = report_line(first_hot * RECORD_EVERY, 5.0 * first_hot, found[Finding.HOT])
  assert line.startswith(f"md step {first_hot * RECORD_EVERY} ({5.0 * first_hot:.1f} fs): temperature ")


def test_thermal_motion_raises_nothing(rng):
  atoms = molecule("CH3CH2OH")
  watchdog = Watchdog(atoms.numbers, atoms.positions, temperature_k=300.0)
  for step in range(0, 1000, RECORD_EVERY):
    # 0.05 A per coordinate: more than the thermal spread of bond lengths at 300 K.
    frame = atoms.positions + rng.normal(0.0, 0.05, atoms.positions.shape)
    events = watchdog.check(step, frame, temperature_k=300.0 * rng.uniform(0.5, 1.5),
                            conserved_energy=-100.0 + rng.normal(0.0, 0.01))
    assert events == [], events


def test_stretched_bond_close_contact_and_energy_drift_are_reported_once():
  atoms = molecule("CH3CH2OH")
  watchdog = Watchdog(atoms.numbers, atoms.positions, temperature_k=300.0)
  assert watchdog.check(0, atoms.positions, temperature_k=300.0, conserved_energy=-100.0) == []
  frame = atoms.positions.copy()
  frame[3] = frame[OXYGEN] + 2.0 * (frame[3] - frame[OXYGEN])  # O-H stretched to twice its length
  frame[7] = frame[6] + [0.2, 0.0, 0.0]  # two methyl hydrogens 0.2 A apart
  events = watchdog.check(10, frame, temperature_k=300.0, conserved_energy=-99.0)
  assert {(e.finding, e.atoms) for e in events} == {
      (Finding.BOND_BROKEN, (2, 3)), (Finding.TOO_CLOSE, (6, 7)), (Finding.ENERGY_DRIFT, ())}
  assert watchdog.check(20, frame, temperature_k=300.0, conserved_energy=-99.0) == []  # once each
  # The largest bond change over the frames: the doubled O-H (+100 %), whichever frame came later.
  assert watchdog.max_bond_change == pytest.approx(1.0) and watchdog.max_bond_change_pair == "O2-H3"
  watchdog.check(30, atoms.positions, temperature_k=300.0)
  assert watchdog.max_bond_change == pytest.approx(1.0)


def test_bond_across_a_periodic_boundary_is_not_broken():
  cell = np.diag([6.0, 6.0, 6.0])
  start = ase.Atoms("H2", positions=[[5.8, 3.0, 3.0], [6.5, 3.0, 3.0]], cell=cell, pbc=True)
  watchdog = Watchdog(start.numbers, start.positions, temperature_k=300.0, cell=cell, pbc=(True,) * 3)
  start.wrap()  # as a periodic simulation writes it: one atom at x = 0.5, the other at 5.8
  assert watchdog.check(10, start.positions, temperature_k=300.0) == []
  moved = start.positions + [[0.0, 0.0, 0.0], [0.0, 0.0, 1.5]]  # now 1.66 A apart: broken
  (event,) = watchdog.check(20, moved, temperature_k=300.0)
  assert event.finding is Finding.BOND_BROKEN and event.atoms == (0, 1)
