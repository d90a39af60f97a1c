"""SO3LinearToScalar reads each degree's rows as a static slice."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from e2f_testing import per_atom_indexing

from e2former_jax.nn.linear import SO3LinearToScalar

NUM_ATOMS = 7  # no other dimension here equals it
LMAX, CHANNELS, FEATURES, HIDDEN = 2, 6, 8, 4


def test_no_per_atom_gather_or_scatter():
  """A boolean row mask left a gather per degree and a scatter-add over [N, S, P] in the backward
  (the `wrapped_scatter` kernels of docs/performance.md §4)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(NUM_ATOMS, (LMAX + 1) ** 2, CHANNELS)),
                  jnp.float32)
  assert per_atom_indexing(SO3LinearToScalar(FEATURES, HIDDEN), x) == []
