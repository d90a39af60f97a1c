"""Radial pieces shared by every block: Gaussian basis, smooth envelope, per-edge radial MLP (spec 3.1-3.2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from e2former_jax.config import DEFAULT_LAYER_NORM_EPS
from e2former_jax.nn.init import kaiming_uniform


def gaussian_rbf(distances: jax.Array, cutoff: float, num_basis: int) -> jax.Array:
  """Gaussian smearing: centres mu_k = k * cutoff / (num_basis - 1), width sigma = 2 * spacing.

  Args:
    distances: [...] edge lengths in angstrom.
  Returns:
    [..., num_basis] exp(-(d - mu_k)^2 / (2 sigma^2)); no learnable parameter (spec 3.1).
  """
  spacing = cutoff / (num_basis - 1)
  centres = jnp.arange(num_basis, dtype=distances.dtype) * spacing
  sigma = 2.0 * spacing
  return jnp.exp(-((distances[..., None] - centres) ** 2) / (2.0 * sigma**2))


def envelope(distances: jax.Array, cutoff: float) -> jax.Array:
  """Smoothstep-C2 envelope phi(u) = 1 - 10u^3 + 15u^4 - 6u^5 for u = d / cutoff < 1, else 0.

  phi, phi' and phi'' vanish at the cutoff, so energies and forces are continuous when an atom
  crosses it (spec 3.2).
  """
  u = jnp.clip(distances / cutoff, 0.0, 1.0)
  return 1.0 - u**3 * (10.0 - 15.0 * u + 6.0 * u**2)


class RadialMLP(nn.Module):
  """Linear -> LayerNorm -> SiLU, Linear -> LayerNorm -> SiLU, Linear (spec 3.5, 6.2).

  The first Linear acts on the concatenation [rbf(d_ij); E_t(Z_i); E_s(Z_j)]. It is written as the
  sum of three Linears so that the type terms are computed per atom and gathered, never forming the
  [N, K, num_rbf + 2 * type_dim] concatenation; the function and parameter count are those of one
  Linear on the concatenation.

  The Gaussian basis is evaluated here from the edge lengths rather than passed in: it is cheap
  (num_rbf exponentials per edge against a num_rbf x hidden product), and this way nothing of size
  [N, K, num_rbf] outlives one MLP. Shared between the blocks, the basis and the sum of its
  cotangents over every MLP were the largest per-edge buffers of energy + forces on the GPU
  (benchmarks/notes_memory.md); each MLP now reduces its basis cotangent to [N, K] at once.

  Attributes:
    hidden: hidden width.
    out: output width.
    cutoff: the basis spans [0, cutoff] (angstrom).
    num_rbf: number of Gaussians.
    layer_norm_eps: epsilon of both LayerNorms.
  """

  hidden: int
  out: int
  cutoff: float
  num_rbf: int
  layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS

  @nn.compact
  def __call__(self, distances: jax.Array, target_types: jax.Array, source_types: jax.Array,
               nbr_idx: jax.Array) -> jax.Array:
    """
    Args:
      distances: [N, K] edge lengths of every slot (any finite value on empty slots).
      target_types: [N, T] type embedding of each target atom.
      source_types: [N, T] type embedding of each atom as a source (gathered per slot).
      nbr_idx: [N, K] source atom of each slot (sentinel N on empty slots reads zeros).
    Returns:
      [N, K, out]
    """
    rbf = gaussian_rbf(distances, self.cutoff, self.num_rbf)  # [N, K, num_rbf]
    h = nn.Dense(self.hidden, kernel_init=kaiming_uniform, name="rbf_in")(rbf)  # [N, K, hidden]
    h = h + nn.Dense(self.hidden, use_bias=False, kernel_init=kaiming_uniform,
                     name="target_in")(target_types)[:, None, :]
    source = nn.Dense(self.hidden, use_bias=False, kernel_init=kaiming_uniform,
                      name="source_in")(source_types)  # [N, hidden]
    h = h + jnp.take(source, nbr_idx, axis=0, mode="fill", fill_value=0)
    h = nn.silu(nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm_0")(h))
    h = nn.Dense(self.hidden, kernel_init=kaiming_uniform, name="hidden")(h)
    h = nn.silu(nn.LayerNorm(epsilon=self.layer_norm_eps, name="norm_1")(h))
    return nn.Dense(self.out, kernel_init=kaiming_uniform, name="out")(h)  # [N, K, out]
