"""How many optimiser steps fit a wall-clock budget: the cosine horizon of a run given minutes, not steps.

A run with ``train.steps: null`` and ``train.max_minutes`` set trains for as long as its budget
allows and sizes the learning-rate schedule to that length. The horizon T cannot be known before
the run has measured itself (its step rate on this machine, what a validation pass costs), but it
does not need to be: the warm-up's learning rate does not depend on T. So the run measures during
the warm-up, at its first validation, and fixes T then:

  T = step + floor((deadline - now - final) / (t_step + t_val / eval_every))

where ``final`` is the time the closing validation + test evaluation will take (estimated from the
validation pass). A machine can slow down after the warm-up (other load, checkpoint writes in the
background): at every later validation the run checks T against the wall time its last
``eval_every`` steps took, validation and checkpoints included, and shortens T when the rest would
not fit (:func:`shortened_horizon`; never lengthens it, so the schedule only ever moves forward).
T is stored in every checkpoint, so a resumed run keeps its schedule.
"""

from __future__ import annotations

import dataclasses
import math

# Saving the last checkpoint, writing the tables and the learning-curve plot at the end of a run
# (measured: ~3-6 s on a 2-core CPU for the tiny model); kept free in the budget.
CLOSING_SECONDS = 10.0
# Stand-in horizon while T is not yet known (warm-up): large enough that the schedule reads as the
# peak rate for any step taken before T is fixed.
UNKNOWN_HORIZON = 2**30


@dataclasses.dataclass(frozen=True)
class PassTiming:
  """Wall time of one evaluation pass.

  Attributes:
    seconds: the whole pass.
    first_batch_seconds: its first step (includes compiling the evaluation step the first time).
    batches: steps in the pass.
  """

  seconds: float
  first_batch_seconds: float
  batches: int

  def steady_seconds(self) -> float:
    """The pass without compilation: the later steps' mean time for every step."""
    if self.batches < 2:
      return self.seconds
    return (self.seconds - self.first_batch_seconds) * self.batches / (self.batches - 1)


def plan_horizon(*, step: int, now: float, deadline: float, step_seconds: float,
                 validation_seconds: float, eval_every: int, closing_eval_seconds: float) -> int:
  """The total step count T that ends training, validations included, in time for the closing evaluation.

  Args:
    step: steps taken so far.
    now, deadline: clock readings (seconds; same clock).
    step_seconds: steady time of one training step.
    validation_seconds: steady time of one validation pass (taken every ``eval_every`` steps).
    eval_every: steps between validation passes.
    closing_eval_seconds: the final evaluation (validation and test splits) plus writing outputs.

  Returns:
    T >= step (no further step when the budget is already spent).
  """
  available = deadline - now - closing_eval_seconds
  per_step = step_seconds + validation_seconds / max(eval_every, 1)
  return step + max(0, math.floor(available / per_step))


def shortened_horizon(horizon: int, *, step: int, now: float, deadline: float, recent_seconds: float,
                      recent_steps: int, closing_eval_seconds: float) -> int:
  """``horizon``, or fewer steps when the remaining ones would not end in time at the recent rate.

  Args:
    horizon: the current T.
    step: steps taken so far.
    now, deadline: clock readings (seconds; same clock).
    recent_seconds, recent_steps: wall time of the last steps and their number (validation passes
      and checkpoint writes included).
    closing_eval_seconds: the final evaluation plus writing outputs.
  """
  per_step = recent_seconds / max(recent_steps, 1)
  fits = step + max(0, math.floor((deadline - now - closing_eval_seconds) / per_step))
  return max(step, min(horizon, fits))
