"""The train state's leaves own distinct buffers (the jitted step donates the state on GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from train.state import create_train_state


def test_train_state_leaves_do_not_share_buffers():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = create_train_state(params, optax.adamw(1e-3), seed=0)
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree.leaves(state)]
  assert len(set(pointers)) == len(pointers)
