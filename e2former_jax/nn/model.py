"""The E2Former-V2 network: edge-degree embedding, transformer blocks, energy and force heads."""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float

from e2former_jax import so3
from e2former_jax.config import E2FormerConfig
from e2former_jax.graph import Graph
from e2former_jax.nn import memory
from e2former_jax.nn.attention import EdgeGeometry
from e2former_jax.nn.block import TransformerBlock
from e2former_jax.nn.embedding import EdgeDegreeEmbedding, MoleculeEmbedding, PowerSpectrum
from e2former_jax.nn.init import kaiming_uniform
from e2former_jax.nn.norm import RMSNormSH
from e2former_jax.nn.radial import envelope


@flax.struct.dataclass
class ModelOutput:
  """Attributes:
    energy: energy of each molecule slot (0 on padding), in the units of the training targets.
    atom_energy: per-atom contributions (0 on padding).
    direct_forces: output of the direct force head, or None when the config has none.
    features: final normalised node features.
  """

  energy: Float[Array, "B"]
  atom_energy: Float[Array, "N"]
  direct_forces: Float[Array, "N 3"] | None
  features: Float[Array, "N S C"]


def edge_geometry(config: E2FormerConfig, graph: Graph, positions: Float[ArrayLike, "N 3"]
                  ) -> EdgeGeometry:
  """Per-slot geometry shared by every block; NaN-free (value and gradient) on empty slots."""
  mask = graph.nbr_mask
  vectors = graph.edge_vectors(positions)  # [N, K, 3]
  # The MAX_LOGIT sink reads the gate logits of masked slots that hold an atom too, so their
  # lengths are real; the edge vectors (messages, harmonics) stay zero there.
  holds_atom = graph.slot_holds_atom if config.reference_slots else mask
  dist = so3.safe_norm(graph.edge_vectors(positions, where=holds_atom) if config.reference_slots
                       else vectors)  # [N, K]
  inv_dist = jnp.where(mask, 1.0 / (jnp.where(mask, dist, 1.0) + config.inverse_distance_eps), 0.0)
  return EdgeGeometry(
      vectors=vectors,
      distances=dist,
      envelope=jnp.where(mask, envelope(dist, config.cutoff), 0.0),
      inv_dist=inv_dist,
      holds_atom=holds_atom,
  )


class E2Former(nn.Module):
  """E2Former-V2 interatomic potential on a padded :class:`~e2former_jax.graph.Graph`.

  Under ``config.auto_memory`` how it computes (never what) is chosen when it is traced, from the
  graph's size and the device's free memory (:func:`e2former_jax.nn.memory.plan`).
  """

  config: E2FormerConfig

  @nn.compact
  def __call__(self, graph: Graph) -> ModelOutput:
    n, k = graph.nbr_idx.shape
    cfg = self.config
    if cfg.auto_memory:
      cfg = memory.plan(cfg, n, k, graph.positions.dtype.itemsize)
    geometry = edge_geometry(cfg, graph, graph.positions)
    edge_sh = so3.spherical_harmonics(geometry.vectors, cfg.lmax, normalize=True)  # [N, K, S]
    edge_sh = jnp.where(graph.nbr_mask[..., None], edge_sh, 0.0)

    x = EdgeDegreeEmbedding(cfg.channels, cfg.lmax, cfg.edge_hidden, cfg.num_species, cfg.avg_degree,
                            cfg.cutoff, cfg.num_rbf, cfg.layer_norm_eps, cfg.remat, cfg.edge_chunk_atoms,
                            cfg.compute_dtype, cfg.radial_impl, cfg.radial_vjp_kernel,
                            name="edge_degree")(
        graph.species, geometry.distances, geometry.envelope, edge_sh, graph.nbr_idx)  # [N, S, C]
    assert x.shape == (n, cfg.num_rows, cfg.channels), x.shape
    if cfg.power_spectrum:
      x = x.at[:, 0, :].add(PowerSpectrum(cfg.channels, name="power_spectrum")(x))
    molecule_signal = MoleculeEmbedding(cfg.channels, name="molecule")(graph.charge, graph.spin)
    atom_signal = molecule_signal[graph.molecule_index]  # [N, C]
    block = nn.remat(TransformerBlock) if cfg.remat else TransformerBlock
    for layer in range(cfg.num_layers):
      x = block(cfg, name=f"block_{layer}")(x, atom_signal, graph, geometry)
    x = RMSNormSH(name="final_norm")(x)

    node_mask = graph.node_mask.astype(x.dtype)
    h = x[:, 0, :]
    for i in range(2):
      h = nn.silu(nn.Dense(cfg.channels, kernel_init=kaiming_uniform, name=f"energy_hidden_{i}")(h))
    atom_energy = nn.Dense(1, kernel_init=kaiming_uniform, name="energy_out")(h)[:, 0] * node_mask  # [N]
    energy = jax.ops.segment_sum(atom_energy, graph.molecule_index, graph.num_molecules)  # [B]
    energy = energy * graph.molecule_mask.astype(x.dtype)

    direct_forces = None
    if cfg.direct_force_head:
      # Rows 1..3 are the l = 1 block in (x, y, z) order, so a channel mix is a Cartesian vector.
      direct_forces = nn.Dense(1, use_bias=False, kernel_init=kaiming_uniform, name="force_head")(
          x[:, 1:4, :])[..., 0] * node_mask[:, None]  # [N, 3]
    return ModelOutput(energy=energy, atom_energy=atom_energy, direct_forces=direct_forces, features=x)
