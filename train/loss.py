"""The training objective (docs/model.md §12.2) on one padded sub-batch, and per-molecule error sums.

loss = w_E * e_loss + w_F * f_loss, with

  e_loss = mean_b |E_b - E*_b|             (total)    or  mean_b |E_b - E*_b| / n_b  (per atom)
  f_loss = sum_i |F_i - F*_i|_2 / B_real   (l2mae)    or  mean_i |F_i - F*_i|_2      (atoml2mae)

over real molecules b and real atoms i only. Empty sub-batches give 0 (never NaN).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from e2former_jax.graph import Graph
from e2former_jax.so3.safe import safe_norm
from train.run_config import EnergyLoss, ForceLoss, LossConfig


def atoms_per_molecule(graph: Graph) -> jax.Array:
  """[B] number of real atoms of each molecule slot (padding atoms may point at a real slot)."""
  return jax.ops.segment_sum(graph.node_mask.astype(jnp.float32), graph.molecule_index,
                             graph.num_molecules)


def loss_terms(config: LossConfig, graph: Graph, energy: jax.Array, forces: jax.Array,
               target_energy: jax.Array, target_forces: jax.Array
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Scalar loss and its terms for one sub-batch.

  Args:
    config: weights and reductions.
    graph: the padded sub-batch (masks, molecule index).
    energy: [B] predicted (reference-subtracted) energies.
    forces: [N, 3] predicted forces.
    target_energy: [B] reference-subtracted target energies.
    target_forces: [N, 3] target forces.

  Returns:
    ``(loss, {"energy_loss", "force_loss"})``, all scalars.
  """
  b, n = graph.num_molecules, graph.num_nodes
  assert energy.shape == target_energy.shape == (b,), (energy.shape, target_energy.shape)
  assert forces.shape == target_forces.shape == (n, 3), (forces.shape, target_forces.shape)
  mol_mask = graph.molecule_mask.astype(jnp.float32)
  node_mask = graph.node_mask.astype(jnp.float32)
  num_mol = jnp.maximum(mol_mask.sum(), 1.0)
  num_atoms = jnp.maximum(node_mask.sum(), 1.0)

  energy_error = jnp.abs(energy - target_energy)  # [B]
  if config.energy is EnergyLoss.PER_ATOM:
    energy_error = energy_error / jnp.maximum(atoms_per_molecule(graph), 1.0)
  energy_loss = jnp.sum(jnp.where(graph.molecule_mask, energy_error, 0.0)) / num_mol

  # safe_norm: the padded atoms' zero difference must not give a NaN gradient.
  force_error = jnp.where(graph.node_mask, safe_norm(forces - target_forces), 0.0)  # [N]
  denominator = num_mol if config.force is ForceLoss.L2MAE else num_atoms
  force_loss = force_error.sum() / denominator

  loss = config.energy_weight * energy_loss + config.force_weight * force_loss
  return loss, {"energy_loss": energy_loss, "force_loss": force_loss}


def molecule_error_sums(graph: Graph, energy: jax.Array, forces: jax.Array, target_energy: jax.Array,
                        target_forces: jax.Array, direct_forces: jax.Array | None = None
                        ) -> dict[str, jax.Array]:
  """Per-molecule-slot error sums for evaluation tables (zeros on padded molecule slots).

  Args:
    forces: [N, 3] the forces simulations use, -dE/dx.
    direct_forces: [N, 3] the direct head's forces, scored separately when given.

  Returns:
    ``energy_abs`` [B] |E - E*|; ``atoms`` [B] real atoms; ``force_abs`` [B] sum over the molecule's
    atoms and components of |F - F*|; ``force_l2`` [B] sum over its atoms of |F - F*|_2; with
    ``direct_forces``, ``direct_force_abs`` and ``direct_force_l2`` likewise.
  """
  mol_mask = graph.molecule_mask
  weights = graph.node_mask.astype(forces.dtype)
  seg = lambda x: jax.ops.segment_sum(x, graph.molecule_index, graph.num_molecules)
  zero_pad = lambda x: jnp.where(mol_mask, x, 0.0)
  sums = {"energy_abs": zero_pad(jnp.abs(energy - target_energy)),
          "atoms": zero_pad(atoms_per_molecule(graph))}
  for prefix, predicted in (("", forces), ("direct_", direct_forces)):
    if predicted is None:
      continue
    diff = predicted - target_forces  # [N, 3]
    sums[f"{prefix}force_abs"] = zero_pad(seg(jnp.abs(diff).sum(-1) * weights))
    sums[f"{prefix}force_l2"] = zero_pad(seg(safe_norm(diff) * weights))
  return sums
