"""Deterministic train/validation/test splits by molecule (never splitting a molecule's conformers).

Each molecule key is hashed together with the seed to a number u in [0, 1); the molecule goes to
the split whose cumulative fraction interval holds u. The assignment of a molecule depends only on
its key and the seed, not on the dataset's order or size, so it is stable when data are added and
identical on every process.
"""

from __future__ import annotations

import hashlib
from typing import Mapping, Sequence

import numpy as np

DEFAULT_FRACTIONS = {"train": 0.9, "val": 0.05, "test": 0.05}
# Bits of the hash used for u: plenty of resolution, and exact in a float64.
_HASH_BITS = 52


def molecule_unit_hash(key: str, seed: int) -> float:
  """u in [0, 1) from the molecule key and seed (blake2b, independent of Python's hash seed)."""
  digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
  return (int.from_bytes(digest, "little") >> (64 - _HASH_BITS)) / float(1 << _HASH_BITS)


def split_by_molecule(molecule_keys: Sequence[str] | np.ndarray, *, seed: int = 0,
                      fractions: Mapping[str, float] = DEFAULT_FRACTIONS) -> dict[str, np.ndarray]:
  """Record indices of each split, all conformers of a molecule in the same split.

  Args:
    molecule_keys: [R] the molecule key of every record (``Dataset.molecule_keys()``).
    seed: changes the assignment.
    fractions: split name -> expected fraction of molecules (non-negative, summing to 1).

  Returns:
    split name -> sorted int64 record indices (every record in exactly one split).
  """
  total = sum(fractions.values())
  if any(f < 0 for f in fractions.values()) or not np.isclose(total, 1.0):
    raise ValueError(f"fractions must be non-negative and sum to 1, got {dict(fractions)}")
  keys = np.asarray(molecule_keys, dtype=object)
  unique, inverse = np.unique(keys.astype(str), return_inverse=True)
  u = np.array([molecule_unit_hash(str(k), seed) for k in unique])  # [M]
  bounds = np.cumsum(list(fractions.values()))
  bounds[-1] = np.inf  # u < 1 always lands in a split despite rounding of the sum
  split_of_molecule = np.searchsorted(bounds, u, side="right")  # [M]
  split_of_record = split_of_molecule[inverse.reshape(-1)]
  return {name: np.flatnonzero(split_of_record == i) for i, name in enumerate(fractions)}
