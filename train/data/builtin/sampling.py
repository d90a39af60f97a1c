"""Geometries and GFN2-xTB labels of one built-in molecule: start conformers, thermal sampling, labelling.

For each molecule:

1. ``START_CONFORMERS`` RDKit ETKDGv3 conformers, seeded from the SMILES; the ions of an ion pair
   are embedded apart and put side by side (``_place_fragments``). Conformers are cleaned up with
   MMFF94 where MMFF has parameters (closed-shell species) and with a short GFN2-xTB FIRE
   relaxation otherwise (radicals).
2. Thermal perturbations of every start conformer at one of ``TEMPERATURES_K`` (the molecule's
   seed picks where the cycle starts): snapshots of a GFN2-xTB Langevin molecular dynamics, and
   isotropic Gaussian displacements whose size puts about k_B T into a typical bond stretch
   (see ``displacement_sigma_a``).
3. A fresh GFN2-xTB single point (tblite, total charge and ``uhf = multiplicity - 1``) at the stored,
   float32-rounded geometry. Geometries with two atoms closer than ``MIN_DISTANCE_A`` or a
   non-converged SCF are rejected.

Every molecule is processed by ``sample_molecule`` in a single-threaded worker with a random stream
seeded from its SMILES, so the numbers do not depend on the molecule order, the number of workers or
their scheduling.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zlib

import numpy as np

from train.data.builtin.molecules import BuiltinMolecule, canonical_key, parse
from train.data.units import BOHR_A, HARTREE_EV

KB_EV = 8.617333262e-5  # Boltzmann constant, eV per kelvin
# (eV / angstrom) / amu expressed in angstrom / fs^2, the MD's acceleration unit.
EV_PER_A_AMU_IN_A_PER_FS2 = 9.64853321233e-3

SEED = 20_251_125
# ETKDG start conformers per molecule; the labelled geometries are spread evenly over them. Two
# rather than more: distinct molecules teach more than more conformers of one molecule.
START_CONFORMERS = 2
# Temperatures (cycled over the start conformers): room temperature up to hot enough to reach
# strained but still bonded geometries, so the forces span the range MD at 300-600 K visits and beyond.
TEMPERATURES_K = (300.0, 600.0, 900.0)
# One geometry in this many is a Gaussian displacement (one single point) rather than an MD snapshot
# (10-15 MD steps and a single point): half of them, so that the build affords more molecules.
DISPLACEMENT_PERIOD = 2
# Typical bond-stretch force constant (C-H / C-C, ~4.5-5 mdyn/angstrom) in eV/angstrom^2: an isotropic
# displacement sigma = sqrt(k_B T / K) stores on average ~k_B T in such a bond.
BOND_STRETCH_K_EV_PER_A2 = 30.0
MAX_DISPLACEMENT_TRIES = 5
# Langevin MD: 1 fs steps, a tenth of the fastest (X-H stretch) period, which BAOAB samples without
# constraints; 50 fs friction time thermalises the short trajectories. The first snapshot is taken
# after 15 fs, a quarter period of the slowest bond stretches and bends that matter for forces
# (~500 cm^-1), so the initial Maxwell-Boltzmann kinetic energy has reached them; further
# snapshots of the same trajectory are 10 fs apart.
MD_TIMESTEP_FS = 1.0
MD_FRICTION_PER_FS = 0.02
MD_EQUILIBRATION_STEPS = 15
MD_SNAPSHOT_STRIDE = 10
# FIRE relaxation of start conformers that no force field cleaned up (radicals).
RELAX_MAX_STEPS = 60
RELAX_FMAX_EV_PER_A = 0.1
# Closer than this two atoms are a broken geometry, not a thermal one.
MIN_DISTANCE_A = 0.7
MMFF_MAX_ITERS = 500
# The ions of a pair start this far apart (closest atoms) before MMFF draws them into contact: past
# the ~2.4 angstrom of a C-H...O contact, so that nothing starts inside another atom's repulsion.
FRAGMENT_GAP_A = 3.0
FRAGMENT_STEP_A = 0.1


def displacement_sigma_a(temperature_k: float) -> float:
  """Per-coordinate sigma (angstrom) of a thermal Gaussian displacement at ``temperature_k``.

  sigma = sqrt(k_B T / K) with K = ``BOND_STRETCH_K_EV_PER_A2``: displacing both ends of a bond
  isotropically by sigma stretches it by a variance 2 sigma^2, i.e. an average stored energy
  K sigma^2 = k_B T in the stiffest (bond-stretch) modes; softer bends and torsions get less.
  """
  return math.sqrt(KB_EV * temperature_k / BOND_STRETCH_K_EV_PER_A2)


@dataclasses.dataclass(frozen=True)
class Task:
  """Work order for one molecule (picklable for the worker processes)."""

  index: int
  molecule: BuiltinMolecule
  num_conformers: int


@dataclasses.dataclass(frozen=True)
class MoleculeSamples:
  """Labelled geometries of one molecule, in the HDF5 units and dtypes."""

  index: int
  key: str  # canonical SMILES: the HDF5 group name
  mapped_smiles: str
  atomic_numbers: np.ndarray  # [n] int16
  conformations: np.ndarray  # [M, n, 3] float32, bohr
  energy: np.ndarray  # [M] float64, hartree
  gradient: np.ndarray  # [M, n, 3] float32, hartree/bohr
  num_rejected: int


def require_chemistry() -> None:
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


def init_worker() -> None:
  """Pins numerical libraries to one thread before tblite is first imported; silences RDKit."""
  for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"
  from rdkit import RDLogger

  # ETKDG's UFF typer warns about S- and S-radical charge states it does not type; harmless noise.
  RDLogger.DisableLog("rdApp.*")


def molecule_seed(molecule: BuiltinMolecule) -> int:
  """A seed that depends only on the SMILES, so that table order and sharding do not matter."""
  return zlib.crc32(molecule.smiles.encode()) ^ SEED


def num_atoms(molecule: BuiltinMolecule) -> int:
  """Atoms of ``molecule`` with its hydrogens (validates the table entry)."""
  from rdkit import Chem

  return Chem.AddHs(parse(molecule)).GetNumAtoms()


def _mapped_smiles(mol_h) -> str:
  """SPICE-style mapped SMILES: every atom explicit, atom map i is row i - 1, charges written out."""
  from rdkit import Chem

  mapped = Chem.Mol(mol_h)
  for atom in mapped.GetAtoms():
    atom.SetAtomMapNum(atom.GetIdx() + 1)
  return Chem.MolToSmiles(mapped)


def _min_distance_a(positions_a: np.ndarray) -> float:
  """Smallest interatomic distance of a [n, 3] geometry (inf for one atom)."""
  diff = positions_a[:, None, :] - positions_a[None, :, :]  # [n, n, 3]
  dist = np.linalg.norm(diff, axis=-1)  # [n, n]
  np.fill_diagonal(dist, np.inf)
  return float(dist.min())


def _place_fragments(positions_a: np.ndarray, fragments: tuple[tuple[int, ...], ...],
                     rng: np.random.Generator) -> np.ndarray:
  """Moves every fragment after the first out along a random direction until it is
  ``FRAGMENT_GAP_A`` from those already placed (ETKDG embeds the fragments on top of each other)."""
  positions_a = positions_a.copy()
  placed = list(fragments[0])
  for fragment in fragments[1:]:
    atoms = list(fragment)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    # Start centred on the placed atoms, then step out.
    positions_a[atoms] += positions_a[placed].mean(axis=0) - positions_a[atoms].mean(axis=0)
    while True:
      gap = np.linalg.norm(positions_a[atoms][:, None] - positions_a[placed][None], axis=-1).min()
      if gap >= FRAGMENT_GAP_A:
        break
      positions_a[atoms] += FRAGMENT_STEP_A * direction
    placed += atoms
  return positions_a


def _needs_relaxation(mol_h) -> bool:
  """True when MMFF cannot clean up the conformer (radicals, missing parameters)."""
  from rdkit.Chem import AllChem, Descriptors

  return Descriptors.NumRadicalElectrons(mol_h) > 0 or not AllChem.MMFFHasAllMoleculeParams(mol_h)


def _start_conformers(mol_h, count: int, seed: int, rng: np.random.Generator) -> list[np.ndarray]:
  """``count`` ETKDGv3 conformers ([n, 3] angstrom each), MMFF94-optimised unless ``_needs_relaxation``.

  Raises:
    ValueError: if RDKit cannot embed ``count`` conformers, even from random coordinates.
  """
  from rdkit import Chem
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
  fragments = Chem.GetMolFrags(mol_h)
  if len(fragments) > 1:
    for conf_id in ids:
      conformer = mol_h.GetConformer(conf_id)
      placed = _place_fragments(conformer.GetPositions(), fragments, rng)
      for atom, position in enumerate(placed):
        conformer.SetAtomPosition(atom, position.tolist())
  if not _needs_relaxation(mol_h):
    AllChem.MMFFOptimizeMoleculeConfs(mol_h, numThreads=1, maxIters=MMFF_MAX_ITERS)
  return [mol_h.GetConformer(i).GetPositions().astype(np.float64) for i in ids]


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


class RejectedMolecule(ValueError):
  """A molecule none of whose geometries could be labelled: the build leaves it out."""


def sample_or_reject(task: Task) -> MoleculeSamples | tuple[int, str]:
  """:func:`sample_molecule`, or ``(task.index, reason)`` for a rejected molecule (runs in a worker)."""
  try:
    return sample_molecule(task)
  except RejectedMolecule as err:
    return task.index, str(err)


def _fire_relax(xtb: _Xtb, positions_a: np.ndarray) -> np.ndarray:
  """Short FIRE minimisation (Bitzek et al. 2006, standard parameters) of a [n, 3] geometry."""
  from tblite.exceptions import TBLiteRuntimeError

  dt, dt_max, max_step, alpha, alpha_start, n_downhill = 0.1, 1.0, 0.2, 0.1, 0.1, 0
  velocity = np.zeros_like(positions_a)
  try:
    forces = xtb.forces_ev_a(positions_a)
  except TBLiteRuntimeError:  # no SCF at the start geometry: left as it is (labelling decides)
    return positions_a
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


def sample_molecule(task: Task) -> MoleculeSamples:
  """Generates and labels the geometries of one molecule (runs in a worker process).

  Raises:
    ValueError: if the table entry is invalid, no conformer embeds or every geometry is rejected.
  """
  from ase.data import atomic_masses
  from rdkit import Chem
  from tblite.exceptions import TBLiteRuntimeError

  molecule = task.molecule
  mol_h = Chem.AddHs(parse(molecule))  # heavy atoms first, as in SPICE
  numbers = np.array([atom.GetAtomicNum() for atom in mol_h.GetAtoms()], dtype=np.int64)
  masses = atomic_masses[numbers]
  seed = molecule_seed(molecule)
  rng = np.random.default_rng(seed)
  num_starts = min(START_CONFORMERS, task.num_conformers)
  try:
    starts = _start_conformers(mol_h, num_starts, seed, rng)
  except ValueError as err:
    raise ValueError(f"built-in molecule {molecule.name!r} ({molecule.smiles}): {err}") from err
  relax = _needs_relaxation(mol_h)

  candidates = []
  done = 0
  for start_index, (start, count) in enumerate(zip(starts, _split_counts(task.num_conformers, num_starts))):
    temperature = TEMPERATURES_K[(seed + start_index) % len(TEMPERATURES_K)]
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
    raise RejectedMolecule(f"built-in molecule {molecule.name!r} ({molecule.smiles}): every geometry "
                           "was rejected (broken, or no GFN2-xTB SCF convergence)")
  return MoleculeSamples(
    index=task.index,
    key=canonical_key(molecule),
    mapped_smiles=_mapped_smiles(mol_h),
    atomic_numbers=numbers.astype(np.int16),
    conformations=np.stack(conformations),
    energy=np.asarray(energies, dtype=np.float64),
    gradient=np.stack(gradients),
    num_rejected=num_rejected,
  )
