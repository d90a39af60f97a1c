"""The progress bar's ETA leaves the compiling steps out."""

from __future__ import annotations

from train.progress import COMPILING, SteadyProgress


def test_eta_counts_steady_state_steps_only():
  # 300 steps: the first takes 19.5 s (compilation), the others 0.125 s each (like the 40 s
  # run, which tqdm's own rate predicted at 48 minutes).
  times = iter([19.5] + [19.5 + 0.125 * k for k in range(1, 300)])
  bar = SteadyProgress(total=300, disable=True, clock=lambda: next(times))
  assert bar.status == COMPILING
  bar.update(1, loss="1.0")
  assert bar.status == f"{COMPILING}, loss=1.0"  # no steady step timed yet
  bar.update(1)
  assert bar.status == "<00:37, 8 step/s"  # 298 steps left at 0.125 s
  for _ in range(148):
    bar.update(1)
  assert bar.status == "<00:18, 8 step/s"
  bar.close()


def test_resumed_run_counts_from_its_initial_step():
  times = iter([30.0, 31.0, 32.0])
  bar = SteadyProgress(total=100, initial=90, disable=True, clock=lambda: next(times))
  bar.update(1)
  bar.update(1)
  assert bar.status == "<00:08, 1 step/s"  # 8 steps left
  bar.close()
