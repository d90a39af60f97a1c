"""Energies, forces and stresses from a model and its parameters."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former, ModelOutput


def output_and_forces(model: E2Former, params: Any, graph: Graph
                      ) -> tuple[ModelOutput, Float[Array, "N 3"]]:
  """The model's whole output (energies, direct-head forces if any, features) and F = -dE/dx.

  One forward and one backward pass: what evaluation needs to score both force kinds at once.
  """

  def total_energy(positions):
    out = model.apply(params, graph.replace(positions=positions))
    return out.energy.sum(), out

  grad, out = jax.grad(total_energy, has_aux=True)(graph.positions)
  return out, -grad * graph.node_mask[:, None].astype(grad.dtype)


def energy_and_forces(model: E2Former, params: Any, graph: Graph, *, conservative: bool = True
                      ) -> tuple[Float[Array, "B"], Float[Array, "N 3"]]:
  """Energy per molecule slot and forces (zero on padding).

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

  out, forces = output_and_forces(model, params, graph)
  return out.energy, forces


def energy_forces_stress(model: E2Former, params: Any, graph: Graph
                         ) -> tuple[Float[Array, "B"], Float[Array, "N 3"], Float[Array, "B 3 3"]]:
  """Energy, conservative forces and stress of a periodic batch.

  The stress is the derivative of the energy with respect to a homogeneous symmetric strain eps
  applied to each structure's positions and cell together, x -> x (1 + eps), divided by the cell
  volume: sigma = (1 / V) dE/d eps, in energy units per A^3 (eV/A^3 for a model trained in eV),
  with ASE's sign convention (positive under tension, negative for a compressed cell). Cartesian
  image shifts are integer combinations of the cell vectors, so they are strained like the cell.
  Molecules (zero cell) and padding get zero stress.

  Args:
    model: the network.
    params: its parameters (``{"params": ...}`` variables dict).
    graph: padded periodic batch (``graph.cell`` is not None).

  Raises:
    ValueError: on a graph without cells.
  """
  if not graph.periodic:
    raise ValueError("stress needs a periodic graph (Graph.cell is None): build it from structures "
                     "with pbc and a cell")
  b = graph.num_molecules
  of_atom = graph.molecule_index  # [N]

  def total_energy(positions, strain):
    symmetric = 0.5 * (strain + jnp.swapaxes(strain, 1, 2))  # [B, 3, 3]
    deformation = jnp.eye(3, dtype=strain.dtype) + symmetric  # [B, 3, 3]
    strained = graph.replace(
        positions=jnp.einsum("na,nab->nb", positions, deformation[of_atom]),
        nbr_shift=jnp.einsum("nka,nab->nkb", graph.nbr_shift, deformation[of_atom]),
        cell=jnp.einsum("mia,mab->mib", graph.cell, deformation))
    energy = model.apply(params, strained).energy
    return energy.sum(), energy

  strain = jnp.zeros((b, 3, 3), graph.positions.dtype)
  (grad_x, grad_strain), energy = jax.grad(total_energy, argnums=(0, 1), has_aux=True)(
      graph.positions, strain)
  forces = -grad_x * graph.node_mask[:, None].astype(grad_x.dtype)
  volume = jnp.abs(jnp.linalg.det(graph.cell))  # [B]
  periodic = graph.molecule_mask & (volume > 0)
  stress = grad_strain / jnp.where(periodic, volume, 1.0)[:, None, None]
  return energy, forces, jnp.where(periodic[:, None, None], stress, 0.0)
