"""The molecules of the built-in dataset: the record type, the subsets and the hand-curated table.

The hand-curated table is data: 120 real molecules chosen by hand, each with its charge and spin
multiplicity. ``enumeration.py`` adds RDKit-enumerated molecules of the same subsets (plus ion pairs).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

SMALL_ORGANICS = "small organics"
DRUG_LIKE = "drug-like fragments"
AMINO_ACIDS = "amino acids and dipeptides"
CHARGED = "charged species"
RADICALS = "radicals"
# Quaternary cation + anion, total charge 0: no proton can move from one ion to the other.
ION_PAIRS = "ion pairs"
SUBSETS = (SMALL_ORGANICS, DRUG_LIKE, AMINO_ACIDS, CHARGED, RADICALS, ION_PAIRS)

ELEMENTS = ("H", "C", "N", "O", "F", "P", "S", "Cl", "Br")


@dataclasses.dataclass(frozen=True)
class BuiltinMolecule:
  """One molecule of the built-in dataset.

  Attributes:
    name: Human-readable name, unique in the dataset.
    smiles: SMILES with formal charges and radical centres written out ("." between the ions of a pair).
    charge: Total charge (e).
    multiplicity: Spin multiplicity 2S+1.
    subset: One of ``SUBSETS``.
  """

  name: str
  smiles: str
  charge: int
  multiplicity: int
  subset: str


def parse(molecule: BuiltinMolecule):
  """The RDKit molecule (implicit hydrogens) of ``molecule``, checked against its table entry.

  Raises:
    ValueError: if the SMILES does not parse, disagrees with the tabulated charge or multiplicity,
      or holds an element outside ``ELEMENTS``.
  """
  from rdkit import Chem
  from rdkit.Chem import Descriptors

  mol = Chem.MolFromSmiles(molecule.smiles)
  if mol is None:
    raise ValueError(f"built-in molecule {molecule.name!r}: SMILES {molecule.smiles!r} does not parse")
  formal = Chem.GetFormalCharge(mol)
  if formal != molecule.charge:
    raise ValueError(f"built-in molecule {molecule.name!r}: formal charge {formal} of "
                     f"{molecule.smiles!r} != tabulated charge {molecule.charge}")
  unpaired = Descriptors.NumRadicalElectrons(mol)
  if unpaired + 1 != molecule.multiplicity:
    raise ValueError(f"built-in molecule {molecule.name!r}: {unpaired} unpaired electrons in "
                     f"{molecule.smiles!r} != multiplicity {molecule.multiplicity} - 1")
  if mol.HasSubstructMatch(_foreign_element_pattern()):
    foreign = sorted({atom.GetSymbol() for atom in mol.GetAtoms()} - set(ELEMENTS))
    raise ValueError(f"built-in molecule {molecule.name!r}: elements {foreign} of "
                     f"{molecule.smiles!r} are not among {ELEMENTS}")
  return mol


@functools.cache
def _foreign_element_pattern():
  """SMARTS query of any atom outside ``ELEMENTS`` (one C++ match instead of a Python atom loop)."""
  from rdkit import Chem

  numbers = [Chem.GetPeriodicTable().GetAtomicNumber(symbol) for symbol in ELEMENTS]
  return Chem.MolFromSmarts("[" + ";".join(f"!#{z}" for z in numbers) + "]")


def canonical_key(molecule: BuiltinMolecule) -> str:
  """RDKit's canonical SMILES of ``molecule``: its HDF5 group name and dataset key."""
  from rdkit import Chem

  return Chem.MolToSmiles(parse(molecule))


def _table(subset: str, rows: Sequence[tuple[str, str]], charge: int = 0,
           multiplicity: int = 1) -> list[BuiltinMolecule]:
  return [BuiltinMolecule(name, smiles, charge, multiplicity, subset) for name, smiles in rows]


CURATED_MOLECULES: tuple[BuiltinMolecule, ...] = tuple(
  _table(SMALL_ORGANICS, [
    ("methane", "C"), ("methanol", "CO"), ("ethanol", "CCO"), ("acetone", "CC(C)=O"),
    ("formic acid", "OC=O"), ("acetic acid", "CC(=O)O"), ("ethylene", "C=C"), ("n-butane", "CCCC"),
    ("cyclohexane", "C1CCCCC1"), ("benzene", "c1ccccc1"),
    ("toluene", "Cc1ccccc1"), ("phenol", "Oc1ccccc1"), ("pyridine", "c1ccncc1"),
    ("pyrrole", "c1cc[nH]c1"), ("furan", "c1ccoc1"), ("thiophene", "c1ccsc1"),
    ("imidazole", "c1c[nH]cn1"), ("acetonitrile", "CC#N"), ("methylamine", "CN"),
    ("trimethylamine", "CN(C)C"), ("formamide", "NC=O"), ("urea", "NC(N)=O"),
    ("N-methylacetamide", "CC(=O)NC"), ("ethylene glycol", "OCCO"), ("tetrahydrofuran", "C1CCOC1"),
    ("morpholine", "C1COCCN1"), ("piperidine", "C1CCNCC1"), ("aniline", "Nc1ccccc1"),
    ("benzaldehyde", "O=Cc1ccccc1"), ("nitromethane", "C[N+](=O)[O-]"),
    ("methanethiol", "CS"), ("dimethyl sulfide", "CSC"), ("dimethyl sulfoxide", "CS(C)=O"),
    ("chloromethane", "CCl"), ("chloroform", "ClC(Cl)Cl"), ("trifluoromethane", "FC(F)F"),
    ("fluorobenzene", "Fc1ccccc1"), ("chlorobenzene", "Clc1ccccc1"),
    ("trimethylphosphine", "CP(C)C"), ("trimethyl phosphate", "COP(=O)(OC)OC"),
  ])
  + _table(DRUG_LIKE, [
    ("aspirin", "CC(=O)Oc1ccccc1C(=O)O"), ("paracetamol", "CC(=O)Nc1ccc(O)cc1"),
    ("(S)-ibuprofen", "CC(C)Cc1ccc(cc1)[C@H](C)C(=O)O"), ("caffeine", "Cn1cnc2c1c(=O)n(C)c(=O)n2C"),
    ("(S)-nicotine", "CN1CCC[C@H]1c1cccnc1"), ("benzamide", "NC(=O)c1ccccc1"),
    ("sulfanilamide", "Nc1ccc(cc1)S(N)(=O)=O"), ("salicylic acid", "OC(=O)c1ccccc1O"),
    ("indole", "c1ccc2[nH]ccc2c1"), ("quinoline", "c1ccc2ncccc2c1"),
    ("2-aminopyrimidine", "Nc1ncccn1"), ("acetanilide", "CC(=O)Nc1ccccc1"),
    ("thiazole", "c1cscn1"), ("2-chloropyridine", "Clc1ccccn1"), ("piperazine", "C1CNCCN1"),
    ("isoniazid", "NNC(=O)c1ccncc1"), ("5-fluorouracil", "O=c1[nH]cc(F)c(=O)[nH]1"),
    ("benzocaine", "CCOC(=O)c1ccc(N)cc1"), ("lidocaine", "CCN(CC)CC(=O)Nc1c(C)cccc1C"),
    ("phenytoin", "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1"), ("chlorzoxazone", "Clc1ccc2oc(=O)[nH]c2c1"),
    ("metronidazole", "Cc1ncc(n1CCO)[N+](=O)[O-]"), ("p-toluenesulfonamide", "Cc1ccc(cc1)S(N)(=O)=O"),
  ])
  # Neutral (non-zwitterionic) amino acids: a gas-phase zwitterion would transfer its proton
  # during the MD and no longer match the formal charges of its SMILES.
  + _table(AMINO_ACIDS, [
    ("glycine", "NCC(=O)O"), ("L-alanine", "N[C@@H](C)C(=O)O"), ("L-serine", "N[C@@H](CO)C(=O)O"),
    ("L-cysteine", "N[C@@H](CS)C(=O)O"), ("L-threonine", "N[C@@H]([C@@H](C)O)C(=O)O"),
    ("L-valine", "N[C@@H](C(C)C)C(=O)O"), ("L-leucine", "N[C@@H](CC(C)C)C(=O)O"),
    ("L-proline", "OC(=O)[C@@H]1CCCN1"), ("L-asparagine", "N[C@@H](CC(N)=O)C(=O)O"),
    ("L-glutamine", "N[C@@H](CCC(N)=O)C(=O)O"), ("L-aspartic acid", "N[C@@H](CC(=O)O)C(=O)O"),
    ("L-methionine", "N[C@@H](CCSC)C(=O)O"), ("L-lysine", "N[C@@H](CCCCN)C(=O)O"),
    ("L-histidine", "N[C@@H](Cc1c[nH]cn1)C(=O)O"),
    ("L-phenylalanine", "N[C@@H](Cc1ccccc1)C(=O)O"),
    ("L-tyrosine", "N[C@@H](Cc1ccc(O)cc1)C(=O)O"),
    ("L-tryptophan", "N[C@@H](Cc1c[nH]c2ccccc12)C(=O)O"),
    ("Gly-Gly", "NCC(=O)NCC(=O)O"), ("Gly-Ala", "NCC(=O)N[C@@H](C)C(=O)O"),
    ("Ala-Ala", "N[C@@H](C)C(=O)N[C@@H](C)C(=O)O"), ("Ace-Gly-NMe", "CC(=O)NCC(=O)NC"),
    ("Ace-Ala-NMe", "CC(=O)N[C@@H](C)C(=O)NC"), ("Ace-Ser-NMe", "CC(=O)N[C@@H](CO)C(=O)NC"),
    ("Ace-Phe-NMe", "CC(=O)N[C@@H](Cc1ccccc1)C(=O)NC"),
  ])
  + _table(CHARGED, [
    ("ammonium", "[NH4+]"), ("methylammonium", "C[NH3+]"), ("n-butylammonium", "CCCC[NH3+]"),
    ("tetramethylammonium", "C[N+](C)(C)C"), ("guanidinium", "NC(N)=[NH2+]"),
    ("pyridinium", "c1cc[nH+]cc1"), ("imidazolium", "c1c[nH+]c[nH]1"),
    ("anilinium", "[NH3+]c1ccccc1"), ("glycine cation", "[NH3+]CC(=O)O"),
  ], charge=1)
  + _table(CHARGED, [
    ("formate", "O=C[O-]"), ("acetate", "CC(=O)[O-]"), ("methoxide", "C[O-]"),
    ("phenolate", "[O-]c1ccccc1"), ("ethanethiolate", "CC[S-]"), ("benzoate", "[O-]C(=O)c1ccccc1"),
    ("trifluoroacetate", "[O-]C(=O)C(F)(F)F"), ("methyl sulfate", "COS(=O)(=O)[O-]"),
    ("dimethyl phosphate", "COP(=O)([O-])OC"), ("glycinate", "NCC(=O)[O-]"),
  ], charge=-1)
  + _table(RADICALS, [
    ("methyl radical", "[CH3]"), ("ethyl radical", "C[CH2]"), ("isopropyl radical", "C[CH]C"),
    ("tert-butyl radical", "C[C](C)C"), ("vinyl radical", "C=[CH]"), ("allyl radical", "C=C[CH2]"),
    ("hydroxymethyl radical", "[CH2]O"), ("methoxy radical", "C[O]"), ("acetyl radical", "C[C]=O"),
    ("benzyl radical", "[CH2]c1ccccc1"), ("phenoxyl radical", "[O]c1ccccc1"),
    ("methylthiyl radical", "C[S]"), ("dimethylaminyl radical", "C[N]C"),
    ("glycyl radical", "N[CH]C(=O)O"),
  ], multiplicity=2)
)

# The small build's hand-curated part: one molecule per subset plus both signs of charge, for tests.
SMALL_MOLECULE_NAMES = (
  "methanol", "thiazole", "glycine", "methylammonium", "acetate", "ethyl radical",
)
