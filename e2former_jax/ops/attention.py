"""Dispatcher of the fused node-centric attention (spec 6.3-6.5, 8).

The model calls :func:`node_attention` with model-layout arrays; this module converts them to the
kernels' head-last layout and selects the implementation. Nothing else in ``e2former_jax`` imports
``pallas_kernels``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from e2former_jax.config import AttentionImpl

# Strength of the attention sink in the softmax denominator (authors' value, spec 6.4).
SOFTMAX_SINK = 1e-3


def sink_softmax(logits: jax.Array, envelope: jax.Array, mask: jax.Array) -> jax.Array:
  """alpha_k = exp(l_k) phi_k / (sum_k' exp(l_k') phi_k' + sink) over valid slots (spec 6.4).

  The sink has fixed strength relative to logit 0, so alpha is a smooth function of the logits and
  of the envelope (see docs/decisions.md, D1). The stabiliser m = max(0, max over valid slots) is a
  constant for autodiff: the value does not depend on it.

  Args:
    logits: [N, K, H]. envelope: [N, K]. mask: [N, K] bool.
  Returns:
    [N, K, H], zero on masked slots.
  """
  valid = mask[..., None]  # [N, K, 1]
  m = jax.lax.stop_gradient(jnp.max(jnp.where(valid, logits, 0.0), axis=1, keepdims=True))
  m = jnp.maximum(m, 0.0)  # [N, 1, H]
  e = jnp.where(valid, jnp.exp(jnp.where(valid, logits, 0.0) - m) * envelope[..., None], 0.0)
  return e / (e.sum(axis=1, keepdims=True) + SOFTMAX_SINK * jnp.exp(-m))


def _node_attention_xla(q, k, gate, post_weight, envelope, values, nbr_idx, nbr_mask, scale):
  gather = lambda x: jnp.take(x, nbr_idx, axis=0, mode="fill", fill_value=0)
  logits = gate * scale * jnp.einsum("ndh,nkdh->nkh", q, gather(k))  # [N, K, H]
  weights = sink_softmax(logits, envelope, nbr_mask) * post_weight  # [N, K, H]
  return jnp.einsum("nkh,nkxh->nxh", weights, gather(values))


def node_attention(q: jax.Array, k: jax.Array, gate: jax.Array, post_weight: jax.Array,
                   envelope: jax.Array, values: jax.Array, nbr_idx: jax.Array, nbr_mask: jax.Array,
                   *, impl: AttentionImpl) -> jax.Array:
  """Agg_i[r, c] = sum_k alpha_ikh post_ikh values[idx_ik, r, c], h = c mod H.

  alpha = sink_softmax(gate * (q_i . k_j) / sqrt(d), envelope, mask).

  Args:
    q: [N, H, D] queries. k: [M, H, D] keys of the source nodes.
    gate: [N, K, H] per-edge logit gates. post_weight: [N, K, H] post-softmax weights.
    envelope: [N, K] phi(d). values: [M, R, C] source rows, channel c in head c % H.
    nbr_idx: [N, K] int32 in [0, M] (M = empty). nbr_mask: [N, K] bool.
    impl: implementation.
  Returns:
    [N, R, C]
  """
  n, h, d = q.shape
  m, r, c = values.shape
  assert k.shape == (m, h, d), (k.shape, q.shape)
  assert gate.shape == post_weight.shape == (n, nbr_idx.shape[1], h)
  assert c % h == 0, (c, h)
  scale = d**-0.5
  # Head-last layout: values [M, R, C] -> [M, R * C/H, H] with head = c % H the fast index.
  values_hl = values.reshape(m, r * (c // h), h)
  if impl is AttentionImpl.XLA:
    out = _node_attention_xla(q.transpose(0, 2, 1), k.transpose(0, 2, 1), gate, post_weight,
                              envelope, values_hl, nbr_idx, nbr_mask, scale)
  else:
    raise NotImplementedError(impl)
  return out.reshape(n, r, c)
