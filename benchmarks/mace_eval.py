"""Energies and forces of MACE checkpoints on an extxyz file; runs in an interpreter with mace-torch.

Called by ``compare_mace.py`` (which runs in ours): the two need different packages, so they talk
through files. ``--model`` is a whole saved MACE model (``*.model``) that fixes the architecture and
its data statistics; each ``--checkpoint`` (MACE's ``*.pt`` training checkpoints of the same run)
replaces its weights (without checkpoints, the model's own are used). Writes one ``.npz`` per weight set: ``energy`` [configs] in eV and ``forces``
[atoms of all configs, 3] in eV/A, in file order.

  python mace_eval.py --model run.model --xyz test.xyz --out preds/ [--checkpoint a.pt b.pt ...]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import ase.io
import numpy as np
import torch
from mace.calculators import MACECalculator


def predict(model: torch.nn.Module, frames) -> tuple[np.ndarray, np.ndarray]:
  calc = MACECalculator(models=[model], device="cpu", default_dtype="float64")
  energies, forces = [], []
  for atoms in frames:
    atoms = atoms.copy()
    atoms.calc = calc
    energies.append(atoms.get_potential_energy())
    forces.append(atoms.get_forces())
  return np.asarray(energies), np.concatenate(forces)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", type=Path, required=True)
  parser.add_argument("--xyz", type=Path, required=True)
  parser.add_argument("--out", type=Path, required=True)
  parser.add_argument("--checkpoint", type=Path, nargs="*", default=[])
  args = parser.parse_args()
  torch.set_default_dtype(torch.float64)
  frames = ase.io.read(args.xyz, index=":")
  base = torch.load(args.model, map_location="cpu", weights_only=False).double()
  args.out.mkdir(parents=True, exist_ok=True)
  weight_sets = [(c.stem, c) for c in args.checkpoint] or [(args.model.stem, None)]
  for name, checkpoint in weight_sets:
    model = copy.deepcopy(base)
    if checkpoint is not None:
      state = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
      model.load_state_dict(state)
    energy, forces = predict(model.double(), frames)
    np.savez(args.out / f"{name}.npz", energy=energy, forces=forces)
    print(f"{name}: {len(energy)} configurations", flush=True)


if __name__ == "__main__":
  main()
