"""JAX MD boxes as cells, and whether the minimum image is the model's neighbour relation in them.

JAX MD gives a periodic box as a side length, [3] side lengths, or a [3, 3] matrix whose columns are
the lattice vectors; the model's cells have the lattice vectors as rows. A JAX MD neighbour list and
displacement function hold one (minimum) image per pair, which is the model's relation only when
every lattice plane spacing exceeds twice the cutoff; a narrower box needs the all-images list
(:mod:`~e2former_jax.neighbors.image_list`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from e2former_jax import lattice

# A JAX MD box, in any of the three forms above.
Box = Float[ArrayLike, ""] | Float[ArrayLike, "3"] | Float[ArrayLike, "3 3"]


def box_to_cell(box: Box) -> Float[Array, "3 3"]:
  """The cell (lattice vectors as rows) of a JAX MD box."""
  box = jnp.asarray(box)
  if box.ndim == 0:
    return box * jnp.eye(3, dtype=box.dtype)
  if box.shape == (3,):
    return jnp.diag(box)
  if box.shape == (3, 3):
    return box.T
  raise ValueError(f"box must be a scalar, [3] or [3, 3], got shape {box.shape}")


def host_cell(box: Box) -> tuple[np.ndarray, np.ndarray]:
  """The [3, 3] float64 cell (rows) of a JAX MD box, validated on the host, and its [3] lattice plane
  spacings in angstrom.

  Raises:
    ValueError: on a bad box (wrong shape, non-finite, singular).
  """
  cell, _ = lattice.check_cell(np.asarray(box_to_cell(np.asarray(box, np.float64))), True)
  return cell, lattice.plane_spacings(cell)


def check_box(box: Box, cutoff: float) -> None:
  """Raises ValueError unless the minimum image is the model's neighbour relation in this box.

  A JAX MD neighbour list and displacement hold one image per atom pair; the model takes every
  image within the cutoff (several when a lattice plane spacing is below twice the cutoff), which
  :class:`~e2former_jax.neighbors.image_list.ImageNeighborList` provides.
  """
  _, spacing = host_cell(box)
  if spacing.min() <= 2 * cutoff:
    raise ValueError(f"periodic box with lattice plane spacings {np.round(spacing, 3).tolist()} A: "
                     f"the minimum image convention of JAX MD needs every spacing above 2 x cutoff "
                     f"= {2 * cutoff} A; use the all-images neighbour list (e2former_neighbor_list("
                     f"..., periodic=True) picks it for such a box; e2former_energy(..., "
                     f"all_images=True) takes its ImageNeighborList)")


def needs_all_images(box: Box, cutoff: float) -> bool:
  """Whether some lattice plane spacing of the box is at most twice the cutoff (host; validates it).

  Raises:
    ValueError: on a bad box (wrong shape, non-finite, singular).
  """
  return bool(host_cell(box)[1].min() <= 2 * cutoff)
