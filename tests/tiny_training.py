"""The tiny training run the training tests share: a synthetic SPICE-layout dataset, the overrides."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from train.data.splits import split_by_molecule
from train.data.units import BOHR_A, HARTREE_EV
from train.run_data import SPLITS

SUBSETS = ("alpha", "beta")
NUM_MOLECULES = 16
CONFORMERS = 4
SPLIT = (0.5, 0.25, 0.25)
SPLIT_SEED = 12345

# The tiny run every training test shares: same shapes and constants (the schedule's horizon
# included), so one compilation serves all through the persistent cache.
TINY = [
    "model.preset=tiny", "model.num_layers=1", "model.channels=8", "model.num_heads=2",
    "model.head_dim=4", "model.num_rbf=8", "model.max_neighbors=8", "model.edge_hidden=8",
    "model.type_embed_dim=4", "loss.forces=direct", "loss.energy_weight=1", "loss.force_weight=1",
    "data.atoms_per_batch=32", "data.molecules_per_batch=6", "data.prefetch=1",
    "data.batches_per_step=4", f"data.split={list(SPLIT)}", f"data.split_seed={SPLIT_SEED}",
    "optim.lr=5e-3", "optim.warmup_steps=2", "optim.weight_decay=0", "optim.decay_steps=30",
    "optim.ema_decay=0.9", "train.log_every=1", "train.seed=0",
]


def _pair_energy_forces(numbers, positions):
  """A smooth repulsive pair potential plus per-element offsets (eV, eV/A): learnable labels."""
  offsets = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}
  diff = positions[:, None] - positions[None]  # [n, n, 3]
  dist = np.linalg.norm(diff, axis=-1)
  np.fill_diagonal(dist, np.inf)
  pair = 4.0 * np.exp(-dist / 0.8)  # [n, n]
  energy = 0.5 * pair.sum() + sum(offsets[int(z)] for z in numbers)
  forces = ((pair / 0.8 / dist)[..., None] * diff).sum(1)  # -dE/dx_i
  return energy, forces


def write_dataset(path: Path, seed: int = 0, num_molecules: int = NUM_MOLECULES) -> Path:
  """Random small molecules (3-8 atoms, H/C/N/O), several perturbed conformers each, SPICE layout.

  Subsets alternate within each split of the run's molecule-level split, so every split has both.
  """
  rng = np.random.default_rng(seed)
  keys = [f"mol{m:02d}" for m in range(num_molecules)]
  splits = split_by_molecule(keys, seed=SPLIT_SEED, fractions=dict(zip(SPLITS, SPLIT)))
  subset_of = {int(m): SUBSETS[i % 2] for members in splits.values() for i, m in enumerate(members)}
  with h5py.File(path, "w") as f:
    for m in range(num_molecules):
      n = int(rng.integers(3, 9))
      numbers = rng.choice([1, 6, 7, 8], n)
      base = np.cumsum(rng.normal(size=(n, 3)), 0)
      base *= 1.3 / np.maximum(np.linalg.norm(np.diff(base, axis=0), axis=1).min(), 1e-3)
      confs, energies, grads = [], [], []
      for _ in range(CONFORMERS):
        pos = base + rng.normal(scale=0.08, size=base.shape)
        e, f_ = _pair_energy_forces(numbers, pos)
        confs.append(pos / BOHR_A)
        energies.append(e / HARTREE_EV)
        grads.append(-f_ / HARTREE_EV * BOHR_A)
      g = f.create_group(keys[m])
      g["atomic_numbers"] = numbers.astype(np.int16)
      g["conformations"] = np.asarray(confs, np.float32)
      g["dft_total_energy"] = np.asarray(energies)
      g["dft_total_gradient"] = np.asarray(grads, np.float32)
      g["total_charge"] = np.array([0], np.int16)
      g["spin_multiplicity"] = np.array([1 + int(numbers.sum()) % 2], np.int16)
      g["subset"] = np.array([subset_of[m].encode()])
  return path
