"""Host neighbour search (numpy cell lists): the model's neighbour slots of molecules and cells.

The relation (docs/model.md §3.3): slot ``(i, k)`` of atom ``i`` holds the k-th nearest source
within the cutoff (inclusive), at most K of them, sorted by distance, ties broken by the smaller source
index ``j`` and then by the image shift (lexicographic). Empty slots hold the sentinel ``n`` and are
masked. The relation is directed and truncated: ``j in N(i)`` does not imply ``i in N(j)``.

Without periodicity a source is another atom ``x_j``. In a periodic cell a source is a lattice image
``x_j + S @ cell`` of any atom (integer shift S, zero along non-periodic axes), including images of
``i`` itself: a cell narrower than twice the cutoff puts several images of one atom in a row. Shifts
refer to the positions as given (they are not wrapped into the cell), so the edge vector of a slot
is ``x_i - (x_j + S @ cell)`` whatever lattice translation each atom carries.

The search works in two stages on a set of *points*:

1. candidate generation: the points are the atoms themselves, or, for a periodic cell, the atoms
   wrapped into the cell plus every image that can lie within the cutoff of the cell
   (:func:`_periodic_points`). Candidate pairs (target, point) come in bounded chunks of targets,
   either all pairs of a small system (``DENSE_PAIR_LIMIT``) or from a cell list (cells of side
   cutoff / 2; the 5 x 5 x 5 cells around each point's cell);
2. selection (:func:`_select_nearest`): exact distances, the cutoff test, and the K nearest per
   target under the total order (distance, point index). Periodic points are numbered by (atom,
   image shift), so the point index is the (source, shift) tie-break.

Memory is O(n K) for the outputs plus O(``MAX_CHUNK_PAIRS``) for one chunk of candidates; no dense
n x n array is formed beyond ``DENSE_PAIR_LIMIT`` pairs. The periodic points number about
n (1 + 2 r_c / L)^3 for a cell of width L.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
from jaxtyping import ArrayLike, Bool, Float, Int

from e2former_jax import lattice
from e2former_jax.neighbors import periodic

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
# Largest number of (atom, image) pairs the periodic search examines: a cell far narrower than the
# cutoff would otherwise ask for an unbounded number of images (~24 bytes each).
MAX_IMAGE_PAIRS = 1 << 26


class NeighborList(NamedTuple):
  """K-nearest-within-cutoff neighbour slots of n atoms.

  Attributes:
    idx: int32 source atom of each slot; n (sentinel) on empty slots (from
      :func:`~e2former_jax.neighbors.reference.reference_neighbor_slots`, some masked slots hold
      atoms beyond the cutoff).
    mask: True on real slots (always a prefix of each row).
    distances: float64 distance |x_i - (x_j + shifts @ cell)| in angstrom; inf on slots without an
      atom.
    shifts: int32 lattice image S of the source (zero without periodicity and on empty slots).
  """

  idx: Int[np.ndarray, "n K"]
  mask: Bool[np.ndarray, "n K"]
  distances: Float[np.ndarray, "n K"]
  shifts: Int[np.ndarray, "n K 3"]


def neighbor_list(positions: Float[ArrayLike, "n 3"], cutoff: float, max_neighbors: int, *,
                  segments: Int[ArrayLike, "n"] | None = None,
                  cell: Float[ArrayLike, "3 3"] | None = None,
                  pbc: bool | Sequence[bool] | None = None) -> NeighborList:
  """The K nearest sources within the cutoff of every atom: other atoms, or periodic images.

  Args:
    positions: Cartesian coordinates in angstrom (finite; need not lie inside the cell).
    cutoff: radius in angstrom; a pair at exactly ``cutoff`` is a neighbour.
    max_neighbors: K, the number of slots per atom; the nearest K are kept.
    segments: optional; atoms of different segments are never neighbours, which lets a
      batch of molecules be searched in one call (not with a periodic cell).
    cell: lattice vectors (rows) in angstrom; used only where ``pbc`` is True somewhere.
    pbc: a bool or three bools, periodicity along each lattice vector (None = not periodic).

  Returns:
    A :class:`NeighborList` ``(idx, mask, distances, shifts)``; rows sorted by (distance, source
    index, shift).

  Raises:
    ValueError: on bad shapes, non-finite positions, a non-positive cutoff / K, a bad cell (see
      :func:`e2former_jax.lattice.check_cell`), or a cell too narrow for the cutoff.
  """
  positions = np.asarray(positions, dtype=np.float64)
  if positions.ndim != 2 or positions.shape[1] != 3:
    raise ValueError(f"positions must have shape [n, 3], got {positions.shape}")
  check_cutoff(cutoff)
  if int(max_neighbors) != max_neighbors or max_neighbors < 1:
    raise ValueError(f"max_neighbors must be a positive integer, got {max_neighbors}")
  if not np.isfinite(positions).all():
    raise ValueError("positions contain NaN or inf")
  n = positions.shape[0]
  k = int(max_neighbors)
  if pbc is not None and np.any(pbc):
    if segments is not None:
      raise ValueError("segments cannot be combined with a periodic cell: search one periodic "
                       "structure at a time")
    cell, pbc = lattice.check_cell(cell, pbc)
    return _periodic_neighbor_list(positions, cutoff, k, cell, np.asarray(pbc))
  if segments is not None:
    segments = np.asarray(segments)
    if segments.shape != (n,) or segments.dtype.kind not in "iu":
      raise ValueError(f"segments must be [n] integers, got shape {segments.shape} "
                       f"dtype {segments.dtype}")
  if n < 2:
    return empty_neighbor_list(n, k)

  if segments is None and n * n <= DENSE_PAIR_LIMIT:
    order, starts, counts = _all_pairs(n)
  elif segments is not None and _dense_pair_count(segments) <= DENSE_PAIR_LIMIT:
    order, starts, counts = dense_ranges(segments)
  else:
    segments = np.zeros(n, np.int64) if segments is None else segments
    order, starts, counts = _cell_ranges(positions, cutoff, segments)
  return _neighbor_list_from(*nearest(positions, cutoff, k, order, starts, counts))


def check_cutoff(cutoff: float) -> None:
  """Raises ValueError unless the search radius is positive and finite."""
  if not np.isfinite(cutoff) or cutoff <= 0:
    raise ValueError(f"cutoff must be positive and finite, got {cutoff}")


def empty_neighbor_list(n: int, k: int) -> NeighborList:
  """The NeighborList of n atoms without neighbours."""
  return _neighbor_list_from(np.full((n, k), n), np.full((n, k), np.inf))


def _neighbor_list_from(idx: np.ndarray, distances: np.ndarray,
                        shifts: np.ndarray | None = None) -> NeighborList:
  """Packs selected [n, K] sources and distances (inf = empty) into a NeighborList."""
  n, k = idx.shape
  shifts = np.zeros((n, k, 3), np.int32) if shifts is None else shifts.astype(np.int32)
  return NeighborList(idx=idx.astype(np.int32), mask=np.isfinite(distances), distances=distances,
                      shifts=shifts)


def nearest(points: np.ndarray, cutoff: float, k: int, order: np.ndarray, starts: np.ndarray,
            counts: np.ndarray, *, rows: np.ndarray | None = None,
            num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The K nearest other points within the cutoff of every target point.

  Args:
    points: [P, 3] coordinates.
    cutoff: inclusive radius.
    k: slots per target.
    order, starts, counts: candidate ranges in sorted space (see :func:`_cell_ranges`).
    rows: optional [P] output row of each point, -1 for points that are only sources (default:
      every point is a target, row = point index).
    num_rows: number of output rows (default P).

  Returns:
    idx [num_rows, K] int64 point index of each slot (P on empty slots) and distances
    [num_rows, K] float64 (inf on empty slots), rows sorted by (distance, point index).
  """
  p = points.shape[0]
  num_rows = p if num_rows is None else num_rows
  idx, dist = np.full((num_rows, k), p, np.int64), np.full((num_rows, k), np.inf)
  row_of_sorted = order if rows is None else rows[order]  # [P] output row, -1 = source only
  # Work in "sorted space" (points permuted by `order`), where the candidates of sorted target t
  # are the contiguous ranges [starts[t, r], starts[t, r] + counts[t, r]) and neighbouring points
  # sit close in memory.
  coords = [np.ascontiguousarray(points[order, axis]) for axis in range(3)]  # 3 x [P]
  counts = np.where(row_of_sorted[:, None] >= 0, counts, 0)  # source-only points search nothing
  per_target = counts.sum(axis=1)  # [P]
  for lo, hi in _chunks(per_target):
    targets = np.repeat(np.arange(lo, hi), per_target[lo:hi])  # [C] sorted space
    sources = _ragged_arange(starts[lo:hi].ravel(), counts[lo:hi].ravel())  # [C] sorted space
    d2 = np.zeros(len(targets))  # [C]
    for c in coords:
      delta = np.repeat(c[lo:hi], per_target[lo:hi]) - c[sources]
      d2 += delta * delta
    # A loose squared test first (cheap), then the exact inclusive test on the distance itself.
    keep = (d2 <= cutoff * cutoff * (1.0 + _CELL_SLACK)) & (targets != sources)
    targets, sources, d = targets[keep], sources[keep], np.sqrt(d2[keep])
    keep = d <= cutoff
    _select_nearest(targets[keep] - lo, order[sources[keep]], d[keep], row_of_sorted[lo:hi], idx,
                    dist, sentinel=p)
  return idx, dist


def _periodic_neighbor_list(positions: np.ndarray, cutoff: float, k: int, cell: np.ndarray,
                            pbc: np.ndarray) -> NeighborList:
  """:func:`neighbor_list` of one periodic structure (arguments already checked)."""
  n = positions.shape[0]
  if n == 0:
    return empty_neighbor_list(0, k)
  points, atom, image, images, offsets = _periodic_points(positions, cutoff, cell, pbc)
  home = np.flatnonzero(~images.any(axis=1))[0]  # index of the zero shift
  rows = np.where(image == home, atom, -1)  # [P] the wrapped atoms are the targets
  if n * len(points) <= DENSE_PAIR_LIMIT:
    order, starts, counts = _all_pairs(len(points))
  else:
    order, starts, counts = _cell_ranges(points, cutoff, np.zeros(len(points), np.int64))
  point, dist = nearest(points, cutoff, k, order, starts, counts, rows=rows, num_rows=n)
  valid = np.isfinite(dist)  # [n, K]
  point = np.where(valid, point, 0)
  source = atom[point]  # [n, K]
  # Found between the wrapped atoms: relative to the positions as given the shift is corrected.
  shifts = periodic.untranslated_shifts(images[image[point]], offsets, source)  # [n, K, 3]
  return _neighbor_list_from(np.where(valid, source, n), dist,
                             np.where(valid[..., None], shifts, 0))


def _periodic_points(positions: np.ndarray, cutoff: float, cell: np.ndarray, pbc: np.ndarray):
  """The wrapped atoms and every lattice image that can lie within the cutoff of the cell.

  Returns:
    points [P, 3] Cartesian coordinates, atom [P] and image [P] (index into ``images``) of each
    point, in increasing (atom, image) order; images [T, 3] int64, the candidate lattice shifts in
    lexicographic order; offsets [n, 3] int32, the lattice translation that wraps each atom into
    the cell (zero along non-periodic axes).
  """
  frac, offsets, wrapped = periodic.wrap(positions, cell, pbc)  # [n, 3] each
  frac = frac - offsets  # in [0, 1) along periodic axes
  # The cutoff in fractional units along each axis: an image farther than this (in fractional
  # coordinates) from the cell [0, 1) is farther than the cutoff from every wrapped atom.
  reach = cutoff * (1.0 + _CELL_SLACK) / lattice.plane_spacings(cell)  # [3]
  extent = np.where(pbc, np.ceil(reach), 0).astype(np.int64)  # [3]
  num_images = int(np.prod(2 * extent + 1))
  if len(positions) * num_images > MAX_IMAGE_PAIRS:
    raise ValueError(f"cell too narrow for the cutoff {cutoff} A: plane spacings "
                     f"{lattice.plane_spacings(cell).round(4).tolist()} A need {num_images} image "
                     f"cells for each of {len(positions)} atoms")
  images = periodic.lattice_range(extent)  # [T, 3]
  near = np.ones((len(positions), len(images)), bool)  # [n, T]
  for axis in np.flatnonzero(pbc):
    f = frac[:, axis, None] + images[None, :, axis]  # [n, T]
    near &= (f >= -reach[axis]) & (f <= 1.0 + reach[axis])
  atom, image = np.nonzero(near)  # row-major: increasing (atom, image)
  points = wrapped[atom] + images[image] @ cell  # [P, 3]
  return points, atom, image, images, offsets


def _dense_pair_count(segments: np.ndarray) -> int:
  """Number of candidate pairs of the all-pairs-per-segment search."""
  _, sizes = np.unique(segments, return_counts=True)
  return int((sizes.astype(np.int64) ** 2).sum())


def _all_pairs(p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Every point as a candidate of every point: one range per point (see :func:`_cell_ranges`)."""
  return np.arange(p), np.zeros((p, 1), np.int64), np.full((p, 1), p)


def dense_ranges(segments: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
                    idx_out: np.ndarray, dist_out: np.ndarray, sentinel: int) -> None:
  """Writes the K nearest in-cutoff sources of a chunk of targets into ``idx_out``/``dist_out``.

  Args:
    rows: [C] row of each pair in the chunk, non-decreasing, in [0, len(row_atoms)).
    sources: [C] source point of each pair.
    d: [C] distance of each pair (all within the cutoff, no self pairs).
    row_atoms: [R] output row of each chunk row; -1 for rows that are not targets (no pairs).
    idx_out: [n, K] source of each slot, the sentinel (number of points) on empty slots.
    dist_out: [n, K] distances, inf on empty slots. Rows ``row_atoms`` are written in full.
    sentinel: source index of empty slots.
  """
  k = idx_out.shape[1]
  num_rows = len(row_atoms)
  per_row = np.bincount(rows, minlength=num_rows)  # [R]
  width = int(per_row.max(initial=0))
  if width == 0:
    return
  col = np.arange(len(rows)) - np.repeat(np.cumsum(per_row) - per_row, per_row)  # [C]
  src = np.full((num_rows, width), sentinel, np.int64)  # [R, W]
  dist = np.full((num_rows, width), np.inf)  # [R, W]
  src[rows, col] = sources
  dist[rows, col] = d
  # Order each row by (distance, source): stable sort by source, then stable sort by distance.
  by_source = np.argsort(src, axis=1, kind="stable")
  src, dist = np.take_along_axis(src, by_source, 1), np.take_along_axis(dist, by_source, 1)
  nearest = np.argsort(dist, axis=1, kind="stable")[:, :k]  # [R, min(W, K)]
  src, dist = np.take_along_axis(src, nearest, 1), np.take_along_axis(dist, nearest, 1)
  width = src.shape[1]
  targets = row_atoms >= 0
  idx_out[row_atoms[targets], :width] = src[targets]
  dist_out[row_atoms[targets], :width] = dist[targets]


