"""The all-images neighbour list of a periodic box of any width, in JAX MD's style.

A JAX MD neighbour list holds one (minimum) image per pair, which is the model's relation only when
every lattice plane spacing exceeds twice the cutoff (:mod:`~e2former_jax.neighbors.box`). In a
narrower cell one atom has several images within the cutoff (its own included); this list holds
them all. It is JAX MD-shaped: ``neighbor_fn.allocate(position, extra_capacity=0, box=...)`` on the
host, ``nbrs.update(position, box=...)`` inside ``jit``, ``nbrs.did_buffer_overflow``, so JAX MD's
integrators and ``e2former_jax.interop.jax_md.run`` use it unchanged.

Its candidates are lattice images ``(j, S)`` within ``cutoff + skin``, with integer image shifts S:
from the host search (:func:`~e2former_jax.neighbors.host.neighbor_list`) at allocation, from the
device search (:func:`~e2former_jax.neighbors.device.device_neighbor_list`) at every rebuild inside
``update``. The model's K nearest within the cutoff are selected at the current positions by
:func:`~e2former_jax.neighbors.select.select_image_neighbors` with ``nbr_shift = S @ cell`` (the cell
of the current box, so ``box=`` and a strain move the shifts with the positions: NPT and stress
work). Positions wrapped back into the box between rebuilds are followed: S is corrected by the
whole lattice translations of both atoms since the rebuild.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from e2former_jax.neighbors.box import Box, box_to_cell, host_cell
from e2former_jax.neighbors.device import CellGrid, cell_grid, device_neighbor_list
from e2former_jax.neighbors.host import NeighborList, check_cutoff, neighbor_list

# Default skin (angstrom) of the candidate list: it is rebuilt only after some atom moved half of
# it, and pairs entering the cutoff within one step are never missed. 0.5 A is far more than an
# atom moves in a step at a 0.5-1 fs time step.
DEFAULT_SKIN = 0.5
# Capacity headroom of a new candidate list (JAX MD's default): fewer re-allocations after the
# local density fluctuates.
DEFAULT_CAPACITY_MULTIPLIER = 1.25
# JAX MD's periodic spaces are periodic along every axis.
PERIODIC = (True, True, True)
# First slot count of the host search that fills a new image list (doubled until no row is full):
# about the images within 5 A at a liquid's density.
INITIAL_HOST_SLOTS = 64


@flax.struct.dataclass
class ImageNeighborList:
  """Candidate lattice images of every atom, for periodic cells of any width (a jit-able pytree).

  Every image ``x_j + S @ cell`` within ``cutoff + skin`` of atom i at the last rebuild (other
  atoms' and its own; see the module docstring). The model's slots are selected among them at the
  current positions (edge vectors ``x_i - x_j - S @ cell``; no displacement function is used).
  Build it with :func:`image_neighbor_list`.

  Attributes:
    idx: int32 candidate source atoms (J slots per atom); N (sentinel) on empty slots.
    shifts: int32 lattice image S of each candidate, relative to ``reference``.
    reference: fractional positions at the last rebuild, as given (wrapped or not).
    reference_cell: cell (lattice vectors as rows) at the last rebuild.
    cell: cell of the factory's box, used when ``update`` gets no ``box=``.
    did_buffer_overflow: set (and kept) once a rebuild lost candidates: a bin of the grid or a row
      of J slots was full, or the cell shrank below the grid; re-allocate then.
    grid: static binning of the device search (:func:`~e2former_jax.neighbors.device.cell_grid`).
    cutoff: the model's cutoff in angstrom (static).
    skin: extra search radius in angstrom (static); rebuilt once it may have been used up.
    fractional_coordinates: positions are fractional (static).
  """

  idx: Int[Array, "N J"]
  shifts: Int[Array, "N J 3"]
  reference: Float[Array, "N 3"]
  reference_cell: Float[Array, "3 3"]
  cell: Float[Array, "3 3"]
  did_buffer_overflow: Bool[Array, ""]
  grid: CellGrid = flax.struct.field(pytree_node=False)
  cutoff: float = flax.struct.field(pytree_node=False)
  skin: float = flax.struct.field(pytree_node=False)
  fractional_coordinates: bool = flax.struct.field(pytree_node=False)

  @property
  def max_occupancy(self) -> int:
    """J, the candidate slots per atom (static)."""
    return self.idx.shape[1]

  def update(self, position: Float[Array, "N 3"], **kwargs) -> ImageNeighborList:
    """The list at new positions (jittable): rebuilt only once the skin may have been used up.

    Args:
      position: positions in the list's coordinates.
      **kwargs: ``box=`` the current box (NPT); anything else is ignored.
    """
    return update_image_neighbors(position, self, **kwargs)

  def needs_rebuild(self, position: Float[Array, "N 3"], **kwargs) -> Bool[Array, ""]:
    """Whether some pair image may have entered the cutoff from beyond cutoff + skin (jittable).

    True once twice the largest displacement since the rebuild (modulo lattice vectors) plus
    (cutoff + skin) times the relative deformation of the cell exceeds the skin; ``update`` then
    rebuilds. ``box=`` as in ``update``.
    """
    return _staleness(position, self, kwargs.get("box"))[0]


class ImageNeighborListFns(NamedTuple):
  """``allocate`` (host) and ``update`` (jittable) of an :class:`ImageNeighborList`, as JAX MD's
  ``NeighborListFns``: ``allocate(position, extra_capacity=0, box=None)``,
  ``update(position, neighbors, box=None)``."""

  allocate: Callable[..., ImageNeighborList]
  update: Callable[..., ImageNeighborList]


def _cell_of(box, default: jax.Array) -> jax.Array:
  """[3, 3] cell of a JAX MD box (None: ``default``) in ``default``'s dtype."""
  return default if box is None else box_to_cell(box).astype(default.dtype)


def fractional_and_cartesian(position: jax.Array, cell: jax.Array, fractional: bool
                             ) -> tuple[jax.Array, jax.Array]:
  """[N, 3] fractional and Cartesian positions (no gradients: for bookkeeping only)."""
  position = jax.lax.stop_gradient(position)
  if fractional:
    return position, position @ cell
  return position @ jnp.linalg.inv(cell), position


def _rebuild(frac: jax.Array, cartesian: jax.Array, cell: jax.Array, grid: CellGrid, cutoff: float,
             skin: float, max_occupancy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(idx [N, J], shifts [N, J, 3], overflow []) of the candidates within cutoff + skin."""
  found = device_neighbor_list(cartesian, cell, pbc=PERIODIC, cutoff=cutoff + skin,
                               max_neighbors=max_occupancy, grid=grid)
  # Rows keep a spare slot: one with every slot used may have lost candidates.
  full = jnp.any(jnp.all(found.mask, axis=1))
  return found.idx, found.shifts, found.overflow | full


def _staleness(position: jax.Array, neighbors: ImageNeighborList, box
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(stale [] bool, fractional [N, 3], Cartesian [N, 3], cell [3, 3]) at the given positions.

  A pair image at distance r0 > cutoff + skin at the rebuild is within the cutoff now only if
  2 max|dx| + (cutoff + skin) |F - 1| > skin, with dx the atoms' displacements since the rebuild
  (modulo whole lattice vectors: wrapping is no motion) and F = cell0^-1 cell the deformation of
  the cell (Frobenius norm, which bounds the spectral one); below that bound the list is complete.
  """
  cell = _cell_of(box, neighbors.cell)
  frac, cartesian = fractional_and_cartesian(position, cell, neighbors.fractional_coordinates)
  moved = frac - neighbors.reference
  step = (moved - jnp.round(moved)) @ cell  # [N, 3]
  max_move = jnp.sqrt(jnp.max(jnp.sum(step * step, axis=-1)))
  deformation = jnp.linalg.solve(neighbors.reference_cell, cell) - jnp.eye(3, dtype=cell.dtype)
  strain = jnp.sqrt(jnp.sum(deformation * deformation))
  stale = 2 * max_move + (neighbors.cutoff + neighbors.skin) * strain > neighbors.skin
  return stale, frac, cartesian, cell


def update_image_neighbors(position: jax.Array, neighbors: ImageNeighborList, **kwargs
                           ) -> ImageNeighborList:
  """:meth:`ImageNeighborList.update`: rebuilds the candidates when some pair may have crossed the
  skin (:meth:`ImageNeighborList.needs_rebuild`), else returns them unchanged."""
  stale, frac, cartesian, cell = _staleness(position, neighbors, kwargs.get("box"))
  # Module-level branches: eager calls (outside jit) find the compiled cond in JAX's cache.
  return jax.lax.cond(stale, _rebuilt, _kept, neighbors, frac, cartesian, cell)


def _rebuilt(neighbors: ImageNeighborList, frac: jax.Array, cartesian: jax.Array, cell: jax.Array
             ) -> ImageNeighborList:
  idx, shifts, overflow = _rebuild(frac, cartesian, cell, neighbors.grid, neighbors.cutoff,
                                   neighbors.skin, neighbors.max_occupancy)
  return neighbors.replace(idx=idx, shifts=shifts, reference=frac.astype(neighbors.reference.dtype),
                           reference_cell=cell,
                           did_buffer_overflow=neighbors.did_buffer_overflow | overflow)


def _kept(neighbors: ImageNeighborList, *_) -> ImageNeighborList:
  return neighbors


def image_neighbor_list(box: Box, cutoff: float, *, dr_threshold: float = DEFAULT_SKIN,
                        capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
                        fractional_coordinates: bool = False) -> ImageNeighborListFns:
  """The all-images neighbour list of a periodic box (any width), in JAX MD's style.

  Args:
    box: the periodic box (JAX MD convention, see :func:`box_to_cell`); ``box=`` at allocate or
      update time replaces it.
    cutoff: the model's cutoff in angstrom.
    dr_threshold: skin in angstrom (candidates within cutoff + skin).
    capacity_multiplier: headroom of the candidate slots J over the most candidates of an atom at
      allocation (the grid's bins get ``neighbors.device.CAPACITY_FACTOR``).
    fractional_coordinates: positions are fractional (``periodic_general``'s default).

  Returns:
    :class:`ImageNeighborListFns`. ``allocate(position, extra_capacity=0, box=None)`` sizes the
    device search's grid and J and fills the list on the host (``extra_capacity`` adds to both the
    bin capacity and J); ``update`` refills it with the device search inside ``jit``.

  Raises:
    ValueError: on a bad box, cutoff or skin (checked again at every allocation).
  """
  check_cutoff(cutoff)
  if not np.isfinite(dr_threshold) or dr_threshold < 0:
    raise ValueError(f"dr_threshold (skin) must be finite and >= 0, got {dr_threshold}")
  if not capacity_multiplier >= 1:
    raise ValueError(f"capacity_multiplier must be >= 1, got {capacity_multiplier}")
  _checked_cell(box, dr_threshold)
  skin = float(dr_threshold)

  def allocate(position, extra_capacity: int = 0, **kwargs) -> ImageNeighborList:
    if int(extra_capacity) != extra_capacity or extra_capacity < 0:
      raise ValueError(f"extra_capacity must be a non-negative integer, got {extra_capacity}")
    dtype = jnp.asarray(position).dtype
    position = np.asarray(position, np.float64)
    if position.ndim != 2 or position.shape[1] != 3:
      raise ValueError(f"position must be [N, 3], got shape {position.shape}")
    if not np.isfinite(position).all():
      raise ValueError("position contains NaN or inf")
    cell = _checked_cell(kwargs.get("box", box), skin)
    default_cell = _checked_cell(box, skin)
    frac, cartesian = ((position, position @ cell) if fractional_coordinates
                       else (position @ np.linalg.inv(cell), position))
    grid = cell_grid(cartesian, cell, PERIODIC, cutoff + skin)
    grid = dataclasses.replace(grid, capacity=grid.capacity + int(extra_capacity))
    # The host search (the same relation as the device one) fills the first list: allocation then
    # compiles nothing, and the device search compiles once, inside the caller's jitted update.
    found = _all_images_within(cartesian, cell, cutoff + skin)
    n = position.shape[0]
    most = int(found.mask.sum(axis=1).max(initial=0))
    slots = int(most * capacity_multiplier) + int(extra_capacity) + 1  # + the spare slot
    pad = max(slots - found.idx.shape[1], 0)
    idx = np.pad(found.idx, ((0, 0), (0, pad)), constant_values=n)[:, :slots]  # nearest first
    shifts = np.pad(found.shifts, ((0, 0), (0, pad), (0, 0)))[:, :slots]
    return ImageNeighborList(
        idx=jnp.asarray(idx, jnp.int32), shifts=jnp.asarray(shifts, jnp.int32),
        reference=jnp.asarray(frac, dtype), reference_cell=jnp.asarray(cell, dtype),
        cell=jnp.asarray(default_cell, dtype), did_buffer_overflow=jnp.asarray(False),
        grid=grid, cutoff=float(cutoff), skin=skin, fractional_coordinates=fractional_coordinates)

  return ImageNeighborListFns(allocate=allocate, update=update_image_neighbors)


def _all_images_within(cartesian: np.ndarray, cell: np.ndarray, radius: float) -> NeighborList:
  """Every image within ``radius`` of every atom (host search, K doubled until no row is full)."""
  slots = INITIAL_HOST_SLOTS
  while True:
    found = neighbor_list(cartesian, radius, slots, cell=cell, pbc=True)
    if not found.mask.all(axis=1).any():
      return found
    slots *= 2


def _checked_cell(box, skin: float) -> np.ndarray:
  """[3, 3] float64 cell of a box, validated on the host (wrapping needs a skin below the spacings)."""
  if box is None:
    raise ValueError("the all-images neighbour list needs the periodic box")
  cell, spacing = host_cell(box)
  if not spacing.min() > skin:
    raise ValueError(f"lattice plane spacings {np.round(spacing, 3).tolist()} A must exceed the skin "
                     f"{skin} A (atoms are followed across the box modulo a lattice vector)")
  return cell


