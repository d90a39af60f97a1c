"""Data parallelism across processes, through the command line users run: 2 processes with 2 CPU
devices each train exactly like 1 process with 4 devices.

Every run is ``python -m train.cli train`` in subprocesses on localhost:

- the reference: 1 process, 4 devices, all steps and the final evaluation;
- launch 1 (at the same time): 2 processes started with ``--coordinator-address``,
  ``--num-processes`` and ``--process-id``, the first steps and a checkpoint;
- launch 2: 2 processes again, started the way a cluster scheduler does it (SLURM's variables and
  ``--auto-cluster``, i.e. a bare ``jax.distributed.initialize()``), resuming from that checkpoint
  to the last step and the final evaluation.

Both 2-process launches together must give the reference's step losses, final weights and error
table to float32 tolerance: each process reads its own shard (process p takes global batches p,
p + 2, ...), so a step's 4 sub-batches are the reference's, and the gradient is all-reduced over
both processes. Deliberately broken while this test was written (each run, then reverted), it failed:

- overlapping shards (train.train giving every process's iterators process_index=0): all step
  losses differ, step 1 2.2136 against the reference's 2.2520;
- gradients not all-reduced (train.step, in a multi-process run, taking the gradient per device in
  a shard_map without a psum): step 1 agrees (same initial weights), step 2 gives 2.0307 against
  2.0104, steps 3 and 4 differ too;
- each process's mesh over its own devices only: orbax refuses to save host-local arrays, launch 1
  fails.

No persistent compilation cache: only process 0 would write it and only process 0 would hit it, so
in launch 2 process 0 would wait at the first all-reduce while process 1 compiles, and gloo gives
up after 30 s at a collective that not all processes have reached.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from e2f_testing import environment_without_launchers
from tiny_training import TINY, write_dataset

from train.checkpoint import CHECKPOINT_DIRNAME, LAST, load_checkpoint
from train.metrics import TABLE_JSON_FILENAME, read_records
from train.run_config import load_run_config
from train.run_data import make_iterator, open_run_data

REPO = Path(__file__).resolve().parents[2]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
STEPS_BEFORE_RESUME = 2
STEPS = 4
# Enough molecules that the first epoch holds all STEPS x 4 sub-batches: the 1-process and the
# 2-process runs then see the same global batches (epochs end differently: a 2-process training
# epoch drops an odd last batch).
NUM_MOLECULES = 48
RUN = [*TINY, f"train.steps={STEPS}", "train.eval_every=100", "train.checkpoint_every=100"]
# Per launch: ten times launch 1's 30 s on 2 lightly loaded cores.
LAUNCH_TIMEOUT_S = 300
_POLL_S = 0.2
_FAILED = "Traceback (most recent call last)"
_TAIL = 3000  # characters of a failed process's output in the failure message


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(num_devices: int, **extra: str) -> dict[str, str]:
  env = environment_without_launchers()
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={num_devices}"]),
             **extra)
  return env


class _Launches:
  """Started ``e2former train`` processes; whatever is still running at the end is killed."""

  def __init__(self, logs: Path):
    self.logs = logs
    self.procs: list[tuple[str, subprocess.Popen]] = []

  def start(self, name: str, args: list[str], env: dict[str, str]) -> None:
    # Output goes to files: a full pipe would stall the child.
    with (self.logs / f"{name}.out").open("w") as out:
      proc = subprocess.Popen([sys.executable, "-m", "train.cli", "train", *args], cwd=REPO, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    self.procs.append((name, proc))

  def wait(self, names: list[str]) -> None:
    """Waits until the named processes exit; fails on the first error or after LAUNCH_TIMEOUT_S."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    waiting = [(n, p) for n, p in self.procs if n in names]
    while waiting:
      for name, proc in waiting:
        # A failed process of a multi-process run waits at jax's shutdown barrier for the others
        # (up to 5 minutes) before it exits: its traceback is the first sign.
        if proc.poll() not in (None, 0) or _FAILED in self._output(name):
          pytest.fail(f"{name} failed (exit code {proc.poll()}):\n{self._output(name)[-_TAIL:]}")
      waiting = [(n, p) for n, p in waiting if p.poll() is None]
      if time.monotonic() > deadline:
        pytest.fail(f"{[n for n, _ in waiting]} still running after {LAUNCH_TIMEOUT_S} s:\n"
                    + "\n".join(self._output(n)[-_TAIL:] for n, _ in waiting))
      time.sleep(_POLL_S)

  def kill_all(self) -> None:
    for _, proc in self.procs:
      if proc.poll() is None:
        proc.kill()
    for _, proc in self.procs:
      proc.wait()

  def _output(self, name: str) -> str:
    return (self.logs / f"{name}.out").read_text()


def _train_losses(workdir: Path) -> list[float]:
  records = [r for r in read_records(workdir) if r["kind"] == "train"]
  assert [r["step"] for r in records] == list(range(1, len(records) + 1))
  return [r["loss"] for r in records]


def test_two_processes_train_like_one(tmp_path):
  dataset = write_dataset(tmp_path / "tiny.hdf5", num_molecules=NUM_MOLECULES)
  config = load_run_config(None, [f"data.path={dataset}", *RUN])
  train_iterator = make_iterator(open_run_data(config.data), "train", config.data, config.model_config(),
                                 training=True, seed=config.train.seed)
  assert train_iterator.num_batches(0) >= STEPS * config.data.batches_per_step
  logs = tmp_path / "logs"
  logs.mkdir()
  reference, shared = tmp_path / "reference", tmp_path / "two_processes"
  common = ["--data", str(dataset), "--quiet", "--set", *RUN]
  launches = _Launches(logs)
  try:
    launches.start("reference", ["--workdir", str(reference), *common],
                   _environment(NUM_PROCESSES * DEVICES_PER_PROCESS))
    address = f"127.0.0.1:{_free_port()}"
    for p in range(NUM_PROCESSES):
      launches.start(f"launch1_process{p}",
                     ["--workdir", str(shared), "--no-final-eval", "--coordinator-address", address,
                      "--num-processes", str(NUM_PROCESSES), "--process-id", str(p), *common,
                      f"train.steps={STEPS_BEFORE_RESUME}"],
                     _environment(DEVICES_PER_PROCESS))
    launches.wait([f"launch1_process{p}" for p in range(NUM_PROCESSES)])
    # One checkpoint, written by both processes through orbax's protocol (no leftovers).
    last = shared / CHECKPOINT_DIRNAME / LAST
    assert sorted(p.name for p in last.iterdir()) == [str(STEPS_BEFORE_RESUME)], list(last.iterdir())

    port = str(_free_port())
    for p in range(NUM_PROCESSES):
      slurm = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(NUM_PROCESSES),
                   SLURM_PROCID=str(p), SLURM_LOCALID=str(p), JAX_COORDINATOR_PORT=port)
      launches.start(f"launch2_process{p}", ["--workdir", str(shared), "--auto-cluster", *common],
                     _environment(DEVICES_PER_PROCESS, **slurm))
    launches.wait([name for name, _ in launches.procs])
  finally:
    launches.kill_all()

  expected = _train_losses(reference)
  assert len(expected) == STEPS and np.isfinite(expected).all()
  np.testing.assert_allclose(_train_losses(shared), expected, rtol=1e-5)
  params, _ = load_checkpoint(shared, "last")
  expected_params, _ = load_checkpoint(reference, "last")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params, expected_params)
  table = json.loads((shared / TABLE_JSON_FILENAME).read_text())
  expected_table = json.loads((reference / TABLE_JSON_FILENAME).read_text())
  assert len(table) == len(expected_table)
  for row, expected_row in zip(table, expected_table):
    assert row.keys() == expected_row.keys()
    for key, value in row.items():
      if isinstance(value, float):
        np.testing.assert_allclose(value, expected_row[key], rtol=1e-4, err_msg=str(row))
      else:  # split, subset and the molecule and atom counts
        assert value == expected_row[key], row
