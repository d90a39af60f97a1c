"""Predictor: total energies with charge/spin references, the warning for untrained -dE/dx."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.config import Precision
from e2former_jax.interop.ase import E2FormerCalculator
from e2former_jax.interop.predictor import DirectForcesOnlyWarning
from e2former_jax.neighbors import build_graph
from e2former_jax.reference_energies import ReferenceEnergies, UnfittedStateWarning
from e2former_jax.structure import Structure

REFERENCES = ReferenceEnergies(elements={1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0},
                               charges={1: 7.3, -1: -2.1}, multiplicities={2: 1.7})


def test_total_energy_adds_composition_charge_and_spin_references(predictor, cluster):
  numbers, positions = cluster
  pred = dataclasses.replace(predictor, reference_energies=REFERENCES)
  # 6 atoms of 35 electrons: a neutral doublet, a closed-shell cation and anion.
  structures = [Structure(numbers, positions + 10.0 * i, charge=q, spin=s)
                for i, (q, s) in enumerate([(0, 2), (1, 1), (-1, 1)])]
  graph = jax.tree.map(np.asarray, build_graph(structures, cutoff=pred.config.cutoff,
                                               max_neighbors=pred.config.max_neighbors,
                                               num_molecules=4))
  total = np.asarray(jax.jit(pred.total_energy)(graph))
  network = np.asarray(pred.model_energy(graph))
  for b, s in enumerate(structures):
    expected = network[b] + REFERENCES.energy(s.numbers, s.charge, s.spin)
    assert total[b] == pytest.approx(expected, abs=2e-3)  # float32 totals of ~-6 keV
  assert REFERENCES.energy(numbers, 1, 1) - REFERENCES.energy(numbers, 0, 1) == pytest.approx(7.3)
  assert total[3] == 0.0  # padding molecule slot


def test_direct_only_models_warn_where_forces_are_used(predictor, cluster):
  import ase
  from jax_md import space

  from e2former_jax.interop import jax_md as e2f_md

  numbers, positions = cluster
  direct = dataclasses.replace(predictor, conservative_forces_trained=False)
  with pytest.warns(DirectForcesOnlyWarning, match="ASE calculator: .*trained with direct forces"):
    E2FormerCalculator(direct)
  displacement, _ = space.free()
  with pytest.warns(DirectForcesOnlyWarning, match="JAX MD energy function"):
    e2f_md.e2former_energy(displacement, direct, numbers)
  with warnings.catch_warnings():
    warnings.simplefilter("error", DirectForcesOnlyWarning)
    for trained in (True, None):  # conservative training, or unknown (a hand-built predictor)
      calc = E2FormerCalculator(dataclasses.replace(predictor, conservative_forces_trained=trained))
      e2f_md.e2former_energy(displacement, calc.predictor, numbers)
  atoms = ase.Atoms(numbers=numbers, positions=positions)
  atoms.info.update(charge=3, spin=1)
  atoms.calc = E2FormerCalculator(dataclasses.replace(predictor, reference_energies=REFERENCES))
  with pytest.warns(UnfittedStateWarning, match="no reference energy offset for total charge 3"):
    atoms.get_potential_energy()


def test_compute_choices_change_how_not_what(predictor, cluster):
  """By default a predictor plans its memory per structure; explicit choices replace the plan."""
  assert predictor.config.auto_memory
  fixed = predictor.with_compute(remat=True, edge_chunk_atoms=2, auto_memory=False)
  assert (fixed.config.remat, fixed.config.edge_chunk_atoms, fixed.config.auto_memory) == (True, 2, False)
  assert fixed.params is predictor.params
  graph = build_graph([Structure(*cluster)], cutoff=predictor.config.cutoff,
                      max_neighbors=predictor.config.max_neighbors)
  np.testing.assert_allclose(fixed.model_energy(graph), predictor.model_energy(graph), rtol=1e-5)


def test_double_precision_means_no_bfloat16_anywhere(predictor):
  """with_dtype(float64) is the whole computation in float64: the weights cast, and the mixed
  precision that AUTO would choose on a GPU turned off (Precision.FULL)."""
  assert predictor.config.precision is Precision.AUTO
  with jax.enable_x64(True):
    double = predictor.with_dtype(jnp.float64)
    assert double.config.precision is Precision.FULL
    floats = [p for p in jax.tree.leaves(double.params) if jnp.issubdtype(p.dtype, jnp.floating)]
    assert floats and all(p.dtype == jnp.float64 for p in floats)
