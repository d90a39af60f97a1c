"""Initial node features, their power spectrum and the per-molecule charge/spin signal (docs/model.md §5)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from e2former_jax.config import AttentionImpl
from e2former_jax.nn.init import embedding_init, kaiming_uniform
from e2former_jax.so3.layout import degree_slice, lmax_from_rows, row_degrees
from e2former_jax.nn.radial import RadialMLP

# Total charges -MAX_ABS_CHARGE..MAX_ABS_CHARGE and spin multiplicities 0..MAX_MULTIPLICITY have
# their own embedding rows (authors' ranges; 0 = "unspecified" multiplicity). Values outside are
# rejected at the public API (e2former_jax.structure) and clipped here.
MAX_ABS_CHARGE = 10
MAX_MULTIPLICITY = 20


class MoleculeEmbedding(nn.Module):
  """s_mol = SiLU(W [E_q(charge); E_s(multiplicity)] + b), added to the l = 0 row in every block."""

  channels: int

  @nn.compact
  def __call__(self, charge: Int[ArrayLike, "B"], spin: Int[ArrayLike, "B"]) -> Float[Array, "B C"]:
    charge_table = self.param("charge_table", embedding_init, (2 * MAX_ABS_CHARGE + 1, self.channels))
    spin_table = self.param("spin_table", embedding_init, (MAX_MULTIPLICITY + 1, self.channels))
    e_q = charge_table[jnp.clip(charge, -MAX_ABS_CHARGE, MAX_ABS_CHARGE) + MAX_ABS_CHARGE]
    e_s = spin_table[jnp.clip(spin, 0, MAX_MULTIPLICITY)]
    return nn.silu(nn.Dense(self.channels, kernel_init=kaiming_uniform, name="mix")(
        jnp.concatenate([e_q, e_s], axis=-1)))


class EdgeDegreeEmbedding(nn.Module):
  """h0_i[(l,m), c] = 1/avg_degree * sum_k phi(d_ik) Y_lm(r_ik / |r_ik|) R_l(f_ik)[c].

  f_ik = [rbf(d_ik); E_t(Z_i); E_s(Z_j)]; one radial MLP per degree l. Atom identity enters the
  network only here and through the attention gates (the authors' token embedding is dead code).

  Attributes:
    channels: C.
    lmax: maximum degree.
    hidden: radial MLP hidden width.
    num_species: rows of the type tables.
    avg_degree: constant normaliser of the neighbour sum.
    cutoff: radial basis range (angstrom).
    num_rbf: radial basis size, also the width of the type tables.
    layer_norm_eps: epsilon of the radial MLPs' LayerNorms.
    remat: recompute each degree's radial MLP and neighbour sum in the backward pass instead of
      keeping their [N, K, hidden] activations (E2FormerConfig.remat).
    chunk_atoms: evaluate each degree's radial MLP and neighbour sum over chunks of this many
      target atoms, recomputed chunk by chunk in the backward pass (E2FormerConfig.edge_chunk_atoms);
      ``remat`` is then implied for these MLPs.
    dtype: dtype of the radial MLPs' products (None: the inputs').
    impl, vjp_kernel: implementation of the radial MLPs (RadialMLP's).
  """

  channels: int
  lmax: int
  hidden: int
  num_species: int
  avg_degree: float
  cutoff: float
  num_rbf: int
  layer_norm_eps: float
  remat: bool = False
  chunk_atoms: int | None = None
  dtype: Any = None
  impl: AttentionImpl = AttentionImpl.XLA
  vjp_kernel: bool = False

  @nn.compact
  def __call__(self, species: Int[ArrayLike, "N"], distances: Float[Array, "N K"],
               envelope_weights: Float[Array, "N K"], edge_sh: Float[Array, "N K S"],
               nbr_idx: Int[ArrayLike, "N K"]) -> Float[Array, "N S C"]:
    """
    Args:
      species: atomic numbers.
      distances: edge lengths.
      envelope_weights: phi(d), zero on empty slots.
      edge_sh: spherical harmonics of the unit edge vectors.
      nbr_idx: source atom of each slot.
    Returns:
      The initial node features.
    """
    target_table = self.param("target_table", embedding_init, (self.num_species, self.num_rbf))
    source_table = self.param("source_table", embedding_init, (self.num_species, self.num_rbf))
    target_types, source_types = target_table[species], source_table[species]  # [N, num_rbf]
    degrees = row_degrees(self.lmax)
    # Chunks are rematerialised already.
    radial_mlp = nn.remat(RadialMLP) if self.remat and self.chunk_atoms is None else RadialMLP
    blocks = []
    for l in range(self.lmax + 1):
      if blocks:
        # No-op forward. Its transpose fences degree l's edge-length cotangent with degree l-1's
        # output cotangent, so the backward handles one degree's per-edge MLP at a time (l = lmax
        # first) instead of all of them at once.
        d_l, blocks[-1] = jax.lax.optimization_barrier((distances, blocks[-1]))
      else:
        d_l = distances
      radial = radial_mlp(self.hidden, self.channels, self.cutoff, self.num_rbf, self.layer_norm_eps,
                          self.chunk_atoms, dtype=self.dtype, impl=self.impl, vjp_kernel=self.vjp_kernel,
                          name=f"radial_l{l}")
      sh_l = edge_sh[..., degrees == l] * envelope_weights[..., None]  # [N, K, 2l+1]
      blocks.append(radial(d_l, target_types, source_types, nbr_idx, slot_weights=sh_l))  # [N, 2l+1, C]
    return jnp.concatenate(blocks, axis=-2) / self.avg_degree  # [N, S, C]


class PowerSpectrum(nn.Module):
  """p_i = W [sum_m h0_i[(l, m), :]^2 for l = 1..lmax] + b, to add to the l = 0 row (docs/model.md §5.3).

  Each squared norm is a sum over pairs of neighbours of a Legendre polynomial of the angle between
  them: three-body invariants that the initial l = 0 row (a sum over single neighbours) lacks. W and
  b start at zero, so a new model starts as the one without them.
  """

  channels: int

  @nn.compact
  def __call__(self, x: Float[ArrayLike, "N S C"]) -> Float[Array, "N C"]:
    # Static row slices: a boolean row mask would lower to a gather whose transpose is a scatter-add.
    lmax = lmax_from_rows(x.shape[1])
    norms = [jnp.sum(jnp.square(x[:, degree_slice(l)]), axis=1) for l in range(1, lmax + 1)]
    return nn.Dense(self.channels, kernel_init=nn.initializers.zeros, name="mix")(
        jnp.concatenate(norms, axis=-1))
