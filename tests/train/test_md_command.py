"""``e2former md`` and the checkpoint loaders, on a random-weight checkpoint (the simulation library
itself: tests/train/simulation)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import ase.io
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from e2f_testing import random_molecule, random_periodic_atoms

from e2former_jax import lattice, ops
from e2former_jax.config import AttentionImpl, tiny_config
from e2former_jax.interop.ase import E2FormerCalculator
from e2former_jax.interop.jax_md import BOLTZMANN
from e2former_jax.neighbors import build_graph
from e2former_jax.nn.model import E2Former
from e2former_jax.reference_energies import ReferenceEnergies
from e2former_jax.structure import Structure
from train.checkpoint import (CHECKPOINT_DIRNAME, LAST, Checkpointer, PredictorInfo, load_calculator,
                              load_predictor)
from train.cli import XLA_CACHE_ENV, main as cli_main
from train.data.units import BOHR_A, HARTREE_EV
from train.run_config import DataConfig, ForceMode, LossConfig, RunConfig
from train.simulation import PLOT_FILENAME, SUMMARY_FILENAME, TRAJECTORY_FILENAME
from train.state import create_train_state

MICRO = dict(num_layers=1, channels=8, num_heads=2, head_dim=4, num_rbf=8, max_neighbors=8,
             edge_hidden=8, type_embed_dim=4)
REFERENCES = {1: -13.6, 6: -1030.0, 7: -1480.0, 8: -2040.0}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A run folder with a random-weight checkpoint whose training data is a 2-molecule SPICE file."""
  root = tmp_path_factory.mktemp("md")
  rng = np.random.default_rng(0)
  data = root / "data.hdf5"
  molecules = [random_molecule(rng, n) for n in (5, 7)]
  with h5py.File(data, "w") as f:
    for i, (numbers, positions) in enumerate(molecules):
      group = f.create_group(f"mol{i}")
      group["atomic_numbers"] = numbers.astype(np.int16)
      group["conformations"] = np.stack([positions, positions + 0.01]).astype(np.float32) / BOHR_A
      group["dft_total_energy"] = np.full(2, -100.0 / HARTREE_EV)
      group["dft_total_gradient"] = np.zeros((2, len(numbers), 3), np.float32)
      group["total_charge"] = np.zeros(1, np.int16)
      group["spin_multiplicity"] = np.array([1 + int(numbers.sum()) % 2], np.int16)
      group["subset"] = np.array([b"synthetic"])
  config = tiny_config(**MICRO, attention_impl=AttentionImpl.PALLAS)  # as if trained on a GPU
  numbers, positions = molecules[0]
  graph = build_graph([Structure(numbers, positions)], cutoff=config.cutoff,
                      max_neighbors=config.max_neighbors)
  params = jax.jit(E2Former(config).init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, graph))
  checkpointer = Checkpointer(root / "run" / CHECKPOINT_DIRNAME)
  run_config = RunConfig(model={"preset": "tiny", **MICRO}, data=DataConfig(path=str(data)),
                         loss=LossConfig(forces=ForceMode.CONSERVATIVE))
  checkpointer.save(LAST, create_train_state(params, optax.sgd(1e-3), seed=0), meta={},
                    predictor=PredictorInfo(config, ReferenceEnergies(elements=REFERENCES), run_config))
  checkpointer.close()
  return root / "run"


def test_load_predictor_and_calculator(run_dir):
  predictor = load_predictor(run_dir)
  # Whatever the run trained with, the loader leaves the choice to the platform (XLA on this CPU).
  assert predictor.config.attention_impl is AttentionImpl.AUTO
  assert ops.resolve_impl(predictor.config.attention_impl) is AttentionImpl.XLA
  assert dict(predictor.reference_energies.elements) == REFERENCES
  assert predictor.conservative_forces_trained
  assert predictor.config.replace(attention_impl=AttentionImpl.PALLAS) == tiny_config(
      **MICRO, attention_impl=AttentionImpl.PALLAS)
  calculator = load_calculator(run_dir, attention_impl=AttentionImpl.PALLAS_INTERPRET, remat=True)
  assert isinstance(calculator, E2FormerCalculator)
  assert calculator.predictor.config.attention_impl is AttentionImpl.PALLAS_INTERPRET
  assert calculator.predictor.config.remat and not predictor.config.remat
  same = jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()),
                            predictor.params, calculator.predictor.params)
  assert all(jax.tree.leaves(same))


def test_md_command_writes_trajectory_plot_and_summary(run_dir, tmp_path):
  out = tmp_path / "md"
  assert cli_main(["md", str(run_dir), "--molecule", "mol1", "--conformer", "1", "--ensemble", "nvt",
                   "--thermostat", "nose-hoover", "--temperature", "200", "--timestep", "0.1",
                   "--float64", "--steps", "35", "--record-every", "10", "--out", str(out),
                   "--no-relax", "--quiet"]) == 0
  frames = ase.io.read(out / TRAJECTORY_FILENAME, index=":")
  assert [f.info["step"] for f in frames] == [0, 10, 20, 30, 40]  # 35 rounded up to whole chunks
  with h5py.File(run_dir.parent / "data.hdf5") as f:
    start = f["mol1/conformations"][1] * BOHR_A
    numbers = f["mol1/atomic_numbers"][()]
  np.testing.assert_array_equal(frames[0].numbers, numbers)
  np.testing.assert_allclose(frames[0].positions, start, atol=1e-5)
  for frame in frames:
    assert frame.get_forces().shape == (7, 3) and np.isfinite(frame.get_forces()).all()
    kinetic = 0.5 * np.sum(frame.get_momenta() ** 2 / frame.get_masses()[:, None])
    np.testing.assert_allclose(frame.info["kinetic_energy"], kinetic, rtol=1e-5)
    np.testing.assert_allclose(frame.info["temperature_K"], 2 * kinetic / (3 * 7 * BOLTZMANN), rtol=1e-6)
    np.testing.assert_allclose(frame.info["total_energy"],
                               frame.get_potential_energy() + kinetic, rtol=1e-9, atol=1e-5)
  # The potential energy is a total energy: network energy plus the per-element references.
  reference = sum(REFERENCES[int(z)] for z in numbers)
  assert abs(frames[0].get_potential_energy() - reference) < 50.0
  assert frames[-1].positions.tolist() != frames[0].positions.tolist()
  assert (out / PLOT_FILENAME).stat().st_size > 10_000
  summary = json.loads((out / SUMMARY_FILENAME).read_text())
  assert summary["structure"] == "mol1/1" and summary["num_atoms"] == 7 and summary["steps"] == 40
  assert summary["settings"]["ensemble"] == "nvt" and summary["settings"]["thermostat"] == "nose-hoover"
  assert summary["mean_temperature_K"] > 0 and summary["steps_per_s"] > 0
  # Nose-Hoover's extended energy is conserved (float64, 0.1 fs steps of a random-weight model).
  assert summary["max_drift_eV_per_atom"] < 1e-4, summary["max_drift_eV_per_atom"]
  assert {"conserved_energy", "temperature_K"} <= set(frames[-1].info)


def test_md_command_runs_a_periodic_cell(run_dir, tmp_path):
  """--structure with a lattice: a periodic box in fractional coordinates, frames keep the cell;
  without --out, in <run folder>/md/<structure file stem>_<ensemble>.

  The cell is narrower than twice the cutoff (several images of one atom are neighbours), so this
  runs the all-images neighbour list; wide boxes use JAX MD's own (tests/e2former_jax/interop).
  """
  rng = np.random.default_rng(4)
  cell = np.array([[8.5, 0.0, 0.0], [0.85, 8.5, 0.0], [0.0, 0.4, 8.5]])
  assert lattice.plane_spacings(cell).max() < 2 * load_predictor(run_dir).config.cutoff
  atoms = random_periodic_atoms(rng, cell, 40)
  path = tmp_path / "cell.extxyz"
  ase.io.write(path, atoms)
  assert cli_main(["md", str(run_dir), "--structure", str(path), "--ensemble", "nvt", "--steps", "20",
                   "--record-every", "10", "--remat", "--no-relax", "--quiet"]) == 0
  out = run_dir / "md" / "cell_nvt-langevin"
  frames = ase.io.read(out / TRAJECTORY_FILENAME, index=":")
  assert len(frames) == 3
  for frame in frames:
    np.testing.assert_allclose(frame.cell[:], cell)
    assert frame.pbc.all()
    scaled = np.linalg.solve(cell.T, frame.positions.T).T
    assert (scaled > -1e-6).all() and (scaled < 1 + 1e-6).all()  # wrapped into the cell
  np.testing.assert_allclose(frames[0].get_scaled_positions(), atoms.get_scaled_positions(), atol=1e-5)
  summary = json.loads((out / SUMMARY_FILENAME).read_text())
  assert summary["num_atoms"] == 40 and summary["settings"]["thermostat"] == "langevin"
  assert "max_drift_eV_per_atom" not in summary  # Langevin conserves nothing


def test_md_command_missing_structure_file_is_one_line(run_dir, tmp_path, capsys):
  missing = tmp_path / "missing.xyz"
  assert cli_main(["md", str(run_dir), "--structure", str(missing), "--quiet"]) == 2
  assert capsys.readouterr().err.splitlines() == [f"error: structure file {missing} does not exist"]


def test_command_line_reuses_compiled_programs(run_dir, tmp_path):
  """``e2former md`` twice with one compilation cache: the first run writes XLA's programs there, the
  second loads every one of them (writes none) and simulates the same trajectory; with the cache off
  nothing is written."""
  cache = tmp_path / "xla"

  def md(out: str, setting: str) -> np.ndarray:
    env = {**os.environ, XLA_CACHE_ENV: setting, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    subprocess.run([sys.executable, "-m", "train.cli", "md", str(run_dir), "--molecule", "mol0",
                    "--steps", "10", "--record-every", "10", "--no-relax", "--quiet", "--out",
                    str(tmp_path / out)], cwd=REPO, env=env, check=True, capture_output=True)
    return np.stack([f.positions for f in ase.io.read(tmp_path / out / TRAJECTORY_FILENAME, index=":")])

  first = md("first", str(cache))
  entries = sorted(p.name for p in cache.iterdir())
  assert entries
  np.testing.assert_array_equal(md("second", str(cache)), first)
  assert sorted(p.name for p in cache.iterdir()) == entries
  md("off", "off")
  assert sorted(p.name for p in cache.iterdir()) == entries
