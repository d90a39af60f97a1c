"""The attention softmax over neighbour slots as the fused kernels compute it (docs/model.md §8.4).

For target n, slot k with source j = idx[n, k] and head h:

  logits[n,k,h] = gate[n,k,h] * scale * sum_d q[n,d,h] k[j,d,h]
  e[n,k,h]      = exp(logits[n,k,h] - m[n,h]) * envelope[n,k]            (0 on invalid slots)
  a[n,k,h]      = e[n,k,h] / (sum_k e[n,k,h] + sink * exp(L[n,h] - m[n,h])) * post_weight[n,k,h]

with the sink logit L = 0 unless given and m = max(L, max over valid slots of the logits). The
weights are invariant to m, so m is a constant for differentiation (stop_gradient) and an online
softmax may start its running maximum at L: a target with no valid slot then gives exactly 0.

Here are its pieces: in-kernel, a slot's key row and logit (:func:`slot_logits`, :func:`load_slot`)
and the denominator (:func:`softmax_denominator`); outside, the backward from the weights'
cotangent to those of q, k, gate, post_weight, envelope (:func:`softmax_backward`), composed of the
fused softmax VJP and the gather primitives, so that it is differentiable again with the same
linear memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels import _tiles
from pallas_kernels._neighbors import Neighbors
from pallas_kernels.attention_weights import attention_weights_vjp
from pallas_kernels.neighbor_ops import (
    edge_dot_prepared,
    gather_sum_prepared,
    make_static,
    scatter_sum_prepared,
)


def slot_logits(slots_ref, k_ref, gate_ref, n, i, q, *, scale: float, block_k: int, d_pad: int,
                heads, head_mask):
  """Slot block i of target n: its key rows and logits gate * scale * q.k (a kernel's forward and
  backward both recompute them).

  Returns:
    (k, k_mask, sources, valid, keys, dots, gate, logits): as ``_tiles.neighbor_block``; the key
    rows [BK, DP, BH]; q.k, the gates and the logits [BK, BH] (logits unmasked).
  """
  k, k_mask, sources, valid = _tiles.neighbor_block(slots_ref, n, i, block_k)
  keys = _tiles.load_rows(k_ref, sources, valid, heads, head_mask, d_pad)  # [BK, DP, BH]
  dots = jnp.sum(keys * q[None], axis=1)  # [BK, BH]
  gate = _tiles.load_slots(gate_ref, n, k, valid, heads, head_mask)  # [BK, BH]
  return k, k_mask, sources, valid, keys, dots, gate, gate * scale * dots


def load_slot(slots_ref, k_ref, gate_ref, pw_ref, env_ref, n, i, q, *, scale: float,
              d_pad: int, heads, head_mask):
  """Single slot i of target n for the online softmax: its key row, logit and per-slot scalars. A
  slot past K (from a last partial step of block_k slots) is invalid.

  Returns:
    (k, sources, valid, logits, envelope, post_weight): the slot number, source row and validity
    [1]; the logits [BH] (``_tiles.NEG_INF`` where invalid); the envelope [1]; the post weights
    [BH].
  """
  num_slots = gate_ref.shape[1]
  k, _, sources, valid, _, _, _, logits = slot_logits(
      slots_ref, k_ref, gate_ref, n, jnp.minimum(i, num_slots - 1), q, scale=scale, block_k=1,
      d_pad=d_pad, heads=heads, head_mask=head_mask)
  valid = valid & (i < num_slots)
  logits = jnp.where(valid[:, None], logits, _tiles.NEG_INF)[0]
  post_weight = _tiles.load_slots(pw_ref, n, k, valid, heads, head_mask)[0]
  return k, sources, valid, logits, _tiles.load_vector(env_ref, n, k, valid), post_weight


def softmax_denominator(l: jax.Array, m: jax.Array, sink: float,
                        sink_logit: jax.Array | None = None) -> jax.Array:
  """sum of exp(logits - m) * envelope plus the sink (at logit 0, or at ``sink_logit``), [BH]; 1
  where it is 0 (no valid slot and no sink: the accumulator is 0 as well)."""
  denom = l + sink * (jnp.exp(-m) if sink_logit is None else jnp.exp(sink_logit - m))
  return jnp.where(denom > 0, denom, 1.0)


def softmax_backward(q, k, gate, post_weight, envelope, nbrs: Neighbors, d_weights, *,
                     scale: float, sink: float, interpret: bool, sink_logit=None):
  """From the cotangent of the attention weights [N, K, H] to those of their inputs: recomputes
  the q.k products, runs the fused softmax VJP and returns the weights [N, K, H] (float32) and
  (d_q, d_k, d_gate, d_post_weight, d_envelope), plus d_sink_logit [N, H] when a sink logit is
  given, each in its primal's dtype.
  """
  qk_f32 = make_static(jnp.float32, None, interpret, row_dim=q.shape[1], num_slots=gate.shape[1],
                       num_heads=gate.shape[2], row_dtype=k.dtype)
  dots = edge_dot_prepared(qk_f32, q, k, nbrs)  # [N, K, H]
  weights, d_dots, d_gate, d_post_weight, d_envelope, *d_sink_logit = attention_weights_vjp(
      dots, gate, post_weight, envelope, nbrs.slots >= 0, d_weights, scale=scale, sink=sink,
      sink_logit=sink_logit, interpret=interpret)  # [N, K, H] but d_envelope [N, K]
  d_q = gather_sum_prepared(qk_f32.with_dtype(q.dtype), d_dots, k, nbrs)  # [N, D, H]
  d_k = scatter_sum_prepared(qk_f32.with_dtype(k.dtype), d_dots, q, nbrs)  # [M, D, H]
  return weights, (d_q, d_k, d_gate.astype(gate.dtype), d_post_weight.astype(post_weight.dtype),
                   d_envelope.astype(envelope.dtype), *d_sink_logit)
