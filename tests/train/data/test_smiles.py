"""Total charge from the formal charges of a SMILES: RDKit and the bracket parser agree."""

from __future__ import annotations

import pytest

from train.data.smiles import bracket_formal_charge, formal_charge

CASES = [
    ("C#C.[Na+]", 1),
    ("[H:3][C:1]#[C:2][H:4].[Na+:5]", 1),  # mapped, as in SPICE
    ("C[NH3+]", 1),
    ("CC(=O)[O-]", -1),
    ("[O-][N+](=O)c1ccccc1", 0),  # nitro: charge-separated but neutral
    ("[Ca++].[Cl-].[Cl-]", 0),
    ("[Fe+3]", 3),
    ("[Mg+2:1]", 2),
    ("[S-2]", -2),
    ("[O--]", -2),
    ("[C@@H](F)(Cl)Br", 0),  # chirality marks and H counts are not charges
    ("F[B-](F)(F)F.[NH4+]", 0),
    ("c1cc[nH+]c[nH]1", 1),
]


@pytest.mark.parametrize("smiles, charge", CASES)
def test_formal_charge(smiles, charge):
  assert bracket_formal_charge(smiles) == charge
  assert formal_charge(smiles) == charge


def test_real_spice_smiles():
  mapped = ("[H:10][C:1]1([C:2]([C:4]([C:7]([C:5]([C:3]1([H:14])[H:15])([H:18])[H:19])([H:23])"
            "[C@:8]([H:24])([C:6]([H:20])([H:21])[H:22])[N+:9]([H:25])([H:26])[H:27])([H:16])[H:17])"
            "([H:12])[H:13])[H:11]")
  assert bracket_formal_charge(mapped) == formal_charge(mapped) == 1


@pytest.mark.parametrize("smiles", ["[Na+", "[N++2]"])
def test_malformed(smiles):
  with pytest.raises(ValueError, match="SMILES"):
    bracket_formal_charge(smiles)
