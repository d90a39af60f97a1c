"""ASE calculator: energies, forces and (periodic cells) stresses of a trained E2Former for ``ase.Atoms``.

Typical use::

  from e2former_jax.interop.ase import E2FormerCalculator
  atoms.calc = E2FormerCalculator(predictor)        # or train.checkpoint.load_calculator(run_dir)
  atoms.info.update(charge=0, spin=1)               # total charge, multiplicity 2S + 1
  ase.optimize.BFGS(atoms).run(fmax=0.05)

The structure is checked (:func:`~e2former_jax.structure.validate_structure`), its neighbour slots
are searched on the host (:func:`~e2former_jax.neighbors.build_graph`) and the atoms are padded to a
size bucket, so one compiled executable serves every structure of that bucket: MD and relaxations
compile once. Energies are in eV (network energy plus the reference energies of the composition,
charge and spin, added in float64), forces in eV/angstrom (conservative, -dE/dx). Atoms with ``pbc`` are periodic cells
(lattice images are neighbours, any cell size); they also get the stress in eV/A^3 (ASE's Voigt
order xx, yy, zz, yz, xz, xy and sign: positive under tension). Molecules have no stress.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import build_graph
from e2former_jax.potential import energy_and_forces, energy_forces_stress
from e2former_jax.structure import Structure, validate_structure

# Smallest size bucket (atom slots): below it padding costs nothing worth another compilation.
MIN_BUCKET = 8
# Buckets grow geometrically by this factor (powers of two and their 1.5 multiples), so at most
# a third of the atom slots are padding and a system of n atoms needs O(log n) compilations.
BUCKET_STEPS = (1.0, 1.5)
# Key under which a change of charge or spin is reported to ASE's state check.
CHARGE_SPIN_CHANGE = "charge_spin"

# Shared by every calculator: the model (hashable by its config) is static, so all calculators of
# one architecture reuse one executable per size bucket.
_energy_and_forces = jax.jit(energy_and_forces, static_argnums=0)
_energy_forces_stress = jax.jit(energy_forces_stress, static_argnums=0)
# ASE's Voigt order of the six independent stress components.
VOIGT = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def size_bucket(num_atoms: int) -> int:
  """Atom slots for a structure of ``num_atoms``: the next bucket of 2^p x {1, 1.5}, at least MIN_BUCKET."""
  if num_atoms <= MIN_BUCKET:
    return MIN_BUCKET
  power = 2 ** math.floor(math.log2(num_atoms))
  return next(int(power * step) for step in BUCKET_STEPS + (2.0,) if num_atoms <= power * step)


def charge_and_spin(atoms) -> tuple[int, int]:
  """Total charge and multiplicity from ``atoms.info`` (``charge`` default 0, ``spin`` default 1)."""
  return int(atoms.info.get("charge", 0)), int(atoms.info.get("spin", 1))


class E2FormerCalculator(Calculator):
  """Energy, free energy (equal to the energy), forces and (periodic) stress from a trained E2Former.

  Charge and spin multiplicity come from ``atoms.info["charge"]`` and ``atoms.info["spin"]``
  (defaults 0 and 1); changing them triggers a new calculation.

  Args:
    predictor: network, weights and reference energies.
    **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (``label``, ``directory``).
  """

  implemented_properties = ["energy", "free_energy", "forces", "stress"]

  def __init__(self, predictor: Predictor, **kwargs):
    super().__init__(**kwargs)
    predictor.warn_if_untrained_forces("ASE calculator")
    self.predictor = predictor

  def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
    changes = super().check_state(atoms, tol)
    if self.atoms is not None and charge_and_spin(atoms) != charge_and_spin(self.atoms):
      changes.append(CHARGE_SPIN_CHANGE)
    return changes

  def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
    super().calculate(atoms, properties, system_changes)
    atoms = self.atoms
    charge, spin = charge_and_spin(atoms)
    structure = Structure.from_ase(atoms, charge=charge, spin=spin)
    validate_structure(structure, num_species=self.predictor.config.num_species)
    numbers = self.predictor.check_species(structure.numbers, where="ase.Atoms")
    config = self.predictor.config
    n = len(atoms)
    graph = build_graph([structure], cutoff=config.cutoff, max_neighbors=config.max_neighbors,
                        reference_slots=config.reference_slots, num_nodes=size_bucket(n),
                        num_molecules=1,
                        dtype=jax.dtypes.canonicalize_dtype(np.float64))
    model, params = self.predictor.model, self.predictor.params
    if graph.periodic:
      energy, forces, stress = jax.device_get(_energy_forces_stress(model, params, graph))
    else:
      (energy, forces), stress = jax.device_get(_energy_and_forces(model, params, graph)), None
    total = float(energy[0]) + self.predictor.reference_energy(numbers, charge, spin)
    self.results = {"energy": total, "free_energy": total,
                    "forces": np.asarray(forces[:n], dtype=np.float64)}
    if stress is not None:
      self.results["stress"] = np.array([stress[0, a, b] for a, b in VOIGT], dtype=np.float64)
