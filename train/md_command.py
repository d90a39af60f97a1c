"""``e2former md``: a short molecular dynamics run of a trained checkpoint (the command line of
:mod:`train.simulation`).

It loads the checkpoint (``train.checkpoint``), takes the start geometry from a dataset (by default
the run's training data) or a structure file, runs :func:`train.simulation.simulate` and prints the
summary. Output folder: ``--out``, by default ``<run folder>/md/<molecule>_<ensemble>``.

Example::

  e2former md runs/tiny --molecule ethanol --ensemble nvt --temperature 300 --steps 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import jax

from e2former_jax.config import AttentionImpl, Precision
from train.simulation import (SUMMARY_FILENAME, Ensemble, MDSettings, OnUnphysical, Thermostat,
                              dataset_structure, read_structure, simulate)
from train.simulation.relax import DEFAULT_FMAX

MD_DIRNAME = "md"


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
  parser.add_argument("--ensemble", choices=[e.value for e in Ensemble], default=Ensemble.NVE.value)
  parser.add_argument("--thermostat", choices=[t.value for t in Thermostat],
                      default=Thermostat.LANGEVIN.value, help="NVT thermostat")
  parser.add_argument("--temperature", type=float, default=300.0,
                      help="initial / target temperature in K")
  parser.add_argument("--timestep", type=float, default=0.5, help="time step in fs")
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--record-every", type=int, default=10, help="steps between trajectory frames")
  parser.add_argument("--friction", type=float, default=0.01, help="Langevin friction in 1/fs")
  parser.add_argument("--tau", type=float, default=50.0, help="Nose-Hoover period in fs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--float64", action="store_true",
                      help="double precision everywhere (implies --precision full)")
  relax = parser.add_mutually_exclusive_group()
  relax.add_argument("--relax-fmax", type=float, default=DEFAULT_FMAX,
                     help="first relax the structure with the model until no force component exceeds "
                          "this (eV/A)")
  relax.add_argument("--no-relax", action="store_true",
                     help="start from the structure as given (e.g. one relaxed already)")
  parser.add_argument("--attention-impl", choices=[i.value for i in AttentionImpl],
                      default=AttentionImpl.AUTO.value,
                      help="attention implementation (default auto: pallas on GPU, xla otherwise)")
  parser.add_argument("--precision", choices=[p.value for p in Precision], default=None,
                      help="number format of the network (default: the run's, auto = mixed precision "
                           "on GPU, float32 otherwise; full = float32 everywhere)")
  parser.add_argument("--remat", action="store_true",
                      help="recompute activations in the force pass: about half the memory, slower "
                           "(large systems)")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"output folder (default: <run>/{MD_DIRNAME}/<molecule>_<ensemble>)")
  parser.add_argument("--on-unphysical", choices=[o.value for o in OnUnphysical],
                      default=OnUnphysical.WARN.value,
                      help="when a bond breaks or forms, atoms come too close or the temperature or "
                           "energy runs away: print a warning and go on, or stop the run there")
  parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run_command(args: argparse.Namespace) -> int:
  """``e2former md``: load the checkpoint, pick the structure, simulate, print the summary."""
  from train.checkpoint import load_checkpoint, resolve_checkpoint_dir
  from train.run_data import dataset_path

  checkpoint = resolve_checkpoint_dir(args.checkpoint, args.which)  # <run>/checkpoints/<which>
  params, info = load_checkpoint(checkpoint)
  predictor = info.predictor(params, attention_impl=AttentionImpl(args.attention_impl), remat=args.remat,
                             precision=Precision(args.precision) if args.precision else None)
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
  settings = MDSettings(ensemble=Ensemble(args.ensemble), thermostat=Thermostat(args.thermostat),
                        temperature_k=args.temperature, timestep_fs=args.timestep, steps=args.steps,
                        record_every=args.record_every, friction_per_fs=args.friction,
                        tau_fs=args.tau, seed=args.seed, float64=args.float64,
                        relax_fmax=None if args.no_relax else args.relax_fmax)
  name = args.molecule or (args.structure.stem if args.structure else structure.key or "structure")
  out = args.out or checkpoint.parent.parent / MD_DIRNAME / f"{_slug(name)}_{settings.label}"
  if not args.quiet:
    print(f"md: {structure.key} ({structure.num_atoms} atoms, charge {structure.charge}, spin "
          f"{structure.spin}), {settings.label}, {settings.steps} x {settings.timestep_fs} fs at "
          f"{settings.temperature_k} K on {jax.default_backend()} -> {out}")
  summary = simulate(predictor, structure, settings, out, progress=not args.quiet,
                     on_unphysical=OnUnphysical(args.on_unphysical))
  if "stopped_at_step" in summary:
    print(f"md: stopped at step {summary['stopped_at_step']} (--on-unphysical stop); the trajectory up "
          f"to it is in {summary['files']['trajectory']}", file=sys.stderr)
    return 1
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
