"""Spherical harmonics against e3nn-jax (component normalisation, y polar) and their properties."""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import so3

LMAX = 4

# Jitted once per module: eager op-by-op dispatch costs seconds on CPU.
_spherical_harmonics = jax.jit(so3.spherical_harmonics, static_argnums=(1, 2))


@pytest.mark.parametrize("normalize", [True, False])
def test_matches_e3nn_jax(x64, rng, normalize):
  vectors = rng.normal(size=(7, 3)) * rng.uniform(0.3, 2.0, size=(7, 1))
  ours = _spherical_harmonics(jnp.asarray(vectors), LMAX, normalize)
  reference = e3nn.spherical_harmonics(
      e3nn.Irreps.spherical_harmonics(LMAX), vectors, normalize, normalization="component"
  ).array
  assert ours.shape == (7, so3.num_rows(LMAX))
  assert ours.dtype == jnp.float64
  np.testing.assert_allclose(ours, reference, rtol=1e-12, atol=1e-12)


def test_low_degrees_match_the_closed_forms_of_spec_section_1(x64):
  x, y, z = 0.3, -1.1, 0.7
  ys = _spherical_harmonics(jnp.array([x, y, z]), 2, normalize=False)
  s15, s5 = np.sqrt(15), np.sqrt(5)
  expected = [1, np.sqrt(3) * x, np.sqrt(3) * y, np.sqrt(3) * z, s15 * x * z, s15 * x * y,
              s5 * (y**2 - (x**2 + z**2) / 2), s15 * y * z, s15 / 2 * (z**2 - x**2)]
  np.testing.assert_allclose(ys, expected, rtol=1e-14)


def test_component_normalisation_and_homogeneity(x64, rng):
  vectors = jnp.asarray(rng.normal(size=(5, 3)))
  unit = _spherical_harmonics(vectors, LMAX, normalize=True)
  raw = _spherical_harmonics(vectors, LMAX, normalize=False)
  norms = np.linalg.norm(vectors, axis=-1)
  for l in range(LMAX + 1):
    block = so3.degree_slice(l)
    np.testing.assert_allclose(np.sum(unit[:, block] ** 2, axis=-1), 2 * l + 1, rtol=1e-12)
    np.testing.assert_allclose(raw[:, block], unit[:, block] * norms[:, None] ** l, rtol=1e-11)


def test_float32_in_float32_out():
  ys = _spherical_harmonics(jnp.ones((2, 3), jnp.float32), 3, normalize=True)
  assert ys.dtype == jnp.float32


def test_zero_vector_is_finite_with_finite_gradient():
  with jax.debug_nans(True):
    ys = _spherical_harmonics(jnp.zeros(3), LMAX, normalize=True)
    np.testing.assert_array_equal(ys, np.eye(1, so3.num_rows(LMAX))[0])
    jac = jax.jacobian(lambda v: _spherical_harmonics(v, LMAX, normalize=True))(jnp.zeros(3))
  assert np.all(np.isfinite(jac))


def test_bad_shape_raises():
  with pytest.raises(ValueError, match="3"):
    so3.spherical_harmonics(jnp.zeros((4, 2)), 2, normalize=True)
