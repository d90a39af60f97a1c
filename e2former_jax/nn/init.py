"""Parameter initialisers (docs/model.md §9.4), named so that every module uses the same ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# nn.Linear weights: Kaiming-uniform U(+-sqrt(6 / fan_in)) (authors' global re-initialisation).
kaiming_uniform = jax.nn.initializers.variance_scaling(2.0, "fan_in", "uniform")

# Embedding tables start tiny so that atom types perturb, rather than dominate, the radial signal.
EMBEDDING_INIT_SCALE = 1e-3


def embedding_init(key, shape, dtype=jnp.float32):
  return jax.random.uniform(key, shape, dtype, -EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE)


def fan_in_uniform(key, shape, dtype=jnp.float32):
  """U(+-1/sqrt(fan_in)) for SO(3)-linear weights of shape [..., out, in]."""
  bound = 1.0 / jnp.sqrt(shape[-1])
  return jax.random.uniform(key, shape, dtype, -bound, bound)
