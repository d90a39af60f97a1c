"""The trajectory file of a simulation: extended XYZ, one frame appended per recorded step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TRAJECTORY_FILENAME = "trajectory.extxyz"


def append_frame(path: Path, species: np.ndarray, observation: dict[str, Any], row: dict[str, Any],
                 cell: np.ndarray | None) -> None:
  """Appends one frame: positions, momenta, forces and the total potential energy (ASE's
  single-point results), the rest of ``row`` (step, time, kinetic and total energy, temperature)
  in the frame's info.

  Args:
    path: the trajectory file.
    species: [N] atomic numbers.
    observation: the frame's "position", "momentum" and "forces" ([N, 3] each, Cartesian).
    row: the frame's scalars, "potential_energy" among them (eV).
    cell: [3, 3] lattice vectors as rows for a periodic cell, else None.
  """
  import ase
  import ase.io
  from ase.calculators.singlepoint import SinglePointCalculator

  atoms = ase.Atoms(numbers=species, positions=np.asarray(observation["position"], np.float64),
                    momenta=np.asarray(observation["momentum"], np.float64), cell=cell,
                    pbc=cell is not None)
  atoms.info.update({k: v for k, v in row.items() if k != "potential_energy"})
  atoms.calc = SinglePointCalculator(atoms, energy=row["potential_energy"],
                                     forces=np.asarray(observation["forces"], np.float64))
  ase.io.write(path, atoms, format="extxyz", append=True)
