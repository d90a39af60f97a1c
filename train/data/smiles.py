"""Total charge of a molecule from the formal charges written in its SMILES.

SPICE stores no total charge; its mapped SMILES carry the formal charges (``[N+:9]``, ``[Na+:5]``),
whose sum is the total charge. RDKit parses the SMILES when it is installed; otherwise (or when
RDKit rejects the string) a small parser reads the charge of every bracket atom, which is the only
place SMILES can write a charge.
"""

from __future__ import annotations

import functools
import re

# Charge suffix of a bracket atom once its atom map (":9") is removed: "+", "++", "+2", "-", "-3";
# a digit count follows a single sign only.
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_CHARGE = re.compile(r"(\++|-+)(\d*)$")
_ATOM_MAP = re.compile(r":\d+$")


def formal_charge(smiles: str) -> int:
  """Sum of the formal charges of a (possibly mapped, possibly multi-fragment) SMILES.

  Raises:
    ValueError: if the string has an unbalanced bracket or a malformed charge.
  """
  rdkit_charge = _rdkit_formal_charge(smiles)
  return rdkit_charge if rdkit_charge is not None else bracket_formal_charge(smiles)


def bracket_formal_charge(smiles: str) -> int:
  """The SMILES-bracket parser behind :func:`formal_charge` (no RDKit)."""
  if smiles.count("[") != smiles.count("]"):
    raise ValueError(f"unbalanced brackets in SMILES {smiles!r}")
  total = 0
  for atom in _BRACKET.findall(smiles):
    body = _ATOM_MAP.sub("", atom)
    match = _CHARGE.search(body)
    if match is None:
      continue
    signs, digits = match.groups()
    sign = 1 if signs[0] == "+" else -1
    if digits and len(signs) > 1:
      raise ValueError(f"malformed charge in bracket atom [{atom}] of SMILES {smiles!r}")
    total += sign * (int(digits) if digits else len(signs))
  return total


@functools.cache
def _chem():
  try:
    from rdkit import Chem, RDLogger  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  RDLogger.DisableLog("rdApp.*")
  return Chem


def _rdkit_formal_charge(smiles: str) -> int | None:
  chem = _chem()
  if chem is None:
    return None
  # No sanitisation: formal charges are read by the parser; valence checks could reject real data.
  mol = chem.MolFromSmiles(smiles, sanitize=False)
  if mol is None:
    return None
  return int(sum(atom.GetFormalCharge() for atom in mol.GetAtoms()))
