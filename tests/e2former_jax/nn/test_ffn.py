"""S3FeedForward broadcasts each degree's gate over its rows."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from e2f_testing import per_atom_indexing

from e2former_jax.nn.ffn import S3FeedForward

NUM_ATOMS = 7  # no other dimension here equals it
LMAX, CHANNELS = 2, 6


def test_no_per_atom_gather_or_scatter():
  """An index array repeating the gates over rows was a gather of [N, S-1, C] and a scatter-add in
  the backward."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(NUM_ATOMS, (LMAX + 1) ** 2, CHANNELS)),
                  jnp.float32)
  assert per_atom_indexing(S3FeedForward(CHANNELS), x) == []
