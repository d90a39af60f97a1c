"""A trained model ready for simulation: the network, its weights and its reference energies.

Training fits reference energies (per element, per total charge, per spin multiplicity; see
:mod:`e2former_jax.reference_energies`) and the network learns the remainder, so a total energy is
``E = E_model + E_ref(Z, q, 2S+1)``. The reference term does not depend on positions: forces and
stresses come from the network alone.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike
from jaxtyping import Array, ArrayLike, Float, Int

from e2former_jax.config import AttentionImpl, E2FormerConfig, Precision
from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former
from e2former_jax.reference_energies import ReferenceEnergies


class DirectForcesOnlyWarning(UserWarning):
  """The model's conservative forces -dE/dx were never trained (it was fitted with a direct head)."""


@dataclasses.dataclass(frozen=True, eq=False)
class Predictor:
  """Network, weights and reference energies: what the JAX MD and ASE interfaces consume.

  Build one from a training checkpoint with ``train.checkpoint.load_predictor`` (the checkpoint
  format belongs to ``train/``, which this package does not import), or from any
  ``(model, params)``.

  Attributes:
    model: the network.
    params: its variables, ``{"params": ...}``.
    reference_energies: added to the network's energy (a :class:`ReferenceEnergies`, or a plain
      ``{atomic number: eV}`` mapping for per-element references only); empty when the network
      predicts total energies itself (e.g. random weights).
    conservative_forces_trained: whether the weights were trained on -dE/dx; False for a model
      fitted with the direct force head only, whose -dE/dx (what every simulation interface uses)
      was never fitted: :meth:`warn_if_untrained_forces` says so. None when unknown.
  """

  model: E2Former
  params: Any
  reference_energies: ReferenceEnergies | Mapping[int, float] = dataclasses.field(
      default_factory=ReferenceEnergies)
  conservative_forces_trained: bool | None = None

  def __post_init__(self):
    if not isinstance(self.reference_energies, ReferenceEnergies):
      object.__setattr__(self, "reference_energies",
                         ReferenceEnergies(elements=self.reference_energies))

  @property
  def config(self) -> E2FormerConfig:
    return self.model.config

  def with_compute(self, *, attention_impl: AttentionImpl | None = None, remat: bool | None = None,
                   edge_chunk_atoms: int | None = None, auto_memory: bool | None = None) -> Predictor:
    """The same weights computed another way (no choice changes the parameters or the numbers).
    Each argument left None keeps the current choice.

    Args:
      attention_impl: attention implementation (default AUTO: Pallas on GPU, XLA on CPU).
      remat: rematerialise blocks and radial MLPs in the force pass (less memory for large
        systems, slower; ``E2FormerConfig.remat``).
      edge_chunk_atoms: evaluate the radial MLPs in chunks of this many atoms
        (``E2FormerConfig.edge_chunk_atoms``).
      auto_memory: add chunks and then rematerialisation per structure when energy + forces would
        not fit the device's free memory otherwise (default True; ``E2FormerConfig.auto_memory``).
    """
    changes = {k: v for k, v in (("attention_impl", attention_impl), ("remat", remat),
                                 ("edge_chunk_atoms", edge_chunk_atoms),
                                 ("auto_memory", auto_memory)) if v is not None}
    return dataclasses.replace(self, model=E2Former(self.config.replace(**changes)))

  def with_dtype(self, dtype) -> Predictor:
    """The whole computation in ``dtype`` (e.g. float64 for energy-conservation checks): the weights
    cast to it, and no bfloat16 products (``Precision.FULL``, whatever the device)."""
    def cast(p):
      return jnp.asarray(p, dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p

    return dataclasses.replace(self, model=E2Former(self.config.replace(precision=Precision.FULL)),
                               params=jax.tree.map(cast, self.params))

  def warn_if_untrained_forces(self, where: str) -> None:
    """Warns (:class:`DirectForcesOnlyWarning`) when -dE/dx was never trained."""
    if self.conservative_forces_trained is False:
      warnings.warn(
          f"{where}: this model was trained with direct forces only (loss.forces=direct); the "
          "forces used here are -dE/dx, which that training never fitted and which can be as wrong "
          "as zero forces (molecules deform within ~100 fs of MD). Train with "
          "loss.forces=conservative, or fine-tune this checkpoint with train.init_from.",
          DirectForcesOnlyWarning, stacklevel=3)

  def check_species(self, numbers: Int[ArrayLike, "n"], *, where: str = "structure"
                    ) -> Int[np.ndarray, "n"]:
    """Returns ``numbers`` as int32 after checking that the model can handle every element.

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
    self.reference_energies.check(numbers, where=where)
    return numbers.astype(np.int32)

  def reference_energy(self, numbers: Int[ArrayLike, "n"], charge: int = 0, spin: int = 1) -> float:
    """E_ref of one structure in eV, in float64 on the host (0 without references).

    Raises:
      ValueError: for an element the references were not fitted to (a charge or multiplicity
        without an offset only warns: :class:`~e2former_jax.reference_energies.UnfittedStateWarning`).
    """
    return self.reference_energies.energy(numbers, charge, spin)

  def model_energy(self, graph: Graph) -> Float[Array, "B"]:
    """Network energies (reference-subtracted when references are set); jittable."""
    return self.model.apply(self.params, graph).energy

  def total_energy(self, graph: Graph) -> Float[Array, "B"]:
    """Total energies: network energy plus each molecule's reference energy; jittable.

    Charges and multiplicities without a fitted offset contribute nothing (the host-side
    :meth:`reference_energy` also warns).
    """
    dtype = graph.positions.dtype
    table = jnp.asarray(self.reference_energies.element_table(self.config.num_species), dtype)
    atom_ref = table[graph.species] * graph.node_mask.astype(dtype)  # [N]
    reference = jax.ops.segment_sum(atom_ref, graph.molecule_index, graph.num_molecules)  # [B]
    reference = reference + self.state_offset(graph.charge, graph.spin, dtype)
    return self.model_energy(graph) + reference * graph.molecule_mask.astype(dtype)

  def state_offset(self, charge: Int[ArrayLike, "*batch"], spin: Int[ArrayLike, "*batch"],
                   dtype: DTypeLike = jnp.float32) -> Float[Array, "*batch"]:
    """c[q] + s[2S+1] of the references for (traced) charges and multiplicities; jittable.

    Values without a fitted offset give 0.
    """
    refs = self.reference_energies
    offset = jnp.zeros(jnp.shape(charge), dtype)
    for state, offsets in ((charge, refs.charges), (spin, refs.multiplicities)):
      for value, energy in (offsets or {}).items():
        offset = offset + jnp.where(state == value, energy, 0.0).astype(dtype)
    return offset
