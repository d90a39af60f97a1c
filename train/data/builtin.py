"""The built-in default dataset: real molecules labelled with GFN2-xTB, in the SPICE and OMol25 layouts.

The training command trains on this dataset when it is given no other. 120 molecules in five
subsets (small organics, drug-like fragments, amino acids and dipeptides, charged species, doublet
radicals) are each turned into several geometries:

1. RDKit ETKDGv3 conformers, seeded from the SMILES, cleaned up with MMFF94 where MMFF has
   parameters (closed-shell species) and with a short GFN2-xTB FIRE relaxation otherwise (radicals).
2. Thermal perturbations of every start conformer at one of ``TEMPERATURES_K``: snapshots of a
   GFN2-xTB Langevin molecular dynamics, and isotropic Gaussian displacements whose size puts about
   k_B T into a typical bond stretch (see ``displacement_sigma_a``).
3. A fresh GFN2-xTB single point (tblite, total charge and ``uhf = multiplicity - 1``) at the stored,
   float32-rounded geometry. Geometries with two atoms closer than ``MIN_DISTANCE_A`` or a
   non-converged SCF are rejected.

Files written under the output folder:

- ``HDF5_FILENAME``: the SPICE HDF5 layout (one group per molecule keyed by its canonical SMILES;
  ``atomic_numbers`` (n,) int16, ``conformations`` (M, n, 3) float32 bohr, ``dft_total_energy``
  (M,) float64 hartree, ``dft_total_gradient`` (M, n, 3) float32 hartree/bohr, ``smiles`` (1,)
  mapped SMILES with formal charges, ``subset`` (1,)), plus ``total_charge`` and
  ``spin_multiplicity`` (1,) int16 per group, which SPICE does not store. The ``dft_*`` names are kept
  for layout compatibility only: the labels are GFN2-xTB, not SPICE's DFT (the file attributes say so).
- ``ASELMDB_DIRNAME/ASELMDB_FILENAME`` and ``ASELMDB_DIRNAME/metadata.npz``: the same geometries as
  an OMol25-style ASE LMDB database (eV, eV/angstrom, ``row.data["charge"]``, ``row.data["spin"]``)
  with ``natoms`` per row.
- ``MANIFEST_FILENAME``: version, build parameters, counts and the sha256 of the HDF5 file. A folder
  whose manifest matches the requested build is reused as a cache.

Every molecule is processed by a single-threaded worker with a random stream seeded from its SMILES,
so the numbers do not depend on the molecule order, the number of workers or their scheduling.

Run ``python -m train.data.builtin [--out DIR] [--force] [--small]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import shutil
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
from tqdm import tqdm

# Bump when the molecule table, the recipe or the file layout changes: it invalidates cached builds.
BUILTIN_VERSION = "builtin-v1"

HDF5_FILENAME = "builtin_gfn2xtb.hdf5"
ASELMDB_DIRNAME = "aselmdb"
ASELMDB_FILENAME = "builtin_gfn2xtb.aselmdb"
ASELMDB_METADATA_FILENAME = "metadata.npz"
MANIFEST_FILENAME = "manifest.json"
DATA_DIR_ENV = "E2FORMER_DATA_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/e2former_jax")

HARTREE_EV = 27.211386245988  # eV per hartree
BOHR_A = 0.529177210903  # angstrom per bohr
KB_EV = 8.617333262e-5  # Boltzmann constant, eV per kelvin
# (eV / angstrom) / amu expressed in angstrom / fs^2, the MD's acceleration unit.
EV_PER_A_AMU_IN_A_PER_FS2 = 9.64853321233e-3

SEED = 20_251_125
# Labelled geometries per molecule in the default build: 120 molecules x 25 gives ~3000 conformers,
# which a few minutes of CPU training visibly learns from and which builds in a few minutes on 2 cores.
DEFAULT_CONFORMERS_PER_MOLECULE = 25
SMALL_CONFORMERS_PER_MOLECULE = 3
# ETKDG start conformers per molecule; the labelled geometries are spread evenly over them.
START_CONFORMERS = 3
# One temperature per start conformer (cycled): room temperature up to hot enough to reach strained
# but still bonded geometries, so the forces span the range MD at 300-600 K visits and beyond.
TEMPERATURES_K = (300.0, 600.0, 900.0)
# One geometry in this many is a Gaussian displacement; the rest are MD snapshots.
DISPLACEMENT_PERIOD = 3
# Typical bond-stretch force constant (C-H / C-C, ~4.5-5 mdyn/angstrom) in eV/angstrom^2: an isotropic
# displacement sigma = sqrt(k_B T / K) stores on average ~k_B T in such a bond.
BOND_STRETCH_K_EV_PER_A2 = 30.0
MAX_DISPLACEMENT_TRIES = 5
# Langevin MD: 0.5 fs resolves X-H stretches without constraints; 50 fs friction time thermalises the
# short trajectories; snapshots 10 fs apart after 20 fs of equilibration.
MD_TIMESTEP_FS = 0.5
MD_FRICTION_PER_FS = 0.02
MD_EQUILIBRATION_STEPS = 40
MD_SNAPSHOT_STRIDE = 20
# FIRE relaxation of start conformers that no force field cleaned up (radicals).
RELAX_MAX_STEPS = 60
RELAX_FMAX_EV_PER_A = 0.1
# Closer than this two atoms are a broken geometry, not a thermal one.
MIN_DISTANCE_A = 0.7
MMFF_MAX_ITERS = 500

SMALL_ORGANICS = "small organics"
DRUG_LIKE = "drug-like fragments"
AMINO_ACIDS = "amino acids and dipeptides"
CHARGED = "charged species"
RADICALS = "radicals"
SUBSETS = (SMALL_ORGANICS, DRUG_LIKE, AMINO_ACIDS, CHARGED, RADICALS)

LEVEL_OF_THEORY_TEMPLATE = "GFN2-xTB (tblite {version})"
THEORY_NOTE = (
  "Labels are GFN2-xTB semi-empirical tight-binding energies and gradients computed with tblite; "
  "they are NOT SPICE's wB97M-D3(BJ)/def2-TZVPPD DFT. The SPICE key names (dft_total_energy, "
  "dft_total_gradient) are kept only so that SPICE readers load this file unchanged."
)


@dataclasses.dataclass(frozen=True)
class BuiltinMolecule:
  """One molecule of the built-in dataset.

  Attributes:
    name: Human-readable name.
    smiles: SMILES with formal charges and radical centres written out.
    charge: Total charge (e).
    multiplicity: Spin multiplicity 2S+1.
    subset: One of ``SUBSETS``.
  """

  name: str
  smiles: str
  charge: int
  multiplicity: int
  subset: str


def _table(subset: str, rows: Sequence[tuple[str, str]], charge: int = 0,
           multiplicity: int = 1) -> list[BuiltinMolecule]:
  return [BuiltinMolecule(name, smiles, charge, multiplicity, subset) for name, smiles in rows]


MOLECULES: tuple[BuiltinMolecule, ...] = tuple(
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

# The small build: one molecule per subset plus both signs of charge, smallest first, for tests.
SMALL_MOLECULE_NAMES = (
  "methanol", "thiazole", "glycine", "methylammonium", "acetate", "ethyl radical",
)


def builtin_molecules(small: bool = False) -> tuple[BuiltinMolecule, ...]:
  """The molecules of the default (or small) build, in file order.

  Args:
    small: Return the 6-molecule test subset ``SMALL_MOLECULE_NAMES`` instead of all molecules.

  Returns:
    The molecules, ordered as in ``MOLECULES``.
  """
  if not small:
    return MOLECULES
  return tuple(m for m in MOLECULES if m.name in SMALL_MOLECULE_NAMES)


def default_builtin_dir(small: bool = False) -> Path:
  """Where the built-in dataset is cached by default.

  ``$E2FORMER_DATA_DIR/builtin-v1`` when that variable is set, else ``~/.cache/e2former_jax/builtin-v1``
  (``...-small`` for the small build, so that it never replaces the default one).
  """
  root = Path(os.environ.get(DATA_DIR_ENV, str(DEFAULT_CACHE_ROOT))).expanduser()
  return root / (BUILTIN_VERSION + ("-small" if small else ""))


def displacement_sigma_a(temperature_k: float) -> float:
  """Per-coordinate sigma (angstrom) of a thermal Gaussian displacement at ``temperature_k``.

  sigma = sqrt(k_B T / K) with K = ``BOND_STRETCH_K_EV_PER_A2``: displacing both ends of a bond
  isotropically by sigma stretches it by a variance 2 sigma^2, i.e. an average stored energy
  K sigma^2 = k_B T in the stiffest (bond-stretch) modes; softer bends and torsions get less.
  """
  return math.sqrt(KB_EV * temperature_k / BOND_STRETCH_K_EV_PER_A2)


@dataclasses.dataclass(frozen=True)
class _Task:
  """Work order for one molecule (picklable for the worker processes)."""

  index: int
  molecule: BuiltinMolecule
  num_conformers: int


@dataclasses.dataclass(frozen=True)
class _MoleculeSamples:
  """Labelled geometries of one molecule, in the HDF5 units and dtypes."""

  index: int
  key: str  # canonical SMILES: the HDF5 group name
  mapped_smiles: str
  atomic_numbers: np.ndarray  # [n] int16
  conformations: np.ndarray  # [M, n, 3] float32, bohr
  energy: np.ndarray  # [M] float64, hartree
  gradient: np.ndarray  # [M, n, 3] float32, hartree/bohr
  num_rejected: int


def _require_chemistry() -> None:
  """Raises ImportError with the fix when RDKit or tblite is missing."""
  missing = []
  for module in ("rdkit", "tblite"):
    try:
      __import__(module)
    except ImportError:
      missing.append(module)
  if missing:
    raise ImportError(
      f"building the built-in dataset needs {', '.join(missing)}: "
      "pip install 'e2former-jax[chem]' (rdkit and tblite)")


def _molecule_seed(molecule: BuiltinMolecule) -> int:
  """A seed that depends only on the SMILES, so that table order and sharding do not matter."""
  return zlib.crc32(molecule.smiles.encode()) ^ SEED


def _rdkit_molecule(molecule: BuiltinMolecule):
  """RDKit molecule with explicit hydrogens (heavy atoms first, as in SPICE), validated.

  Raises:
    ValueError: if the SMILES does not parse or disagrees with the tabulated charge or multiplicity.
  """
  from rdkit import Chem

  mol = Chem.MolFromSmiles(molecule.smiles)
  if mol is None:
    raise ValueError(f"built-in molecule {molecule.name!r}: SMILES {molecule.smiles!r} does not parse")
  formal = Chem.GetFormalCharge(mol)
  if formal != molecule.charge:
    raise ValueError(f"built-in molecule {molecule.name!r}: formal charge {formal} of "
                     f"{molecule.smiles!r} != tabulated charge {molecule.charge}")
  unpaired = sum(atom.GetNumRadicalElectrons() for atom in mol.GetAtoms())
  if unpaired + 1 != molecule.multiplicity:
    raise ValueError(f"built-in molecule {molecule.name!r}: {unpaired} unpaired electrons in "
                     f"{molecule.smiles!r} != multiplicity {molecule.multiplicity} - 1")
  return Chem.AddHs(mol)


def _mapped_smiles(mol_h) -> str:
  """SPICE-style mapped SMILES: every atom explicit, atom map i is row i - 1, charges written out."""
  from rdkit import Chem

  mapped = Chem.Mol(mol_h)
  for atom in mapped.GetAtoms():
    atom.SetAtomMapNum(atom.GetIdx() + 1)
  return Chem.MolToSmiles(mapped)


def _start_conformers(mol_h, count: int, seed: int) -> list[np.ndarray]:
  """``count`` ETKDGv3 conformers ([n, 3] angstrom each), MMFF94-optimised unless ``_needs_relaxation``.

  Raises:
    ValueError: if RDKit cannot embed ``count`` conformers, even from random coordinates.
  """
  from rdkit.Chem import AllChem

  params = AllChem.ETKDGv3()
  params.randomSeed = seed & 0x7FFFFFFF
  params.numThreads = 1
  ids = list(AllChem.EmbedMultipleConfs(mol_h, numConfs=count, params=params))
  if len(ids) < count:
    params.useRandomCoords = True
    ids = list(AllChem.EmbedMultipleConfs(mol_h, numConfs=count, params=params))
  if len(ids) < count:
    raise ValueError(f"ETKDG embedded {len(ids)} of {count} conformers")
  if not _needs_relaxation(mol_h):
    AllChem.MMFFOptimizeMoleculeConfs(mol_h, numThreads=1, maxIters=MMFF_MAX_ITERS)
  return [mol_h.GetConformer(i).GetPositions().astype(np.float64) for i in ids]


def _needs_relaxation(mol_h) -> bool:
  """True when MMFF cannot clean up the conformer (radicals, missing parameters)."""
  from rdkit.Chem import AllChem

  has_radical = any(atom.GetNumRadicalElectrons() for atom in mol_h.GetAtoms())
  return has_radical or not AllChem.MMFFHasAllMoleculeParams(mol_h)


class _Xtb:
  """GFN2-xTB energies and forces of one molecule, restarting each SCF from the previous one."""

  def __init__(self, numbers: np.ndarray, charge: int, multiplicity: int):
    self._numbers = numbers
    self._charge = charge
    self._uhf = multiplicity - 1
    self._calc = None
    self._restart = None

  def single_point(self, positions_bohr: np.ndarray) -> tuple[float, np.ndarray]:
    """Fresh-guess single point: (energy hartree, gradient [n, 3] hartree/bohr).

    Raises:
      tblite.exceptions.TBLiteRuntimeError: if the SCF does not converge.
    """
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", self._numbers, positions_bohr, charge=float(self._charge),
                      uhf=self._uhf)
    calc.set("verbosity", 0)
    result = calc.singlepoint()
    return float(result.get("energy")), np.array(result.get("gradient"), dtype=np.float64)

  def forces_ev_a(self, positions_a: np.ndarray) -> np.ndarray:
    """Forces [n, 3] in eV/angstrom for MD and relaxation; the SCF restarts from the last call."""
    from tblite.interface import Calculator

    positions_bohr = positions_a / BOHR_A
    if self._calc is None:
      self._calc = Calculator("GFN2-xTB", self._numbers, positions_bohr,
                              charge=float(self._charge), uhf=self._uhf)
      self._calc.set("verbosity", 0)
    else:
      self._calc.update(positions=positions_bohr)
    self._restart = self._calc.singlepoint(self._restart)
    return -np.array(self._restart.get("gradient")) * (HARTREE_EV / BOHR_A)


def _min_distance_a(positions_a: np.ndarray) -> float:
  """Smallest interatomic distance of a [n, 3] geometry (inf for one atom)."""
  diff = positions_a[:, None, :] - positions_a[None, :, :]  # [n, n, 3]
  dist = np.linalg.norm(diff, axis=-1)  # [n, n]
  np.fill_diagonal(dist, np.inf)
  return float(dist.min())


def _fire_relax(xtb: _Xtb, positions_a: np.ndarray) -> np.ndarray:
  """Short FIRE minimisation (Bitzek et al. 2006, standard parameters) of a [n, 3] geometry."""
  from tblite.exceptions import TBLiteRuntimeError

  dt, dt_max, max_step, alpha, alpha_start, n_downhill = 0.1, 1.0, 0.2, 0.1, 0.1, 0
  velocity = np.zeros_like(positions_a)
  forces = xtb.forces_ev_a(positions_a)
  for _ in range(RELAX_MAX_STEPS):
    if np.linalg.norm(forces, axis=1).max() < RELAX_FMAX_EV_PER_A:
      break
    power = float(np.vdot(forces, velocity))
    if power > 0.0:
      velocity = ((1.0 - alpha) * velocity
                  + alpha * np.linalg.norm(velocity) * forces / np.linalg.norm(forces))
      n_downhill += 1
      if n_downhill > 5:
        dt, alpha = min(1.1 * dt, dt_max), 0.99 * alpha
    else:
      velocity[:] = 0.0
      dt, alpha, n_downhill = 0.5 * dt, alpha_start, 0
    velocity = velocity + dt * forces
    step = dt * velocity
    step_norm = np.linalg.norm(step)
    if step_norm > max_step:
      step *= max_step / step_norm
    try:
      forces = xtb.forces_ev_a(positions_a + step)
    except TBLiteRuntimeError:
      break
    positions_a = positions_a + step
  return positions_a


def _langevin_snapshots(xtb: _Xtb, masses_amu: np.ndarray, positions_a: np.ndarray,
                        temperature_k: float, count: int, rng: np.random.Generator) -> list[np.ndarray]:
  """GFN2-xTB Langevin MD (BAOAB splitting) from ``positions_a``; returns up to ``count`` snapshots.

  Snapshots are taken at steps E, E + S, E + 2S, ... (E equilibration steps, S the stride). The
  trajectory stops early if the SCF fails or two atoms collide.
  """
  from tblite.exceptions import TBLiteRuntimeError

  if count == 0:
    return []
  inv_mass = EV_PER_A_AMU_IN_A_PER_FS2 / masses_amu[:, None]  # [n, 1]
  thermal_speed = np.sqrt(KB_EV * temperature_k * inv_mass)  # [n, 1], angstrom/fs
  velocity = rng.normal(size=positions_a.shape) * thermal_speed  # [n, 3]
  momentum = velocity / inv_mass
  velocity -= momentum.sum(axis=0) / (1.0 / inv_mass).sum()  # no centre-of-mass drift
  damping = math.exp(-MD_FRICTION_PER_FS * MD_TIMESTEP_FS)
  kick = math.sqrt(1.0 - damping**2)
  half = 0.5 * MD_TIMESTEP_FS
  last_step = MD_EQUILIBRATION_STEPS + MD_SNAPSHOT_STRIDE * (count - 1)
  snapshots = []
  try:
    forces = xtb.forces_ev_a(positions_a)
    for step in range(1, last_step + 1):
      velocity = velocity + half * forces * inv_mass
      positions_a = positions_a + half * velocity
      velocity = damping * velocity + kick * thermal_speed * rng.normal(size=velocity.shape)
      positions_a = positions_a + half * velocity
      if _min_distance_a(positions_a) < MIN_DISTANCE_A:
        break
      forces = xtb.forces_ev_a(positions_a)
      velocity = velocity + half * forces * inv_mass
      if step >= MD_EQUILIBRATION_STEPS and (step - MD_EQUILIBRATION_STEPS) % MD_SNAPSHOT_STRIDE == 0:
        snapshots.append(positions_a.copy())
  except TBLiteRuntimeError:
    pass
  return snapshots


def _gaussian_displacements(positions_a: np.ndarray, temperature_k: float, count: int,
                            rng: np.random.Generator) -> list[np.ndarray]:
  """``count`` thermal Gaussian displacements of a [n, 3] geometry; a collision is redrawn."""
  sigma = displacement_sigma_a(temperature_k)
  displaced = []
  for _ in range(count):
    for _ in range(MAX_DISPLACEMENT_TRIES):
      trial = positions_a + rng.normal(scale=sigma, size=positions_a.shape)
      if _min_distance_a(trial) >= MIN_DISTANCE_A:
        displaced.append(trial)
        break
  return displaced


def _split_counts(total: int, parts: int) -> list[int]:
  """``total`` split into ``parts`` near-equal non-negative integers, larger ones first."""
  return [total // parts + (i < total % parts) for i in range(parts)]


def _sample_molecule(task: _Task) -> _MoleculeSamples:
  """Generates and labels the geometries of one molecule (runs in a worker process)."""
  from ase.data import atomic_masses
  from rdkit import Chem
  from tblite.exceptions import TBLiteRuntimeError

  molecule = task.molecule
  mol_h = _rdkit_molecule(molecule)
  numbers = np.array([atom.GetAtomicNum() for atom in mol_h.GetAtoms()], dtype=np.int64)
  masses = atomic_masses[numbers]
  seed = _molecule_seed(molecule)
  rng = np.random.default_rng(seed)
  num_starts = min(START_CONFORMERS, task.num_conformers)
  try:
    starts = _start_conformers(mol_h, num_starts, seed)
  except ValueError as err:
    raise ValueError(f"built-in molecule {molecule.name!r} ({molecule.smiles}): {err}") from err
  relax = _needs_relaxation(mol_h)

  candidates = []
  done = 0
  for start_index, (start, count) in enumerate(zip(starts, _split_counts(task.num_conformers, num_starts))):
    temperature = TEMPERATURES_K[start_index % len(TEMPERATURES_K)]
    xtb = _Xtb(numbers, molecule.charge, molecule.multiplicity)
    if relax:
      start = _fire_relax(xtb, start)
    # The displacement share is spread over the molecule's geometries as a whole, so that even
    # one geometry per start conformer (the small build) includes displacements.
    num_displaced = (done + count) // DISPLACEMENT_PERIOD - done // DISPLACEMENT_PERIOD
    done += count
    candidates += _gaussian_displacements(start, temperature, num_displaced, rng)
    candidates += _langevin_snapshots(xtb, masses, start, temperature, count - num_displaced, rng)

  labeller = _Xtb(numbers, molecule.charge, molecule.multiplicity)
  conformations, energies, gradients = [], [], []
  for positions_a in candidates:
    # The label belongs to the float32 geometry that is stored, not to the float64 one.
    stored = (positions_a / BOHR_A).astype(np.float32)  # [n, 3] bohr
    if _min_distance_a(stored.astype(np.float64) * BOHR_A) < MIN_DISTANCE_A:
      continue
    try:
      energy, gradient = labeller.single_point(stored.astype(np.float64))
    except TBLiteRuntimeError:
      continue
    conformations.append(stored)
    energies.append(energy)
    gradients.append(gradient.astype(np.float32))
  num_rejected = task.num_conformers - len(conformations)
  if not conformations:
    raise ValueError(f"built-in molecule {molecule.name!r} ({molecule.smiles}): every geometry was rejected")
  return _MoleculeSamples(
    index=task.index,
    key=Chem.MolToSmiles(Chem.MolFromSmiles(molecule.smiles)),
    mapped_smiles=_mapped_smiles(mol_h),
    atomic_numbers=numbers.astype(np.int16),
    conformations=np.stack(conformations),
    energy=np.asarray(energies, dtype=np.float64),
    gradient=np.stack(gradients),
    num_rejected=num_rejected,
  )


def _init_worker() -> None:
  """Pins numerical libraries to one thread before tblite is first imported; silences RDKit."""
  for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"
  from rdkit import RDLogger

  # ETKDG's UFF typer warns about S- and S-radical charge states it does not type; harmless noise.
  RDLogger.DisableLog("rdApp.*")


def _level_of_theory() -> str:
  return LEVEL_OF_THEORY_TEMPLATE.format(version=importlib.metadata.version("tblite"))


def _write_hdf5(path: Path, molecules: Sequence[BuiltinMolecule],
                samples: Sequence[_MoleculeSamples]) -> None:
  """Writes the SPICE-layout HDF5 file, one group per molecule."""
  text = h5py.string_dtype(encoding="utf-8")
  with h5py.File(path, "w") as f:
    f.attrs["level_of_theory"] = _level_of_theory()
    f.attrs["note"] = THEORY_NOTE
    f.attrs["builtin_version"] = BUILTIN_VERSION
    for molecule, sample in zip(molecules, samples):
      if "/" in sample.key or sample.key in f:
        raise ValueError(f"built-in molecule {molecule.name!r}: canonical SMILES {sample.key!r} "
                         "is not a unique HDF5 group name")
      group = f.create_group(sample.key)
      group.create_dataset("atomic_numbers", data=sample.atomic_numbers)
      group.create_dataset("conformations", data=sample.conformations).attrs["units"] = "bohr"
      group.create_dataset("dft_total_energy", data=sample.energy).attrs["units"] = "hartree"
      group.create_dataset("dft_total_gradient", data=sample.gradient).attrs["units"] = "hartree/bohr"
      group.create_dataset("smiles", data=[sample.mapped_smiles], dtype=text)
      group.create_dataset("subset", data=[molecule.subset], dtype=text)
      group.create_dataset("total_charge", data=np.array([molecule.charge], dtype=np.int16)
                           ).attrs["units"] = "elementary_charge"
      group.create_dataset("spin_multiplicity", data=np.array([molecule.multiplicity], dtype=np.int16))


def _write_aselmdb(folder: Path, molecules: Sequence[BuiltinMolecule],
                   samples: Sequence[_MoleculeSamples]) -> None:
  """Writes the OMol25-style ASE LMDB copy (eV, eV/angstrom) and its ``metadata.npz``."""
  from ase import Atoms
  from ase.calculators.singlepoint import SinglePointCalculator
  from ase.db import connect

  folder.mkdir()
  db_path = folder / ASELMDB_FILENAME
  natoms = []
  db = connect(str(db_path))  # the .aselmdb suffix selects ase-db-backends' LMDB backend
  with db:
    for molecule, sample in zip(molecules, samples):
      for positions, energy, gradient in zip(sample.conformations, sample.energy, sample.gradient):
        atoms = Atoms(numbers=sample.atomic_numbers.astype(np.int64),
                      positions=positions.astype(np.float64) * BOHR_A, pbc=False)
        forces = -gradient.astype(np.float64) * (HARTREE_EV / BOHR_A)
        atoms.calc = SinglePointCalculator(atoms, energy=float(energy) * HARTREE_EV, forces=forces)
        db.write(atoms, data={"charge": int(molecule.charge), "spin": int(molecule.multiplicity)})
        natoms.append(len(atoms))
  if hasattr(db, "close"):
    db.close()
  # Readers open the database read-only without a lock file; do not leave a stale one behind.
  Path(str(db_path) + "-lock").unlink(missing_ok=True)
  np.savez(folder / ASELMDB_METADATA_FILENAME, natoms=np.asarray(natoms, dtype=np.int32))


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _build_params(molecules: Sequence[BuiltinMolecule], num_conformers: int) -> dict[str, Any]:
  """Everything that determines the numbers; a cached build is reused only if these match."""
  return {
    "num_conformers_per_molecule": num_conformers,
    "molecules": [dataclasses.asdict(m) for m in molecules],
    "seed": SEED,
    "recipe": {
      "start_conformers": START_CONFORMERS, "temperatures_k": list(TEMPERATURES_K),
      "displacement_period": DISPLACEMENT_PERIOD, "bond_stretch_k_ev_per_a2": BOND_STRETCH_K_EV_PER_A2,
      "md_timestep_fs": MD_TIMESTEP_FS, "md_friction_per_fs": MD_FRICTION_PER_FS,
      "md_equilibration_steps": MD_EQUILIBRATION_STEPS, "md_snapshot_stride": MD_SNAPSHOT_STRIDE,
      "relax_max_steps": RELAX_MAX_STEPS, "relax_fmax_ev_per_a": RELAX_FMAX_EV_PER_A,
      "min_distance_a": MIN_DISTANCE_A, "mmff_max_iters": MMFF_MAX_ITERS,
    },
  }


def _cached_manifest(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  """The manifest of a complete, intact build of ``params`` in ``out_dir``, else None."""
  manifest_path = out_dir / MANIFEST_FILENAME
  if not manifest_path.is_file():
    return None
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError:
    return None
  hdf5 = out_dir / HDF5_FILENAME
  complete = (
    manifest.get("version") == BUILTIN_VERSION and manifest.get("params") == params
    and hdf5.is_file() and (out_dir / ASELMDB_DIRNAME / ASELMDB_FILENAME).is_file()
    and (out_dir / ASELMDB_DIRNAME / ASELMDB_METADATA_FILENAME).is_file()
    and manifest.get("sha256", {}).get(HDF5_FILENAME) == _sha256(hdf5)
  )
  return manifest if complete else None


def _sample_all(molecules: Sequence[BuiltinMolecule], num_conformers: int, workers: int,
                progress: bool) -> list[_MoleculeSamples]:
  """Labels every molecule in ``workers`` single-threaded processes; results in table order."""
  sizes = [_rdkit_molecule(m).GetNumAtoms() for m in molecules]  # validates the table up front
  # Largest first so that the last tasks to finish are short ones (better load balance).
  tasks = sorted((_Task(i, m, num_conformers) for i, m in enumerate(molecules)),
                 key=lambda t: -sizes[t.index])
  results: list[_MoleculeSamples | None] = [None] * len(molecules)
  # Fresh interpreters: thread settings apply before tblite loads, whatever the parent imported.
  context = multiprocessing.get_context("spawn")
  with context.Pool(min(workers, len(tasks)), initializer=_init_worker) as pool, \
      tqdm(total=len(tasks), desc="built-in dataset (GFN2-xTB)", unit="mol", disable=not progress) as bar:
    num_done = 0
    for sample in pool.imap_unordered(_sample_molecule, tasks):
      results[sample.index] = sample
      num_done += len(sample.energy)
      bar.set_postfix(conformers=num_done)
      bar.update()
  assert all(r is not None for r in results)  # imap_unordered re-raises a worker's error
  return results


def build_builtin_dataset(out_dir: str | os.PathLike[str] | None = None, *,
                          num_conformers: int | None = None, small: bool = False,
                          workers: int | None = None, force: bool = False,
                          progress: bool = True) -> Path:
  """Builds the built-in GFN2-xTB dataset (or reuses a cached build) and returns its folder.

  The folder holds ``HDF5_FILENAME`` (SPICE layout), ``ASELMDB_DIRNAME/`` (OMol25-style ASE LMDB
  copy with ``metadata.npz``) and ``MANIFEST_FILENAME``. The build is written to a temporary
  sibling folder and renamed into place, so an interrupted build leaves no partial dataset.

  Args:
    out_dir: Target folder; default ``default_builtin_dir(small)``. An existing folder is replaced
      only if it is empty or holds a previous built-in dataset (a manifest).
    num_conformers: Labelled geometries per molecule; default ``DEFAULT_CONFORMERS_PER_MOLECULE``
      (``SMALL_CONFORMERS_PER_MOLECULE`` when ``small``). A few may be rejected.
    small: Build only the 6 molecules of ``SMALL_MOLECULE_NAMES`` (a few seconds; for tests).
    workers: Worker processes; default the number of usable CPU cores. Does not change the numbers.
    force: Rebuild even if a matching build exists.
    progress: Show a tqdm progress bar on stderr.

  Returns:
    The dataset folder.

  Raises:
    ImportError: if RDKit or tblite is not installed.
    ValueError: on a non-positive ``num_conformers`` or ``workers``, or an ``out_dir`` that exists
      and is neither empty nor a built-in dataset.
  """
  if num_conformers is None:
    num_conformers = SMALL_CONFORMERS_PER_MOLECULE if small else DEFAULT_CONFORMERS_PER_MOLECULE
  if num_conformers < 1:
    raise ValueError(f"num_conformers must be >= 1, got {num_conformers}")
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  out_dir = Path(out_dir).expanduser() if out_dir is not None else default_builtin_dir(small)
  molecules = builtin_molecules(small)
  params = _build_params(molecules, num_conformers)
  if not force and _cached_manifest(out_dir, params) is not None:
    return out_dir
  if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILENAME).is_file():
    raise ValueError(f"{out_dir} exists and is not a built-in dataset folder (no {MANIFEST_FILENAME}); "
                     "pass an empty or new folder")
  _require_chemistry()

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  start = time.perf_counter()
  try:
    partial.mkdir()
    samples = _sample_all(molecules, num_conformers, workers, progress)
    _write_hdf5(partial / HDF5_FILENAME, molecules, samples)
    _write_aselmdb(partial / ASELMDB_DIRNAME, molecules, samples)
    per_subset: dict[str, int] = {}
    for molecule, sample in zip(molecules, samples):
      per_subset[molecule.subset] = per_subset.get(molecule.subset, 0) + len(sample.energy)
    manifest = {
      "version": BUILTIN_VERSION,
      "params": params,
      "level_of_theory": _level_of_theory(),
      "note": THEORY_NOTE,
      "counts": {
        "molecules": len(samples),
        "conformers": sum(len(s.energy) for s in samples),
        "atoms": sum(len(s.energy) * len(s.atomic_numbers) for s in samples),
        "rejected": sum(s.num_rejected for s in samples),
        "conformers_per_subset": per_subset,
      },
      "sha256": {HDF5_FILENAME: _sha256(partial / HDF5_FILENAME)},
      "software": {name: importlib.metadata.version(name) for name in ("tblite", "rdkit", "ase")},
      "build_seconds": round(time.perf_counter() - start, 1),
    }
    # The manifest is written last: its presence marks the folder complete.
    (partial / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
    if out_dir.exists():
      out_dir.rename(stale)
    partial.rename(out_dir)
    shutil.rmtree(stale, ignore_errors=True)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return out_dir


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: build (or find cached) the built-in dataset and print where it is."""
  parser = argparse.ArgumentParser(
    prog="python -m train.data.builtin",
    description="Build the built-in GFN2-xTB dataset (SPICE HDF5 + OMol25-style aselmdb).")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"output folder (default ${DATA_DIR_ENV}/{BUILTIN_VERSION} or "
                           f"{DEFAULT_CACHE_ROOT}/{BUILTIN_VERSION})")
  parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
  parser.add_argument("--small", action="store_true",
                      help=f"tiny build: {len(SMALL_MOLECULE_NAMES)} molecules x "
                           f"{SMALL_CONFORMERS_PER_MOLECULE} conformers")
  parser.add_argument("--num-conformers", type=int, default=None, help="geometries per molecule")
  parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  folder = build_builtin_dataset(args.out, num_conformers=args.num_conformers, small=args.small,
                                 workers=args.workers, force=args.force)
  counts = json.loads((folder / MANIFEST_FILENAME).read_text())["counts"]
  print(f"{folder}: {counts['conformers']} conformers of {counts['molecules']} molecules "
        f"({counts['rejected']} rejected); {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
