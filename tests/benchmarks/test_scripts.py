"""Every benchmark script runs end to end in its --smoke mode on the CPU, and every command that
benchmarks/README.md documents is one its script accepts."""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ("attention", "compare_torch", "md", "profile_model", "radical_sites", "train_recipe")
# A command of the README: "python -m benchmarks.NAME ARGS", possibly continued with "\".
_COMMAND = re.compile(r"python -m benchmarks\.(\w+)((?:[^\n`\\]|\\\n)*)")


def _run(*args: str, results: Path) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", *args, "--results", str(results)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("script", SCRIPTS)
def test_smoke_run_records_its_cases(script, tmp_path):
  proc = _run(f"benchmarks.{script}", "--smoke", results=tmp_path)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = json.loads((tmp_path / "results" / f"{script}.json").read_text())["records"]
  assert records, proc.stdout
  table = (tmp_path / "RESULTS.md").read_text()
  for r in records:
    assert r["device"] == "cpu" and r["date"] and r["commit"]
    assert f"| {r['case']} | {r['result']} | cpu |" in table
    # Every measured case ran: no failure status anywhere in its data.
    assert "oom" not in json.dumps(r["data"]) and '"error"' not in json.dumps(r["data"]), r["data"]
  if script == "compare_torch":
    assert (tmp_path / "results" / "compare_torch.png").stat().st_size > 0
    # The smoke run's JAX case times the direct head too (--direct-impls), before the forces.
    direct = [r for r in records if "direct" in r["data"]]
    assert direct and all("E+direct F" in r["result"] for r in direct)
    assert all(list(r["data"]).index("direct") < list(r["data"]).index("ef") for r in direct)


def test_attention_once_runs_without_recording(tmp_path):
  proc = _run("benchmarks.attention", "--smoke", "--once", "--impls", "per_edge_message",
              results=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (tmp_path / "results").exists()


def documented_commands() -> list[tuple[str, str]]:
  text = (REPO / "benchmarks" / "README.md").read_text()
  return [(module, args.replace("\\\n", " ")) for module, args in _COMMAND.findall(text)]


def test_readme_documents_every_script():
  assert {module for module, _ in documented_commands()} >= {*SCRIPTS, "report"}


@pytest.mark.parametrize("module, args", documented_commands())
def test_documented_command_is_accepted(module, args):
  parser = importlib.import_module(f"benchmarks.{module}").build_parser()
  parser.parse_args(shlex.split(args, comments=True))
