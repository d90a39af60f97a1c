"""Pre-norm transformer block (docs/model.md §9.1)."""

from __future__ import annotations

import flax.linen as nn
from jaxtyping import Array, Float

from e2former_jax.config import E2FormerConfig
from e2former_jax.graph import Graph
from e2former_jax.nn.attention import E2Attention, EdgeGeometry
from e2former_jax.nn.ffn import S3FeedForward
from e2former_jax.nn.norm import RMSNormSH


class TransformerBlock(nn.Module):
  """x += Attn(RMSNormSH(x) + s_mol on the l=0 row); x += FFN(RMSNormSH(x))."""

  config: E2FormerConfig

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"], molecule_signal: Float[Array, "N C"], graph: Graph,
               geometry: EdgeGeometry) -> Float[Array, "N S C"]:
    """molecule_signal: charge/spin embedding of each atom's molecule."""
    xt = RMSNormSH(name="attn_norm")(x)
    xt = xt.at[:, 0, :].add(molecule_signal)
    # The attention's input is no module's output: sown for stage-by-stage comparisons (no cost
    # unless the "intermediates" collection is mutable).
    self.sow("intermediates", "attn_in", xt)
    x = x + E2Attention(self.config, name="attention")(xt, graph, geometry)
    ffn = S3FeedForward(self.config.channels, self.config.gate_normalisers, self.config.compute_dtype,
                        name="ffn")
    return x + ffn(RMSNormSH(name="ffn_norm")(x))
