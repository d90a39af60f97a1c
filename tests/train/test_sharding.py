"""How a launch's arguments reach ``jax.distributed.initialize`` (``train.sharding``), and the errors of
an incomplete one. The launches themselves run in ``test_multiprocess.py``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import jax
import pytest
from e2f_testing import environment_without_launchers

from train import sharding

REPO = Path(__file__).resolve().parents[2]
LAUNCH_ENV = (sharding.COORDINATOR_ENV, sharding.NUM_PROCESSES_ENV, sharding.PROCESS_ID_ENV)


@pytest.fixture
def initialize_calls(monkeypatch):
  """Records the calls of ``jax.distributed.initialize`` (which can run once per process, before any
  computation) with no launch variables set."""
  for name in LAUNCH_ENV:
    monkeypatch.delenv(name, raising=False)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
  return calls


def test_single_process_initializes_nothing(initialize_calls):
  assert not sharding.maybe_initialize_distributed()
  assert not sharding.maybe_initialize_distributed("host:1234", 1, 0)
  assert initialize_calls == []


def test_explicit_launch_takes_flags_over_environment_and_skips_cluster_detection(initialize_calls,
                                                                                  monkeypatch):
  monkeypatch.setenv(sharding.NUM_PROCESSES_ENV, "4")
  monkeypatch.setenv(sharding.PROCESS_ID_ENV, "3")
  assert sharding.maybe_initialize_distributed("host:1234", None, 2)
  assert initialize_calls == [dict(coordinator_address="host:1234", num_processes=4, process_id=2,
                                   cluster_detection_method="deactivate")]


def test_auto_launch_leaves_what_is_not_given_to_cluster_detection(initialize_calls):
  assert sharding.maybe_initialize_distributed(auto=True)
  assert initialize_calls == [dict(coordinator_address=None, num_processes=None, process_id=None)]


def test_incomplete_launch_names_what_is_missing(initialize_calls, monkeypatch):
  with pytest.raises(ValueError, match=f"missing: --num-processes or \\${sharding.NUM_PROCESSES_ENV}$"):
    sharding.maybe_initialize_distributed("host:1234", None, 0)
  with pytest.raises(ValueError, match="missing: --coordinator-address"):
    sharding.maybe_initialize_distributed(None, 2, 0)
  monkeypatch.setenv(sharding.PROCESS_ID_ENV, "first")
  with pytest.raises(ValueError, match=f"\\${sharding.PROCESS_ID_ENV}='first' is not an integer"):
    sharding.maybe_initialize_distributed("host:1234", 2)
  assert initialize_calls == []


def test_devices_flag_is_refused_in_a_multi_process_run(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="single-process run; this run has 2 processes"):
    sharding.make_mesh(1)


def test_auto_cluster_outside_a_cluster_is_one_error_line(tmp_path):
  """The real ``jax.distributed.initialize()`` (a fresh process: it must run before any computation)."""
  done = subprocess.run([sys.executable, "-m", "train.cli", "train", "--auto-cluster", "--workdir",
                         str(tmp_path / "run")], cwd=REPO,
                        env={**environment_without_launchers(), "JAX_PLATFORMS": "cpu"},
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 2, done.stderr
  assert done.stderr.splitlines() == [
      "error: --auto-cluster: coordinator_address should be defined. (jax.distributed reads the "
      f"environment of {sharding.AUTO_DETECTED_CLUSTERS}; elsewhere give --coordinator-address, "
      "--num-processes and --process-id)"]
  assert not (tmp_path / "run").exists()
