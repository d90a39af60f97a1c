"""Reference energies: the part of a total energy fixed by composition, total charge and spin.

A trained model predicts ``E - E_ref`` and adds ``E_ref`` back, with

  E_ref(Z_1..Z_n, q, 2S+1) = sum_i e[Z_i] + c[q] + s[2S+1],

one energy per element, one offset per total charge q != 0 and one per spin multiplicity 2S+1 != 1.
The neutral closed-shell molecule is the baseline (c[0] = s[1] = 0), so every term is determined
by the data. Without the charge and spin terms an ion's offset of several eV (roughly an
ionisation energy or electron affinity, nearly the same for every molecule) would have to be built
by the network out of per-atom contributions, which it cannot do for molecules of another size:
energies of ions were then worse than a per-element constant. The terms do not depend on
positions, so forces and stresses come from the network alone.

The values are fitted by least squares on training records (``train/data/reference_energies.py``)
and stored with every checkpoint (:meth:`ReferenceEnergies.to_dict`).
"""

from __future__ import annotations

import dataclasses
import types
import warnings
from typing import Any, Mapping

import numpy as np

# The baseline state: its offsets are zero by definition.
NEUTRAL_CHARGE = 0
SINGLET = 1
# A multiplicity of 0 means "unspecified" (Graph.spin); it gets no spin offset.
UNSPECIFIED_MULTIPLICITY = 0
_UNIT = "eV"
# States already warned about (UnfittedStateWarning is given once per state and process).
_WARNED: set[str] = set()


class UnfittedStateWarning(UserWarning):
  """A total charge or spin multiplicity without a fitted reference offset."""


def _frozen(mapping: Mapping[int, float] | None) -> Mapping[int, float] | None:
  if mapping is None:
    return None
  return types.MappingProxyType({int(k): float(v) for k, v in mapping.items()})


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceEnergies:
  """Per-element energies plus per-charge and per-multiplicity offsets, in eV.

  Attributes:
    elements: atomic number -> e[Z]; elements absent here have no reference.
    charges: total charge q -> c[q] for the charges other than 0 that the fit saw; None when
      the references do not model charge (per-element references of earlier checkpoints, or
      given by hand): then every charge gets no offset and none is refused.
    multiplicities: spin multiplicity 2S+1 -> s[2S+1] for multiplicities other than 1 that the
      fit saw; None as for ``charges``.
  An empty instance (no elements) means "the network predicts total energies itself".
  """

  elements: Mapping[int, float] = dataclasses.field(default_factory=dict)
  charges: Mapping[int, float] | None = None
  multiplicities: Mapping[int, float] | None = None

  def __post_init__(self):
    for name in ("elements", "charges", "multiplicities"):
      object.__setattr__(self, name, _frozen(getattr(self, name)))
    if NEUTRAL_CHARGE in (self.charges or {}) or SINGLET in (self.multiplicities or {}):
      raise ValueError("the neutral charge and the singlet are the baseline: they take no offset")

  def __bool__(self) -> bool:
    return bool(self.elements)

  def check(self, numbers: np.ndarray, *, where: str = "structure") -> None:
    """Raises ValueError naming the elements without a reference (no-op for an empty instance).

    An element the fit never saw has no reference and an untrained type embedding: refused. A
    charge or multiplicity it never saw only lacks its offset (:meth:`energy` warns).
    """
    if not self:
      return
    missing = sorted({int(z) for z in np.asarray(numbers).ravel()} - set(self.elements))
    if missing:
      raise ValueError(f"{where}: no reference energy for element(s) Z={missing}: the model was "
                       f"trained on Z={sorted(self.elements)} only")

  def unfitted_state(self, charge: int, multiplicity: int) -> str | None:
    """What of (charge, multiplicity) has no fitted offset, in words, or None when both have one."""
    missing = []
    if self.charges is not None and int(charge) not in (NEUTRAL_CHARGE, *self.charges):
      missing.append(f"total charge {int(charge)} (fitted: "
                     f"{sorted({NEUTRAL_CHARGE, *self.charges})})")
    if self.multiplicities is not None and int(multiplicity) not in (
        SINGLET, UNSPECIFIED_MULTIPLICITY, *self.multiplicities):
      missing.append(f"spin multiplicity {int(multiplicity)} (fitted: "
                     f"{sorted({SINGLET, *self.multiplicities})})")
    return " and ".join(missing) or None

  def energy(self, numbers: np.ndarray, charge: int = NEUTRAL_CHARGE,
             multiplicity: int = SINGLET) -> float:
    """E_ref of one structure in eV, summed in float64 (0 for an empty instance).

    A charge or multiplicity without a fitted offset adds none, with an
    :class:`UnfittedStateWarning` (once per state).

    Raises:
      ValueError: for an element without a fitted reference.
    """
    state = self.unfitted_state(charge, multiplicity) if self else None
    if state is not None and state not in _WARNED:
      _WARNED.add(state)
      warnings.warn(f"no reference energy offset for {state}: none of the records the references "
                    "were fitted to had it, so its energies lack that offset (expect errors of eV)",
                    UnfittedStateWarning, stacklevel=2)
    return (self.composition(numbers) + (self.charges or {}).get(int(charge), 0.0)
            + (self.multiplicities or {}).get(int(multiplicity), 0.0))

  def composition(self, numbers: np.ndarray) -> float:
    """sum_i e[Z_i] in eV (0 for an empty instance); raises for an element without a reference."""
    self.check(numbers)
    return float(sum(self.elements[int(z)] for z in np.asarray(numbers).ravel())) if self else 0.0

  def element_table(self, size: int) -> np.ndarray:
    """[size] float64 e[Z] indexed by atomic number (0 where none is set)."""
    table = np.zeros(size)
    for z, e in self.elements.items():
      if 0 < z < size:
        table[z] = e
    return table

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready form, keys as strings; inverse of :meth:`from_dict`."""
    as_str = lambda m: None if m is None else {str(k): v for k, v in sorted(m.items())}
    return {"unit": _UNIT, "elements": as_str(self.elements), "charges": as_str(self.charges),
            "multiplicities": as_str(self.multiplicities)}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> "ReferenceEnergies":
    """Reads :meth:`to_dict`'s form, or the per-element-only forms of earlier checkpoints
    (``{"unit": "eV", "energies": {Z: e}}`` or a plain ``{Z: e}`` mapping)."""
    data = dict(data)
    if "elements" not in data and "energies" not in data:  # a plain {Z: e} mapping
      return cls(elements=data)
    if data.get("unit", _UNIT) != _UNIT:
      raise ValueError(f"reference energies must be in {_UNIT}, got unit {data['unit']!r}")
    return cls(elements=data.get("elements", data.get("energies", {})),
               charges=data.get("charges"), multiplicities=data.get("multiplicities"))
