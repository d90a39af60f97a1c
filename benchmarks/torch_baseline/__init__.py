"""Our own PyTorch implementation of E2Former-V2, the baseline of ``benchmarks/compare_torch.py``.

Optional (needs torch; nothing in ``e2former_jax`` imports it). Mirrors ``e2former_jax.nn`` module
for module; :func:`flax_to_torch_state_dict` converts the Flax parameters.
"""

from benchmarks.torch_baseline.convert import flax_to_torch_state_dict, graph_to_torch
from benchmarks.torch_baseline.model import (
    E2FormerTorch,
    ModelOutput,
    TorchGraph,
    energy_and_forces,
)

__all__ = [
    "E2FormerTorch",
    "ModelOutput",
    "TorchGraph",
    "energy_and_forces",
    "flax_to_torch_state_dict",
    "graph_to_torch",
]
