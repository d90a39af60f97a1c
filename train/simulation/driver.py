"""Molecular dynamics of a :class:`~e2former_jax.interop.predictor.Predictor` in JAX MD.

:func:`simulate` runs one structure (:mod:`e2former_jax.interop.jax_md`), in free space for a
molecule or in a periodic box for a structure with a lattice: NVE, or NVT with a Langevin or
Nose-Hoover thermostat (:class:`MDSettings`). It compiles ``record_every`` steps as one chunk and,
after each, records a frame: appended to the trajectory (:mod:`~train.simulation.trajectory`) and
checked by the watchdog (:mod:`~train.simulation.watchdog`: bonds broken or formed, atoms too
close, temperature or energy running away; printed as warnings as they happen, or ending the run
with ``OnUnphysical.STOP``). At the end it writes the energy plot (:mod:`~train.simulation.plot`)
and ``SUMMARY_FILENAME``: the settings, energy drift, mean temperature and speed, and what the
watchdog found."""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.interop.predictor import Predictor
from e2former_jax.structure import Structure, validate_structure
from train.simulation.plot import PLOT_FILENAME, plot_energies
from train.simulation.relax import DEFAULT_FMAX, relax
from train.simulation.trajectory import TRAJECTORY_FILENAME, append_frame
from train.simulation.watchdog import OnUnphysical, Watchdog, report_line

SUMMARY_FILENAME = "md_summary.json"
# Up to this many atoms every other atom is a neighbour candidate (one [N, N] distance matrix per
# step); larger systems use a JAX MD cell-list neighbour list.
ALL_PAIRS_MAX_ATOMS = 1024


class Ensemble(enum.Enum):
  """What the simulation holds constant."""

  NVE = "nve"  # energy: plain velocity Verlet
  NVT = "nvt"  # temperature: a thermostat (``Thermostat``)


class Thermostat(enum.Enum):
  """How an NVT simulation holds its temperature."""

  LANGEVIN = "langevin"  # friction and noise on every atom
  NOSE_HOOVER = "nose-hoover"  # a Nose-Hoover chain (deterministic, with a conserved quantity)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MDSettings:
  """What to simulate.

  Attributes:
    ensemble: NVE or NVT.
    thermostat: the NVT thermostat (an NVE run has none to use).
    temperature_k: initial (Maxwell-Boltzmann velocities) and NVT target temperature in kelvin.
    timestep_fs: integration time step in femtoseconds.
    steps: number of steps (rounded up to a multiple of ``record_every``).
    record_every: steps between recorded frames (also the steps of one compiled chunk).
    friction_per_fs: Langevin friction coefficient in 1/fs.
    tau_fs: Nose-Hoover chain oscillation period in fs.
    seed: random seed of the initial velocities and the Langevin noise.
    float64: run in double precision.
    relax_fmax: first relax the structure on the model's energy surface until no force component
      exceeds this (eV/Å; ``train.simulation.relax``); None starts from the structure as given.
  """

  ensemble: Ensemble = Ensemble.NVE
  thermostat: Thermostat = Thermostat.LANGEVIN
  temperature_k: float = 300.0
  timestep_fs: float = 0.5
  steps: int = 1000
  record_every: int = 10
  friction_per_fs: float = 0.01
  tau_fs: float = 50.0
  seed: int = 0
  float64: bool = False
  relax_fmax: float | None = DEFAULT_FMAX

  def __post_init__(self):
    for name, kind in (("ensemble", Ensemble), ("thermostat", Thermostat)):
      if not isinstance(getattr(self, name), kind):
        raise ValueError(f"{name} must be one of {', '.join(map(str, kind))}; got "
                         f"{getattr(self, name)!r}")
    for name in ("timestep_fs", "steps", "record_every", "friction_per_fs", "tau_fs"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.temperature_k < 0:
      raise ValueError(f"temperature_k must be >= 0, got {self.temperature_k}")
    if self.relax_fmax is not None and not self.relax_fmax > 0:
      raise ValueError(f"relax_fmax must be positive or None, got {self.relax_fmax}")

  @property
  def label(self) -> str:
    """The run's name: nve, nvt-langevin or nvt-nose-hoover (file names, progress bar)."""
    if self.ensemble is Ensemble.NVE:
      return self.ensemble.value
    return f"{self.ensemble.value}-{self.thermostat.value}"

  def to_json(self) -> dict[str, Any]:
    """The settings as JSON values (enums by value), as the summary lists them."""
    values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
    return {name: v.value if isinstance(v, enum.Enum) else v for name, v in values.items()}


def simulate(predictor: Predictor, structure: Structure, settings: MDSettings, out_dir: str | Path,
             *, progress: bool = True, on_unphysical: OnUnphysical = OnUnphysical.WARN
             ) -> dict[str, Any]:
  """Runs the simulation and writes the trajectory, the energy plot and the summary to ``out_dir``.

  Unless ``settings.relax_fmax`` is None, the structure is first relaxed on the model's energy
  surface (:func:`train.simulation.relax.relax`; the summary's ``relaxation``) and the simulation
  starts there. Every recorded frame is checked by a :class:`~train.simulation.watchdog.Watchdog`
  (bonds against the start): its findings
  are printed (stderr) and listed in the summary's ``watchdog``; with ``OnUnphysical.STOP`` the run
  ends at the first finding (the summary's ``stopped_at_step``).

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
  relaxation = None
  if settings.relax_fmax is not None:
    structure, relaxation = relax(predictor, structure, fmax=settings.relax_fmax)
  if settings.float64:
    with jax.enable_x64(True):
      return _simulate(predictor.with_dtype(jnp.float64), structure, settings, out_dir, progress,
                       on_unphysical, relaxation)
  return _simulate(predictor, structure, settings, out_dir, progress, on_unphysical, relaxation)


def _simulate(predictor: Predictor, structure: Structure, settings: MDSettings, out_dir: Path,
              progress: bool, on_unphysical: OnUnphysical, relaxation: dict[str, Any] | None
              ) -> dict[str, Any]:
  from jax_md import simulate as jmd_simulate
  from jax_md import space
  from tqdm import tqdm

  from e2former_jax.interop import jax_md as e2f_md
  from train.progress import SteadyProgress

  dtype = jnp.float64 if settings.float64 else jnp.float32
  species = predictor.check_species(structure.numbers)
  n = len(species)
  reference = predictor.reference_energy(species, structure.charge, structure.spin)
  positions = np.asarray(structure.positions, np.float64)
  watchdog = Watchdog(species, positions, temperature_k=settings.temperature_k,
                      cell=structure.cell if structure.periodic else None, pbc=structure.pbc)
  to_cartesian = None
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
    neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(displacement, None, predictor, species,
                                                           **common)
  position = jnp.asarray(positions, dtype)
  neighbors = neighbor_fn.allocate(position) if neighbor_fn is not None else None

  dt = settings.timestep_fs * e2f_md.FEMTOSECOND
  kT = settings.temperature_k * e2f_md.BOLTZMANN
  if settings.ensemble is Ensemble.NVE:
    init_fn, apply_fn = jmd_simulate.nve(energy_fn, shift, dt)
  elif settings.thermostat is Thermostat.LANGEVIN:
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
    if settings.ensemble is Ensemble.NVT and settings.thermostat is Thermostat.NOSE_HOOVER:
      out["conserved"] = jmd_simulate.nvt_nose_hoover_invariant(energy_fn, state, kT, neighbor=nbrs)
    return out

  chunks = math.ceil(settings.steps / settings.record_every)
  trajectory = out_dir / TRAJECTORY_FILENAME
  trajectory.unlink(missing_ok=True)
  rows, findings = [], []

  def record(step: int, observation) -> bool:
    """Writes the frame; True when the watchdog found something and the run is to stop."""
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
    append_frame(trajectory, species, obs, row, structure.cell if structure.periodic else None)
    conserved = (row["total_energy"] if settings.ensemble is Ensemble.NVE
                 else row.get("conserved_energy"))
    events = watchdog.check(step, obs["position"], temperature_k=row["temperature_K"],
                            conserved_energy=conserved)
    if events:
      tqdm.write(f"warning: {report_line(step, row['time_fs'], events)}", file=sys.stderr)
      findings.extend(events)
    return bool(events) and on_unphysical is OnUnphysical.STOP

  @jax.jit
  def start(key, nbrs):  # one compilation for the initial forces and the first frame
    state = init_fn(key, position, kT=kT, mass=mass, neighbor=nbrs)
    return state, observe(state, nbrs)

  state, first = start(jax.random.PRNGKey(settings.seed), neighbors)
  stop = record(0, first)
  bar = SteadyProgress(total=chunks * settings.record_every, disable=not progress or stop,
                       desc=f"md {settings.label} ")
  start = None
  chunks_run = e2f_md.run(apply_fn, state, num_chunks=0 if stop else chunks,
                          steps_per_chunk=settings.record_every, neighbors=neighbors,
                          neighbor_fn=neighbor_fn, observe_fn=observe)
  for step, _, _, observation in chunks_run:
    stop = record(step, observation)
    start = start or (time.perf_counter(), step)  # the first chunk includes the compilation
    bar.update(settings.record_every, E_tot=f"{rows[-1]['total_energy']:.4f}",
               T=f"{rows[-1]['temperature_K']:.0f}")
    if stop:
      break
  bar.close()

  elapsed = time.perf_counter() - start[0] if start else 0.0
  timed_steps = rows[-1]["step"] - start[1] if start else 0
  summary = _summary(rows, settings, structure, n, timed_steps / elapsed if timed_steps else None)
  if relaxation is not None:
    summary["relaxation"] = relaxation
  summary["watchdog"] = [event.to_dict() for event in findings]
  # Over every recorded frame: the largest relative change of a start bond's length.
  summary["max_bond_change"] = {"relative": watchdog.max_bond_change, "bond": watchdog.max_bond_change_pair}
  if stop:
    summary["stopped_at_step"] = rows[-1]["step"]
  plot_energies(rows, out_dir / PLOT_FILENAME,
                title=f"{structure.key or 'structure'} ({settings.label})")
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


def _summary(rows: list[dict], settings: MDSettings, structure: Structure, n: int,
             steps_per_s: float | None) -> dict[str, Any]:
  total = np.array([r["total_energy"] for r in rows])
  temperature = np.array([r["temperature_K"] for r in rows])
  summary = {
      "structure": structure.key, "num_atoms": n, "charge": structure.charge, "spin": structure.spin,
      "settings": settings.to_json(), "steps": rows[-1]["step"],
      "simulated_fs": rows[-1]["time_fs"],
      "mean_temperature_K": float(temperature[1:].mean()) if len(rows) > 1 else None,
      "steps_per_s": steps_per_s, "backend": jax.default_backend(),
  }
  conserved = total if settings.ensemble is Ensemble.NVE else (
      np.array([r["conserved_energy"] for r in rows]) if "conserved_energy" in rows[0] else None)
  if conserved is not None:
    # Largest excursion of the conserved quantity from its start, per atom.
    summary["max_drift_eV_per_atom"] = float(np.abs(conserved - conserved[0]).max() / n)
  return summary
