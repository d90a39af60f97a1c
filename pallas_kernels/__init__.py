"""Pallas (Triton) kernels for E2Former-V2's node-centric attention (imports: jax, numpy, jaxtyping).

Public ops (each with a pure-jnp ``*_reference`` of the same signature and annotations):

* ``message_attention``: fused q.k logits, envelope-weighted softmax with a sink and the
  aggregation of a first-order tensor product ``sum_k a T(v_j, r_ij)``, gathering only v_j per
  edge (three moments, coupling applied per node).
* ``edge_dot``, ``gather_sum``, ``scatter_sum``: the neighbour gather-reduce primitives its second
  order is built from; closed under differentiation, so reverse-mode derivatives of any order
  stay in Pallas kernels with linear memory.
* ``radial_mlp``: the per-edge radial MLP (Gaussian basis, three products, two layer norms, an
  optional contraction over the slots) in one forward kernel; ``radial_mlp_geometry_vjp``: the
  cotangents of its edge lengths and slot weights (what forces need) in one kernel that recomputes
  the forward.
* ``attention_weights_vjp``: the softmax weights and their VJP fused in one kernel (the rest of
  that backward); ``attention_weights`` is the plain jnp definition of the weights.
"""

from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.neighbor_ops import edge_dot
from pallas_kernels.neighbor_ops import edge_dot_reference
from pallas_kernels.neighbor_ops import gather_sum
from pallas_kernels.neighbor_ops import gather_sum_reference
from pallas_kernels.neighbor_ops import scatter_sum
from pallas_kernels.neighbor_ops import scatter_sum_reference
from pallas_kernels.attention_weights import attention_weights
from pallas_kernels.attention_weights import attention_weights_vjp
from pallas_kernels.attention_weights import attention_weights_vjp_reference
from pallas_kernels.message_attention import message_attention
from pallas_kernels.message_attention import message_attention_reference
from pallas_kernels.radial_mlp import RadialMLPBlocks
from pallas_kernels.radial_mlp import RadialMLPWeights
from pallas_kernels.radial_mlp import radial_mlp
from pallas_kernels.radial_mlp import radial_mlp_geometry_vjp
from pallas_kernels.radial_mlp import radial_mlp_geometry_vjp_reference
from pallas_kernels.radial_mlp import radial_mlp_reference

__all__ = [
    "BlockSizes",
    "RadialMLPBlocks",
    "RadialMLPWeights",
    "attention_weights",
    "attention_weights_vjp",
    "attention_weights_vjp_reference",
    "edge_dot",
    "edge_dot_reference",
    "gather_sum",
    "gather_sum_reference",
    "message_attention",
    "message_attention_reference",
    "radial_mlp",
    "radial_mlp_geometry_vjp",
    "radial_mlp_geometry_vjp_reference",
    "radial_mlp_reference",
    "scatter_sum",
    "scatter_sum_reference",
]
