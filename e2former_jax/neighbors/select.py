"""The model's neighbour slots chosen among candidates on device (jittable): the K nearest within r_c.

A candidate list (a JAX MD ``Dense`` list, every atom, the all-images list of
:mod:`~e2former_jax.neighbors.image_list`, a bin grid's cells) holds a superset of every atom's neighbours; the selection
computes exact distances at the current positions and keeps the K nearest within the cutoff
(:func:`nearest_within`), so energies on device equal the model's on the host graph. More than K
candidates within the cutoff is not an error: that is the model's designed truncation to the K
nearest, identical to training; it makes the energy discontinuous when the K-th and (K+1)-th
neighbours swap (the energy is continuous at the cutoff itself). :attr:`ModelNeighbors.count`
reports how many are within the cutoff, for callers who want to watch for it.

The choice of slots carries no derivative; the edge vectors the model forms from the positions and
the shifts do.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from e2former_jax.neighbors import periodic, reference

if TYPE_CHECKING:
  from e2former_jax.neighbors.image_list import ImageNeighborList


class ModelNeighbors(NamedTuple):
  """The model's neighbour slots of N atoms, selected on device.

  Attributes:
    idx: int32 source atom of each slot; N (sentinel) on empty slots (with reference slots, masked
      slots may hold atoms beyond the cutoff).
    mask: True on real slots.
    shift: Cartesian image shift of each source (zero in free space and on empty slots).
    count: int32 number of atoms within the cutoff (more than K means the nearest K were kept).
  """

  idx: Int[Array, "N K"]
  mask: Bool[Array, "N K"]
  shift: Float[Array, "N K 3"]
  count: Int[Array, "N"]


def nearest_within(dist2: jax.Array, candidates: jax.Array, real: jax.Array, cutoff: float,
                   max_neighbors: int, reference_slots: bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The K nearest real candidates within the cutoff, from their squared distances.

  Args:
    dist2: [N, J] squared distance of each candidate (no derivative flows through the choice).
    candidates: [N, J] int source atom of each candidate.
    real: [N, J] bool, the candidate exists (not padding, not the atom itself).
    cutoff: inclusive radius.
    max_neighbors: K (may exceed J).
    reference_slots: the authors' slots (:mod:`~e2former_jax.neighbors.reference`): the K_mol
      nearest real candidates, masked beyond the cutoff.

  Returns:
    ``(slot, idx, mask, count)``: slot [N, K] the chosen candidate column (in [0, J); arbitrary on
    slots without an atom), then :class:`ModelNeighbors`' idx [N, K] (N on slots without an atom),
    mask [N, K] and count [N].
  """
  n, m = candidates.shape
  dist2 = jax.lax.stop_gradient(dist2)
  within = real & (dist2 <= cutoff * cutoff)  # [N, J]
  # top_k of -d^2: the K nearest, in increasing distance; excluded candidates sort last as -inf.
  score = jnp.where(real if reference_slots else within, -dist2, -jnp.inf)  # [N, J]
  if m < max_neighbors:  # fewer candidates than slots: empty ones fill the rest
    pad = ((0, 0), (0, max_neighbors - m))
    score = jnp.pad(score, pad, constant_values=-jnp.inf)
    within, real = jnp.pad(within, pad), jnp.pad(real, pad)
  _, slot = jax.lax.top_k(score, max_neighbors)  # [N, K]
  mask = jnp.take_along_axis(within, slot, axis=1)  # [N, K]
  holds = mask
  if reference_slots:  # every atom keeps K_mol slots, the in-cutoff ones first
    holds = reference.held_slots(jnp.take_along_axis(real, slot, axis=1), mask)
  slot = jnp.minimum(slot, m - 1)  # padding columns hold no atom
  idx = jnp.where(holds, jnp.take_along_axis(candidates, slot, axis=1), n).astype(jnp.int32)
  assert idx.shape == mask.shape == (n, max_neighbors), idx.shape
  return slot, idx, mask, within.sum(axis=1).astype(jnp.int32)


def select_neighbors(position: Float[Array, "N 3"], candidates: Int[Array, "N J"] | None,
                     displacement_fn: Callable[..., Array], *, cutoff: float, max_neighbors: int,
                     cartesian: Float[Array, "N 3"] | None = None, reference_slots: bool = False,
                     **kwargs) -> ModelNeighbors:
  """The K nearest atoms within the cutoff among J candidates per atom; jittable.

  Args:
    position: positions in the displacement function's coordinates.
    candidates: candidate sources per atom with sentinel N (a JAX MD ``Dense`` neighbour list's
      ``idx``), or None for all other atoms (O(N^2) memory).
    displacement_fn: JAX MD displacement ``d(Ra, Rb) = Ra - Rb`` (minimum image if periodic),
      returning Cartesian vectors.
    cutoff: neighbour radius in angstrom (inclusive).
    max_neighbors: K.
    cartesian: Cartesian positions when ``position`` is fractional (default: ``position``);
      the image shifts refer to them.
    reference_slots: the authors' slots (``E2FormerConfig.reference_slots``): the
      K_mol = max(1, max_i min(K, #within)) nearest candidates of every atom, masked beyond the
      cutoff (``reference.reference_neighbor_slots``); equal to theirs when every atom is a
      candidate.
    **kwargs: passed to ``displacement_fn`` (e.g. ``box``, ``perturbation``).

  Returns:
    :class:`ModelNeighbors` with the image shifts ``shift = x_i - x_j - displacement(x_i, x_j)``
    (exactly zero in free space): the edge vectors the model forms carry the displacement
    function's derivatives.
  """
  n = position.shape[0]
  if candidates is None:
    candidates = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (n, n))
  if candidates.ndim != 2 or candidates.shape[0] != n:
    raise ValueError(f"candidates must be [N, M] with N={n} (a Dense neighbour list), got shape "
                     f"{candidates.shape}")
  candidates = candidates.astype(jnp.int32)
  real = (candidates < n) & (candidates != jnp.arange(n, dtype=jnp.int32)[:, None])  # [N, J]
  sources = jnp.take(position, jnp.where(real, candidates, 0), axis=0)  # [N, J, 3]
  displacement = functools.partial(displacement_fn, **kwargs)
  vectors = jax.vmap(jax.vmap(displacement, (None, 0)), (0, 0))(position, sources)  # [N, J, 3]
  slot, idx, mask, count = nearest_within(jnp.sum(vectors * vectors, axis=-1), candidates, real,
                                          cutoff, max_neighbors, reference_slots)
  vec = jnp.take_along_axis(vectors, slot[..., None], axis=1)  # [N, K, 3]
  x = position if cartesian is None else cartesian
  source = jnp.take(x, jnp.where(mask, idx, 0), axis=0)  # [N, K, 3]
  # x_i - (x_j + shift) = displacement(x_i, x_j): the Graph's image-shift convention.
  shift = jnp.where(mask[..., None], x[:, None, :] - source - vec, 0.0)  # [N, K, 3]
  return ModelNeighbors(idx=idx, mask=mask, shift=shift, count=count)


def select_image_neighbors(cartesian: Float[Array, "N 3"], cell: Float[Array, "3 3"],
                           frac: Float[Array, "N 3"], neighbors: ImageNeighborList, *,
                           cutoff: float, max_neighbors: int) -> ModelNeighbors:
  """The K nearest images within the cutoff among an :class:`ImageNeighborList`'s candidates; jittable.

  Args:
    cartesian: Cartesian positions now (strained if the caller strains).
    cell: cell now, strained like ``cartesian``.
    frac: fractional positions now (unstrained; only their whole lattice translations since
      the rebuild are used, to follow wrapped atoms).
    neighbors: the candidates.
    cutoff: neighbour radius in angstrom (inclusive).
    max_neighbors: K.

  Returns:
    :class:`ModelNeighbors` with ``shift = S @ cell``: derivatives with respect to the positions and
    the cell flow through the shifts, as in the model's stress.
  """
  n = cartesian.shape[0]
  candidates = neighbors.idx  # [N, J]
  if candidates.shape[0] != n:
    raise ValueError(f"image neighbour list of {candidates.shape[0]} atoms for {n} positions")
  real = candidates < n  # [N, J]
  source = jnp.where(real, candidates, 0)  # [N, J]
  # An atom wrapped by whole lattice vectors since the rebuild keeps its images: x_j + S @ cell
  # stays put when S absorbs the translations of both atoms.
  moved = jnp.round(jax.lax.stop_gradient(frac - neighbors.reference)).astype(jnp.int32)  # [N, 3]
  image = jnp.where(real[..., None], periodic.untranslated_shifts(neighbors.shifts, moved, source),
                    0)  # [N, J, 3]
  shift = image.astype(cartesian.dtype) @ cell  # [N, J, 3]
  vectors = cartesian[:, None, :] - jnp.take(cartesian, source, axis=0) - shift  # [N, J, 3]
  slot, idx, mask, count = nearest_within(jnp.sum(vectors * vectors, axis=-1), candidates, real,
                                          cutoff, max_neighbors)
  shift = jnp.where(mask[..., None], jnp.take_along_axis(shift, slot[..., None], axis=1), 0.0)
  return ModelNeighbors(idx=idx, mask=mask, shift=shift, count=count)
