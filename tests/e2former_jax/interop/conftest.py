"""Fixtures of the interop tests: a very small random-weight model with reference energies."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.config import tiny_config
from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import build_graph
from e2former_jax.nn.model import E2Former
from e2former_jax.structure import Structure

# Smaller than tiny_config (one block, 8 channels): every test here compiles the model, and compile
# time, not run time, is what these tests cost on a CPU.
MICRO = dict(num_layers=1, channels=8, num_heads=2, head_dim=4, num_rbf=8, max_neighbors=8,
             edge_hidden=8, type_embed_dim=4)
# eV per element, of the size a fit to real data gives, so totals are large as in real use.
REFERENCES = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}


@pytest.fixture(scope="session")
def cluster() -> tuple[np.ndarray, np.ndarray]:
  """(numbers [6], positions [6, 3]): every pair within the 4.5 A cutoff, none closer than 1 A."""
  numbers = np.array([6, 8, 7, 6, 1, 1])
  positions = np.array([[0.0, 0.0, 0.0], [1.4, 0.0, 0.0], [0.0, 1.4, 0.0], [0.0, 0.0, 1.5],
                        [1.0, 1.0, 1.0], [-0.9, -0.6, 0.2]])
  return numbers, positions


@pytest.fixture(scope="session")
def predictor(cluster) -> Predictor:
  """The MICRO model with random weights and REFERENCES (initialised once: it compiles)."""
  config = tiny_config(**MICRO)
  model = E2Former(config)
  graph = build_graph([Structure(*cluster)], cutoff=config.cutoff, max_neighbors=config.max_neighbors)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, graph))
  return Predictor(model=model, params=params, reference_energies=REFERENCES)
