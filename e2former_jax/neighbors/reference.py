"""The authors' neighbour slots (``E2FormerConfig.reference_slots``): masked slots that hold atoms.

Their code sorts every other atom of a molecule by distance and keeps K_mol = max(1, min(K,
max_i #{j: d_ij <= cutoff})) slots per atom, the same K_mol for every atom of the molecule: the
in-cutoff neighbours (the mask, identical to the model's relation), then the next-nearest atoms
beyond the cutoff, masked but real. Slots past K_mol hold the sentinel. Their masked slots enter the
SoftmaxSink.MAX_LOGIT sink, which is why every atom of the molecule must be a candidate.

K_mol is per molecule here; their padded batches take it per batch, which makes their numbers depend
on the batch (docs/decisions.md D14). The rule is :func:`held_slots`, shared by the host search
(:func:`reference_neighbor_slots`) and the jittable one (``select.select_neighbors``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, Float, Int

from e2former_jax.neighbors import host


def held_slots(found, within, molecule: np.ndarray | None = None):
  """[n, K] bool: the slots that hold their atom, the first K_mol of each row.

  Args:
    found: [n, K] bool, the slot has a candidate atom (at any distance); rows sorted by distance.
    within: [n, K] bool, the slot's atom is within the cutoff (a prefix of ``found``).
    molecule: optional [n] int molecule 0..M-1 of each atom (numpy only; default: one molecule).

  Works on numpy and jax arrays alike (jax: one molecule).
  """
  xp = jnp if isinstance(found, jax.Array) else np
  counts = within.sum(axis=1)  # [n]
  if molecule is None:
    k_mol = xp.maximum(1, xp.max(counts))  # []
  else:
    slots = np.ones(molecule.max() + 1, np.int64)  # K_mol >= 1
    np.maximum.at(slots, molecule, counts)
    k_mol = slots[molecule][:, None]  # [n, 1]
  return found & (xp.arange(found.shape[1]) < k_mol)


def reference_neighbor_slots(positions: Float[ArrayLike, "n 3"], cutoff: float, max_neighbors: int,
                             *, segments: Int[ArrayLike, "n"] | None = None) -> host.NeighborList:
  """The neighbour slots of the authors' code, for molecules (one per segment), on the host.

  Ties are broken by atom index (theirs by their sort). Every pair of a molecule is examined
  (O(n^2) time per molecule in bounded chunks), as their code does.

  Args:
    positions: in angstrom.
    cutoff: inclusive radius of the mask.
    max_neighbors: K, the number of slots per atom.
    segments: optional molecule of each atom (default: one molecule).

  Returns:
    A :class:`~e2former_jax.neighbors.host.NeighborList` whose masked slots may hold atoms
    (``idx < n``, finite distance).
  """
  positions = np.asarray(positions, dtype=np.float64)
  n, k = positions.shape[0], int(max_neighbors)
  segments = np.zeros(n, np.int64) if segments is None else np.asarray(segments)
  if n < 2:
    return host.empty_neighbor_list(n, k)
  # The K nearest at any distance.
  idx, dist = host.nearest(positions, np.inf, k, *host.dense_ranges(segments))
  within = dist <= cutoff  # [n, K], a prefix of each row
  _, molecule = np.unique(segments, return_inverse=True)
  holds = held_slots(np.isfinite(dist), within, molecule)  # [n, K]
  return host.NeighborList(idx=np.where(holds, idx, n).astype(np.int32), mask=within,
                           distances=np.where(holds, dist, np.inf),
                           shifts=np.zeros((n, k, 3), np.int32))
