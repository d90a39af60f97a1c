"""Wigner D-matrices against e3nn-jax, and Y(R v) = D(R) Y(v)."""

from __future__ import annotations

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import so3

LMAX = 4

# Jitted once per module: eager op-by-op dispatch costs seconds on CPU.
_wigner_d = jax.jit(so3.wigner_d, static_argnums=0)
_wigner_d_from_angles = jax.jit(so3.wigner_d_from_angles, static_argnums=0)
_wigner_d_block_diag = jax.jit(so3.wigner_d_block_diag, static_argnums=0)
_spherical_harmonics = jax.jit(so3.spherical_harmonics, static_argnums=(1, 2))


@pytest.fixture
def angles(rng):
  return tuple(jnp.asarray(rng.uniform(0, 2 * np.pi, size=4)) for _ in range(3))


def test_rotation_matrix_from_angles_matches_e3nn(x64, angles):
  rotation = so3.rotation_matrix_from_angles(*angles)
  np.testing.assert_allclose(rotation, e3nn.angles_to_matrix(*angles), atol=1e-14)


@pytest.mark.parametrize("l", range(LMAX + 1))
def test_matches_e3nn_from_matrix_and_from_angles(x64, angles, l):
  rotation = e3nn.angles_to_matrix(*angles)
  reference = e3nn.Irrep(l, 1).D_from_angles(*angles)
  np.testing.assert_allclose(_wigner_d(l, rotation), reference, atol=1e-13)
  np.testing.assert_allclose(_wigner_d_from_angles(l, *angles), reference, atol=1e-13)
  from_matrix = e3nn.Irrep(l, 1).D_from_matrix(rotation)
  np.testing.assert_allclose(_wigner_d(l, rotation), from_matrix, atol=1e-13)


def test_rotates_spherical_harmonics_and_is_a_representation(x64, rng, angles):
  rotations = so3.rotation_matrix_from_angles(*angles)  # [4, 3, 3]
  vectors = jnp.asarray(rng.normal(size=(4, 3)))
  d = _wigner_d_block_diag(LMAX, rotations)  # [4, 25, 25]
  rotated_vectors = jnp.einsum("nij,nj->ni", rotations, vectors)
  rotated = _spherical_harmonics(rotated_vectors, LMAX, normalize=False)
  expected = jnp.einsum("nij,nj->ni", d, _spherical_harmonics(vectors, LMAX, normalize=False))
  np.testing.assert_allclose(rotated, expected, atol=1e-12)
  identity = np.broadcast_to(np.eye(so3.num_rows(LMAX)), d.shape)
  np.testing.assert_allclose(jnp.einsum("nji,njk->nik", d, d), identity, atol=1e-13)
  product = _wigner_d(3, rotations[0] @ rotations[1])
  expected = _wigner_d(3, rotations[0]) @ _wigner_d(3, rotations[1])
  np.testing.assert_allclose(product, expected, atol=1e-13)


def test_degree_one_is_the_rotation_matrix(angles):
  rotations = so3.rotation_matrix_from_angles(*angles)
  np.testing.assert_allclose(_wigner_d(1, rotations), rotations, atol=1e-6)
  assert _wigner_d(2, rotations).dtype == jnp.float32


def test_bad_shape_raises():
  with pytest.raises(ValueError, match="3, 3"):
    _wigner_d(2, jnp.zeros((3, 4)))
