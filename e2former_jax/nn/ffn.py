"""Feed-forward block with the S3 gate (docs/model.md §6.4)."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from e2former_jax.config import GateNormalisers
from e2former_jax.nn.init import kaiming_uniform
from e2former_jax.nn.linear import SO3Linear
from e2former_jax.so3.layout import lmax_from_rows

# Gauss-Hermite nodes for E_{z~N(0,1)}[f(z)^2]; 200 nodes integrate these smooth functions to
# machine precision.
_QUADRATURE_NODES = 200
# The authors' values of the same constants: e3nn's normalize2mom estimates from 10^6 N(0, 1)
# samples (torch generator seed 0, float64), which differ from the integrals by up to 0.16 %.
# Read from the reference parity fixture (tiny_config.json, "constants").
_MONTE_CARLO_NORMALISERS = {"silu": 1.6791767923989418, "sigmoid": 1.8467055342154763}


@functools.cache
def second_moment_normaliser(name: str, kind: GateNormalisers = GateNormalisers.EXACT) -> float:
  """c such that E[(c f(z))^2] = 1 for z ~ N(0, 1) (e3nn's normalize2mom).

  EXACT: by quadrature, silu -> 1.67653, sigmoid -> 1.84623. MONTE_CARLO: the authors' estimates
  (1.679177, 1.846706).
  """
  if kind is GateNormalisers.MONTE_CARLO:
    return _MONTE_CARLO_NORMALISERS[name]
  fn = {"silu": lambda z: z / (1.0 + np.exp(-z)), "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z))}[name]
  z, w = np.polynomial.hermite_e.hermegauss(_QUADRATURE_NODES)
  second_moment = np.sum(w * fn(z) ** 2) / np.sqrt(2.0 * np.pi)
  return float(1.0 / np.sqrt(second_moment))


class S3FeedForward(nn.Module):
  """z = SO3Linear(x); g = Linear(z_0) -> (lmax+1) C gates;
  row 0 <- c_s SiLU(g_0); rows of degree l > 0 <- c_g sigmoid(g_l) * z_l; out = SO3Linear(.).

  Attributes:
    channels: F, the output channels (C in the model).
    normalisers: which values of c_s and c_g.
    dtype: dtype of the products and the output (None: the input's).
  """

  channels: int
  normalisers: GateNormalisers = GateNormalisers.EXACT
  dtype: Any = None

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"]) -> Float[Array, "N S F"]:
    num_rows = x.shape[-2]
    lmax = lmax_from_rows(num_rows)
    z = SO3Linear(self.channels, dtype=self.dtype, name="linear_in")(x)  # [N, S, C]
    gates = nn.Dense((lmax + 1) * self.channels, kernel_init=kaiming_uniform, dtype=self.dtype,
                     name="gate")(z[..., 0, :])
    gates = gates.reshape(*gates.shape[:-1], lmax + 1, self.channels)  # [N, lmax+1, C]
    c_silu, c_sigmoid = (second_moment_normaliser(f, self.normalisers) for f in ("silu", "sigmoid"))
    scalar = c_silu * nn.silu(gates[..., :1, :])  # [N, 1, C]
    gate_l = c_sigmoid * nn.sigmoid(gates[..., 1:, :])  # [N, lmax, C]
    # Each degree's gate broadcast over its 2l+1 rows: an index array here would be a gather of
    # [N, S-1, C] and a scatter-add in the backward (docs/performance.md §4).
    gate_rows = jnp.concatenate(
        [jnp.broadcast_to(gate_l[..., l - 1:l, :], (*gate_l.shape[:-2], 2 * l + 1, self.channels))
         for l in range(1, lmax + 1)], axis=-2)  # [N, S-1, C]
    gated = jnp.concatenate([scalar, gate_rows * z[..., 1:, :]], axis=-2)  # [N, S, C]
    return SO3Linear(self.channels, dtype=self.dtype, name="linear_out")(gated)
