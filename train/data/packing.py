"""Greedy packing of structures into batches under an atom budget and a molecule budget.

Next-fit in the given (shuffled) order: a batch takes structures until the next one would exceed
``max_atoms`` atoms or ``max_molecules`` molecules, then the next batch starts. It keeps the shuffle
order (no size sorting, so batches stay random samples), never exceeds either budget and places
every structure exactly once. With structures much smaller than the budget (SPICE: ~30 atoms in a
1024-atom batch) the unused tail of a batch is under one structure. Batch boundaries are found with
a binary search on the cumulative atom count, so planning costs O(batches log R), not a Python loop
over records.
"""

from __future__ import annotations

import numpy as np


def pack(num_atoms: np.ndarray, *, max_atoms: int, max_molecules: int) -> list[np.ndarray]:
  """Splits positions 0..R-1 (in order) into consecutive batches within both budgets.

  Args:
    num_atoms: [R] atoms of each structure, in the order to pack them.
    max_atoms: atom budget per batch.
    max_molecules: molecule budget per batch.

  Returns:
    A list of int64 position arrays (consecutive ranges), each within both budgets.

  Raises:
    ValueError: if a structure alone exceeds the atom budget.
  """
  num_atoms = np.asarray(num_atoms, np.int64)
  if max_atoms < 1 or max_molecules < 1:
    raise ValueError(f"budgets must be positive, got max_atoms={max_atoms}, "
                     f"max_molecules={max_molecules}")
  if len(num_atoms) and num_atoms.max() > max_atoms:
    i = int(np.argmax(num_atoms))
    raise ValueError(f"structure at position {i} has {num_atoms[i]} atoms, more than "
                     f"max_atoms={max_atoms}")
  cum = np.concatenate([[0], np.cumsum(num_atoms)])  # [R + 1]
  batches, start, total = [], 0, len(num_atoms)
  while start < total:
    end = int(np.searchsorted(cum, cum[start] + max_atoms, side="right")) - 1
    end = min(end, start + max_molecules, total)
    batches.append(np.arange(start, end))
    start = end
  return batches
