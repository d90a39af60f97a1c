"""The builds of the built-in dataset: which molecules each holds and how many geometries of each."""

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
  HELDOUT = "heldout"  # recipe decisions for the main command: molecules no default-sized build holds


class Curated(enum.Enum):
  """Which of the hand-curated molecules a build holds."""

  ALL = "all"
  SMALL = "small"  # only SMALL_MOLECULE_NAMES
  NONE = "none"


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """Attributes:
    curated: which hand-curated molecules.
    enumerated: (subset, count) of enumerated molecules (``enumeration.enumerated_molecules``).
    conformers_per_molecule: labelled geometries per molecule (a few may be rejected).
    skip: (subset, count) of the first enumerated molecules left out (they belong to other builds).
    per_subset: at most this many enumerated molecules of each subset after the skipped ones (None: all).
  """

  curated: Curated
  enumerated: tuple[tuple[str, int], ...]
  conformers_per_molecule: int
  skip: tuple[tuple[str, int], ...] = ()
  per_subset: int | None = None


_DEFAULT_QUOTAS = ((SMALL_ORGANICS, 80), (DRUG_LIKE, 80), (AMINO_ACIDS, 35), (CHARGED, 90), (RADICALS, 75),
                   (ION_PAIRS, 20))
_LARGE_QUOTAS = ((SMALL_ORGANICS, 600), (DRUG_LIKE, 900), (AMINO_ACIDS, 200), (CHARGED, 700), (RADICALS, 700),
                 (ION_PAIRS, 90))
# The held-out build scores recipes for the main command on many more molecules than its validation
# split holds, none of which it trains on (docs/decisions.md D17): the first 50 molecules of each subset
# of the large build's enumeration that are not among the first twice-the-default ones, so that neither
# the default build nor one with twice its molecules holds them. The large build (the GPU recipe's)
# holds them all: it is no held-out set for that recipe.
HELDOUT_SKIP_FACTOR = 2
HELDOUT_PER_SUBSET = 50

SIZE_SPECS = {
  # One molecule of each subset, both signs of charge and one ion pair (two fragments): every path
  # of the sampler and the writers, in seconds.
  BuiltinSize.SMALL: SizeSpec(curated=Curated.SMALL, enumerated=((ION_PAIRS, 1),), conformers_per_molecule=3),
  # About 4x the molecules of the 120 hand-curated ones at a quarter of their former 25 geometries
  # each: about the former build time (2-3 minutes on 2 cores), with charged species and radicals
  # weighted up (a fifth of the molecules each).
  BuiltinSize.DEFAULT: SizeSpec(curated=Curated.ALL, enumerated=_DEFAULT_QUOTAS, conformers_per_molecule=6),
  # Nearly every ion pair the recipes make and a few thousand molecules in all, for a paper-size model.
  BuiltinSize.LARGE: SizeSpec(curated=Curated.ALL, enumerated=_LARGE_QUOTAS, conformers_per_molecule=8),
  BuiltinSize.HELDOUT: SizeSpec(
    curated=Curated.NONE, enumerated=_LARGE_QUOTAS, conformers_per_molecule=4,
    skip=tuple((subset, HELDOUT_SKIP_FACTOR * n) for subset, n in _DEFAULT_QUOTAS), per_subset=HELDOUT_PER_SUBSET),
}


def builtin_molecules(size: BuiltinSize = BuiltinSize.DEFAULT) -> tuple[BuiltinMolecule, ...]:
  """The molecules of a build, in file order: the hand-curated ones, then the enumerated ones."""
  spec = SIZE_SPECS[size]
  curated = {Curated.ALL: CURATED_MOLECULES, Curated.NONE: (),
             Curated.SMALL: tuple(m for m in CURATED_MOLECULES if m.name in SMALL_MOLECULE_NAMES)}[spec.curated]
  skipped = set(enumerated_molecules(spec.skip)) if spec.skip else set()
  enumerated, taken = [], dict.fromkeys((subset for subset, _ in spec.enumerated), 0)
  for molecule in enumerated_molecules(spec.enumerated):
    if molecule not in skipped and (spec.per_subset is None or taken[molecule.subset] < spec.per_subset):
      enumerated.append(molecule)
      taken[molecule.subset] += 1
  return curated + tuple(enumerated)
