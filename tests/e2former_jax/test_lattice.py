"""Cell checks and lattice-plane spacings."""

from __future__ import annotations

import numpy as np
import pytest

from e2former_jax.lattice import check_cell, plane_spacings


def test_plane_spacings():
  np.testing.assert_allclose(plane_spacings(np.diag([2.0, 3.0, 4.0])), [2.0, 3.0, 4.0])
  # Hexagonal a = 2: the planes spanned by (b, c) are a sin(60 deg) apart.
  hexagonal = np.array([[2.0, 0.0, 0.0], [-1.0, np.sqrt(3.0), 0.0], [0.0, 0.0, 5.0]])
  np.testing.assert_allclose(plane_spacings(hexagonal), [np.sqrt(3.0), np.sqrt(3.0), 5.0])
  # Spacing = the smallest distance between a point and its translate by any multiple of a vector
  # plus anything in the other two: brute force over a lattice patch.
  rng = np.random.default_rng(0)
  cell = np.eye(3) * 3 + rng.normal(size=(3, 3))
  n = np.stack(np.meshgrid(*[np.arange(-6, 7)] * 3, indexing="ij"), -1).reshape(-1, 3)
  for axis in range(3):
    normal = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
    heights = np.abs((n[n[:, axis] != 0] @ cell) @ normal / np.linalg.norm(normal))
    np.testing.assert_allclose(plane_spacings(cell)[axis], heights.min(), rtol=1e-12)
  np.testing.assert_allclose(plane_spacings(-cell), plane_spacings(cell))  # left-handed too


def test_check_cell():
  cell, pbc = check_cell(np.eye(3).tolist(), True)
  assert cell.dtype == np.float64 and pbc == (True, True, True)
  assert check_cell(np.eye(3), [True, False, True])[1] == (True, False, True)
  check_cell(-np.eye(3), True)
  for bad, match in [(None, "needs a cell"), (np.eye(2), r"shape \[3, 3\]"),
                     (np.full((3, 3), np.inf), "NaN or inf"), (np.ones((3, 3)), "singular"),
                     (np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 1e-9]]), "singular")]:
    with pytest.raises(ValueError, match=match):
      check_cell(bad, True)
  with pytest.raises(ValueError, match="left-handed"):
    check_cell(-np.eye(3), True, allow_left_handed=False)
