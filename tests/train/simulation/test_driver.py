"""``simulate`` with a harmonic spring in place of the network: the watchdog stops a run at the step
a bond breaks (known in closed form) and stays silent on a healthy one; settings and cells it
refuses."""

from __future__ import annotations

import dataclasses

import ase
import ase.io
import ase.units
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax.config import tiny_config
from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import build_graph
from e2former_jax.nn.model import E2Former
from e2former_jax.structure import Structure
from train.simulation import (TRAJECTORY_FILENAME, Ensemble, MDSettings, OnUnphysical, Thermostat,
                              simulate)
from train.simulation.relax import relax
from train.simulation.watchdog import BREAK_FACTOR, TEMPERATURE_FACTOR

MICRO = dict(num_layers=1, channels=8, num_heads=2, head_dim=4, num_rbf=8, max_neighbors=8,
             edge_hidden=8, type_embed_dim=4)


@dataclasses.dataclass(frozen=True, eq=False)
class _SpringPredictor(Predictor):
  """A diatomic held by a harmonic spring E = k/2 (d - d0)^2 in place of the network."""

  rest_length: float = 1.0
  stiffness: float = 1.0  # eV/A^2

  def model_energy(self, graph):
    d = jnp.linalg.norm(graph.positions[0] - graph.positions[1])
    return (0.5 * self.stiffness * (d - self.rest_length) ** 2)[None]


def _spring(rest_length: float, stiffness: float) -> _SpringPredictor:
  return _SpringPredictor(model=E2Former(tiny_config(**MICRO)), params={}, rest_length=rest_length,
                          stiffness=stiffness)


# A C-O pair 1.1 A apart (covalent radii 0.76 + 0.66 A) released at rest from a spring whose rest
# length is 3 A: d(t) = 3 - 1.9 cos(w t), w = sqrt(k / mu). The spring is soft enough that the
# temperature stays below the watchdog's 600 K until the bond breaks (1.5 x 1.42 A, ~130 fs).
CO_START, PULL_REST_LENGTH, PULL_STIFFNESS = 1.1, 3.0, 0.05
MD_TIMESTEP_FS, MD_RECORD_EVERY = 1.0, 5
# Tight enough to show convergence, loose enough for a random-weight model's few FIRE steps.
RELAX_FMAX = 0.05


def test_watchdog_stops_md_at_the_step_a_bond_breaks(tmp_path):
  structure = Structure(numbers=np.array([6, 8]), positions=np.array([[0.0, 0, 0], [CO_START, 0, 0]]))
  settings = MDSettings(temperature_k=0.0, timestep_fs=MD_TIMESTEP_FS, steps=400,
                        record_every=MD_RECORD_EVERY, float64=True, relax_fmax=None)
  summary = simulate(_spring(PULL_REST_LENGTH, PULL_STIFFNESS), structure, settings, tmp_path,
                     progress=False, on_unphysical=OnUnphysical.STOP)
  masses = ase.Atoms("CO").get_masses()
  omega = np.sqrt(PULL_STIFFNESS / (masses.prod() / masses.sum())) * ase.units.fs  # 1/fs
  steps = np.arange(0, 400, MD_RECORD_EVERY)
  distance = PULL_REST_LENGTH - (PULL_REST_LENGTH - CO_START) * np.cos(omega * steps * MD_TIMESTEP_FS)
  expected = int(steps[np.argmax(distance > BREAK_FACTOR * (0.76 + 0.66))])
  assert [(e["step"], e["finding"], e["atoms"]) for e in summary["watchdog"]] == [
      (expected, "bond_broken", [0, 1])]
  assert summary["stopped_at_step"] == expected
  frames = ase.io.read(tmp_path / TRAJECTORY_FILENAME, index=":")
  assert frames[-1].info["step"] == expected  # the trajectory ends there
  np.testing.assert_allclose(frames[-1].get_distance(0, 1), distance[steps == expected], rtol=1e-4)


def test_watchdog_stays_silent_on_a_healthy_run(tmp_path, capsys):
  structure = Structure(numbers=np.array([6, 8]), positions=np.array([[0.0, 0, 0], [1.13, 0, 0]]))
  settings = MDSettings(temperature_k=300.0, timestep_fs=0.25, steps=400, record_every=10,
                        float64=True, relax_fmax=None)
  summary = simulate(_spring(1.13, 30.0), structure, settings, tmp_path, progress=False)
  frames = ase.io.read(tmp_path / TRAJECTORY_FILENAME, index=":")
  # NVE from the rest length: the temperature never exceeds its start, which must be below the limit.
  assert frames[0].info["temperature_K"] < TEMPERATURE_FACTOR * 300.0
  assert summary["watchdog"] == [] and "stopped_at_step" not in summary
  assert summary["settings"]["ensemble"] == "nve"  # enums by value
  assert capsys.readouterr().err == ""
  lengths = np.array([f.get_distance(0, 1) for f in frames])
  assert np.ptp(lengths) > 0.01  # it does vibrate
  # The summary's largest bond change is the recorded frames' largest |d / d_start - 1|.
  assert summary["max_bond_change"]["relative"] == pytest.approx(np.abs(lengths / 1.13 - 1).max(), rel=1e-6)
  assert summary["max_bond_change"]["bond"] == "C0-O1"


def test_settings_take_enums():
  assert MDSettings(ensemble=Ensemble.NVT, thermostat=Thermostat.NOSE_HOOVER).label == \
      "nvt-nose-hoover"
  assert MDSettings().label == "nve"
  with pytest.raises(ValueError, match="ensemble must be one of Ensemble.NVE, Ensemble.NVT; got"):
    MDSettings(ensemble="nvt")
  with pytest.raises(ValueError, match="steps must be positive"):
    MDSettings(steps=0)
  with pytest.raises(ValueError, match="relax_fmax must be positive or None"):
    MDSettings(relax_fmax=0.0)


def test_simulation_starts_from_the_structure_relaxed_on_the_model(tmp_path):
  """A stretched C-O under a random-weight model: FIRE lowers the energy until no force component
  exceeds relax_fmax, and the first frame of the trajectory is the relaxed geometry."""
  model = E2Former(tiny_config(**MICRO))
  structure = Structure(numbers=np.array([6, 8, 1]),
                        positions=np.array([[0.0, 0, 0], [1.6, 0, 0], [-1.0, 0.3, 0]]), spin=2)
  graph = build_graph([structure], cutoff=model.config.cutoff, max_neighbors=model.config.max_neighbors)
  params = model.init(jax.random.key(3), jax.tree.map(jnp.asarray, graph))
  predictor = Predictor(model=model, params=params)
  relaxed, record = relax(predictor, structure, fmax=RELAX_FMAX)
  assert record["converged"] and record["final_fmax_eV_per_A"] <= RELAX_FMAX
  assert record["energy_drop_eV"] > 0 and record["rmsd_A"] > 0
  settings = MDSettings(temperature_k=0.0, steps=10, record_every=10, float64=True,
                        relax_fmax=RELAX_FMAX)
  summary = simulate(predictor, structure, settings, tmp_path, progress=False)
  assert summary["relaxation"] == pytest.approx(record)
  frames = ase.io.read(tmp_path / TRAJECTORY_FILENAME, index=":")
  np.testing.assert_allclose(frames[0].positions, relaxed.positions, atol=1e-6)


def test_rotated_cell_is_refused_before_anything_is_written(tmp_path):
  cell = np.array([[8.5, 0.0, 0.0], [0.85, 8.5, 0.0], [0.0, 0.4, 8.5]])
  c, s = np.cos(0.5), np.sin(0.5)
  rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
  rotated = Structure(numbers=np.array([6, 8]), positions=np.array([[1.0, 1, 1], [2.2, 1, 1]]),
                      cell=cell @ rotation.T, pbc=True)
  with pytest.raises(ValueError, match="standard orientation"):
    simulate(_spring(1.2, 1.0), rotated, MDSettings(), tmp_path / "rotated")
  assert not (tmp_path / "rotated").exists()
