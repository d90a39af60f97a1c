"""Where a model's force errors on radicals sit: per-atom force MAE by bond distance from the radical centre.

The main command's model is weakest on radicals' forces (README, docs/decisions.md D19). This splits
that error by where the atoms are: each radical of a SPICE-format HDF5 file (the built-in data and
its held-out build carry mapped SMILES, whose atom map numbers give the row of each atom) has its
radical centres (atoms with unpaired electrons in the SMILES), and every atom's force error
(-dE/dx, mean absolute over its three components) is filed under its number of bonds to the nearest
centre (0 = the centre, DISTANCES[-1] and beyond together). A model that has learnt radicals' chemistry
should come close to its error on closed-shell molecules at the centre too. The molecules' force MAE
is also reported by the kind of their radical centre: its element, and whether it is aromatic (a
sigma radical on a ring atom) or has a conjugated bond (vinyl, acyl, allyl-like).

  python -m benchmarks.radical_sites runs/tiny --data ~/.cache/e2former_jax/builtin-v2-heldout/builtin_gfn2xtb.hdf5
  python -m benchmarks.radical_sites --smoke    # random weights on the small built-in build (~1 min)

Records the case "<run folder name> on <data file's folder name>" with ``benchmarks/report.py``.
Needs RDKit (the ``chem`` extra; the smoke run builds data with tblite too).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import report
from e2former_jax import E2Former, Structure, build_graph, energy_and_forces, tiny_config
from e2former_jax.interop.predictor import Predictor
from train.checkpoint import load_predictor
from train.data.units import BOHR_A, HARTREE_EV

BENCHMARK = "radical_sites"
# Bond distances reported on their own; the last one gathers everything at least that far.
DISTANCES = (0, 1, 2, 3, 4)
# Atom slots are padded to a multiple of this, so that molecules of similar size share a compilation.
NODE_BUCKET = 16


def centre_kind(atom) -> str:
  """'C', 'C aromatic', 'C conjugated', 'N', ...: a radical centre's element and bonding."""
  if atom.GetIsAromatic():
    return f"{atom.GetSymbol()} aromatic"
  if any(bond.GetIsConjugated() for bond in atom.GetBonds()):
    return f"{atom.GetSymbol()} conjugated"
  return atom.GetSymbol()


def radical_molecules(path: Path):
  """(numbers [n], positions [M, n, 3] A, forces [M, n, 3] eV/A, charge, multiplicity, distance [n],
  kind) of each open-shell molecule of ``path`` (spin multiplicity > 1) whose SMILES places its unpaired
  electrons (kind: its centres' kinds, '+'-joined)."""
  from rdkit import Chem

  params = Chem.SmilesParserParams()
  params.removeHs = False  # every atom keeps its map number: the HDF5 row
  with h5py.File(path, "r") as file:
    for group in file.values():
      multiplicity = int(group["spin_multiplicity"][0])
      if multiplicity == 1:
        continue
      smiles = group["smiles"][0]
      smiles = smiles.decode() if isinstance(smiles, bytes) else smiles
      # Sanitised: without it, RDKit gives an aromatic sulfur (thiophene) an unpaired electron.
      mol = Chem.MolFromSmiles(smiles, params)
      if mol is None:
        raise ValueError(f"{path}: group {group.name}: RDKit cannot parse its SMILES {smiles!r}")
      centres = [atom.GetIdx() for atom in mol.GetAtoms() if atom.GetNumRadicalElectrons()]
      if not centres:
        continue
      row = np.array([atom.GetAtomMapNum() - 1 for atom in mol.GetAtoms()])  # HDF5 row of each atom
      hops = Chem.GetDistanceMatrix(mol)[:, centres].min(axis=1)
      distance = np.empty(len(row), int)
      distance[row] = np.minimum(hops, DISTANCES[-1]).astype(int)
      yield (group["atomic_numbers"][()].astype(int), group["conformations"][()] * BOHR_A,
             -group["dft_total_gradient"][()] * (HARTREE_EV / BOHR_A), int(group["total_charge"][0]),
             multiplicity, distance,
             "+".join(sorted({centre_kind(mol.GetAtomWithIdx(i)) for i in centres})))


def measure(predictor: Predictor, data: Path) -> dict:
  config = predictor.config
  forces_of = jax.jit(lambda params, graph: energy_and_forces(predictor.model, params, graph)[1])
  errors = {d: [] for d in DISTANCES}
  by_kind: dict[str, list[float]] = {}  # per molecule: its force MAE over atoms and geometries
  for numbers, positions, forces, charge, multiplicity, distance, kind in radical_molecules(data):
    molecule_errors = []
    n = len(numbers)
    for geometry, target in zip(positions, forces):
      graph = build_graph([Structure(numbers=numbers, positions=geometry, charge=charge, spin=multiplicity)],
                          cutoff=config.cutoff, max_neighbors=config.max_neighbors,
                          num_nodes=-(-(n + 1) // NODE_BUCKET) * NODE_BUCKET, num_molecules=2)
      error = np.abs(np.asarray(forces_of(predictor.params, jax.tree.map(jnp.asarray, graph)))[:n] - target)
      for d in DISTANCES:
        errors[d].extend(error[distance == d].mean(axis=1))
      molecule_errors.append(error.mean())
    by_kind.setdefault(kind, []).append(float(np.mean(molecule_errors)))
  return {"molecules": sum(len(v) for v in by_kind.values()),
          "force_mae_mev_per_a": {d: 1e3 * float(np.mean(errors[d])) for d in DISTANCES if errors[d]},
          "atoms": {d: len(errors[d]) for d in DISTANCES},
          "by_centre": {kind: {"molecules": len(v), "force_mae_mev_per_a": 1e3 * float(np.mean(v))}
                        for kind, v in by_kind.items()}}


def result_line(data: dict) -> str:
  mae = data["force_mae_mev_per_a"]
  parts = [f"{'centre' if d == 0 else f'{d} bond' + ('s' if d > 1 else '')}"
           f"{' or more' if d == DISTANCES[-1] else ''} {mae[d]:.0f}" for d in DISTANCES if d in mae]
  kinds = sorted(data["by_centre"].items(), key=lambda kv: -kv[1]["force_mae_mev_per_a"])
  by_kind = "; ".join(f"{kind} {v['force_mae_mev_per_a']:.0f} ({v['molecules']})" for kind, v in kinds)
  return (f"force MAE (-dE/dx, meV/Å) by distance from the radical centre: {'; '.join(parts)} "
          f"({data['molecules']} radicals); by centre (molecules): {by_kind}")


def smoke_inputs(folder: Path) -> tuple[Predictor, Path]:
  """Random weights of the tiny model and the small built-in build (one radical among its molecules)."""
  from train.data.builtin import HDF5_FILENAME, BuiltinSize, build_builtin_dataset

  data = build_builtin_dataset(folder / "small", size=BuiltinSize.SMALL, progress=False) / HDF5_FILENAME
  model = E2Former(tiny_config())
  graph = build_graph([Structure(numbers=np.array([8, 1]), positions=np.array([[0.0, 0, 0], [0.97, 0, 0]]))],
                      cutoff=model.config.cutoff, max_neighbors=model.config.max_neighbors)
  return Predictor(model, model.init(jax.random.key(0), jax.tree.map(jnp.asarray, graph))), data


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("run", type=Path, nargs="?", help="a run folder (its best checkpoint is scored)")
  parser.add_argument("--data", type=Path, help="SPICE-format HDF5 with mapped SMILES")
  parser.add_argument("--smoke", action="store_true", help=smoke_inputs.__doc__)
  parser.add_argument("--results", type=Path, default=report.BENCHMARKS_DIR)
  parser.add_argument("--commit", default=None, help="the measured commit (default: git's)")
  return parser


def main(argv=None) -> None:
  parser = build_parser()
  args = parser.parse_args(argv)
  if not args.smoke and (args.run is None or args.data is None):
    parser.error("give a run folder and --data (or --smoke)")
  with tempfile.TemporaryDirectory() as scratch:
    if args.smoke:
      predictor, data_path = smoke_inputs(Path(scratch))
      case = "smoke"
    else:
      predictor, data_path = load_predictor(args.run), args.data
      case = f"{args.run.name} on {args.data.parent.name}"
    data = measure(predictor, data_path)
  record = report.Record(case, result_line(data), report.device_name(jax.devices()[0]),
                         args.commit or report.git_commit(), report.today(), data)
  report.record(BENCHMARK, [record], args.results)
  print(f"{case}: {record.result}")


if __name__ == "__main__":
  main()
