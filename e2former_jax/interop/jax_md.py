"""JAX MD interface: an E2Former energy function in JAX MD's conventions, its neighbour list and a run loop.

Typical use (units: eV, angstrom, amu; one time unit is ``1 / FEMTOSECOND`` = 10.18 fs)::

  from jax_md import quantity, simulate, space
  from e2former_jax.interop import jax_md as e2f_md

  displacement, shift = space.free()
  neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(displacement, box, predictor, species)
  nbrs = neighbor_fn.allocate(positions)
  init_fn, apply_fn = simulate.nve(energy_fn, shift, dt=0.5 * e2f_md.FEMTOSECOND)
  state = init_fn(key, positions, kT=300 * e2f_md.BOLTZMANN, mass=e2f_md.masses(species),
                  neighbor=nbrs)
  for step, state, nbrs, _ in e2f_md.run(apply_fn, state, num_chunks=100, steps_per_chunk=10,
                                         neighbors=nbrs, neighbor_fn=neighbor_fn):
    ...

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

Periodic spaces. Pass the box to the factories (``box=`` / ``periodic=True``, in JAX MD's
convention: a side length, [3] side lengths, or a [3, 3] matrix whose columns are the lattice
vectors). Edge vectors come from the displacement function and the image shifts are stored as
``nbr_shift = x_i - x_j - displacement(x_i, x_j)`` (exactly zero in free space), the ``Graph``
convention, with the cell in ``Graph.cell`` so the model adds its image-shift term. Works with
``space.periodic``, and ``space.periodic_general`` with real or (``fractional_coordinates=True``)
fractional positions; a ``box=`` keyword at call time (NPT, ``quantity.stress``) replaces the
box, and ``perturbation=`` strains the displacements, so ``quantity.stress`` works too. A JAX MD
neighbour list holds one (minimum) image per pair, which is the model's relation only when every
lattice plane spacing exceeds twice the cutoff; the factories check that and ask for a supercell
otherwise (the model itself also handles narrower cells: ``e2former_jax.neighbors``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple

import ase.data
import ase.units
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition
from jax_md import space

from e2former_jax import lattice
from e2former_jax.graph import Graph
from e2former_jax.interop.predictor import Predictor

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

EnergyFn = Callable[..., jax.Array]


class ModelNeighbors(NamedTuple):
  """The model's neighbour slots of N atoms, selected on device.

  Attributes:
    idx: [N, K] int32 source atom of each slot; N (sentinel) on empty slots.
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


def check_box(box, cutoff: float) -> None:
  """Raises ValueError unless the minimum image is the model's neighbour relation in this box.

  A JAX MD neighbour list and displacement hold one image per atom pair; the model takes every
  image within the cutoff (several when a lattice plane spacing is below twice the cutoff).
  """
  cell, _ = lattice.check_cell(np.asarray(box_to_cell(np.asarray(box, np.float64))), True)
  spacing = lattice.plane_spacings(cell)
  if spacing.min() <= 2 * cutoff:
    raise ValueError(f"periodic box with lattice plane spacings {np.round(spacing, 3).tolist()} A: "
                     f"the minimum image convention of JAX MD needs every spacing above 2 x cutoff "
                     f"= {2 * cutoff} A; simulate a supercell (e.g. ase.Atoms.repeat)")


def select_neighbors(position: jax.Array, candidates: jax.Array | None, displacement_fn,
                     *, cutoff: float, max_neighbors: int, cartesian: jax.Array | None = None,
                     **kwargs) -> ModelNeighbors:
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
  dist2 = jax.lax.stop_gradient(jnp.sum(vectors * vectors, axis=-1))  # [N, M]
  within = real & (dist2 <= cutoff * cutoff)  # [N, M]
  # top_k of -d^2: the K nearest, in increasing distance; excluded candidates sort last as -inf.
  _, slot = jax.lax.top_k(jnp.where(within, -dist2, -jnp.inf), max_neighbors)  # [N, K]
  mask = jnp.take_along_axis(within, slot, axis=1)  # [N, K]
  idx = jnp.where(mask, jnp.take_along_axis(candidates, slot, axis=1), n)  # [N, K]
  vec = jnp.take_along_axis(vectors, slot[..., None], axis=1)  # [N, K, 3]
  x = position if cartesian is None else cartesian
  source = jnp.take(x, jnp.where(mask, idx, 0), axis=0)  # [N, K, 3]
  # x_i - (x_j + shift) = displacement(x_i, x_j): the Graph's image-shift convention.
  shift = jnp.where(mask[..., None], x[:, None, :] - source - vec, 0.0)  # [N, K, 3]
  assert idx.shape == mask.shape == (n, max_neighbors), idx.shape
  return ModelNeighbors(idx=idx, mask=mask, shift=shift, count=within.sum(axis=1).astype(jnp.int32))


def system_graph(position: jax.Array, species: jax.Array, nbrs: ModelNeighbors, charge, spin,
                 cell: jax.Array | None = None) -> Graph:
  """One system of N real atoms as a Graph (B = 1), for the model; ``cell`` [3, 3] if periodic."""
  n = position.shape[0]
  return Graph(positions=position, species=species, node_mask=jnp.ones(n, bool),
               molecule_index=jnp.zeros(n, jnp.int32), nbr_idx=nbrs.idx, nbr_mask=nbrs.mask,
               nbr_shift=nbrs.shift.astype(position.dtype),
               charge=jnp.reshape(jnp.asarray(charge, jnp.int32), (1,)),
               spin=jnp.reshape(jnp.asarray(spin, jnp.int32), (1,)), molecule_mask=jnp.ones(1, bool),
               cell=None if cell is None else cell.astype(position.dtype)[None])


def e2former_energy(displacement_fn, predictor: Predictor, species, *, box=None,
                    fractional_coordinates: bool = False, charge: int = 0, spin: int = 1,
                    include_references: bool = True) -> EnergyFn:
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
    include_references: add sum_i ref[Z_i] (a constant) so the result is the total energy; without
      it the energy is the network's alone (same forces; more significant digits in float32).

  Returns:
    The energy function; ``neighbor`` is a JAX MD ``Dense`` neighbour list built with a cutoff of
    at least ``predictor.config.cutoff`` (see :func:`e2former_neighbor_list`), or None.

  Raises:
    ValueError: for unknown elements or elements without a reference energy, or a box too small
      for the minimum image convention.
  """
  species_np = predictor.check_species(np.asarray(species), where="jax_md species")
  species = jnp.asarray(species_np)
  config = predictor.config
  reference = predictor.reference_energy(species_np) if include_references else 0.0
  if box is not None:
    check_box(box, config.cutoff)
  elif fractional_coordinates:
    raise ValueError("fractional_coordinates needs the periodic box")

  def energy_fn(position: jax.Array, neighbor=None, **kwargs) -> jax.Array:
    if position.shape != (species.shape[0], 3):
      raise ValueError(f"position must be [{species.shape[0]}, 3] for {species.shape[0]} species, got "
                       f"{position.shape}")
    q = kwargs.pop("charge", charge)
    s = kwargs.pop("spin", spin)
    candidates = None
    if neighbor is not None:
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
                            max_neighbors=config.max_neighbors, cartesian=cartesian, **kwargs)
    graph = system_graph(cartesian, species, nbrs, q, s, cell)
    return predictor.model_energy(graph)[0] + jnp.asarray(reference, position.dtype)

  return energy_fn


def e2former_neighbor_list(displacement_fn, box, predictor: Predictor, species, *,
                           periodic: bool = False, fractional_coordinates: bool = False,
                           charge: int = 0, spin: int = 1, include_references: bool = True,
                           dr_threshold: float = DEFAULT_SKIN,
                           capacity_multiplier: float = DEFAULT_CAPACITY_MULTIPLIER,
                           disable_cell_list: bool = False) -> tuple[partition.NeighborListFns, EnergyFn]:
  """A JAX MD ``Dense`` neighbour list at the model's cutoff and the energy function that uses it.

  The counterpart of ``jax_md.energy.*_neighbor_list`` for a trained model (weights given, so no
  init function). ``neighbor_fn.allocate`` (not jittable) sizes the candidate buffer;
  ``nbrs.update(position)`` (jittable) refills it and sets ``did_buffer_overflow`` when it is too
  small, after which the caller re-allocates.

  Args:
    displacement_fn: from ``jax_md.space``.
    box: the box JAX MD's cell list covers. In free space, atoms must stay inside [0, box) along
      every axis for the cell list to find all pairs (or pass ``disable_cell_list=True``).
    periodic: the space is periodic with this box (``space.periodic`` / ``periodic_general``).
    fractional_coordinates: positions are fractional (periodic only), as in JAX MD.
    predictor, species, charge, spin, include_references: as in :func:`e2former_energy`.
    dr_threshold: skin in angstrom (candidates within cutoff + skin; rebuilt after a move of skin/2).
    capacity_multiplier: headroom of the candidate buffer.
    disable_cell_list: all-pairs candidate search (O(N^2); small systems).

  Returns:
    ``(neighbor_fn, energy_fn)``.
  """
  neighbor_fn = partition.neighbor_list(
      displacement_fn, box, predictor.config.cutoff, dr_threshold=dr_threshold,
      capacity_multiplier=capacity_multiplier, disable_cell_list=disable_cell_list,
      fractional_coordinates=fractional_coordinates, format=partition.NeighborListFormat.Dense)
  energy_fn = e2former_energy(displacement_fn, predictor, species, box=box if periodic else None,
                              fractional_coordinates=fractional_coordinates, charge=charge, spin=spin,
                              include_references=include_references)
  return neighbor_fn, energy_fn


def run(apply_fn, state, *, num_chunks: int, steps_per_chunk: int, neighbors=None,
        neighbor_fn: partition.NeighborListFns | None = None,
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
    neighbors: a JAX MD neighbour list (None for the all-pairs energy).
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

  @jax.jit
  def chunk(state, nbrs):
    def step(_, carry):
      state, nbrs = carry
      if nbrs is not None:
        nbrs = nbrs.update(state.position)
      return apply_fn(state, neighbor=nbrs, **apply_kwargs), nbrs

    state, nbrs = jax.lax.fori_loop(0, steps_per_chunk, step, (state, nbrs))
    return state, nbrs, (observe_fn(state, nbrs) if observe_fn is not None else None)

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
