"""Equivariant RMS normalisation of [N, S, C] features (docs/model.md §6.2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from e2former_jax.so3.layout import lmax_from_rows, row_degrees

# Added to the mean square before the inverse square root (authors' value).
RMS_NORM_EPS = 1e-5


class RMSNormSH(nn.Module):
  """Centre the l = 0 row over channels, divide every row by one degree-balanced RMS per atom.

  n = mean_c sum_l 1/(lmax+1) * 1/(2l+1) * sum_{m in l} x[(l,m), c]^2 (each degree weighs equally),
  y[(l,m), c] = x[(l,m), c] / sqrt(n + eps) * gamma[l, c], then y[0, c] += beta[c].
  """

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"]) -> Float[Array, "N S C"]:
    num_rows, channels = x.shape[-2:]
    lmax = lmax_from_rows(num_rows)
    degrees = row_degrees(lmax)
    scalar = x[..., 0, :] - x[..., 0, :].mean(axis=-1, keepdims=True)
    x = x.at[..., 0, :].set(scalar)
    row_weight = jnp.asarray(1.0 / ((lmax + 1) * (2 * degrees + 1)), x.dtype)  # [S]
    mean_square = jnp.einsum("...sc,s->...", x**2, row_weight) / channels  # [N]
    x = x * jax.lax.rsqrt(mean_square + RMS_NORM_EPS)[..., None, None]
    gamma = self.param("scale", nn.initializers.ones, (lmax + 1, channels))
    beta = self.param("bias", nn.initializers.zeros, (channels,))
    x = x * gamma[degrees].astype(x.dtype)
    return x.at[..., 0, :].add(beta.astype(x.dtype))
