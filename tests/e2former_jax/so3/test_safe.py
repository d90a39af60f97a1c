"""safe_norm: the Euclidean norm, with finite derivatives of every order at the zero vector."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax import so3


def test_matches_norm_and_its_gradient_away_from_zero(rng):
  x = rng.normal(size=(5, 3)).astype(np.float32)
  np.testing.assert_allclose(so3.safe_norm(x), np.linalg.norm(x, axis=-1), rtol=1e-6)
  np.testing.assert_allclose(
      so3.safe_norm(x, axis=0, keepdims=True), np.linalg.norm(x, axis=0, keepdims=True), rtol=1e-6
  )
  grad = jax.grad(lambda x: jnp.sum(so3.safe_norm(x)))(x)
  np.testing.assert_allclose(grad, x / np.linalg.norm(x, axis=-1, keepdims=True), rtol=1e-6)


def test_value_gradient_and_hessian_are_finite_at_zero():
  zero = jnp.zeros(3)
  with jax.debug_nans(True):
    assert so3.safe_norm(zero) == 0
    np.testing.assert_array_equal(jax.grad(so3.safe_norm)(zero), np.zeros(3))
    assert np.all(np.isfinite(jax.hessian(so3.safe_norm)(zero)))
