"""Where benchmark results go: the latest record per case, with device, commit and date.

A benchmark (one script) measures *cases* (e.g. ``message_attention float32 N=100000``). Each
measured case becomes a :class:`Record`; :func:`record` merges records into

* ``<results>/results/<benchmark>.json``: every case's latest record (a new record replaces the
  one of the same case, other cases stay), the raw measurements in ``data``;
* ``<results>/RESULTS.md``: the benchmark's table, rewritten from that JSON between two marker
  lines (the rest of the file is left as it is).

``<results>`` is the ``benchmarks/`` folder of this checkout unless a script is given
``--results DIR`` (e.g. a scratch folder for an A/B comparison or a smoke run). History lives in
git: commit the JSON and RESULTS.md after a run worth keeping.

``python -m benchmarks.report [--results DIR]`` rewrites every table of RESULTS.md from the JSON
files (after a merge, or a hand edit of a record).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import subprocess
import tempfile
from pathlib import Path

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO = BENCHMARKS_DIR.parent
RESULTS_MD = "RESULTS.md"
RESULTS_SUBDIR = "results"
# Code whose changes a result depends on: a record made with uncommitted changes there says so
# (the results themselves excluded: a run writes them).
_MEASURED_PATHS = ("e2former_jax", "pallas_kernels", "benchmarks", ":(exclude)benchmarks/results",
                   f":(exclude)benchmarks/{RESULTS_MD}")
_TABLE_HEADER = ("| case | result | device | commit | date |", "|---|---|---|---|---|")


@dataclasses.dataclass(frozen=True)
class Record:
  """One measured case.

  Attributes:
    case: the case's stable name within its benchmark; a later record of the same case replaces it.
    result: the numbers, one line of Markdown.
    device: the accelerator (e.g. ``NVIDIA H100 80GB HBM3``) or ``cpu``.
    commit: short hash of the measured tree (``+changes``: with uncommitted changes).
    date: ISO date of the measurement.
    data: the raw measurements the result line was made from.
  """

  case: str
  result: str
  device: str
  commit: str
  date: str
  data: dict = dataclasses.field(default_factory=dict)


def git_commit() -> str:
  """Short hash of this checkout's HEAD, ``+changes`` if the measured code differs from it."""
  def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()

  try:
    commit = git("rev-parse", "--short", "HEAD")
    return commit + ("+changes" if git("status", "--porcelain", "--", *_MEASURED_PATHS) else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def today() -> str:
  return datetime.date.today().isoformat()


def script_parser(doc: str, smoke: dict) -> argparse.ArgumentParser:
  """A benchmark script's command line: its docstring as the help, and the options every script
  shares (where results go, which commit they name, and ``--smoke``: the option values ``smoke``
  for a dry run on the CPU, applied by :func:`parse`)."""
  parser = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc.split("\n\n", 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--results", type=Path, default=None,
                      help="folder of RESULTS.md and results/ (default: benchmarks/ of this "
                           "checkout; with --smoke a new temporary folder)")
  parser.add_argument("--commit", default=None,
                      help="commit to record (default: git rev-parse of this checkout)")
  parser.add_argument("--smoke", action="store_true",
                      help=f"a dry run on the CPU at the smallest sizes: {smoke}")
  parser.set_defaults(smoke_values=smoke)
  return parser


def parse(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
  """The parsed options, with the smoke values in place under ``--smoke``."""
  args = parser.parse_args(argv)
  if args.smoke:
    for name, value in args.smoke_values.items():
      setattr(args, name, value)
  return args


def device_name(device) -> str:
  """What records name a jax device: its kind (e.g. ``NVIDIA H100 80GB HBM3``), or ``cpu``."""
  return "cpu" if device.platform == "cpu" else device.device_kind


def results_dir(args: argparse.Namespace) -> Path:
  """The folder named by ``--results``; a fresh temporary one for ``--smoke`` runs without it."""
  if args.results is not None:
    return args.results
  if getattr(args, "smoke", False):
    return Path(tempfile.mkdtemp(prefix="benchmark_smoke_"))
  return BENCHMARKS_DIR


def load(benchmark: str, directory: Path = BENCHMARKS_DIR) -> list[Record]:
  """The records of ``benchmark`` in ``directory`` (none if it has no JSON yet)."""
  path = directory / RESULTS_SUBDIR / f"{benchmark}.json"
  if not path.exists():
    return []
  return [Record(**r) for r in json.loads(path.read_text())["records"]]


def record(benchmark: str, records: list[Record], directory: Path = BENCHMARKS_DIR) -> Path:
  """Merges ``records`` into the benchmark's JSON and rewrites its table; returns the JSON path."""
  merged = {r.case: r for r in load(benchmark, directory)}  # keeps the order of first appearance
  for r in records:
    merged[r.case] = r
  path = directory / RESULTS_SUBDIR / f"{benchmark}.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps({"benchmark": benchmark,
                              "records": [dataclasses.asdict(r) for r in merged.values()]},
                             indent=1) + "\n")
  write_table(benchmark, list(merged.values()), directory / RESULTS_MD)
  return path


def table(records: list[Record]) -> str:
  """The Markdown table of ``records``."""
  rows = [f"| {r.case} | {r.result} | {r.device} | {r.commit} | {r.date} |" for r in records]
  return "\n".join([*_TABLE_HEADER, *rows])


def write_table(benchmark: str, records: list[Record], path: Path) -> None:
  """Replaces the benchmark's table in the Markdown file ``path`` (appends a section if none)."""
  begin = f"<!-- {benchmark}: begin (written by benchmarks/report.py) -->"
  end = f"<!-- {benchmark}: end -->"
  block = f"{begin}\n{table(records)}\n{end}"
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + f"\n\n## {benchmark}\n\n{block}\n"
  path.write_text(text)


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description="Rewrite every table of RESULTS.md from results/*.json.")
  parser.add_argument("--results", type=Path, default=BENCHMARKS_DIR,
                      help="folder of RESULTS.md and results/ (default: benchmarks/)")
  return parser


def main(argv=None) -> None:
  args = build_parser().parse_args(argv)
  for path in sorted((args.results / RESULTS_SUBDIR).glob("*.json")):
    write_table(path.stem, load(path.stem, args.results), args.results / RESULTS_MD)
    print("rewrote the table of", path.stem)


if __name__ == "__main__":
  main()
