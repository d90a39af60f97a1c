"""The three builds of the built-in dataset: which molecules each holds and how many geometries of each."""

from __future__ import annotations

import dataclasses
import enum

from train.data.builtin.enumeration import enumerated_molecules
from train.data.builtin.molecules import (AMINO_ACIDS, CHARGED, CURATED_MOLECULES, DRUG_LIKE, ION_PAIRS,
                                          RADICALS, SMALL_MOLECULE_NAMES, SMALL_ORGANICS, BuiltinMolecule)


class BuiltinSize(enum.Enum):
  """Which build of the built-in dataset."""

  SMALL = "small"  # tests: a handful of molecules, seconds
  DEFAULT = "default"  # the main command on a 2-core CPU: ~3 minutes
  LARGE = "large"  # the GPU recipe: thousands of molecules, built over all cores


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """Attributes:
    all_curated: all hand-curated molecules, or only ``SMALL_MOLECULE_NAMES``.
    enumerated: (subset, count) of enumerated molecules (``enumeration.enumerated_molecules``).
    conformers_per_molecule: labelled geometries per molecule (a few may be rejected).
  """

  all_curated: bool
  enumerated: tuple[tuple[str, int], ...]
  conformers_per_molecule: int


SIZE_SPECS = {
  # One molecule of each subset, both signs of charge and one ion pair (two fragments): every path
  # of the sampler and the writers, in seconds.
  BuiltinSize.SMALL: SizeSpec(all_curated=False, enumerated=((ION_PAIRS, 1),), conformers_per_molecule=3),
  # About 4x the molecules of the 120 hand-curated ones at a quarter of their former 25 geometries
  # each: about the former build time (2-3 minutes on 2 cores), with charged species and radicals
  # weighted up (a fifth of the molecules each).
  BuiltinSize.DEFAULT: SizeSpec(all_curated=True, enumerated=(
    (SMALL_ORGANICS, 80), (DRUG_LIKE, 80), (AMINO_ACIDS, 35), (CHARGED, 90), (RADICALS, 75),
    (ION_PAIRS, 20)), conformers_per_molecule=6),
  # Nearly every ion pair the recipes make and a few thousand molecules in all, for a paper-size model.
  BuiltinSize.LARGE: SizeSpec(all_curated=True, enumerated=(
    (SMALL_ORGANICS, 600), (DRUG_LIKE, 900), (AMINO_ACIDS, 200), (CHARGED, 700), (RADICALS, 700),
    (ION_PAIRS, 90)), conformers_per_molecule=8),
}


def builtin_molecules(size: BuiltinSize = BuiltinSize.DEFAULT) -> tuple[BuiltinMolecule, ...]:
  """The molecules of a build, in file order: the hand-curated ones, then the enumerated ones."""
  spec = SIZE_SPECS[size]
  curated = tuple(m for m in CURATED_MOLECULES if spec.all_curated or m.name in SMALL_MOLECULE_NAMES)
  return curated + enumerated_molecules(spec.enumerated)
