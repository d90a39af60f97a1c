"""The padded training batch: a :class:`~e2former_jax.graph.Graph` plus its targets.

Why a flax struct dataclass and not ``jraph.GraphsTuple``: GraphsTuple describes edges as a flat
``senders``/``receivers`` list whose length is the number of edges. The model's kernels instead
work on a static neighbour-slot layout: K slots per atom, ``nbr_idx [N, K]`` with a mask, so that
attention over neighbours is a dense [N, K] gather/reduce with no scatter and one compiled shape
(docs/model.md §3.2, §3.3). GraphsTuple cannot carry that layout without re-deriving the slots on
device (docs/decisions.md D15), and some of its padding helpers (``zero_out_padding``) call
``jax.tree_map``, which our jax version no longer has. The Graph already holds everything the model
needs; the Batch only adds the targets.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import numpy as np

from e2former_jax.graph import Graph
from e2former_jax.neighbors import build_graph
from train.data.records import Record
from train.data.reference_energies import ReferenceEnergies


@flax.struct.dataclass
class Batch:
  """A padded batch: N atom slots, K neighbour slots, B molecule slots.

  Attributes:
    graph: the model input (positions, species, masks, neighbour slots, charge, spin).
    energy: [B] target energy in eV with the reference energies subtracted (0 on padded slots).
    forces: [N, 3] target forces in eV/angstrom (0 on padded atoms).
    num_atoms: [B] int32 real atoms of each molecule (0 on padded slots).
    subset: [B] int32 subset id of each molecule (an index into the dataset's ``subset_names``);
      -1 on padded slots.
  """

  graph: Graph
  energy: jax.Array
  forces: jax.Array
  num_atoms: jax.Array
  subset: jax.Array


def collate(records: Sequence[Record], subset_ids: Sequence[int], *, cutoff: float,
            max_neighbors: int, num_nodes: int, num_molecules: int, reference_slots: bool = False,
            references: ReferenceEnergies | None = None, dtype=np.float32) -> Batch:
  """Packs records into one padded :class:`Batch` (host numpy arrays) of fixed shapes.

  Args:
    records: the molecules of the batch (validated).
    subset_ids: [len(records)] subset id of each record.
    cutoff: neighbour cutoff in angstrom.
    max_neighbors: K.
    num_nodes: N atom slots (>= total atoms).
    num_molecules: B molecule slots (>= len(records)).
    reference_slots: the authors' neighbour slots (see :func:`~e2former_jax.neighbors.build_graph`).
    references: subtracted from the total energies when given (energies stay total otherwise).
    dtype: float dtype of positions, energies and forces.

  Returns:
    The Batch; its graph's padding follows :func:`e2former_jax.neighbors.build_graph`.
  """
  graph = build_graph([r.structure for r in records], cutoff=cutoff, max_neighbors=max_neighbors,
                      num_nodes=num_nodes, num_molecules=num_molecules, dtype=dtype,
                      reference_slots=reference_slots)
  m = len(records)
  sizes = np.array([r.structure.num_atoms for r in records], np.int32)  # [M]
  energy = np.zeros(num_molecules, np.float64)  # [B]; subtraction in float64, then cast
  energy[:m] = [r.energy for r in records]
  if references is not None:
    energy[:m] -= [references.energy(r.structure.numbers, r.structure.charge, r.structure.spin)
                   for r in records]
  forces = np.zeros((num_nodes, 3), dtype)  # [N, 3]
  if m:
    forces[:sizes.sum()] = np.concatenate([r.forces for r in records])
  num_atoms = np.zeros(num_molecules, np.int32)
  num_atoms[:m] = sizes
  subset = np.full(num_molecules, -1, np.int32)
  subset[:m] = subset_ids
  return Batch(graph=graph, energy=energy.astype(dtype), forces=forces, num_atoms=num_atoms,
               subset=subset)
