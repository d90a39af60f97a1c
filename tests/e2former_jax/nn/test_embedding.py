"""The power spectrum of the initial features against the addition theorem of spherical harmonics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial import legendre

from e2former_jax import so3
from e2former_jax.nn.embedding import PowerSpectrum

LMAX, CHANNELS, NUM_ATOMS, NUM_NEIGHBOURS = 2, 3, 4, 5


def test_power_spectrum_is_a_sum_of_legendre_polynomials_over_neighbour_pairs(rng):
  # h[(l, m), c] = sum_k w[k, c] Y_lm(r_k); with component normalisation the addition theorem gives
  # sum_m h[(l, m), c]^2 = sum_{k, k'} w[k, c] w[k', c] (2l + 1) P_l(cos angle(r_k, r_k')).
  vectors = rng.normal(size=(NUM_ATOMS, NUM_NEIGHBOURS, 3))
  weights = rng.normal(size=(NUM_ATOMS, NUM_NEIGHBOURS, CHANNELS))
  sh = np.asarray(so3.spherical_harmonics(jnp.asarray(vectors), LMAX, normalize=True), np.float64)
  x = jnp.asarray(np.einsum("nks,nkc->nsc", sh, weights), jnp.float32)
  unit = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
  cosines = np.einsum("nki,nji->nkj", unit, unit)
  expected = [np.einsum("nkc,nkj,njc->nc", weights,
                        (2 * l + 1) * legendre.legval(cosines, np.eye(l + 1)[l]), weights)
              for l in range(1, LMAX + 1)]
  expected = np.concatenate(expected, axis=-1)  # [N, lmax * C], degree-major
  # With W = identity and b = 0 the map returns the squared norms themselves.
  module = PowerSpectrum(LMAX * CHANNELS)
  params = module.init(jax.random.key(0), x)
  np.testing.assert_array_equal(params["params"]["mix"]["kernel"], 0.0)
  params = jax.tree.map(jnp.zeros_like, params)
  params["params"]["mix"]["kernel"] = jnp.eye(LMAX * CHANNELS)
  np.testing.assert_allclose(module.apply(params, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
