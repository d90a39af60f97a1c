"""Graphs from neighbour slots: structures packed into a padded Graph on the host
(:func:`build_graph`), and one system's device-selected slots as a Graph inside ``jit``
(:func:`system_graph`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from e2former_jax.graph import Graph
from e2former_jax.neighbors.host import neighbor_list
from e2former_jax.neighbors.reference import reference_neighbor_slots
from e2former_jax.neighbors.select import ModelNeighbors

if TYPE_CHECKING:
  from e2former_jax.structure import Structure

# Atoms enter a system's graph in Morton order of cubes of this side (angstrom; a few atoms each at
# condensed-phase density), and 10 bits per axis (1024 cubes, 2 um) cover any simulation box.
SPATIAL_ORDER_BIN = 2.0
MORTON_BITS = 10


def build_graph(structures: Sequence["Structure"], *, cutoff: float, max_neighbors: int,
                num_nodes: int | None = None, num_molecules: int | None = None,
                dtype: np.dtype = np.float32, periodic: bool | None = None,
                reference_slots: bool = False) -> Graph:
  """Packs structures into one padded :class:`Graph` (host numpy arrays) with static shapes.

  Real atoms fill the first slots in order (molecule 0's atoms, then molecule 1's, ...). Padding:

  * atom slots beyond the real atoms: species 0, position 0, ``node_mask`` False, no edges, and
    ``molecule_index = num_molecules - 1`` (the last molecule slot; when every molecule slot is real
    that slot is a real molecule, so every per-molecule reduction must weight atoms by
    ``node_mask``; leaving one spare molecule slot makes padding land on a padded molecule);
  * molecule slots beyond the structures: charge 0, spin 0, ``molecule_mask`` False, zero cell;
  * neighbour slots: sentinel ``num_nodes``, ``nbr_mask`` False, zero ``nbr_shift``.

  A structure is periodic when its ``pbc`` is True along some axis; its neighbours are periodic
  images (``nbr_shift = S @ cell``, positions kept as given, not wrapped) and its cell goes to
  ``Graph.cell``. Every other structure is a molecule and gets exactly the graph it would get
  without this feature (its ``cell``, if any, is ignored).

  Structures are not validated here (see :func:`e2former_jax.structure.validate_structure`); a
  periodic structure's cell is checked by the neighbour search.

  Args:
    structures: the molecules and periodic cells, each a
      :class:`~e2former_jax.structure.Structure`.
    cutoff: neighbour cutoff in angstrom (inclusive).
    max_neighbors: K, neighbour slots per atom.
    num_nodes: N, atom slots (default: the total number of atoms).
    num_molecules: B, molecule slots (default: the number of structures).
    dtype: float dtype of positions, shifts and cells.
    periodic: whether the Graph carries ``cell`` (the model then adds the image-shift term, see
      docs/decisions.md D11). None: only when some structure is periodic; True: always (zero cells
      for molecules), which keeps one pytree structure, hence one compilation, for a data set that
      mixes molecules and cells; False: never, and a periodic structure is an error.
    reference_slots: fill each molecule's slots as the authors' code does
      (:mod:`~e2former_jax.neighbors.reference`; ``E2FormerConfig.reference_slots``): masked
      slots hold the next-nearest atoms beyond the cutoff. Molecules only.

  Returns:
    The padded Graph, N = num_nodes, K = max_neighbors, B = num_molecules.

  Raises:
    ValueError: when the atoms or molecules do not fit the requested padding, on a bad cell, or on
      a periodic structure with ``periodic=False`` or ``reference_slots``.
  """
  sizes = np.array([len(s.numbers) for s in structures], np.int64)  # [M]
  total = int(sizes.sum())
  n_pad = total if num_nodes is None else int(num_nodes)
  b_pad = len(structures) if num_molecules is None else int(num_molecules)
  if total > n_pad:
    raise ValueError(f"{total} atoms do not fit num_nodes={n_pad}")
  if len(structures) > b_pad or b_pad < 1:
    raise ValueError(f"{len(structures)} structures do not fit num_molecules={b_pad}")
  is_periodic = np.array([s.pbc is not None and any(s.pbc) for s in structures], bool)  # [M]
  if periodic is False and is_periodic.any():
    s = structures[int(np.argmax(is_periodic))]
    raise ValueError(f"periodic structure {s.key or ''!r} (pbc={s.pbc}) in a build_graph call "
                     f"with periodic=False")
  if reference_slots and is_periodic.any():
    s = structures[int(np.argmax(is_periodic))]
    raise ValueError(f"periodic structure {s.key or ''!r}: the authors' softmax sink "
                     f"(SoftmaxSink.MAX_LOGIT) is reproduced for molecules only; use "
                     f"softmax_sink=zero for periodic cells")
  k = int(max_neighbors)

  molecule = np.repeat(np.arange(len(structures)), sizes)  # [total]
  starts = np.cumsum(sizes) - sizes  # [M]
  if structures:
    positions = np.concatenate([np.asarray(s.positions, np.float64).reshape(-1, 3)
                                for s in structures])
    species = np.concatenate([np.asarray(s.numbers) for s in structures]).astype(np.int32)
  else:
    positions, species = np.zeros((0, 3)), np.zeros(0, np.int32)
  nbr_idx = np.full((n_pad, k), n_pad, np.int32)
  nbr_mask = np.zeros((n_pad, k), bool)
  nbr_shift = np.zeros((n_pad, k, 3), np.float64)
  cell = np.zeros((b_pad, 3, 3), np.float64)
  # Molecules: one search over all of them, segments keeping them apart.
  atoms = np.flatnonzero(~is_periodic[molecule]) if structures else np.zeros(0, np.int64)
  search = reference_neighbor_slots if reference_slots else neighbor_list
  nbrs = search(positions[atoms], cutoff, k, segments=molecule[atoms])
  holds = nbrs.idx < len(atoms)  # the mask, or more with reference slots
  nbr_idx[atoms] = np.where(holds, atoms[np.where(holds, nbrs.idx, 0)], n_pad)
  nbr_mask[atoms] = nbrs.mask
  # Periodic cells: one search each.
  for m in np.flatnonzero(is_periodic):
    s, rows = structures[m], slice(starts[m], starts[m] + sizes[m])
    nbrs = neighbor_list(positions[rows], cutoff, k, cell=s.cell, pbc=s.pbc)
    cell[m] = s.cell
    nbr_idx[rows] = np.where(nbrs.mask, nbrs.idx + starts[m], n_pad)
    nbr_mask[rows] = nbrs.mask
    nbr_shift[rows] = nbrs.shifts @ cell[m]

  pos = np.zeros((n_pad, 3), dtype)
  pos[:total] = positions
  spec = np.zeros(n_pad, np.int32)
  spec[:total] = species
  node_mask = np.zeros(n_pad, bool)
  node_mask[:total] = True
  molecule_index = np.full(n_pad, b_pad - 1, np.int32)
  molecule_index[:total] = molecule
  charge = np.zeros(b_pad, np.int32)
  spin = np.zeros(b_pad, np.int32)
  charge[:len(structures)] = [s.charge for s in structures]
  spin[:len(structures)] = [s.spin for s in structures]
  molecule_mask = np.zeros(b_pad, bool)
  molecule_mask[:len(structures)] = True
  with_cell = is_periodic.any() if periodic is None else periodic
  return Graph(positions=pos, species=spec, node_mask=node_mask, molecule_index=molecule_index,
               nbr_idx=nbr_idx, nbr_mask=nbr_mask, nbr_shift=nbr_shift.astype(dtype), charge=charge,
               spin=spin, molecule_mask=molecule_mask,
               cell=cell.astype(dtype) if with_cell else None)


def spatial_order(position: Float[Array, "N 3"]) -> Int[Array, "N"]:
  """The permutation listing atoms along a Morton (Z-order) curve of SPATIAL_ORDER_BIN cubes.

  Consecutive atoms of the result are near each other in space, so the attention kernels' neighbour
  gathers of consecutive target atoms share cache lines (6 % faster forces at 100k water atoms given
  in random order, H100). Positions are only read (integer result, no derivative).
  """
  position = jax.lax.stop_gradient(position)
  cells = jnp.floor((position - position.min(axis=0)) / SPATIAL_ORDER_BIN).astype(jnp.int32)
  cells = jnp.clip(cells, 0, 2**MORTON_BITS - 1)  # [N, 3]
  key = jnp.zeros(position.shape[0], jnp.int32)
  for bit in range(MORTON_BITS):  # interleave x, y, z bit by bit
    for axis in range(3):
      key = key | (((cells[:, axis] >> bit) & 1) << (3 * bit + axis))
  return jnp.argsort(key).astype(jnp.int32)


def system_graph(position: Float[Array, "N 3"], species: Int[ArrayLike, "N"], nbrs: ModelNeighbors,
                 charge: Int[ArrayLike, ""], spin: Int[ArrayLike, ""],
                 cell: Float[Array, "3 3"] | None = None) -> Graph:
  """One system of N real atoms as a Graph (B = 1), for the model; ``cell`` if periodic.

  The atoms enter the graph in :func:`spatial_order` (the energy does not depend on the order; the
  derivative of the reordering returns forces in the caller's order). JAX MD's own order is
  arbitrary: atoms of a liquid diffuse, and builders place molecules in any order.
  """
  n = position.shape[0]
  order = spatial_order(position)  # [N] new -> old
  new_index = jnp.zeros(n + 1, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32)).at[n].set(n)
  position, species = position[order], species[order]
  nbrs = ModelNeighbors(idx=new_index[nbrs.idx[order]], mask=nbrs.mask[order], shift=nbrs.shift[order],
                        count=nbrs.count[order])
  # Under jit the closed-over species, the all-ones mask and the all-zero molecule index are
  # constants, and with the closed-over weights XLA would fold every per-atom embedding lookup into
  # an [N, C] constant of the executable (1.15 GB at 100k atoms in the paper configuration, per
  # compiled function). Species are gathered by the position-dependent order above; the barrier
  # keeps the mask and index plain [N] values too.
  node_mask, molecule_index = jax.lax.optimization_barrier((jnp.ones(n, bool), jnp.zeros(n, jnp.int32)))
  return Graph(positions=position, species=species, node_mask=node_mask,
               molecule_index=molecule_index, nbr_idx=nbrs.idx, nbr_mask=nbrs.mask,
               nbr_shift=nbrs.shift.astype(position.dtype),
               charge=jnp.reshape(jnp.asarray(charge, jnp.int32), (1,)),
               spin=jnp.reshape(jnp.asarray(spin, jnp.int32), (1,)), molecule_mask=jnp.ones(1, bool),
               cell=None if cell is None else cell.astype(position.dtype)[None])

