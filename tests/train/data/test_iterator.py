"""Batch iterator: fixed shapes, exact contents, determinism, resumption, sharding, bad records."""

from __future__ import annotations

import threading
import time

import h5py
import numpy as np
import pytest
from e2f_testing import brute_force_graph

from train.data import (
  BatchIterator,
  DataPosition,
  InvalidRecordError,
  fit_reference_energies,
  open_dataset,
)

CUTOFF, K, MAX_ATOMS = 3.0, 8, 64
GRAPH_FIELDS = ("positions", "species", "node_mask", "molecule_index", "nbr_idx", "nbr_mask",
                "nbr_shift", "charge", "spin", "molecule_mask")


@pytest.fixture
def dataset(spice_writer, make_molecules):
  sizes = np.random.default_rng(1).integers(3, 21, 30)
  subsets = [f"subset {i % 3}" for i in range(30)]
  return open_dataset(spice_writer(make_molecules(2, sizes, conformers=4), subsets=subsets))


def arrays(batch):
  return [np.asarray(getattr(batch.graph, f)) for f in GRAPH_FIELDS] + [
      np.asarray(batch.energy), np.asarray(batch.forces), np.asarray(batch.num_atoms),
      np.asarray(batch.subset)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for x, y in zip(arrays(a), arrays(b)):
      np.testing.assert_array_equal(x, y)


def test_shapes_contents_and_coverage(dataset):
  ref = fit_reference_energies(dataset.read(i) for i in range(len(dataset)))
  it = BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, references=ref,
                     prefetch=2)
  plan = it.plan()
  assert sorted(np.concatenate(plan).tolist()) == list(range(120))  # every record exactly once
  assert it.max_molecules == -(-MAX_ATOMS // dataset.num_atoms.min())
  batches = list(it)
  assert len(batches) == len(plan) == it.num_batches()
  b_slots = it.max_molecules + 1
  for batch, indices in zip(batches, plan):
    assert batch.graph.nbr_idx.shape == (MAX_ATOMS, K) and batch.graph.charge.shape == (b_slots,)
    assert batch.forces.shape == (MAX_ATOMS, 3) and batch.energy.dtype == np.float32
    records = [dataset.read(i) for i in indices]
    m, n = len(records), sum(r.structure.num_atoms for r in records)
    assert n <= MAX_ATOMS and batch.graph.node_mask.sum() == n and batch.graph.molecule_mask.sum() == m
    expected = [r.energy - ref.energy(r.structure.numbers, r.structure.charge, r.structure.spin)
                for r in records]
    np.testing.assert_allclose(batch.energy[:m], expected, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(batch.forces[:n], np.concatenate([r.forces for r in records]), rtol=1e-6)
    assert batch.num_atoms[:m].tolist() == [r.structure.num_atoms for r in records]
    assert [dataset.subset_names[s] for s in batch.subset[:m]] == [r.subset for r in records]
    assert np.all(batch.subset[m:] == -1) and np.all(batch.energy[m:] == 0)
    assert np.all(batch.graph.molecule_index[n:] == b_slots - 1)  # padding atoms: spare slot
  # The first batch's graph equals an independent brute-force build of its records.
  records = [dataset.read(i) for i in plan[0]]
  mols = [(r.structure.numbers, r.structure.positions, r.structure.charge, r.structure.spin) for r in records]
  expected = brute_force_graph(mols, cutoff=CUTOFF, max_neighbors=K, num_nodes=MAX_ATOMS,
                               num_molecules=b_slots, dtype=np.float32)
  for field, x in zip(GRAPH_FIELDS, arrays(batches[0])):
    np.testing.assert_array_equal(x, np.asarray(getattr(expected, field)), err_msg=field)


def test_deterministic_per_seed_and_epoch(dataset):
  make = lambda **kw: BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, **kw)
  a, b = make(seed=3), make(seed=3, prefetch=0)
  assert_same_batches(list(a.iterate(epoch=1)), list(b.iterate(epoch=1)))
  flat = lambda it, e: np.concatenate(it.plan(e)).tolist()
  assert flat(a, 0) != flat(a, 1) and flat(a, 0) != flat(make(seed=4), 0)
  ordered = make(shuffle=False, indices=np.arange(50, 10, -1))
  assert flat(ordered, 0) == flat(ordered, 5) == list(range(50, 10, -1))


def test_resume_from_position(dataset):
  it = BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, seed=1)
  full = list(it.iterate(epoch=2))
  assert_same_batches(list(it.iterate(epoch=2, start_batch=3)), full[3:])
  # stream() crosses epochs and reports where to resume after each batch.
  stream = it.stream(DataPosition(epoch=1, batch=it.num_batches(1) - 2))
  positions, batches = zip(*[next(stream) for _ in range(4)])
  stream.close()
  assert positions[:3] == (DataPosition(1, it.num_batches(1) - 1), DataPosition(2, 0), DataPosition(2, 1))
  assert_same_batches(batches[2:], full[:2])
  resumed = it.stream(DataPosition.from_dict(positions[1].to_dict()))
  assert_same_batches([next(resumed)[1] for _ in range(2)], full[:2])
  resumed.close()


@pytest.mark.parametrize("drop_last", [False, True])
def test_sharding_by_batch_index(dataset, drop_last):
  make = lambda p: BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, seed=5,
                                 process_index=p, process_count=3, drop_last=drop_last)
  global_plan = BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, seed=5).plan()
  plans = [make(p).plan() for p in range(3)]
  assert len({len(p) for p in plans}) == 1  # every process steps the same number of times
  rounds = len(global_plan) // 3 if drop_last else -(-len(global_plan) // 3)
  assert len(plans[0]) == rounds
  for r in range(rounds):
    for p in range(3):
      g = r * 3 + p
      expected = global_plan[g].tolist() if g < len(global_plan) else []
      assert plans[p][r].tolist() == expected
  if not drop_last and len(global_plan) % 3:
    empty = list(make(2).iterate(start_batch=rounds - 1))[0]  # an all-padding batch
    assert not empty.graph.node_mask.any() and not empty.graph.molecule_mask.any()
    assert empty.graph.positions.shape == (MAX_ATOMS, 3)


def test_structure_larger_than_budget(dataset):
  big = int(np.argmax(dataset.num_atoms))
  budget = int(dataset.num_atoms[big]) - 1
  with pytest.raises(InvalidRecordError, match=rf"synthetic\.hdf5: group 'mol\d+' conformer 0: \d+ atoms exceed the batch budget max_atoms={budget}"):
    BatchIterator(dataset, max_atoms=budget, cutoff=CUTOFF, max_neighbors=K)
  dataset.on_error = "skip"
  with pytest.warns(UserWarning, match="skipped .* records larger than the atom budget"):
    it = BatchIterator(dataset, max_atoms=budget, cutoff=CUTOFF, max_neighbors=K)
  too_big = set(np.flatnonzero(dataset.num_atoms > budget).tolist())
  assert it.num_skipped == len(too_big) > 0
  assert set(np.concatenate(it.plan()).tolist()) == set(range(len(dataset))) - too_big


def test_invalid_record_raises_or_is_skipped(spice_writer, make_molecules):
  mols = make_molecules(3, [6, 7, 5], conformers=4)
  path = spice_writer(mols)
  with h5py.File(path, "a") as f:
    energies = f["mol1"]["dft_total_energy"][()]
    energies[2] = np.nan
    f["mol1"]["dft_total_energy"][...] = energies
  it = BatchIterator(open_dataset(path), max_atoms=40, cutoff=CUTOFF, max_neighbors=K, shuffle=False)
  with pytest.raises(InvalidRecordError, match=r"group 'mol1' conformer 2: non-finite energy"):
    list(it)  # raised in the prefetch thread, re-raised here
  it = BatchIterator(open_dataset(path, on_error="skip"), max_atoms=40, cutoff=CUTOFF, max_neighbors=K,
                     shuffle=False)
  with pytest.warns(UserWarning, match=r"1 skipped so far.*group 'mol1' conformer 2"):
    batches = list(it)
  assert it.num_skipped == 1
  assert sum(int(b.graph.molecule_mask.sum()) for b in batches) == 11


def test_prefetch_thread_stops_when_consumer_stops(dataset):
  before = threading.active_count()
  it = BatchIterator(dataset, max_atoms=MAX_ATOMS, cutoff=CUTOFF, max_neighbors=K, prefetch=1)
  batches = it.iterate()
  next(batches)
  batches.close()
  deadline = time.time() + 5
  while threading.active_count() > before and time.time() < deadline:
    time.sleep(0.01)
  assert threading.active_count() == before


def test_molecule_sized_batches_are_fast(spice_writer, make_molecules):
  # ~20-atom molecules in 1024-atom batches: reading, validating and collating must stay well
  # below a CPU training step (~10 ms/batch measured on an idle core; generous bound for CI).
  sizes = np.random.default_rng(4).integers(15, 26, 25)
  ds = open_dataset(spice_writer(make_molecules(4, sizes, conformers=12), name="fast.hdf5"))
  it = BatchIterator(ds, max_atoms=1024, max_molecules=64, cutoff=4.5, max_neighbors=32, prefetch=0)
  plan = it.plan()
  it.make_batch(plan[0])
  start = time.perf_counter()
  for indices in plan[1:6]:
    it.make_batch(indices)
  assert (time.perf_counter() - start) / 5 < 0.5
