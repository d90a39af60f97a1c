"""A trained model ready for simulation: the network, its weights and per-element reference energies.

Training fits one reference energy per element and the network learns the remainder, so a total
energy is ``E = E_model + sum_i ref[Z_i]`` (see ``train/data/reference_energies.py``). The
reference term does not depend on positions: forces and stresses come from the network alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.config import AttentionImpl, E2FormerConfig
from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
  """Network, weights and reference energies: what the JAX MD and ASE interfaces consume.

  Build one from a training checkpoint with ``train.md.load_predictor`` (the checkpoint format
  belongs to ``train/``, which this package does not import), or from any ``(model, params)``.

  Attributes:
    model: the network.
    params: its variables, ``{"params": ...}``.
    reference_energies: eV per element (atomic number -> energy) added to the network's energy;
      empty when the network predicts total energies itself (e.g. random weights).
  """

  model: E2Former
  params: Any
  reference_energies: Mapping[int, float] = dataclasses.field(default_factory=dict)

  @property
  def config(self) -> E2FormerConfig:
    return self.model.config

  def with_compute(self, *, attention_impl: AttentionImpl | None = None, remat: bool | None = None
                   ) -> Predictor:
    """The same weights computed another way (neither choice changes the parameters or the numbers).

    Args:
      attention_impl: attention implementation (e.g. Pallas on GPU, XLA on CPU); None keeps it.
      remat: rematerialise blocks and radial MLPs in the force pass (less memory for large
        systems, slower; ``E2FormerConfig.remat``); None keeps it.
    """
    changes = {k: v for k, v in (("attention_impl", attention_impl), ("remat", remat)) if v is not None}
    return dataclasses.replace(self, model=E2Former(self.config.replace(**changes)))

  def with_dtype(self, dtype) -> Predictor:
    """The weights cast to ``dtype`` (e.g. float64 for energy-conservation checks)."""
    def cast(p):
      return jnp.asarray(p, dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p

    return dataclasses.replace(self, params=jax.tree.map(cast, self.params))

  def check_species(self, numbers: np.ndarray, *, where: str = "structure") -> np.ndarray:
    """Returns ``numbers`` as [n] int32 after checking that the model can handle every element.

    Raises:
      ValueError: for an atomic number outside the model's tables or, when references are set,
        without a reference energy (the checkpoint never saw that element).
    """
    numbers = np.asarray(numbers)
    if numbers.ndim != 1 or numbers.dtype.kind not in "iu":
      raise ValueError(f"{where}: atomic numbers must be a [n] integer array, got shape "
                       f"{numbers.shape} dtype {numbers.dtype}")
    bad = (numbers < 1) | (numbers >= self.config.num_species)
    if bad.any():
      raise ValueError(f"{where}: atomic number {int(numbers[bad][0])} is outside the model's "
                       f"range 1..{self.config.num_species - 1}")
    if self.reference_energies:
      missing = sorted({int(z) for z in numbers} - set(self.reference_energies))
      if missing:
        raise ValueError(f"{where}: no reference energy for element(s) Z={missing}: the model was "
                         f"trained on Z={sorted(self.reference_energies)} only")
    return numbers.astype(np.int32)

  def reference_energy(self, numbers: np.ndarray) -> float:
    """sum_i ref[Z_i] in eV, in float64 on the host (0 without references)."""
    return float(sum(self.reference_energies.get(int(z), 0.0) for z in np.asarray(numbers)))

  def reference_table(self) -> np.ndarray:
    """[num_species] float64 reference energy per atomic number (0 where none is set)."""
    table = np.zeros(self.config.num_species)
    for z, energy in self.reference_energies.items():
      if 0 < int(z) < len(table):
        table[int(z)] = energy
    return table

  def model_energy(self, graph: Graph) -> jax.Array:
    """[B] network energies (reference-subtracted when references are set); jittable."""
    return self.model.apply(self.params, graph).energy

  def total_energy(self, graph: Graph) -> jax.Array:
    """[B] total energies: network energy plus the reference energies of each molecule's atoms."""
    table = jnp.asarray(self.reference_table(), graph.positions.dtype)
    atom_ref = table[graph.species] * graph.node_mask.astype(table.dtype)  # [N]
    reference = jax.ops.segment_sum(atom_ref, graph.molecule_index, graph.num_molecules)  # [B]
    return self.model_energy(graph) + reference * graph.molecule_mask.astype(table.dtype)
