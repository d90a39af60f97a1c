"""``e2former train|eval|md``: the command line (kept short; the logic is in the library modules).

Examples::

  e2former train --config configs/tiny.yaml --set optim.lr=1e-3 model.channels=32
  e2former train --config configs/paper_spice.yaml --data /path/to/SPICE.hdf5
  e2former eval runs/tiny --splits val test
  e2former md runs/tiny --molecule ethanol --ensemble nvt --temperature 300 --steps 2000
  e2former import their_checkpoint.pt --out runs/imported
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Sequence

from train import sharding
from train.interrupt import TrainingInterrupted

DEFAULT_RUNS_DIR = Path("runs")
# XLA's compiled programs persist here between commands (a directory, or "off"): a rerun, a resumed run,
# `eval` and `md` load the training or evaluation step instead of compiling it again (the tiny model's
# training step takes ~25 s to compile on 2 CPU cores, the paper model's ~80 s on an H100). JAX's own
# JAX_COMPILATION_CACHE_DIR, when set, takes precedence.
XLA_CACHE_ENV = "E2FORMER_XLA_CACHE"
XLA_CACHE_DIRNAME = "xla"  # under the project's cache root, beside the built-in dataset's builds
# The shell's convention for a command ended by SIGINT (128 + signal number 2).
INTERRUPTED_EXIT_CODE = 130


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the command; a bad configuration or dataset prints one ``error:`` line and returns 2.

  Ctrl-C prints one line saying where the run stopped and returns 130. Warnings are printed as one
  ``warning:`` line each.
  """
  args = _parser().parse_args(argv)
  with warnings.catch_warnings():
    warnings.showwarning = _show_warning
    try:
      return _run(args)
    except ValueError as err:  # invalid config, missing/corrupt dataset, unusable checkpoint
      print(f"error: {err}", file=sys.stderr)
      return 2
    except TrainingInterrupted as err:
      print(err, file=sys.stderr)
      return INTERRUPTED_EXIT_CODE
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      return INTERRUPTED_EXIT_CODE


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
  print(f"warning: {message}", file=file or sys.stderr)


def enable_compilation_cache() -> None:
  """Points JAX's persistent compilation cache at ``$E2FORMER_XLA_CACHE`` (default
  ``~/.cache/e2former_jax/xla``), unless that is "off" or JAX already has a cache directory."""
  import jax

  from train.data.builtin.build import DEFAULT_CACHE_ROOT

  setting = os.environ.get(XLA_CACHE_ENV, "")
  if not (jax.config.jax_compilation_cache_dir or setting.lower() == "off"):
    path = Path(setting) if setting else DEFAULT_CACHE_ROOT / XLA_CACHE_DIRNAME
    jax.config.update("jax_compilation_cache_dir", str(path.expanduser()))


def _run(args) -> int:
  enable_compilation_cache()
  # Before anything touches a device: a multi-process launch must initialise the runtime first.
  sharding.maybe_initialize_distributed(getattr(args, "coordinator_address", None),
                                        getattr(args, "num_processes", None),
                                        getattr(args, "process_id", None),
                                        auto=getattr(args, "auto_cluster", False))
  if args.command == "train":
    return _train(args)
  if args.command == "md":
    from train.md_command import run_command

    return run_command(args)
  if args.command == "import":
    from train.import_command import run_command as run_import

    return run_import(args)
  return _eval(args)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="e2former", description="Train and evaluate E2Former-V2 potentials.")
  commands = parser.add_subparsers(dest="command", required=True)

  train = commands.add_parser("train", help="train (or resume) a run")
  train.add_argument("--config", type=Path, default=None, help="run config YAML (default: built-in defaults)")
  train.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                     metavar="KEY=VALUE", help="override config fields, e.g. optim.lr=1e-3 model.channels=32")
  train.add_argument("--data", default=None, help="dataset path (same as --set data.path=PATH)")
  train.add_argument("--workdir", type=Path, default=None,
                     help=f"output folder (default {DEFAULT_RUNS_DIR}/<config name>); an existing run there "
                          "is resumed")
  train.add_argument("--overwrite", action="store_true",
                     help="delete the previous run's outputs in --workdir and start over")
  train.add_argument("--no-final-eval", action="store_true", help="skip the final validation/test table")

  evaluate = commands.add_parser("eval", help="evaluate a checkpoint: per-subset error table")
  evaluate.add_argument("checkpoint", type=Path,
                        help="a run folder, its checkpoints folder, or .../best|last")
  evaluate.add_argument("--which", choices=("best", "last"), default=None,
                        help="checkpoint to evaluate (default: best if present, else last)")
  evaluate.add_argument("--data", default=None,
                        help="evaluate on another dataset (same split rule; all of it as the test split with "
                             "--splits test --set data.split=[0,0,1])")
  evaluate.add_argument("--splits", nargs="+", default=["val", "test"], choices=("train", "val", "test"))
  evaluate.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                        metavar="KEY=VALUE", help="override data fields, e.g. data.max_eval_batches=10")
  evaluate.add_argument("--out", type=Path, default=None,
                        help="folder for eval_table.md/json (default: the run folder)")

  from train.md_command import add_arguments as add_md_arguments

  md = commands.add_parser("md", help="molecular dynamics of a molecule with a trained checkpoint")
  add_md_arguments(md)

  from train.import_command import add_arguments as add_import_arguments

  add_import_arguments(commands.add_parser(
      "import", help="a checkpoint trained with the authors' code as a run folder of ours"))

  for sub in (train, evaluate):
    sub.add_argument("--devices", type=int, default=None, help="use the first N local devices (default all)")
    sub.add_argument("--quiet", action="store_true", help="no progress bar or messages")
    sub.add_argument("--coordinator-address", default=None,
                     help=f"multi-process launch: coordinator host:port (or ${sharding.COORDINATOR_ENV})")
    sub.add_argument("--num-processes", type=int, default=None,
                     help=f"multi-process launch: number of processes (or ${sharding.NUM_PROCESSES_ENV})")
    sub.add_argument("--process-id", type=int, default=None,
                     help=f"multi-process launch: this process's index (or ${sharding.PROCESS_ID_ENV})")
    sub.add_argument("--auto-cluster", action="store_true",
                     help="multi-process launch configured by the cluster scheduler: jax.distributed "
                          f"reads the environment of {sharding.AUTO_DETECTED_CLUSTERS} (e.g. srun)")
  return parser


def _train(args) -> int:
  from train.checkpoint import CHECKPOINT_DIRNAME
  from train.run_config import load_run_config
  from train.train import NonFiniteHalt, train_and_evaluate

  overrides = list(args.overrides) + ([f"data.path={args.data}"] if args.data else [])
  config = load_run_config(args.config, overrides)
  workdir = args.workdir or DEFAULT_RUNS_DIR / (args.config.stem if args.config else "default")
  if args.overwrite and workdir.exists():
    if not (workdir / CHECKPOINT_DIRNAME).is_dir() and any(workdir.iterdir()):
      raise SystemExit(f"error: --overwrite refuses to delete {workdir}: it does not look like a run "
                       f"folder (no {CHECKPOINT_DIRNAME}/)")
    shutil.rmtree(workdir)
  try:
    train_and_evaluate(config, workdir, num_devices=args.devices, progress=not args.quiet,
                       final_eval=not args.no_final_eval)
  except NonFiniteHalt as err:
    print(f"error: {err}", file=sys.stderr)
    return 1
  return 0


def _eval(args) -> int:
  from train.evaluate import evaluate_checkpoint

  evaluate_checkpoint(args.checkpoint, which=args.which, data_path=args.data, splits=args.splits,
                      overrides=args.overrides, out=args.out, num_devices=args.devices,
                      progress=not args.quiet)
  return 0


if __name__ == "__main__":
  sys.exit(main())
