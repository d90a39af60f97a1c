"""RDKit enumeration of the built-in dataset's extra molecules: deterministic, canonical, deduplicated.

Every molecule of ``enumerated_molecules()`` comes from one of these recipes:

- Substituted scaffolds: a template SMILES whose slots ``({0})``, ``({1})`` are branches filled with
  substituents (an empty substituent is a hydrogen): alkyl chains, small rings, (hetero)aromatic
  rings at each distinct position, bicyclics, saturated N-heterocycles, amide/ester/ether/urea/...
  linkers between two groups, and the hydrides H-X of the substituents (the small fragments).
- Amino acids: free, methyl-esterified, amidated, N-acetylated and capped (Ace-X-NMe) residues of 26
  side chains and the dipeptides of the small ones, all neutral (no zwitterions).
- Ions from those neutral molecules (and the hand-curated ones): the cation of a molecule with
  exactly one basic nitrogen and no amide, the anion of a molecule with exactly one acidic O-H or
  S-H and no other acidic X-H, so that no proton can move inside the ion; plus a few doubly
  charged ions whose charges are far apart (``DOUBLY_CHARGED``).
- Doublet radicals: one hydrogen abstracted from one C, N, O or S site (picked by a hash among the
  symmetry-distinct sites) of each smaller neutral molecule; never from a carboxylic acid, whose
  acyloxyl radical loses CO2.
- Ion pairs: a quaternary cation with an anion (total charge 0); neither ion carries a proton
  that the other could take.

Each family is walked in a fixed pseudo-random order (the SHA-256 of the candidate SMILES) and
each subset takes the first molecules that pass, up to its quota: a candidate is validated
(``molecules.parse``: formal charge and radical count match the tabulated charge and multiplicity,
elements in ``ELEMENTS``), limited to ``MAX_HEAVY_ATOMS`` and keyed by its canonical SMILES, and a key
already taken (the hand-curated keys first) is skipped. Only as many candidates are parsed as the
quotas need, and the result depends only on this file and on RDKit's canonical SMILES.
"""

from __future__ import annotations

import functools
import hashlib
import zlib
from typing import Iterable, Iterator, Sequence

from train.data.builtin.molecules import (AMINO_ACIDS, CHARGED, CURATED_MOLECULES, DRUG_LIKE, ION_PAIRS,
                                          RADICALS, SMALL_ORGANICS, SUBSETS, BuiltinMolecule,
                                          canonical_key, parse)

# Heavy atoms per enumerated molecule: xTB time grows with size, and a 256-atom training batch must
# hold several molecules. The lower end is 1 (the hydrides H-X are the small fragments).
MAX_HEAVY_ATOMS = 14
# Radicals come from the smaller parents: H abstraction sites multiply with size.
MAX_RADICAL_PARENT_HEAVY_ATOMS = 10
# A neutral closed-shell molecule with a ring and at least this many heavy atoms is a drug-like
# fragment; smaller or acyclic ones are small organics.
DRUG_LIKE_MIN_HEAVY_ATOMS = 8

# (name, branch SMILES bonded through its first atom), attached to carbon.
SUBSTITUENTS = (
  ("F", "F"), ("Cl", "Cl"), ("Br", "Br"), ("OH", "O"), ("OMe", "OC"), ("NH2", "N"), ("NHMe", "NC"),
  ("NMe2", "N(C)C"), ("Me", "C"), ("Et", "CC"), ("CN", "C#N"), ("NO2", "[N+](=O)[O-]"),
  ("COOH", "C(=O)O"), ("CHO", "C=O"), ("CONH2", "C(N)=O"), ("SH", "S"), ("SMe", "SC"),
  ("CF3", "C(F)(F)F"), ("Ac", "C(C)=O"), ("CO2Me", "C(=O)OC"), ("OAc", "OC(C)=O"), ("NHAc", "NC(C)=O"),
  ("SO2Me", "S(C)(=O)=O"), ("SO2NH2", "S(N)(=O)=O"), ("vinyl", "C=C"), ("ethynyl", "C#C"),
  ("OCF3", "OC(F)(F)F"), ("PO(OMe)2", "P(=O)(OC)OC"),
)
# Carbon groups bonded to a heteroatom (linkers, N-substitution). Groups number their rings 8 and 9,
# templates 1 and 2, so that a ring bond of a group never closes a ring of its template.
R_GROUPS = (
  ("Me", "C"), ("Et", "CC"), ("nPr", "CCC"), ("iPr", "C(C)C"), ("tBu", "C(C)(C)C"), ("cPr", "C9CC9"),
  ("vinyl", "C=C"), ("allyl", "CC=C"), ("Ph", "c9ccccc9"), ("Bn", "Cc9ccccc9"),
  ("2-pyridyl", "c9ccccn9"), ("2-thienyl", "c9cccs9"), ("2-furyl", "c9ccco9"),
  ("CH2CF3", "CC(F)(F)F"), ("CH2CH2OMe", "CCOC"),
)
# Groups on the nitrogen of a saturated heterocycle: carbon groups, acyls, a sulfonyl.
N_GROUPS = R_GROUPS + (
  ("CHO", "C=O"), ("Ac", "C(C)=O"), ("CO2Me", "C(=O)OC"), ("CONH2", "C(N)=O"), ("SO2Me", "S(C)(=O)=O"),
)
HYDROGEN = (("H", ""),)

# (name, template): one slot filled from SUBSTITUENTS.
CARBON_SCAFFOLDS = (
  ("H", "[H]({0})"), ("methyl", "C({0})"), ("ethyl", "CC({0})"), ("n-propyl", "CCC({0})"),
  ("isopropyl", "CC(C)({0})"), ("tert-butyl", "CC(C)(C)({0})"), ("n-butyl", "CCCC({0})"),
  ("vinyl", "C=C({0})"), ("allyl", "C=CC({0})"), ("formyl", "C(=O)({0})"), ("acetyl", "CC(=O)({0})"),
  ("cyclopropyl", "C1CC1({0})"), ("cyclobutyl", "C1CCC1({0})"), ("cyclopentyl", "C1CCCC1({0})"),
  ("cyclohexyl", "C1CCCCC1({0})"), ("phenyl", "c1ccccc1({0})"), ("benzyl", "c1ccccc1C({0})"),
  ("pyridin-2-yl", "n1c({0})cccc1"), ("pyridin-3-yl", "n1cc({0})ccc1"), ("pyridin-4-yl", "n1ccc({0})cc1"),
  ("pyrimidin-2-yl", "n1c({0})nccc1"), ("pyrimidin-4-yl", "n1cnc({0})cc1"),
  ("pyrimidin-5-yl", "n1cncc({0})c1"), ("pyrazin-2-yl", "n1c({0})cncc1"),
  ("thiophen-2-yl", "s1c({0})ccc1"), ("thiophen-3-yl", "s1cc({0})cc1"),
  ("furan-2-yl", "o1c({0})ccc1"), ("furan-3-yl", "o1cc({0})cc1"),
  ("pyrrol-2-yl", "[nH]1c({0})ccc1"), ("pyrrol-3-yl", "[nH]1cc({0})cc1"),
  ("thiazol-2-yl", "s1c({0})ncc1"), ("thiazol-4-yl", "s1cnc({0})c1"), ("thiazol-5-yl", "s1c({0})cnc1"),
  ("oxazol-2-yl", "o1c({0})ncc1"), ("imidazol-2-yl", "[nH]1c({0})ncc1"),
  ("imidazol-4-yl", "[nH]1cnc({0})c1"), ("pyrazol-3-yl", "[nH]1nc({0})cc1"),
  ("pyrazol-4-yl", "[nH]1ncc({0})c1"), ("isoxazol-3-yl", "o1nc({0})cc1"),
  ("isoxazol-5-yl", "o1c({0})ccn1"), ("naphthalen-1-yl", "c1({0})cccc2ccccc12"),
  ("naphthalen-2-yl", "c1cc2ccccc2cc1({0})"), ("indol-5-yl", "c1cc2[nH]ccc2cc1({0})"),
  ("quinolin-6-yl", "c1cc2ncccc2cc1({0})"), ("benzimidazol-2-yl", "[nH]1c({0})nc2ccccc12"),
  ("benzothiazol-2-yl", "s1c({0})nc2ccccc12"), ("benzofuran-2-yl", "o1c({0})cc2ccccc12"),
  ("piperidin-4-yl", "C1CNCCC1({0})"), ("oxan-4-yl", "C1COCCC1({0})"),
)
# (name, template): two slots filled from SUBSTITUENTS, each unordered pair once (on an asymmetric
# scaffold the substituent listed first in SUBSTITUENTS takes slot 0).
DISUBSTITUTED_SCAFFOLDS = (
  ("1,2-ethane", "C({0})C({1})"), ("1,3-propane", "C({0})CC({1})"), ("geminal methane", "C({0})({1})"),
  ("ortho-benzene", "c1({0})c({1})cccc1"), ("meta-benzene", "c1({0})cc({1})ccc1"),
  ("para-benzene", "c1({0})ccc({1})cc1"), ("2,5-pyridine", "n1c({0})ccc({1})c1"),
  ("2,6-pyridine", "n1c({0})cccc1({1})"), ("2,5-thiophene", "s1c({0})ccc1({1})"),
  ("2,4-thiazole", "s1c({0})nc({1})c1"), ("1,4-cyclohexane", "C1({0})CCC({1})CC1"),
)
# (name, template, first slot's groups, second slot's groups): functional groups between two groups.
LINKERS = (
  ("amide", "C(=O)({0})N({1})", HYDROGEN + R_GROUPS, HYDROGEN + R_GROUPS),
  ("ester", "C(=O)({0})O({1})", HYDROGEN + R_GROUPS, R_GROUPS),
  ("ether", "O({0})({1})", R_GROUPS, R_GROUPS),
  ("amine", "N({0})({1})", HYDROGEN + R_GROUPS, R_GROUPS),
  ("thioether", "S({0})({1})", R_GROUPS, R_GROUPS),
  ("ketone", "C(=O)({0})({1})", R_GROUPS, R_GROUPS),
  ("urea", "N({0})C(=O)N({1})", HYDROGEN + R_GROUPS, R_GROUPS),
  ("carbamate", "O({0})C(=O)N({1})", R_GROUPS, HYDROGEN + R_GROUPS),
  ("sulfonamide", "S(=O)(=O)({0})N({1})", R_GROUPS, HYDROGEN + R_GROUPS),
  ("sulfone", "S(=O)(=O)({0})({1})", R_GROUPS, R_GROUPS),
  ("imine", "C({0})=N({1})", R_GROUPS, R_GROUPS),
  ("piperidine", "N1({0})CCCCC1({1})", N_GROUPS, HYDROGEN),
  ("morpholine", "N1({0})CCOCC1({1})", N_GROUPS, HYDROGEN),
  ("pyrrolidine", "N1({0})CCCC1({1})", N_GROUPS, HYDROGEN),
  ("piperazine", "N1({0})CCN({1})CC1", N_GROUPS, HYDROGEN + R_GROUPS[:3]),
  ("azetidine", "N1({0})CCC1({1})", N_GROUPS, HYDROGEN),
)

# (name, side-chain branch): the 20 standard residues and some non-standard ones. The backbone
# templates below put every residue in the L configuration; Gly's "[H]" branch leaves no stereocentre.
SIDE_CHAINS = (
  ("Gly", "[H]"), ("Ala", "C"), ("Ser", "CO"), ("Cys", "CS"), ("Thr", "[C@@H](C)O"), ("Val", "C(C)C"),
  ("Leu", "CC(C)C"), ("Ile", "[C@@H](C)CC"), ("Met", "CCSC"), ("Asn", "CC(N)=O"), ("Gln", "CCC(N)=O"),
  ("Asp", "CC(=O)O"), ("Glu", "CCC(=O)O"), ("Lys", "CCCCN"), ("Arg", "CCCNC(N)=N"),
  ("His", "Cc9c[nH]cn9"), ("Phe", "Cc9ccccc9"), ("Tyr", "Cc9ccc(O)cc9"), ("Trp", "Cc9c[nH]c8ccccc98"),
  ("Abu", "CC"), ("Nva", "CCC"), ("Nle", "CCCC"), ("Hse", "CCO"), ("Orn", "CCCN"), ("Hcy", "CCS"),
  ("Phg", "c9ccccc9"),
)
# (name pattern, template): one residue.
RESIDUE_TEMPLATES = (
  ("{0}", "N[C@@H]({0})C(=O)O"), ("{0}-OMe", "N[C@@H]({0})C(=O)OC"), ("{0}-NH2", "N[C@@H]({0})C(N)=O"),
  ("{0}-NHMe", "N[C@@H]({0})C(=O)NC"), ("Ac-{0}", "CC(=O)N[C@@H]({0})C(=O)O"),
  ("Ace-{0}-NMe", "CC(=O)N[C@@H]({0})C(=O)NC"),
)
DIPEPTIDE_TEMPLATE = "N[C@@H]({0})C(=O)N[C@@H]({1})C(=O)O"
PROLINE_DERIVATIVES = (
  ("Pro-OMe", "COC(=O)[C@@H]1CCCN1"), ("Pro-NH2", "NC(=O)[C@@H]1CCCN1"),
  ("Ac-Pro", "CC(=O)N1CCC[C@H]1C(=O)O"), ("Ace-Pro-NMe", "CC(=O)N1CCC[C@H]1C(=O)NC"),
  ("Gly-Pro", "NCC(=O)N1CCC[C@H]1C(=O)O"), ("Pro-Gly", "OC(=O)CNC(=O)[C@@H]1CCCN1"),
  ("Ala-Pro", "N[C@@H](C)C(=O)N1CCC[C@H]1C(=O)O"), ("Pro-Ala", "OC(=O)[C@H](C)NC(=O)[C@@H]1CCCN1"),
)

# Doubly charged ions whose two charges sit at least three bonds apart (charges on neighbouring atoms
# repel the molecule apart). GFN2-xTB binds the extra electrons of these dianions (HOMO -1.9 to -2.4
# eV, checked when they were added); shorter dicarboxylates, which it binds less (succinate: -1.0 eV)
# and whose gas-phase dianions are at best metastable, are left out.
DOUBLY_CHARGED = (
  ("propane-1,3-diammonium", "[NH3+]CCC[NH3+]", 2), ("butane-1,4-diammonium", "[NH3+]CCCC[NH3+]", 2),
  ("hexane-1,6-diammonium", "[NH3+]CCCCCC[NH3+]", 2), ("piperazinediium", "C1C[NH2+]CC[NH2+]1", 2),
  ("DABCO-diium", "C1C[NH+]2CC[NH+]1CC2", 2),
  ("hexamethylpropanediammonium", "C[N+](C)(C)CCC[N+](C)(C)C", 2),
  ("adipate", "[O-]C(=O)CCCCC(=O)[O-]", -2), ("pimelate", "[O-]C(=O)CCCCCC(=O)[O-]", -2),
  ("terephthalate", "[O-]C(=O)c1ccc(cc1)C(=O)[O-]", -2),
)

# Cations without a proton on a heteroatom: nothing in them can protonate the anion.
QUATERNARY_CATIONS = (
  ("tetramethylammonium", "C[N+](C)(C)C"), ("ethyltrimethylammonium", "CC[N+](C)(C)C"),
  ("tetraethylammonium", "CC[N+](CC)(CC)CC"),
  ("N,N-dimethylpyrrolidinium", "C[N+]1(C)CCCC1"), ("N-methylpyridinium", "C[n+]1ccccc1"),
  # C2 methylated: a carboxylate can take the C2 proton of a 1,3-dialkylimidazolium.
  ("1,2,3-trimethylimidazolium", "Cc1n(C)cc[n+]1C"),
  # Not trimethylsulfonium: the GFN2-xTB SCF of its pairs failed to converge at a third of their
  # thermal geometries (measured on 20 pairs: the other cations lost at most 1 geometry in 6).
  ("tetramethylphosphonium", "C[P+](C)(C)C"),
)
PAIR_ANIONS = (
  ("formate", "O=C[O-]"), ("acetate", "CC(=O)[O-]"), ("propanoate", "CCC(=O)[O-]"),
  ("trifluoroacetate", "[O-]C(=O)C(F)(F)F"), ("benzoate", "[O-]C(=O)c1ccccc1"), ("chloride", "[Cl-]"),
  ("bromide", "[Br-]"), ("methanesulfonate", "CS(=O)(=O)[O-]"), ("nitrate", "[O-][N+](=O)[O-]"),
  ("phenolate", "[O-]c1ccccc1"), ("dicyanamide", "N#C[N-]C#N"), ("chloroacetate", "[O-]C(=O)CCl"),
  ("triflate", "[O-]S(=O)(=O)C(F)(F)F"), ("thiocyanate", "[S-]C#N"), ("azide", "[N-]=[N+]=[N-]"),
)

# Protonation sites: aliphatic amines, anilines, amidines/guanidines, pyridine-like aromatic N.
BASIC_NITROGEN_SMARTS = (
  "[NX3;+0;!$(N[#7,#8,#16]);!$(N[C,S,P]=[O,S,N]);!$(NC#N);!$(NC=C)]",
  "[NX2;+0;$(N=C[NX3])]",
  "[nX2;+0]",
)
# Amides and their kin: a protonated amine next to one can hand its proton to the carbonyl.
AMIDE_SMARTS = "[NX3][CX3]=[O,S]"
# Acidic X-H: the one that is deprotonated must be the only one (carboxylic acids' O-H included).
ACIDIC_OH_SH_SMARTS = "[OX2H1,SX2H1;+0]"
ACIDIC_NH_SMARTS = "[#7;+0;H1,H2;$([nH]),$(N[a]),$(N[C,S,P]=[O,S,N]),$(NS(=O)=O)]"
CARBOXYLIC_OH_SMARTS = "[OX2H1]C=O"
# Hydrogen-bearing heavy atoms a radical may be made at.
ABSTRACTABLE_SMARTS = "[#6,#7,#8,#16;!H0]"


def _fill(template: str, groups: Sequence[str]) -> str:
  """``template`` with slot ``({i})`` replaced by the branch ``(groups[i])``, or removed if empty."""
  smiles = template
  for i, group in enumerate(groups):
    smiles = smiles.replace(f"({{{i}}})", f"({group})" if group else "")
  return smiles


def _neutral_subset(mol) -> str:
  """SMALL_ORGANICS or DRUG_LIKE for a neutral closed-shell molecule (see DRUG_LIKE_MIN_HEAVY_ATOMS)."""
  ring = mol.GetRingInfo().NumRings() > 0
  return DRUG_LIKE if ring and mol.GetNumHeavyAtoms() >= DRUG_LIKE_MIN_HEAVY_ATOMS else SMALL_ORGANICS


def _scaffold_candidates() -> Iterator[tuple[str, str]]:
  """(name, SMILES) of the substituted scaffolds and linkers."""
  for scaffold, template in CARBON_SCAFFOLDS:
    for name, group in SUBSTITUENTS:
      yield f"{scaffold}-{name}", _fill(template, [group])
  for scaffold, template in DISUBSTITUTED_SCAFFOLDS:
    for i, (name_a, group_a) in enumerate(SUBSTITUENTS):
      for name_b, group_b in SUBSTITUENTS[i:]:
        yield f"{scaffold} {name_a}/{name_b}", _fill(template, [group_a, group_b])
  for linker, template, first, second in LINKERS:
    for name_a, group_a in first:
      for name_b, group_b in second:
        yield f"{linker} {name_a}/{name_b}", _fill(template, [group_a, group_b])


def _amino_acid_candidates() -> Iterator[tuple[str, str]]:
  """(name, SMILES) of neutral amino-acid derivatives and dipeptides."""
  for pattern, template in RESIDUE_TEMPLATES:
    for residue, side_chain in SIDE_CHAINS:
      yield pattern.format(residue), _fill(template, [side_chain])
  for first, side_a in SIDE_CHAINS:
    for second, side_b in SIDE_CHAINS:
      yield f"{first}-{second}", _fill(DIPEPTIDE_TEMPLATE, [side_a, side_b])
  yield from PROLINE_DERIVATIVES


def _hash_ordered(candidates: Iterable[tuple[str, str, str | None]]) -> list[tuple[str, str, str | None]]:
  """``candidates`` (name, SMILES, subset) in the order of the SHA-256 of their SMILES: a fixed
  shuffle, so that the first N of any family are a spread-out sample of it."""
  return sorted(candidates, key=lambda candidate: hashlib.sha256(candidate[1].encode()).digest())


class _Neutrals:
  """Neutral closed-shell candidates in hash order, each parsed once on first use and remembered,
  without repeated keys."""

  def __init__(self, candidates: Iterable[tuple[str, str, str | None]]):
    """``candidates``: (name, SMILES, subset or None = by ``_neutral_subset``)."""
    self._raw = iter(_hash_ordered(candidates))
    self._parsed: list[tuple[BuiltinMolecule, object]] = []
    self._keys: set[str] = set()

  def __iter__(self) -> Iterator[tuple[BuiltinMolecule, object]]:
    """(molecule with its canonical SMILES, RDKit molecule) in hash order."""
    from rdkit import Chem

    index = 0
    while True:
      if index < len(self._parsed):
        yield self._parsed[index]
        index += 1
        continue
      try:
        name, smiles, subset = next(self._raw)
      except StopIteration:
        return
      mol = parse(BuiltinMolecule(name, smiles, 0, 1, subset or SMALL_ORGANICS))
      key = Chem.MolToSmiles(mol)
      if key not in self._keys and mol.GetNumHeavyAtoms() <= MAX_HEAVY_ATOMS:
        self._keys.add(key)
        self._parsed.append((BuiltinMolecule(name, key, 0, 1, subset or _neutral_subset(mol)), mol))


class _Selection:
  """Molecules accepted per subset up to its quota, with canonical keys unique across the dataset."""

  def __init__(self, quotas: dict[str, int]):
    self.quotas = quotas
    self.keys = {canonical_key(m) for m in CURATED_MOLECULES}
    self.chosen: dict[str, list[BuiltinMolecule]] = {subset: [] for subset in SUBSETS}

  def wants(self, *subsets: str, limit: int | None = None) -> bool:
    """Whether any of ``subsets`` holds fewer molecules than its quota (and than ``limit``)."""
    def cap(subset: str) -> int:
      quota = self.quotas.get(subset, 0)
      return quota if limit is None else min(quota, limit)

    return any(len(self.chosen[s]) < cap(s) for s in subsets)

  def offer(self, name: str, smiles: str, charge: int, multiplicity: int, subset: str, *,
            limit: int | None = None) -> None:
    """Accepts the molecule if its subset has room (``wants``), its key is new and it is small enough.

    Raises:
      ValueError: on invalid chemistry (a bug in the recipes).
    """
    from rdkit import Chem

    if not self.wants(subset, limit=limit):
      return
    mol = parse(BuiltinMolecule(name, smiles, charge, multiplicity, subset))
    key = Chem.MolToSmiles(mol)
    if key not in self.keys and mol.GetNumHeavyAtoms() <= MAX_HEAVY_ATOMS:
      self.keys.add(key)
      self.chosen[subset].append(BuiltinMolecule(name, key, charge, multiplicity, subset))


@functools.cache
def _pattern(smarts: str):
  from rdkit import Chem

  return Chem.MolFromSmarts(smarts)


def _single_site(mol, patterns: Sequence[str]) -> int | None:
  """Index of the one atom that matches any of ``patterns``, or None for zero or several."""
  atoms = {match[0] for pattern in patterns for match in mol.GetSubstructMatches(_pattern(pattern))}
  return atoms.pop() if len(atoms) == 1 else None


def _edited(mol, atom_index: int, charge: int, hydrogens: int, radicals: int) -> str:
  """SMILES of ``mol`` with one atom's formal charge, hydrogen count and radical electrons set."""
  from rdkit import Chem

  edited = Chem.RWMol(mol)
  atom = edited.GetAtomWithIdx(atom_index)
  atom.SetFormalCharge(charge)
  atom.SetNumExplicitHs(hydrogens)
  atom.SetNoImplicit(True)
  atom.SetNumRadicalElectrons(radicals)
  Chem.SanitizeMol(edited)
  return Chem.MolToSmiles(edited)


def _ions(parent: BuiltinMolecule, mol) -> Iterator[tuple[str, str, int]]:
  """(name, SMILES, charge) of the cation and/or anion of a neutral molecule whose protonation or
  deprotonation site is unique."""
  if mol.HasSubstructMatch(_pattern("[+,-]")):
    return  # nitro groups and the like: leave charge-separated molecules alone
  base = _single_site(mol, BASIC_NITROGEN_SMARTS)
  if base is not None and not mol.HasSubstructMatch(_pattern(AMIDE_SMARTS)):
    hydrogens = mol.GetAtomWithIdx(base).GetTotalNumHs()
    yield f"{parent.name} cation", _edited(mol, base, +1, hydrogens + 1, 0), 1
  acid = _single_site(mol, (ACIDIC_OH_SH_SMARTS, ACIDIC_NH_SMARTS))
  if acid is not None and mol.GetAtomWithIdx(acid).GetSymbol() in ("O", "S"):
    yield f"{parent.name} anion", _edited(mol, acid, -1, 0, 0), -1


def _radical(parent: BuiltinMolecule, mol) -> tuple[str, str] | None:
  """(name, SMILES) of the doublet from removing one H from one symmetry-distinct C/N/O/S site of a
  neutral molecule, the site picked by a hash of the parent's key; None when it has no such site."""
  from rdkit import Chem

  if mol.HasSubstructMatch(_pattern("[+,-]")):
    return None
  carboxylic = {m[0] for m in mol.GetSubstructMatches(_pattern(CARBOXYLIC_OH_SMARTS))}
  candidates = {m[0] for m in mol.GetSubstructMatches(_pattern(ABSTRACTABLE_SMARTS))} - carboxylic
  ranks = list(Chem.CanonicalRankAtoms(mol, breakTies=False))
  sites = sorted({ranks[i]: i for i in sorted(candidates, reverse=True)}.values())  # first atom per class
  if not sites:
    return None
  index = sites[zlib.crc32(parent.smiles.encode()) % len(sites)]
  atom = mol.GetAtomWithIdx(index)
  return (f"{parent.name} {atom.GetSymbol()}{index + 1} radical",
          _edited(mol, index, 0, atom.GetTotalNumHs() - 1, 1))


@functools.cache
def enumerated_molecules(quotas: tuple[tuple[str, int], ...]) -> tuple[BuiltinMolecule, ...]:
  """The first enumerated molecules of each subset, up to ``quotas``; cached.

  Each family is walked in its hash order (``_hash_ordered``), so smaller quotas select a part of
  what larger ones select: the default build's molecules are part of the large build's.

  Args:
    quotas: (subset, count) pairs; subsets not named get none.

  Returns:
    The molecules, subset by subset in ``SUBSETS`` order; none repeats a hand-curated key.

  Raises:
    ValueError: if the recipes cannot fill a quota.
  """
  from rdkit import RDLogger

  RDLogger.DisableLog("rdApp.*")  # sanitising charged and radical edits prints expected warnings
  selection = _Selection(dict(quotas))
  scaffolds = [(name, smiles, None) for name, smiles in _scaffold_candidates()]
  amino_acids = [(name, smiles, AMINO_ACIDS) for name, smiles in _amino_acid_candidates()]
  for family, subsets in ((scaffolds, (SMALL_ORGANICS, DRUG_LIKE)), (amino_acids, (AMINO_ACIDS,))):
    for molecule, _ in _Neutrals(family):
      if not selection.wants(*subsets):
        break
      selection.offer(molecule.name, molecule.smiles, 0, 1, molecule.subset)
  # The parents of ions and radicals: every neutral closed-shell molecule, hand-curated ones included.
  curated = [(m.name, m.smiles, m.subset) for m in CURATED_MOLECULES if m.charge == 0 and m.multiplicity == 1]
  neutrals = _Neutrals(curated + amino_acids + scaffolds)
  for name, smiles, charge in DOUBLY_CHARGED:
    selection.offer(name, smiles, charge, 1, CHARGED)
  # Anions first, until the subset is half full: fewer molecules have a unique acidic site than a
  # unique basic one, and the cations would otherwise crowd them out.
  for sign, share in ((-1, selection.quotas.get(CHARGED, 0) // 2), (+1, None)):
    for parent, mol in neutrals:
      if not selection.wants(CHARGED, limit=share):
        break
      for name, smiles, charge in _ions(parent, mol):
        if charge == sign:
          selection.offer(name, smiles, charge, 1, CHARGED, limit=share)
  for parent, mol in neutrals:
    if not selection.wants(RADICALS):
      break
    if mol.GetNumHeavyAtoms() <= MAX_RADICAL_PARENT_HEAVY_ATOMS:
      radical = _radical(parent, mol)
      if radical is not None:
        selection.offer(*radical, 0, 2, RADICALS)
  pairs = [(f"{cation} {anion}", f"{cation_smiles}.{anion_smiles}", ION_PAIRS)
           for cation, cation_smiles in QUATERNARY_CATIONS for anion, anion_smiles in PAIR_ANIONS]
  for name, smiles, _ in _hash_ordered(pairs):
    selection.offer(name, smiles, 0, 1, ION_PAIRS)
  for subset, quota in quotas:
    if len(selection.chosen[subset]) < quota:
      raise ValueError(f"the enumeration recipes yield only {len(selection.chosen[subset])} "
                       f"{subset!r} molecules; {quota} were requested")
  return tuple(m for subset in SUBSETS for m in selection.chosen[subset])
