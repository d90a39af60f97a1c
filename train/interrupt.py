"""Ctrl-C during training: finish the step, save a checkpoint, stop with one line saying how to resume.

A KeyboardInterrupt can land anywhere, in the middle of a checkpoint write or between the update
of the weights and that of the data position, and nothing written then can be trusted. So while
the training loop runs, the first SIGINT only sets a flag that the loop reads at the next step
boundary, where the weights, the step and the data position agree and a checkpoint is safe. A
second SIGINT raises KeyboardInterrupt at once (the checkpoints written before it are kept).
"""

from __future__ import annotations

import signal
import threading
from typing import Callable


class TrainingInterrupted(Exception):
  """Training stopped on SIGINT; the message says at which step and how to resume."""

  def __init__(self, step: int, checkpoint_step: int | None):
    if checkpoint_step is None:
      saved = "no checkpoint yet; run the same command to start again"
    else:
      saved = f"last checkpoint at step {checkpoint_step}; run the same command to resume"
    super().__init__(f"interrupted at step {step}; {saved}")
    self.step, self.checkpoint_step = step, checkpoint_step


class DeferredSigint:
  """From construction to :meth:`restore`, the first SIGINT sets :attr:`requested` (and calls
  ``on_first``), a second one raises KeyboardInterrupt. Outside the main thread (where Python
  delivers no signals) nothing is installed and SIGINT keeps its usual meaning."""

  def __init__(self, on_first: Callable[[], None] = lambda: None):
    self.requested = False
    self._on_first = on_first
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def _handle(self, signum, frame) -> None:
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    self._on_first()

  def restore(self) -> None:
    """Puts the previous SIGINT handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None
