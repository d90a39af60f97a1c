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

Neighbours (:mod:`e2former_jax.neighbors`). A JAX MD ``Dense`` list holds every atom within
``cutoff + dr_threshold`` at its last rebuild; the energy function keeps the K nearest within the
cutoff inside ``jit`` (:func:`~e2former_jax.neighbors.select_neighbors`), so MD energies equal the
model's on the same structure. Overflow has JAX MD's meaning (the candidate buffer was too small,
``did_buffer_overflow``) and :func:`run` re-allocates. Without a list (``neighbor=None``) every other
atom is a candidate: O(N^2) memory, the simplest choice for a molecule of a few hundred atoms.

Periodic spaces: pass the box (``box=`` / ``periodic=True``, JAX MD's convention) to the factories;
``space.periodic`` and ``space.periodic_general`` (real or fractional positions) work, and ``box=``
at call time (NPT) and ``perturbation=`` (``quantity.stress``) are followed. In a cell with a lattice
plane spacing at most twice the cutoff one atom has several images within the cutoff, which a JAX
MD list cannot hold: :func:`e2former_neighbor_list` then returns the all-images list
(:mod:`e2former_jax.neighbors.image_list`), which :func:`e2former_energy` takes with
``all_images=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import ase.data
import ase.units
import jax
import jax.numpy as jnp
import numpy as np
from jax_md import partition, space

from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import (DEFAULT_CAPACITY_MULTIPLIER, DEFAULT_SKIN, ImageNeighborList,
                                    ImageNeighborListFns, box_to_cell, check_box,
                                    free_space_neighbor_list, image_neighbor_list, needs_all_images,
                                    select_image_neighbors, select_neighbors, system_graph)
from e2former_jax.neighbors.image_list import fractional_and_cartesian

# This module's own API, and the neighbour lists and box checks of e2former_jax.neighbors that its
# factories return or take (importable from here too, where JAX MD users find them).
__all__ = [
    "BOLTZMANN", "DEFAULT_CAPACITY_MULTIPLIER", "DEFAULT_SKIN", "FEMTOSECOND", "ImageNeighborList",
    "ImageNeighborListFns", "MAX_REALLOCATIONS", "MIN_EXTRA_CAPACITY", "box_to_cell", "check_box",
    "e2former_energy", "e2former_neighbor_list", "free_space_neighbor_list", "image_neighbor_list",
    "masses", "md_chunk", "needs_all_images", "run", "select_image_neighbors", "select_neighbors",
]

# One femtosecond and Boltzmann's constant (eV/K) in the eV-angstrom-amu unit system, the one JAX MD
# simulations of this model run in (the same as ASE's internal units).
FEMTOSECOND = ase.units.fs
BOLTZMANN = ase.units.kB
# Extra capacity (slots) of the first re-allocation after an overflow; doubled at every further one.
MIN_EXTRA_CAPACITY = 4
# Re-allocations of the candidate list allowed for one chunk of steps before :func:`run` gives up.
MAX_REALLOCATIONS = 8

EnergyFn = Callable[..., jax.Array]
# The authors' softmax (SoftmaxSink.MAX_LOGIT, imported checkpoints) reads masked slots that hold
# the nearest atoms beyond the cutoff: only a search over every atom finds them.
_REFERENCE_SLOTS_NEED_ALL_ATOMS = (
    "this model uses the authors' softmax sink (softmax_sink=max_logit), whose masked slots hold "
    "the nearest atoms beyond the cutoff: it runs in free space with neighbor=None (every atom a "
    "candidate); for neighbour lists or periodic boxes use softmax_sink=zero")


def masses(species) -> jax.Array:
  """[N] standard atomic masses (amu) of atomic numbers ``species``."""
  return jnp.asarray(ase.data.atomic_masses[np.asarray(species)])


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
      so the result is the total energy; without it the energy is the network's alone (same
      forces; more significant digits in float32).
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
    slots = image_slots if isinstance(neighbor, ImageNeighborList) else list_slots
    nbrs, cartesian, cell = slots(position, neighbor, **kwargs)
    graph = system_graph(cartesian, species, nbrs, q, s, cell)
    return predictor.model_energy(graph)[0] + reference(q, s, position.dtype)

  def list_slots(position: jax.Array, neighbor, **kwargs):
    """The model's slots from a JAX MD Dense list or all atoms, Cartesian positions, cell."""
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
    return nbrs, cartesian, cell

  def image_slots(position: jax.Array, neighbor: ImageNeighborList, **kwargs):
    """The model's slots from an all-images list, Cartesian positions, cell (strained)."""
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
    frac, _ = fractional_and_cartesian(position, cell, fractional_coordinates)
    perturbation = kwargs.get("perturbation")
    if perturbation is not None:  # a homogeneous strain of positions and cell alike, as JAX MD's
      cartesian = space.raw_transform(perturbation, cartesian)
      cell = space.raw_transform(perturbation, cell)
    nbrs = select_image_neighbors(cartesian, cell, frac, neighbor, cutoff=config.cutoff,
                                  max_neighbors=config.max_neighbors)
    return nbrs, cartesian, cell

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
