"""End-to-end training tests on a tiny synthetic SPICE-layout dataset with a tiny model.

XLA compiles the tiny model's training step in ~25 s on a 2-core CPU, so every test here uses the
same shapes and constants: the memoised step builders (``train.step``) then trace and compile each
step once per process, and the 4-device subprocess, started first, compiles while the in-process
tests run (a persistent compilation cache is shared with it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import NUM_MOLECULES, SPLIT_SEED, SUBSETS, TINY, write_dataset

from e2former_jax.nn.model import E2Former
from train import sharding
from train.checkpoint import BEST, LAST, Checkpointer, load_checkpoint
from train.cli import main as cli_main
from train.evaluate import evaluate_checkpoint
from train.metrics import (CURVE_FILENAME, JSONL_FILENAME, STATE_ROWS, TABLE_JSON_FILENAME, TABLE_MD_FILENAME,
                           read_records)
from train.optimizer import make_optimizer
from train.run_config import load_run_config
from train.run_data import empty_batch, make_iterator, open_run_data
from train.state import create_train_state
from train.step import make_init, make_train_step
from train.train import NonFiniteHalt, train_and_evaluate
import train.train as train_module

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Persistent XLA cache for this module (and the subprocesses it starts)."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  old = {name: getattr(jax.config, name) for name in names}
  cache = tmp_path_factory.getbasetemp() / "xla_cache"
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield cache
  for name, value in old.items():
    jax.config.update(name, value)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  return write_dataset(tmp_path_factory.mktemp("data") / "tiny.hdf5")


def tiny_config(dataset: Path, *overrides: str):
  return load_run_config(None, [f"data.path={dataset}", *TINY, *overrides])


_DATA_PARALLEL_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    assert jax.device_count() == 4, jax.devices()
    jax.config.update("jax_compilation_cache_dir", sys.argv[2])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    from train.run_config import load_run_config
    from train.train import train_and_evaluate
    config = load_run_config(None, json.loads(sys.argv[1]))
    result = train_and_evaluate(config, sys.argv[3], num_devices=4, progress=False, final_eval=False)
    print(json.dumps(result.losses))
    """)


FOUR_DEVICE_OVERRIDES = ["train.steps=3", "train.eval_every=100", "train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def four_device_run(dataset, tmp_path_factory, compilation_cache):
  """The 4-device run, started in a subprocess as early as possible: its compilation overlaps the
  in-process tests (XLA compiles mostly on one core)."""
  workdir = tmp_path_factory.mktemp("four_devices")
  overrides = [f"data.path={dataset}", *TINY, *FOUR_DEVICE_OVERRIDES]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
  # Output goes to files: a full pipe would stall the child until the test reads it.
  with (workdir / "stdout.txt").open("w") as out, (workdir / "stderr.txt").open("w") as err:
    proc = subprocess.Popen([sys.executable, "-c", _DATA_PARALLEL_SCRIPT, json.dumps(overrides),
                             str(compilation_cache), str(workdir)], cwd=REPO, env=env, stdout=out,
                            stderr=err)
  yield proc, workdir
  if proc.poll() is None:
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory, four_device_run):
  """A 30-step run with validation every 10 steps."""
  workdir = tmp_path_factory.mktemp("run")
  config = tiny_config(dataset, "train.steps=30", "train.eval_every=10", "train.checkpoint_every=10")
  return train_and_evaluate(config, workdir, progress=False)


def test_training_reduces_loss_and_writes_outputs(trained):
  losses = np.asarray(trained.losses)
  assert trained.step == 30 and losses.shape == (30,)
  assert np.isfinite(losses).all()
  # Labels are a smooth pair potential: 30 Adam steps must clearly reduce the loss.
  assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses
  records = read_records(trained.workdir)
  val = [r for r in records if r["kind"] == "val"]
  assert [r["step"] for r in val] == [10, 20, 30]
  assert val[-1]["force_mae_mev_per_a"] < val[0]["force_mae_mev_per_a"]
  for name in (JSONL_FILENAME, "metrics_train.csv", "metrics_val.csv", CURVE_FILENAME,
               TABLE_MD_FILENAME, TABLE_JSON_FILENAME, "summary.json", "run_config.yaml"):
    assert (trained.workdir / name).is_file(), name
  assert Checkpointer(trained.workdir / "checkpoints").latest_meta(LAST)["step"] == 30
  summary = json.loads((trained.workdir / "summary.json").read_text())
  assert 0 <= summary["input_wait_s"] <= summary["train_wall_s"]
  assert summary["input_wait_fraction"] == pytest.approx(summary["input_wait_s"] / summary["train_wall_s"],
                                                         rel=0.05)
  # A direct-force run scores both force kinds; the table labels them.
  assert "direct_force_mae_mev_per_a" in val[-1] and "force MAE, direct head" in (
      trained.workdir / TABLE_MD_FILENAME).read_text()


def test_eval_table_has_per_subset_and_per_state_rows(trained):
  rows = json.loads((trained.workdir / TABLE_JSON_FILENAME).read_text())
  # The tiny data's odd-electron molecules are doublets: closed- and open-shell ones in each split.
  states = (STATE_ROWS[0], STATE_ROWS[2])
  for split in ("val", "test"):
    split_rows = [r["subset"] for r in rows if r["split"] == split]
    assert split_rows == ["all", *SUBSETS, *states], split_rows
    by_subset = {r["subset"]: r for r in rows if r["split"] == split}
    total = by_subset["all"]
    for group in (SUBSETS, states):  # each partitions the split
      assert total["molecules"] == sum(by_subset[s]["molecules"] for s in group)
      # The "all" row is the molecule-weighted mean of the group's rows.
      weighted = sum(by_subset[s]["energy_mae_mev_per_atom"] * by_subset[s]["molecules"] for s in group)
      assert np.isclose(total["energy_mae_mev_per_atom"], weighted / total["molecules"])
    assert all(0 < r["force_mae_mev_per_a"] < np.inf for r in by_subset.values())


def test_resume_reproduces_uninterrupted_losses(dataset, tmp_path):
  config = tiny_config(dataset, "train.steps=6", "train.eval_every=100", "train.checkpoint_every=3")
  straight = train_and_evaluate(config, tmp_path / "straight", progress=False, final_eval=False)
  half = tiny_config(dataset, "train.steps=3", "train.eval_every=100", "train.checkpoint_every=3")
  first = train_and_evaluate(half, tmp_path / "resumed", progress=False, final_eval=False)
  second = train_and_evaluate(config, tmp_path / "resumed", progress=False, final_eval=False)
  assert first.step == 3 and second.step == 6
  np.testing.assert_array_equal(first.losses + second.losses, straight.losses)
  p_straight, _ = load_checkpoint(tmp_path / "straight", "last")
  p_resumed, _ = load_checkpoint(tmp_path / "resumed", "last")
  jax.tree.map(np.testing.assert_array_equal, p_straight, p_resumed)


def test_subset_repeat_applies_to_training_epochs_only(dataset):
  data = open_run_data(tiny_config(dataset).data)
  config = tiny_config(dataset, "data.subset_repeat={beta: 3}")
  beta = data.dataset.subset_names.index("beta")
  for split in ("train", "val"):
    for training in (True, False):
      iterator = make_iterator(data, split, config.data, config.model_config(), training=training, seed=0)
      counts = np.bincount(np.concatenate(iterator.plan(0)), minlength=len(data.dataset))
      indices = data.splits[split]
      expected = np.where(training & (data.dataset.subset_ids[indices] == beta), 3, 1)
      np.testing.assert_array_equal(counts[indices], expected)
      assert counts.sum() == expected.sum()
  unknown = tiny_config(dataset, "data.subset_repeat={gamma: 2}")
  with pytest.raises(ValueError, match=r"subset\(s\) \['gamma'\].*its subsets: \['alpha', 'beta'\]"):
    make_iterator(data, "train", unknown.data, unknown.model_config(), training=True, seed=0)


def test_nonfinite_step_is_skipped_without_moving_the_optimizer(dataset):
  config = tiny_config(dataset)
  data = open_run_data(config.data)
  model_config = config.model_config()
  batches = list(make_iterator(data, "train", config.data, model_config, training=True, seed=0).iterate())[:4]
  params = make_init(model_config)(jax.random.key(0), jax.tree.map(jnp.asarray, batches[0].graph))
  optimizer, _ = make_optimizer(config.optim, config.decay_steps, params)
  mesh = sharding.make_mesh(1)
  train_step = make_train_step(model_config, config.loss, config.optim, mesh)
  step = lambda state, batch: train_step(state, batch, np.int32(config.decay_steps))
  state = create_train_state(params, optimizer, 0)
  state = jax.device_put(state, sharding.state_sharding(mesh, state))  # as in the loop: one executable
  good = sharding.shard_batch(mesh, sharding.stack(batches))
  state, metrics = step(state, good)
  assert metrics["finite"] == 1.0
  before = jax.device_get(state)
  batches[2] = batches[2].replace(energy=batches[2].energy * np.nan)  # one bad sub-batch suffices
  with jax.debug_nans(False):
    after, metrics = step(state, sharding.shard_batch(mesh, sharding.stack(batches)))
  assert metrics["finite"] == 0.0 and not np.isfinite(float(metrics["loss"]))
  host = jax.device_get(after)
  for field in ("params", "opt_state", "ema_params", "opt_step"):
    jax.tree.map(np.testing.assert_array_equal, getattr(host, field), getattr(before, field))
  assert int(host.step) == int(before.step) + 1
  assert int(host.nonfinite_total) == 1 and int(host.nonfinite_run) == 1
  after, metrics = step(after, good)
  assert metrics["finite"] == 1.0 and int(after.nonfinite_run) == 0 and int(after.opt_step) == 2


def test_consecutive_nonfinite_steps_halt_and_keep_last_good_checkpoint(dataset, tmp_path, monkeypatch):
  real = train_module.make_train_step
  calls = {"n": 0}

  def poisoned_after_two(*args, **kwargs):
    step = real(*args, **kwargs)

    def wrapped(state, batch, decay_steps):
      calls["n"] += 1
      if calls["n"] > 2:
        batch = batch.replace(energy=batch.energy * jnp.nan)
      return step(state, batch, decay_steps)

    return wrapped

  monkeypatch.setattr(train_module, "make_train_step", poisoned_after_two)
  config = tiny_config(dataset, "train.steps=20", "train.eval_every=100", "train.checkpoint_every=2",
                       "train.max_consecutive_nonfinite=3")
  with jax.debug_nans(False), pytest.raises(NonFiniteHalt, match="3 consecutive"):
    train_and_evaluate(config, tmp_path, progress=False)
  # Steps 3, 4, 5 were skipped; the halt is noticed while step 6 runs; the checkpoint of step 2
  # (the last one whose parameters came from a finite update) holds, and later ones kept them.
  meta = Checkpointer(tmp_path / "checkpoints").latest_meta(LAST)
  assert meta["step"] in (2, 4)
  records = [r for r in read_records(tmp_path) if r["kind"] == "train"]
  assert [r["skipped"] for r in records[:5]] == [0, 0, 1, 2, 3]


def test_cli_train_and_eval_smoke(dataset, tmp_path, capsys):
  workdir = tmp_path / "cli_run"
  # A zero time budget stops training right after min_steps (the budget is checked per step).
  code = cli_main(["train", "--data", str(dataset), "--workdir", str(workdir), "--quiet",
                   "--set", *TINY, "train.steps=8", "train.max_minutes=0", "train.min_steps=5",
                   "train.eval_every=5", "train.checkpoint_every=5"])
  assert code == 0
  assert (workdir / "checkpoints" / "last").is_dir() and (workdir / "checkpoints" / "best").is_dir()
  assert (workdir / CURVE_FILENAME).stat().st_size > 1000
  assert len([r for r in read_records(workdir) if r["kind"] == "train"]) == 5
  capsys.readouterr()
  assert cli_main(["eval", str(workdir), "--splits", "test"]) == 0
  assert "| test | all |" in capsys.readouterr().out


def test_load_predictor_and_stage2_init(trained, dataset, tmp_path):
  params, info = load_checkpoint(trained.workdir)
  assert info.model_config.direct_force_head and info.run_config.train.steps == 30
  assert set(info.reference_energies.elements) == {1, 6, 7, 8}
  # Stage 2: conservative forces, no direct head; initialised from the stage-1 EMA weights.
  config = tiny_config(dataset, "loss.forces=conservative", f"train.init_from={trained.workdir}")
  data = open_run_data(config.data)
  graph = empty_batch(make_iterator(data, "train", config.data, config.model_config(), training=True,
                                    seed=0)).graph
  template = jax.eval_shape(E2Former(config.model_config()).init, jax.random.key(0), graph)
  stage2 = train_module._params_from_checkpoint(str(trained.workdir), template)
  assert "force_head" in params["params"] and "force_head" not in stage2["params"]
  for name, value in stage2["params"].items():
    jax.tree.map(np.testing.assert_array_equal, value, params["params"][name])


def test_four_devices_equal_one_device(dataset, tmp_path, four_device_run):
  """The same 4 sub-batches per step: stacked on one device, or one per device on 4 devices."""
  proc, workdir = four_device_run
  one = train_and_evaluate(tiny_config(dataset, *FOUR_DEVICE_OVERRIDES), tmp_path, num_devices=1,
                           progress=False, final_eval=False)
  assert proc.wait(timeout=900) == 0, (workdir / "stderr.txt").read_text()[-3000:]
  four = json.loads((workdir / "stdout.txt").read_text().strip().splitlines()[-1])
  assert len(one.losses) == 3 and np.isfinite(one.losses).all()
  np.testing.assert_allclose(four, one.losses, rtol=1e-5)
  p1, _ = load_checkpoint(tmp_path, "last")
  p4, _ = load_checkpoint(workdir, "last")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p1, p4)


VALIDATION_OVERHEAD_S = 2.0


def test_budget_mode_sizes_the_schedule_at_the_first_validation(dataset, tmp_path, monkeypatch):
  """train.steps: null -> T is planned from measured times at the first validation and checkpointed."""
  planned, real_plan = [], train_module.plan_horizon

  def plan(**kwargs):
    planned.append(kwargs)
    assert real_plan(**kwargs) > kwargs["step"]  # 30 minutes leave room to go on
    return 7

  def slow_evaluate(*args, **kwargs):  # a validation pass whose overhead must not count as step time
    time.sleep(VALIDATION_OVERHEAD_S)
    return real_evaluate(*args, **kwargs)

  real_evaluate = train_module.evaluate
  monkeypatch.setattr(train_module, "evaluate", slow_evaluate)
  monkeypatch.setattr(train_module, "plan_horizon", plan)
  config = tiny_config(dataset, "train.steps=null", "optim.decay_steps=null", "train.max_minutes=30",
                       "train.eval_every=4", "train.checkpoint_every=100")
  result = train_and_evaluate(config, tmp_path, progress=False)
  (kwargs,) = planned
  assert kwargs["step"] == 4 and kwargs["eval_every"] == 4
  assert kwargs["validation_seconds"] > 0
  # Steps 2-4 were timed before the validation pass: its 2 s would make each step look 1 s slower.
  assert 0 < kwargs["step_seconds"] < VALIDATION_OVERHEAD_S / 4
  assert kwargs["closing_eval_seconds"] > train_module.CLOSING_SECONDS  # val + test estimated
  assert result.step == 7
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.latest_meta(LAST)["decay_steps"] == 7
  checkpointer.close()
  # The schedule after step 4 is the cosine with T = 7.
  lr = {r["step"]: r["lr"] for r in read_records(tmp_path) if r["kind"] == "train"}
  schedule = make_optimizer(config.optim, 7, None)[1]
  assert lr[7] == pytest.approx(float(schedule(6)), rel=1e-6)
  # Resumed, the run keeps its T: nothing is left to train and nothing is planned again.
  again = train_and_evaluate(config, tmp_path, progress=False, final_eval=False)
  assert again.step == 7 and len(planned) == 1


def test_budget_mode_shortens_the_schedule_when_the_run_slows_down(dataset, tmp_path, monkeypatch):
  """After T is fixed, every validation checks it against the recent steps' wall time; a shorter T
  replaces it (and is checkpointed), a longer one never does."""
  checks = []

  def shorten(horizon, **kwargs):
    checks.append((horizon, kwargs))
    return min(horizon, 9)

  monkeypatch.setattr(train_module, "plan_horizon", lambda **kwargs: 12)
  monkeypatch.setattr(train_module, "shortened_horizon", shorten)
  config = tiny_config(dataset, "train.steps=null", "optim.decay_steps=null", "train.max_minutes=30",
                       "train.eval_every=4", "train.checkpoint_every=100", "train.min_steps=2")
  result = train_and_evaluate(config, tmp_path, progress=False, final_eval=False)
  (horizon, kwargs), = checks  # at step 8, the one validation after T was fixed at step 4
  assert horizon == 12 and kwargs["step"] == 8 and kwargs["recent_steps"] == 4
  assert kwargs["recent_seconds"] > 0
  assert result.step == 9
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  assert checkpointer.latest_meta(LAST)["decay_steps"] == 9
  checkpointer.close()


def test_closing_table_scores_the_best_checkpoint_the_exported_model(dataset, tmp_path, monkeypatch):
  """When the last validation is not the best, the closing table scores the best checkpoint's EMA
  weights (what load_predictor, `e2former eval|md` and the ASE calculator load), not the final ones."""
  val_losses = iter([3.0, 1.0, 2.0])  # at steps 2, 4, 6: the best is step 4's
  monkeypatch.setattr(train_module, "validation_loss", lambda config, errors: next(val_losses))
  config = tiny_config(dataset, "train.steps=6", "train.eval_every=2", "train.checkpoint_every=100")
  result = train_and_evaluate(config, tmp_path, progress=False)
  assert result.step == 6 and result.table_step == 4

  def by_row(rows):
    return {(r["split"], r["subset"], field): r[field] for r in rows
            for field in ("energy_mae_mev_per_atom", "force_mae_mev_per_a")}

  table = by_row(result.table)
  assert by_row(evaluate_checkpoint(tmp_path, which=BEST, out=tmp_path / "best", progress=False)
                ) == pytest.approx(table, rel=1e-5)
  final = by_row(evaluate_checkpoint(tmp_path, which=LAST, out=tmp_path / "last", progress=False))
  test_forces = ("test", "all", "force_mae_mev_per_a")
  assert final[test_forces] != pytest.approx(table[test_forces], rel=1e-5)


# The run of the interruption tests: 6 steps, no validation, no checkpoint before the end.
INTERRUPTIBLE = ["train.steps=6", "train.eval_every=100", "train.checkpoint_every=100"]


def _interruptible_command(dataset, workdir, *overrides):
  return ["train", "--data", str(dataset), "--workdir", str(workdir), "--quiet", "--no-final-eval",
          "--set", *TINY, *INTERRUPTIBLE, *overrides]


def _step_that_calls(action, at_call: int):
  """make_train_step, patched so that ``action()`` runs when its step is called for the at_call-th time."""
  real = train_module.make_train_step

  def make(*args, **kwargs):
    step, calls = real(*args, **kwargs), [0]

    def wrapped(state, batch, decay_steps):
      calls[0] += 1
      if calls[0] == at_call:
        action()
      return step(state, batch, decay_steps)

    return wrapped

  return make


def test_sigint_saves_the_step_it_stopped_at_and_the_same_command_resumes(dataset, tmp_path, monkeypatch,
                                                                          capsys):
  command = _interruptible_command(dataset, tmp_path / "run")
  monkeypatch.setattr(train_module, "make_train_step",
                      _step_that_calls(lambda: signal.raise_signal(signal.SIGINT), at_call=3))
  assert cli_main(command) == 130  # Ctrl-C while step 3 runs
  assert capsys.readouterr().err.splitlines() == [
      "interrupted at step 3; last checkpoint at step 3; run the same command to resume"]
  monkeypatch.undo()
  assert cli_main(command) == 0
  straight = train_and_evaluate(tiny_config(dataset, *INTERRUPTIBLE), tmp_path / "straight",
                                progress=False, final_eval=False)
  resumed = [r["loss"] for r in read_records(tmp_path / "run") if r["kind"] == "train"]
  np.testing.assert_array_equal(resumed, straight.losses)  # as if never interrupted


def test_second_interrupt_stops_at_once_and_names_the_last_checkpoint(dataset, tmp_path, monkeypatch,
                                                                       capsys):
  def press_ctrl_c_twice():
    raise KeyboardInterrupt

  monkeypatch.setattr(train_module, "make_train_step", _step_that_calls(press_ctrl_c_twice, at_call=3))
  assert cli_main(_interruptible_command(dataset, tmp_path, "train.checkpoint_every=2")) == 130
  assert capsys.readouterr().err.splitlines() == [
      "interrupted at step 2; last checkpoint at step 2; run the same command to resume"]


def _user_warnings(caught) -> list[str]:
  return [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]


def test_empty_validation_split_warns_at_start_and_best_is_the_final_state(dataset, tmp_path, capsys):
  config = tiny_config(dataset, "data.split=[0.75, 0, 0.25]", "train.steps=2", "train.eval_every=1",
                       "train.checkpoint_every=100")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train_and_evaluate(config, tmp_path / "val", progress=False)
  # One warning, ours: no matplotlib complaint about the empty validation plots either.
  assert _user_warnings(caught) == [
      f"{dataset}: the validation split is empty: data.split=[0.75, 0.0, 0.25] (split by molecule, "
      f"seed data.split_seed={SPLIT_SEED}) gave it none of the dataset's {NUM_MOLECULES} molecule(s); "
      "no validation passes, checkpoints/best will hold the final weights"]
  assert Checkpointer(tmp_path / "val" / "checkpoints").latest_meta(BEST)["step"] == 2
  assert {row["split"] for row in result.table} == {"test"}

  config = tiny_config(dataset, "data.split=[1, 0, 0]", "train.steps=2", "train.checkpoint_every=100")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train_and_evaluate(config, tmp_path / "neither", progress=False)
  (message,) = _user_warnings(caught)
  assert "the validation and test splits are empty" in message and message.endswith(
      "no validation passes, checkpoints/best will hold the final weights; no test rows in the final "
      "table")
  assert result.table == [] and not (tmp_path / "neither" / TABLE_MD_FILENAME).exists()  # no header-only table
  assert cli_main(["eval", str(tmp_path / "neither"), "--quiet"]) == 2
  (line,) = capsys.readouterr().err.splitlines()
  assert "the validation and test splits are empty" in line and line.endswith(": nothing to evaluate")


def test_skipped_record_is_warned_about_once_plus_a_summary(dataset, tmp_path):
  path = shutil.copy(dataset, tmp_path / "with_nan.hdf5")
  data = open_run_data(tiny_config(path).data)
  index = int(data.splits["train"][0])
  name = data.dataset.record_name(index)
  group, conformer = re.fullmatch(r"group '(\w+)' conformer (\d+)", name).groups()
  data.dataset.close()
  with h5py.File(path, "a") as f:
    f[group]["dft_total_energy"][int(conformer)] = np.nan
  # 6 steps of ~24 of the 32 training records: the bad one is met in 4 epochs and the reference fit.
  config = tiny_config(path, "data.on_error=skip", "train.steps=6", "train.eval_every=100",
                       "train.checkpoint_every=100")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    train_and_evaluate(config, tmp_path / "run", progress=False, final_eval=False)
  assert _user_warnings(caught) == [
      f"{path}: {name}: non-finite energy nan (skipped, on_error='skip')",
      f"{path}: skipped 1 invalid record(s) in all (on_error='skip')"]


def test_eval_scores_a_whole_other_dataset_as_its_test_split(trained, dataset, tmp_path):
  # The checkpoint brings its reference energies, so no training records are needed: data.split=[0, 0, 1]
  # scores every molecule of --data (e.g. the held-out build), which a fit would refuse.
  out = tmp_path / "whole"
  assert cli_main(["eval", str(trained.workdir), "--data", str(dataset), "--splits", "test", "--set",
                   "data.split=[0,0,1]", "--out", str(out), "--quiet"]) == 0
  rows = {r["subset"]: r for r in json.loads((out / TABLE_JSON_FILENAME).read_text()) if r["split"] == "test"}
  with h5py.File(dataset) as f:
    assert rows["all"]["molecules"] == sum(len(group["dft_total_energy"]) for group in f.values())
  # A run that trains (fitting its references or resuming with a checkpoint's) still needs training records.
  for references in (None, load_checkpoint(trained.workdir / "checkpoints")[1].reference_energies):
    with pytest.raises(ValueError, match="the training split is empty"):
      open_run_data(tiny_config(dataset, "data.split=[0,0,1]").data, references=references)


def test_eval_creates_its_out_folder_or_fails_before_evaluating(trained, tmp_path, capsys):
  out = tmp_path / "not" / "yet"
  assert cli_main(["eval", str(trained.workdir), "--splits", "test", "--out", str(out), "--quiet"]) == 0
  assert "| test | all |" in (out / TABLE_MD_FILENAME).read_text()
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  assert cli_main(["eval", str(trained.workdir), "--out", str(blocker), "--quiet"]) == 2
  assert capsys.readouterr().err.splitlines() == [f"error: --out {blocker} is a file, not a folder"]
