"""JAX MD's own ``Dense`` neighbour list in free space, with the atoms placed in its cell-list box.

JAX MD's cell list covers [0, box) and misses pairs of atoms outside it, so this list hands it the
positions translated into the box itself: positions can be anywhere, and the box (None: sized from
the positions at allocation) only needs to hold the molecule's extent. Needs ``jax-md`` (the ``md``
extra), imported when the list is made, so that the rest of the package imports without it.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

if TYPE_CHECKING:
  from jax_md import partition

# Room (angstrom) on every side of the atoms' extent in a cell-list box sized at allocation; the
# atoms may spread this much before the list has to be re-allocated.
FREE_SPACE_MARGIN = 20.0


def free_space_neighbor_list(displacement_fn: Callable[..., Array], box: float | None,
                             cutoff: float, **neighbor_kwargs) -> partition.NeighborListFns:
  """A JAX MD ``Dense`` neighbour list in free space that places the atoms in its cell-list box.

  JAX MD's cell list covers [0, box). This list hands it the positions translated so that their
  bounding box sits in the middle of the box, at allocation and at every update: pair distances do
  not change, and the rebuild test (has some atom moved half the skin since the last rebuild?) is as
  valid relative to the moving centre as in fixed coordinates, since a common translation changes
  no distance. When the atoms spread wider than the box, the overflow flag is set, so the caller
  re-allocates (``e2former_jax.interop.jax_md.run`` does; a list sized from the positions grows).

  Args:
    displacement_fn: ``space.free()``'s.
    box: side of the cell-list box in angstrom (``allocate`` raises ValueError when the atoms span
      more); None: the atoms' extent at allocation plus ``FREE_SPACE_MARGIN`` on every side.
    cutoff: candidate radius (the skin ``dr_threshold`` is added by JAX MD).
    **neighbor_kwargs: for ``jax_md.partition.neighbor_list`` (``dr_threshold``,
      ``capacity_multiplier``, ``disable_cell_list``).
  """
  from jax_md import partition
  from jax_md.partition import PartitionErrorCode

  def allocate(position, extra_capacity: int = 0, **kwargs) -> partition.NeighborList:
    extent = float(np.ptp(np.asarray(position), axis=0).max())
    side = box if box is not None else extent + 2 * FREE_SPACE_MARGIN
    if extent >= side:
      raise ValueError(f"the atoms span {extent:.1f} A, more than the cell-list box of {side} A; pass "
                       "a larger box, or box=None to size it from the positions")
    inner = partition.neighbor_list(displacement_fn, side, cutoff,
                                    format=partition.NeighborListFormat.Dense, **neighbor_kwargs)

    def update(position, neighbors, **kwargs) -> partition.NeighborList:
      updated = inner.update(_centred(position, side), neighbors, **kwargs)
      if updated.cell_list_fn is None:  # no cell list: the box does not matter
        return updated
      spread = jnp.any(jnp.ptp(position, axis=0) >= side)
      return dataclasses.replace(updated, error=updated.error.update(
          PartitionErrorCode.CELL_LIST_OVERFLOW, spread))

    # Updates keep the update function of the list they start from: this one, which centres.
    return dataclasses.replace(inner.allocate(_centred(position, side), extra_capacity, **kwargs),
                               update_fn=update)

  return partition.NeighborListFns(allocate, lambda position, neighbors, **kwargs:
                                   neighbors.update(position, **kwargs))


def _centred(position, side: float):
  """Positions translated so that their bounding box is centred in the cube [0, side)^3."""
  position = jnp.asarray(position)
  return position - 0.5 * (position.min(axis=0) + position.max(axis=0)) + 0.5 * side
