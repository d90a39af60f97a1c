"""Dispatchers: the one place where the model reaches the Pallas kernels."""

from e2former_jax.ops.attention import attention_weights
from e2former_jax.ops.attention import max_slot_logit
from e2former_jax.ops.attention import message_attention
from e2former_jax.ops.attention import resolve_impl
from e2former_jax.ops.radial import RadialMLPWeights
from e2former_jax.ops.radial import radial_mlp

__all__ = [
    "RadialMLPWeights", "attention_weights", "max_slot_logit", "message_attention", "radial_mlp",
    "resolve_impl",
]
