"""SO(3)-equivariant linear maps on [N, S, C] features (docs/model.md §6.1, §6.3)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jaxtyping import Array, Float

from e2former_jax.config import DEFAULT_LAYER_NORM_EPS
from e2former_jax.nn.init import fan_in_uniform, kaiming_uniform
from e2former_jax.so3.layout import degree_slice, lmax_from_rows, row_degrees


class SO3Linear(nn.Module):
  """y[(l,m), o] = sum_i W[l, o, i] x[(l,m), i] (+ b[o] on the l = 0 row).

  One weight matrix per degree, shared over m, is the most general equivariant linear map between
  features with the same multiplicity per degree.

  Attributes:
    features: F, the output channels.
    use_bias: add a bias to the invariant row only (a bias on l > 0 rows would break equivariance).
    dtype: dtype of the product and the output (None: the input's).
  """

  features: int
  use_bias: bool = True
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"]) -> Float[Array, "N S F"]:
    num_rows, c_in = x.shape[-2:]
    lmax = lmax_from_rows(num_rows)
    x = x if self.dtype is None else x.astype(self.dtype)
    w = self.param("weight", fan_in_uniform, (lmax + 1, self.features, c_in))
    w_rows = w[row_degrees(lmax)].astype(x.dtype)  # [S, out, in]
    y = jnp.einsum("...si,soi->...so", x, w_rows)
    if self.use_bias:
      b = self.param("bias", nn.initializers.zeros, (self.features,))
      y = y.at[..., 0, :].add(b.astype(x.dtype))
    return y


class SO3LinearToScalar(nn.Module):
  """Invariant readout of equivariant features: the attention query/key (docs/model.md §6.3).

  u = SO3Linear(x) (bias), w = SO3Linear(x) (no bias), s_l[p] = sum_{m in l} u[(l,m),p] w[(l,m),p],
  out = MLP([s_0; ...; s_lmax]) with Linear -> LayerNorm -> SiLU -> Linear.

  Attributes:
    features: F, the output width (heads * head_dim).
    hidden: width P of u, w and the MLP hidden layer (features // 2 in the paper).
    layer_norm_eps: epsilon of the MLP's LayerNorm.
    dtype: dtype of the products (None: the input's); the LayerNorm computes in float32.
  """

  features: int
  hidden: int
  layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"]) -> Float[Array, "N F"]:
    lmax = lmax_from_rows(x.shape[-2])
    u = SO3Linear(self.hidden, use_bias=True, dtype=self.dtype, name="left")(x)  # [N, S, P]
    w = SO3Linear(self.hidden, use_bias=False, dtype=self.dtype, name="right")(x)  # [N, S, P]
    products = u * w  # [N, S, P]
    # Static slices, not a boolean row mask: the mask is a gather whose transpose is a scatter-add
    # over [N, S, P] (the `wrapped_scatter` kernels of docs/performance.md §4).
    invariants = jnp.concatenate(
        [products[..., degree_slice(l), :].sum(axis=-2) for l in range(lmax + 1)],
        axis=-1)  # [N, (lmax+1) P]
    h = nn.Dense(self.hidden, kernel_init=kaiming_uniform, dtype=self.dtype, name="mlp_in")(invariants)
    h = nn.silu(nn.LayerNorm(epsilon=self.layer_norm_eps, name="mlp_norm")(h))
    return nn.Dense(self.features, kernel_init=kaiming_uniform, dtype=self.dtype,
                    name="mlp_out")(h)  # [N, features]
