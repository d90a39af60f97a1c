"""Periodic shifts: the ranges of lattice images a search visits, and atoms wrapped into the cell.

Every periodic search (host cell lists, the device bin grid, the JAX MD all-images list) finds
images between atoms moved by whole lattice vectors: wrapped into the cell, or translated since the
list was built. An image ``x_j + S' @ cell`` found between atoms translated by ``t_i`` and ``t_j``
(``x - t @ cell``) is the image ``S = S' + t_i - t_j`` of the atoms as given
(:func:`untranslated_shifts`), so shifts always refer to the positions the caller holds.

The functions take numpy arrays (host) or jax arrays (device, jittable) alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def lattice_range(extent) -> np.ndarray:
  """[T, 3] int64 integer shifts S with ``|S_a| <= extent[a]`` along each axis a, lexicographic.

  T = prod(2 extent + 1); the zero shift is the middle row.
  """
  ranges = [np.arange(-e, e + 1) for e in np.asarray(extent, np.int64)]
  return np.stack(np.meshgrid(*ranges, indexing="ij"), axis=-1).reshape(-1, 3)


def wrap(positions, cell, pbc):
  """Atoms wrapped into the cell along periodic axes.

  Args:
    positions: [n, 3] Cartesian positions.
    cell: [3, 3] lattice vectors (rows), non-singular.
    pbc: three bools.

  Returns:
    ``(frac, offsets, wrapped)``: [n, 3] fractional coordinates of the positions as given, [n, 3]
    int32 whole lattice translations (zero along non-periodic axes) and [n, 3] wrapped positions
    ``positions - offsets @ cell``, whose fractional coordinates ``frac - offsets`` lie in [0, 1)
    along periodic axes.
  """
  xp = jnp if isinstance(positions, jax.Array) else np
  frac = positions @ xp.linalg.inv(cell)
  offsets = xp.where(xp.asarray(pbc), xp.floor(frac), 0.0).astype(xp.int32)
  return frac, offsets, positions - offsets @ cell


def untranslated_shifts(images, translation, source):
  """``images + t_i - t_j``: lattice shifts of images found between translated atoms, relative to
  the atoms as given.

  Args:
    images: [n, K, 3] int shifts S' found between the translated atoms.
    translation: [n, 3] int whole lattice translation t of each atom.
    source: [n, K] int source atom j of each slot (a valid index on every slot; callers mask).

  Returns:
    [n, K, 3] shifts S.
  """
  return images + translation[:, None, :] - translation[source]
