"""Node-centric fused attention over a neighbour list (E2Former-V2 spec sections 6.3-6.5, 8).

For target atoms n with neighbour slots k pointing at source nodes idx[n, k], per head h:

  logits[n,k,h] = gate[n,k,h] * scale * sum_d q[n,d,h] k[idx[n,k],d,h]
  e[n,k,h]      = exp(logits[n,k,h]) * envelope[n,k]          (0 on invalid slots)
  alpha[n,k,h]  = e[n,k,h] / (sum_k e[n,k,h] + sink)
  out[n,x,h]    = sum_k alpha[n,k,h] post_weight[n,k,h] values[idx[n,k],x,h]

``sink`` is an attention sink of fixed strength relative to logit 0. For stability every
implementation here subtracts m*[n,h] = max(0, max over valid slots of logits): alpha is exactly
invariant to the shift (the sink term becomes sink * exp(-m*)), so m* can be treated as a constant
(stop_gradient) without changing any derivative.

The forward kernel is one pass per (target, head block): FlashAttention-style online softmax over
blocks of slots, with the running maximum initialised at 0, so that a target with no valid slot
gives exactly 0. It gathers key rows [D, H] and value rows [X, H] straight from the node arrays and
never materialises per-edge tensors.

The backward recomputes the [N, K, H] logits with ``edge_dot``, runs the softmax backward in one
fused kernel (``attention_weights_vjp``), and forms every input cotangent with the three gather
primitives of ``neighbor_ops`` (whose own derivatives are those primitives again), so the backward
is itself differentiable (force training) and memory stays linear: the largest per-edge arrays are
[N, K, H].
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _tiles
from pallas_kernels.attention_weights import attention_weights, attention_weights_vjp
from pallas_kernels._neighbors import (
    Neighbors,
    check_attention_inputs,
    decode_neighbors,
    gather_sources,
    prepare_neighbors,
    upcast,
    valid_slots,
)
from pallas_kernels.neighbor_ops import (
    BlockSizes,
    edge_dot_prepared,
    gather_sum_prepared,
    make_static,
    scatter_sum_prepared,
)

BackwardImpl = Literal["pallas", "xla"]
# Default forward tiling for float32 inputs: 32 heads, two single slots per step, one warp. On an
# H100 at N = 100k (paper sizes, benchmarks/notes_attention.md, run 20) 15.2 ms against 15.4 for one
# slot per step, 16.1-16.5 for 16 heads or 2 warps and 17.5-17.9 for the earlier 128 heads x 1 slot
# x 4 warps.
_FORWARD_BLOCKS_F32 = BlockSizes(block_h=32, block_k=2, num_warps=1)
# Heads per forward program for narrower inputs (bf16): BlockSizes.get_default's [1, 64, 128] value
# tiles at the paper sizes, 13.5 ms at N = 100k against 17.4 for the float32 tiling (run 20) and
# 17.7 for 32 heads x 4 slots at 4 warps (runs 5-6).
_FORWARD_MAX_BLOCK_H = 128
_BACKWARD_IMPLS = ("pallas", "xla")
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _AttentionStatic:
  scale: float
  sink: float
  block_sizes: BlockSizes | None  # forward kernel tiling; None = default for the value rows
  interpret: bool
  backward_impl: BackwardImpl


# ----------------------------------------------------------------------------------- forward


def slot_logits(slots_ref, k_ref, gate_ref, n, i, q, *, scale: float, block_k: int, d_pad: int,
                heads, head_mask):
  """Slot block i of target n: its key rows and logits gate * scale * q.k (shared by the fused
  kernels' forward and backward).

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
  """Single slot i of target n for the online softmax: its key row, logit and per-slot scalars (the
  node and message forwards' per-slot loads). A slot past K (from a last partial step of block_k
  slots) is invalid.

  Returns:
    (k, sources, valid, logits, envelope, post_weight): the slot number, source row and validity
    [1]; the logits [BH] (-inf where invalid); the envelope [1]; the post weights [BH].
  """
  num_slots = gate_ref.shape[1]
  k, _, sources, valid, _, _, _, logits = slot_logits(
      slots_ref, k_ref, gate_ref, n, jnp.minimum(i, num_slots - 1), q, scale=scale, block_k=1,
      d_pad=d_pad, heads=heads, head_mask=head_mask)
  valid = valid & (i < num_slots)
  logits = jnp.where(valid[:, None], logits, _tiles.NEG_INF)[0]
  post_weight = _tiles.load_slots(pw_ref, n, k, valid, heads, head_mask)[0]
  return k, sources, valid, logits, _tiles.load_vector(env_ref, n, k, valid), post_weight


def _online_softmax_update(m, l, slots):
  """One step of the online softmax: single slots sharing one update of the running maximum, so
  the caller rescales its accumulators once per step (not once per slot).

  Args:
    m, l: running maximum and sum of exp(logits - m) * envelope, [BH] each.
    slots: (logits [BH], envelope [1], post_weight [BH]) per slot of the step.

  Returns:
    (m_new, l_new, rescale, weights): rescale = exp(m - m_new) [BH] for the accumulators; per
    slot, weights = exp(logits - m_new) * envelope * post_weight [BH] (0 on invalid slots).
  """
  m_new = m
  for logits, _, _ in slots:
    m_new = jnp.maximum(m_new, logits)
  rescale = jnp.exp(m - m_new)
  l = l * rescale
  weights = []
  for logits, envelope, post_weight in slots:
    p = jnp.exp(logits - m_new) * envelope
    l = l + p
    weights.append(p * post_weight)
  return m_new, l, rescale, weights


def softmax_denominator(l: jax.Array, m: jax.Array, sink: float,
                        sink_logit: jax.Array | None = None) -> jax.Array:
  """sum of exp(logits - m) * envelope plus the sink (at logit 0, or at ``sink_logit``), [BH]; 1
  where it is 0 (no valid slot and no sink: the accumulator is 0 as well)."""
  denom = l + sink * (jnp.exp(-m) if sink_logit is None else jnp.exp(sink_logit - m))
  return jnp.where(denom > 0, denom, 1.0)


def _forward_kernel(slots_ref, q_ref, k_ref, gate_ref, pw_ref, env_ref, v_ref, out_ref, *,
                    scale: float, sink: float, block_sizes: BlockSizes, d_pad: int, x_pad: int):
  """One program: block_n targets in turn, a block of heads; online softmax over the slots,
  block_k single slots per loop step sharing one rescale of the accumulator. (Each slot is its own
  [XP, BH] load, not one [block_k, XP, BH] tile summed over its slot axis: that reduction made
  message_attention's forward several times slower, run 9.)"""
  num_targets, num_slots, num_heads = gate_ref.shape
  block_h, block_k = block_sizes.block_h, block_sizes.block_k
  heads, head_mask = _tiles.head_block(block_h, num_heads)

  def target(n):
    q = _tiles.load_row(q_ref, n, heads, head_mask, d_pad)  # [DP, BH]

    def step(i, carry):
      m, l, acc = carry  # [BH], [BH], [XP, BH]
      slots = [load_slot(slots_ref, k_ref, gate_ref, pw_ref, env_ref, n, i * block_k + j, q,
                         scale=scale, d_pad=d_pad, heads=heads, head_mask=head_mask)
               for j in range(block_k)]
      vals = [_tiles.load_rows(v_ref, sources, valid, heads, head_mask, x_pad)[0]
              for _, sources, valid, *_ in slots]  # block_k x [XP, BH]
      m, l, rescale, weights = _online_softmax_update(m, l, [slot[3:] for slot in slots])
      acc = acc * rescale[None]
      for w, v in zip(weights, vals):
        acc = acc + w[None] * v
      return m, l, acc

    init = (jnp.zeros((block_h,), jnp.float32), jnp.zeros((block_h,), jnp.float32),
            jnp.zeros((x_pad, block_h), jnp.float32))
    m, l, acc = _tiles.slot_loop(pl.cdiv(num_slots, block_k), step, init, block_sizes.unroll)
    _tiles.store_row(out_ref, n, heads, head_mask, acc / softmax_denominator(l, m, sink)[None])

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _forward_block_sizes(static: _AttentionStatic, values: jax.Array, num_slots: int) -> BlockSizes:
  if static.block_sizes is not None:
    return static.block_sizes
  if values.dtype == jnp.float32:
    return _FORWARD_BLOCKS_F32.at_most_heads(values.shape[2])
  return BlockSizes.get_default(values.shape[1], num_slots, values.shape[2],
                                max_block_h=_FORWARD_MAX_BLOCK_H)


def _forward_call(static: _AttentionStatic, q, k, gate, post_weight, envelope, values,
                  nbrs: Neighbors) -> jax.Array:
  num_targets, head_dim, num_heads = q.shape
  row_dim = values.shape[1]
  block_sizes = _forward_block_sizes(static, values, gate.shape[1])
  kernel = functools.partial(
      _forward_kernel, scale=static.scale, sink=static.sink, block_sizes=block_sizes,
      d_pad=pl.next_power_of_2(head_dim), x_pad=pl.next_power_of_2(row_dim))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_targets, row_dim, num_heads), values.dtype),
      grid=block_sizes.grid(num_targets, num_heads),
      compiler_params=block_sizes.compiler_params(),
      interpret=static.interpret,
      name="node_attention_fwd",
  )(nbrs.slots, q, k, gate, post_weight, envelope, values)


# ---------------------------------------------------------------------------------- backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _node_attention(static: _AttentionStatic, q, k, gate, post_weight, envelope, values,
                    nbrs: Neighbors):
  return _forward_call(static, q, k, gate, post_weight, envelope, values, nbrs)


def _node_attention_fwd(static, q, k, gate, post_weight, envelope, values, nbrs):
  # Through the custom_vjp so that outer derivatives (force training) of this output stay in kernels.
  out = _node_attention(static, q, k, gate, post_weight, envelope, values, nbrs)
  return out, (q, k, gate, post_weight, envelope, values, nbrs)


def _node_attention_bwd(static: _AttentionStatic, residuals, g):
  q, k, gate, post_weight, envelope, values, nbrs = residuals
  if static.backward_impl == "xla":
    nbr_idx, nbr_mask = decode_neighbors(nbrs)
    reference = functools.partial(node_attention_reference, nbr_idx=nbr_idx, nbr_mask=nbr_mask,
                                  scale=static.scale, sink=static.sink)
    _, vjp = jax.vjp(reference, q, k, gate, post_weight, envelope, values)
    return (*vjp(g), None)

  rows_f32 = make_static(jnp.float32, None, static.interpret, row_dim=values.shape[1],
                         num_slots=gate.shape[1], num_heads=gate.shape[2], row_dtype=values.dtype)
  d_weights = edge_dot_prepared(rows_f32, g, values, nbrs)  # [N, K, H]
  weights, softmax_cotangents = softmax_backward(
      q, k, gate, post_weight, envelope, nbrs, d_weights, scale=static.scale, sink=static.sink,
      interpret=static.interpret)
  d_values = scatter_sum_prepared(rows_f32.with_dtype(values.dtype), weights, g, nbrs)
  return (*softmax_cotangents, d_values, None)


def softmax_backward(q, k, gate, post_weight, envelope, nbrs: Neighbors, d_weights, *,
                     scale: float, sink: float, interpret: bool, sink_logit=None):
  """From the cotangent of the attention weights [N, K, H] to those of their inputs (shared by the
  fused kernels' backwards): recomputes the q.k products, runs the fused softmax VJP and returns
  the weights [N, K, H] (float32) and (d_q, d_k, d_gate, d_post_weight, d_envelope), plus
  d_sink_logit [N, H] when a sink logit is given, each in its primal's dtype.
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


_node_attention.defvjp(_node_attention_fwd, _node_attention_bwd)


# -------------------------------------------------------------------------------- public API


@functools.partial(
    jax.jit, static_argnames=("scale", "sink", "block_sizes", "interpret", "backward_impl"))
def node_attention(q: jax.Array, k: jax.Array, gate: jax.Array, post_weight: jax.Array,
                   envelope: jax.Array, values: jax.Array, nbr_idx: jax.Array,
                   nbr_mask: jax.Array, *, scale: float, sink: float = 1e-3,
                   block_sizes: BlockSizes | None = None, interpret: bool = False,
                   backward_impl: BackwardImpl = "pallas") -> jax.Array:
  """Fused node-centric attention (see the module docstring for the formula).

  Args:
    q: [N, D, H] queries of the target atoms.
    k: [M, D, H] keys of the source nodes.
    gate: [N, K, H] per-edge multiplier of the logits.
    post_weight: [N, K, H] per-edge multiplier applied after the softmax.
    envelope: [N, K] smooth cutoff weight of each edge (multiplies exp(logits)).
    values: [M, X, H] value rows of the source nodes.
    nbr_idx: [N, K] int source of each slot (M, the sentinel, on empty slots).
    nbr_mask: [N, K] bool, True on real edges.
    scale: logit scale (1/sqrt(D) in the paper).
    sink: strength of the attention sink (relative to logit 0); must be >= 0.
    block_sizes: tiling of the forward kernel; None picks ``BlockSizes.get_default(X, K, H)``.
      The backward's gather kernels use their defaults.
    interpret: run all kernels in the Pallas interpreter (CPU testing).
    backward_impl: "pallas" (gather kernels, differentiable to any order in reverse mode) or
      "xla" (jax.vjp of ``node_attention_reference``).

  Returns:
    [N, X, H] in the dtype of ``values`` (float32 accumulation). Targets without a valid slot get 0.

  Raises:
    ValueError: on inconsistent shapes or dtypes, negative sink or unknown backward_impl.
  """
  check_attention_inputs(q, k, values, nbr_idx, nbr_mask, sink, gate=gate, post_weight=post_weight,
                         envelope=envelope)
  if backward_impl not in _BACKWARD_IMPLS:
    raise ValueError(f"backward_impl must be one of {_BACKWARD_IMPLS}; got {backward_impl!r}")
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, k.shape[0])
  static = _AttentionStatic(float(scale), float(sink), block_sizes, bool(interpret), backward_impl)
  return _node_attention(static, q, k, gate, post_weight, envelope, values, nbrs)


def node_attention_reference(q, k, gate, post_weight, envelope, values, nbr_idx, nbr_mask, *,
                             scale, sink=1e-3, block_sizes=None, interpret=False,
                             backward_impl="pallas"):
  """Pure-jnp ``node_attention`` in (at least) float32; materialises the gathered [N, K, X, H] values."""
  del block_sizes, interpret, backward_impl
  valid = valid_slots(nbr_idx, nbr_mask, k.shape[0])
  dots = jnp.einsum("ndh,nkdh->nkh", upcast(q), gather_sources(k, nbr_idx, valid),
                    precision=_HIGHEST)  # [N, K, H]
  weights = attention_weights(dots, gate, post_weight, envelope, valid, scale=scale, sink=sink)
  out = jnp.einsum("nkh,nkxh->nxh", weights, gather_sources(values, nbr_idx, valid),
                   precision=_HIGHEST)  # [N, X, H]
  return out.astype(values.dtype)
