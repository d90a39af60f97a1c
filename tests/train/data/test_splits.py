"""Splits by molecule: deterministic, no molecule in two splits, independent of order."""

from __future__ import annotations

import numpy as np

from train.data import split_by_molecule


def test_split_by_molecule(rng):
  molecules = [f"mol{i}" for i in range(2000)]
  keys = np.array([molecules[i] for i in rng.integers(0, 2000, 10_000)], dtype=object)
  splits = split_by_molecule(keys, seed=7)
  assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(10_000))
  seen = [set(keys[idx]) for idx in splits.values()]
  assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  fractions = np.array([len(s) for s in seen]) / len(set(keys))
  np.testing.assert_allclose(fractions, [0.9, 0.05, 0.05], atol=0.02)
  again = split_by_molecule(keys, seed=7)
  assert all(np.array_equal(splits[k], again[k]) for k in splits)
  assert not np.array_equal(split_by_molecule(keys, seed=8)["val"], splits["val"])
  # A molecule's split does not depend on which other records are present or their order.
  subset = split_by_molecule(keys[::-1][:500], seed=7)
  val_molecules = set(keys[::-1][:500][subset["val"]])
  assert val_molecules <= seen[1]


def test_custom_fractions_and_errors():
  keys = [f"k{i}" for i in range(100)]
  splits = split_by_molecule(keys, fractions={"a": 0.5, "b": 0.0, "c": 0.5})
  assert len(splits["b"]) == 0 and len(splits["a"]) + len(splits["c"]) == 100
  try:
    split_by_molecule(keys, fractions={"a": 0.5})
  except ValueError as e:
    assert "sum to 1" in str(e)
  else:
    raise AssertionError("fractions not summing to 1 must raise")
