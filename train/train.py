"""The training loop: :func:`train_and_evaluate` runs (or resumes) one run in a working directory.

Per step, this process takes its S / process_count sub-batches from the training stream, stacks
and shards them, and runs the jitted data-parallel step. Metrics of step t are read back while step
t + 1 runs (one step of lag keeps the device busy). Every ``eval_every`` steps the EMA weights are
evaluated on the validation split (best checkpoint), every ``checkpoint_every`` steps the "last"
checkpoint is written (asynchronously). At the end: final checkpoint, the error table of the
exported model (the best checkpoint's EMA weights) on the validation and test splits, the
learning-curve plot and a throughput summary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils
from tqdm import tqdm

from train import sharding
from train.budget import CLOSING_SECONDS, UNKNOWN_HORIZON, PassTiming, plan_horizon, shortened_horizon
from train.checkpoint import BEST, CHECKPOINT_DIRNAME, LAST, Checkpointer, PredictorInfo, load_checkpoint
from train.data import DataPosition
from train.evaluate import evaluate, validation_loss
from train.interrupt import DeferredSigint, TrainingInterrupted
from train.metrics import (ALL_SUBSETS, CURVE_FILENAME, MetricsLog, error_table, plot_learning_curves,
                           write_error_table)
from train.optimizer import make_optimizer
from train.progress import SteadyProgress
from train.run_config import RunConfig
from train.run_data import empty_batch, empty_splits, make_iterator, open_run_data
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
    table: the closing error rows (:func:`train.metrics.error_table`) of the exported model, the
      best checkpoint's EMA weights; empty when not evaluated.
    table_step: the step whose weights ``table`` scores (None when not evaluated).
    summary: throughput and run facts (also in ``summary.json``).
  """

  workdir: Path
  step: int
  losses: list[float]
  table: list[dict[str, Any]]
  table_step: int | None
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
    TrainingInterrupted: on SIGINT (Ctrl-C), after the step in progress and a checkpoint of it.
    ValueError: for an invalid configuration or dataset, found before anything is written.
  """
  call_start = time.perf_counter()
  workdir = Path(workdir).expanduser().absolute()
  is_main = jax.process_index() == 0
  say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress and is_main else (lambda msg: None)

  # The configuration and the data are checked before anything is written to the working directory.
  mesh = sharding.make_mesh(num_devices)
  batches_per_step = config.data.batches_per_step or mesh.devices.size
  local_batches = sharding.local_batches_per_step(mesh, batches_per_step)
  model_config = config.model_config()
  saved = _saved_predictor(workdir / CHECKPOINT_DIRNAME)
  if saved is not None and not resume:
    raise ValueError(f"{workdir} already holds a run (checkpoints in {workdir / CHECKPOINT_DIRNAME}); "
                     "resume it, or start over in an empty folder")
  if saved is not None:  # a run started before the LayerNorm default changed keeps its epsilon
    model_config = model_config.replace(layer_norm_eps=saved.model_config.layer_norm_eps)

  data = open_run_data(config.data, references=None if saved is None else saved.reference_energies)
  iterators = {split: make_iterator(data, split, config.data, model_config, training=split == "train",
                                    seed=config.train.seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
               for split in ("train", *EVAL_SPLITS) if len(data.splits[split])}
  empty = empty_splits(data, config.data)
  if empty and is_main:
    consequences = [text for split, text in (
        ("val", "no validation passes, checkpoints/best will hold the final weights"),
        ("test", "no test rows in the final table")) if split not in iterators]
    warnings.warn(f"{empty}; " + "; ".join(consequences))

  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / RUN_CONFIG_FILENAME).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
  checkpointer = Checkpointer(workdir / CHECKPOINT_DIRNAME)
  predictor = PredictorInfo(model_config=model_config, reference_energies=data.references,
                            run_config=config)
  say(f"data: {data.dataset.path} ({len(data.dataset)} records; "
      + ", ".join(f"{s} {len(data.splits[s])}" for s in ("train", *EVAL_SPLITS)) + "); "
      f"sub-batch: {config.data.atoms_per_batch} atoms x {data.max_molecules + 1} molecule slots; "
      f"{batches_per_step} sub-batches/step on {mesh.devices.size} device(s)")

  sample = jax.tree.map(jnp.asarray, empty_batch(iterators["train"]).graph)
  params = make_init(model_config)(jax.random.key(config.train.seed), sample)
  if config.train.init_from:
    params = _params_from_checkpoint(config.train.init_from, params)
    say(f"initialised from the EMA weights of {config.train.init_from}")
  optimizer, _ = make_optimizer(config.optim, config.decay_steps or UNKNOWN_HORIZON, params)
  state = create_train_state(params, optimizer, config.train.seed)
  state_shardings = sharding.state_sharding(mesh, state)
  state = jax.device_put(state, state_shardings)
  say(f"model: {sum(x.size for x in jax.tree.leaves(params)):,} parameters; forces "
      f"{config.loss.forces.value}")

  position, best_val = DataPosition(), math.inf
  # T of the schedule: configured, or (None) sized from the wall-clock budget once measured.
  budget_mode = config.train.steps is None
  horizon = config.decay_steps
  restored = checkpointer.restore(LAST, state, state_shardings) if resume else None
  if restored is not None:
    state, meta = restored
    position = DataPosition.from_dict(meta["data_position"])
    best_val = meta.get("best_val_loss", math.inf)
    horizon = meta.get("decay_steps", horizon)
    say(f"resumed from step {meta['step']} (data epoch {position.epoch}, batch {position.batch})")
  step = int(jax.device_get(state.step))
  log = MetricsLog(workdir, resume_step=step if restored is not None else None, enabled=is_main)

  train_step = make_train_step(model_config, config.loss, config.optim, mesh)
  eval_step = make_eval_step(model_config, mesh)
  pass_timing: list[PassTiming] = []

  def run_eval(split: str, params=None):
    """Errors of ``params`` (default: the current EMA weights) on ``split``."""
    return evaluate(eval_step, state.ema_params if params is None else params, iterators[split], mesh,
                    local_batches, data.subset_names, max_batches=config.data.max_eval_batches,
                    timing=pass_timing)

  def validate():
    nonlocal best_val
    if "val" not in iterators:
      return None
    errors = run_eval("val")
    val_loss = validation_loss(config.loss, errors[ALL_SUBSETS])
    record = log.write("val", step, {"loss": val_loss, **errors[ALL_SUBSETS].summary()})
    direct = record.get("direct_force_mae_mev_per_a")
    say(f"step {step}: validation energy {record['energy_mae_mev_per_atom']:.2f} meV/atom, force "
        f"(-dE/dx) {record['force_mae_mev_per_a']:.1f} meV/A"
        + (f", direct head {direct:.1f} meV/A" if direct is not None else "")
        + f" (loss {val_loss:.4g})")
    if val_loss < best_val:
      best_val = val_loss
      checkpointer.save(BEST, state, meta=checkpoint_meta(), predictor=predictor)
    return errors

  def checkpoint_meta() -> dict[str, Any]:
    return {"data_position": position.to_dict(), "best_val_loss": best_val, "decay_steps": horizon}

  def closing_seconds() -> float:
    """The closing evaluation of the validation and test splits plus writing the outputs."""
    if not (final_eval and pass_timing):
      return CLOSING_SECONDS
    per_record = pass_timing[-1].steady_seconds() / max(len(data.splits["val"]), 1)
    return CLOSING_SECONDS + per_record * sum(len(data.splits[s]) for s in EVAL_SPLITS)

  last_check: dict[str, Any] = {"time": None, "step": None}  # the last look at the horizon

  def fix_horizon() -> None:
    """Budget mode: T from this machine's measured step and validation times (train.budget)."""
    nonlocal horizon
    now = time.perf_counter()
    step_seconds = (timing["last_done"] - timing["first_done"]) / max(timing["steps_after_first"] - 1, 1)
    horizon = _from_process0(max(plan_horizon(
        step=step, now=now, deadline=deadline, step_seconds=step_seconds,
        validation_seconds=pass_timing[-1].steady_seconds() if pass_timing else 0.0,
        eval_every=config.train.eval_every, closing_eval_seconds=closing_seconds()),
        config.train.min_steps, step))
    bar.set_total(horizon)
    say(f"budget: {step_seconds:.3g} s/step measured; training to step {horizon} "
        f"(cosine horizon) within train.max_minutes={config.train.max_minutes}")
    last_check.update(time=time.perf_counter(), step=step)

  def check_horizon() -> None:
    """Budget mode, after T is fixed: shortens T when the recent steps show it would not fit."""
    nonlocal horizon
    now = time.perf_counter()
    if last_check["time"] is None:  # resumed: the window starts here
      last_check.update(time=now, step=step)
      return
    shorter = _from_process0(max(shortened_horizon(
        horizon, step=step, now=now, deadline=deadline, recent_seconds=now - last_check["time"],
        recent_steps=step - last_check["step"], closing_eval_seconds=closing_seconds()),
        config.train.min_steps))
    last_check.update(time=now, step=step)
    if shorter < horizon:
      horizon = shorter
      bar.set_total(horizon)
      say(f"budget: slower than planned; cosine horizon shortened to step {horizon}")

  def save_last() -> None:
    last_meta = checkpointer.latest_meta(LAST)
    if last_meta is None or last_meta["step"] != step:
      checkpointer.save(LAST, state, meta=checkpoint_meta(), predictor=predictor)

  def report_skipped() -> None:
    skipped = data.dataset.skipped.summary()
    if skipped and is_main:
      warnings.warn(skipped)

  bar = SteadyProgress(total=config.train.steps or horizon, initial=step,
                       disable=not (progress and is_main))
  losses: list[float] = []
  window: list[dict[str, float]] = []
  # input_wait: seconds the loop blocked on the data pipeline (its prefetch queue empty): time in
  # which the devices may have run out of work because batches were not ready.
  timing = {"start": time.perf_counter(), "first_done": None, "last_done": None, "atoms_after_first": 0,
            "steps_after_first": 0, "input_wait": 0.0}

  def consume(done_step: int, metrics, atoms: int) -> None:
    """Reads back one step's metrics: losses, progress, logging, non-finite accounting."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    now = time.perf_counter()
    losses.append(m["loss"])
    timing["last_done"] = now
    if timing["first_done"] is None:
      timing["first_done"] = now  # the first step includes compilation: excluded from throughput
    else:
      timing["atoms_after_first"] += atoms
      timing["steps_after_first"] += 1
    window.append(m)
    elapsed = now - timing["first_done"]
    rate = timing["atoms_after_first"] / elapsed if elapsed > 0 else float("nan")
    bar.update(1, loss=f"{m['loss']:.4g}", atoms_per_s=f"{rate:,.0f}")
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
  interrupt = DeferredSigint(lambda: say("interrupted: stopping after this step (Ctrl-C again to stop "
                                         "at once, without saving it)"))
  last_val = None  # the validation errors of the current step, if it was validated
  try:
    while (step < ((horizon or math.inf) if budget_mode else config.train.steps)
           and not _agreed(interrupt.requested)
           and (step < config.train.min_steps or not _past(deadline, closing_seconds()))):
      waiting = time.perf_counter()
      items = [next(stream) for _ in range(local_batches)]
      timing["input_wait"] += time.perf_counter() - waiting
      position = items[-1][0]
      stacked = sharding.stack([batch for _, batch in items])
      atoms = int(stacked.num_atoms.sum()) * jax.process_count()
      state, metrics = train_step(state, sharding.shard_batch(mesh, stacked),
                                  np.int32(horizon or UNKNOWN_HORIZON))
      step += 1
      if pending is not None:
        consume(*pending)
      pending = (step, metrics, atoms)
      last_val = None
      if step % config.train.eval_every == 0:
        planning = budget_mode and horizon is None
        if planning:  # the steps are timed up to here: without the validation pass
          consume(*pending)
          pending = None
        last_val = validate()
        if planning:
          fix_horizon()
        elif budget_mode:
          check_horizon()
      if step % config.train.checkpoint_every == 0:
        checkpointer.save(LAST, state, meta=checkpoint_meta(), predictor=predictor)
    if pending is not None:
      consume(*pending)
  except KeyboardInterrupt:  # a second Ctrl-C: the step in flight is not saved
    report_skipped()
    raise _interrupted(checkpointer, step) from None
  finally:
    interrupt.restore()
    stream.close()
    bar.close()
    checkpointer.wait()  # on an error too: no checkpoint is left half-written
  if _agreed(interrupt.requested):  # stopped at a step boundary: weights, step and data position agree
    save_last()
    report_skipped()
    raise _interrupted(checkpointer, step)

  try:
    if final_eval and last_val is None:
      last_val = validate()
    save_last()
    if "val" not in iterators:  # nothing to choose a best checkpoint on: the final weights
      checkpointer.save(BEST, state, meta=checkpoint_meta(), predictor=predictor)

    table, table_step = [], None
    if final_eval:
      # The table scores the exported model: the best checkpoint's EMA weights, which load_predictor,
      # `e2former eval|md` and the ASE calculator load. When that is this step's (the usual end of a
      # decayed schedule), the closing validation above is its validation: not evaluated twice.
      # The best checkpoint's weights are read back only when they are not the current ones; with no
      # best checkpoint (no validation loss was ever finite) the final weights are scored.
      best_meta = checkpointer.latest_meta(BEST)
      params, table_step = None, step
      if best_meta is not None and best_meta["step"] != step:
        params = checkpointer.restore_ema_params(BEST, state.ema_params, state_shardings.ema_params)
        table_step = best_meta["step"]
        say(f"closing evaluation: the best checkpoint, step {table_step} (validation loss "
            f"{best_meta['best_val_loss']:.4g}), the exported model")
        last_val = None
      results = {split: last_val if split == "val" and last_val is not None else run_eval(split, params)
                 for split in EVAL_SPLITS if split in iterators}
      table = error_table(results)
      if is_main and table:
        markdown = write_error_table(table, workdir)
        say("\n" + markdown)
    if is_main:
      plot_learning_curves(log.records, workdir / CURVE_FILENAME)
  finally:  # on an error too: the checkpoint writes finish
    checkpointer.close()

  report_skipped()
  summary = _summary(timing, step, state, mesh)
  if is_main:
    (workdir / SUMMARY_FILENAME).write_text(json.dumps(summary, indent=2) + "\n")
    say(f"done: step {step}; {summary['steps_per_s']:.3g} steps/s, {summary['atoms_per_s']:,.0f} atoms/s"
        f"; waited for data {100 * summary['input_wait_fraction']:.1f} % of the time; peak device memory {_format_bytes(summary['peak_device_memory_bytes'])}; outputs in {workdir}")
  return TrainResult(workdir=workdir, step=step, losses=losses, table=table, table_step=table_step,
                     summary=summary)


def _saved_predictor(checkpoints: Path) -> PredictorInfo | None:
  """The predictor of the run's last checkpoint, read without creating any folder (None if none)."""
  if not (checkpoints / LAST).is_dir():
    return None
  checkpointer = Checkpointer(checkpoints)
  try:
    return checkpointer.predictor_info(LAST)
  finally:
    checkpointer.close()


def _interrupted(checkpointer: Checkpointer, step: int) -> TrainingInterrupted:
  """The error that reports an interruption at ``step``, once the checkpoint writes have finished."""
  meta = checkpointer.latest_meta(LAST)
  checkpointer.close()
  return TrainingInterrupted(step, None if meta is None else meta["step"])


def _agreed(flag: bool) -> bool:
  """Process 0's ``flag`` on every process (every process must stop at the same step)."""
  return bool(_from_process0(int(flag)))


def _from_process0(value: int) -> int:
  """Process 0's ``value`` on every process: the schedule's horizon, which each process would
  otherwise plan from its own clock, and the decisions to stop must be one across processes."""
  if jax.process_count() > 1:
    value = int(multihost_utils.broadcast_one_to_all(np.asarray(value, np.int32)))
  return value


def _past(deadline: float | None, reserve: float = 0.0) -> bool:
  """Whether less than ``reserve`` seconds are left before ``deadline`` (never without one)."""
  if deadline is None:
    return False
  past = time.perf_counter() > deadline - reserve
  if jax.process_count() > 1:  # every process must stop at the same step
    past = bool(multihost_utils.broadcast_one_to_all(np.asarray(past)))
  return past


def _params_from_checkpoint(path: str, template):
  """EMA weights of a previous stage, minus top-level modules this model lacks (the direct force head).

  Raises:
    ValueError: when a module of this model is missing from the checkpoint or a shape differs.
  """
  loaded, _ = load_checkpoint(path)
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
      "input_wait_s": timing["input_wait"],
      "input_wait_fraction": timing["input_wait"] / max(time.perf_counter() - timing["start"], 1e-9),
      "skipped_steps": int(jax.device_get(state.nonfinite_total)),
      "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
  }


def _format_bytes(value: int | None) -> str:
  return "n/a (backend reports none)" if value is None else f"{value / 2**30:.2f} GiB"
