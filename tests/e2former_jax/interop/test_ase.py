"""ASE calculator: equality with the model, charge/spin from info, BFGS, ASE MD, size buckets."""

from __future__ import annotations

import functools

import ase
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from ase.calculators.mixing import SumCalculator
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS
from e2f_testing import random_periodic_atoms

from e2former_jax.interop import ase as e2f_ase
from e2former_jax.interop.ase import E2FormerCalculator, size_bucket
from e2former_jax.neighbors import build_graph
from e2former_jax.potential import energy_and_forces
from e2former_jax.structure import Structure

SPRING_EV_PER_A2 = 20.0


class _Springs(Calculator):
  """Harmonic springs on every pair distance of a reference geometry (an elastic network).

  A random-weight model binds nothing: on its own a relaxation collapses or scatters the molecule.
  Added to it, the springs give a minimum near the reference geometry, and the relaxation still has
  to follow the model's energy and forces, of similar size.
  """

  implemented_properties = ["energy", "forces"]

  def __init__(self, reference: np.ndarray):
    super().__init__()
    d = np.linalg.norm(reference[:, None] - reference[None], axis=-1)
    self.pairs = np.argwhere(np.triu(np.ones_like(d, bool), k=1))  # [P, 2]
    self.d0 = d[self.pairs[:, 0], self.pairs[:, 1]]  # [P]

  def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
    super().calculate(atoms, properties, system_changes)
    x = self.atoms.positions
    vec = x[self.pairs[:, 0]] - x[self.pairs[:, 1]]  # [P, 3]
    d = np.linalg.norm(vec, axis=1)
    stretch = d - self.d0
    forces = np.zeros_like(x)
    pull = (-SPRING_EV_PER_A2 * stretch / d)[:, None] * vec
    np.add.at(forces, self.pairs[:, 0], pull)
    np.add.at(forces, self.pairs[:, 1], -pull)
    self.results = {"energy": 0.5 * SPRING_EV_PER_A2 * float(stretch @ stretch), "forces": forces}


@pytest.fixture
def ethanol() -> ase.Atoms:
  atoms = molecule("CH3CH2OH")  # 9 atoms: padded to the 12-slot bucket
  atoms.info.update(charge=0, spin=1)
  return atoms


def test_size_buckets():
  sizes = np.arange(1, 3000)
  buckets = np.array([size_bucket(int(n)) for n in sizes])
  assert (buckets >= sizes).all()
  assert (buckets <= np.maximum(e2f_ase.MIN_BUCKET, 1.5 * sizes)).all()  # at most 1/3 padding
  assert len(set(buckets.tolist())) == 18  # 8, 12, 16, 24, ..., 2048, 3072: O(log n) compilations
  assert [size_bucket(n) for n in (1, 8, 9, 12, 13, 17, 100)] == [8, 8, 12, 12, 16, 24, 128]


def test_calculator_equals_the_model(predictor, ethanol):
  """Energy = network + references; forces = the model's conservative forces; charge/spin from info."""
  calc = E2FormerCalculator(predictor)
  ethanol.calc = calc
  config = predictor.config
  model_fn = jax.jit(functools.partial(energy_and_forces, predictor.model))
  electrons = int(ethanol.numbers.sum())
  energies = []
  for charge, spin in ((0, 1), (1, 2 - electrons % 2)):
    ethanol.info.update(charge=charge, spin=spin)
    energy = ethanol.get_potential_energy()
    forces = ethanol.get_forces()
    graph = build_graph([Structure.from_ase(ethanol)], cutoff=config.cutoff,
                        max_neighbors=config.max_neighbors)
    e_model, f_model = jax.device_get(model_fn(predictor.params, jax.tree.map(jnp.asarray, graph)))
    expected = float(e_model[0]) + predictor.reference_energy(ethanol.numbers)
    assert abs(energy - expected) < 1e-4  # float32 network energy, float64 references
    assert ethanol.get_potential_energy(force_consistent=True) == energy  # free_energy
    np.testing.assert_allclose(forces, f_model, atol=2e-5)
    assert forces.shape == (9, 3) and forces.dtype == np.float64
    energies.append(energy)
  assert energies[0] != energies[1]  # the info change triggered a new calculation
  with pytest.raises(ValueError, match="no reference energy"):
    calc.get_potential_energy(molecule("CH3SH"))
  with pytest.raises(PropertyNotImplementedError):  # a molecule has no stress
    ethanol.get_stress()


def test_periodic_stress_is_the_strain_derivative(x64, predictor):
  """A small periodic cell (several images of each atom within the cutoff): the stress equals the
  finite-difference strain derivative of the calculator's own energy, in ASE's Voigt order and sign."""
  rng = np.random.default_rng(3)
  cell = np.array([[5.0, 0.0, 0.0], [0.7, 5.2, 0.0], [-0.4, 0.3, 5.4]])
  atoms = random_periodic_atoms(rng, cell, 10)
  atoms.calc = E2FormerCalculator(predictor.with_dtype(jnp.float64))
  stress = atoms.get_stress()  # Voigt: xx, yy, zz, yz, xz, xy
  assert stress.shape == (6,) and np.abs(stress).max() > 1e-4
  step, volume = 1e-5, atoms.get_volume()
  for component, (a, b) in enumerate(e2f_ase.VOIGT):
    energies = []
    for sign in (1, -1):
      strain = np.eye(3)
      strain[a, b] += sign * step / (2 if a != b else 1)
      strain[b, a] += sign * step / 2 if a != b else 0.0
      strained = atoms.copy()
      strained.set_cell(cell @ strain, scale_atoms=True)
      strained.calc = atoms.calc
      energies.append(strained.get_potential_energy())
    derivative = (energies[0] - energies[1]) / (2 * step) / volume
    np.testing.assert_allclose(stress[component], derivative, rtol=1e-6, atol=1e-9)


def test_bfgs_relaxes_a_distorted_molecule(predictor, ethanol):
  reference = ethanol.positions.copy()
  ethanol.positions += np.random.default_rng(0).normal(0.0, 0.15, reference.shape)
  ethanol.calc = SumCalculator([E2FormerCalculator(predictor), _Springs(reference)])
  start_energy = ethanol.get_potential_energy()
  start_fmax = np.linalg.norm(ethanol.get_forces(), axis=1).max()
  assert start_fmax > 1.0
  optimizer = BFGS(ethanol, logfile=None)
  assert optimizer.run(fmax=0.05, steps=200)
  assert np.linalg.norm(ethanol.get_forces(), axis=1).max() < 0.05
  assert ethanol.get_potential_energy() < start_energy - 0.1
  # Still the molecule: every pair distance within 0.25 A of its reference value.
  springs = _Springs(reference)
  d = np.linalg.norm(ethanol.positions[springs.pairs[:, 0]] - ethanol.positions[springs.pairs[:, 1]],
                     axis=1)
  assert np.abs(d - springs.d0).max() < 0.25


def test_ase_md_compiles_once_and_conserves_energy(predictor, ethanol):
  ethanol.calc = SumCalculator([E2FormerCalculator(predictor), _Springs(ethanol.positions.copy())])
  MaxwellBoltzmannDistribution(ethanol, temperature_K=300, rng=np.random.default_rng(1))
  Stationary(ethanol)
  dyn = VelocityVerlet(ethanol, timestep=0.2 * ase.units.fs, logfile=None)
  totals = [ethanol.get_total_energy()]
  compiled = e2f_ase._energy_and_forces._cache_size()
  dyn.attach(lambda: totals.append(ethanol.get_total_energy()), interval=10)
  dyn.run(200)
  assert e2f_ase._energy_and_forces._cache_size() == compiled  # no recompilation during MD
  # float32 forces, 40 fs of a stiff molecule: fluctuation ~1e-4 eV/atom (drift bound 1e-3).
  assert np.ptp(totals) / len(ethanol) < 1e-3, np.ptp(totals)
