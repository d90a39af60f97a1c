"""Orbax checkpoints of a run ("last" for resuming, "best" by validation loss) and the predictor loader.

Layout under ``<workdir>/checkpoints``::

  last/<step>/   train_state  (params, optimiser state, counters, random state; orbax)
                 ema_params   (EMA weights: what evaluation and export use; orbax)
                 meta/        (JSON: step, data position, validation metrics)
                 predictor/   (JSON: model config, fitted reference energies, run config)
  best/<step>/   the same items, written when the validation loss improves

Each manager keeps one step; saving is asynchronous (the next save or :meth:`Checkpointer.close`
waits). A checkpoint folder alone rebuilds the predictor: :func:`load_predictor` (and the ASE
calculator, :func:`load_calculator`); :func:`load_checkpoint` also gives the run's configuration.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from e2former_jax.config import AttentionImpl, E2FormerConfig, Precision
from e2former_jax.interop.predictor import Predictor
from e2former_jax.nn.model import E2Former
from e2former_jax.reference_energies import ReferenceEnergies
from train.run_config import (ForceMode, RunConfig, model_config_from_dict, model_config_to_dict,
                              run_config_from_dict)
from train.state import TrainState

CHECKPOINT_DIRNAME = "checkpoints"
LAST = "last"
BEST = "best"
# Bumped when the items or their meaning change; load_predictor refuses unknown versions. Version 2
# stores charge and spin reference offsets; version 1 (per-element references only) still loads.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)


@dataclasses.dataclass(frozen=True)
class PredictorInfo:
  """What, besides the weights, turns a checkpoint into a predictor.

  Attributes:
    model_config: the architecture.
    reference_energies: subtracted from the targets; the model predicts E - E_ref(Z, q, 2S+1).
    run_config: the run that produced the checkpoint.
  """

  model_config: E2FormerConfig
  reference_energies: ReferenceEnergies
  run_config: RunConfig

  def to_json(self) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "model_config": model_config_to_dict(self.model_config),
        "reference_energies": self.reference_energies.to_dict(),
        "run_config": self.run_config.to_dict(),
    }

  def predictor(self, params, *, attention_impl: AttentionImpl = AttentionImpl.AUTO,
                remat: bool = False, precision: Precision | None = None) -> Predictor:
    """The :class:`Predictor` of these weights, computed with ``attention_impl``, ``remat`` and
    ``precision`` (None: the saved configuration's)."""
    config = self.model_config.replace(attention_impl=attention_impl, remat=remat,
                                       precision=precision or self.model_config.precision)
    return Predictor(model=E2Former(config), params=params, reference_energies=self.reference_energies,
                     conservative_forces_trained=self.run_config.loss.forces is ForceMode.CONSERVATIVE)

  @classmethod
  def from_json(cls, tree: dict[str, Any], *, source: str) -> "PredictorInfo":
    version = tree.get("format_version")
    if version not in READABLE_VERSIONS:
      raise ValueError(f"{source}: checkpoint format version {version!r}, this code reads "
                       f"{list(READABLE_VERSIONS)}")
    return cls(model_config=model_config_from_dict(tree["model_config"]),
               reference_energies=ReferenceEnergies.from_dict(tree["reference_energies"]),
               run_config=run_config_from_dict(tree["run_config"], source=source))


class Checkpointer:
  """Saves and restores the "last" and "best" checkpoints of one run (all processes call it)."""

  def __init__(self, directory: str | Path, *, asynchronous: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=asynchronous)
    self._managers = {name: _manager(self.directory / name, options) for name in (LAST, BEST)}

  def save(self, which: str, state: TrainState, *, meta: dict[str, Any], predictor: PredictorInfo) -> None:
    """Starts an asynchronous save of ``state`` under "last" or "best" at ``state.step``."""
    step = int(jax.device_get(state.step))
    items = ocp.args.Composite(
        train_state=ocp.args.StandardSave(_train_items(state)),
        ema_params=ocp.args.StandardSave(state.ema_params),
        meta=ocp.args.JsonSave({"step": step, **meta}),
        predictor=ocp.args.JsonSave(predictor.to_json()),
    )
    self._managers[which].save(step, args=items, force=True)

  def latest_meta(self, which: str) -> dict[str, Any] | None:
    """The JSON meta of the newest finished checkpoint of "last"/"best", or None if there is none."""
    restored = self._restore(which)
    return None if restored is None else restored["meta"]

  def predictor_info(self, which: str) -> PredictorInfo | None:
    """The predictor JSON of the newest finished checkpoint of "last"/"best", or None."""
    restored = self._restore(which, predictor=ocp.args.JsonRestore())
    if restored is None:
      return None
    return PredictorInfo.from_json(restored["predictor"],
                                   source=f"{self.directory / which}/{restored['meta']['step']}")

  def restore(self, which: str, target: TrainState, shardings) -> tuple[TrainState, dict[str, Any]] | None:
    """Restores the newest checkpoint into arrays laid out like ``target`` (None if there is none).

    Args:
      which: "last" or "best".
      target: a train state with the right structure, shapes and dtypes (values unused).
      shardings: pytree of shardings like ``target``.
    """
    abstract = _abstract(target, shardings)
    restored = self._restore(which, train_state=ocp.args.StandardRestore(_train_items(abstract)),
                             ema_params=ocp.args.StandardRestore(abstract.ema_params))
    if restored is None:
      return None
    items = restored["train_state"]
    state = TrainState(ema_params=restored["ema_params"], **items["counters"],
                       params=items["params"], opt_state=items["opt_state"])
    return state, restored["meta"]

  def restore_ema_params(self, which: str, target, shardings) -> Any | None:
    """The EMA weights of the newest "last"/"best" checkpoint, laid out like ``target`` (a pytree of
    EMA weights with its ``shardings``); None if there is none."""
    restored = self._restore(which, ema_params=ocp.args.StandardRestore(_abstract(target, shardings)))
    return None if restored is None else restored["ema_params"]

  def _restore(self, which: str, **items) -> dict[str, Any] | None:
    """``items`` and the meta of the newest finished checkpoint of "last"/"best" (None if none)."""
    manager = self._managers[which]
    manager.wait_until_finished()
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), **items))

  def wait(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()

  def close(self) -> None:
    for manager in self._managers.values():
      manager.wait_until_finished()
      manager.close()


def _manager(directory: Path, options: ocp.CheckpointManagerOptions | None = None) -> ocp.CheckpointManager:
  """A manager that knows the handler of every item (so any subset can be read back)."""
  handlers = {"train_state": ocp.StandardCheckpointHandler(), "ema_params": ocp.StandardCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler(), "predictor": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _abstract(target, shardings):
  """Shapes and dtypes of ``target`` with ``shardings``: where a restore puts the arrays."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)


def _train_items(state: TrainState) -> dict[str, Any]:
  counters = {name: getattr(state, name)
              for name in ("step", "opt_step", "rng", "nonfinite_total", "nonfinite_run")}
  return {"params": state.params, "opt_state": state.opt_state, "counters": counters}


def resolve_checkpoint_dir(path: str | Path, which: str | None = None) -> Path:
  """The "last"/"best" manager folder for a run folder, its ``checkpoints`` folder or that folder itself.

  ``which=None`` prefers "best" and falls back to "last".
  """
  path = Path(path).expanduser().absolute()
  if (path / CHECKPOINT_DIRNAME).is_dir():
    path = path / CHECKPOINT_DIRNAME
  if path.name in (LAST, BEST) and which is None:
    return path
  for name in ([which] if which else [BEST, LAST]):
    candidate = path / name
    if candidate.is_dir() and _manager(candidate).latest_step() is not None:
      return candidate
  raise ValueError(f"no checkpoint found under {path} (looked for {which or 'best or last'})")


def load_checkpoint(checkpoint_dir: str | Path, which: str | None = None) -> tuple[Any, PredictorInfo]:
  """The EMA weights (``{"params": ...}``) and the :class:`PredictorInfo` of a checkpoint folder.

  Args:
    checkpoint_dir: a run's working directory, its ``checkpoints`` folder, or ``.../last`` / ``.../best``.
    which: "best" or "last"; None prefers "best" and falls back to "last".

  Raises:
    ValueError: when no checkpoint is found or its format is unknown.
  """
  directory = resolve_checkpoint_dir(checkpoint_dir, which)
  manager = _manager(directory)
  step = manager.latest_step()
  # Restored onto this process's first device, whatever mesh the run was trained on.
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        manager.item_metadata(step)["ema_params"])
  restored = manager.restore(step, args=ocp.args.Composite(
      ema_params=ocp.args.StandardRestore(target), predictor=ocp.args.JsonRestore()))
  manager.close()
  return restored["ema_params"], PredictorInfo.from_json(restored["predictor"], source=f"{directory}/{step}")


def load_predictor(checkpoint_dir: str | Path, which: str | None = None, *,
                   attention_impl: AttentionImpl = AttentionImpl.AUTO, remat: bool = False,
                   precision: Precision | None = None) -> Predictor:
  """The trained model of a checkpoint folder as a :class:`Predictor` (EMA weights, references).

  Args:
    checkpoint_dir: a run's working directory, its ``checkpoints`` folder, or ``.../last`` / ``.../best``.
    which: "best" or "last"; None prefers "best" and falls back to "last".
    attention_impl: how to compute the attention (default: Pallas on GPU, XLA elsewhere, whatever
      the run trained with; the weights do not depend on it).
    remat: rematerialise in the force pass (large systems; see ``E2FormerConfig.remat``).
    precision: the number format (``E2FormerConfig.precision``); None: the run's, by default
      mixed precision on a GPU, float32 elsewhere. ``Precision.FULL`` for float32 everywhere.

  Raises:
    ValueError: when no checkpoint is found or its format is unknown.
  """
  params, info = load_checkpoint(checkpoint_dir, which)
  return info.predictor(params, attention_impl=attention_impl, remat=remat, precision=precision)


def load_calculator(checkpoint_dir: str | Path, which: str | None = None, *,
                    attention_impl: AttentionImpl = AttentionImpl.AUTO, remat: bool = False,
                    precision: Precision | None = None):
  """An :class:`~e2former_jax.interop.ase.E2FormerCalculator` for a checkpoint (see :func:`load_predictor`)."""
  from e2former_jax.interop.ase import E2FormerCalculator

  return E2FormerCalculator(load_predictor(checkpoint_dir, which, attention_impl=attention_impl,
                                           remat=remat, precision=precision))
