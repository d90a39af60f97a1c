"""``e2former md``: a short molecular dynamics run of a trained checkpoint, plus checkpoint loaders.

The simulation runs in JAX MD (:mod:`e2former_jax.interop.jax_md`), in free space for a molecule or
in a periodic box for a structure file with a lattice (``--structure cell.extxyz``): NVE, or NVT
with a Langevin or Nose-Hoover thermostat. Written to the output folder:

* ``TRAJECTORY_FILENAME``: extended XYZ, one frame every ``record_every`` steps (positions,
  momenta, forces, total potential energy, and ``step``, ``time_fs``, ``kinetic_energy``,
  ``temperature_K``, ``total_energy`` in the frame's info);
* ``PLOT_FILENAME``: potential, kinetic and total energy and the temperature against time;
* ``SUMMARY_FILENAME``: the settings, energy drift, mean temperature and speed.

Checkpoints belong to ``train/``: ``train.checkpoint.load_predictor`` turns one into the
:class:`~e2former_jax.interop.predictor.Predictor` the simulation interfaces consume, and
``train.checkpoint.load_calculator`` into an ASE calculator.

Example::

  e2former md runs/tiny --molecule ethanol --ensemble nvt --temperature 300 --steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.config import AttentionImpl
from e2former_jax.interop.predictor import Predictor
from e2former_jax.structure import Structure, validate_structure

TRAJECTORY_FILENAME = "trajectory.extxyz"
PLOT_FILENAME = "energy.png"
SUMMARY_FILENAME = "md_summary.json"
ENSEMBLES = ("nve", "nvt")
THERMOSTATS = ("langevin", "nose-hoover")
# Up to this many atoms every other atom is a neighbour candidate (one [N, N] distance matrix per
# step); larger systems use a JAX MD cell-list neighbour list.
ALL_PAIRS_MAX_ATOMS = 1024
# Free space around a large system inside the neighbour list's cell-list box (angstrom): atoms
# must stay inside the box, which is checked after every chunk.
BOX_MARGIN = 20.0


def molecule_key(name: str) -> str:
  """The dataset key of a built-in molecule given by name (e.g. "ethanol"); other strings as is.

  Names are those of the hand-curated molecules (``train.data.builtin.molecules``). The built-in
  dataset keys molecules by RDKit's canonical SMILES, so a name needs RDKit.
  """
  from train.data.builtin.molecules import CURATED_MOLECULES, canonical_key

  match = [m for m in CURATED_MOLECULES if m.name.lower() == name.lower()]
  return canonical_key(match[0]) if match else name


def dataset_structure(path: str | Path, molecule: str | None = None, conformer: int = 0
                      ) -> Structure:
  """One geometry of a dataset (SPICE HDF5, extxyz, OMol25 aselmdb).

  Args:
    path: the dataset.
    molecule: a built-in molecule name or a molecule key of the dataset; None = the first record.
    conformer: which of the molecule's records (in file order).

  Raises:
    ValueError: when the molecule or conformer is not in the dataset.
  """
  from train.data.formats import open_dataset

  with open_dataset(path) as dataset:
    if molecule is None:
      index = 0
    else:
      keys = dataset.molecule_keys()
      key = molecule_key(molecule)
      (records,) = np.nonzero(keys == key)
      if not len(records):
        raise ValueError(f"{path}: no molecule {molecule!r} (key {key!r}); first keys: "
                         f"{sorted(set(keys.tolist()))[:10]}")
      if not 0 <= conformer < len(records):
        raise ValueError(f"{path}: molecule {molecule!r} has {len(records)} conformers, asked for "
                         f"conformer {conformer}")
      index = int(records[conformer])
    return dataset.read(index).structure


def read_structure(path: str | Path, *, index: int = 0, charge: int | None = None,
                   spin: int | None = None) -> Structure:
  """Frame ``index`` of a structure file ASE reads (extxyz, xyz, ...); charge/spin from its info."""
  import ase.io

  atoms = ase.io.read(path, index=index)
  return Structure.from_ase(atoms, charge=charge, spin=spin, key=f"{path}@{index}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MDSettings:
  """What to simulate.

  Attributes:
    ensemble: "nve" or "nvt".
    thermostat: NVT thermostat, "langevin" or "nose-hoover".
    temperature_k: initial (Maxwell-Boltzmann velocities) and NVT target temperature in kelvin.
    timestep_fs: integration time step in femtoseconds.
    steps: number of steps (rounded up to a multiple of ``record_every``).
    record_every: steps between recorded frames (also the steps of one compiled chunk).
    friction_per_fs: Langevin friction coefficient in 1/fs.
    tau_fs: Nose-Hoover chain oscillation period in fs.
    seed: random seed of the initial velocities and the Langevin noise.
    float64: run in double precision.
  """

  ensemble: str = "nve"
  thermostat: str = "langevin"
  temperature_k: float = 300.0
  timestep_fs: float = 0.5
  steps: int = 1000
  record_every: int = 10
  friction_per_fs: float = 0.01
  tau_fs: float = 50.0
  seed: int = 0
  float64: bool = False

  def __post_init__(self):
    if self.ensemble not in ENSEMBLES:
      raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
    if self.thermostat not in THERMOSTATS:
      raise ValueError(f"thermostat must be one of {THERMOSTATS}, got {self.thermostat!r}")
    for name in ("timestep_fs", "steps", "record_every", "friction_per_fs", "tau_fs"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.temperature_k < 0:
      raise ValueError(f"temperature_k must be >= 0, got {self.temperature_k}")

  @property
  def label(self) -> str:
    return "nve" if self.ensemble == "nve" else f"nvt-{self.thermostat}"


def simulate(predictor: Predictor, structure: Structure, settings: MDSettings, out_dir: str | Path,
             *, progress: bool = True) -> dict[str, Any]:
  """Runs the simulation and writes the trajectory, the energy plot and the summary to ``out_dir``.

  Returns:
    The summary (also written to ``SUMMARY_FILENAME``).

  Raises:
    ValueError: for a structure the model cannot take (see ``validate_structure``), or a periodic
      cell JAX MD cannot simulate (see :func:`_periodic_box`).
  """
  validate_structure(structure, num_species=predictor.config.num_species)
  if structure.periodic:
    _periodic_box(structure, predictor.config.cutoff)
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if settings.float64:
    with jax.enable_x64(True):
      return _simulate(predictor.with_dtype(jnp.float64), structure, settings, out_dir, progress)
  return _simulate(predictor, structure, settings, out_dir, progress)


def _simulate(predictor: Predictor, structure: Structure, settings: MDSettings, out_dir: Path,
              progress: bool) -> dict[str, Any]:
  from jax_md import simulate as jmd_simulate
  from jax_md import space
  from tqdm import tqdm

  from e2former_jax.interop import jax_md as e2f_md

  dtype = jnp.float64 if settings.float64 else jnp.float32
  species = predictor.check_species(structure.numbers)
  n = len(species)
  reference = predictor.reference_energy(species, structure.charge, structure.spin)
  positions = np.asarray(structure.positions, np.float64)
  free_box, to_cartesian = None, None
  common = dict(charge=structure.charge, spin=structure.spin, include_references=False)
  if structure.periodic:
    # Fractional coordinates in a periodic_general box: JAX MD's cell list handles triclinic cells
    # only this way. Positions are wrapped into the cell; forces and momenta stay Cartesian.
    box = jnp.asarray(_periodic_box(structure, predictor.config.cutoff), dtype)
    displacement, shift = space.periodic_general(box, fractional_coordinates=True)
    positions = np.mod(positions @ np.linalg.inv(structure.cell), 1.0)
    neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(
        displacement, box, predictor, species, periodic=True, fractional_coordinates=True, **common)
    to_cartesian = functools.partial(space.transform, box)
  elif n <= ALL_PAIRS_MAX_ATOMS:
    displacement, shift = space.free()
    neighbor_fn = None
    energy_fn = e2f_md.e2former_energy(displacement, predictor, species, **common)
  else:
    displacement, shift = space.free()
    free_box = float((positions.max(0) - positions.min(0)).max() + 2 * BOX_MARGIN)
    positions = positions - positions.min(0) + BOX_MARGIN
    neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(displacement, free_box, predictor, species,
                                                           **common)
  position = jnp.asarray(positions, dtype)
  neighbors = neighbor_fn.allocate(position) if neighbor_fn is not None else None

  dt = settings.timestep_fs * e2f_md.FEMTOSECOND
  kT = settings.temperature_k * e2f_md.BOLTZMANN
  if settings.ensemble == "nve":
    init_fn, apply_fn = jmd_simulate.nve(energy_fn, shift, dt)
  elif settings.thermostat == "langevin":
    init_fn, apply_fn = jmd_simulate.nvt_langevin(energy_fn, shift, dt, kT,
                                                  gamma=settings.friction_per_fs / e2f_md.FEMTOSECOND)
  else:
    init_fn, apply_fn = jmd_simulate.nvt_nose_hoover(energy_fn, shift, dt, kT,
                                                     tau=settings.tau_fs * e2f_md.FEMTOSECOND)
  mass = e2f_md.masses(species).astype(dtype)

  def observe(state, nbrs):
    kinetic = 0.5 * jnp.sum(state.momentum**2 / state.mass)  # mass is [N, 1] in JAX MD states
    position = state.position if to_cartesian is None else to_cartesian(state.position)
    out = {"potential": energy_fn(state.position, neighbor=nbrs), "kinetic": kinetic,
           "forces": state.force, "position": position, "momentum": state.momentum}
    if settings.ensemble == "nvt" and settings.thermostat == "nose-hoover":
      out["conserved"] = jmd_simulate.nvt_nose_hoover_invariant(energy_fn, state, kT, neighbor=nbrs)
    return out

  chunks = math.ceil(settings.steps / settings.record_every)
  trajectory = out_dir / TRAJECTORY_FILENAME
  trajectory.unlink(missing_ok=True)
  rows = []

  def record(step: int, observation) -> None:
    obs = jax.device_get(observation)
    row = {"step": step, "time_fs": step * settings.timestep_fs,
           "potential_energy": float(obs["potential"]) + reference,
           "kinetic_energy": float(obs["kinetic"]),
           "temperature_K": 2.0 * float(obs["kinetic"]) / (3 * n * e2f_md.BOLTZMANN)}
    row["total_energy"] = row["potential_energy"] + row["kinetic_energy"]
    if "conserved" in obs:
      row["conserved_energy"] = float(obs["conserved"]) + reference
    if not np.isfinite([row["potential_energy"], row["kinetic_energy"]]).all():
      raise FloatingPointError(f"non-finite energy at step {step}: {row}")
    rows.append(row)
    _write_frame(trajectory, species, obs, row, structure.cell if structure.periodic else None)

  @jax.jit
  def start(key, nbrs):  # one compilation for the initial forces and the first frame
    state = init_fn(key, position, kT=kT, mass=mass, neighbor=nbrs)
    return state, observe(state, nbrs)

  state, first = start(jax.random.PRNGKey(settings.seed), neighbors)
  record(0, first)
  bar = tqdm(total=chunks * settings.record_every, unit="step", disable=not progress,
             desc=f"md {settings.label}")
  start = None
  for step, _, _, observation in e2f_md.run(
      apply_fn, state, num_chunks=chunks, steps_per_chunk=settings.record_every,
      neighbors=neighbors, neighbor_fn=neighbor_fn, observe_fn=observe):
    record(step, observation)
    start = start or (time.perf_counter(), step)  # the first chunk includes the compilation
    if free_box is not None:
      _check_inside(np.asarray(observation["position"]), free_box, step)
    bar.update(settings.record_every)
    bar.set_postfix(E_tot=f"{rows[-1]['total_energy']:.4f}", T=f"{rows[-1]['temperature_K']:.0f}")
  bar.close()

  elapsed = time.perf_counter() - start[0]
  timed_steps = rows[-1]["step"] - start[1]
  summary = _summary(rows, settings, structure, n, timed_steps / elapsed if timed_steps else None)
  _plot(rows, out_dir / PLOT_FILENAME, title=f"{structure.key or 'structure'} ({settings.label})")
  summary["files"] = {"trajectory": str(trajectory), "plot": str(out_dir / PLOT_FILENAME)}
  (out_dir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")
  return summary


def _periodic_box(structure: Structure, cutoff: float) -> np.ndarray:
  """JAX MD's box (lattice vectors as columns, upper triangular) of a periodic structure.

  Raises:
    ValueError: unless periodic along all three vectors and in the standard (lower-triangular) cell
      orientation. Cells narrower than twice the cutoff are fine: the JAX MD interface then uses
      its all-images neighbour list (several images of one atom).
  """
  name = f"structure {structure.key!r}"
  if not all(structure.pbc):
    raise ValueError(f"{name}: pbc={structure.pbc}; JAX MD simulates cells periodic along all three "
                     "vectors (or molecules, pbc=False)")
  cell = np.asarray(structure.cell, np.float64)
  if np.abs(np.triu(cell, k=1)).max() > 1e-9 * np.abs(cell).max():
    raise ValueError(f"{name}: cell {cell.round(4).tolist()} is not in the standard orientation "
                     "(a along x, b in the xy plane) JAX MD's cell list needs; rotate it with "
                     "atoms.set_cell(atoms.cell.standard_form()[0], scale_atoms=True)")
  return cell.T


def _write_frame(path: Path, species: np.ndarray, obs, row: dict, cell: np.ndarray | None) -> None:
  import ase
  import ase.io
  from ase.calculators.singlepoint import SinglePointCalculator

  positions = np.asarray(obs["position"], np.float64)
  atoms = ase.Atoms(numbers=species, positions=positions,
                    momenta=np.asarray(obs["momentum"], np.float64), cell=cell,
                    pbc=cell is not None)
  atoms.info.update({k: v for k, v in row.items() if k != "potential_energy"})
  atoms.calc = SinglePointCalculator(atoms, energy=row["potential_energy"],
                                     forces=np.asarray(obs["forces"], np.float64))
  ase.io.write(path, atoms, format="extxyz", append=True)


def _check_inside(positions: np.ndarray, box: float, step: int) -> None:
  if positions.min() < 0 or positions.max() >= box:
    raise RuntimeError(f"step {step}: atoms left the neighbour-list box [0, {box:.1f}) A; rerun with "
                       "fewer steps or a larger BOX_MARGIN")


def _summary(rows: list[dict], settings: MDSettings, structure: Structure, n: int,
             steps_per_s: float | None) -> dict[str, Any]:
  total = np.array([r["total_energy"] for r in rows])
  temperature = np.array([r["temperature_K"] for r in rows])
  summary = {
      "structure": structure.key, "num_atoms": n, "charge": structure.charge, "spin": structure.spin,
      "settings": dataclasses.asdict(settings), "steps": rows[-1]["step"],
      "simulated_fs": rows[-1]["time_fs"],
      "mean_temperature_K": float(temperature[1:].mean()) if len(rows) > 1 else None,
      "steps_per_s": steps_per_s, "backend": jax.default_backend(),
  }
  conserved = total if settings.ensemble == "nve" else (
      np.array([r["conserved_energy"] for r in rows]) if "conserved_energy" in rows[0] else None)
  if conserved is not None:
    # Largest excursion of the conserved quantity from its start, per atom.
    summary["max_drift_eV_per_atom"] = float(np.abs(conserved - conserved[0]).max() / n)
  return summary


def _plot(rows: list[dict], path: Path, *, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = np.array([r["time_fs"] for r in rows])
  e0 = rows[0]["total_energy"]
  fig, (ax_e, ax_t) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
  for key, label in (("potential_energy", "potential - E(0)"), ("kinetic_energy", "kinetic"),
                     ("total_energy", "total - E(0)"),
                     ("conserved_energy", "Nose-Hoover conserved - E(0)")):
    if key in rows[0]:
      values = np.array([r[key] for r in rows])
      ax_e.plot(t, values - (e0 if key != "kinetic_energy" else 0.0), label=label)
  ax_e.set_ylabel("energy (eV)")
  ax_e.set_title(f"E(0) = total energy at t = 0 = {e0:.4f} eV", fontsize="small")
  ax_e.legend(fontsize="small")
  ax_t.plot(t, [r["temperature_K"] for r in rows], color="tab:red")
  ax_t.set_ylabel("temperature (K)")
  ax_t.set_xlabel("time (fs)")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The ``e2former md`` options."""
  parser.add_argument("checkpoint", type=Path, help="a run folder, its checkpoints folder, or .../best|last")
  parser.add_argument("--which", choices=("best", "last"), default=None,
                      help="checkpoint (default: best if present, else last)")
  source = parser.add_mutually_exclusive_group()
  source.add_argument("--molecule", default=None,
                      help="built-in molecule name (e.g. ethanol) or dataset molecule key "
                           "(default: the dataset's first record)")
  source.add_argument("--structure", type=Path, default=None,
                      help="start from a structure file instead (extxyz, xyz, ...; charge/spin from "
                           "its info)")
  parser.add_argument("--conformer", type=int, default=0, help="which conformer of --molecule")
  parser.add_argument("--data", default=None,
                      help="dataset of --molecule (default: the checkpoint's training data, else the "
                           "built-in dataset)")
  parser.add_argument("--index", type=int, default=0, help="frame of --structure")
  parser.add_argument("--charge", type=int, default=None, help="override the total charge")
  parser.add_argument("--spin", type=int, default=None, help="override the spin multiplicity 2S+1")
  parser.add_argument("--ensemble", choices=ENSEMBLES, default="nve")
  parser.add_argument("--thermostat", choices=THERMOSTATS, default="langevin", help="NVT thermostat")
  parser.add_argument("--temperature", type=float, default=300.0,
                      help="initial / target temperature in K")
  parser.add_argument("--timestep", type=float, default=0.5, help="time step in fs")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--record-every", type=int, default=10, help="steps between trajectory frames")
  parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
  parser.add_argument("--tau", type=float, default=50.0, help="Nose-Hoover period in fs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--float64", action="store_true", help="double precision")
  parser.add_argument("--attention-impl", choices=[i.value for i in AttentionImpl],
                      default=AttentionImpl.AUTO.value,
                      help="attention implementation (default auto: pallas on GPU, xla otherwise)")
  parser.add_argument("--remat", action="store_true",
                      help="recompute activations in the force pass: about half the memory, slower "
                           "(large systems)")
  parser.add_argument("--out", type=Path, default=None,
                      help="output folder (default: <run folder>/md/<molecule>_<ensemble>)")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_command(args: argparse.Namespace) -> int:
  """``e2former md``: load the checkpoint, pick the structure, simulate, print the summary."""
  from train.checkpoint import load_checkpoint
  from train.run_data import dataset_path

  params, info = load_checkpoint(args.checkpoint, args.which)
  predictor = info.predictor(params, attention_impl=AttentionImpl(args.attention_impl), remat=args.remat)
  if args.structure is not None:
    structure = read_structure(args.structure, index=args.index, charge=args.charge, spin=args.spin)
  else:
    data = args.data
    if data is None:
      data = dataset_path(info.run_config.data)
    structure = dataset_structure(data, args.molecule, args.conformer)
    if args.charge is not None or args.spin is not None:
      structure = dataclasses.replace(
          structure, charge=structure.charge if args.charge is None else args.charge,
          spin=structure.spin if args.spin is None else args.spin)
  settings = MDSettings(ensemble=args.ensemble, thermostat=args.thermostat,
                        temperature_k=args.temperature, timestep_fs=args.timestep, steps=args.steps,
                        record_every=args.record_every, friction_per_fs=args.friction,
                        tau_fs=args.tau, seed=args.seed, float64=args.float64)
  name = args.molecule or (args.structure.stem if args.structure else structure.key or "structure")
  out = args.out or directory.parent.parent / "md" / f"{_slug(name)}_{settings.label}"
  if not args.quiet:
    print(f"md: {structure.key} ({structure.num_atoms} atoms, charge {structure.charge}, spin "
          f"{structure.spin}), {settings.label}, {settings.steps} x {settings.timestep_fs} fs at "
          f"{settings.temperature_k} K on {jax.default_backend()} -> {out}")
  summary = simulate(predictor, structure, settings, out, progress=not args.quiet)
  if not args.quiet:
    drift = summary.get("max_drift_eV_per_atom")
    print(f"md: {summary['steps']} steps ({summary['simulated_fs']:.1f} fs), mean T "
          f"{summary['mean_temperature_K']:.1f} K"
          + (f", max drift {drift:.2e} eV/atom" if drift is not None else "")
          + (f", {summary['steps_per_s']:.1f} steps/s" if summary["steps_per_s"] else ""))
    print(f"md: wrote {summary['files']['trajectory']}, {summary['files']['plot']}, "
          f"{out / SUMMARY_FILENAME}")
  return 0


def _slug(name: str) -> str:
  """A file-name-safe version of a molecule name or SMILES."""
  return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "structure"
