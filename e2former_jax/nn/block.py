"""Pre-norm transformer block (spec 7.1)."""

from __future__ import annotations

import flax.linen as nn
import jax

from e2former_jax.config import E2FormerConfig
from e2former_jax.graph import Graph
from e2former_jax.nn.attention import E2Attention, EdgeGeometry
from e2former_jax.nn.ffn import S3FeedForward
from e2former_jax.nn.norm import RMSNormSH


class TransformerBlock(nn.Module):
  """x += Attn(RMSNormSH(x) + s_mol on the l=0 row); x += FFN(RMSNormSH(x))."""

  config: E2FormerConfig

  @nn.compact
  def __call__(self, x: jax.Array, molecule_signal: jax.Array, graph: Graph,
               geometry: EdgeGeometry) -> jax.Array:
    """x: [N, S, C]; molecule_signal: [N, C] charge/spin embedding of each atom's molecule."""
    xt = RMSNormSH(name="attn_norm")(x)
    xt = xt.at[:, 0, :].add(molecule_signal)
    x = x + E2Attention(self.config, name="attention")(xt, graph, geometry)
    return x + S3FeedForward(self.config.channels, name="ffn")(RMSNormSH(name="ffn_norm")(x))
