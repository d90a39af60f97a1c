"""The step count that fits a wall-clock budget."""

from __future__ import annotations

import pytest

from train.budget import PassTiming, plan_horizon, shortened_horizon


def test_horizon_fills_the_budget_with_validations_and_closing_eval():
  # 100 s left, 10 s kept for the closing evaluation; each step 0.5 s plus a 2 s validation every
  # 10 steps (0.2 s per step): 90 / 0.7 = 128.6 -> 128 more steps.
  assert plan_horizon(step=50, now=1000.0, deadline=1100.0, step_seconds=0.5, validation_seconds=2.0,
                      eval_every=10, closing_eval_seconds=10.0) == 50 + 128
  # Every step fits exactly: 0.7 s x 128 = 89.6 <= 90; one more would not.
  assert 128 * 0.7 <= 90.0 < 129 * 0.7
  # A budget already spent gives no further step (never a horizon below the current step).
  assert plan_horizon(step=50, now=1200.0, deadline=1100.0, step_seconds=0.5, validation_seconds=2.0,
                      eval_every=10, closing_eval_seconds=10.0) == 50


def test_steady_pass_time_excludes_compilation():
  # 10 batches in 30 s, the first (compiling) took 21 s: 1 s per later batch -> 10 s per pass.
  assert PassTiming(seconds=30.0, first_batch_seconds=21.0, batches=10).steady_seconds() == pytest.approx(10.0)
  assert PassTiming(seconds=4.0, first_batch_seconds=4.0, batches=1).steady_seconds() == 4.0


def test_horizon_shrinks_to_the_recent_rate_and_never_grows():
  # 100 steps took 20 s (0.2 s/step); 60 s left, 10 s kept for the closing evaluation: 250 more steps.
  timing = dict(step=1000, now=500.0, deadline=560.0, recent_seconds=20.0, recent_steps=100,
                closing_eval_seconds=10.0)
  assert shortened_horizon(1400, **timing) == 1250
  assert shortened_horizon(1200, **timing) == 1200  # it fits: unchanged, never lengthened
  # Past the deadline: no further step.
  assert shortened_horizon(1400, **{**timing, "now": 600.0}) == 1000

