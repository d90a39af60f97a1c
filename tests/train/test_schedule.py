"""The learning-rate schedule against docs/model.md §12.4, and the weight-decay mask of §12.3."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from e2former_jax.config import tiny_config
from e2former_jax.graph import Graph
from e2former_jax.nn.model import E2Former
from train.optimizer import decay_mask, make_optimizer
from train.run_config import OptimConfig
from train.schedule import warmup_cosine_schedule

LR, W, WF, T, LR_MIN = 8e-4, 4000, 0.2, 1_400_000, 0.01


def spec_factor(s: int) -> float:
  """docs/model.md §12.4, written out independently of the implementation."""
  if s <= W:
    return WF * (1 - s / W) + s / W
  if s < T:
    return LR_MIN + 0.5 * (1 - LR_MIN) * (1 + math.cos(math.pi * s / T))
  return LR_MIN


def test_schedule_matches_spec_at_key_steps():
  schedule = warmup_cosine_schedule(LR, warmup_steps=W, warmup_factor=WF, decay_steps=T, lr_min_factor=LR_MIN)
  steps = [0, 1, W // 2, W - 1, W, W + 1, T // 4, T // 2, T - 1, T, T + 10]
  got = np.array([float(schedule(s)) for s in steps])
  want = np.array([LR * spec_factor(s) for s in steps])
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Anchors: 0.2 lr at the start, lr at the end of the warm-up, the slight drop just after it
  # (the cosine runs on s / T), lr_min * lr from T on.
  np.testing.assert_allclose(got[[0, 4, 9, 10]], [0.2 * LR, LR, LR_MIN * LR, LR_MIN * LR], rtol=1e-5)
  assert got[5] < got[4]


def test_optimizer_uses_the_schedule_and_clips():
  config = OptimConfig(lr=1e-2, warmup_steps=10, weight_decay=0.0, clip_norm=1.0, decay_steps=100)
  params = {"w": jnp.ones(3)}
  optimizer, schedule = make_optimizer(config, 100, params)
  flat = ravel_pytree(params)[0]
  # A huge gradient is clipped to norm 1; Adam's first step is then lr * sign(g) (up to eps).
  updates, _ = optimizer.update(jnp.array([1e6, 0.0, -1e6]), optimizer.init(flat), flat)
  np.testing.assert_allclose(updates, [-float(schedule(0)), 0.0, float(schedule(0))], rtol=1e-4)
  assert np.isclose(float(schedule(0)), 0.2 * 1e-2)


def test_decay_mask_excludes_biases_norms_embeddings_and_vectors():
  config = tiny_config(num_layers=1, channels=8, num_heads=2, head_dim=4, num_rbf=8, max_neighbors=4,
                       edge_hidden=8, type_embed_dim=4)
  n, k, b = 4, 4, 1
  graph = Graph(positions=jnp.zeros((n, 3)), species=jnp.ones(n, jnp.int32), node_mask=jnp.ones(n, bool),
                molecule_index=jnp.zeros(n, jnp.int32), nbr_idx=jnp.full((n, k), n, jnp.int32),
                nbr_mask=jnp.zeros((n, k), bool), nbr_shift=jnp.zeros((n, k, 3)),
                charge=jnp.zeros(b, jnp.int32), spin=jnp.ones(b, jnp.int32), molecule_mask=jnp.ones(b, bool))
  params = jax.eval_shape(E2Former(config).init, jax.random.key(0), graph)
  mask = decay_mask(params)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  flat = {jax.tree_util.keystr(path): (leaf, decays)
          for (path, leaf), decays in zip(leaves, jax.tree.leaves(mask))}
  assert any(decays for _, decays in flat.values())
  for name, (leaf, decays) in flat.items():
    lowered = name.lower()
    excluded = leaf.ndim < 2 or any(part in lowered for part in ("bias", "norm", "_table", "_types"))
    assert decays == (not excluded), name
  # The 2-D embedding tables and degree-wise norm scales are excluded; Dense and SO(3)-linear weights decay.
  for name in ("['edge_degree']['source_table']", "['molecule']['charge_table']",
               "['block_0']['attention']['target_types']", "['final_norm']['scale']"):
    leaf, decays = flat["['params']" + name]
    assert leaf.ndim == 2 and not decays, name
  for name in ("['energy_hidden_0']['kernel']", "['block_0']['ffn']['linear_in']['weight']"):
    assert flat["['params']" + name][1], name


def test_adamw_decays_only_masked_parameters():
  """Equals optax.adamw(mask=decay_mask) on the tree; with zero gradient only the decay moves."""
  params = {"params": {"dense": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.ones(3)},
                       "source_table": jnp.ones((5, 3)), "final_norm": {"scale": jnp.ones((3, 8))},
                       "linear": {"weight": jnp.full((3, 8, 8), 3.0)}}}
  config = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, decay_steps=10, clip_norm=1e9)
  optimizer, schedule = make_optimizer(config, 10, params)
  flat, unravel = ravel_pytree(params)
  grads = jax.tree.map(lambda x: jnp.sin(jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
  reference = optax.adamw(schedule, weight_decay=0.5, mask=decay_mask)
  state, ref_state = optimizer.init(flat), reference.init(params)
  for _ in range(3):
    updates, state = jax.jit(optimizer.update)(ravel_pytree(grads)[0], state, flat)
    ref_updates, ref_state = jax.jit(reference.update)(grads, ref_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), unravel(updates),
                 ref_updates)
  zero, _ = optimizer.update(jnp.zeros_like(flat), optimizer.init(flat), flat)
  moved = {jax.tree_util.keystr(p): bool(jnp.any(u != 0))
           for p, u in jax.tree_util.tree_flatten_with_path(unravel(zero))[0]}
  assert moved == {"['params']['dense']['bias']": False, "['params']['dense']['kernel']": True,
                   "['params']['final_norm']['scale']": False, "['params']['linear']['weight']": True,
                   "['params']['source_table']": False}
