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
    references: per-element reference energies (fitted on the training split, or restored); None
      for a model that predicts total energies (nothing is subtracted from the targets).
    max_molecules: molecule budget per sub-batch, the same for every split (one compiled shape).
  """

  dataset: Dataset
  splits: dict[str, np.ndarray]
  references: ReferenceEnergies | None
  max_molecules: int

  @property
  def subset_names(self) -> list[str]:
    return list(self.dataset.subset_names)


def dataset_path(config: DataConfig) -> Path:
  """``config.path``, or the built-in dataset's HDF5 file (built on first use, then cached)."""
  if config.path is not None:
    return Path(config.path).expanduser()
  from train.data.builtin import HDF5_FILENAME, build_builtin_dataset  # needs RDKit + tblite

  folder = build_builtin_dataset(config.builtin_dir, num_conformers=config.builtin_conformers,
                                 small=config.builtin_small)
  return folder / HDF5_FILENAME


def open_run_data(config: DataConfig, *, references: ReferenceEnergies | None = None,
                  total_energies: bool = False) -> RunData:
  """Opens the dataset, splits it by molecule and fits (or takes) the reference energies; with
  ``total_energies`` (a model without references, e.g. an imported checkpoint) none are used.

  Raises:
    ValueError: when the training split is empty or the fractions are invalid.
  """
  dataset = open_dataset(dataset_path(config), on_error=config.on_error)
  fractions = dict(zip(SPLITS, config.split))
  splits = split_by_molecule(dataset.molecule_keys(), seed=config.split_seed, fractions=fractions)
  if len(splits["train"]) == 0:
    raise ValueError(f"{dataset.path}: the training split is empty ({len(dataset)} records, "
                     f"fractions {fractions})")
  if references is None and not total_energies:
    references = fit_on_dataset(dataset, splits["train"], max_records=config.reference_fit_records,
                                seed=config.split_seed)
  max_molecules = config.molecules_per_batch
  if max_molecules is None:  # only the atom budget binds, as in the reference's atom sampler
    max_molecules = math.ceil(config.atoms_per_batch / max(1, int(dataset.num_atoms.min())))
  return RunData(dataset=dataset, splits=splits, references=references, max_molecules=max_molecules)


def make_iterator(data: RunData, split: str, config: DataConfig, model_config: E2FormerConfig, *,
                  training: bool, seed: int, process_index: int = 0,
                  process_count: int = 1) -> BatchIterator:
  """Batches of one split with the run's static shapes.

  Training iterators shuffle every epoch and drop an incomplete last round across processes;
  evaluation iterators keep file order and pad with empty batches instead.
  """
  return BatchIterator(
      data.dataset, data.splits[split], max_atoms=config.atoms_per_batch,
      max_molecules=data.max_molecules, cutoff=model_config.cutoff,
      max_neighbors=model_config.max_neighbors, reference_slots=model_config.reference_slots,
      shuffle=training, seed=seed, drop_last=training,
      process_index=process_index, process_count=process_count,
      prefetch=config.prefetch, references=data.references, num_species=model_config.num_species)


def references_to_mapping(references: ReferenceEnergies) -> dict[int, float]:
  """{atomic number: eV} of the fitted elements (the form checkpoints store)."""
  return {int(z): float(e) for z, e in references.to_dict()["energies"].items()}


def references_from_mapping(mapping: dict[int, float]) -> ReferenceEnergies:
  return ReferenceEnergies.from_dict({"unit": "eV", "energies": {str(z): e for z, e in mapping.items()}})


def empty_batch(iterator: BatchIterator) -> Batch:
  """An all-padding batch with the iterator's shapes (parameter init, padding of the last eval step)."""
  return iterator.make_batch(np.zeros(0, np.int64))
