"""JAX MD interface: an E2Former energy function in JAX MD's conventions, its neighbour list and a run loop.

Typical use (units: eV, angstrom, amu; one time unit is ``1 / FEMTOSECOND`` = 10.18 fs), here
with a random-weight model; a trained one comes from a checkpoint with
``predictor = train.checkpoint.load_predictor("runs/tiny")``::

  import jax
  import jax.numpy as jnp
  from jax_md import simulate, space

  from e2former_jax.config import tiny_config
  from e2former_jax.interop import jax_md as e2f_md
  from e2former_jax.interop.predictor import Predictor
  from e2former_jax.neighbors import build_graph
  from e2former_jax.nn.model import E2Former
  from e2former_jax.structure import Structure

  species = jnp.array([8, 1, 1])  # a water molecule, anywhere in free space
  positions = jnp.array([[-40.0, 3.0, 0.0], [-39.04, 3.0, 0.0], [-40.24, 3.93, 0.0]])
  model = E2Former(tiny_config(num_layers=1))
  graph = build_graph([Structure(species, positions)], cutoff=model.config.cutoff,
                      max_neighbors=model.config.max_neighbors)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, graph))
  predictor = Predictor(model, params)

  displacement, shift = space.free()
  neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(displacement, None, predictor, species)
  nbrs = neighbor_fn.allocate(positions)
  init_fn, apply_fn = simulate.nve(energy_fn, shift, dt=0.5 * e2f_md.FEMTOSECOND)
  state = init_fn(jax.random.PRNGKey(1), positions, kT=300 * e2f_md.BOLTZMANN,
                  mass=e2f_md.masses(species), neighbor=nbrs)
  potential = lambda state, nbrs: energy_fn(state.position, neighbor=nbrs)
  for step, state, nbrs, energy in e2f_md.run(apply_fn, state, num_chunks=2, steps_per_chunk=10,
                                              neighbors=nbrs, neighbor_fn=neighbor_fn,
                                              observe_fn=potential):
    print(f"step {step}: potential energy {float(energy):.4f} eV")

``energy_fn(position, neighbor=None, **kwargs)`` returns the scalar total energy, so
``quantity.force``, ``simulate.nve``, ``nvt_langevin`` and ``nvt_nose_hoover`` use it unchanged.
Extra keyword arguments: ``charge`` and ``spin`` (override the defaults of the factory; traced
values are fine) and anything the displacement function accepts (``box``, ``perturbation``);
others (``kT``, ``dt``, ...) are ignored, as JAX MD's own energies do.

Neighbours. The model's graph holds, for every atom, the K = ``max_neighbors`` nearest other atoms
within the cutoff (``e2former_jax.neighbors``). A JAX MD ``Dense`` neighbour list gives, for every
atom, a superset: all atoms within ``cutoff + dr_threshold`` of the positions at its last rebuild,
padded with the sentinel N. :func:`select_neighbors` computes the exact distances inside ``jit`` and
keeps the K nearest within the cutoff, so MD energies equal the model's energies on the same
structure. Overflow has JAX MD's meaning: the candidate buffer (``max_occupancy``) was too small;
``neighbors.did_buffer_overflow`` is set and the caller re-allocates (:func:`run` does). More than K
atoms within the cutoff is NOT an error: that is the model's designed truncation to the K nearest,
identical to training; it makes the energy discontinuous when the K-th and (K+1)-th neighbours swap
(the energy is continuous at the cutoff itself). :attr:`ModelNeighbors.count` reports how many
atoms are within the cutoff, for callers who want to watch for it.

Without a neighbour list (``neighbor=None``) every other atom is a candidate: O(N^2) memory, the
simplest choice for a molecule of a few hundred atoms.

Free space. JAX MD's cell list covers [0, box) and misses pairs of atoms outside it, so the free-space
list of :func:`e2former_neighbor_list` places the atoms in its box itself
(:func:`free_space_neighbor_list`): positions can be anywhere, and the box (``None``: sized from the
positions at allocation) only needs to hold the molecule's extent.

Periodic spaces. Pass the box to the factories (``box=`` / ``periodic=True``, in JAX MD's
convention: a side length, [3] side lengths, or a [3, 3] matrix whose columns are the lattice
vectors). Edge vectors come from the displacement function and the image shifts are stored as
``nbr_shift = x_i - x_j - displacement(x_i, x_j)`` (exactly zero in free space), the ``Graph``
convention, with the cell in ``Graph.cell`` so the model adds its image-shift term. Works with
``space.periodic``, and ``space.periodic_general`` with real or (``fractional_coordinates=True``)
fractional positions; a ``box=`` keyword at call time (NPT, ``quantity.stress``) replaces the
box, and ``perturbation=`` strains the displacements, so ``quantity.stress`` works too.

Small periodic cells (all images). A JAX MD neighbour list holds one (minimum) image per pair,
which is the model's relation only when every lattice plane spacing exceeds twice the cutoff. In a
narrower cell one atom has several images within the cutoff (its own included), and
:func:`e2former_neighbor_list` with ``periodic=True`` then returns an :class:`ImageNeighborList`
instead (``all_images=None``, the default, decides from the box; ``all_images=True`` forces it for
any periodic box, ``all_images=False`` forces JAX MD's list and raises in a narrow box). It is
JAX MD-shaped: ``neighbor_fn.allocate(position, extra_capacity=0, box=...)`` on the host,
``nbrs.update(position, box=...)`` inside ``jit``, ``nbrs.did_buffer_overflow``, so :func:`run`
and JAX MD's integrators use it unchanged. Its candidates are lattice images ``(j, S)`` within
``cutoff + skin`` from the on-device periodic search (:mod:`e2former_jax.neighbors_device`), with
integer image shifts S; the energy function keeps the K nearest within the cutoff at the current
positions and passes ``nbr_shift = S @ cell`` (the cell of the current box, so ``box=`` and
``perturbation=`` strain the shifts with the positions: NPT and ``quantity.stress`` work).
Positions wrapped back into the box between rebuilds are followed: S is corrected by the whole
lattice translations of both atoms since the rebuild. :func:`e2former_energy` takes the image list
only with ``all_images=True``; without it a narrow box is an error, since a ``Dense`` list or the
all-pairs search would miss images.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import ase.data
import ase.units
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, space
from jax_md.partition import PartitionErrorCode

from e2former_jax import lattice
from e2former_jax.graph import Graph
from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import NeighborList, neighbor_list
from e2former_jax.neighbors_device import CellGrid, cell_grid, device_neighbor_list

# One femtosecond and Boltzmann's constant (eV/K) in the eV-angstrom-amu unit system, the one JAX MD
# simulations of this model run in (the same as ASE's internal units).
FEMTOSECOND = ase.units.fs
BOLTZMANN = ase.units.kB
# Default skin (angstrom) of the candidate list: it is rebuilt only after some atom moved half of
# it, and pairs entering the cutoff within one step are never missed. 0.5 A is far more than an
# atom moves in a step at a 0.5-1 fs time step.
DEFAULT_SKIN = 0.5
# Capacity headroom of a new candidate list (JAX MD's default): fewer re-allocations after the
# local density fluctuates.
DEFAULT_CAPACITY_MULTIPLIER = 1.25
# Extra capacity (slots) of the first re-allocation after an overflow; doubled at every further one.
MIN_EXTRA_CAPACITY = 4
# Re-allocations of the candidate list allowed for one chunk of steps before :func:`run` gives up.
MAX_REALLOCATIONS = 8
# JAX MD's periodic spaces are periodic along every axis.
PERIODIC = (True, True, True)
# Atoms are handed to the model in Morton order of cubes of this side (angstrom; a few atoms each at
# condensed-phase density), and 10 bits per axis (1024 cubes, 2 um) cover any simulation box.
SPATIAL_ORDER_BIN = 2.0
MORTON_BITS = 10
# First slot count of the host search that fills a new image list (doubled until no row is full):
# about the images within 5 A at a liquid's density.
INITIAL_HOST_SLOTS = 64
# Free space: room (angstrom) on every side of the atoms' extent in a cell-list box sized at
# allocation; the atoms may spread this much before the list has to be re-allocated.
FREE_SPACE_MARGIN = 20.0

EnergyFn = Callable[..., jax.Array]
# The authors' softmax (SoftmaxSink.MAX_LOGIT, imported checkpoints) reads masked slots that hold
# the nearest atoms beyond the cutoff: only a search over every atom finds them.
_REFERENCE_SLOTS_NEED_ALL_ATOMS = (
    "this model uses the authors' softmax sink (softmax_sink=max_logit), whose masked slots hold "
    "the nearest atoms beyond the cutoff: it runs in free space with neighbor=None (every atom a "
    "candidate); for neighbour lists or periodic boxes use softmax_sink=zero")


class ModelNeighbors(NamedTuple):
  """The model's neighbour slots of N atoms, selected on device.

  Attributes:
    idx: [N, K] int32 source atom of each slot; N (sentinel) on empty slots (with reference slots,
      masked slots may hold atoms beyond the cutoff).
    mask: [N, K] bool, True on real slots.
    shift: [N, K, 3] Cartesian image shift of each source (zero in free space and on empty slots).
    count: [N] int32 number of atoms within the cutoff (more than K means the nearest K were kept).
  """

  idx: jax.Array
  mask: jax.Array
  shift: jax.Array
  count: jax.Array


def masses(species) -> jax.Array:
  """[N] standard atomic masses (amu) of atomic numbers ``species``."""
  return jnp.asarray(ase.data.atomic_masses[np.asarray(species)])


def box_to_cell(box) -> jax.Array:
  """JAX MD box (side, [3] sides, or [3, 3] with lattice vectors as columns) -> [3, 3] cell (rows)."""
  box = jnp.asarray(box)
  if box.ndim == 0:
    return box * jnp.eye(3, dtype=box.dtype)
  if box.shape == (3,):
    return jnp.diag(box)
  if box.shape == (3, 3):
    return box.T
  raise ValueError(f"box must be a scalar, [3] or [3, 3], got shape {box.shape}")


def _host_cell(box) -> tuple[np.ndarray, np.ndarray]:
  """The [3, 3] float64 cell (rows) of a JAX MD box, validated on the host, and its [3] lattice plane
  spacings in angstrom.

  Raises:
    ValueError: on a bad box (wrong shape, non-finite, singular).
  """
  cell, _ = lattice.check_cell(np.asarray(box_to_cell(np.asarray(box, np.float64))), True)
  return cell, lattice.plane_spacings(cell)


def check_box(box, cutoff: float) -> None:
  """Raises ValueError unless the minimum image is the model's neighbour relation in this box.

  A JAX MD neighbour list and displacement hold one image per atom pair; the model takes every
  image within the cutoff (several when a lattice plane spacing is below twice the cutoff), which
  :class:`ImageNeighborList` provides.
  """
  _, spacing = _host_cell(box)
  if spacing.min() <= 2 * cutoff:
    raise ValueError(f"periodic box with lattice plane spacings {np.round(spacing, 3).tolist()} A: "
                     f"the minimum image convention of JAX MD needs every spacing above 2 x cutoff "
                     f"= {2 * cutoff} A; use the all-images neighbour list (e2former_neighbor_list("
                     f"..., periodic=True) picks it for such a box; e2former_energy(..., "
                     f"all_images=True) takes its ImageNeighborList)")


def needs_all_images(box, cutoff: float) -> bool:
  """Whether some lattice plane spacing of the box is at most twice the cutoff (host; validates it).

  Raises:
    ValueError: on a bad box (wrong shape, non-finite, singular).
  """
  return bool(_host_cell(box)[1].min() <= 2 * cutoff)


def select_neighbors(position: jax.Array, candidates: jax.Array | None, displacement_fn,
                     *, cutoff: float, max_neighbors: int, cartesian: jax.Array | None = None,
                     reference_slots: bool = False, **kwargs) -> ModelNeighbors:
  """The K nearest atoms within the cutoff among candidates: [N, M] -> [N, K] slots; jittable.

  Args:
    position: [N, 3] positions in the displacement function's coordinates.
    candidates: [N, M] int candidate sources per atom with sentinel N (a JAX MD ``Dense`` neighbour
      list's ``idx``), or None for all other atoms.
    displacement_fn: JAX MD displacement ``d(Ra, Rb) = Ra - Rb`` (minimum image if periodic),
      returning Cartesian vectors.
    cutoff: neighbour radius in angstrom (inclusive).
    max_neighbors: K.
    cartesian: [N, 3] Cartesian positions when ``position`` is fractional (default: ``position``);
      the image shifts refer to them.
    reference_slots: the authors' slots (``E2FormerConfig.reference_slots``): the
      K_mol = max(1, max_i min(K, #within)) nearest candidates of every atom, masked beyond the
      cutoff (``neighbors.reference_neighbor_slots``); equal to theirs when every atom is a
      candidate.
    **kwargs: passed to ``displacement_fn`` (e.g. ``box``, ``perturbation``).

  Returns:
    :class:`ModelNeighbors`. The selection does not depend on gradients; the edge vectors the model
    forms from ``position`` and ``shift`` carry the displacement function's derivatives.
  """
  n = position.shape[0]
  if candidates is None:
    candidates = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n, n))
  if candidates.ndim != 2 or candidates.shape[0] != n:
    raise ValueError(f"candidates must be [N, M] with N={n} (a Dense neighbour list), got shape "
                     f"{candidates.shape}")
  if candidates.shape[1] < max_neighbors:
    pad = jnp.full((n, max_neighbors - candidates.shape[1]), n, candidates.dtype)
    candidates = jnp.concatenate([candidates, pad], axis=1)
  candidates = candidates.astype(jnp.int32)
  real = (candidates < n) & (candidates != jnp.arange(n, dtype=jnp.int32)[:, None])  # [N, M]
  sources = jnp.take(position, jnp.where(real, candidates, 0), axis=0)  # [N, M, 3]
  displacement = functools.partial(displacement_fn, **kwargs)
  vectors = jax.vmap(jax.vmap(displacement, (None, 0)), (0, 0))(position, sources)  # [N, M, 3]
  slot, idx, mask, count = _nearest_within(vectors, candidates, real, cutoff, max_neighbors,
                                           reference_slots)
  vec = jnp.take_along_axis(vectors, slot[..., None], axis=1)  # [N, K, 3]
  x = position if cartesian is None else cartesian
  source = jnp.take(x, jnp.where(mask, idx, 0), axis=0)  # [N, K, 3]
  # x_i - (x_j + shift) = displacement(x_i, x_j): the Graph's image-shift convention.
  shift = jnp.where(mask[..., None], x[:, None, :] - source - vec, 0.0)  # [N, K, 3]
  return ModelNeighbors(idx=idx, mask=mask, shift=shift, count=count)


def _nearest_within(vectors: jax.Array, candidates: jax.Array, real: jax.Array, cutoff: float,
                    max_neighbors: int, reference_slots: bool = False
                    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The K nearest real candidates within the cutoff, from their [N, M, 3] edge vectors (with
  ``reference_slots``, the K_mol nearest real ones, masked beyond the cutoff).

  Returns:
    (slot [N, K] chosen candidate columns, then :class:`ModelNeighbors`' idx [N, K], mask [N, K]
    and count [N]).
  """
  n = candidates.shape[0]
  dist2 = jax.lax.stop_gradient(jnp.sum(vectors * vectors, axis=-1))  # [N, M]
  within = real & (dist2 <= cutoff * cutoff)  # [N, M]
  # top_k of -d^2: the K nearest, in increasing distance; excluded candidates sort last as -inf.
  _, slot = jax.lax.top_k(jnp.where(real if reference_slots else within, -dist2, -jnp.inf),
                          max_neighbors)  # [N, K]
  mask = jnp.take_along_axis(within, slot, axis=1)  # [N, K]
  holds = mask
  if reference_slots:  # every atom keeps K_mol slots, the in-cutoff ones first
    k_mol = jnp.maximum(1, jnp.max(jnp.sum(mask, axis=1)))
    holds = jnp.take_along_axis(real, slot, axis=1) & (jnp.arange(max_neighbors) < k_mol)
  idx = jnp.where(holds, jnp.take_along_axis(candidates, slot, axis=1), n).astype(jnp.int32)
  assert idx.shape == mask.shape == (n, max_neighbors), idx.shape
  return slot, idx, mask, within.sum(axis=1).astype(jnp.int32)


@flax.struct.dataclass
class ImageNeighborList:
  """Candidate lattice images of every atom, for periodic cells of any width (a jit-able pytree).

  Every image ``x_j + S @ cell`` within ``cutoff + skin`` of atom i at the last rebuild (other
  atoms' and its own): from the host search (:mod:`e2former_jax.neighbors`) at allocation, from
  :func:`~e2former_jax.neighbors_device.device_neighbor_list` at every rebuild inside ``update``.
  The energy function selects the model's K nearest within the cutoff among them at the current
  positions (edge vectors ``x_i - x_j - S @ cell``; the displacement function is not used). Build
  it with :func:`image_neighbor_list`.

  Attributes:
    idx: [N, M] int32 candidate source atoms; N (sentinel) on empty slots.
    shifts: [N, M, 3] int32 lattice image S of each candidate, relative to ``reference``.
    reference: [N, 3] fractional positions at the last rebuild, as given (wrapped or not).
    reference_cell: [3, 3] cell (lattice vectors as rows) at the last rebuild.
    cell: [3, 3] cell of the factory's box, used when ``update`` gets no ``box=``.
    did_buffer_overflow: [] bool, set (and kept) once a rebuild lost candidates: a bin of the grid
      or a row of M slots was full, or the cell shrank below the grid; re-allocate then.
    grid: static binning of the device search (:func:`~e2former_jax.neighbors_device.cell_grid`).
    cutoff: the model's cutoff in angstrom (static).
    skin: extra search radius in angstrom (static); rebuilt once it may have been used up.
    fractional_coordinates: positions are fractional (static).
  """

  idx: jax.Array
  shifts: jax.Array
  reference: jax.Array
  reference_cell: jax.Array
  cell: jax.Array
  did_buffer_overflow: jax.Array
  grid: CellGrid = flax.struct.field(pytree_node=False)
  cutoff: float = flax.struct.field(pytree_node=False)
  skin: float = flax.struct.field(pytree_node=False)
  fractional_coordinates: bool = flax.struct.field(pytree_node=False)

  @property
  def max_occupancy(self) -> int:
    """M, the candidate slots per atom (static)."""
    return self.idx.shape[1]

  def update(self, position: jax.Array, **kwargs) -> ImageNeighborList:
    """The list at new positions (jittable): rebuilt only once the skin may have been used up.

    Args:
      position: [N, 3] positions in the list's coordinates.
      **kwargs: ``box=`` the current box (NPT); anything else is ignored.
    """
    return update_image_neighbors(position, self, **kwargs)

  def needs_rebuild(self, position: jax.Array, **kwargs) -> jax.Array:
    """[] bool (jittable): some pair image may have entered the cutoff from beyond cutoff + skin.

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


def _fractional_and_cartesian(position: jax.Array, cell: jax.Array, fractional: bool
                              ) -> tuple[jax.Array, jax.Array]:
  """[N, 3] fractional and Cartesian positions (no gradients: for bookkeeping only)."""
  position = jax.lax.stop_gradient(position)
  if fractional:
    return position, position @ cell
  return position @ jnp.linalg.inv(cell), position


def _rebuild(frac: jax.Array, cartesian: jax.Array, cell: jax.Array, grid: CellGrid, cutoff: float,
             skin: float, max_occupancy: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(idx [N, M], shifts [N, M, 3], overflow []) of the candidates within cutoff + skin."""
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
  frac, cartesian = _fractional_and_cartesian(position, cell, neighbors.fractional_coordinates)
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


def image_neighbor_list(box, cutoff: float, *, dr_threshold: float = DEFAULT_SKIN,
                        capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
                        fractional_coordinates: bool = False) -> ImageNeighborListFns:
  """The all-images neighbour list of a periodic box (any width), in JAX MD's style.

  Args:
    box: the periodic box (JAX MD convention, see :func:`box_to_cell`); ``box=`` at allocate or
      update time replaces it.
    cutoff: the model's cutoff in angstrom.
    dr_threshold: skin in angstrom (candidates within cutoff + skin).
    capacity_multiplier: headroom of the candidate slots M over the most candidates of an atom at
      allocation (the grid's bins get ``neighbors_device.CAPACITY_FACTOR``).
    fractional_coordinates: positions are fractional (``periodic_general``'s default).

  Returns:
    :class:`ImageNeighborListFns`. ``allocate(position, extra_capacity=0, box=None)`` sizes the
    device search's grid and M and fills the list on the host (``extra_capacity`` adds to both the
    bin capacity and M); ``update`` refills it with the device search inside ``jit``.

  Raises:
    ValueError: on a bad box, cutoff or skin (checked again at every allocation).
  """
  if not np.isfinite(cutoff) or cutoff <= 0:
    raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
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
  cell, spacing = _host_cell(box)
  if not spacing.min() > skin:
    raise ValueError(f"lattice plane spacings {np.round(spacing, 3).tolist()} A must exceed the skin "
                     f"{skin} A (atoms are followed across the box modulo a lattice vector)")
  return cell


def select_image_neighbors(cartesian: jax.Array, cell: jax.Array, frac: jax.Array,
                           neighbors: ImageNeighborList, *, cutoff: float, max_neighbors: int
                           ) -> ModelNeighbors:
  """The K nearest images within the cutoff among an :class:`ImageNeighborList`'s candidates; jittable.

  Args:
    cartesian: [N, 3] Cartesian positions now (strained if the caller strains).
    cell: [3, 3] cell now, strained like ``cartesian``.
    frac: [N, 3] fractional positions now (unstrained; only their whole lattice translations since
      the rebuild are used, to follow wrapped atoms).
    neighbors: the candidates.
    cutoff: neighbour radius in angstrom (inclusive).
    max_neighbors: K.

  Returns:
    :class:`ModelNeighbors` with ``shift = S @ cell``: derivatives with respect to the positions and
    the cell flow through the shifts, as in the model's stress.
  """
  n = cartesian.shape[0]
  candidates = neighbors.idx  # [N, M]
  if candidates.shape[0] != n:
    raise ValueError(f"image neighbour list of {candidates.shape[0]} atoms for {n} positions")
  if candidates.shape[1] < max_neighbors:
    pad = max_neighbors - candidates.shape[1]
    candidates = jnp.pad(candidates, ((0, 0), (0, pad)), constant_values=n)
    image = jnp.pad(neighbors.shifts, ((0, 0), (0, pad), (0, 0)))
  else:
    image = neighbors.shifts  # [N, M, 3]
  real = candidates < n  # [N, M]
  source = jnp.where(real, candidates, 0)  # [N, M]
  # An atom wrapped by whole lattice vectors since the rebuild keeps its images: x_j + S @ cell
  # stays put when S absorbs the translations of both atoms.
  wrapped = jnp.round(jax.lax.stop_gradient(frac - neighbors.reference)).astype(jnp.int32)  # [N, 3]
  image = jnp.where(real[..., None], image + wrapped[:, None, :] - wrapped[source], 0)  # [N, M, 3]
  shift = image.astype(cartesian.dtype) @ cell  # [N, M, 3]
  vectors = cartesian[:, None, :] - jnp.take(cartesian, source, axis=0) - shift  # [N, M, 3]
  slot, idx, mask, count = _nearest_within(vectors, candidates, real, cutoff, max_neighbors)
  shift = jnp.where(mask[..., None], jnp.take_along_axis(shift, slot[..., None], axis=1), 0.0)
  return ModelNeighbors(idx=idx, mask=mask, shift=shift, count=count)


def spatial_order(position: jax.Array) -> jax.Array:
  """[N] permutation listing atoms along a Morton (Z-order) curve of SPATIAL_ORDER_BIN cubes.

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


def system_graph(position: jax.Array, species: jax.Array, nbrs: ModelNeighbors, charge, spin,
                 cell: jax.Array | None = None) -> Graph:
  """One system of N real atoms as a Graph (B = 1), for the model; ``cell`` [3, 3] if periodic.

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


def e2former_energy(displacement_fn, predictor: Predictor, species, *, box=None,
                    fractional_coordinates: bool = False, charge: int = 0, spin: int = 1,
                    include_references: bool = True, all_images: bool = False) -> EnergyFn:
  """``energy_fn(position, neighbor=None, **kwargs) -> scalar`` in JAX MD's conventions.

  Args:
    displacement_fn: from ``jax_md.space`` (``free()`` for molecules).
    predictor: network, weights and reference energies.
    species: [N] atomic numbers of the particles.
    box: None in free space; the periodic box of ``space.periodic`` / ``periodic_general`` (JAX MD
      convention, see :func:`box_to_cell`). Checked with :func:`check_box`.
    fractional_coordinates: positions are fractional (``periodic_general``'s default).
    charge: default total charge (``charge=`` at call time overrides it).
    spin: default spin multiplicity 2S + 1 (``spin=`` at call time overrides it).
    include_references: add the reference energy of the composition, charge and spin (a constant)
      so the result is the total energy; without
      it the energy is the network's alone (same forces; more significant digits in float32).
    all_images: accept a box narrower than twice the cutoff, for use with an
      :class:`ImageNeighborList` (the only neighbour argument that works in such a box).

  Returns:
    The energy function; ``neighbor`` is a JAX MD ``Dense`` neighbour list built with a cutoff of
    at least ``predictor.config.cutoff`` (see :func:`e2former_neighbor_list`), None, or (periodic
    box) an :class:`ImageNeighborList` with the model's cutoff.

  Raises:
    ValueError: for unknown elements or elements without a reference energy, a bad box,
      (without ``all_images``) a box too small for the minimum image convention, or a model with
      the authors' softmax sink (``E2FormerConfig.reference_slots``) in a periodic box or, at call
      time, with a neighbour list.
  """
  species_np = predictor.check_species(np.asarray(species), where="jax_md species")
  species = jnp.asarray(species_np)
  config = predictor.config
  if config.reference_slots and box is not None:
    raise ValueError(_REFERENCE_SLOTS_NEED_ALL_ATOMS)
  predictor.warn_if_untrained_forces("JAX MD energy function")
  # The composition part is summed in float64 on the host; the charge and spin offsets are looked up
  # in the energy function, since JAX MD may pass a charge or spin at call time.
  refs = predictor.reference_energies
  composition = refs.composition(species_np)
  if include_references:
    refs.energy(species_np, charge, spin)  # warns now if the default charge or spin has no offset
  narrow = False
  if box is not None:
    if all_images:
      narrow = needs_all_images(box, config.cutoff)
    else:
      check_box(box, config.cutoff)
  elif fractional_coordinates:
    raise ValueError("fractional_coordinates needs the periodic box")

  def reference(q, s, dtype) -> jax.Array:
    if not include_references:
      return jnp.zeros((), dtype)
    return jnp.asarray(composition, dtype) + predictor.state_offset(q, s, dtype)

  def energy_fn(position: jax.Array, neighbor=None, **kwargs) -> jax.Array:
    if position.shape != (species.shape[0], 3):
      raise ValueError(f"position must be [{species.shape[0]}, 3] for {species.shape[0]} species, got "
                       f"{position.shape}")
    q = kwargs.pop("charge", charge)
    s = kwargs.pop("spin", spin)
    if isinstance(neighbor, ImageNeighborList):
      return image_energy(position, neighbor, q, s, **kwargs)
    if narrow:
      check_box(box, config.cutoff)  # raises: only the image list holds every image here
    candidates = None
    if neighbor is not None:
      if config.reference_slots:
        raise ValueError(_REFERENCE_SLOTS_NEED_ALL_ATOMS)
      if neighbor.format is not partition.NeighborListFormat.Dense:
        raise ValueError(f"e2former energy needs a Dense neighbour list, got {neighbor.format}")
      candidates = neighbor.idx
    cell, cartesian = None, position
    if box is not None:
      current = kwargs.get("box", box)
      cell = box_to_cell(current).astype(position.dtype)
      if fractional_coordinates:
        cartesian = space.transform(current, position)
    nbrs = select_neighbors(position, candidates, displacement_fn, cutoff=config.cutoff,
                            max_neighbors=config.max_neighbors, cartesian=cartesian,
                            reference_slots=config.reference_slots, **kwargs)
    graph = system_graph(cartesian, species, nbrs, q, s, cell)
    return predictor.model_energy(graph)[0] + reference(q, s, position.dtype)

  def image_energy(position: jax.Array, neighbor: ImageNeighborList, q, s, **kwargs) -> jax.Array:
    if box is None:
      raise ValueError("an ImageNeighborList needs a periodic energy function (box=...)")
    if neighbor.fractional_coordinates != fractional_coordinates:
      raise ValueError(f"image neighbour list with fractional_coordinates="
                       f"{neighbor.fractional_coordinates} for an energy function with "
                       f"fractional_coordinates={fractional_coordinates}")
    if neighbor.cutoff < config.cutoff:
      raise ValueError(f"image neighbour list cutoff {neighbor.cutoff} A is below the model's "
                       f"{config.cutoff} A")
    current = kwargs.get("box", box)
    cell = box_to_cell(current).astype(position.dtype)
    # space.transform's derivative passes fractional gradients through as Cartesian ones (JAX MD's
    # convention for forces in fractional coordinates) and carries the box's.
    cartesian = space.transform(current, position) if fractional_coordinates else position
    frac, _ = _fractional_and_cartesian(position, cell, fractional_coordinates)
    perturbation = kwargs.get("perturbation")
    if perturbation is not None:  # a homogeneous strain of positions and cell alike, as JAX MD's
      cartesian = space.raw_transform(perturbation, cartesian)
      cell = space.raw_transform(perturbation, cell)
    nbrs = select_image_neighbors(cartesian, cell, frac, neighbor, cutoff=config.cutoff,
                                  max_neighbors=config.max_neighbors)
    graph = system_graph(cartesian, species, nbrs, q, s, cell)
    return predictor.model_energy(graph)[0] + reference(q, s, position.dtype)

  return energy_fn


def e2former_neighbor_list(displacement_fn, box, predictor: Predictor, species, *,
                           periodic: bool = False, fractional_coordinates: bool = False,
                           charge: int = 0, spin: int = 1, include_references: bool = True,
                           dr_threshold: float = DEFAULT_SKIN,
                           capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
                           disable_cell_list: bool = False, all_images: bool | None = None
                           ) -> tuple[partition.NeighborListFns | ImageNeighborListFns, EnergyFn]:
  """A neighbour list at the model's cutoff and the energy function that uses it.

  A JAX MD ``Dense`` list, or in a periodic box with a lattice plane spacing at most twice the
  cutoff (or with ``all_images=True``) an :class:`ImageNeighborList` (:func:`image_neighbor_list`),
  which holds every image within the cutoff; both allocate, update and overflow alike.

  The counterpart of ``jax_md.energy.*_neighbor_list`` for a trained model (weights given, so no
  init function). ``neighbor_fn.allocate`` (not jittable) sizes the candidate buffer;
  ``nbrs.update(position)`` (jittable) refills it and sets ``did_buffer_overflow`` when it is too
  small, after which the caller re-allocates.

  Args:
    displacement_fn: from ``jax_md.space``.
    box: periodic: the box (JAX MD's convention). Free space: the side of the cell-list box, which
      only has to hold the atoms' extent (the list places them in it, see
      :func:`free_space_neighbor_list`), or None to size it from the positions at allocation.
    periodic: the space is periodic with this box (``space.periodic`` / ``periodic_general``).
    fractional_coordinates: positions are fractional (periodic only), as in JAX MD.
    predictor, species, charge, spin, include_references: as in :func:`e2former_energy`.
    dr_threshold: skin in angstrom (candidates within cutoff + skin; rebuilt after a move of skin/2).
    capacity_multiplier: headroom of the candidate buffer.
    disable_cell_list: all-pairs candidate search (O(N^2); small systems; Dense list only).
    all_images: None (default): the image list exactly when the periodic box needs it; True: the
      image list in any periodic box; False: JAX MD's list (an error in a narrow box).

  Returns:
    ``(neighbor_fn, energy_fn)``.

  Raises:
    ValueError: on a bad box, ``all_images=True`` without ``periodic``, a model with the authors'
      softmax sink (it needs every atom as a candidate: :func:`e2former_energy` without a list),
      or as :func:`e2former_energy`.
  """
  cutoff = predictor.config.cutoff
  if predictor.config.reference_slots:
    raise ValueError(_REFERENCE_SLOTS_NEED_ALL_ATOMS)
  if all_images and not periodic:
    raise ValueError("all_images=True needs a periodic space (periodic=True with its box)")
  if periodic and box is None:
    raise ValueError("periodic=True needs the periodic box")
  if all_images is None:
    all_images = periodic and needs_all_images(box, cutoff)
  if all_images:
    energy_fn = e2former_energy(displacement_fn, predictor, species, box=box,
                                fractional_coordinates=fractional_coordinates, charge=charge, spin=spin,
                                include_references=include_references, all_images=True)
    return image_neighbor_list(box, cutoff, dr_threshold=dr_threshold,
                               capacity_multiplier=capacity_multiplier,
                               fractional_coordinates=fractional_coordinates), energy_fn
  options = dict(dr_threshold=dr_threshold, capacity_multiplier=capacity_multiplier,
                 disable_cell_list=disable_cell_list)
  if periodic:
    neighbor_fn = partition.neighbor_list(displacement_fn, box, cutoff,
                                          fractional_coordinates=fractional_coordinates,
                                          format=partition.NeighborListFormat.Dense, **options)
  else:
    neighbor_fn = free_space_neighbor_list(displacement_fn, box, cutoff, **options)
  energy_fn = e2former_energy(displacement_fn, predictor, species, box=box if periodic else None,
                              fractional_coordinates=fractional_coordinates, charge=charge, spin=spin,
                              include_references=include_references)
  return neighbor_fn, energy_fn


def free_space_neighbor_list(displacement_fn, box: float | None, cutoff: float,
                             **neighbor_kwargs) -> partition.NeighborListFns:
  """A JAX MD ``Dense`` neighbour list in free space that places the atoms in its cell-list box.

  JAX MD's cell list covers [0, box). This list hands it the positions translated so that their
  bounding box sits in the middle of the box, at allocation and at every update: pair distances do
  not change, and the rebuild test (has some atom moved half the skin since the last rebuild?) is as
  valid relative to the moving centre as in fixed coordinates, since a common translation changes
  no distance. When the atoms spread wider than the box, the overflow flag is set, so :func:`run`
  re-allocates (and a list sized from the positions grows).

  Args:
    displacement_fn: ``space.free()``'s.
    box: side of the cell-list box in angstrom (``allocate`` raises ValueError when the atoms span
      more); None: the atoms' extent at allocation plus ``FREE_SPACE_MARGIN`` on every side.
    cutoff: candidate radius (the skin ``dr_threshold`` is added by JAX MD).
    **neighbor_kwargs: for ``jax_md.partition.neighbor_list`` (``dr_threshold``,
      ``capacity_multiplier``, ``disable_cell_list``).
  """

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


def md_chunk(apply_fn, steps_per_chunk: int, observe_fn: Callable[[Any, Any], Any] | None = None,
             **apply_kwargs) -> Callable[[Any, Any], tuple[Any, Any, Any]]:
  """The compiled chunk of :func:`run`: ``chunk(state, neighbors) -> (state, neighbors, observation)``.

  ``steps_per_chunk`` steps in one ``fori_loop``, each updating the neighbour list (None: no list)
  and then calling ``apply_fn(state, neighbor=neighbors, **apply_kwargs)``. Exposed so that its
  compiled memory plan can be inspected (``md_chunk(...).lower(state, nbrs).compile()``).
  """

  @jax.jit
  def chunk(state, nbrs):
    def step(_, carry):
      state, nbrs = carry
      if nbrs is not None:
        nbrs = nbrs.update(state.position)
      return apply_fn(state, neighbor=nbrs, **apply_kwargs), nbrs

    state, nbrs = jax.lax.fori_loop(0, steps_per_chunk, step, (state, nbrs))
    return state, nbrs, (observe_fn(state, nbrs) if observe_fn is not None else None)

  return chunk


def run(apply_fn, state, *, num_chunks: int, steps_per_chunk: int, neighbors=None,
        neighbor_fn: partition.NeighborListFns | ImageNeighborListFns | None = None,
        observe_fn: Callable[[Any, Any], Any] | None = None,
        **apply_kwargs) -> Iterator[tuple[int, Any, Any, Any]]:
  """Runs ``num_chunks x steps_per_chunk`` steps of a JAX MD integrator, one compiled chunk at a time.

  Every step updates the neighbour list (a no-op until some atom moved half the skin) and advances
  ``apply_fn(state, neighbor=neighbors, **apply_kwargs)``. A chunk is one jitted ``fori_loop``, so
  nothing recompiles from step to step; after each chunk the host checks the overflow flag and, if
  the candidate buffer was too small, re-allocates it at the chunk's starting positions with more
  room and redoes the chunk (the only recompilation, as in JAX MD).

  Args:
    apply_fn: the integrator's step function (``simulate.nve`` and friends).
    state: its initial state (from its ``init_fn``).
    num_chunks: chunks to run.
    steps_per_chunk: steps per compiled chunk.
    neighbors: a JAX MD neighbour list or an :class:`ImageNeighborList` (None for the all-pairs
      energy).
    neighbor_fn: its allocate/update pair; required with ``neighbors``.
    observe_fn: ``observe_fn(state, neighbors) -> pytree`` evaluated on device at the end of every
      chunk (e.g. the potential energy), returned with it.
    **apply_kwargs: constant keyword arguments of ``apply_fn`` (e.g. ``kT``).

  Yields:
    ``(steps_done, state, neighbors, observation)`` after every chunk.

  Raises:
    RuntimeError: if a chunk still overflows after ``MAX_REALLOCATIONS`` re-allocations.
  """
  if neighbors is not None and neighbor_fn is None:
    raise ValueError("run() needs neighbor_fn to re-allocate the neighbour list on overflow")
  chunk = md_chunk(apply_fn, steps_per_chunk, observe_fn, **apply_kwargs)
  extra_capacity = 0
  for index in range(num_chunks):
    for _ in range(MAX_REALLOCATIONS + 1):
      new_state, new_neighbors, observation = chunk(state, neighbors)
      if new_neighbors is None or not bool(new_neighbors.did_buffer_overflow):
        break
      # The starting positions fit the old buffers; the chunk's later positions did not, so the
      # new buffers get growing extra room (cell-list capacity and candidate slots alike).
      extra_capacity = max(2 * extra_capacity, MIN_EXTRA_CAPACITY)
      neighbors = neighbor_fn.allocate(state.position, extra_capacity=extra_capacity)
    else:
      raise RuntimeError(f"neighbour list still overflows after {MAX_REALLOCATIONS} re-allocations "
                         f"(chunk {index}); atoms may have left the cell-list box")
    state, neighbors = new_state, new_neighbors
    yield (index + 1) * steps_per_chunk, state, neighbors, observation
