"""AdamW with the spec-9.2 weight-decay mask, gradient clipping and the spec-9.3 schedule."""

from __future__ import annotations

import jax
import optax

from train.run_config import OptimConfig
from train.schedule import warmup_cosine_schedule

# Parameters whose path contains one of these (case-insensitive) are not decayed (spec 9.2: biases,
# embeddings, normalisation layers). E2Former names its embedding tables "*_table" (edge-degree and
# molecule embeddings) and "*_types" (attention-gate atom types); "embed" covers other models' tables.
NO_DECAY_NAME_PARTS = ("bias", "norm", "embed", "_table", "_types")


def decay_mask(params) -> object:
  """Pytree of bools like ``params``: True where weight decay applies.

  Decay applies to parameters with at least two axes (matrices, SO(3)-linear weights) unless a path
  component names a bias, an embedding table or a normalisation layer (spec 9.2).
  """

  def decays(path, leaf) -> bool:
    names = [str(getattr(k, "key", getattr(k, "name", k))).lower() for k in path]
    return leaf.ndim >= 2 and not any(part in name for name in names for part in NO_DECAY_NAME_PARTS)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: OptimConfig, decay_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """clip_by_global_norm(clip_norm) -> AdamW(schedule, masked weight decay), and the schedule.

  With ``weight_decay == 0`` this is Adam, as in the reference (spec 9.2).
  """
  schedule = warmup_cosine_schedule(config.lr, warmup_steps=config.warmup_steps,
                                    warmup_factor=config.warmup_factor, decay_steps=decay_steps,
                                    lr_min_factor=config.lr_min_factor)
  transform = optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask),
  )
  return transform, schedule

