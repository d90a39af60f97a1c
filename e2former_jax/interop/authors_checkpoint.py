"""Checkpoints trained with the authors' E2Former-V2 code: their state dict -> our config and weights.

Their model (IQuestLab/UBio-MolFM, branch ``e2formerv2``) is a backbone under the key prefix
``decoder.`` (its core under ``decoder.decoder.``) and one energy head, with an optional direct
force head, per data set under ``head.``. The architecture is the one implemented here; only the
layout and a few numerical details differ. The layout facts (``authors_layout``; torch ``Linear``
weights are [out, in]; SO(3)-linear weights [lmax+1, out, in] with the bias on the invariant row;
the radial MLPs' first Linear reads [rbf; target type; source type]; path-major tensor-product
columns; head-major query/key) are those of docs/model.md, with the differences in
docs/decisions.md D14.

What the import does:

* infers the architecture from the shapes (blocks, channels, lmax, heads, head width, radial
  basis, hidden widths, type-embedding widths); what shapes cannot tell (cutoff, K, the
  edge-degree normaliser) comes from their config mapping when given (``backbone_config`` keys as
  in their ``e2former.yaml``), else the cutoff from the radial basis offsets, else their defaults,
  and the report says which;
* checks the constants it can (Gaussian offsets, norm balance weights and degree indices,
  tensor-product path norms) and that their config (if given) names the variants implemented
  here (``so2-first-order`` attention, ``s3`` FFN, ``rms_norm_sh``, ``QK_alpha``);
* maps every used tensor (rejecting missing, unknown or mis-shaped keys with one message naming
  the key and the shapes), lists the dead ones, and keeps the rows of type, charge and
  multiplicity tables that our model indexes (atomic numbers 0..118, charges -10..10,
  multiplicities 0..20);
* sets the authors' numerics (``config.REFERENCE_NUMERICS``) so the model reproduces their
  numbers; see docs/decisions.md D14.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from e2former_jax.config import REFERENCE_NUMERICS, E2FormerConfig
from e2former_jax.interop.authors_layout import (ANCHOR, CORE, DEAD, ENERGY_HEADS, FORCE_HEADS,
                                                 SPECIES_ROWS, TYPE_TABLE, UNUSED_CONSTANTS, Mapper,
                                                 check_complete, config_settings, describe,
                                                 infer_dims)
from e2former_jax.interop.state_dict_files import read_state_dict

# Relative tolerance of the constant checks: float32 checkpoints round them at ~6e-8.
CONSTANT_RTOL = 1e-6


@dataclasses.dataclass(frozen=True)
class ImportReport:
  """How a state dict became our parameters (JSON-ready through :meth:`to_json`).

  Attributes:
    config_sources: config field -> where its value came from.
    mapped: source key -> our parameter paths ("block_0/attention/value/weight").
    truncated: source key -> [rows kept (the first ones), rows in the checkpoint], for tables
      larger than ours.
    checked_constants: constant keys compared with the values the model uses.
    dead: trainable keys without effect in the authors' model (dropped).
    unused_constants: constant keys of code paths the model does not run (dropped).
    other_heads: keys of the heads of other data sets (dropped).
    energy_head: the data-set head that was imported.
    ignored_config_keys: keys of their config mapping the import does not read (training
      settings, dropout, their periodic image expansion, unused encoder widths).
  """

  config_sources: dict[str, str]
  mapped: dict[str, list[str]]
  truncated: dict[str, list[int]]
  checked_constants: list[str]
  dead: list[str]
  unused_constants: list[str]
  other_heads: list[str]
  energy_head: str
  ignored_config_keys: list[str]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def summary(self, config: E2FormerConfig) -> str:
    """A few lines for the command line, with the values of ``config`` (the imported one)."""
    lines = [f"mapped {len(self.mapped)} tensors onto {sum(map(len, self.mapped.values()))} "
             f"parameters (energy head {self.energy_head!r})",
             f"dropped {len(self.dead)} dead tensors: {', '.join(self.dead) or '-'}",
             f"dropped {len(self.unused_constants)} unused constant tables; checked "
             f"{len(self.checked_constants)} constants"]
    lines += [f"kept rows 0..{kept - 1} of {total} of {key}"
              for key, (kept, total) in self.truncated.items()]
    if self.other_heads:
      lines.append(f"dropped the heads of other data sets: {', '.join(self.other_heads)}")
    if self.ignored_config_keys:
      lines.append(f"config keys not read: {', '.join(self.ignored_config_keys)}")
    lines += [f"{field} = {getattr(config, field)} ({source})"
              for field, source in self.config_sources.items() if hasattr(config, field)]
    numerics = ", ".join(f"{field}={getattr(config, field)}" for field in REFERENCE_NUMERICS)
    return "\n".join(lines + [f"numerics: {numerics}"])


@dataclasses.dataclass(frozen=True)
class ImportedCheckpoint:
  """Attributes:
    config: the architecture, with the authors' numerics.
    params: ``{"params": ...}`` in the requested dtype.
    report: the mapping.
  """

  config: E2FormerConfig
  params: dict
  report: ImportReport


def import_checkpoint(path: str | Path, *, reference_config: Mapping[str, Any] | None = None,
                      head: str | None = None, prefix: str | None = None,
                      dtype=np.float32) -> ImportedCheckpoint:
  """Reads a checkpoint file (see :func:`~e2former_jax.interop.state_dict_files.read_state_dict`)
  and imports it (see :func:`import_state_dict`).

  Args:
    path: ``.pt`` (PyTorch zip format), ``.safetensors`` or ``.npz``.
    reference_config, head, dtype: as in :func:`import_state_dict`.
    prefix: the key prefix of the model inside the file (e.g. "model." when the file holds a
      training checkpoint ``{"model": state_dict, ...}``); None finds it.

  Raises:
    ValueError: as :func:`read_state_dict`, when no single model is found, or as
      :func:`import_state_dict`.
  """
  return import_state_dict(model_state_dict(read_state_dict(path), prefix=prefix, source=str(path)),
                           reference_config=reference_config, head=head, dtype=dtype)


def model_state_dict(arrays: Mapping[str, np.ndarray], *, prefix: str | None = None,
                     source: str = "checkpoint") -> dict[str, np.ndarray]:
  """The keys of the one model in ``arrays``, with the wrapper's prefix removed.

  Raises:
    ValueError: when no model, or more than one without ``prefix``, is found.
  """
  if prefix is None:
    prefixes = sorted(key[: -len(ANCHOR)] for key in arrays if key.endswith(ANCHOR))
    if len(prefixes) != 1:
      found = f"models under the prefixes {prefixes}; choose one with prefix" if prefixes else \
          f"no key ending in {ANCHOR!r}: not an E2Former-V2 checkpoint of the authors' code"
      raise ValueError(f"{source}: {found}")
    prefix = prefixes[0]
  state = {key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)}
  if ANCHOR not in state:
    raise ValueError(f"{source}: no key {prefix + ANCHOR!r} under the prefix {prefix!r}")
  return state


def import_state_dict(state: Mapping[str, np.ndarray], *,
                      reference_config: Mapping[str, Any] | None = None, head: str | None = None,
                      dtype=np.float32) -> ImportedCheckpoint:
  """Our config and parameters from a state dict in the authors' key layout.

  Args:
    state: key -> array, keys as their ``model.state_dict()`` (``decoder.…``, ``head.…``).
    reference_config: their backbone config (the ``backbone_config`` of their run, keys of
      ``e2former.yaml``; a mapping holding a ``backbone_config`` entry is read from there).
      Supplies the cutoff (``max_radius``), K (``max_neighbors``) and ``avg_degree``, and is
      checked against the shapes.
    head: the data-set head to import (None: the only one).
    dtype: floating dtype of the parameters.

  Returns:
    The :class:`ImportedCheckpoint`.

  Raises:
    ValueError: on a missing, unknown or mis-shaped key, a constant that differs from the model's,
      a config the shapes contradict, or a variant the model does not implement.
  """
  shapes = {key: tuple(np.shape(value)) for key, value in state.items()}
  offsets_key = CORE + "rbf.offset"
  cutoff = None
  if offsets_key in state and np.ndim(state[offsets_key]) == 1 and np.size(state[offsets_key]):
    cutoff = float(np.asarray(state[offsets_key])[-1])
  plan = plan_import(shapes, reference_config=reference_config, head=head, basis_cutoff=cutoff)
  for key, expected in plan.constants.items():
    value = np.asarray(state[key], np.float64)
    if not np.allclose(value, expected, rtol=CONSTANT_RTOL, atol=CONSTANT_RTOL * np.abs(expected).max()):
      worst = np.unravel_index(np.argmax(np.abs(value - expected)), value.shape)
      raise ValueError(f"constant {key!r} differs from the model's: {value[worst]} at {worst}, "
                       f"expected {expected[worst]} (config {describe(plan.config)})")
  params: dict[str, Any] = {}
  for path, key, convert in plan.targets:
    value = np.asarray(convert(np.asarray(state[key])))
    if not np.issubdtype(value.dtype, np.floating):
      raise ValueError(f"key {key!r} holds {value.dtype} values, expected floating point")
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = jnp.asarray(value.astype(dtype))
  return ImportedCheckpoint(config=plan.config, params={"params": params}, report=plan.report)


@dataclasses.dataclass(frozen=True)
class ImportPlan:
  """The mapping decided from the shapes alone.

  Attributes:
    config: the architecture.
    targets: (our parameter path, source key, conversion of the source array) for every parameter.
    constants: source key -> the value the model assumes (checked by :func:`import_state_dict`).
    report: the mapping.
  """

  config: E2FormerConfig
  targets: list[tuple[tuple[str, ...], str, Callable[[np.ndarray], np.ndarray]]]
  constants: dict[str, np.ndarray]
  report: ImportReport


def plan_import(shapes: Mapping[str, tuple[int, ...]], *,
                reference_config: Mapping[str, Any] | None = None, head: str | None = None,
                basis_cutoff: float | None = None) -> ImportPlan:
  """The config and the mapping of every key, from the shapes (e.g. of a key/shape manifest).

  Args:
    shapes: key -> shape, keys in their layout without a wrapper prefix.
    reference_config, head: as in :func:`import_state_dict`.
    basis_cutoff: the last Gaussian offset when known: the cutoff when their config gives none.

  Raises:
    ValueError: as :func:`import_state_dict` (except the constant values, unknown here).
  """
  dims = infer_dims(shapes)
  settings, sources, ignored = config_settings(dims, reference_config, basis_cutoff)
  heads = sorted({m.group(1) for key in shapes if (m := re.fullmatch(
      re.escape(ENERGY_HEADS) + r"([^.]+)\.mlp\.0\.weight", key))})
  if not heads:
    raise ValueError(f"no energy head: no key {ENERGY_HEADS}<name>.mlp.0.weight")
  if head is None and len(heads) > 1:
    raise ValueError(f"the checkpoint has energy heads {heads}; choose one with head")
  head = heads[0] if head is None else head
  if head not in heads:
    raise ValueError(f"no energy head {head!r}; the checkpoint has {heads}")
  force_key = f"{FORCE_HEADS}{head}.sing_linear.weight"
  num_species = min([SPECIES_ROWS] + [shape[0] for key, shape in shapes.items()
                                      if TYPE_TABLE.fullmatch(key) and len(shape) == 2])
  sources["num_species"] = f"min({SPECIES_ROWS}, rows of the type-embedding tables)"
  config = E2FormerConfig(
      num_layers=dims.num_layers, channels=dims.channels, lmax=dims.lmax, num_heads=dims.heads,
      head_dim=dims.head_dim, num_rbf=dims.num_rbf, edge_hidden=dims.hidden,
      type_embed_dim=dims.type_width, num_species=num_species,
      direct_force_head=force_key in shapes, **settings, **REFERENCE_NUMERICS)

  mapper = Mapper(shapes, config)
  mapper.build(head, force_key in shapes)
  report_mapped: dict[str, list[str]] = {}
  for path, key, _ in mapper.targets:
    report_mapped.setdefault(key, []).append("/".join(path))
  used = set(report_mapped) | set(mapper.constants)
  dead, unused, others, unknown = [], [], [], []
  for key in shapes:
    if key in used:
      continue
    if any(p.fullmatch(key) for p in DEAD):
      dead.append(key)
    elif any(p.fullmatch(key) for p in UNUSED_CONSTANTS):
      unused.append(key)
    elif key.startswith((ENERGY_HEADS, FORCE_HEADS)) and not key.startswith(
        (f"{ENERGY_HEADS}{head}.", f"{FORCE_HEADS}{head}.")):
      others.append(key)
    else:
      unknown.append(key)
  if unknown:
    raise ValueError(f"unknown key {unknown[0]!r} (shape {shapes[unknown[0]]}; {len(unknown)} "
                     f"unknown in all): not part of the E2Former-V2 layout this importer maps")
  check_complete(config, shapes, mapper.targets)
  report = ImportReport(config_sources=sources, mapped=report_mapped, truncated=mapper.truncated,
                        checked_constants=sorted(mapper.constants), dead=dead,
                        unused_constants=unused, other_heads=others, energy_head=head,
                        ignored_config_keys=ignored)
  return ImportPlan(config=config, targets=mapper.targets, constants=mapper.constants, report=report)
