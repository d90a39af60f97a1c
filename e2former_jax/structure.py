"""One structure (a molecule or a periodic cell) on the host, and the checks every input must pass.

A :class:`Structure` is what the data readers, the ASE calculator and the JAX MD interface hand to
:func:`e2former_jax.neighbors.build_graph`. :func:`validate_structure` rejects, with one clear
message, what would otherwise give silent garbage inside the network (NaN energies from coincident
atoms, out-of-range embedding lookups, ...).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import ArrayLike, Float, Int

from e2former_jax import lattice
from e2former_jax.neighbors import neighbor_list

# Largest atomic number of a known element (oganesson).
MAX_ATOMIC_NUMBER = 118
# Two atoms closer than this (angstrom) are coincident or overlapping: no chemical structure has
# them (the shortest bond, H2, is 0.74 A), and the model's edge features are singular at r = 0.
MIN_DISTANCE = 0.1


@dataclasses.dataclass(frozen=True, eq=False)
class Structure:
  """A molecule or a periodic cell: atoms, positions and its total charge and spin.

  Attributes:
    numbers: int atomic numbers.
    positions: Cartesian coordinates in angstrom (stored as float64).
    charge: total charge in units of e.
    spin: spin multiplicity 2S + 1 (1 = singlet, 2 = doublet; 0 = unspecified).
    cell: optional lattice vectors (rows) in angstrom; used only when pbc is set.
    pbc: optional periodicity along the three cell vectors; True along any axis makes the
      structure periodic (its atoms interact with their lattice images).
    key: optional name of the structure (record key of a dataset), used in error messages.
  """

  numbers: Int[ArrayLike, "n"]
  positions: Float[ArrayLike, "n 3"]
  charge: int = 0
  spin: int = 1
  cell: Float[ArrayLike, "3 3"] | None = None
  pbc: tuple[bool, bool, bool] | None = None
  key: str | None = None

  def __post_init__(self):
    object.__setattr__(self, "numbers", np.asarray(self.numbers))
    object.__setattr__(self, "positions", np.asarray(self.positions, dtype=np.float64))
    if self.cell is not None:
      object.__setattr__(self, "cell", np.asarray(self.cell, dtype=np.float64))
    if self.pbc is not None:
      object.__setattr__(self, "pbc", tuple(bool(p) for p in np.broadcast_to(self.pbc, (3,))))

  @property
  def num_atoms(self) -> int:
    return int(self.numbers.shape[0]) if self.numbers.ndim else 0

  @property
  def periodic(self) -> bool:
    return self.pbc is not None and any(self.pbc)

  @classmethod
  def from_ase(cls, atoms, *, charge: int | None = None, spin: int | None = None,
               key: str | None = None) -> "Structure":
    """From an ``ase.Atoms``; charge/spin default to ``info["charge"]``/``["spin"]``, else 0/1.

    A cell is kept only when it is non-zero; pbc only when some axis is periodic.
    """
    info = atoms.info
    cell = np.asarray(atoms.cell[:], dtype=np.float64)
    pbc = tuple(bool(p) for p in atoms.pbc)
    return cls(numbers=np.asarray(atoms.numbers), positions=np.asarray(atoms.positions),
               charge=int(info.get("charge", 0) if charge is None else charge),
               spin=int(info.get("spin", 1) if spin is None else spin),
               cell=cell if np.any(cell) else None, pbc=pbc if any(pbc) else None, key=key)


def validate_structure(structure: Structure, *, num_species: int | None = None,
                       allow_left_handed: bool = True) -> None:
  """Raises ValueError with one clear message if the structure cannot be fed to the model.

  Checks, in order: shapes and dtypes, empty structure, atomic numbers in 1..118 (and below
  ``num_species``), finite coordinates, the cell (shape, finite; for a periodic structure also
  non-singular and, unless allowed, right-handed), integer charge and spin with a multiplicity
  consistent with the electron count, and no two atoms closer than :data:`MIN_DISTANCE`
  (found with the cell-list neighbour search, so large structures need no n x n matrix; in a
  periodic cell the distances to every lattice image count, an atom's own images included).

  Args:
    structure: the structure to check.
    num_species: size of the model's atom-type tables (``E2FormerConfig.num_species``), if known.
    allow_left_handed: accept a periodic cell with det < 0.

  Raises:
    ValueError: naming the structure's key and the first problem found.
  """
  name = f"structure {structure.key!r}: " if structure.key is not None else "structure: "
  numbers, positions = structure.numbers, structure.positions
  if numbers.ndim != 1:
    raise ValueError(f"{name}atomic numbers must have shape [n], got {numbers.shape}")
  n = numbers.shape[0]
  if positions.shape != (n, 3):
    raise ValueError(f"{name}positions must have shape [{n}, 3] to match {n} atomic numbers, got "
                     f"{positions.shape}")
  if n == 0:
    raise ValueError(f"{name}empty structure (no atoms)")
  if numbers.dtype.kind not in "iu":
    raise ValueError(f"{name}atomic numbers must be integers, got dtype {numbers.dtype}")
  upper = MAX_ATOMIC_NUMBER if num_species is None else min(MAX_ATOMIC_NUMBER, num_species - 1)
  bad = (numbers < 1) | (numbers > upper)
  if bad.any():
    i = int(np.argmax(bad))
    limit = f" and the model's num_species={num_species}" if num_species is not None else ""
    raise ValueError(f"{name}unknown atomic number {int(numbers[i])} at atom {i} (valid: 1..{upper}"
                     f"{limit})")
  if not np.isfinite(positions).all():
    i = int(np.argmax(~np.isfinite(positions).all(axis=1)))
    raise ValueError(f"{name}non-finite coordinates (NaN or inf) at atom {i}: {positions[i]}")
  _validate_cell(structure, name, allow_left_handed)
  _validate_charge_spin(structure, name)
  # The nearest other atom (or image) within MIN_DISTANCE.
  nbrs = neighbor_list(positions, MIN_DISTANCE, 1, cell=structure.cell, pbc=structure.pbc)
  d = np.where(nbrs.mask[:, 0], nbrs.distances[:, 0], np.inf)  # [n]
  if d.min() < MIN_DISTANCE:  # the search is inclusive, the limit is not
    i = int(np.argmin(d))
    j, shift = int(nbrs.idx[i, 0]), nbrs.shifts[i, 0]
    what = f"atoms {min(i, j)} and {max(i, j)} are" if i != j else f"atom {i} and its own image are"
    image = f" (lattice image {shift.tolist()})" if shift.any() else ""
    raise ValueError(f"{name}{what} {d.min():.4g} A apart{image}, closer than MIN_DISTANCE="
                     f"{MIN_DISTANCE} A (coincident or overlapping atoms)")


def _validate_cell(structure: Structure, name: str, allow_left_handed: bool) -> None:
  if structure.cell is not None:
    if structure.cell.shape != (3, 3):
      raise ValueError(f"{name}cell must have shape [3, 3], got {structure.cell.shape}")
    if not np.isfinite(structure.cell).all():
      raise ValueError(f"{name}cell contains NaN or inf")
  if structure.periodic:
    try:
      lattice.check_cell(structure.cell, structure.pbc, allow_left_handed=allow_left_handed)
    except ValueError as error:
      raise ValueError(f"{name}{error}") from None


def _validate_charge_spin(structure: Structure, name: str) -> None:
  charge, spin = structure.charge, structure.spin
  for label, value in (("charge", charge), ("spin", spin)):
    if isinstance(value, bool) or int(value) != value:
      raise ValueError(f"{name}{label} must be an integer, got {value!r}")
  if spin < 0:
    raise ValueError(f"{name}spin multiplicity must be >= 1 (or 0 = unspecified), got {spin}")
  electrons = int(structure.numbers.sum()) - int(charge)
  if electrons < 0:
    raise ValueError(f"{name}charge {charge} exceeds the nuclear charge "
                     f"{int(structure.numbers.sum())}")
  # 2S unpaired electrons: the multiplicity 2S + 1 must have the parity the electron count allows.
  if spin >= 1 and ((spin - 1) % 2 != electrons % 2 or spin - 1 > electrons):
    raise ValueError(f"{name}spin multiplicity {spin} is impossible with {electrons} electrons "
                     f"(charge {charge})")
