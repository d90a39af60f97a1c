"""Evaluation passes: energy and force errors of a split, per subset, with the data-parallel step."""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from train import sharding
from train.budget import PassTiming
from train.checkpoint import load_checkpoint, resolve_checkpoint_dir
from train.data import BatchIterator
from train.metrics import (ALL_SUBSETS, STATE_ROWS, ErrorSums, electronic_state, error_table, shown_states,
                           write_error_table)
from train.run_config import EnergyLoss, ForceLoss, ForceMode, LossConfig, apply_overrides
from train.run_data import empty_batch, empty_splits, make_iterator, open_run_data
from train.step import make_eval_step


def evaluate(eval_step: Callable, params, iterator: BatchIterator, mesh: Mesh, local_batches: int,
             subset_names: list[str], *, max_batches: int | None = None,
             timing: list[PassTiming] | None = None) -> dict[str, ErrorSums]:
  """Error sums of one pass over ``iterator`` (this process's share; summed over processes).

  Args:
    eval_step: from :func:`train.step.make_eval_step`.
    params: model variables (usually the EMA weights).
    iterator: an evaluation iterator (file order, padding batches across processes).
    mesh: the device mesh.
    local_batches: sub-batches this process feeds per step.
    subset_names: the dataset's subset names (``Batch.subset`` indexes them).
    max_batches: stop after this many sub-batches of this process (None: the whole split).
    timing: the pass's wall time is appended here when given.

  Returns:
    subset name -> :class:`ErrorSums`, plus ``"all"`` and, when the split holds molecules of more
    than one electronic state, a row per state (``metrics.STATE_ROWS``); subsets without
    molecules are left out.
  """
  num_subsets = len(subset_names)
  # Rows: the dataset's subsets, then the electronic states.
  sums = np.zeros((num_subsets + len(STATE_ROWS), len(ErrorSums.FIELDS)))  # [rows, fields]
  stream = iterator.iterate(epoch=0)
  batches = stream if max_batches is None else itertools.islice(stream, max_batches)
  padding = None
  start, first_done, steps = time.perf_counter(), None, 0
  while True:
    chunk = list(itertools.islice(batches, local_batches))
    if not chunk:
      break
    if len(chunk) < local_batches:
      padding = padding if padding is not None else empty_batch(iterator)
      chunk += [padding] * (local_batches - len(chunk))
    stacked = sharding.stack(chunk)
    out = sharding.to_host_local(mesh, eval_step(params, sharding.shard_batch(mesh, stacked)))
    real = stacked.subset >= 0  # [S, B]
    atoms = out["atoms"][real]
    derived = {"molecules": np.ones_like(atoms),
               "energy_abs_per_atom": out["energy_abs"][real] / np.maximum(atoms, 1)}
    # A field the step does not return (no direct head) stays NaN: ErrorSums reads it as None.
    values = np.stack([derived[f] if f in derived else out[f][real] if f in out
                       else np.full_like(atoms, np.nan) for f in ErrorSums.FIELDS], -1)
    np.add.at(sums, stacked.subset[real], values)
    state = electronic_state(stacked.graph.charge, stacked.graph.spin)  # [S, B]
    np.add.at(sums, num_subsets + state[real], values)
    steps += 1
    first_done = first_done or time.perf_counter()
  stream.close()  # stops the prefetch thread when max_batches ended the pass early
  # Processes must stay in lockstep: every process runs the same number of steps (the iterator
  # pads with empty batches), and the sums are combined here.
  if timing is not None:
    end = time.perf_counter()
    timing.append(PassTiming(end - start, (first_done or end) - start, steps))
  sums = sharding.sum_across_processes(sums)
  subsets, states = sums[:num_subsets], sums[num_subsets:]
  result = {name: ErrorSums.from_array(row) for name, row in zip(subset_names, subsets) if row[0] > 0}
  result[ALL_SUBSETS] = ErrorSums.from_array(subsets.sum(0))
  result.update((STATE_ROWS[i], ErrorSums.from_array(states[i])) for i in shown_states(states[:, 0]))
  return result


def validation_loss(config: LossConfig, errors: ErrorSums) -> float:
  """The training objective (docs/model.md §12.2) over a whole split: selects the best checkpoint.

  Its force term uses the forces the run trains: the direct head's in a direct-force run.
  """
  mol, atoms = max(errors.molecules, 1.0), max(errors.atoms, 1.0)
  energy = errors.energy_abs_per_atom if config.energy is EnergyLoss.PER_ATOM else errors.energy_abs
  force_l2 = errors.direct_force_l2 if config.forces is ForceMode.DIRECT else errors.force_l2
  force = force_l2 / (mol if config.force is ForceLoss.L2MAE else atoms)
  return config.energy_weight * energy / mol + config.force_weight * force


def evaluate_checkpoint(checkpoint: str | Path, *, which: str | None = None, data_path: str | None = None,
                        splits: Sequence[str] = ("val", "test"), overrides: Sequence[str] = (),
                        out: str | Path | None = None, num_devices: int | None = None,
                        progress: bool = True) -> list[dict]:
  """Error table of a checkpoint's EMA weights on the splits of its run's dataset (or another one).

  The split rule, batch shapes and reference energies are the checkpoint's own, so the numbers are
  those the run reported; ``data_path`` evaluates on another dataset with the same rule.

  Args:
    checkpoint: run folder, its ``checkpoints`` folder or ``.../best|last``.
    which: "best" or "last" (default: best if present).
    data_path: another dataset to evaluate on.
    splits: which splits to tabulate.
    overrides: ``data.*`` overrides (e.g. ``data.max_eval_batches=10``).
    out: folder for ``eval_table.md/json`` (default: the run folder).
    num_devices: use the first N devices.
    progress: print the table.

  Returns:
    The table rows (see :func:`train.metrics.error_table`).

  Raises:
    ValueError: before evaluating, when the checkpoint, the data or the output folder is unusable or
      every requested split is empty.
  """
  directory = resolve_checkpoint_dir(checkpoint, which)
  out = Path(out) if out is not None else directory.parent.parent  # .../checkpoints/best -> the run
  if out.exists() and not out.is_dir():
    raise ValueError(f"--out {out} is a file, not a folder")
  params, info = load_checkpoint(directory)
  model_config, run_config = info.model_config, info.run_config
  bad = [o for o in overrides if not o.startswith("data.")]
  if bad:
    raise ValueError(f"eval accepts only data.* overrides, got {bad}")
  overrides = list(overrides) + ([f"data.path={data_path}"] if data_path else [])
  run_config = apply_overrides(run_config, overrides)
  # The checkpoint's references (empty for a model that predicts total energies: an imported one).
  data = open_run_data(run_config.data, references=info.reference_energies, training=False)
  splits = [split for split in splits if len(data.splits[split])]
  if not splits:
    raise ValueError(f"{empty_splits(data, run_config.data)}: nothing to evaluate")
  if jax.process_index() == 0:  # before evaluating: a folder that cannot be made fails now
    try:
      out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
      raise ValueError(f"--out {out}: cannot create the folder: {err}") from None
  mesh = sharding.make_mesh(num_devices)
  params = jax.device_put(params, sharding.replicated(mesh))  # laid out as in training: one executable
  per_step = run_config.data.batches_per_step
  if per_step is None or per_step % mesh.devices.size:  # the run's value, if this mesh can take it
    per_step = mesh.devices.size
  local_batches = sharding.local_batches_per_step(mesh, per_step)
  eval_step = make_eval_step(model_config, mesh)
  results = {}
  for split in splits:
    iterator = make_iterator(data, split, run_config.data, model_config, training=False, seed=0,
                             process_index=jax.process_index(), process_count=jax.process_count())
    results[split] = evaluate(eval_step, params, iterator, mesh, local_batches, data.subset_names,
                              max_batches=run_config.data.max_eval_batches)
  rows = error_table(results)
  if jax.process_index() == 0:
    markdown = write_error_table(rows, out)
    if progress:
      print(markdown)
    skipped = data.dataset.skipped.summary()
    if skipped:
      warnings.warn(skipped)
  return rows
