"""The batch of structures the model consumes: disjoint molecular graphs with static shapes.

All arrays have static, padded shapes so that ``jax.jit`` compiles once per shape bucket:

* N atom slots (real atoms first or interleaved; ``node_mask`` tells which are real),
* K neighbour slots per atom (``nbr_mask`` tells which are real),
* B molecule slots (``molecule_mask`` tells which are real).

Neighbour convention: slot ``(i, k)`` is a directed edge from source ``j = nbr_idx[i, k]`` to target
``i``. Empty slots hold the sentinel ``j = N`` (one past the last atom, as in jax_md's dense lists)
and are always masked; every gather uses ``mode="fill"`` so the sentinel reads zeros. The source
position of a slot is ``positions[j] + nbr_shift[i, k]`` (``nbr_shift`` is the Cartesian lattice
shift of a periodic image, zero for molecules), and the edge vector is target minus source,
``r_ij = x_i - (x_j + shift_ij)`` (docs/model.md §3.5).

Periodicity is a static property of the pytree: ``cell`` is None for a batch of molecules (every
``nbr_shift`` is then zero and the model runs its molecular code path unchanged) and a [B, 3, 3]
array when the batch holds periodic cells (the images enter the model only through the edge
vectors, docs/model.md §3.4, docs/decisions.md D11). A molecule inside a periodic batch has a zero
cell.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int, Shaped


@flax.struct.dataclass
class Graph:
  """A padded batch of B molecules with N atom slots and K neighbour slots per atom.

  Host numpy arrays from ``build_graph``, device arrays (or tracers) inside the model.

  Attributes:
    positions: Cartesian coordinates in angstrom.
    species: int32 atomic numbers, 0 on padded atom slots.
    node_mask: True for real atoms.
    molecule_index: int32 in [0, B): the molecule of each atom (any valid slot for padding).
    nbr_idx: int32 source atom of each neighbour slot; N (sentinel) on empty slots.
    nbr_mask: True for real edges (within the cutoff, both atoms real).
    nbr_shift: Cartesian shift of the source image (zeros without periodicity).
    charge: int32 total charge of each molecule.
    spin: int32 spin multiplicity 2S+1 of each molecule (0 = unspecified).
    molecule_mask: True for real molecules.
    cell: lattice vectors (rows) of each periodic structure, zero for molecules and padding; None
      when no structure of the batch is periodic. ``nbr_shift`` of an atom of structure b is an
      integer combination of the rows of ``cell[b]``.
  """

  positions: Float[ArrayLike, "N 3"]
  species: Int[ArrayLike, "N"]
  node_mask: Bool[ArrayLike, "N"]
  molecule_index: Int[ArrayLike, "N"]
  nbr_idx: Int[ArrayLike, "N K"]
  nbr_mask: Bool[ArrayLike, "N K"]
  nbr_shift: Float[ArrayLike, "N K 3"]
  charge: Int[ArrayLike, "B"]
  spin: Int[ArrayLike, "B"]
  molecule_mask: Bool[ArrayLike, "B"]
  cell: Float[ArrayLike, "B 3 3"] | None = None

  @property
  def num_nodes(self) -> int:
    return self.positions.shape[0]

  @property
  def num_neighbors(self) -> int:
    return self.nbr_idx.shape[1]

  @property
  def num_molecules(self) -> int:
    return self.charge.shape[0]

  @property
  def periodic(self) -> bool:
    """Whether the batch carries cells (static: decided by the pytree structure)."""
    return self.cell is not None

  def gather_sources(self, x: Shaped[ArrayLike, "N *rest"]) -> Shaped[Array, "N K *rest"]:
    """x[nbr_idx] with zeros on empty slots."""
    return jnp.take(x, self.nbr_idx, axis=0, mode="fill", fill_value=0)

  @property
  def slot_holds_atom(self) -> Bool[ArrayLike, "N K"]:
    """Slots whose index is an atom (not the sentinel), masked or not. Graphs built
    with ``reference_slots`` (``e2former_jax.neighbors.build_graph``) hold atoms beyond the cutoff
    in some masked slots; otherwise this equals ``nbr_mask``."""
    return self.nbr_idx < self.num_nodes

  def edge_vectors(self, positions: Float[ArrayLike, "N 3"] | None = None, *,
                   where: Bool[ArrayLike, "N K"] | None = None) -> Float[Array, "N K 3"]:
    """r_ij = x_i - (x_j + shift_ij) on the slots ``where`` (default ``nbr_mask``), zero
    elsewhere."""
    x = self.positions if positions is None else positions
    vec = x[:, None, :] - (self.gather_sources(x) + self.nbr_shift)
    return jnp.where((self.nbr_mask if where is None else where)[..., None], vec, 0.0)
