"""Energies and forces from a model and its parameters."""

from __future__ import annotations

import jax

from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former


def energy_and_forces(model: E2Former, params, graph: Graph, *, conservative: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
  """Energy per molecule slot [B] and forces [N, 3] (zero on padding).

  Args:
    model: the network.
    params: its parameters (``{"params": ...}`` variables dict).
    graph: padded batch.
    conservative: forces F = -dE/dx (exact gradient of the energy); otherwise the direct l = 1 head.
  """
  if not conservative:
    out = model.apply(params, graph)
    if out.direct_forces is None:
      raise ValueError("this model has no direct force head (config.direct_force_head=False)")
    return out.energy, out.direct_forces

  def total_energy(positions):
    energy = model.apply(params, graph.replace(positions=positions)).energy
    return energy.sum(), energy

  grad, energy = jax.grad(total_energy, has_aux=True)(graph.positions)
  forces = -grad * graph.node_mask[:, None].astype(grad.dtype)
  return energy, forces
