"""The training loop: :func:`train_and_evaluate` runs (or resumes) one run in a working directory.

Per step, this process takes its S / process_count sub-batches from the training stream, stacks
and shards them, and runs the jitted data-parallel step. Metrics of step t are read back while step
t + 1 runs (one step of lag keeps the device busy). Every ``eval_every`` steps the EMA weights are
evaluated on the validation split (best checkpoint), every ``checkpoint_every`` steps the "last"
checkpoint is written (asynchronously). At the end: final checkpoint, the error table on the
validation and test splits, the learning-curve plot and a throughput summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from train import sharding
from train.checkpoint import BEST, CHECKPOINT_DIRNAME, LAST, Checkpointer, PredictorInfo, load_predictor
from train.data import DataPosition
from train.evaluate import evaluate, validation_loss
from train.metrics import (ALL_SUBSETS, CURVE_FILENAME, MetricsLog, error_table, plot_learning_curves,
                           write_error_table)
from train.optimizer import make_optimizer
from train.run_config import RunConfig
from train.run_data import (empty_batch, make_iterator, open_run_data, references_from_mapping,
                            references_to_mapping)
from train.state import create_train_state
from train.step import make_eval_step, make_init, make_train_step

RUN_CONFIG_FILENAME = "run_config.yaml"
SUMMARY_FILENAME = "summary.json"
EVAL_SPLITS = ("val", "test")


class NonFiniteHalt(RuntimeError):
  """Raised when too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
  """Attributes:
    workdir: the run's working directory.
    step: training iterations completed (over all invocations of the run).
    losses: training loss of every step taken by this invocation, in order.
    table: final error rows (:func:`train.metrics.error_table`), empty when not evaluated.
    summary: throughput and run facts (also in ``summary.json``).
  """

  workdir: Path
  step: int
  losses: list[float]
  table: list[dict[str, Any]]
  summary: dict[str, Any]


def train_and_evaluate(config: RunConfig, workdir: str | Path, *, resume: bool = True,
                       num_devices: int | None = None, progress: bool = True,
                       final_eval: bool = True) -> TrainResult:
  """Trains (or resumes) the run in ``workdir`` and evaluates it.

  Args:
    config: the run configuration.
    workdir: output folder (checkpoints, metrics, plot, tables); created if needed.
    resume: continue from ``workdir``'s last checkpoint if there is one; with False, a ``workdir``
      that holds checkpoints is an error.
    num_devices: use the first ``num_devices`` devices (default: all).
    progress: show the progress bar and messages (process 0 only).
    final_eval: evaluate the validation and test splits at the end and write the tables.

  Raises:
    NonFiniteHalt: after ``train.max_consecutive_nonfinite`` consecutive skipped steps (the last
      good checkpoint is kept; nothing is saved after the failures).
    ValueError: for an invalid configuration or dataset.
  """
  call_start = time.perf_counter()
  workdir = Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress and is_main else (lambda msg: None)
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_CONFIG_FILENAME).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))

  mesh = sharding.make_mesh(num_devices)
  batches_per_step = config.data.batches_per_step or mesh.devices.size
  local_batches = sharding.local_batches_per_step(mesh, batches_per_step)
  model_config = config.model_config()
  checkpointer = Checkpointer(workdir / CHECKPOINT_DIRNAME)
  saved = checkpointer.predictor_info(LAST)
  if saved is not None and not resume:
    raise ValueError(f"{workdir} already holds a run (checkpoints in {checkpointer.directory}); resume it, "
                     "or start over in an empty folder")
  if saved is not None:  # a run started before the LayerNorm default changed keeps its epsilon
    model_config = model_config.replace(layer_norm_eps=saved.model_config.layer_norm_eps)

  data = open_run_data(config.data, references=None if saved is None else
                       references_from_mapping(saved.reference_energies))
  iterators = {split: make_iterator(data, split, config.data, model_config, training=split == "train",
                                    seed=config.train.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
               for split in ("train", *EVAL_SPLITS) if len(data.splits[split])}
  predictor = PredictorInfo(model_config=model_config,
                            reference_energies=references_to_mapping(data.references), run_config=config)
  say(f"data: {data.dataset.path} ({len(data.dataset)} records; "
      + ", ".join(f"{s} {len(data.splits[s])}" for s in ("train", *EVAL_SPLITS)) + "); "
      f"sub-batch: {config.data.atoms_per_batch} atoms x {data.max_molecules + 1} molecule slots; "
      f"{batches_per_step} sub-batches/step on {mesh.devices.size} device(s)")

  sample = jax.tree.map(jnp.asarray, empty_batch(iterators["train"]).graph)
  params = make_init(model_config)(jax.random.key(config.train.seed), sample)
  if config.train.init_from:
    params = _params_from_checkpoint(config.train.init_from, params)
    say(f"initialised from the EMA weights of {config.train.init_from}")
  optimizer, _ = make_optimizer(config.optim, config.decay_steps, params)
  state = create_train_state(params, optimizer, config.train.seed)
  state_shardings = sharding.state_sharding(mesh, state)
  state = jax.device_put(state, state_shardings)
  say(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} parameters; forces "
      f"{config.loss.forces.value}")

  position, best_val = DataPosition(), math.inf
  restored = checkpointer.restore(LAST, state, state_shardings) if resume else None
  if restored is not None:
    state, meta = restored
    position = DataPosition.from_dict(meta["data_position"])
    best_val = meta.get("best_val_loss", math.inf)
    say(f"resumed from step {meta['step']} (data epoch {position.epoch}, batch {position.batch})")
  step = int(jax.device_get(state.step))
  log = MetricsLog(workdir, resume_step=step if restored is not None else None, enabled=is_main)

  train_step = make_train_step(model_config, config.loss, config.optim, config.decay_steps, mesh)
  eval_step = make_eval_step(model_config, config.loss.forces, mesh)

  def run_eval(split: str):
    return evaluate(eval_step, state.ema_params, iterators[split], mesh, local_batches,
                    data.subset_names, max_batches=config.data.max_eval_batches)

  def validate() -> None:
    nonlocal best_val
    if "val" not in iterators:
      return
    errors = run_eval("val")
    val_loss = validation_loss(config.loss, errors[ALL_SUBSETS])
    record = log.write("val", step, {"loss": val_loss, **errors[ALL_SUBSETS].summary()})
    say(f"step {step}: validation energy {record['energy_mae_mev_per_atom']:.2f} meV/atom, force "
        f"{record['force_mae_mev_per_a']:.1f} meV/A (loss {val_loss:.4g})")
    if val_loss < best_val:
      best_val = val_loss
      checkpointer.save(BEST, state, meta=checkpoint_meta(), predictor=predictor)

  def checkpoint_meta() -> dict[str, Any]:
    return {"data_position": position.to_dict(), "best_val_loss": best_val}

  total_steps = config.train.steps
  bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True,
             disable=not (progress and is_main), file=sys.stderr)
  losses: list[float] = []
  window: list[dict[str, float]] = []
  timing = {"start": time.perf_counter(), "first_done": None, "atoms_after_first": 0, "steps_after_first": 0}

  def consume(done_step: int, metrics, atoms: int) -> None:
    """Reads back one step's metrics: losses, progress, logging, non-finite accounting."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    losses.append(m["loss"])
    if timing["first_done"] is None:
      timing["first_done"] = now  # the first step includes compilation: excluded from throughput
    else:
      timing["atoms_after_first"] += atoms
      timing["steps_after_first"] += 1
    window.append(m)
    elapsed = now - timing["first_done"]
    rate = timing["atoms_after_first"] / elapsed if elapsed > 0 else float("nan")
    bar.update(1)
    bar.set_postfix(loss=f"{m['loss']:.4g}", atoms_per_s=f"{rate:,.0f}", refresh=False)
    if done_step % config.train.log_every == 0:
      averaged = {k: float(np.mean([w[k] for w in window])) for k in
                  ("loss", "energy_loss", "force_loss", "grad_norm")}
      log.write("train", done_step, {**averaged, "lr": m["lr"], "atoms_per_s": rate,
                                     "skipped": int(m["nonfinite_total"]),
                                     "time_s": now - timing["start"]})
      window.clear()
    if not m["finite"]:
      say(f"step {done_step}: non-finite loss or gradient, update skipped "
          f"({int(m['nonfinite_run'])} in a row, {int(m['nonfinite_total'])} in total)")
      if m["nonfinite_run"] >= config.train.max_consecutive_nonfinite:
        bar.close()
        checkpointer.close()
        raise NonFiniteHalt(f"{int(m['nonfinite_run'])} consecutive non-finite steps (limit "
                            f"train.max_consecutive_nonfinite={config.train.max_consecutive_nonfinite}); "
                            f"halted at step {done_step}, last good checkpoint kept in "
                            f"{checkpointer.directory}")

  stream = iterators["train"].stream(position)
  pending = None
  deadline = (call_start + 60.0 * config.train.max_minutes
              if config.train.max_minutes is not None else None)
  try:
    while step < total_steps and (step < config.train.min_steps or not _past(deadline)):
      items = [next(stream) for _ in range(local_batches)]
      position = items[-1][0]
      stacked = sharding.stack([batch for _, batch in items])
      atoms = int(stacked.num_atoms.sum()) * jax.process_count()
      state, metrics = train_step(state, sharding.shard_batch(mesh, stacked))
      step += 1
      if pending is not None:
        consume(*pending)
      pending = (step, metrics, atoms)
      if step % config.train.eval_every == 0:
        validate()
      if step % config.train.checkpoint_every == 0:
        checkpointer.save(LAST, state, meta=checkpoint_meta(), predictor=predictor)
    if pending is not None:
      consume(*pending)
  finally:
    stream.close()
    bar.close()

  if final_eval and step % config.train.eval_every:
    validate()
  last_meta = checkpointer.latest_meta(LAST)
  if last_meta is None or last_meta["step"] != step:
    checkpointer.save(LAST, state, meta=checkpoint_meta(), predictor=predictor)

  table = []
  if final_eval:
    results = {split: run_eval(split) for split in EVAL_SPLITS if split in iterators}
    table = error_table(results)
    if is_main:
      markdown = write_error_table(table, workdir)
      say("\n" + markdown)
  if is_main:
    plot_learning_curves(log.records, workdir / CURVE_FILENAME)
  checkpointer.close()

  summary = _summary(timing, step, state, mesh)
  if is_main:
    (workdir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done: step {step}; {summary['steps_per_s']:.3g} steps/s, {summary['atoms_per_s']:,.0f} atoms/s"
        f"; peak device memory {_format_bytes(summary['peak_device_memory_bytes'])}; outputs in {workdir}")
  return TrainResult(workdir=workdir, step=step, losses=losses, table=table, summary=summary)


def _past(deadline: float | None) -> bool:
  if deadline is None:
    return False
  past = time.perf_counter() > deadline
  if jax.process_count() > 1:  # every process must stop at the same step
    past = bool(multihost_utils.broadcast_one_to_all(np.asarray(past)))
  return past


def _params_from_checkpoint(path: str, template):
  """EMA weights of a previous stage, minus top-level modules this model lacks (the direct force head).

  Raises:
    ValueError: when a module of this model is missing from the checkpoint or a shape differs.
  """
  _, loaded, _, _, _ = load_predictor(path)
  loaded, wanted = dict(loaded["params"]), dict(template["params"])
  missing = sorted(set(wanted) - set(loaded))
  if missing:
    raise ValueError(f"{path}: the checkpoint has no parameters for {missing}")
  loaded = {name: loaded[name] for name in wanted}
  if jax.tree.structure(loaded) != jax.tree.structure(wanted):
    raise ValueError(f"{path}: the checkpoint's parameter tree does not match this architecture")
  differs = jax.tree.map(lambda a, b: a.shape != b.shape, loaded, wanted)
  mismatched = [jax.tree_util.keystr(p) for p, bad in jax.tree_util.tree_flatten_with_path(differs)[0] if bad]
  if mismatched:
    raise ValueError(f"{path}: parameter shapes differ from this architecture at {mismatched[:5]}")
  return {"params": jax.tree.map(lambda a, b: jnp.asarray(a, b.dtype), loaded, wanted)}


def _summary(timing: dict, step: int, state, mesh) -> dict[str, Any]:
  elapsed = (time.perf_counter() - timing["first_done"]) if timing["first_done"] else 0.0
  steps = timing["steps_after_first"]
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      "step": step,
      "devices": int(mesh.devices.size),
      "device_kind": jax.devices()[0].device_kind,
      "steps_per_s": steps / elapsed if elapsed > 0 and steps else float("nan"),
      "atoms_per_s": timing["atoms_after_first"] / elapsed if elapsed > 0 and steps else float("nan"),
      "train_wall_s": time.perf_counter() - timing["start"],
      "skipped_steps": int(jax.device_get(state.nonfinite_total)),
      "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
  }


def _format_bytes(value: int | None) -> str:
  return "n/a (backend reports none)" if value is None else f"{value / 2**30:.2f} GiB"
