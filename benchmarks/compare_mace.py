"""Accuracy per minute of training: our main-command model against MACE, on the same data and CPU.

Both models train on the training split of our run's dataset (by default the built-in GFN2-xTB one
that ``bash scripts/main.sh`` trains on) for a fixed wall time on this machine, and are scored on
the same test split: energy MAE (meV/atom) and force MAE (meV/A, per component) per subset and per
electronic state (neutral closed-shell, charged, neutral open-shell), forces
being the ones each model simulates with (our -dE/dx, MACE's -dE/dx). Our model trains with its
run config's recipe within ``--minutes``; MACE trains for ``--mace-factor`` times as long (MACE's own
``mace_run_train``). Both write a checkpoint whenever a validation improves the validation loss (ours:
``checkpoints/best``, validated every ``train.eval_every`` steps): the driver copies each one as it
appears, with the training wall time then, and up to CURVE_POINTS of these snapshots per model are
scored on the test split as its learning curve. MACE's newest snapshots at 1x and at the end are its
models at 1x and 2x our budget. Our final numbers are the run's own closing evaluation of its
exported model, the newest best checkpoint, which ends our curve.

With ``--heldout`` both final models (ours; MACE at 1x and 2x) are also scored on every geometry of
another dataset, one whose molecules none of the run's splits hold: the built-in held-out build
(``python -m train.data.builtin --size heldout``, 50 molecules of each subset, docs/decisions.md D17)
compares the radicals' or ions' errors on fifty molecules each instead of the test split's handful.

MACE (mace-torch, with PyTorch) may live in another interpreter: ``--mace-python`` runs its
training and ``mace_eval.py`` there; the two sides exchange extxyz and npz files.

The MACE configuration is its "small" model of MACE-OFF23 (96 invariant channels, max_L = 0,
correlation order 3, 2 interactions), at our cutoff of 4.5 A, with MACE's default optimiser recipe
(Adam + AMSGrad, lr 0.01, batch 10, EMA 0.99, loss weights energy 1 / forces 100, per-element E0s
fitted by least squares). MACE knows neither total charge nor spin.

  python -m benchmarks.compare_mace --mace-python /path/to/mace-env/bin/python
  python -m benchmarks.compare_mace --smoke    # tiny models on synthetic molecules, ~2 min

Records the cases "E2Former <minutes> min", "MACE small <minutes> min" and "MACE small <2x> min"
(", seed S" appended when ``--seed`` is given; test MAE, overall, per subset and per state; the
E2Former record's data holds both learning curves), and with ``--heldout`` the same three cases
with ", held-out" appended, with ``benchmarks/report.py``, and plots both
curves, test force MAE against training time, our final model highlighted, to
``results/compare_mace.png``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

import ase
import ase.io
import numpy as np

from benchmarks import report
from benchmarks.structures import synthetic_dataset
from train.checkpoint import BEST, CHECKPOINT_DIRNAME
from train.data import open_dataset
from train.evaluate import evaluate_checkpoint
from train.metrics import STATE_ROWS, electronic_state, shown_states
from train.run_config import load_run_config
from train.run_data import open_run_data
from train.train import train_and_evaluate

ROOT = Path(__file__).resolve().parents[1]
MEV = 1000.0
SPLITS = ("train", "val", "test")
# MACE-OFF23 "small" (Kovacs et al. 2023): 96x0e hidden features, L = 0; MACE's defaults otherwise.
MACE_ARCHITECTURE = ["--model=MACE", "--num_channels=96", "--max_L=0", "--correlation=3",
                     "--num_interactions=2", "--max_ell=3", "--num_radial_basis=8"]
MACE_TRAINING = ["--batch_size=10", "--valid_batch_size=20", "--lr=0.01", "--ema", "--ema_decay=0.99",
                 "--amsgrad", "--energy_weight=1", "--forces_weight=100", "--E0s=average",
                 "--max_num_epochs=100000", "--eval_interval=1", "--default_dtype=float32",
                 "--device=cpu", "--error_table=PerAtomMAE"]
SMOKE_MACE_ARCHITECTURE = ["--model=MACE", "--num_channels=8", "--max_L=0", "--correlation=2",
                             "--num_interactions=1", "--max_ell=1", "--num_radial_basis=4"]
# How often the driver looks for a new checkpoint (seconds): fine against MACE's epochs of ~a minute;
# a best checkpoint of ours replaced by the next one within it is missed, which only thins the curve.
POLL_SECONDS = 2.0
# Snapshots of each learning curve that are evaluated on the test split (besides 1x and the end).
CURVE_POINTS = 8


@dataclasses.dataclass(frozen=True)
class Snapshot:
  """A checkpoint taken during training: its step (MACE: epoch), copy, and the training wall time then."""

  step: int
  path: Path
  seconds: float


# A checkpoint in training's folder: (step, where it is, where its copy goes).
Listing = Callable[[], Iterable[tuple[int, Path, Path]]]


class Snapshotter(threading.Thread):
  """Copies every new finished checkpoint that ``listing`` names, each POLL_SECONDS, while training runs.

  Training keeps only its newest checkpoint: one may be deleted while it is copied; it is skipped
  (the next poll takes its successor).
  """

  def __init__(self, listing: Listing, start: float):
    super().__init__(daemon=True)
    self.listing, self.start_time = listing, start
    self.found: dict[int, Snapshot] = {}
    self.error: BaseException | None = None
    self.stopped = threading.Event()

  def run(self) -> None:
    try:
      while not self.stopped.wait(POLL_SECONDS):
        self.poll()
    except BaseException as error:  # re-raised by stop(), in the driver's thread
      self.error = error

  def poll(self) -> None:
    for step, path, copy in self.listing():
      if step in self.found:
        continue
      try:
        # MACE writes its .pt in place: a file changed within the last poll may be half-written (one
        # copied so at 5e9b145 failed to load); the next poll takes it.
        if path.is_file() and time.time() - path.stat().st_mtime < POLL_SECONDS:
          continue
        if path.is_dir():
          shutil.copytree(path, copy)
        else:
          shutil.copy2(path, copy)
      except (FileNotFoundError, shutil.Error):
        if path.exists():  # not a checkpoint deleted mid-copy
          raise
        if copy.is_dir():
          shutil.rmtree(copy)
        continue
      self.found[step] = Snapshot(step, copy, time.perf_counter() - self.start_time)

  def stop(self, *, last_look: bool) -> list[Snapshot]:
    """Stops polling, after one more poll with ``last_look``; the snapshots in order of time."""
    self.stopped.set()
    self.join()
    if self.error is not None:
      raise self.error
    if last_look:
      self.poll()
    return sorted(self.found.values(), key=lambda s: s.seconds)


def write_frames(dataset, indices, path: Path) -> list[str]:
  """The records as extxyz with MACE's REF_* keys, subset as config_type; returns the subsets in order."""
  frames, subsets = [], []
  for i in indices:
    record = dataset.read(int(i))
    s = record.structure
    atoms = ase.Atoms(numbers=s.numbers, positions=s.positions)
    atoms.info.update(REF_energy=float(record.energy), config_type=record.subset.replace(" ", "_"),
                      charge=int(s.charge), spin=int(s.spin))
    atoms.arrays["REF_forces"] = np.asarray(record.forces, np.float64)
    frames.append(atoms)
    subsets.append(record.subset)
  ase.io.write(path, frames, format="extxyz")
  return subsets


def errors(frames, subsets: list[str], energy: np.ndarray, forces: np.ndarray) -> dict[str, dict]:
  """Energy MAE (meV/atom, per molecule then averaged) and force MAE (meV/A, per component) by subset
  and, as in our error tables, by electronic state when the frames have more than one."""
  sizes = np.array([len(a) for a in frames])
  ref_e = np.array([a.info["REF_energy"] for a in frames])
  ref_f = np.concatenate([a.arrays["REF_forces"] for a in frames])
  e_err = np.abs(energy - ref_e) / sizes  # [configs]
  f_err = np.abs(forces - ref_f).mean(axis=1)  # [atoms], mean over components
  owner = np.repeat(np.arange(len(frames)), sizes)
  states = electronic_state(np.array([a.info["charge"] for a in frames]),
                            np.array([a.info["spin"] for a in frames]))  # [configs]
  groups = {"all": np.ones(len(frames), bool)}
  groups.update((name, np.array([s == name for s in subsets])) for name in sorted(set(subsets)))
  groups.update((STATE_ROWS[i], states == i)
                for i in shown_states(np.bincount(states, minlength=len(STATE_ROWS))))
  table = {}
  for name, chosen in groups.items():
    table[name] = {"molecules": int(chosen.sum()),
                   "energy_mae_mev_per_atom": MEV * float(e_err[chosen].mean()),
                   "force_mae_mev_per_a": MEV * float(f_err[chosen[owner]].mean())}
  return table


def table_test_errors(table: list[dict]) -> dict[str, dict]:
  """Our error table's test rows by subset, in the shape of :func:`errors`."""
  return {r["subset"]: {"molecules": r["molecules"], "energy_mae_mev_per_atom": r["energy_mae_mev_per_atom"],
                        "force_mae_mev_per_a": r["force_mae_mev_per_a"]}
          for r in table if r["split"] == "test"}


def train_ours(args, config, out: Path) -> dict:
  """Trains our run, snapshotting its best checkpoint (written when a validation improves the loss)."""
  run, kept = out / "ours", out / "ours" / "snapshots"
  best = run / CHECKPOINT_DIRNAME / BEST

  def listing():  # orbax writes into a temporary folder and renames it to the step when finished
    steps = [p for p in best.iterdir() if p.name.isdigit()] if best.is_dir() else []
    # Each copy is a run folder of its own, so that the checkpoint tools find it.
    return [(int(p.name), p, kept / p.name / CHECKPOINT_DIRNAME / BEST / p.name) for p in steps]

  start = time.perf_counter()
  snapshotter = Snapshotter(listing, start)
  snapshotter.start()
  try:
    result = train_and_evaluate(config, run, progress=not args.quiet)
  except BaseException:
    snapshotter.stop(last_look=False)
    raise
  seconds = time.perf_counter() - start
  # The last look takes the closing validation's checkpoint: finished when training returns. The
  # newest best is the model the run's closing evaluation scored (train.TrainResult.table): it ends
  # the curve.
  snapshots = snapshotter.stop(last_look=True)
  if not snapshots or snapshots[-1].step != result.table_step:
    raise RuntimeError(f"the run's evaluated checkpoint (step {result.table_step}) was not snapshotted")
  curve = []
  for s in curve_points(snapshots, seconds):
    table = evaluate_checkpoint(s.path.parent, splits=("test",), out=kept / str(s.step), progress=False)
    curve.append({"minutes": s.seconds / 60, "step": s.step, "test": table_test_errors(table)})
  return {"wall_seconds": seconds, "steps": result.step, "evaluated_step": result.table_step,
          "test": table_test_errors(result.table), "curve": curve}


def mace_command(args, folder: Path, cutoff: float, numbers: list[int], max_epochs: int | None = None
                 ) -> list[str]:
  architecture = SMOKE_MACE_ARCHITECTURE if args.smoke else MACE_ARCHITECTURE
  command = [args.mace_python, "-m", "mace.cli.run_train", "--name=mace",
             f"--train_file={folder / 'train.xyz'}", f"--valid_file={folder / 'val.xyz'}",
             "--energy_key=REF_energy", "--forces_key=REF_forces", f"--r_max={cutoff}",
             f"--atomic_numbers={numbers}", f"--work_dir={folder}", *architecture, *MACE_TRAINING,
             f"--seed={args.seed or 0}"]
  if max_epochs is not None:  # a restart that only saves the loaded checkpoint as a model
    command = [c for c in command if not c.startswith("--max_num_epochs")]
    command += [f"--max_num_epochs={max_epochs}", "--restart_latest"]
  return command


def train_mace(args, folder: Path, cutoff: float, numbers: list[int], seconds: float) -> list[Snapshot]:
  """Runs MACE's training for ``seconds`` of wall time, keeping every checkpoint it writes."""
  checkpoints, kept = folder / "checkpoints", folder / "snapshots"
  kept.mkdir(parents=True, exist_ok=True)

  def listing():
    return [(int(p.stem.rsplit("_epoch-", 1)[1]), p, kept / p.name)
            for p in (checkpoints.glob("*_epoch-*.pt") if checkpoints.is_dir() else ())]

  log = (folder / "mace_train.log").open("w")
  start = time.perf_counter()
  process = subprocess.Popen(mace_command(args, folder, cutoff, numbers), cwd=folder, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
  snapshotter = Snapshotter(listing, start)
  snapshotter.start()
  try:
    process.wait(timeout=seconds)
  except subprocess.TimeoutExpired:
    pass
  finally:
    # No last look after the kill: a checkpoint MACE was writing then may be cut short.
    snapshots = snapshotter.stop(last_look=False)
    if process.poll() is None:
      os.killpg(process.pid, signal.SIGTERM)
      process.wait(timeout=60)
    log.close()
  if process.returncode not in (0, -signal.SIGTERM, None):
    raise RuntimeError(f"MACE training failed (exit {process.returncode}); see {folder / 'mace_train.log'}")
  return snapshots


def mace_model(args, folder: Path, cutoff: float, numbers: list[int], last: Snapshot) -> Path:
  """A whole MACE model file for the run's architecture: restart from the last snapshot and save."""
  restart = folder / "restart"
  shutil.rmtree(restart, ignore_errors=True)
  (restart / "checkpoints").mkdir(parents=True)
  shutil.copy2(last.path, restart / "checkpoints" / last.path.name)
  for name in ("train.xyz", "val.xyz"):
    shutil.copy2(folder / name, restart / name)
  with (folder / "mace_restart.log").open("w") as log:
    subprocess.run(mace_command(args, restart, cutoff, numbers, max_epochs=last.step), cwd=restart,
                   stdout=log, stderr=subprocess.STDOUT, check=True)
  return next((restart / "checkpoints").glob("*.model"))


def mace_errors(args, model: Path, xyz: Path, subsets: list[str], checkpoints: list[Path], out: Path
                ) -> list[dict[str, dict]]:
  """Error tables (:func:`errors`) of MACE's weights at each checkpoint on the frames of ``xyz``."""
  subprocess.run([args.mace_python, str(Path(__file__).with_name("mace_eval.py")), "--model", str(model),
                  "--xyz", str(xyz), "--out", str(out), "--checkpoint", *map(str, checkpoints)], check=True)
  frames = ase.io.read(xyz, index=":")
  tables = []
  for checkpoint in checkpoints:
    npz = np.load(out / f"{checkpoint.stem}.npz")
    tables.append(errors(frames, subsets, npz["energy"], npz["forces"]))
  return tables


def curve_points(snapshots: list[Snapshot], budget: float) -> list[Snapshot]:
  """The snapshots to evaluate: the newest at 1x and at the end, and up to CURVE_POINTS between."""
  chosen = {id(s): s for s in snapshots[:: max(1, len(snapshots) // CURVE_POINTS)]}
  at_budget = [s for s in snapshots if s.seconds <= budget]
  for s in ([at_budget[-1]] if at_budget else []) + snapshots[-1:]:
    chosen[id(s)] = s
  return sorted(chosen.values(), key=lambda s: s.seconds)


def plot(summary: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  def force_mae(curve):
    return [p["minutes"] for p in curve], [p["test"]["all"]["force_mae_mev_per_a"] for p in curve]

  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  ax.plot(*force_mae(summary["mace"]["curve"]), "o-", label="MACE (small), test")
  ours = summary["ours"]
  (line,) = ax.plot(*force_mae(ours["curve"]), "s-", label="E2Former (main command), test")
  ax.plot([ours["wall_seconds"] / 60], [ours["test"]["all"]["force_mae_mev_per_a"]], "*", ms=14,
          color=line.get_color(), label="E2Former, exported model")
  for minutes in (summary["minutes"], summary["minutes"] * summary["mace_factor"]):
    ax.axvline(minutes, color="grey", ls=":", lw=1)
  ax.set(xlabel="training wall time (min, same CPU)", ylabel="test force MAE (meV/\u00c5)",
         yscale="log", title="Force error against training time")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def result_line(test: dict[str, dict], scored: str = "test") -> str:
  """MAE of every subset: energy meV/atom / force meV/A."""
  return "; ".join(f"{name} {row['energy_mae_mev_per_atom']:.1f} / {row['force_mae_mev_per_a']:.1f}"
                   for name, row in test.items()) + f" ({scored}, E meV/atom / F meV/\u00c5)"


SMOKE = {"minutes": 0.4, "mace_factor": 2.0}


def build_parser():
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--config", type=Path, default=ROOT / "configs" / "tiny.yaml",
                      help="our run config (default: the main command's)")
  parser.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                      help="overrides of our run config")
  parser.add_argument("--minutes", type=float, default=None,
                      help="our training budget (default: the config's train.max_minutes)")
  parser.add_argument("--mace-factor", type=float, default=2.0, help="MACE trains this many times as long")
  parser.add_argument("--seed", type=int, default=None,
                      help="training seed of both models (ours: train.seed, default the config's; MACE's "
                           "--seed, default 0); the data split stays fixed")
  parser.add_argument("--mace-python", default=sys.executable, help="interpreter with mace-torch")
  parser.add_argument("--work", type=Path, default=ROOT / "runs" / "compare_mace",
                      help="scratch folder of both trainings (replaced)")
  parser.add_argument("--heldout", type=Path, default=None,
                      help="a dataset of molecules none of the splits hold (e.g. the built-in held-out "
                           "build): both final models are also scored on all of it (--smoke: a synthetic one)")
  parser.add_argument("--quiet", action="store_true")
  return parser


def main(argv=None) -> list[report.Record]:
  args = report.parse(build_parser(), argv)
  results = report.results_dir(args)

  overrides = list(args.overrides) + ([] if args.seed is None else [f"train.seed={args.seed}"])
  if args.smoke:
    overrides += ["model.num_layers=1", "model.channels=8", "model.num_heads=2", "model.num_rbf=8",
                  "model.edge_hidden=8", "model.type_embed_dim=4", "train.eval_every=5",
                  "train.log_every=5", "data.split=[0.5, 0.25, 0.25]",
                  f"data.path={synthetic_dataset(results / 'synthetic.extxyz')}"]
  minutes = args.minutes or load_run_config(args.config, overrides).train.max_minutes
  config = load_run_config(args.config, overrides + [f"train.max_minutes={minutes}", "train.steps=null",
                                                     "optim.decay_steps=null"])
  shutil.rmtree(args.work, ignore_errors=True)
  folder = args.work / "mace"
  folder.mkdir(parents=True)
  data = open_run_data(config.data)
  subsets = {split: write_frames(data.dataset, data.splits[split], folder / f"{split}.xyz") for split in SPLITS}
  numbers = sorted({int(z) for a in ase.io.read(folder / "train.xyz", index=":") for z in a.numbers})
  cutoff = config.model_config().cutoff
  heldout_path = synthetic_dataset(results / "heldout.extxyz", seed=1) if args.smoke else args.heldout
  if heldout_path is not None:  # read (and refused if unusable) before anything trains
    heldout = open_dataset(heldout_path, on_error=config.data.on_error)
    heldout_subsets = write_frames(heldout, range(len(heldout)), folder / "heldout.xyz")

  ours = train_ours(args, config, args.work)
  budget = 60.0 * minutes
  snapshots = train_mace(args, folder, cutoff, numbers, args.mace_factor * budget)
  if not snapshots:
    raise RuntimeError(f"MACE wrote no checkpoint in {args.mace_factor * budget:.0f} s")
  points = curve_points(snapshots, budget)
  model = mace_model(args, folder, cutoff, numbers, points[-1])
  tables = mace_errors(args, model, folder / "test.xyz", subsets["test"], [p.path for p in points],
                       folder / "predictions")
  curve = [{"minutes": p.seconds / 60, "epoch": p.step, "test": table} for p, table in zip(points, tables)]
  # MACE's models at 1x (its newest snapshot within our budget; None if it wrote none by then) and at
  # the end, as indices into points and curve.
  within = [i for i, p in enumerate(points) if p.seconds <= budget]
  finals = [within[-1] if within else None, len(points) - 1]
  summary = {"minutes": minutes, "mace_factor": args.mace_factor, "config": str(args.config),
             "overrides": overrides, "records": {s: len(data.splits[s]) for s in SPLITS},
             "cpu_cores": len(os.sched_getaffinity(0)), "ours": ours,
             "mace": {"architecture": MACE_ARCHITECTURE, "training": MACE_TRAINING, "curve": curve}}
  seed = "" if args.seed is None else f", seed {args.seed}"  # each seed keeps its own rows
  names = [f"E2Former ({args.config.name}) {minutes:g} min{seed}", f"MACE small {minutes:g} min{seed}",
           f"MACE small {args.mace_factor * minutes:g} min{seed}"]
  # Rows (case, scored on, error table, payload); the E2Former record carries the whole comparison (both
  # curves, settings) in its data.
  rows = [(names[0], "test", ours["test"], summary)]
  rows += [(name, "test", None, {}) if i is None else (name, "test", curve[i]["test"], curve[i])
           for name, i in zip(names[1:], finals)]
  if heldout_path is not None:
    ours_heldout = table_test_errors(evaluate_checkpoint(
        args.work / "ours", data_path=str(heldout_path), splits=("test",), overrides=["data.split=[0, 0, 1]"],
        out=args.work / "ours" / "heldout", progress=False))
    present = [i for i in finals if i is not None]
    mace_heldout = mace_errors(args, model, folder / "heldout.xyz", heldout_subsets,
                               [points[i].path for i in present], folder / "heldout_predictions")
    mace_heldout = [None] * (len(finals) - len(present)) + mace_heldout  # only the 1x model can be missing
    summary["heldout"] = {"path": str(heldout_path), "ours": ours_heldout, "mace": mace_heldout}
    rows += [(f"{name}, held-out", "held-out", table, {"heldout": str(heldout_path), "test": table})
             for name, table in zip(names, [ours_heldout, *mace_heldout])]
  (results / report.RESULTS_SUBDIR).mkdir(parents=True, exist_ok=True)
  plot(summary, results / report.RESULTS_SUBDIR / "compare_mace.png")
  commit, date = args.commit or report.git_commit(), report.today()
  device = f"cpu ({summary['cpu_cores']} cores)"
  records = [report.Record(case, result_line(table, scored) if table else "no checkpoint yet", device, commit,
                           date, payload) for case, scored, table, payload in rows]
  report.record("compare_mace", records, results)
  for r in records:
    print(f"{r.case}: {r.result}")
  return records


if __name__ == "__main__":
  main()
