"""Deterministic, resumable, sharded, prefetched iteration over padded batches of a dataset.

Per epoch, the records are shuffled with a generator seeded by (seed, epoch) and packed greedily
(:func:`~train.data.packing.pack`) into the epoch's global list of batches. Every process computes
the same global list from the dataset's index alone (no record is read for it), and process p of P
takes batches p, p + P, p + 2P, ... So the batches a process sees depend only on (seed, epoch,
process_index, process_count), and a run resumes exactly from a :class:`DataPosition`
(epoch, batch index within this process's share).

All batches have identical shapes: N = ``max_atoms`` atom slots, K = ``max_neighbors`` neighbour
slots and B = ``max_molecules + 1`` molecule slots. The extra molecule slot is always padding and
receives the padded atoms, so padding never aliases a real molecule.

Records are read, validated and collated by a background thread that runs up to ``prefetch``
batches ahead of the consumer (numpy and file reads release the GIL, so this overlaps with the
accelerator step).
"""

from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Any, Iterator

import numpy as np

from train.data.batch import Batch, collate
from train.data.packing import pack
from train.data.records import Dataset, InvalidRecordError
from train.data.reference_energies import ReferenceEnergies

# How long the prefetch thread waits on a full queue before re-checking whether it was cancelled.
_QUEUE_POLL_S = 0.1


@dataclasses.dataclass(frozen=True)
class DataPosition:
  """Where a data stream is: the epoch and the next batch index within this process's share."""

  epoch: int = 0
  batch: int = 0

  def to_dict(self) -> dict[str, int]:
    return {"epoch": self.epoch, "batch": self.batch}

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "DataPosition":
    return cls(epoch=int(data["epoch"]), batch=int(data["batch"]))


class BatchIterator:
  """Padded batches of fixed shape from (a subset of) a dataset.

  Args:
    dataset: the records.
    indices: record indices to draw from (default: all).
    max_atoms: N, the atom budget and atom slots of every batch.
    max_molecules: molecule budget per batch (default: enough for the smallest records to fill
      ``max_atoms``, i.e. only the atom budget binds). Batches have ``max_molecules + 1`` slots.
    cutoff: neighbour cutoff in angstrom.
    max_neighbors: K, neighbour slots per atom.
    reference_slots: fill the neighbour slots as the authors' code does (the model config's
      ``reference_slots``; see ``e2former_jax.neighbors.build_graph``).
    shuffle: shuffle the records every epoch (else keep ``indices`` order).
    seed: seed of the shuffle.
    epoch: default epoch of :meth:`iterate` and ``iter()``.
    drop_last: with several processes, drop the last round of batches when it does not give every
      process a batch; otherwise the missing ones are empty (all-padding) batches.
    process_index: this process's index p in [0, process_count).
    process_count: P, the number of processes sharing the batches.
    prefetch: batches prepared ahead in a background thread (0: prepare in the caller's thread).
    references: per-element reference energies subtracted from the targets (none: total energies).
    num_species: the model's ``num_species``; records with atomic numbers >= it are invalid.
    dtype: float dtype of the batch's positions, energies and forces.

  Records larger than ``max_atoms``, and records that fail to read or validate, raise an
  :class:`~train.data.records.InvalidRecordError` naming the file and record; with
  ``dataset.on_error == "skip"`` they are left out and warned about once each instead
  (``dataset.skipped``). ``num_skipped`` counts the records this iterator left out (an invalid
  record again in every epoch).
  """

  def __init__(self, dataset: Dataset, indices: np.ndarray | None = None, *, max_atoms: int,
               max_molecules: int | None = None, cutoff: float, max_neighbors: int,
               reference_slots: bool = False, shuffle: bool = True, seed: int = 0, epoch: int = 0,
               drop_last: bool = False,
               process_index: int = 0, process_count: int = 1, prefetch: int = 2,
               references: ReferenceEnergies | None = None, num_species: int | None = None,
               dtype=np.float32):
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if max_atoms < 1 or (max_molecules is not None and max_molecules < 1):
      raise ValueError(f"budgets must be positive: max_atoms={max_atoms}, "
                       f"max_molecules={max_molecules}")
    self.dataset = dataset
    self.max_atoms, self.max_neighbors = int(max_atoms), int(max_neighbors)
    self.cutoff, self.reference_slots = float(cutoff), bool(reference_slots)
    self.shuffle, self.seed, self.epoch, self.drop_last = shuffle, int(seed), int(epoch), drop_last
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.prefetch, self.references = int(prefetch), references
    self.num_species, self.dtype = num_species, dtype
    self.num_skipped = 0
    self._skip_lock = threading.Lock()

    if indices is None:
      indices = np.arange(len(dataset))
    indices = np.asarray(indices, np.int64).reshape(-1)
    if len(indices) and (indices.min() < 0 or indices.max() >= len(dataset)):
      raise ValueError(f"indices must lie in [0, {len(dataset)})")
    sizes = dataset.num_atoms[indices]
    too_large = sizes > self.max_atoms
    for i in indices[too_large]:
      dataset.skip(i, InvalidRecordError(dataset.path, dataset.record_name(i),
                                         f"{dataset.num_atoms[i]} atoms exceed the batch budget "
                                         f"max_atoms={self.max_atoms}"))
    self.num_skipped += int(too_large.sum())
    indices, sizes = indices[~too_large], sizes[~too_large]
    self.indices = indices
    if max_molecules is None:
      max_molecules = math.ceil(self.max_atoms / max(1, int(sizes.min()) if len(sizes) else 1))
    self.max_molecules = int(max_molecules)
    self._plan_cache: tuple[int, list[np.ndarray]] | None = None

  @property
  def num_molecule_slots(self) -> int:
    """B of every batch: the molecule budget plus one padding slot."""
    return self.max_molecules + 1

  def plan(self, epoch: int | None = None) -> list[np.ndarray]:
    """This process's batches of an epoch: record indices of each (empty: a padding batch)."""
    epoch = self.epoch if epoch is None else int(epoch)
    cache = self._plan_cache  # one read: the prefetch thread may replace it concurrently
    if cache is None or cache[0] != epoch:
      order = self.indices
      if self.shuffle:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
      batches = [order[b] for b in pack(self.dataset.num_atoms[order], max_atoms=self.max_atoms,
                                        max_molecules=self.max_molecules)]
      p, count = self.process_index, self.process_count
      rounds = len(batches) // count if self.drop_last else -(-len(batches) // count)
      empty = np.zeros(0, np.int64)
      mine = [batches[r * count + p] if r * count + p < len(batches) else empty
              for r in range(rounds)]
      cache = self._plan_cache = (epoch, mine)
    return cache[1]

  def num_batches(self, epoch: int | None = None) -> int:
    """Batches this process gets in an epoch (equal on every process; may vary between epochs)."""
    return len(self.plan(epoch))

  def __iter__(self) -> Iterator[Batch]:
    return self.iterate()

  def iterate(self, epoch: int | None = None, start_batch: int = 0) -> Iterator[Batch]:
    """The batches of one epoch from ``start_batch`` on (exactly those a full pass would give)."""
    plan = self.plan(epoch)
    if not 0 <= start_batch <= len(plan):
      raise ValueError(f"start_batch {start_batch} not in [0, {len(plan)}]")
    return _prefetched((self.make_batch(b) for b in plan[start_batch:]), self.prefetch)

  def stream(self, start: DataPosition = DataPosition()) -> Iterator[tuple[DataPosition, Batch]]:
    """Endless batches across epochs, each with the position to resume from after it."""

    def batches():
      epoch, batch = start.epoch, start.batch
      while True:
        plan = self.plan(epoch)
        if not plan and batch == 0:
          raise ValueError("the iterator has no batches (no records)")
        for b in range(batch, len(plan)):
          after = DataPosition(epoch, b + 1) if b + 1 < len(plan) else DataPosition(epoch + 1, 0)
          yield after, self.make_batch(plan[b])
        epoch, batch = epoch + 1, 0

    return _prefetched(batches(), self.prefetch)

  def make_batch(self, record_indices: np.ndarray) -> Batch:
    """Reads, validates and collates the given records into a padded batch."""
    records, subsets = [], []
    for i in record_indices:
      record = self.dataset.read_or_skip(i, num_species=self.num_species)
      if record is None:
        with self._skip_lock:
          self.num_skipped += 1
        continue
      records.append(record)
      subsets.append(self.dataset.subset_ids[i])
    try:
      return collate(records, subsets, cutoff=self.cutoff, max_neighbors=self.max_neighbors,
                     reference_slots=self.reference_slots, num_nodes=self.max_atoms,
                     num_molecules=self.num_molecule_slots, references=self.references,
                     dtype=self.dtype)
    except ValueError as e:  # e.g. an element without a reference energy
      names = ", ".join(self.dataset.record_name(i) for i in record_indices)
      raise ValueError(f"{self.dataset.path}: cannot collate records [{names}]: {e}") from e


_END = object()


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


def _prefetched(items: Iterator, prefetch: int) -> Iterator:
  """Runs the ``items`` generator in a background thread, at most ``prefetch`` items ahead.

  Exceptions of the generator are re-raised in the consumer; closing the returned generator (or
  dropping it) stops the thread.
  """
  if prefetch <= 0:
    yield from items
    return
  q: queue.Queue = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        q.put(item, timeout=_QUEUE_POLL_S)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for item in items:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except  # handed to the consumer
      put(_Failure(e))

  thread = threading.Thread(target=work, name="batch-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item = q.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join()
