"""The start of a simulation: the structure relaxed on the model's own energy surface.

A geometry from a dataset is rarely at a minimum of the model's energy (the built-in data holds
thermally displaced and MD snapshots: ethanol's first conformer sits 0.9 eV above the minimum of
the main command's model, with forces up to 6 eV/Å). Started from there, an NVE run turns that
energy into heat within tens of femtoseconds (300 K becomes ~600 K) and bonds stretch by a third;
started from the relaxed geometry with the same velocities, it stays near 300 K / 2 and no bond
changes by more than 12 %. So ``e2former md`` relaxes first, with ASE's FIRE on the model's forces
through the ASE calculator (positions only; a periodic cell is kept).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from e2former_jax.interop.predictor import Predictor
from e2former_jax.structure import Structure

# Relaxed once no force component exceeds this (eV/Å): well below thermal forces at 300 K for a
# molecule (~1 eV/Å), so what is left is heat, not stored strain.
DEFAULT_FMAX = 0.05
# FIRE steps at most: ethanol from its dataset geometry (forces up to 6 eV/Å) took 44; a relaxation
# that has not converged by then starts the simulation anyway (the summary says so).
DEFAULT_MAX_STEPS = 500


def relax(predictor: Predictor, structure: Structure, *, fmax: float = DEFAULT_FMAX,
          max_steps: int = DEFAULT_MAX_STEPS) -> tuple[Structure, dict[str, Any]]:
  """``structure`` with its positions relaxed by FIRE, and what the relaxation did.

  Returns:
    (the relaxed structure, {"steps", "converged", "energy_drop_eV", "initial_fmax_eV_per_A",
    "final_fmax_eV_per_A", "rmsd_A"}).
  """
  import ase
  from ase.optimize import FIRE

  from e2former_jax.interop.ase import E2FormerCalculator

  atoms = ase.Atoms(numbers=structure.numbers, positions=structure.positions,
                    cell=structure.cell if structure.periodic else None,
                    pbc=structure.pbc if structure.periodic else False)
  atoms.info.update(charge=structure.charge, spin=structure.spin)
  atoms.calc = E2FormerCalculator(predictor)
  start_energy = atoms.get_potential_energy()
  start_fmax = float(np.abs(atoms.get_forces()).max())
  optimizer = FIRE(atoms, logfile=None)
  converged = bool(optimizer.run(fmax=fmax, steps=max_steps))
  positions = atoms.get_positions()
  record = {"steps": int(optimizer.nsteps), "converged": converged,
            "energy_drop_eV": float(start_energy - atoms.get_potential_energy()),
            "initial_fmax_eV_per_A": start_fmax,
            "final_fmax_eV_per_A": float(np.abs(atoms.get_forces()).max()),
            "rmsd_A": float(np.sqrt(((positions - structure.positions) ** 2).sum(1).mean()))}
  return dataclasses.replace(structure, positions=positions), record
