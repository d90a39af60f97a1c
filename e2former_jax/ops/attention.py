"""Dispatcher of the fused node-centric attention (docs/model.md §8.3–8.5, the kernels' §11).

The model calls :func:`message_attention` with model-layout arrays; this module converts them to
the kernels' head-last layout and selects the implementation. Nothing else in ``e2former_jax``
imports ``pallas_kernels`` but the dispatchers of ``e2former_jax.ops``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Bool, Float, Int

import pallas_kernels
from e2former_jax import so3
from e2former_jax.config import AttentionImpl

# Strength of the attention sink in the softmax denominator (authors' value, docs/model.md §8.4; see
# docs/decisions.md D1 for the logit it sits at).
SOFTMAX_SINK = 1e-3


def resolve_impl(impl: AttentionImpl) -> AttentionImpl:
  """The implementation that runs: AUTO becomes PALLAS when tracing for a GPU, else XLA.

  The only place that chooses between the kernels and the reference by platform, so training,
  evaluation, MD and predictors all get the kernels on a GPU without being told.
  """
  if impl is AttentionImpl.AUTO:
    return AttentionImpl.PALLAS if jax.default_backend() == "gpu" else AttentionImpl.XLA
  return impl


def _call(impl: AttentionImpl, kernel, reference, *args, **kwargs) -> jax.Array:
  """One kernel op under the selected implementation (XLA = the op's jnp reference)."""
  impl = resolve_impl(impl)
  if impl is AttentionImpl.XLA:
    return reference(*args, **kwargs)
  return kernel(*args, **kwargs, interpret=impl is AttentionImpl.PALLAS_INTERPRET)


def _head_last(values: jax.Array, num_heads: int) -> jax.Array:
  """[M, R, C] -> the kernels' [M, R * C/H, H]: head h = c % H becomes the fast index."""
  m, r, c = values.shape
  assert c % num_heads == 0, (c, num_heads)
  return values.reshape(m, r * (c // num_heads), num_heads)


def attention_weights(dots: Float[Array, "N K H"], gate: Float[Array, "N K H"],
                      post_weight: Float[Array, "N K H"], envelope: Float[Array, "N K"],
                      nbr_mask: Bool[ArrayLike, "N K"], *, head_dim: int,
                      sink_logit: Float[Array, "N H"] | None = None) -> Float[Array, "N K H"]:
  """a_ikh = alpha_ikh * post_ikh from the raw products q_i . k_j (for the per-edge message path).

  The same function the kernels evaluate (see :func:`message_attention`).

  Args:
    dots: q_i . k_j of every slot and head. gate, post_weight, envelope, nbr_mask: as in
      :func:`message_attention`.
    head_dim: d of the logit scale 1/sqrt(d).
    sink_logit: logit of the sink (None: 0).
  Returns:
    The weights, zero on masked slots.
  """
  return pallas_kernels.attention_weights(dots, gate, post_weight, envelope, nbr_mask,
                                          scale=head_dim**-0.5, sink=SOFTMAX_SINK,
                                          sink_logit=sink_logit)


def max_slot_logit(q: Float[Array, "N H d"], k: Float[Array, "M H d"], gate: Float[Array, "N K H"],
                   nbr_idx: Int[ArrayLike, "N K"], holds_atom: Bool[ArrayLike, "N K"], *,
                   impl: AttentionImpl) -> Float[Array, "N H"]:
  """M_ih = max over the slots k that hold an atom of l_ikh = gate_ikh (q_ih . k_jh) / sqrt(d).

  The sink logit of the authors' softmax (config.SoftmaxSink.MAX_LOGIT). Differentiable: the
  gradient reaches the arg-max slot (shared equally between exact ties).

  Args:
    q, k, gate: as in :func:`message_attention`. nbr_idx: source of each slot (M = no atom).
    holds_atom: the slots that take part (masked ones included).
    impl: implementation of the q.k products (the ``edge_dot`` kernel or its jnp reference).
  Returns:
    The logit per target and head; 0 on a row without any such slot (its weights are 0 whatever
    the sink).
  """
  d = q.shape[-1]
  dots = _call(impl, pallas_kernels.edge_dot, pallas_kernels.edge_dot_reference,
               q.transpose(0, 2, 1), k.transpose(0, 2, 1), nbr_idx, holds_atom)  # [N, K, H]
  logits = jnp.where(holds_atom[..., None], gate * d**-0.5 * dots, -jnp.inf)
  top = jnp.max(logits, axis=1)  # [N, H]
  return jnp.where(jnp.isfinite(top), top, 0.0)


def message_attention(q: Float[Array, "N H d"], k: Float[Array, "M H d"],
                      gate: Float[Array, "N K H"], post_weight: Float[Array, "N K H"],
                      envelope: Float[Array, "N K"], vectors: Float[Array, "N K 3"],
                      v: Float[Array, "M S C"], nbr_idx: Int[ArrayLike, "N K"],
                      nbr_mask: Bool[ArrayLike, "N K"], *, impl: AttentionImpl,
                      sink_logit: Float[Array, "N H"] | None = None) -> Float[Array, "N R C"]:
  """m_i[r, c] = sum_k a_ikh T(v_j, r_ik)[r, c], h = c mod H: the attention message.

  a_ikh = alpha_ikh post_ikh with
  alpha_ikh = exp(l_ikh) phi_ik / (sum_k' exp(l_ik'h) phi_ik' + sink exp(sink_logit_ih))
  over valid slots and l_ikh = gate_ikh (q_ih . k_jh) / sqrt(d); T = so3.tensor_product_vector.

  Args:
    q: queries. k: keys of the source nodes.
    gate: per-edge logit gates. post_weight: post-softmax weights.
    envelope: phi(d). vectors: edge vectors r_ik.
    v: source features, channel c in head c % H.
    nbr_idx: int32 in [0, M] (M = empty). nbr_mask: real edges.
    impl: implementation.
    sink_logit: logit of the sink, differentiable (None: 0, docs/decisions.md D1).
  Returns:
    The message in the l3-sequential layout of T (R = 20 for lmax = 2).
  """
  n, h, d = q.shape
  m, s, c = v.shape
  assert k.shape == (m, h, d), (k.shape, q.shape)
  assert gate.shape == post_weight.shape == (n, nbr_idx.shape[1], h)
  coupling = so3.first_order_coupling(so3.lmax_from_rows(s))  # [R, S, 3]
  out = _call(impl, pallas_kernels.message_attention, pallas_kernels.message_attention_reference,
              q.transpose(0, 2, 1), k.transpose(0, 2, 1), gate, post_weight, envelope, vectors,
              _head_last(v, h), nbr_idx, nbr_mask, coupling=coupling, scale=d**-0.5,
              sink=SOFTMAX_SINK, sink_logit=sink_logit)
  return out.reshape(n, coupling.shape[0], c)
