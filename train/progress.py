"""A progress bar whose rate and time left come from steady-state steps only.

The first update of a jitted loop includes XLA's compilation (tens of seconds on a CPU, several
seconds on a GPU), so tqdm's own rate, which counts it, first predicts many times the real
duration (``1/300 [00:19<48:31, 19.54s/step]`` for a 40 s run). Here the updates that compile are
left out: until a steady step has been timed the bar says "compiling…", then the rate and the time
left come from the steps after the warm-up alone.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from tqdm import tqdm

COMPILING = "compiling…"
# Elapsed time, then (in the postfix) the steady-state ETA and rate or COMPILING, then the caller's
# statistics.
_BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"


class SteadyProgress:
  """A tqdm bar on stderr with a steady-state ETA.

  Args:
    total: steps of the whole run (None: not known yet, see :meth:`set_total`).
    initial: steps already done (a resumed run).
    unit: what one step is called.
    desc: label in front of the bar.
    disable: show nothing.
    warmup_updates: leading :meth:`update` calls whose time includes compilation.
    clock: seconds (for tests).
  """

  def __init__(self, *, total: int | None, initial: int = 0, unit: str = "step", desc: str | None = None,
               disable: bool = False, warmup_updates: int = 1,
               clock: Callable[[], float] = time.perf_counter):
    self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, disable=disable,
                     dynamic_ncols=True, file=sys.stderr, bar_format=_BAR_FORMAT)
    self._total, self._done = total, initial
    self._unit, self._clock, self._warmup_left = unit, clock, warmup_updates
    self._steady_from: tuple[float, int] | None = None  # (time, steps done) when warm-up ended
    self.status = COMPILING  # what follows the elapsed time: the ETA and the caller's statistics
    self._bar.set_postfix_str(self.status, refresh=False)

  def set_total(self, total: int) -> None:
    """The run's length once it is known (a run sized by its time budget learns it after warm-up)."""
    self._total = self._bar.total = total

  def update(self, n: int = 1, **stats) -> None:
    """Counts ``n`` finished steps and shows ``stats`` (key=value) after the ETA."""
    now = self._clock()
    self._done += n
    if self._warmup_left > 0:
      self._warmup_left -= 1
      if self._warmup_left == 0:
        self._steady_from = (now, self._done)
    self.status = ", ".join([self._eta(now)] + [f"{k}={v}" for k, v in stats.items()])
    self._bar.set_postfix_str(self.status, refresh=False)
    self._bar.update(n)

  def _eta(self, now: float) -> str:
    """"<time left, rate" from the steps after the warm-up, or COMPILING before one was timed."""
    if self._steady_from is None:
      return COMPILING
    start, start_done = self._steady_from
    steps, seconds = self._done - start_done, now - start
    if steps <= 0 or seconds <= 0:
      return COMPILING
    rate = steps / seconds
    if self._total is None:  # length not known yet: the rate alone
      return f"{rate:.3g} {self._unit}/s"
    left = max(self._total - self._done, 0) / rate
    return f"<{tqdm.format_interval(left)}, {rate:.3g} {self._unit}/s"

  def close(self) -> None:
    self._bar.close()
