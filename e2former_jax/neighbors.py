"""Host-side neighbour search (numpy) and the padded :class:`~e2former_jax.graph.Graph` builder.

The model's neighbour relation (spec section 2.2): slot ``(i, k)`` of atom ``i`` holds the k-th
nearest other atom ``j`` with ``|x_i - x_j| <= cutoff`` (inclusive), at most K of them, sorted by
distance, ties broken by the smaller index ``j``. Empty slots hold the sentinel ``n`` and are
masked. The relation is directed and truncated: ``j in N(i)`` does not imply ``i in N(j)``.

The search works in two stages, so that periodic images can be added later without touching the
non-periodic results:

1. candidate generation: every pair ``(i, j)`` that could be within the cutoff, produced in
   bounded chunks of target atoms, either all pairs of a small system (``DENSE_PAIR_LIMIT``) or from
   a cell list (cells of side cutoff / 2; the 5 x 5 x 5 cells around each atom's cell);
2. selection (:func:`_select_nearest`): exact distances, the cutoff test, and the K nearest per
   target under the total order (distance, source index).

A periodic search would only add candidates ``(i, j, image shift)`` in stage 1 and extend the
order's tie-break with the image; stage 2 and the output layout stay the same.

Memory is O(n K) for the outputs plus O(``MAX_CHUNK_PAIRS``) for one chunk of candidates; no dense
n x n array is formed beyond ``DENSE_PAIR_LIMIT`` pairs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

from e2former_jax.graph import Graph

if TYPE_CHECKING:
  from e2former_jax.structure import Structure

# Below this many candidate pairs (sum over segments of n_s^2) all pairs are tested directly: for
# molecules and batches of molecules that is faster than building a cell list, and the results are
# identical because both feed the same selection stage.
DENSE_PAIR_LIMIT = 1 << 20
# Candidate pairs processed at once; bounds the temporary memory (~40 bytes per pair) to ~200 MB.
MAX_CHUNK_PAIRS = 1 << 22
# Cells are made this much (relatively) wider than the cutoff so that two atoms exactly one cutoff
# apart can never land two cells apart through rounding of (x - x_min) / side.
_CELL_SLACK = 1e-6
# Cells per cutoff length: side = cutoff / _REACH. Searching (2 _REACH + 1)^3 cells of side r_c / 2
# covers a volume 15.6 r_c^3 instead of 27 r_c^3 with side r_c: ~40 % fewer candidate pairs.
_REACH = 2


class NeighborList(NamedTuple):
  """K-nearest-within-cutoff neighbour slots of n atoms.

  Attributes:
    idx: [n, K] int32 source atom of each slot; n (sentinel) on empty slots.
    mask: [n, K] bool, True on real slots (always a prefix of each row).
    distances: [n, K] float64 distance |x_i - x_j| in angstrom; inf on empty slots.
  """

  idx: np.ndarray
  mask: np.ndarray
  distances: np.ndarray


def neighbor_list(positions: np.ndarray, cutoff: float, max_neighbors: int, *,
                  segments: np.ndarray | None = None) -> NeighborList:
  """The K nearest other atoms within the cutoff of every atom (non-periodic).

  Args:
    positions: [n, 3] Cartesian coordinates in angstrom (finite).
    cutoff: radius in angstrom; a pair at exactly ``cutoff`` is a neighbour.
    max_neighbors: K, the number of slots per atom; the nearest K are kept.
    segments: optional [n] ints; atoms of different segments are never neighbours, which lets a
      batch of molecules be searched in one call.

  Returns:
    A :class:`NeighborList` ``(idx, mask, distances)``; rows sorted by (distance, source index).

  Raises:
    ValueError: on bad shapes, non-finite positions or a non-positive cutoff / K.
  """
  positions = np.asarray(positions, dtype=np.float64)
  if positions.ndim != 2 or positions.shape[1] != 3:
    raise ValueError(f"positions must have shape [n, 3], got {positions.shape}")
  if not np.isfinite(cutoff) or cutoff <= 0:
    raise ValueError(f"cutoff must be positive and finite, got {cutoff}")
  if int(max_neighbors) != max_neighbors or max_neighbors < 1:
    raise ValueError(f"max_neighbors must be a positive integer, got {max_neighbors}")
  if not np.isfinite(positions).all():
    raise ValueError("positions contain NaN or inf")
  n = positions.shape[0]
  if segments is not None:
    segments = np.asarray(segments)
    if segments.shape != (n,) or segments.dtype.kind not in "iu":
      raise ValueError(f"segments must be [n] integers, got shape {segments.shape} "
                       f"dtype {segments.dtype}")
  k = int(max_neighbors)
  out = NeighborList(idx=np.full((n, k), n, np.int32), mask=np.zeros((n, k), bool),
                     distances=np.full((n, k), np.inf))
  if n < 2:
    return out

  if segments is None and n * n <= DENSE_PAIR_LIMIT:
    order, starts, counts = np.arange(n), np.zeros((n, 1), np.int64), np.full((n, 1), n)
  elif segments is not None and _dense_pair_count(segments) <= DENSE_PAIR_LIMIT:
    order, starts, counts = _dense_ranges(segments)
  else:
    segments = np.zeros(n, np.int64) if segments is None else segments
    order, starts, counts = _cell_ranges(positions, cutoff, segments)
  # Work in "sorted space" (atoms permuted by `order`), where the candidates of sorted target t are
  # the contiguous ranges [starts[t, r], starts[t, r] + counts[t, r]) and neighbouring atoms sit
  # close in memory.
  coords = [np.ascontiguousarray(positions[order, axis]) for axis in range(3)]  # 3 x [n]
  per_target = counts.sum(axis=1)  # [n]
  for lo, hi in _chunks(per_target):
    targets = np.repeat(np.arange(lo, hi), per_target[lo:hi])  # [P] sorted space
    sources = _ragged_arange(starts[lo:hi].ravel(), counts[lo:hi].ravel())  # [P] sorted space
    d2 = np.zeros(len(targets))  # [P]
    for c in coords:
      delta = np.repeat(c[lo:hi], per_target[lo:hi]) - c[sources]
      d2 += delta * delta
    # A loose squared test first (cheap), then the exact inclusive test on the distance itself.
    keep = (d2 <= cutoff * cutoff * (1.0 + _CELL_SLACK)) & (targets != sources)
    targets, sources, d = targets[keep], sources[keep], np.sqrt(d2[keep])
    keep = d <= cutoff
    _select_nearest(targets[keep] - lo, order[sources[keep]], d[keep], order[lo:hi], out)
  return out


def _dense_pair_count(segments: np.ndarray) -> int:
  """Number of candidate pairs of the all-pairs-per-segment search."""
  _, sizes = np.unique(segments, return_counts=True)
  return int((sizes.astype(np.int64) ** 2).sum())


def _dense_ranges(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """All atoms of the same segment as candidates.

  Returns:
    order [n] (atoms sorted by segment), and starts/counts [n, 1]: one range per sorted atom.
  """
  order = np.argsort(segments, kind="stable")
  _, first, inverse, sizes = np.unique(segments[order], return_index=True, return_inverse=True,
                                       return_counts=True)
  return order, first[inverse][:, None], sizes[inverse][:, None]


def _cell_ranges(positions: np.ndarray, cutoff: float,
                 segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Cell-list candidates: atoms of the cells within ``_REACH`` cells of each atom's cell.

  Cells have side cutoff / _REACH, so every pair within the cutoff is at most _REACH cells apart
  along each axis. Keys are ordered (segment, x, y, z), so the 2 _REACH + 1 cells along z of one
  (x, y) column are one contiguous range of the sorted atoms: (2 _REACH + 1)^2 ranges per atom.

  Returns:
    order [n] atoms sorted by cell key, and starts/counts [n, R] ranges of sorted atoms per sorted
    atom.
  """
  side = cutoff * (1.0 + _CELL_SLACK) / _REACH
  cells = np.floor((positions - positions.min(axis=0)) / side).astype(np.int64)  # [n, 3]
  # Rank-compress every axis: occupied cell coordinates within _REACH of each other stay within
  # _REACH ranks, so the neighbouring ranks cover (a superset of) the neighbouring cells, while the
  # key range stays bounded by n^3 however far apart the atoms are. The _REACH margin on both sides
  # keeps offsets from wrapping into the next row or segment.
  ranks = np.empty_like(cells)
  for axis in range(3):
    _, ranks[:, axis] = np.unique(cells[:, axis], return_inverse=True)
  ranks += _REACH
  dims = ranks.max(axis=0) + _REACH + 1  # [3]
  _, seg = np.unique(segments, return_inverse=True)
  if (seg.max() + 1) * float(np.prod(dims.astype(np.float64))) >= 2.0**62:
    raise ValueError(f"cell grid {tuple(dims)} x {seg.max() + 1} segments is too large to index")
  strides = np.array([dims[1] * dims[2], dims[2], 1], np.int64)
  keys = seg.astype(np.int64) * int(np.prod(dims)) + ranks @ strides  # [n]
  order = np.argsort(keys, kind="stable")
  sorted_keys = keys[order]
  cell_keys, cell_of_sorted = np.unique(sorted_keys, return_inverse=True)  # [U], [n]
  reach = np.arange(-_REACH, _REACH + 1)
  columns = (reach[:, None] * strides[0] + reach[None, :] * strides[1]).ravel()  # [R]
  lo = np.searchsorted(sorted_keys, cell_keys[:, None] + columns - _REACH, side="left")  # [U, R]
  hi = np.searchsorted(sorted_keys, cell_keys[:, None] + columns + _REACH, side="right")  # [U, R]
  return order, lo[cell_of_sorted], (hi - lo)[cell_of_sorted]


def _chunks(per_target: np.ndarray):
  """Consecutive target ranges [lo, hi) holding at most ~MAX_CHUNK_PAIRS candidates each."""
  cum = np.concatenate([[0], np.cumsum(per_target)])
  lo, n = 0, len(per_target)
  while lo < n:
    hi = int(np.searchsorted(cum, cum[lo] + MAX_CHUNK_PAIRS, side="right")) - 1
    hi = min(max(hi, lo + 1), n)
    yield lo, hi
    lo = hi


def _ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """concatenate([arange(s, s + c) for s, c in zip(starts, counts)]) without a Python loop."""
  offsets = np.cumsum(counts) - counts  # exclusive prefix sum
  return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def _select_nearest(rows: np.ndarray, sources: np.ndarray, d: np.ndarray, row_atoms: np.ndarray,
                    out: NeighborList) -> None:
  """Writes the K nearest in-cutoff neighbours of a chunk of target atoms into ``out``.

  Args:
    rows: [P] row of each pair in the chunk, non-decreasing, in [0, len(row_atoms)).
    sources: [P] source atom of each pair (atom index).
    d: [P] distance of each pair (all within the cutoff, no self pairs).
    row_atoms: [C] target atom of each row.
    out: the neighbour list; rows ``row_atoms`` are written in full.
  """
  n, k = out.idx.shape
  num_rows = len(row_atoms)
  per_row = np.bincount(rows, minlength=num_rows)  # [C]
  width = int(per_row.max(initial=0))
  if width == 0:
    return
  col = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # [P]
  src = np.full((num_rows, width), n, np.int64)  # [C, W]
  dist = np.full((num_rows, width), np.inf)  # [C, W]
  src[rows, col] = sources
  dist[rows, col] = d
  # Order each row by (distance, source): stable sort by source, then stable sort by distance.
  by_source = np.argsort(src, axis=1, kind="stable")
  src, dist = np.take_along_axis(src, by_source, 1), np.take_along_axis(dist, by_source, 1)
  nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]  # [C, min(W, K)]
  src, dist = np.take_along_axis(src, nearest, 1), np.take_along_axis(dist, nearest, 1)
  width = src.shape[1]
  out.idx[row_atoms, :width] = src
  out.mask[row_atoms, :width] = np.isfinite(dist)
  out.distances[row_atoms, :width] = dist


def build_graph(structures: Sequence["Structure"], *, cutoff: float, max_neighbors: int,
                num_nodes: int | None = None, num_molecules: int | None = None,
                dtype: np.dtype = np.float32) -> Graph:
  """Packs structures into one padded :class:`Graph` (host numpy arrays) with static shapes.

  Real atoms fill the first slots in order (molecule 0's atoms, then molecule 1's, ...). Padding:

  * atom slots beyond the real atoms: species 0, position 0, ``node_mask`` False, no edges, and
    ``molecule_index = num_molecules - 1`` (the last molecule slot; when every molecule slot is real
    that slot is a real molecule, so every per-molecule reduction must weight atoms by
    ``node_mask``; leaving one spare molecule slot makes padding land on a padded molecule);
  * molecule slots beyond the structures: charge 0, spin 0, ``molecule_mask`` False;
  * neighbour slots: sentinel ``num_nodes``, ``nbr_mask`` False; ``nbr_shift`` is all zeros.

  Structures are not validated here (see :func:`e2former_jax.structure.validate_structure`).

  Args:
    structures: the molecules, each a :class:`~e2former_jax.structure.Structure`.
    cutoff: neighbour cutoff in angstrom (inclusive).
    max_neighbors: K, neighbour slots per atom.
    num_nodes: N, atom slots (default: the total number of atoms).
    num_molecules: B, molecule slots (default: the number of structures).
    dtype: float dtype of positions and shifts.

  Returns:
    The padded Graph, N = num_nodes, K = max_neighbors, B = num_molecules.

  Raises:
    ValueError: when the atoms or molecules do not fit the requested padding.
    NotImplementedError: for a periodic structure (pbc True along any axis).
  """
  sizes = np.array([len(s.numbers) for s in structures], np.int64)  # [M]
  total = int(sizes.sum())
  n_pad = total if num_nodes is None else int(num_nodes)
  b_pad = len(structures) if num_molecules is None else int(num_molecules)
  if total > n_pad:
    raise ValueError(f"{total} atoms do not fit num_nodes={n_pad}")
  if len(structures) > b_pad or b_pad < 1:
    raise ValueError(f"{len(structures)} structures do not fit num_molecules={b_pad}")
  for s in structures:
    if s.pbc is not None and any(s.pbc):
      raise NotImplementedError(f"periodic structure {s.key or ''!r}: pbc={s.pbc} is not "
                                f"supported yet")
  k = int(max_neighbors)

  molecule = np.repeat(np.arange(len(structures)), sizes)  # [total]
  if structures:
    positions = np.concatenate([np.asarray(s.positions, np.float64).reshape(-1, 3)
                                for s in structures])
    species = np.concatenate([np.asarray(s.numbers) for s in structures]).astype(np.int32)
  else:
    positions, species = np.zeros((0, 3)), np.zeros(0, np.int32)
  nbrs = neighbor_list(positions, cutoff, k, segments=molecule)
  nbr_idx = np.full((n_pad, k), n_pad, np.int32)
  nbr_idx[:total] = np.where(nbrs.mask, nbrs.idx, n_pad)
  nbr_mask = np.zeros((n_pad, k), bool)
  nbr_mask[:total] = nbrs.mask

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
  return Graph(positions=pos, species=spec, node_mask=node_mask, molecule_index=molecule_index,
               nbr_idx=nbr_idx, nbr_mask=nbr_mask, nbr_shift=np.zeros((n_pad, k, 3), dtype),
               charge=charge, spin=spin, molecule_mask=molecule_mask)
