"""Neighbour lists: the model's neighbour slots on the host and on device, molecules and cells.

One relation everywhere (docs/model.md §3.3-3.4): slot ``(i, k)`` holds the k-th nearest source
within the cutoff, at most K, with an integer lattice shift S for periodic images (shifts refer to
the positions as given). Every builder below computes it; they differ only in where they run and
how exact distance ties are broken.

Who uses what:

* ``build_graph``: structures -> padded Graph on the host (data loaders, the ASE calculator), from
  ``neighbor_list`` (host cell lists, molecules and periodic cells of any width) or
  ``reference_neighbor_slots`` (the authors' slots: masked slots holding atoms);
* ``device_neighbor_list``: jittable periodic list on a static bin grid that ``cell_grid``
  allocates on the host (the all-images list below rebuilds with it);
* the JAX MD adapter (``e2former_jax.interop.jax_md``): ``select_neighbors`` (the K nearest among
  a JAX MD ``Dense`` list's candidates or all atoms; ``free_space_neighbor_list`` places the atoms
  in JAX MD's cell-list box), or in narrow periodic boxes ``image_neighbor_list`` (every image,
  allocate / update / overflow as in JAX MD) with ``select_image_neighbors``; ``system_graph``
  makes the Graph; ``box_to_cell``, ``check_box`` and ``needs_all_images`` read JAX MD boxes.

Modules, one concept each: :mod:`.host` (host search), :mod:`.periodic` (lattice image ranges,
wrapping, shifts), :mod:`.reference` (the authors' slots), :mod:`.device` (device search),
:mod:`.select` (selection among candidates), :mod:`.image_list` (all-images list), :mod:`.box`
(JAX MD boxes), :mod:`.free_space` (JAX MD's list in free space: the only one that needs
``jax-md``, imported when it is called), :mod:`.build` (graphs).
"""

from e2former_jax.neighbors.box import box_to_cell
from e2former_jax.neighbors.box import check_box
from e2former_jax.neighbors.box import needs_all_images
from e2former_jax.neighbors.build import build_graph
from e2former_jax.neighbors.build import spatial_order
from e2former_jax.neighbors.build import system_graph
from e2former_jax.neighbors.device import CellGrid
from e2former_jax.neighbors.device import DeviceNeighborList
from e2former_jax.neighbors.device import cell_grid
from e2former_jax.neighbors.device import device_neighbor_list
from e2former_jax.neighbors.free_space import free_space_neighbor_list
from e2former_jax.neighbors.host import NeighborList
from e2former_jax.neighbors.host import neighbor_list
from e2former_jax.neighbors.image_list import DEFAULT_CAPACITY_MULTIPLIER
from e2former_jax.neighbors.image_list import DEFAULT_SKIN
from e2former_jax.neighbors.image_list import ImageNeighborList
from e2former_jax.neighbors.image_list import ImageNeighborListFns
from e2former_jax.neighbors.image_list import image_neighbor_list
from e2former_jax.neighbors.reference import reference_neighbor_slots
from e2former_jax.neighbors.select import ModelNeighbors
from e2former_jax.neighbors.select import select_image_neighbors
from e2former_jax.neighbors.select import select_neighbors

__all__ = [
    "DEFAULT_CAPACITY_MULTIPLIER",
    "DEFAULT_SKIN",
    "CellGrid",
    "DeviceNeighborList",
    "ImageNeighborList",
    "ImageNeighborListFns",
    "ModelNeighbors",
    "NeighborList",
    "box_to_cell",
    "build_graph",
    "cell_grid",
    "check_box",
    "device_neighbor_list",
    "free_space_neighbor_list",
    "image_neighbor_list",
    "needs_all_images",
    "neighbor_list",
    "reference_neighbor_slots",
    "select_image_neighbors",
    "select_neighbors",
    "spatial_order",
    "system_graph",
]
