"""Periodic neighbour list on device: jittable, static shapes, for molecular-dynamics updates.

The same relation as the host search (:func:`~e2former_jax.neighbors.host.neighbor_list`): every
atom's K nearest lattice images ``x_j + S @ cell`` within the cutoff (other atoms' and its own),
with integer shifts S relative to the positions as given. Only the order of ties may differ: the
host breaks distance ties by (source, shift), this search by candidate position; with K larger than
every neighbour count both give the same slots up to their order, which the model does not see.

Algorithm (a cell list with static capacity, in the spirit of jax_md's dense neighbour lists):

1. wrap the atoms into the cell (fractional coordinates in [0, 1) along periodic axes) and bin them
   on a static ``bins`` grid in fractional coordinates; atoms outside the cell along a non-periodic
   axis are clamped into the edge bins, which only adds candidates;
2. each atom's candidates are the atoms of the bins within ``reach`` bins of its own along each
   axis, each offset with its lattice image (an offset that wraps around a periodic axis carries
   the image shift; one past the edge of a non-periodic axis is empty). Distinct offsets are
   distinct (bin, image) pairs, so a cell narrower than the cutoff (one bin, reach > 1) visits
   several images of the same atoms and never one twice;
3. the K nearest within the cutoff (:func:`~e2former_jax.neighbors.select.nearest_within`).

Memory is O(N D capacity) with D = prod(2 reach + 1) offsets (27 for a cell wider than the cutoff
along every axis): linear in the atoms. The grid is fixed at allocation (:func:`cell_grid`, on the
host); ``overflow`` reports when the current positions or cell no longer fit it (a bin holds more
than ``capacity`` atoms, or the cell shrank so that ``reach`` bins no longer span the cutoff), and
the caller re-allocates, as with jax_md's ``did_buffer_overflow``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from e2former_jax import lattice
from e2former_jax.neighbors import periodic
from e2former_jax.neighbors.host import check_cutoff
from e2former_jax.neighbors.select import nearest_within

# Default slack of a bin's capacity over the fullest bin at allocation: density fluctuations in a
# liquid stay well inside 1.5x over the steps between two re-allocations.
CAPACITY_FACTOR = 1.5
# Extra atoms per bin on top of the factor, for nearly empty bins (a few atoms move in and out).
CAPACITY_MARGIN = 4


@dataclasses.dataclass(frozen=True)
class CellGrid:
  """Static binning of a cell (hashable: a jit static argument).

  Attributes:
    bins: bins along each lattice vector.
    reach: bins searched on each side of an atom's own bin along each lattice vector.
    capacity: atoms one bin holds.
  """

  bins: tuple[int, int, int]
  reach: tuple[int, int, int]
  capacity: int

  @property
  def num_bins(self) -> int:
    return int(np.prod(self.bins))

  @property
  def offsets(self) -> np.ndarray:
    """[D, 3] int32 bin offsets searched around each atom's bin."""
    return periodic.lattice_range(self.reach).astype(np.int32)


class DeviceNeighborList(NamedTuple):
  """K nearest lattice images within the cutoff (device arrays).

  Attributes:
    idx: int32 source atom of each slot; N (sentinel) on empty slots.
    mask: True on real slots.
    shifts: int32 lattice image S of the source: the source sits at x_j + S @ cell
      (``Graph.nbr_shift = shifts @ cell``); zero on empty slots.
    overflow: True when the result may be incomplete (re-allocate with :func:`cell_grid`).
  """

  idx: Int[Array, "N K"]
  mask: Bool[Array, "N K"]
  shifts: Int[Array, "N K 3"]
  overflow: Bool[Array, ""]


def cell_grid(positions: Float[ArrayLike, "n 3"], cell: Float[ArrayLike, "3 3"],
              pbc: bool | Sequence[bool], cutoff: float, *, margin: float = 0.0,
              capacity_factor: float = CAPACITY_FACTOR) -> CellGrid:
  """Allocates the grid of :func:`device_neighbor_list` for a cell and its current atoms (host).

  Bins are at least ``cutoff (1 + margin)`` wide, so one bin of reach suffices unless the cell is
  narrower than that (then a single bin with a reach of several images); ``margin`` leaves room
  for a cell that shrinks under constant pressure.

  Args:
    positions: positions (real atoms only) in angstrom.
    cell: lattice vectors (rows).
    pbc: a bool or three bools.
    cutoff: the search radius (include any Verlet skin).
    margin: relative slack of the bin width over the cutoff.
    capacity_factor: capacity over the fullest bin now.

  Raises:
    ValueError: on a bad cell or cutoff.
  """
  cell, pbc = lattice.check_cell(cell, pbc)
  check_cutoff(cutoff)
  width = cutoff * (1.0 + margin)
  spacings = lattice.plane_spacings(cell)  # [3]
  bins = np.maximum(np.floor(spacings / width), 1).astype(np.int64)  # [3]
  reach = np.ceil(width / (spacings / bins)).astype(np.int64)  # [3]
  bin_of = _bin_coordinates(np.asarray(positions, np.float64) @ np.linalg.inv(cell), bins, pbc)
  keys = np.ravel_multi_index(tuple(bin_of.T), tuple(bins))
  fullest = int(np.bincount(keys, minlength=1).max(initial=0))
  capacity = int(np.ceil(fullest * capacity_factor)) + CAPACITY_MARGIN
  return CellGrid(bins=tuple(int(b) for b in bins), reach=tuple(int(r) for r in reach),
                  capacity=capacity)


def _bin_coordinates(frac, bins, pbc):
  """[n, 3] bin of each fractional position (wrapped along periodic axes, clamped along the others).

  Works on numpy and jax arrays alike.
  """
  xp = jnp if isinstance(frac, jax.Array) else np
  wrapped = xp.where(xp.asarray(pbc), frac - xp.floor(frac), frac)
  # Clamping keeps floor(f * bins) differences monotone and no larger, so no pair within reach is
  # lost; it also absorbs f - floor(f) rounding to exactly 1.
  return xp.clip(xp.floor(wrapped * bins), 0, xp.asarray(bins) - 1).astype(xp.int32)


@functools.partial(jax.jit, static_argnames=("pbc", "cutoff", "max_neighbors", "grid"))
def device_neighbor_list(positions: Float[Array, "N 3"], cell: Float[Array, "3 3"], *,
                         pbc: tuple[bool, bool, bool], cutoff: float, max_neighbors: int,
                         grid: CellGrid, node_mask: Bool[Array, "N"] | None = None
                         ) -> DeviceNeighborList:
  """Periodic K-nearest neighbour list within the cutoff, on device (see the module docstring).

  Args:
    positions: Cartesian positions in angstrom (need not lie inside the cell).
    cell: lattice vectors (rows), non-singular (checked on the host by :func:`cell_grid`).
    pbc: three bools (static).
    cutoff: inclusive radius in angstrom (static).
    max_neighbors: K (static).
    grid: the static binning from :func:`cell_grid`.
    node_mask: optional; atoms where it is False (padding) have no neighbours and are
      nobody's neighbour.

  Returns:
    A :class:`DeviceNeighborList`.
  """
  n = positions.shape[0]
  dtype = positions.dtype
  pbc_arr = jnp.asarray(pbc)
  bins = jnp.asarray(grid.bins, jnp.int32)  # [3]
  strides = jnp.asarray([grid.bins[1] * grid.bins[2], grid.bins[2], 1], jnp.int32)  # [3]
  node_mask = jnp.ones(n, bool) if node_mask is None else node_mask

  frac, offsets, wrapped = periodic.wrap(positions, cell, pbc)  # [N, 3] each
  own_bin = _bin_coordinates(frac, bins, pbc)  # [N, 3]

  # Bin table [num_bins + 1, capacity]: atoms of each bin, sentinel N elsewhere; the extra last
  # row stays empty and stands for offsets past the edge of a non-periodic axis.
  key = jnp.where(node_mask, own_bin @ strides, grid.num_bins)  # [N], padding after every bin
  order = jnp.argsort(key, stable=True)  # [N]
  sorted_key = key[order]
  rank = jnp.arange(n) - jnp.searchsorted(sorted_key, sorted_key, side="left")  # [N] slot in bin
  table = jnp.full((grid.num_bins + 1, grid.capacity), n, jnp.int32)
  table = table.at[sorted_key, rank].set(order.astype(jnp.int32), mode="drop")
  table = table.at[grid.num_bins].set(n)  # padding atoms are nobody's candidates
  full = jnp.any((rank >= grid.capacity) & (sorted_key < grid.num_bins))

  # Candidates [N, D * capacity] with the lattice image of their bin offset.
  around = own_bin[:, None, :] + jnp.asarray(grid.offsets)[None]  # [N, D, 3] unwrapped bins
  image = jnp.where(pbc_arr, jnp.floor_divide(around, bins), 0)  # [N, D, 3]
  inside = jnp.all(pbc_arr | ((around >= 0) & (around < bins)), axis=-1)  # [N, D]
  neighbor_bin = jnp.where(inside, (around - image * bins) @ strides, grid.num_bins)  # [N, D]
  candidate = table[neighbor_bin]  # [N, D, capacity]
  source = jnp.take(wrapped, candidate, axis=0, mode="fill", fill_value=0)  # [N, D, capacity, 3]
  source = source + (image.astype(dtype) @ cell)[:, :, None, :]
  d2 = jnp.sum((wrapped[:, None, None, :] - source) ** 2, axis=-1)  # [N, D, capacity]
  is_self = (candidate == jnp.arange(n)[:, None, None]) & ~jnp.any(image != 0, axis=-1)[..., None]
  real = (candidate < n) & ~is_self & node_mask[:, None, None]  # [N, D, capacity]
  pick, idx, mask, _ = nearest_within(d2.reshape(n, -1), candidate.reshape(n, -1),
                                      real.reshape(n, -1), cutoff, max_neighbors)  # [N, K] each
  picked_image = jnp.take_along_axis(image, (pick // grid.capacity)[..., None], axis=1)  # [N, K, 3]
  # Found between the wrapped atoms: relative to the positions as given the shift is corrected.
  shifts = periodic.untranslated_shifts(picked_image, offsets, jnp.where(mask, idx, 0))
  # The grid spans the cutoff only while reach bins are at least a cutoff wide.
  too_narrow = jnp.any(lattice.plane_spacings(cell) / bins * jnp.asarray(grid.reach) < cutoff)
  return DeviceNeighborList(idx=idx, mask=mask,
                            shifts=jnp.where(mask[..., None], shifts, 0).astype(jnp.int32),
                            overflow=full | too_narrow)
