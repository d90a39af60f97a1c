"""Dispatcher of the fused node-centric attention (spec 6.3-6.5, 8).

The model calls :func:`node_attention` with model-layout arrays; this module converts them to the
kernels' head-last layout and selects the implementation. Nothing else in ``e2former_jax`` imports
``pallas_kernels``. Periodic cells also need the attention weights themselves and weighted
neighbour sums of other per-edge weights (:func:`node_attention_weights`, :func:`neighbor_sum`;
docs/decisions.md D11).
"""

from __future__ import annotations

import jax

import pallas_kernels
from e2former_jax.config import AttentionImpl

# Strength of the attention sink in the softmax denominator (authors' value, spec 6.4; see
# docs/decisions.md D1 for why it is relative to logit 0).
SOFTMAX_SINK = 1e-3


def _call(impl: AttentionImpl, kernel, reference, *args, **kwargs) -> jax.Array:
  """One kernel op under the selected implementation (XLA = the op's jnp reference)."""
  if impl is AttentionImpl.XLA:
    return reference(*args, **kwargs)
  return kernel(*args, **kwargs, interpret=impl is AttentionImpl.PALLAS_INTERPRET)


def _head_last(values: jax.Array, num_heads: int) -> jax.Array:
  """[M, R, C] -> the kernels' [M, R * C/H, H]: head h = c % H becomes the fast index."""
  m, r, c = values.shape
  assert c % num_heads == 0, (c, num_heads)
  return values.reshape(m, r * (c // num_heads), num_heads)


def attention_weights(dots: jax.Array, gate: jax.Array, post_weight: jax.Array, envelope: jax.Array,
                      nbr_mask: jax.Array, *, head_dim: int) -> jax.Array:
  """a_ikh = alpha_ikh * post_ikh from the raw products q_i . k_j (for the per-edge message path).

  The same function the kernels evaluate (see :func:`node_attention`).

  Args:
    dots: [N, K, H]. gate, post_weight: [N, K, H]. envelope: [N, K]. nbr_mask: [N, K] bool.
    head_dim: d of the logit scale 1/sqrt(d).
  Returns:
    [N, K, H], zero on masked slots.
  """
  return pallas_kernels.attention_weights(dots, gate, post_weight, envelope, nbr_mask,
                                          scale=head_dim**-0.5, sink=SOFTMAX_SINK)


def node_attention(q: jax.Array, k: jax.Array, gate: jax.Array, post_weight: jax.Array,
                   envelope: jax.Array, values: jax.Array, nbr_idx: jax.Array, nbr_mask: jax.Array,
                   *, impl: AttentionImpl) -> jax.Array:
  """Agg_i[r, c] = sum_k alpha_ikh post_ikh values[idx_ik, r, c], h = c mod H.

  alpha_ikh = exp(l_ikh) phi_ik / (sum_k' exp(l_ik'h) phi_ik' + sink) over valid slots, with
  l_ikh = gate_ikh (q_ih . k_jh) / sqrt(d).

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
  out = _call(impl, pallas_kernels.node_attention, pallas_kernels.node_attention_reference,
              q.transpose(0, 2, 1), k.transpose(0, 2, 1), gate, post_weight, envelope,
              _head_last(values, h), nbr_idx, nbr_mask, scale=d**-0.5, sink=SOFTMAX_SINK)
  return out.reshape(n, r, c)


def node_attention_weights(q: jax.Array, k: jax.Array, gate: jax.Array, post_weight: jax.Array,
                           envelope: jax.Array, nbr_idx: jax.Array, nbr_mask: jax.Array, *,
                           impl: AttentionImpl) -> jax.Array:
  """a_ikh = alpha_ikh post_ikh, the weights :func:`node_attention` applies, as an [N, K, H] array.

  The q.k products come from the ``edge_dot`` primitive, so no per-edge vector is formed and every
  derivative stays in the kernels (linear memory).

  Args:
    q: [N, H, D]. k: [M, H, D]. gate, post_weight: [N, K, H]. envelope: [N, K].
    nbr_idx: [N, K] int32 in [0, M]. nbr_mask: [N, K] bool.
    impl: implementation.
  Returns:
    [N, K, H], zero on masked slots.
  """
  dots = _call(impl, pallas_kernels.edge_dot, pallas_kernels.edge_dot_reference,
               q.transpose(0, 2, 1), k.transpose(0, 2, 1), nbr_idx, nbr_mask)  # [N, K, H]
  return attention_weights(dots, gate, post_weight, envelope, nbr_mask, head_dim=q.shape[2])


def neighbor_sum(weights: jax.Array, values: jax.Array, nbr_idx: jax.Array, nbr_mask: jax.Array, *,
                 impl: AttentionImpl) -> jax.Array:
  """out_i[r, c] = sum_k weights_ikh values[idx_ik, r, c] over valid slots, h = c mod H.

  Args:
    weights: [N, K, H] per-edge weights. values: [M, R, C] source rows, channel c in head c % H.
    nbr_idx: [N, K] int32 in [0, M]. nbr_mask: [N, K] bool.
    impl: implementation (the ``gather_sum`` primitive or its reference).
  Returns:
    [N, R, C]
  """
  n, _, h = weights.shape
  _, r, c = values.shape
  out = _call(impl, pallas_kernels.gather_sum, pallas_kernels.gather_sum_reference,
              weights, _head_last(values, h), nbr_idx, nbr_mask)
  return out.reshape(n, r, c)
