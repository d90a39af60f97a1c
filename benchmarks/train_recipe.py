"""How accurate is a training recipe within its budget, and does the input pipeline keep up with it?

One case is one ``e2former train`` run (a run config and ``--set`` overrides), on this machine, as a
user would start it. Before training, the training split's iterator (reading, packing, neighbour
lists, in its prefetch thread) is timed on its own for ``--pipeline-batches`` sub-batches: its
sustained sub-batches/s against the training's sub-batches/s (the run's average after its first
step, validation passes included, so the headroom is somewhat overstated) says how much the host has
to spare;
the run's own ``input_wait_fraction`` (the share of the run in which the training loop waited for a
batch) says whether the device ever starved. The result line gives the test split's errors (the
forces are -dE/dx, what simulations use), per subset for charged species, radicals and ion pairs,
the steps and minutes, the throughput and the peak device memory; the run's learning curve is kept
as ``results/train_recipe_<case>.png``.

Usage:
  python -m benchmarks.train_recipe --case NAME --config configs/builtin_gpu.yaml [--set KEY=VALUE ...]
  python -m benchmarks.train_recipe --smoke    # a two-step run of configs/tiny.yaml on the CPU
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import jax

from benchmarks import report
from benchmarks.structures import synthetic_dataset

BENCHMARK = "train_recipe"
# Subsets of the built-in data reported beside the whole test split.
SUBSETS = ("charged species", "radicals", "ion pairs")
# Sub-batches drawn (and discarded) before the iterator's timing starts: the prefetch thread's start
# and the first reads of the file are not its sustained rate.
PIPELINE_WARMUP = 5
SMOKE = dict(case="smoke", config=Path("configs/tiny.yaml"), pipeline_batches=4)
# A two-step run of a one-block model on a few synthetic molecules (benchmarks/structures.py).
SMOKE_OVERRIDES = ["model.num_layers=1", "model.channels=8", "model.num_heads=2", "model.num_rbf=8",
                   "model.edge_hidden=8", "model.type_embed_dim=4", "train.steps=2",
                   "train.max_minutes=null", "optim.decay_steps=null", "train.eval_every=2",
                   "data.split=[0.5, 0.25, 0.25]"]


def pipeline_rate(config, batches: int) -> dict:
  """Sustained sub-batches/s and atoms/s of the training iterator of ``config`` on this host."""
  from train.run_data import make_iterator, open_run_data

  data = open_run_data(config.data)
  model_config = config.model_config()
  iterator = make_iterator(data, "train", config.data, model_config, training=True,
                           seed=config.train.seed)
  stream = iterator.stream()
  try:
    for _ in range(PIPELINE_WARMUP):
      next(stream)
    atoms, start = 0, time.perf_counter()
    for _ in range(batches):
      atoms += int(next(stream)[1].num_atoms.sum())
    elapsed = time.perf_counter() - start
  finally:
    stream.close()
  return {"batches": batches, "seconds": elapsed, "batches_per_s": batches / elapsed,
          "atoms_per_s": atoms / elapsed}


def slug(case: str) -> str:
  """A file-name form of a case's name."""
  return re.sub(r"[^A-Za-z0-9]+", "_", case).strip("_").lower()


def run_case(args, results: Path) -> report.Record:
  from train import cli
  from train.metrics import CURVE_FILENAME, TABLE_JSON_FILENAME
  from train.run_config import load_run_config
  from train.train import SUMMARY_FILENAME

  config = load_run_config(args.config, args.overrides)
  pipeline = pipeline_rate(config, args.pipeline_batches)
  workdir = args.workdir or Path(tempfile.mkdtemp(prefix="train_recipe_"))
  if workdir.exists():
    shutil.rmtree(workdir)
  start = time.perf_counter()
  command = ["train", "--config", str(args.config), "--workdir", str(workdir)]
  code = cli.main(command + (["--set", *args.overrides] if args.overrides else []))
  if code:
    raise SystemExit(f"e2former train failed with exit code {code}")
  wall = time.perf_counter() - start
  summary = json.loads((workdir / SUMMARY_FILENAME).read_text())
  table = json.loads((workdir / TABLE_JSON_FILENAME).read_text())
  sub_batches = config.data.batches_per_step or jax.device_count()
  curve = Path(report.RESULTS_SUBDIR) / f"{BENCHMARK}_{slug(args.case)}.png"
  (results / curve).parent.mkdir(parents=True, exist_ok=True)
  shutil.copyfile(workdir / CURVE_FILENAME, results / curve)
  data = {"config": str(args.config), "overrides": args.overrides, "wall_s": wall,
          "learning_curve": str(curve),
          "summary": summary, "pipeline": pipeline, "sub_batches_per_step": sub_batches,
          "eval_table": table}
  return report.Record(args.case, result_line(data), report.device_name(jax.devices()[0]),
                       args.commit or report.git_commit(), report.today(), data)


def result_line(data: dict) -> str:
  test = {row["subset"]: row for row in data["eval_table"] if row["split"] == "test"}

  def errors(row):
    return f"{row['energy_mae_mev_per_atom']:.3g} meV/atom, {row['force_mae_mev_per_a']:.3g} meV/Å"

  parts = [f"test {errors(test['all'])} (-dE/dx)"] if "all" in test else ["no test split"]
  parts += [f"{name} {errors(test[name])}" for name in SUBSETS if name in test]
  s, p = data["summary"], data["pipeline"]
  training_rate = s["steps_per_s"] * data["sub_batches_per_step"]
  peak = s.get("peak_device_memory_bytes")
  parts.append(f"{s['step']} steps in {data['wall_s'] / 60:.1f} min wall (command start to end), "
               f"{s['atoms_per_s'] / 1e3:.3g}k atoms/s"
               + (f", peak {peak / 2**30:.2f} GiB" if peak else ""))
  parts.append(f"input: the iterator alone {p['batches_per_s']:.3g} sub-batches/s against training's "
               f"{training_rate:.3g} ({p['batches_per_s'] / training_rate:.2g}x); the run waited for "
               f"data {100 * s['input_wait_fraction']:.1f} % of its time")
  return "; ".join(parts)


def build_parser() -> argparse.ArgumentParser:
  """The command line (every option; documented commands are checked against it)."""
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--case", default=None, help="the case's name in the table (default: the config)")
  parser.add_argument("--config", type=Path, default=Path("configs/builtin_gpu.yaml"))
  parser.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                      help="run config overrides, as for e2former train")
  parser.add_argument("--workdir", type=Path, default=None,
                      help="the run's folder, replaced if it exists (default: a new temporary one)")
  parser.add_argument("--pipeline-batches", type=int, default=300,
                      help="sub-batches over which the iterator alone is timed")
  return parser


def main(argv=None) -> None:
  args = report.parse(build_parser(), argv)
  args.case = args.case or str(args.config)
  results = report.results_dir(args)
  if args.smoke:
    results.mkdir(parents=True, exist_ok=True)
    data = synthetic_dataset(results / "synthetic.extxyz")
    args.overrides = [*args.overrides, *SMOKE_OVERRIDES, f"data.path={data}"]
  record = run_case(args, results)
  path = report.record(BENCHMARK, [record], results)
  print(f"{record.case}: {record.result}\nrecorded in {path}")


if __name__ == "__main__":
  main()
