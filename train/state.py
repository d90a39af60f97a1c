"""Everything that changes during training, as one pytree that checkpoints round-trip exactly."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

# Warm-up of the EMA decay, min(decay, (1 + t) / (EMA_WARMUP + t)): early averages are not dominated
# by the random initial weights (the usual num_updates correction of moving averages).
EMA_WARMUP = 10.0


@flax.struct.dataclass
class TrainState:
  """Attributes:
    step: [] int32, training iterations taken (batches consumed), skipped ones included.
    opt_step: [] int32, optimiser updates applied (skipped non-finite steps excluded); the
      schedule's and the EMA's step.
    params: model variables ``{"params": ...}``.
    opt_state: optax state of the flat parameter vector (``ravel_pytree(params)[0]``).
    ema_params: exponential moving average of ``params`` (evaluation and export).
    rng: [2] uint32 raw key data of the run's random stream, advanced once per iteration; the
      stream for stochastic layers (the current architecture has none) so that a resumed run draws
      the same numbers.
    nonfinite_total: [] int32, skipped (NaN/inf loss or gradient) iterations so far.
    nonfinite_run: [] int32, consecutive skipped iterations ending at ``step``.
  """

  step: jax.Array
  opt_step: jax.Array
  params: object
  opt_state: object
  ema_params: object
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_run: jax.Array


def create_train_state(params, optimizer, seed: int) -> TrainState:
  """Initial state; ``optimizer`` acts on the flat parameter vector (``train.optimizer``)."""
  zero = jnp.zeros((), jnp.int32)
  opt_state = optimizer.init(ravel_pytree(params)[0])
  state = TrainState(step=zero, opt_step=zero, params=params, opt_state=opt_state,
                     ema_params=params, rng=jax.random.key_data(jax.random.key(seed)),
                     nonfinite_total=zero, nonfinite_run=zero)
  # The jitted step donates the state: every leaf must own its buffer (a buffer reached twice, like
  # the shared zero counters or ema_params = params, cannot be donated on GPU).
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)


def ema_update(ema, params, opt_step: jax.Array, decay: float):
  """ema <- d ema + (1 - d) params with d = min(decay, (1 + t) / (EMA_WARMUP + t)), t = opt_step."""
  t = opt_step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + t) / (EMA_WARMUP + t))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)
