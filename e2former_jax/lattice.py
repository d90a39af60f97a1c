"""Periodic cells: the checks every cell passes (host), the geometry the neighbour searches use.

A cell is a [3, 3] matrix whose rows are the lattice vectors a, b, c in angstrom (the ASE
convention); a point with fractional coordinates f sits at ``f @ cell``. ``pbc`` says along which of
the three vectors the structure repeats. A periodic structure needs three linearly independent
vectors even when it repeats along fewer axes (a slab gives its vacuum direction a vector), because
the neighbour search works in fractional coordinates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# A cell whose volume is below this fraction of |a| |b| |c| (the volume of a rectangular box with
# the same edges) is degenerate: its vectors are (numerically) coplanar. Even a strongly sheared
# real cell (angles of a few degrees) stays above 1e-3.
MIN_RELATIVE_VOLUME = 1e-6


def check_cell(cell, pbc, *,
               allow_left_handed: bool = True) -> tuple[np.ndarray, tuple[bool, bool, bool]]:
  """Validates a periodic cell; returns it as float64 [3, 3] and pbc as a tuple of three bools.

  Args:
    cell: [3, 3] lattice vectors (rows), angstrom.
    pbc: a bool or three bools: periodicity along each lattice vector.
    allow_left_handed: accept det(cell) < 0 (a valid lattice; some MD codes require det > 0).

  Raises:
    ValueError: wrong shape, NaN or inf, singular (degenerate) or, unless allowed, left-handed.
  """
  if cell is None:
    raise ValueError(f"pbc={tuple(np.broadcast_to(pbc, (3,)).tolist())} needs a cell")
  cell = np.asarray(cell, dtype=np.float64)
  if cell.shape != (3, 3):
    raise ValueError(f"cell must have shape [3, 3], got {cell.shape}")
  if not np.isfinite(cell).all():
    raise ValueError(f"cell contains NaN or inf: {cell.tolist()}")
  pbc = tuple(bool(p) for p in np.broadcast_to(np.asarray(pbc, dtype=bool), (3,)))
  det = float(np.linalg.det(cell))
  edges = float(np.prod(np.linalg.norm(cell, axis=1)))
  if not abs(det) > MIN_RELATIVE_VOLUME * edges:
    lengths = np.linalg.norm(cell, axis=1).round(4).tolist()
    raise ValueError(f"cell is singular (volume {det:.4g} A^3 for vectors of lengths {lengths} A): "
                     f"a periodic structure needs three linearly independent lattice vectors")
  if det < 0 and not allow_left_handed:
    raise ValueError(f"cell is left-handed (det = {det:.4g} A^3 < 0); reorder or negate a lattice "
                     f"vector to make it right-handed")
  return cell, pbc


def plane_spacings(cell):
  """Distances between neighbouring lattice planes: [3] for a [3, 3] cell (numpy or jax).

  Entry a is the spacing of the planes spanned by the two other vectors, |det| / |b x c| for a = 0:
  a point and its image shifted by n_a along vector a are at least |n_a| spacing[a] apart, so a
  cutoff r reaches ceil(r / spacing[a]) images along a.
  """
  xp = jnp if isinstance(cell, jax.Array) else np
  volume = xp.abs(xp.linalg.det(cell))
  areas = xp.linalg.norm(xp.cross(xp.roll(cell, -1, axis=0), xp.roll(cell, -2, axis=0)), axis=1)
  return volume / areas  # [3]

