"""benchmarks/report.py: the latest record per case, in the JSON and in RESULTS.md's table."""

from __future__ import annotations

import json

from benchmarks import report


def _record(case, result, commit="abc1234"):
  return report.Record(case, result, "NVIDIA H100 80GB HBM3", commit, "2026-11-26", {"ms": 1.0})


def test_record_replaces_the_same_case_and_keeps_the_others(tmp_path):
  report.record("bench", [_record("a", "1 ms"), _record("b", "2 ms")], tmp_path)
  report.record("bench", [_record("b", "3 ms", commit="def5678"), _record("c", "4 ms")], tmp_path)
  records = report.load("bench", tmp_path)
  assert [(r.case, r.result, r.commit) for r in records] == [
      ("a", "1 ms", "abc1234"), ("b", "3 ms", "def5678"), ("c", "4 ms", "abc1234")]
  saved = json.loads((tmp_path / "results" / "bench.json").read_text())
  assert saved["benchmark"] == "bench" and saved["records"][1]["data"] == {"ms": 1.0}


def test_table_is_rewritten_between_its_markers_only(tmp_path):
  path = tmp_path / "RESULTS.md"
  path.write_text("# Results\n\nHand-written notes.\n")
  report.record("first", [_record("a", "1 ms")], tmp_path)
  report.record("second", [_record("x", "9 ms")], tmp_path)
  path.write_text(path.read_text() + "\nA closing note.\n")
  report.record("first", [_record("a", "5 ms")], tmp_path)
  text = path.read_text()
  assert text.startswith("# Results\n\nHand-written notes.\n\n## first\n")
  assert text.endswith("A closing note.\n")
  assert "| a | 5 ms | NVIDIA H100 80GB HBM3 | abc1234 | 2026-11-26 |" in text
  assert "1 ms" not in text and "| x | 9 ms |" in text
  assert text.count("## first") == 1 and text.index("## first") < text.index("## second")


def test_main_rewrites_every_table_from_the_json(tmp_path):
  report.record("bench", [_record("a", "1 ms")], tmp_path)
  (tmp_path / "RESULTS.md").write_text("# Results\n")  # tables lost, e.g. in a merge
  report.main(["--results", str(tmp_path)])
  assert "| a | 1 ms |" in (tmp_path / "RESULTS.md").read_text()
