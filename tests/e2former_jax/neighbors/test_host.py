"""Host neighbour search (molecules and periodic cells) against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest
from e2f_testing import random_cell

from e2former_jax import lattice
from e2former_jax.neighbors import host
from e2former_jax.neighbors.host import neighbor_list

def brute_neighbors(positions, cutoff, k, segments=None):
  """O(n^2) reference: K nearest others within the cutoff, ordered by (distance, index)."""
  n = len(positions)
  segments = np.zeros(n, int) if segments is None else segments
  dist = np.sqrt(((positions[:, None] - positions[None]) ** 2).sum(-1))
  idx = np.full((n, k), n)
  out = np.full((n, k), np.inf)
  for i in range(n):
    js = [j for j in range(n) if j != i and segments[j] == segments[i] and dist[i, j] <= cutoff]
    js = sorted(js, key=lambda j: (dist[i, j], j))[:k]
    idx[i, :len(js)] = js
    out[i, :len(js)] = dist[i, js]
  return idx, out


def assert_matches_brute(positions, cutoff, k, segments=None):
  nl = neighbor_list(positions, cutoff, k, segments=segments)
  idx, dist = brute_neighbors(positions, cutoff, k, segments)
  np.testing.assert_array_equal(nl.idx, idx)
  np.testing.assert_array_equal(nl.mask, idx < len(positions))
  np.testing.assert_allclose(nl.distances, dist, rtol=0, atol=1e-12)
  assert nl.idx.dtype == np.int32 and nl.idx.shape == (len(positions), k)


@pytest.fixture(params=["dense", "cells"])
def search_path(request, monkeypatch):
  """Runs a test through both candidate generators (the results must not depend on it)."""
  if request.param == "cells":
    monkeypatch.setattr(host, "DENSE_PAIR_LIMIT", 0)
  return request.param


def test_random_cloud_matches_brute_force(search_path, rng):
  positions = rng.uniform(0, 10, (300, 3))
  assert_matches_brute(positions, 3.0, 12)
  assert_matches_brute(positions, 3.0, 200)  # K larger than any neighbour count


def test_lattice_ties_and_inclusive_cutoff(search_path):
  # A cubic lattice of spacing 1 with cutoff exactly 1: every neighbour is at exactly the cutoff and
  # all 6 are tied, so the order must fall back to the index; K = 4 truncates inside the tie.
  grid = np.stack(np.meshgrid(*[np.arange(4.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
  assert_matches_brute(grid, 1.0, 4)
  nl = neighbor_list(grid, 1.0, 8)
  assert nl.mask.sum(axis=1).max() == 6 and nl.mask.sum(axis=1).min() == 3  # interior / corner
  assert not neighbor_list(grid, np.nextafter(1.0, 0.0), 8).mask.any()


def test_segments_are_never_neighbours(search_path, rng):
  positions = rng.uniform(0, 6, (120, 3))
  segments = rng.integers(0, 4, 120)
  assert_matches_brute(positions, 2.5, 10, segments)


def test_far_apart_clusters(search_path, rng):
  # Rank-compressed cells: clusters 1e4 A apart must neither merge nor lose neighbours.
  positions = np.concatenate([rng.uniform(0, 4, (60, 3)), rng.uniform(0, 4, (60, 3)) + 1e4])
  assert_matches_brute(positions, 2.0, 8)


def test_rows_sorted_with_sentinel_padding(rng):
  positions = rng.uniform(0, 8, (200, 3))
  nl = neighbor_list(positions, 2.5, 16)
  assert np.all(nl.distances[:, 1:] >= nl.distances[:, :-1])
  assert np.all(nl.mask[:, :-1] >= nl.mask[:, 1:])  # real slots form a prefix
  assert np.all(nl.idx[~nl.mask] == 200) and np.all(np.isinf(nl.distances[~nl.mask]))
  assert not np.any(nl.idx == np.arange(200)[:, None])  # self excluded


def test_large_system_matches_brute_force_on_sampled_atoms(rng):
  n = 20_000
  positions = rng.uniform(0, (n / 0.1) ** (1 / 3), (n, 3))  # liquid-like density, cell-list path
  nl = neighbor_list(positions, 4.5, 32)
  for i in rng.choice(n, 25, replace=False):
    d = np.sqrt(((positions - positions[i]) ** 2).sum(-1))
    d[i] = np.inf
    order = np.lexsort((np.arange(n), d))
    expected = [j for j in order[:40] if d[j] <= 4.5][:32]
    np.testing.assert_array_equal(nl.idx[i, :len(expected)], expected)
    assert nl.mask[i].sum() == len(expected)


def test_small_inputs():
  assert neighbor_list(np.zeros((0, 3)), 1.0, 4).idx.shape == (0, 4)
  one = neighbor_list(np.zeros((1, 3)), 1.0, 4)
  assert one.idx.tolist() == [[1, 1, 1, 1]] and not one.mask.any()


@pytest.mark.parametrize("positions, cutoff, k, match", [
    (np.zeros((3, 2)), 1.0, 4, "shape"),
    (np.array([[0.0, 0.0, np.nan]]), 1.0, 4, "NaN"),
    (np.zeros((2, 3)), 0.0, 4, "cutoff"),
    (np.zeros((2, 3)), 1.0, 0, "max_neighbors"),
])
def test_bad_input(positions, cutoff, k, match):
  with pytest.raises(ValueError, match=match):
    neighbor_list(positions, cutoff, k)


# ------------------------------------------------------------------------------------ periodic


def brute_periodic(positions, cell, pbc, cutoff):
  """Every (distance, source, shift) within the cutoff of each atom, sorted, from an explicit
  enumeration of lattice images (wide enough for unwrapped positions)."""
  frac = positions @ np.linalg.inv(cell)
  spacing = lattice.plane_spacings(cell)
  ranges = []
  for axis in range(3):
    e = int(np.ceil(cutoff / spacing[axis] + np.ptp(frac[:, axis]))) + 1 if pbc[axis] else 0
    ranges.append(np.arange(-e, e + 1))
  shifts = np.stack(np.meshgrid(*ranges, indexing="ij"), -1).reshape(-1, 3)  # [T, 3]
  rows = []
  for i in range(len(positions)):
    sources = positions[:, None] + (shifts @ cell)[None]  # [n, T, 3]
    d = np.linalg.norm(positions[i] - sources, axis=-1)  # [n, T]
    d[i, ~shifts.any(axis=1)] = np.inf
    j, t = np.nonzero(d <= cutoff)
    rows.append(sorted(zip(d[j, t], j, map(tuple, shifts[t].tolist()))))
  return rows


@pytest.mark.parametrize("case", range(8))
def test_periodic_matches_brute_force(search_path, case):
  rng = np.random.default_rng(100 + case)
  n = int(rng.integers(1, 10))
  cutoff = 3.0
  # Cells from 0.6 to 2.5 cutoffs wide: narrow ones hold several images of one atom, itself
  # included; positions up to a few cells outside the cell (not wrapped).
  cell = random_cell(rng, cutoff * rng.uniform(0.6, 2.5))
  pbc = [(True, True, True), (True, True, False), (False, True, False),
         (True, False, True)][case % 4]
  positions = rng.uniform(-2.0, 3.0, (n, 3)) @ cell
  full = brute_periodic(positions, cell, pbc, cutoff)
  for k in (4, 200):  # truncating and not
    nl = neighbor_list(positions, cutoff, k, cell=cell, pbc=pbc)
    assert nl.shifts.shape == (n, k, 3) and nl.shifts.dtype == np.int32
    for i in range(n):
      expected = full[i][:k]
      count = int(nl.mask[i].sum())
      assert count == len(expected) and nl.mask[i, :count].all()
      np.testing.assert_allclose(nl.distances[i, :count], [e[0] for e in expected], atol=1e-9)
      vectors = positions[i] - (positions[nl.idx[i, :count]] + nl.shifts[i, :count] @ cell)
      np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), nl.distances[i, :count],
                                 atol=1e-9)
      if len(full[i]) <= k:  # no truncation: the same (source, shift) set
        got = {(int(j), tuple(s)) for j, s in zip(nl.idx[i, :count], nl.shifts[i, :count].tolist())}
        assert got == {e[1:] for e in expected}
      assert np.all(nl.idx[i, count:] == n) and not nl.shifts[i, count:].any()
    for axis in np.flatnonzero(~np.asarray(pbc)):
      assert not nl.shifts[..., axis].any()


def test_periodic_single_atom_sees_its_own_images():
  # Simple cubic, a = 2 with cutoff 2: the 6 face images of the atom itself, ties broken by shift.
  # Dyadic coordinates: every distance is exact, so the six are exact ties.
  nl = neighbor_list(np.array([[0.5, 0.25, 0.125]]), 2.0, 8, cell=np.eye(3) * 2.0, pbc=True)
  assert nl.mask.sum() == 6 and np.all(nl.idx[0, :6] == 0)
  np.testing.assert_allclose(nl.distances[0, :6], 2.0)
  assert nl.shifts[0, :6].tolist() == [[-1, 0, 0], [0, -1, 0], [0, 0, -1], [0, 0, 1], [0, 1, 0],
                                       [1, 0, 0]]


def test_periodic_large_cell_uses_cell_list(rng):
  # Liquid density, 1500 atoms: the cell-list path, checked against brute force on sampled atoms.
  n, cutoff = 1500, 4.5
  cell = random_cell(rng, (n / 0.1) ** (1 / 3))
  positions = rng.uniform(0, 1, (n, 3)) @ cell
  nl = neighbor_list(positions, cutoff, 32, cell=cell, pbc=True)
  images = np.stack(np.meshgrid(*[np.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
  for i in rng.choice(n, 10, replace=False):
    d = np.linalg.norm(positions[i] - (positions[:, None] + (images @ cell)[None]), axis=-1)
    d[i, 13] = np.inf  # images[13] is the zero shift
    j, t = np.nonzero(d <= cutoff)
    expected = sorted(zip(d[j, t], j, map(tuple, images[t].tolist())))[:32]
    assert nl.mask[i].sum() == len(expected)
    np.testing.assert_allclose(nl.distances[i, :len(expected)], [e[0] for e in expected], atol=1e-9)


def test_periodic_bad_input():
  positions = np.zeros((2, 3))
  with pytest.raises(ValueError, match="needs a cell"):
    neighbor_list(positions, 1.0, 4, pbc=True)
  with pytest.raises(ValueError, match="singular"):
    neighbor_list(positions, 1.0, 4, cell=np.diag([1.0, 1.0, 0.0]), pbc=True)
  with pytest.raises(ValueError, match="segments"):
    neighbor_list(positions, 1.0, 4, cell=np.eye(3), pbc=True, segments=np.zeros(2, int))
  with pytest.raises(ValueError, match="too narrow"):
    neighbor_list(positions, 1.0, 4, cell=np.eye(3) * 1e-3, pbc=True)


