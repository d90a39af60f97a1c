"""compare_mace.py end to end on the CPU (tiny models, synthetic molecules), where mace-torch is installed."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The interpreter that has mace-torch: this one, or the one named by the environment variable.
MACE_PYTHON = os.environ.get("E2F_MACE_PYTHON", sys.executable)


def _has_mace(python: str) -> bool:
  if python == sys.executable:
    return importlib.util.find_spec("mace") is not None
  return subprocess.run([python, "-c", "import mace"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_mace(MACE_PYTHON),
                    reason="mace-torch is not installed (pip install 'e2former-jax[mace]', or point "
                           "E2F_MACE_PYTHON at an interpreter that has it)")
def test_smoke_run_trains_both_and_records_both_curves_and_held_out_scores(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.compare_mace", "--smoke", "--quiet", "--results", str(tmp_path),
       "--work", str(tmp_path / "work"), "--mace-python", MACE_PYTHON],
      cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = json.loads((tmp_path / "results" / "compare_mace.json").read_text())["records"]
  assert [r["case"].split(" ")[0] for r in records] == ["E2Former", "MACE", "MACE"] * 2
  assert [r["case"].endswith(", held-out") for r in records] == [False] * 3 + [True] * 3
  summary = records[0]["data"]
  curve = summary["mace"]["curve"]
  assert curve and all(p["minutes"] <= 2 * summary["minutes"] + 0.5 for p in curve)
  ours = summary["ours"]
  minutes = [p["minutes"] for p in ours["curve"]]
  assert len(minutes) >= 2 and all(a < b for a, b in zip(minutes, minutes[1:]))
  # The curve ends with the run's exported model (its newest best checkpoint): evaluated again, it
  # scores what the run's own closing evaluation reported.
  last = ours["curve"][-1]["test"]
  assert last.keys() == ours["test"].keys()
  for subset, row in ours["test"].items():
    assert last[subset] == pytest.approx(row, rel=1e-6)
  for point in [ours] + ours["curve"] + curve:
    row = point["test"]["all"]
    assert row["molecules"] == summary["records"]["test"]  # every test geometry scored
    assert 0 < row["force_mae_mev_per_a"] < 1e5 and 0 <= row["energy_mae_mev_per_atom"] < 1e6
  # --smoke scores both final models on a synthetic held-out set of 12 molecules x 4 geometries.
  heldout = summary["heldout"]
  for table in [heldout["ours"], heldout["mace"][-1]]:
    assert table["all"]["molecules"] == 48
    assert 0 < table["all"]["force_mae_mev_per_a"] < 1e5
  assert records[5]["data"]["test"] == heldout["mace"][-1]
  assert (tmp_path / "results" / "compare_mace.png").stat().st_size > 10_000
  assert "| MACE small 0.8 min |" in (tmp_path / "RESULTS.md").read_text()
