"""The data of one run: the dataset, its molecule-level splits, the reference energies and iterators."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from e2former_jax.config import E2FormerConfig
from train.data import BatchIterator, Dataset, ReferenceEnergies, fit_on_dataset, open_dataset
from train.data import split_by_molecule
from train.data.batch import Batch
from train.run_config import DataConfig

SPLITS = ("train", "val", "test")


@dataclasses.dataclass
class RunData:
  """Attributes:
    dataset: the opened dataset (lazy).
    splits: split name -> record indices (molecule-level, deterministic in ``split_seed``).
    references: reference energies (fitted on the training split, or restored; empty for a model
      that predicts total energies).
    max_molecules: molecule budget per sub-batch, the same for every split (one compiled shape).
  """

  dataset: Dataset
  splits: dict[str, np.ndarray]
  references: ReferenceEnergies
  max_molecules: int

  @property
  def subset_names(self) -> list[str]:
    return list(self.dataset.subset_names)


def dataset_path(config: DataConfig) -> Path:
  """``config.path``, or the built-in dataset's HDF5 file (built on first use, then cached)."""
  if config.path is not None:
    return Path(config.path).expanduser()
  # Building needs RDKit + tblite; a complete cached build does not.
  from train.data.builtin import HDF5_FILENAME, build_builtin_dataset

  folder = build_builtin_dataset(config.builtin_dir, size=config.builtin,
                                 num_conformers=config.builtin_conformers)
  return folder / HDF5_FILENAME


def open_run_data(config: DataConfig, *, references: ReferenceEnergies | None = None,
                  training: bool = True) -> RunData:
  """Opens the dataset, splits it by molecule and fits (or takes) the reference energies.

  ``references``: a checkpoint's (empty ones for a model that predicts total energies, e.g. an
  imported checkpoint: nothing is subtracted); None fits them on the training split.
  ``training``: whether the run trains; evaluation with given references needs no training split,
  so ``data.split=[0, 0, 1]`` scores a whole dataset as its test split.

  Raises:
    ValueError: when the training split is empty and the run trains or references must be fitted,
      the fractions are invalid, or (with ``on_error="raise"``) a record has more atoms than
      ``atoms_per_batch``.
  """
  dataset = open_dataset(dataset_path(config), on_error=config.on_error)
  if config.on_error == "raise":
    _check_atom_budget(dataset, config.atoms_per_batch)
  fractions = dict(zip(SPLITS, config.split))
  splits = split_by_molecule(dataset.molecule_keys(), seed=config.split_seed, fractions=fractions)
  if len(splits["train"]) == 0 and (training or references is None):
    raise ValueError(f"{dataset.path}: the training split is empty ({len(dataset)} records, "
                     f"fractions {fractions})")
  if references is None:
    references = fit_on_dataset(dataset, splits["train"], max_records=config.reference_fit_records,
                                seed=config.split_seed)
  max_molecules = config.molecules_per_batch
  if max_molecules is None:  # only the atom budget binds, as in the reference's atom sampler
    max_molecules = math.ceil(config.atoms_per_batch / max(1, int(dataset.num_atoms.min())))
  return RunData(dataset=dataset, splits=splits, references=references, max_molecules=max_molecules)


def empty_splits(data: RunData, config: DataConfig) -> str | None:
  """Which of the validation and test splits are empty and why, in one sentence (None if neither)."""
  empty = [name for name, split in (("validation", "val"), ("test", "test"))
           if not len(data.splits[split])]
  if not empty:
    return None
  molecules = len(set(data.dataset.molecule_keys().tolist()))
  return (f"{data.dataset.path}: the {' and '.join(empty)} split{'s are' if len(empty) > 1 else ' is'} "
          f"empty: data.split={list(config.split)} (split by molecule, seed data.split_seed="
          f"{config.split_seed}) gave {'them' if len(empty) > 1 else 'it'} none of the dataset's "
          f"{molecules} molecule(s)")


def _check_atom_budget(dataset: Dataset, atoms_per_batch: int) -> None:
  """Raises ValueError naming the first record larger than the sub-batch and the setting to raise."""
  too_large = np.flatnonzero(dataset.num_atoms > atoms_per_batch)
  if not len(too_large):
    return
  first, largest = int(too_large[0]), int(dataset.num_atoms.max())
  raise ValueError(f"{dataset.path}: {dataset.record_name(first)} has {dataset.num_atoms[first]} atoms, "
                   f"more than data.atoms_per_batch={atoms_per_batch} (the atoms of one sub-batch; "
                   f"{len(too_large)} record(s) exceed it, the largest has {largest}); raise it with "
                   f"--set data.atoms_per_batch={largest}, or leave such records out with "
                   f"--set data.on_error=skip")


def repeat_subsets(dataset: Dataset, indices: np.ndarray, repeats: dict[str, int]) -> np.ndarray:
  """``indices`` with every record of subset ``name`` listed ``repeats[name]`` times in all.

  Raises:
    ValueError: naming a subset the dataset does not have, and the subsets it has.
  """
  unknown = sorted(set(repeats) - set(dataset.subset_names))
  if unknown:
    raise ValueError(f"data.subset_repeat names subset(s) {unknown} that {dataset.path} does not have; "
                     f"its subsets: {dataset.subset_names} (--set data.subset_repeat=null trains every "
                     f"record once)")
  extra = [np.tile(indices[dataset.subset_ids[indices] == dataset.subset_names.index(name)], repeat - 1)
           for name, repeat in repeats.items()]
  return np.concatenate([indices, *extra])


def make_iterator(data: RunData, split: str, config: DataConfig, model_config: E2FormerConfig, *,
                  training: bool, seed: int, process_index: int = 0,
                  process_count: int = 1) -> BatchIterator:
  """Batches of one split with the run's static shapes.

  Training iterators shuffle every epoch, hold the records of ``config.subset_repeat``'s subsets
  that many times and drop an incomplete last round across processes; evaluation iterators keep
  file order, every record once, and pad with empty batches instead.
  """
  indices = data.splits[split]
  if training and config.subset_repeat:
    indices = repeat_subsets(data.dataset, indices, config.subset_repeat)
  return BatchIterator(
      data.dataset, indices, max_atoms=config.atoms_per_batch,
      max_molecules=data.max_molecules, cutoff=model_config.cutoff,
      max_neighbors=model_config.max_neighbors, reference_slots=model_config.reference_slots,
      shuffle=training, seed=seed, drop_last=training,
      process_index=process_index, process_count=process_count,
      prefetch=config.prefetch, references=data.references, num_species=model_config.num_species)


def empty_batch(iterator: BatchIterator) -> Batch:
  """An all-padding batch with the iterator's shapes (parameter init, padding of the last eval step)."""
  return iterator.make_batch(np.zeros(0, np.int64))
