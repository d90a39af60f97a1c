"""The dispatcher's periodic-term ops: weights and weighted neighbour sums, kernels against XLA."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import ops
from e2former_jax.config import AttentionImpl

N, K, H, D, R, C = 10, 6, 2, 4, 3, 4


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  nbr_idx = rng.integers(0, N, (N, K)).astype(np.int32)
  nbr_mask = rng.random((N, K)) < 0.7
  nbr_idx[~nbr_mask] = N
  return dict(q=f(N, H, D), k=f(N, H, D), gate=f(N, K, H), post_weight=f(N, K, H),
              envelope=jnp.asarray(rng.uniform(0, 1, (N, K)), jnp.float32), values=f(N, R, C),
              nbr_idx=jnp.asarray(nbr_idx), nbr_mask=jnp.asarray(nbr_mask))


def weights_of(x, impl):
  return ops.node_attention_weights(x["q"], x["k"], x["gate"], x["post_weight"], x["envelope"],
                                    x["nbr_idx"], x["nbr_mask"], impl=impl)


def test_weights_are_those_node_attention_applies(inputs):
  x = inputs
  weights = weights_of(x, AttentionImpl.XLA)  # [N, K, H]
  assert not np.asarray(weights)[~np.asarray(x["nbr_mask"])].any()
  fused = ops.node_attention(x["q"], x["k"], x["gate"], x["post_weight"], x["envelope"],
                             x["values"], x["nbr_idx"], x["nbr_mask"], impl=AttentionImpl.XLA)
  summed = ops.neighbor_sum(weights, x["values"], x["nbr_idx"], x["nbr_mask"],
                            impl=AttentionImpl.XLA)
  np.testing.assert_allclose(summed, fused, rtol=1e-5, atol=1e-6)


def test_kernels_match_xla_with_gradients(inputs):
  x = inputs

  def loss(q, k, gate, values, impl):
    y = dict(x, q=q, k=k, gate=gate)
    w = weights_of(y, impl)
    out = ops.neighbor_sum(w * w, values, x["nbr_idx"], x["nbr_mask"], impl=impl)  # [N, R, C]
    return jnp.sum(out * jnp.cos(out)), out

  args = (x["q"], x["k"], x["gate"], x["values"])
  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      *args, AttentionImpl.PALLAS_INTERPRET)
  (_, out_ref), grads_ref = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
      *args, AttentionImpl.XLA)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())
