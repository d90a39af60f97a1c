"""E2Former-V2 interatomic potential in JAX/Flax.

Public API (the implementation lives in the submodules named beside each import):
"""

from e2former_jax.config import AttentionImpl
from e2former_jax.config import E2FormerConfig
from e2former_jax.config import MessagePath
from e2former_jax.config import Precision
from e2former_jax.config import paper_config
from e2former_jax.config import tiny_config
from e2former_jax.graph import Graph
from e2former_jax.neighbors import build_graph
from e2former_jax.neighbors import cell_grid
from e2former_jax.neighbors import device_neighbor_list
from e2former_jax.neighbors import neighbor_list
from e2former_jax.nn.model import E2Former
from e2former_jax.nn.model import ModelOutput
from e2former_jax.potential import energy_and_forces
from e2former_jax.potential import energy_forces_stress
from e2former_jax.structure import Structure
from e2former_jax.structure import validate_structure

__all__ = [
    "AttentionImpl",
    "E2Former",
    "E2FormerConfig",
    "Graph",
    "MessagePath",
    "ModelOutput",
    "Precision",
    "Structure",
    "build_graph",
    "cell_grid",
    "device_neighbor_list",
    "energy_and_forces",
    "energy_forces_stress",
    "neighbor_list",
    "paper_config",
    "tiny_config",
    "validate_structure",
]
