"""The learning-rate schedule of docs/model.md §12.4 as an optax schedule.

Multiplier f(s) of the peak rate at optimiser step s, with W warm-up steps, warm-up factor w_f, cosine
horizon T and floor lr_min:

  f(s) = w_f (1 - s/W) + s/W                            for s <= W
  f(s) = lr_min + (1 - lr_min) (1 + cos(pi s / T)) / 2  for W < s < T
  f(s) = lr_min                                         for s >= T

The cosine's argument is s / T (not (s - W) / (T - W)) as in the reference, so f drops slightly just
after the warm-up.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax


def warmup_cosine_schedule(peak_lr: float, *, warmup_steps: int, warmup_factor: float,
                           decay_steps: int, lr_min_factor: float) -> optax.Schedule:
  """lr(s) = peak_lr * f(s) (formula in the module docstring); s is the optimiser step count.

  ``decay_steps`` may be a traced scalar (a run sized by its budget fixes T after compiling).
  """
  if isinstance(decay_steps, int) and decay_steps <= 0:
    raise ValueError(f"decay_steps must be positive, got {decay_steps}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    cosine = lr_min_factor + 0.5 * (1 - lr_min_factor) * (1 + jnp.cos(jnp.pi * s / decay_steps))
    factor = jnp.where(s < decay_steps, cosine, lr_min_factor)
    if warmup_steps > 0:  # W = 0 means no warm-up branch (the formula would divide by zero)
      warm = warmup_factor * (1 - s / warmup_steps) + s / warmup_steps
      factor = jnp.where(s <= warmup_steps, warm, factor)
    return peak_lr * factor

  return schedule
