"""Dispatchers: the one place where the model reaches the Pallas kernels."""

from e2former_jax.ops.attention import attention_weights
from e2former_jax.ops.attention import neighbor_sum
from e2former_jax.ops.attention import node_attention
from e2former_jax.ops.attention import node_attention_weights

__all__ = ["attention_weights", "neighbor_sum", "node_attention", "node_attention_weights"]
