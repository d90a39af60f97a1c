"""Notices when a molecular dynamics run stops being physical (host-side numpy, on recorded frames).

A potential driven outside the structures it was trained on does not fail loudly: it keeps
producing finite forces while a molecule folds onto itself (ethanol's C-C-O angle collapsing to
63 degrees with a new C-O contact) and the temperature climbs from 300 to 900 K. :class:`Watchdog`
compares every recorded frame with the start geometry and reports, once each:

* a bond of the start geometry broken, or a bond formed between atoms that were not bonded;
* two atoms closer than any chemical bond allows;
* the temperature (averaged over a few frames) far above the simulation's temperature;
* the conserved energy (NVE total energy, Nose-Hoover invariant) drifting from its start.

Bonds are detected from covalent radii (Cordero et al. 2008, ``ase.data.covalent_radii``): atoms
i and j are bonded when closer than ``BOND_FACTOR * (r_i + r_j)``. Atom indices in the reports are
0-based, as in the trajectory file.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import ase.data
import numpy as np
from ase.geometry import find_mic
from ase.neighborlist import primitive_neighbor_list

# Bonded below this multiple of the covalent radii sum: every covalent bond of an organic molecule
# is within 1.05x at its equilibrium length and stays below 1.2x when thermally stretched, while the
# nearest non-bonded atoms (1-3 pairs across a bond angle) are at 1.6x or more.
BOND_FACTOR = 1.2
# A bond of the start geometry is broken beyond this multiple: far above any thermal stretch
# (which stays near 1.15x even at 1000 K), so vibrations never trigger it.
BREAK_FACTOR = 1.5
# Closer than this multiple no chemical bond exists (the shortest, triple bonds, are at ~0.8x): the
# potential has lost its short-range repulsion.
TOO_CLOSE_FACTOR = 0.6
# The temperature is averaged over this many recorded frames: the instantaneous temperature of a
# small molecule fluctuates by tens of percent (relative spread sqrt(2 / degrees of freedom)).
TEMPERATURE_WINDOW_FRAMES = 5
# Reported when that average exceeds this multiple of the simulation's temperature ...
TEMPERATURE_FACTOR = 2.0
# ... taken as at least room temperature, so that a run started colder (or at rest) from a dataset
# geometry off its minimum may warm up as the geometry relaxes.
TEMPERATURE_FLOOR_K = 300.0
# Reported when the conserved energy moves this far from its start (eV per atom): the equivalent of
# heating by ~80 K (3 k_B T per atom), far beyond the drift of a sound integration.
MAX_DRIFT_EV_PER_ATOM = 0.02


class OnUnphysical(enum.Enum):
  """What a simulation does when the watchdog finds something."""

  WARN = "warn"  # print a warning, list it in the summary and go on
  STOP = "stop"  # the same, and end the run at that frame


class Finding(enum.Enum):
  """What the watchdog reports."""

  BOND_BROKEN = "bond_broken"
  BOND_FORMED = "bond_formed"
  TOO_CLOSE = "too_close"
  HOT = "hot"
  ENERGY_DRIFT = "energy_drift"


@dataclasses.dataclass(frozen=True)
class Event:
  """One finding at one recorded step.

  Attributes:
    step: the MD step of the frame.
    finding: what was found.
    atoms: the atoms involved (0-based), empty for temperature and energy.
    text: a human-readable account, e.g. ``bond C0-O2 formed (1.54 A; 2.39 A at the start)``.
  """

  step: int
  finding: Finding
  atoms: tuple[int, ...]
  text: str

  def to_dict(self) -> dict[str, Any]:
    return {"step": self.step, "finding": self.finding.value, "atoms": list(self.atoms), "text": self.text}


class Watchdog:
  """Checks recorded frames against the start geometry; every finding is reported once.

  Args:
    numbers: [N] atomic numbers.
    positions: [N, 3] start positions in angstrom (Cartesian).
    temperature_k: the simulation's (initial or thermostat) temperature.
    cell: [3, 3] lattice vectors as rows of a periodic structure (None in free space).
    pbc: periodicity along each lattice vector (with ``cell``).
  """

  def __init__(self, numbers: np.ndarray, positions: np.ndarray, *, temperature_k: float,
               cell: np.ndarray | None = None, pbc: tuple[bool, bool, bool] | None = None):
    self.numbers = np.asarray(numbers)
    self._symbols = [ase.data.chemical_symbols[z] for z in self.numbers]
    self._radii = ase.data.covalent_radii[self.numbers]  # [N]
    self._cell = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    self._pbc = (False,) * 3 if cell is None else tuple(bool(p) for p in (pbc or (True,) * 3))
    self._max_temperature = TEMPERATURE_FACTOR * max(temperature_k, TEMPERATURE_FLOOR_K)
    self._start_positions = np.asarray(positions, np.float64)
    pairs, distances = self._pairs(self._start_positions, BOND_FACTOR)
    self._bonds = pairs  # [M, 2] bonded pairs (i < j) of the start geometry
    self._start_lengths = distances  # [M]
    self._bonded = {(int(i), int(j)) for i, j in pairs}
    self._temperatures: list[float] = []
    self._start_energy: float | None = None
    self._reported: set[tuple[Finding, tuple[int, ...]]] = set()
    # The largest relative change |d / d_start - 1| of a start bond over the frames checked, and
    # its bond: how far the run strays from a sound geometry even when nothing breaks.
    self.max_bond_change = 0.0
    self.max_bond_change_pair = ""

  def check(self, step: int, positions: np.ndarray, *, temperature_k: float,
            conserved_energy: float | None = None) -> list[Event]:
    """The new findings of the frame at ``step`` (positions [N, 3] in angstrom, Cartesian)."""
    positions = np.asarray(positions, np.float64)
    events = []
    lengths = self._distances(positions, self._bonds)
    if len(lengths):
      change = np.abs(lengths / self._start_lengths - 1.0)
      worst = int(np.argmax(change))
      if change[worst] > self.max_bond_change:
        self.max_bond_change = float(change[worst])
        self.max_bond_change_pair = self._pair(*self._bonds[worst])
    for (i, j), length, start in zip(self._bonds, lengths, self._start_lengths):
      if length > BREAK_FACTOR * self._radii[[i, j]].sum():
        events.append(self._event(step, Finding.BOND_BROKEN, (i, j),
                                  f"bond {self._pair(i, j)} broken ({length:.2f} A; {start:.2f} A at "
                                  "the start)"))
    pairs, distances = self._pairs(positions, BOND_FACTOR)
    for (i, j), distance in zip(pairs, distances):
      if distance < TOO_CLOSE_FACTOR * self._radii[[i, j]].sum():
        events.append(self._event(step, Finding.TOO_CLOSE, (i, j),
                                  f"atoms {self._pair(i, j)} only {distance:.2f} A apart"))
      elif (int(i), int(j)) not in self._bonded:
        start = self._distances(self._start_positions, np.array([[i, j]]))[0]
        events.append(self._event(step, Finding.BOND_FORMED, (i, j),
                                  f"bond {self._pair(i, j)} formed ({distance:.2f} A; {start:.2f} A "
                                  "at the start)"))
    events.append(self._temperature_event(step, temperature_k))
    events.append(self._energy_event(step, conserved_energy))
    return [e for e in events if e is not None]

  def _temperature_event(self, step: int, temperature_k: float) -> Event | None:
    self._temperatures = (self._temperatures + [temperature_k])[-TEMPERATURE_WINDOW_FRAMES:]
    mean = float(np.mean(self._temperatures))
    if mean <= self._max_temperature:
      return None
    return self._event(step, Finding.HOT, (), f"temperature {mean:.0f} K (mean of the last "
                       f"{len(self._temperatures)} frames) above {self._max_temperature:.0f} K")

  def _energy_event(self, step: int, energy: float | None) -> Event | None:
    if energy is None:
      return None
    if self._start_energy is None:
      self._start_energy = energy
    drift = abs(energy - self._start_energy) / len(self.numbers)
    if drift <= MAX_DRIFT_EV_PER_ATOM:
      return None
    return self._event(step, Finding.ENERGY_DRIFT, (), f"conserved energy drifted by {drift:.3f} "
                       f"eV/atom (limit {MAX_DRIFT_EV_PER_ATOM} eV/atom)")

  def _event(self, step: int, finding: Finding, atoms: tuple, text: str) -> Event | None:
    atoms = tuple(int(a) for a in atoms)
    if (finding, atoms) in self._reported:
      return None
    self._reported.add((finding, atoms))
    return Event(step=step, finding=finding, atoms=atoms, text=text)

  def _pairs(self, positions: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Pairs i < j closer than ``factor`` x their radii sum ([M, 2]) and their distances ([M]; the
    nearest image)."""
    i, j, d = primitive_neighbor_list("ijd", self._pbc, self._cell, positions, factor * self._radii)
    keep = i < j
    pairs, d = np.stack([i[keep], j[keep]], 1), d[keep]
    if not len(pairs):
      return pairs.reshape(0, 2), d
    # Several images of one pair in a small cell: the nearest counts.
    order = np.lexsort((d, pairs[:, 1], pairs[:, 0]))
    pairs, d = pairs[order], d[order]
    first = np.ones(len(pairs), bool)
    first[1:] = np.any(pairs[1:] != pairs[:-1], axis=1)
    return pairs[first], d[first]

  def _distances(self, positions: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """[M] nearest-image distances of the given pairs."""
    if not len(pairs):
      return np.zeros(0)
    _, lengths = find_mic(positions[pairs[:, 1]] - positions[pairs[:, 0]], self._cell, self._pbc)
    return lengths

  def _pair(self, i: int, j: int) -> str:
    return f"{self._symbols[i]}{i}-{self._symbols[j]}{j}"


def report_line(step: int, time_fs: float, events: list[Event]) -> str:
  """One line for the events of one frame."""
  return f"md step {step} ({time_fs:.1f} fs): " + "; ".join(e.text for e in events)
