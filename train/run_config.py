"""Run configuration: typed sections loaded from ``configs/*.yaml`` plus command-line overrides.

The dataclass defaults are the authors' E2Former-V2 stage-2 training recipe (docs/model.md §12.7,
column "stage 2"; where each value comes from: §12.8), each with its provenance, so that the paper's
values live in exactly one place. A YAML file only states what differs from them; every YAML field
carries a comment saying why. Overrides use dotted keys: ``--set optim.lr=1e-3 model.channels=32``.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from pathlib import Path
from typing import Any

import yaml

from e2former_jax.config import (LEGACY_LAYER_NORM_EPS, AttentionImpl, E2FormerConfig, GateNormalisers,
                                 MessagePath, Precision, SoftmaxSink, paper_config, tiny_config)
from train.config_fields import (DECAY, FRACTION, NON_NEGATIVE, POSITIVE, Limit, coerce, field_types,
                                 one_of)
from train.data.records import ON_ERROR_CHOICES
from train.data.builtin.sizes import BuiltinSize


class ForceMode(enum.Enum):
  """Which forces enter the loss and the evaluation."""

  DIRECT = "direct"  # stage 1: linear head on the l = 1 features (non-conservative)
  CONSERVATIVE = "conservative"  # stage 2: F = -dE/dx (second derivative through the attention)


class EnergyLoss(enum.Enum):
  """Normalisation of the energy MAE term (docs/model.md §12.2)."""

  TOTAL = "total"  # mean over molecules of |E - E*|
  PER_ATOM = "per_atom"  # mean over molecules of |E - E*| / n_atoms


class ForceLoss(enum.Enum):
  """Reduction of the force L2-norm MAE term (docs/model.md §12.2)."""

  L2MAE = "l2mae"  # sum over atoms of |F - F*|_2, divided by the number of molecules
  ATOML2MAE = "atoml2mae"  # mean over atoms of |F - F*|_2


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
  """Where the structures come from and how they are packed.

  Attributes:
    path: a SPICE HDF5, MACE-OFF extxyz or OMol25 ``*.aselmdb`` file/folder; None = the built-in
      GFN2-xTB dataset (built on first use, then cached).
    builtin_dir: cache folder of the built-in dataset; None = the data package's default.
    builtin_conformers: geometries per molecule of the built-in dataset; None = its default.
    builtin: which build of the built-in dataset: ``small`` (tests), ``default`` (the main command on
      a 2-core CPU), ``large`` (thousands of molecules, for a GPU run) or ``heldout`` (molecules no
      default-sized build holds, to evaluate on).
    on_error: "raise" on an invalid record, or "skip" it (counted in a warning).
    split: molecule-level train/validation/test fractions.
    split_seed: seed of the molecule-level split and of the reference-energy subsample.
    reference_fit_records: at most this many training records fit the per-element reference
      energies (a random subsample; None = all).
    atoms_per_batch: atom budget and atom slots N of one packed sub-batch (the authors' "atom:N",
      docs/model.md §12.6).
    molecules_per_batch: molecule budget of one sub-batch; None = only the atom budget binds.
    batches_per_step: packed sub-batches per optimiser step, a multiple of the device count
      (one or more per device); None = one per device.
    subset_repeat: subset name -> how many times each training epoch holds every record of that
      subset (an integer >= 1); records of other subsets once. None: every record once.
    prefetch: sub-batches prepared ahead by a background thread.
    max_eval_batches: cap on sub-batches per evaluation pass and split (None = the whole split).
  """

  path: str | None = None
  builtin_dir: str | None = None
  builtin_conformers: int | None = None
  builtin: BuiltinSize = BuiltinSize.DEFAULT
  on_error: str = "raise"
  split: tuple[float, float, float] = (0.9, 0.05, 0.05)
  split_seed: int = 12345  # docs/model.md §12.1 (authors' random split seed)
  reference_fit_records: int | None = 50_000
  atoms_per_batch: int = 2048  # docs/model.md §12.7: atom:2048 per GPU, both stages
  molecules_per_batch: int | None = None  # docs/model.md §12.8: no molecule budget in the atom sampler
  batches_per_step: int | None = None
  subset_repeat: dict[str, int] | None = None
  prefetch: int = 2
  max_eval_batches: int | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossConfig:
  """Training objective: w_E * energy MAE + w_F * force L2-norm MAE (docs/model.md §12.2).

  Attributes:
    forces: direct head (stage 1) or conservative -dE/dx (stage 2).
    energy: total or per-atom energy MAE.
    force: ``atoml2mae`` (default) or ``l2mae``. Default atoml2mae because it is the authors'
      choice for both e2formerv2 stages and, being a per-atom mean, does not grow with molecule size:
      the weights mean the same on SPICE and OMol25, and the per-device sub-batch losses that are
      averaged in data parallelism are on a common scale. ``l2mae`` divides by molecules instead.
    energy_weight: w_E.
    force_weight: w_F.
  """

  forces: ForceMode = ForceMode.CONSERVATIVE  # docs/model.md §12.7 stage 2: autograd forces
  energy: EnergyLoss = EnergyLoss.PER_ATOM  # docs/model.md §12.8: loss names containing "atom" -> E/n
  force: ForceLoss = ForceLoss.ATOML2MAE  # docs/model.md §12.7 stage 2: atoml2mae
  energy_weight: float = 10.0  # docs/model.md §12.7 stage 2: w_E = 10 (stage 1: 4)
  force_weight: float = 10.0  # docs/model.md §12.7 stage 2: w_F = 10 (stage 1: 30)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
  """AdamW, the warm-up/cosine schedule of docs/model.md §12.4, clipping and the EMA of the weights.

  Attributes:
    lr: peak learning rate.
    weight_decay: decoupled weight decay (0 = plain Adam), not applied to 1-D parameters, norms,
      biases and embeddings (docs/model.md §12.3).
    b1: Adam beta1.
    b2: Adam beta2.
    eps: Adam epsilon.
    warmup_steps: W, linear warm-up length in optimiser steps.
    warmup_factor: w_f, the warm-up starts at w_f * lr.
    lr_min_factor: the cosine ends at lr_min_factor * lr.
    decay_steps: T, the cosine horizon; None = ``train.steps``.
    clip_norm: gradient clipping by global norm.
    ema_decay: decay of the exponential moving average of the weights (evaluation and export);
      the effective decay is min(ema_decay, (1 + t) / (10 + t)) so that short runs are not dominated
      by the initial weights.
  """

  lr: float = 6e-4  # docs/model.md §12.7 stage 2 (stage 1: 8e-4)
  weight_decay: float = 1e-3  # docs/model.md §12.7, both stages
  b1: float = 0.9  # docs/model.md §12.3
  b2: float = 0.999  # docs/model.md §12.3
  eps: float = 1e-8  # docs/model.md §12.3
  warmup_steps: int = 4000  # docs/model.md §12.7
  warmup_factor: float = 0.2  # docs/model.md §12.7
  lr_min_factor: float = 0.01  # docs/model.md §12.7
  decay_steps: int | None = None  # docs/model.md §12.7: T = 1.4 M = the run length
  clip_norm: float = 100.0  # docs/model.md §12.8: launch scripts (the demo yaml says 5)
  ema_decay: float = 0.999  # not in the reference (docs/model.md §12.5: no EMA); our addition


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
  """Length of the run, logging, evaluation and checkpoint cadence.

  Attributes:
    steps: optimiser steps of the run (also T of the schedule unless ``optim.decay_steps`` is set);
      None = as many as ``max_minutes`` allows, with T sized to them once the run has measured its
      speed (``train/budget.py``).
    max_minutes: wall-clock budget of one invocation, counted from its start (dataset build and
      compilation included), the closing evaluation included; training stops at the first step
      boundary where what is left would not cover the closing evaluation (but not before
      ``min_steps``), then the run evaluates and saves as if it had reached ``steps`` (None = no
      budget).
    min_steps: steps trained even past ``max_minutes``, so that a slow start (first-time dataset
      build on a busy machine) still leaves a learning curve.
    seed: seed of parameter initialisation, of the data order and of the saved random state.
    log_every: steps per training-metrics record (a window average).
    eval_every: steps between validation passes (EMA weights); also selects the best checkpoint.
    checkpoint_every: steps between "last" checkpoints.
    max_consecutive_nonfinite: halt after this many consecutive skipped (NaN/inf) steps.
    init_from: checkpoint folder of a previous stage: its EMA weights initialise the model (the
      direct force head is dropped when this run has none); optimiser and schedule start fresh.
  """

  steps: int | None = 1_400_000  # docs/model.md §12.7 (stage 1 and 2)
  max_minutes: float | None = None
  min_steps: int = 0
  seed: int = 6666  # docs/model.md §12.8
  log_every: int = 100  # docs/model.md §12.8: log_interval 100 (demo yaml)
  eval_every: int = 10_000  # docs/model.md §12.8: val_batch_interval 10000 (demo yaml)
  checkpoint_every: int = 3000  # docs/model.md §12.8: save_batch_interval 3000 (demo yaml)
  max_consecutive_nonfinite: int = 20
  init_from: str | None = None


@dataclasses.dataclass(kw_only=True)
class RunConfig:
  """Everything a run needs besides the working directory.

  Attributes:
    model: ``preset`` (``tiny`` or ``paper``) plus any :class:`E2FormerConfig` field to override.
    data: :class:`DataConfig`.
    loss: :class:`LossConfig`.
    optim: :class:`OptimConfig`.
    train: :class:`TrainConfig`.
  """

  model: dict[str, Any] = dataclasses.field(default_factory=lambda: {"preset": "paper"})
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

  def model_config(self) -> E2FormerConfig:
    """The architecture; the direct force head exists exactly when the loss uses it."""
    return build_model_config(self.model, direct_force_head=self.loss.forces is ForceMode.DIRECT)

  @property
  def decay_steps(self) -> int | None:
    """T of the schedule; None when it is sized from the time budget (``train.steps: null``)."""
    return self.optim.decay_steps if self.optim.decay_steps is not None else self.train.steps

  def to_dict(self) -> dict[str, Any]:
    """JSON-ready nested dict (enums by value); inverse of :func:`run_config_from_dict`."""
    return json.loads(json.dumps(dataclasses.asdict(self), default=_encode))


_PRESETS = {"paper": paper_config, "tiny": tiny_config}
_MODEL_ENUMS = {"message_path": MessagePath, "attention_impl": AttentionImpl,
                "radial_impl": AttentionImpl,
                "gate_normalisers": GateNormalisers, "softmax_sink": SoftmaxSink, "precision": Precision}
_SECTIONS = {"data": DataConfig, "loss": LossConfig, "optim": OptimConfig, "train": TrainConfig}
# The fractions are decimals, so their sum is 1 only up to rounding (0.9 + 0.05 + 0.05 != 1.0).
_SPLIT_SUM_TOLERANCE = 1e-6
# What the values must satisfy beyond their types, checked wherever a value is read (YAML file,
# override, checkpoint), so a bad value fails naming its key before anything loads or is written.
LIMITS: dict[str, Limit] = {
    "data.builtin_conformers": POSITIVE,
    "data.on_error": one_of(ON_ERROR_CHOICES),
    "data.split": Limit("three fractions >= 0 that sum to 1",
                        lambda f: min(f) >= 0 and abs(sum(f) - 1.0) <= _SPLIT_SUM_TOLERANCE),
    "data.reference_fit_records": POSITIVE,
    "data.atoms_per_batch": POSITIVE,
    "data.molecules_per_batch": POSITIVE,
    "data.batches_per_step": POSITIVE,
    "data.subset_repeat": Limit("a mapping of subset names to integers >= 1",
                                lambda repeats: all(r >= 1 for r in repeats.values())),
    "data.prefetch": NON_NEGATIVE,
    "data.max_eval_batches": POSITIVE,
    "loss.energy_weight": NON_NEGATIVE,
    "loss.force_weight": NON_NEGATIVE,
    "optim.lr": POSITIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": DECAY,
    "optim.b2": DECAY,
    "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.warmup_factor": FRACTION,
    "optim.lr_min_factor": FRACTION,
    "optim.decay_steps": POSITIVE,
    "optim.clip_norm": POSITIVE,
    "optim.ema_decay": DECAY,
    "train.steps": POSITIVE,
    "train.max_minutes": NON_NEGATIVE,
    "train.min_steps": NON_NEGATIVE,
    "train.log_every": POSITIVE,
    "train.eval_every": POSITIVE,
    "train.checkpoint_every": POSITIVE,
    "train.max_consecutive_nonfinite": POSITIVE,
    "model.num_layers": POSITIVE,
    "model.lmax": Limit(">= 1", lambda v: v >= 1),
    "model.channels": POSITIVE,
    "model.num_heads": POSITIVE,
    "model.head_dim": POSITIVE,
    "model.num_rbf": POSITIVE,
    "model.cutoff": POSITIVE,
    "model.max_neighbors": POSITIVE,
    "model.edge_hidden": POSITIVE,
    "model.type_embed_dim": POSITIVE,
    "model.num_species": Limit("> 1", lambda v: v > 1),
    "model.avg_degree": POSITIVE,
}


@functools.cache
def config_keys() -> dict[str, Any]:
  """Every dotted key a run config accepts (``model.*`` = the E2FormerConfig fields) -> its type."""
  keys = {"model.preset": str, **{f"model.{k}": t for k, t in field_types(E2FormerConfig).items()}}
  for section, cls in _SECTIONS.items():
    keys.update({f"{section}.{k}": t for k, t in field_types(cls).items()})
  return keys


def build_model_config(model: dict[str, Any], *, direct_force_head: bool) -> E2FormerConfig:
  """E2FormerConfig from a ``{preset, field: value}`` mapping (enum fields given by value)."""
  fields = dict(model)
  preset = fields.pop("preset", "paper")
  if preset not in _PRESETS:
    raise ValueError(f"model.preset must be one of {sorted(_PRESETS)}, got {preset!r}")
  known = {f.name for f in dataclasses.fields(E2FormerConfig)}
  for key, value in fields.items():
    if key not in known:
      raise ValueError(f"unknown model field {key!r}; E2FormerConfig has {sorted(known)}")
    if key in _MODEL_ENUMS and not isinstance(value, enum.Enum):
      fields[key] = _MODEL_ENUMS[key](value)
  fields["direct_force_head"] = direct_force_head
  return _PRESETS[preset](**fields)


def model_config_to_dict(config: E2FormerConfig) -> dict[str, Any]:
  """JSON-ready dict of every field (enums by value); inverse of :func:`model_config_from_dict`."""
  return json.loads(json.dumps(dataclasses.asdict(config), default=_encode))


def model_config_from_dict(fields: dict[str, Any]) -> E2FormerConfig:
  """Inverse of :func:`model_config_to_dict`. A saved config without ``layer_norm_eps`` predates the
  field and was trained with flax's default, ``LEGACY_LAYER_NORM_EPS``; one without ``precision``
  predates it and computed as its ``mixed_precision`` flag said (absent: float32), on any device."""
  fields = {"layer_norm_eps": LEGACY_LAYER_NORM_EPS, **fields}
  if "precision" not in fields:
    fields["precision"] = (Precision.MIXED if fields.pop("mixed_precision", False) else Precision.FULL).value
  fields = {k: (_MODEL_ENUMS[k](v) if k in _MODEL_ENUMS else v) for k, v in fields.items()}
  return E2FormerConfig(**fields)


def run_config_from_dict(tree: dict[str, Any], *, source: str = "<dict>") -> RunConfig:
  """RunConfig from a nested mapping; unknown sections or keys and wrong-typed or out-of-range
  values raise ValueError naming ``source`` and the key."""
  config = RunConfig()
  for section, values in (tree or {}).items():
    if section == "model":
      if not isinstance(values, dict):
        raise ValueError(f"{source}: section 'model' must be a mapping, got {values!r}")
      config.model = {**config.model, **{k: _model_value(k, v, source) for k, v in values.items()}}
      continue
    if section not in _SECTIONS:
      raise ValueError(f"{source}: unknown section {section!r}; expected model or {sorted(_SECTIONS)}")
    if not isinstance(values, dict):
      raise ValueError(f"{source}: section {section!r} must be a mapping, got {values!r}")
    current = getattr(config, section)
    for key, value in values.items():
      setattr(config, section, _replace_field(current, section, key, value, source))
      current = getattr(config, section)
  return config


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
  """Apply ``section.key=value`` strings (values parsed as YAML scalars/lists)."""
  for item in overrides:
    key, sep, raw = item.partition("=")
    section, dot, field = key.strip().partition(".")
    if not sep or not dot or not field:
      raise ValueError(f"override {item!r} must look like section.key=value (e.g. optim.lr=1e-3)")
    source = f"override {item!r}"
    try:
      value = yaml.safe_load(raw)
    except yaml.YAMLError as err:
      raise ValueError(f"{source}: the value is not valid YAML ({_yaml_problem(err)})") from None
    if section == "model":
      config = dataclasses.replace(config,
                                   model={**config.model, field: _model_value(field, value, source)})
    elif section in _SECTIONS:
      current = getattr(config, section)
      config = dataclasses.replace(
          config, **{section: _replace_field(current, section, field, value, source)})
    else:
      raise ValueError(f"{source}: unknown section {section!r}")
  return config


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
  """Defaults <- YAML file (if any) <- overrides; the model config is validated eagerly.

  Raises:
    ValueError: one line naming the file (with line and column for a YAML syntax error) or the
      override, and the key.
  """
  config = RunConfig()
  if path is not None:
    path = Path(path)
    if not path.is_file():
      raise ValueError(f"config file {path} does not exist")
    with path.open() as f:
      try:
        tree = yaml.safe_load(f)
      except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        raise ValueError(f"{where}: invalid YAML: {_yaml_problem(err)}") from None
    if tree is not None and not isinstance(tree, dict):
      raise ValueError(f"{path}: expected a mapping of sections at the top level")
    config = run_config_from_dict(tree, source=str(path))
  config = apply_overrides(config, list(overrides))
  if config.train.steps is None and config.train.max_minutes is None:
    raise ValueError("train.steps: null (as many steps as the budget allows) needs train.max_minutes")
  try:
    config.model_config()
  except (TypeError, ValueError) as err:
    raise ValueError(f"invalid model section {config.model}: {err}") from err
  return config


def _model_value(key: str, value, source: str):
  """A model field's value checked against its E2FormerConfig type (enums stay given by value)."""
  types = config_keys()
  name = f"model.{key}"
  if name not in types:
    return value  # an unknown field: build_model_config names the known ones
  value = coerce(name, value, types[name], source=source, limit=LIMITS.get(name))
  return value.value if isinstance(value, enum.Enum) else value


def _replace_field(section_obj, section: str, key: str, value, source: str):
  types = field_types(type(section_obj))
  if key not in types:
    raise ValueError(f"{source}: unknown key {section}.{key}; {section} has {sorted(types)}")
  name = f"{section}.{key}"
  value = coerce(name, value, types[key], source=source, limit=LIMITS.get(name))
  return dataclasses.replace(section_obj, **{key: value})


def _yaml_problem(err: yaml.YAMLError) -> str:
  return getattr(err, "problem", None) or str(err).splitlines()[0]


def _encode(obj):
  if isinstance(obj, enum.Enum):
    return obj.value
  raise TypeError(f"cannot encode {obj!r} as JSON")
