"""``e2former import`` of the authors' reference checkpoint: a run folder that eval, the predictor
loaders, the ASE calculator and JAX MD take unchanged, reproducing their energies; the README's
JAX MD snippet runs on it."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import ase
import ase.io
import jax.numpy as jnp
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator
from e2f_testing import REFERENCE_PARITY

from train.checkpoint import CHECKPOINT_DIRNAME, LAST, Checkpointer, load_calculator, load_predictor
from train.cli import main as cli_main

pytestmark = pytest.mark.skipif(not REFERENCE_PARITY.is_dir(),
                                reason=f"the reference parity fixture is absent ({REFERENCE_PARITY})")

STATE_DICT = REFERENCE_PARITY / "tiny_state_dict.npz"
# The imported weights are float32 (the format training writes): their float64 numbers to 1e-5.
FLOAT32_TOLERANCE = 1e-5
MEV = 1000.0
README = Path(__file__).resolve().parents[2] / "README.md"
README_SECTION = "## Using a checkpoint trained with the authors' code"


def structure(s: int) -> dict:
  data = np.load(REFERENCE_PARITY / "inputs_outputs.npz")
  return {key[3:]: data[key] for key in data.files if key.startswith(f"s{s}_")}


def atoms_of(s: int) -> ase.Atoms:
  io = structure(s)
  atoms = ase.Atoms(numbers=io["numbers"], positions=io["positions"])
  atoms.info.update(charge=int(io["charge"]), spin=int(io["spin"]))
  return atoms


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("import") / "run"
  assert cli_main(["import", str(STATE_DICT), "--out", str(out),
                   "--reference-config", str(REFERENCE_PARITY / "tiny_config.json")]) == 0
  return out


def test_meta_records_the_source(run_dir):
  source = Checkpointer(run_dir / CHECKPOINT_DIRNAME).latest_meta(LAST)["imported_from"]
  assert source["sha256"] == hashlib.sha256(STATE_DICT.read_bytes()).hexdigest()
  assert source["file"] == str(STATE_DICT.absolute())
  assert source["mapping"]["energy_head"] == "omol25" and len(source["mapping"]["dead"]) == 8


def test_eval_reproduces_their_energies(run_dir, tmp_path):
  frames = []
  for s in range(5):
    atoms = atoms_of(s)
    io = structure(s)
    atoms.calc = SinglePointCalculator(atoms, energy=float(io["energy"]),
                                       forces=io["forces_autograd"])
    frames.append(atoms)
  data = tmp_path / "theirs.extxyz"
  ase.io.write(data, frames, format="extxyz")
  assert cli_main(["eval", str(run_dir), "--data", str(data), "--splits", "train", "--quiet",
                   "--out", str(tmp_path), "--set", "data.split=[1.0, 0.0, 0.0]",
                   "data.atoms_per_batch=64"]) == 0
  (row,) = [r for r in json.loads((tmp_path / "eval_table.json").read_text()) if r["subset"] == "all"]
  assert row["molecules"] == 5
  largest_energy = max(abs(float(structure(s)["energy"])) for s in range(5))
  largest_force = max(np.abs(structure(s)["forces_autograd"]).max() for s in range(5))
  assert row["energy_mae_mev"] <= FLOAT32_TOLERANCE * largest_energy * MEV
  assert row["force_mae_mev_per_a"] <= FLOAT32_TOLERANCE * largest_force * MEV


def test_ase_calculator(run_dir):
  atoms = atoms_of(1)  # a cation
  atoms.calc = load_calculator(run_dir)
  io = structure(1)
  assert abs(atoms.get_potential_energy() - io["energy"]) <= FLOAT32_TOLERANCE * abs(io["energy"])
  forces = atoms.get_forces()
  assert np.abs(forces - io["forces_autograd"]).max() <= \
      FLOAT32_TOLERANCE * np.abs(io["forces_autograd"]).max()


def test_readme_snippet_runs_jax_md(run_dir):
  """The README's five-line path to JAX MD, executed on the imported folder."""
  section = README.read_text().split(README_SECTION, 1)[1]
  snippet = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  assert 'load_predictor("runs/imported")' in snippet
  setup, loop = snippet.split("step = ", 1)
  io = structure(0)
  namespace = {"species": io["numbers"], "positions": jnp.asarray(io["positions"], jnp.float32)}
  exec(setup.replace("runs/imported", str(run_dir)), namespace)  # noqa: S102 (our own README)
  # The initial state's forces are the model's, at the fixture's geometry: theirs.
  forces = np.asarray(namespace["state"].force)
  assert np.abs(forces - io["forces_autograd"]).max() <= \
      FLOAT32_TOLERANCE * np.abs(io["forces_autograd"]).max()
  exec("step = " + loop.replace("range(100)", "range(2)"), namespace)  # noqa: S102
  assert np.isfinite(np.asarray(namespace["state"].position)).all()


def test_bad_input_is_one_error_and_nothing_written(tmp_path, capsys):
  taken = tmp_path / "taken"
  (taken / "something").mkdir(parents=True)
  assert cli_main(["import", str(STATE_DICT), "--out", str(taken)]) == 2
  assert "is not an empty folder" in capsys.readouterr().err
  state = dict(np.load(STATE_DICT))
  state["decoder.mix_cm.0.weight"] = state["decoder.mix_cm.0.weight"][:, :-1]
  broken = tmp_path / "broken.npz"
  np.savez(broken, **state)
  out = tmp_path / "out"
  assert cli_main(["import", str(broken), "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "key 'decoder.mix_cm.0.weight' has shape (16, 31)" in err[0]
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["broken.npz", "taken"]


def test_smooth_sink_option(tmp_path):
  out = tmp_path / "run"
  assert cli_main(["import", str(STATE_DICT), "--out", str(out), "--softmax-sink", "zero"]) == 0
  predictor = load_predictor(out)
  assert predictor.config.softmax_sink.value == "zero" and not predictor.config.reference_slots
