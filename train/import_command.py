"""``e2former import``: a checkpoint trained with the authors' code as a run folder of ours.

The folder holds the checkpoint format training writes (``train/checkpoint.py``, one "last"
checkpoint at step 0): the imported weights as both the parameters and the EMA weights, a fresh
optimiser state, no reference energies (the authors' model predicts total energies), and a run
config whose model section is the imported architecture. ``e2former eval``, ``e2former md``,
``train.checkpoint.load_predictor`` and the ASE calculator take it unchanged. The checkpoint's meta records
the source file, its sha256 and the mapping (``imported_from``).

Example::

  e2former import their_checkpoint.pt --out runs/imported --reference-config e2former.yaml
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml

from e2former_jax.config import SoftmaxSink
from e2former_jax.interop.authors_checkpoint import import_checkpoint
from e2former_jax.reference_energies import ReferenceEnergies
from train.checkpoint import CHECKPOINT_DIRNAME, LAST, Checkpointer, PredictorInfo
from train.data import DataPosition
from train.optimizer import make_optimizer
from train.run_config import RunConfig, model_config_to_dict
from train.state import create_train_state

# Config fields that choose how to compute, not what: left to the runs that load the folder.
_COMPUTE_FIELDS = ("attention_impl", "radial_impl", "radial_vjp_kernel", "remat", "direct_force_head")
# Read in chunks for the checksum, so a large checkpoint is never held twice in memory.
_HASH_CHUNK = 1 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("checkpoint", type=Path,
                      help="the authors' checkpoint: .pt (torch.save zip format), .safetensors or .npz")
  parser.add_argument("--out", type=Path, required=True,
                      help="run folder to create (must not exist or be empty)")
  parser.add_argument("--reference-config", type=Path, default=None,
                      help="their backbone config (YAML/JSON with e2former.yaml's keys, or a mapping "
                           "holding backbone_config): cutoff, max_neighbors, avg_degree, checked "
                           "against the shapes (default: the shapes and their defaults)")
  parser.add_argument("--head", default=None, help="data-set head to import (default: the only one)")
  parser.add_argument("--prefix", default=None,
                      help="key prefix of the model inside the file, e.g. 'model.' (default: found)")
  parser.add_argument("--softmax-sink", choices=[s.value for s in SoftmaxSink],
                      default=SoftmaxSink.MAX_LOGIT.value,
                      help="max_logit (default): the authors' numbers; zero: our smooth sink "
                           "(continuous at the cutoff, works with neighbour lists and periodic "
                           "cells; docs/decisions.md D1)")


def run_command(args) -> int:
  out = args.out.expanduser().absolute()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out} exists and is not an empty folder")
  reference_config = None
  if args.reference_config is not None:
    reference_config = _read_mapping(args.reference_config)
  # float32, the format training writes (their checkpoints are float32 too).
  imported = import_checkpoint(args.checkpoint, reference_config=reference_config, head=args.head,
                               prefix=args.prefix, dtype=np.float32)
  config = imported.config.replace(softmax_sink=SoftmaxSink(args.softmax_sink))
  source = {"file": str(args.checkpoint.expanduser().absolute()),
            "sha256": file_sha256(args.checkpoint),
            "reference_config": None if args.reference_config is None else
            str(args.reference_config.expanduser().absolute()),
            "softmax_sink": config.softmax_sink.value,
            "mapping": imported.report.to_json()}
  write_run(out, config, imported.params, source)
  print(imported.report.summary(config))
  print(f"wrote {out} (checkpoint {out / CHECKPOINT_DIRNAME / LAST})")
  return 0


def write_run(out: Path, config, params, source: dict) -> None:
  """The run folder, written next to ``out`` and renamed into place (nothing half-written)."""
  model = {"preset": "paper", **{k: v for k, v in model_config_to_dict(config).items()
                                 if k not in _COMPUTE_FIELDS}}
  run_config = RunConfig(model=model)
  optimizer, _ = make_optimizer(run_config.optim, run_config.decay_steps, params)
  state = create_train_state(params, optimizer, run_config.train.seed)
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
  try:
    checkpointer = Checkpointer(staging / CHECKPOINT_DIRNAME, asynchronous=False)
    checkpointer.save(LAST, state, meta={"data_position": DataPosition().to_dict(),
                                         "imported_from": source},
                      predictor=PredictorInfo(model_config=config, reference_energies=ReferenceEnergies(),
                                              run_config=run_config))
    checkpointer.close()
    if out.exists():
      out.rmdir()  # empty, checked by the caller
    staging.rename(out)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise


def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with Path(path).open("rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _read_mapping(path: Path) -> dict:
  """A YAML or JSON mapping (JSON is YAML)."""
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  try:
    tree = yaml.safe_load(path.read_text())
  except yaml.YAMLError as err:
    raise ValueError(f"{path}: not YAML or JSON ({err})".replace("\n", " ")) from None
  if not isinstance(tree, dict):
    raise ValueError(f"{path}: expected a mapping of config keys")
  return tree
