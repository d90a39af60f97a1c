"""Dispatchers: the one place where the model reaches the Pallas kernels."""

from e2former_jax.ops.attention import node_attention, sink_softmax

__all__ = ["node_attention", "sink_softmax"]
