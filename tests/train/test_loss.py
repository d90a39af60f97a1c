"""The loss terms of docs/model.md §12.2 and the evaluation error sums on a hand-made padded batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.graph import Graph
from train.loss import loss_terms, molecule_error_sums
from train.run_config import EnergyLoss, ForceLoss, LossConfig

# Two real molecules (2 and 3 atoms), one padded atom and one padded molecule slot.
MOLECULE = np.array([0, 0, 1, 1, 1, 2])
NODE_MASK = np.array([1, 1, 1, 1, 1, 0], bool)
MOL_MASK = np.array([1, 1, 0], bool)


def graph() -> Graph:
  n, k, b = 6, 2, 3
  return Graph(positions=jnp.zeros((n, 3)), species=jnp.asarray(np.where(NODE_MASK, 6, 0)),
               node_mask=jnp.asarray(NODE_MASK), molecule_index=jnp.asarray(MOLECULE),
               nbr_idx=jnp.full((n, k), n), nbr_mask=jnp.zeros((n, k), bool), nbr_shift=jnp.zeros((n, k, 3)),
               charge=jnp.zeros(b, jnp.int32), spin=jnp.ones(b, jnp.int32),
               molecule_mask=jnp.asarray(MOL_MASK))


def data():
  rng = np.random.default_rng(0)
  energy, target_energy = rng.normal(size=3), rng.normal(size=3)
  forces, target_forces = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
  forces[~NODE_MASK] = 1e3  # garbage on padding must not count
  energy[~MOL_MASK] = 1e3
  return energy, forces, target_energy, target_forces


@pytest.mark.parametrize("energy_mode", list(EnergyLoss))
@pytest.mark.parametrize("force_mode", list(ForceLoss))
def test_loss_terms_match_the_spec_formulas(energy_mode, force_mode):
  e, f, te, tf = data()
  config = LossConfig(energy=energy_mode, force=force_mode, energy_weight=2.0, force_weight=3.0)
  loss, terms = jax.jit(loss_terms, static_argnums=0)(config, graph(), *map(jnp.asarray, (e, f, te, tf)))
  sizes = np.array([2, 3])
  de = np.abs(e[:2] - te[:2])
  want_e = (de / sizes).mean() if energy_mode is EnergyLoss.PER_ATOM else de.mean()
  norms = np.linalg.norm(f[:5] - tf[:5], axis=1)
  want_f = norms.sum() / 2 if force_mode is ForceLoss.L2MAE else norms.mean()
  np.testing.assert_allclose(terms["energy_loss"], want_e, rtol=1e-6)
  np.testing.assert_allclose(terms["force_loss"], want_f, rtol=1e-6)
  np.testing.assert_allclose(loss, 2.0 * want_e + 3.0 * want_f, rtol=1e-6)


def test_gradient_is_finite_at_zero_force_error():
  e, f, te, tf = data()
  tf[:] = f  # |dF| = 0 everywhere: the plain norm's gradient would be NaN
  loss = lambda x: loss_terms(LossConfig(), graph(), jnp.asarray(e), x, jnp.asarray(te), jnp.asarray(tf))[0]
  grad = jax.jit(jax.grad(loss))(jnp.asarray(f))
  assert np.isfinite(np.asarray(grad)).all()


def test_molecule_error_sums():
  e, f, te, tf = data()
  sums = jax.jit(molecule_error_sums)(graph(), *map(jnp.asarray, (e, f, te, tf)))
  np.testing.assert_allclose(sums["atoms"], [2, 3, 0])
  np.testing.assert_allclose(sums["energy_abs"], [abs(e[0] - te[0]), abs(e[1] - te[1]), 0], rtol=1e-6)
  diff = f - tf
  np.testing.assert_allclose(sums["force_abs"], [np.abs(diff[:2]).sum(), np.abs(diff[2:5]).sum(), 0],
                             rtol=1e-6)
  np.testing.assert_allclose(sums["force_l2"], [np.linalg.norm(diff[:2], axis=1).sum(),
                                                np.linalg.norm(diff[2:5], axis=1).sum(), 0], rtol=1e-6)
