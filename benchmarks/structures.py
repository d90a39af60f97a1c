"""The structures every benchmark runs on, built on the host with numpy (deterministic per seed).

* :func:`random_box`: atoms uniformly at random in a cube (the attention kernels' input: only the
  neighbour list and the positions matter there).
* :func:`cluster_batch`: B clusters of m atoms, each a jittered cubic lattice carved as a ball in
  free space, O and H in a 1:2 ratio (the model benchmarks: time, memory, profile).
* :func:`water_box`: water molecules at liquid density, as a cluster or a periodic box (molecular
  dynamics).
* :func:`synthetic_dataset`: a few labelled molecules in an extxyz file (the training scripts'
  ``--smoke`` runs).

All are at the number density of liquid water (0.1 atoms / A^3, condensed organic matter), and the
atoms of one structure are ordered along a Morton curve, so that atoms close in space are close in
memory, as in a molecule.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import ase
import ase.io
import numpy as np

# Atoms per cubic angstrom: liquid water (33.4 molecules per nm^3, three atoms each).
DENSITY = 0.1
# Uniform displacement of every lattice site along each axis, as a fraction of the lattice spacing:
# breaks the lattice's distance ties while keeping every pair well apart.
LATTICE_JITTER = 0.25
OXYGEN, HYDROGEN = 8, 1
# Angstrom between the bounding spheres of the clusters of a batch: more than any cutoff, so the
# clusters share no edge.
CLUSTER_GAP = 10.0
# Liquid water: 0.997 g/cm^3 / 18.015 g/mol = 0.0334 molecules per cubic angstrom.
WATER_DENSITY = 0.0334
OH_BOND = 0.9572  # angstrom (TIP3P geometry)
HOH_ANGLE = np.deg2rad(104.52)
# Jitter of the water grid (angstrom): keeps every O-O distance above ~2.5 A.
WATER_JITTER = 0.15
# Bits per axis of the Morton code: 2^20 cells of the cutoff's size per axis, far beyond any size.
_MORTON_BITS = 20


def morton_order(positions: np.ndarray, cell: float) -> np.ndarray:
  """Permutation sorting points [n, 3] along a Z-order curve of cubic cells of side ``cell``."""
  cells = np.floor((positions - positions.min(axis=0)) / cell).astype(np.int64)
  code = np.zeros(len(positions), np.int64)
  for bit in range(_MORTON_BITS):
    for axis in range(3):
      code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
  return np.argsort(code, kind="stable")


def neighbor_slots(positions: np.ndarray, cutoff: float, k: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The K nearest other atoms within the cutoff, the model's neighbour relation without cells.

  Returns:
    idx [n, K] int32 (sentinel n on empty slots), mask [n, K] bool, distances [n, K] (the cutoff
    on empty slots).
  """
  n = len(positions)
  try:
    from scipy.spatial import cKDTree
  except ImportError:  # the project's own cell-list search: the same relation, slower for large n
    from e2former_jax.neighbors import neighbor_list

    nbrs = neighbor_list(positions, cutoff, k)
    return nbrs.idx, nbrs.mask, np.where(nbrs.mask, nbrs.distances, cutoff)
  dist, idx = cKDTree(positions).query(positions, k=k + 1, distance_upper_bound=cutoff, workers=-1)
  # Column 0 is the atom itself (distance 0: no two atoms of these structures coincide).
  idx, dist = idx[:, 1:], dist[:, 1:]
  mask = np.isfinite(dist) & (idx < n)  # cKDTree marks a missing neighbour with index n
  return np.where(mask, idx, n).astype(np.int32), mask, np.where(mask, dist, cutoff)


def random_box(num_atoms: int, cutoff: float, seed: int = 0) -> np.ndarray:
  """[n, 3] positions uniformly at random in a cube at DENSITY, Morton ordered."""
  rng = np.random.default_rng(seed)
  side = (num_atoms / DENSITY) ** (1 / 3)
  positions = rng.uniform(0, side, (num_atoms, 3))
  return positions[morton_order(positions, cutoff)]


def lattice_ball(num_atoms: int, rng: np.random.Generator) -> np.ndarray:
  """[n, 3] sites of a jittered cubic lattice at DENSITY, the n nearest its centre, centred."""
  spacing = DENSITY ** (-1 / 3)
  side = int(math.ceil(num_atoms ** (1 / 3))) + 2
  axis = np.arange(side) * spacing
  grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
  radius = np.linalg.norm(grid - grid.mean(axis=0), axis=1)
  sites = grid[np.argsort(radius, kind="stable")[:num_atoms]]
  sites = sites + rng.uniform(-LATTICE_JITTER, LATTICE_JITTER, sites.shape) * spacing
  return sites - sites.mean(axis=0)


@dataclasses.dataclass(frozen=True)
class Batch:
  """``molecules`` clusters of ``atoms_per_molecule`` atoms each; written '10000' or '64x30'."""

  molecules: int
  atoms_per_molecule: int

  @classmethod
  def parse(cls, text: str) -> Batch:
    b, m = text.split("x", 1) if "x" in text else ("1", text)
    try:
      batch = cls(int(b), int(m))
    except ValueError:
      raise ValueError(f"a structure is 'ATOMS' or 'MOLECULESxATOMS', got {text!r}") from None
    if batch.molecules < 1 or batch.atoms_per_molecule < 1:
      raise ValueError(f"a structure needs at least one molecule of one atom, got {text!r}")
    return batch

  @property
  def atoms(self) -> int:
    return self.molecules * self.atoms_per_molecule

  @property
  def name(self) -> str:
    if self.molecules == 1:
      return f"{self.atoms} atoms"
    return f"{self.molecules}x{self.atoms_per_molecule} molecules"


def cluster_batch(batch: Batch, cutoff: float, k: int, seed: int = 0):
  """The padding-free model input of ``batch`` (every atom and molecule slot real).

  Returns:
    an ``e2former_jax.graph.Graph`` of host numpy arrays (neutral singlets, no cell).
  """
  from e2former_jax.graph import Graph

  rng = np.random.default_rng([seed, batch.molecules, batch.atoms_per_molecule])
  blocks = [lattice_ball(batch.atoms_per_molecule, rng) for _ in range(batch.molecules)]
  if batch.molecules > 1:
    pitch = 2 * np.abs(blocks[0]).max() + CLUSTER_GAP
    per_row = int(math.ceil(batch.molecules ** (1 / 3)))
    offsets = np.stack(np.unravel_index(np.arange(batch.molecules), (per_row,) * 3), axis=1) * pitch
    blocks = [b + o for b, o in zip(blocks, offsets)]
  positions = np.concatenate(blocks)
  if batch.molecules == 1:
    positions = positions[morton_order(positions, cutoff)]
  species = np.where(rng.random(batch.atoms) < 1 / 3, OXYGEN, HYDROGEN).astype(np.int32)
  nbr_idx, nbr_mask, _ = neighbor_slots(positions, cutoff, k)
  n, b = batch.atoms, batch.molecules
  return Graph(positions=positions.astype(np.float32), species=species, node_mask=np.ones(n, bool),
               molecule_index=np.repeat(np.arange(b), batch.atoms_per_molecule).astype(np.int32),
               nbr_idx=nbr_idx, nbr_mask=nbr_mask, nbr_shift=np.zeros((n, k, 3), np.float32),
               charge=np.zeros(b, np.int32), spin=np.ones(b, np.int32),
               molecule_mask=np.ones(b, bool))


def water_side(num_atoms: int) -> float:
  """Side (angstrom) of the cube of num_atoms // 3 water molecules at liquid density."""
  return (max(1, num_atoms // 3) / WATER_DENSITY) ** (1 / 3)


def water_box(num_atoms: int, seed: int = 0, periodic: bool = False
          ) -> tuple[np.ndarray, np.ndarray, float]:
  """num_atoms // 3 water molecules (at least one) in a cube of side ``water_side(num_atoms)``.

  The oxygens sit at jittered centres of a grid of cells that tiles the cube, with uniformly random
  orientations, so in a periodic box of that side the molecules across the boundary are as far
  apart as those inside. ``periodic`` wraps every atom into [0, side) (hydrogens of boundary
  molecules stick out otherwise).

  Returns:
    (numbers [3M], positions [3M, 3] in angstrom, side).
  """
  rng = np.random.default_rng(seed)
  molecules = max(1, num_atoms // 3)
  side = water_side(num_atoms)
  per_side = int(np.ceil(molecules ** (1 / 3)))
  spacing = side / per_side
  grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
  oxygen = (grid[rng.permutation(len(grid))[:molecules]] + 0.5) * spacing
  oxygen = oxygen + rng.uniform(-WATER_JITTER, WATER_JITTER, oxygen.shape)  # [M, 3]
  half = HOH_ANGLE / 2
  local = OH_BOND * np.array([[np.sin(half), np.cos(half), 0.0], [-np.sin(half), np.cos(half), 0.0]])
  q = rng.normal(size=(molecules, 4))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  w, x, y, z = q.T
  rotation = np.stack([  # [M, 3, 3] from random unit quaternions: uniform orientations
      np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
      np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
      np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)
  hydrogen = oxygen[:, None, :] + np.einsum("mab,hb->mha", rotation, local)  # [M, 2, 3]
  positions = np.concatenate([oxygen[:, None], hydrogen], axis=1).reshape(-1, 3)
  if periodic:
    positions = np.mod(positions, side)
  numbers = np.tile(np.array([OXYGEN, HYDROGEN, HYDROGEN], np.int32), molecules)
  return numbers, positions, side


def synthetic_dataset(path: Path, molecules: int = 12, conformers: int = 4, seed: int = 0) -> Path:
  """A small labelled extxyz dataset for --smoke: random H/C/N/O chains with a pair potential
  (another ``seed``, other molecules)."""
  rng = np.random.default_rng(seed)
  frames = []
  for m in range(molecules):
    n = int(rng.integers(3, 8))
    numbers = np.concatenate([[6], rng.choice([1, 6, 7, 8], n - 1)])
    base = np.cumsum(rng.normal(size=(n, 3)), 0)
    base *= 1.3 / np.maximum(np.linalg.norm(np.diff(base, axis=0), axis=1).min(), 1e-3)
    for _ in range(conformers):
      positions = base + rng.normal(scale=0.08, size=base.shape)
      diff = positions[:, None] - positions[None]
      dist = np.linalg.norm(diff, axis=-1)
      np.fill_diagonal(dist, np.inf)
      pair = 4.0 * np.exp(-dist / 0.8)
      atoms = ase.Atoms(numbers=numbers, positions=positions)
      atoms.info.update(energy=0.5 * pair.sum() - 100.0 * n, molecule=f"mol{m}",
                        config_type="synthetic", charge=0, spin=1 + int(numbers.sum()) % 2)
      atoms.arrays["forces"] = ((pair / 0.8 / dist)[..., None] * diff).sum(1)
      frames.append(atoms)
  ase.io.write(path, frames, format="extxyz")
  return path
