"""Greedy packing: budgets respected, every structure exactly once, order kept."""

from __future__ import annotations

import numpy as np
import pytest

from train.data import pack


@pytest.mark.parametrize("max_atoms, max_molecules", [(64, 1000), (64, 3), (100, 7), (37, 100)])
def test_pack(rng, max_atoms, max_molecules):
  sizes = rng.integers(1, 38, 500)
  batches = pack(sizes, max_atoms=max_atoms, max_molecules=max_molecules)
  np.testing.assert_array_equal(np.concatenate(batches), np.arange(500))
  for b in batches:
    assert sizes[b].sum() <= max_atoms and len(b) <= max_molecules
  for b, nxt in zip(batches[:-1], batches[1:]):  # greedy: the next structure did not fit
    assert sizes[b].sum() + sizes[nxt[0]] > max_atoms or len(b) == max_molecules


def test_pack_edge_cases():
  assert pack(np.zeros(0, int), max_atoms=10, max_molecules=2) == []
  assert [b.tolist() for b in pack(np.array([10, 10, 3]), max_atoms=10, max_molecules=5)] == [[0], [1], [2]]
  with pytest.raises(ValueError, match="position 1 has 11 atoms, more than max_atoms=10"):
    pack(np.array([3, 11]), max_atoms=10, max_molecules=5)
