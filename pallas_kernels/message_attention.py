"""Fused attention message with a first-order tensor product (docs/model.md §7.3, §8.5, §11.3).

For target atoms n with neighbour slots k pointing at sources j = idx[n, k], edge vectors r[n, k],
attention weights a[n, k, h] (the softmax with a sink of ``_softmax``, docs/model.md §8.4) and
source features v[j, s, c] with channel c in head h = c mod H:

  out[n, row, c] = sum_k a[n, k, h] T(v_j, r[n, k])[row, c]
  T(v, r)[row, c] = sum_{s,b} G[row, s, b] v[s, c] r[b]

for a static coupling G [R, S, 3] (the Clebsch-Gordan table of l1 (x) 1 -> l3). T is linear in r,
so the kernel accumulates per target the three moments ``m_b = sum_k a r_b v_j`` ([S, C] each;
only per-edge *scalars* a r_b multiply node rows) and applies G once per target:
``out = sum_{s,b} G[:, s, b] m_b[s]``. Per edge it gathers the S rows of v_j (9 for lmax = 2), not
the R + S = 29 rows of ``[T(v_j, x_j); v_j]`` that the absolute-position identity needs for the
same message (docs/decisions.md D12), and it uses the true edge vector (periodic images included),
so no difference of two large node terms is formed.

An optional sink logit L [N, H] (differentiable) moves the softmax's sink from logit 0 to L: the
denominator's sink term is sink * exp(L), and the online softmax starts its running maximum at L.
Its cotangent is -s <g, out> per target and head, s = sink exp(L - m) / denominator the sink's
share, which the fused backward has at hand (the softmax row term is <g, out>).

The backward is two fused kernels: one per target for every target-side cotangent (one more pass
over the slots that gathers what the forward gathered, using the forward's softmax statistics and
output) and one per source for the key and value cotangents (one walk of the reverse neighbour
list). Its own derivative (force training differentiates the backward) is that of the same backward
composed from the primitives of ``neighbor_ops`` and the fused softmax VJP, so every derivative
order keeps the linear-memory property (docs/decisions.md D13).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from pallas_kernels import _tiles
from pallas_kernels._neighbors import (
    Neighbors,
    check_attention_inputs,
    gather_sources,
    prepare_neighbors,
    upcast,
    valid_slots,
)
from pallas_kernels._softmax import load_slot, slot_logits, softmax_backward, softmax_denominator
from pallas_kernels.attention_weights import attention_weights
from pallas_kernels.block_sizes import BlockSizes
from pallas_kernels.neighbor_ops import edge_dot_prepared, make_static, scatter_sum_prepared

# Components of an edge vector (x, y, z).
_NUM_AXES = 3
# Default forward tiling: 64 heads, four single slots per step sharing one rescale of the
# accumulators, one warp. On an H100 at N = 100k (paper sizes, docs/performance.md §2.2,
# at 5d9222c) it took 6.10-6.17 ms in float32 against 6.52-6.57 for 2 slots per step, 7.7 for one,
# 9.3 for 8, 9.2 for 32 heads x 2 slots and 8.4 for 64 x 2 at 2 warps. (The earlier [slots, ...]
# tile design took 31-47 ms for several slots per step: a reduction over slots per accumulator row.)
_FORWARD_BLOCKS = BlockSizes(block_h=64, block_k=4, num_warps=1)
# Default forward tiling for narrower inputs (bf16): 128 heads x 2 slots x 2 warps took 7.5 ms at
# N = 100k on an H100 against 8.0 at 4 slots, 9.1 for 64 x 2 x 1 warp and 9.4 for the float32
# default (docs/performance.md §2.5, at 128122a).
_FORWARD_BLOCKS_NARROW = BlockSizes(block_h=128, block_k=2, num_warps=2)
# Default tiling of the fused backward's target side: 64 heads x 1 slot x 1 warp took 42.0 ms
# forward + backward at N = 100k on an H100 against 44.7 at 32 heads and 52-55 at 2 or 4 warps
# (docs/performance.md §2.3, at 7eb798e); 29.6 against 32.4 at 32 heads at 5d9222c.
_BACKWARD_BLOCKS = BlockSizes(block_h=64, block_k=1, num_warps=1)
# Default tiling of the backward's source side (d k and d v per source, over its incoming edges):
# 32 heads x 1 slot x 1 warp, 29.6 ms forward + backward at N = 100k (at 5d9222c) against 29.6 at 64
# heads, 30.1 at 64 heads x 2 warps, 31.6 at 16 heads and 32.3 for 32 heads x 2 slots.
_SCATTER_BLOCKS = BlockSizes(block_h=32, block_k=1, num_warps=1)
# The softmax statistics the forward writes for the backward: shift m and denominator per head.
_NUM_STATS = 2
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _MessageStatic:
  """Hashable configuration: the coupling as its non-zero terms, softmax constants, tiling."""

  shape: tuple[int, int, int]  # (R, S, 3) of the coupling
  terms: tuple[tuple[int, int, int, float], ...]  # (row, s, b, G[row, s, b]) for G != 0
  scale: float
  sink: float
  block_sizes: BlockSizes | None  # forward kernel; None = the default for the values' dtype
  # (target side, source side) of the fused backward; None = (_BACKWARD_BLOCKS, _SCATTER_BLOCKS)
  backward_block_sizes: tuple[BlockSizes, BlockSizes] | None
  interpret: bool

  def dense(self, dtype) -> jax.Array:
    coupling = np.zeros(self.shape)
    for row, s, b, coef in self.terms:
      coupling[row, s, b] = coef
    return jnp.asarray(coupling, dtype)


def _make_static(coupling, scale, sink, block_sizes, backward_block_sizes,
                 interpret) -> _MessageStatic:
  coupling = np.asarray(coupling, np.float64)
  if coupling.ndim != 3 or coupling.shape[2] != _NUM_AXES:
    raise ValueError(f"coupling must be [R, S, 3]; got shape {coupling.shape}")
  if not np.all(np.isfinite(coupling)):
    raise ValueError("coupling must be finite")
  terms = tuple((int(r), int(s), int(b), float(coupling[r, s, b]))
                for r, s, b in zip(*np.nonzero(coupling)))
  return _MessageStatic(tuple(coupling.shape), terms, float(scale), float(sink), block_sizes,
                        backward_block_sizes, bool(interpret))


# ----------------------------------------------------------------------------------- forward


def _forward_kernel(slots_ref, q_ref, k_ref, gate_ref, pw_ref, env_ref, vec_ref, v_ref, *refs,
                    static: _MessageStatic, block_sizes: BlockSizes, d_pad: int, group: int,
                    g_pad: int, with_sink_logit: bool):
  """One program: block_n targets in turn, a block of heads; online softmax over the slots, block_k
  single slots per loop step sharing one update of the running maximum (one rescale per step).

  The accumulator is one [GP, BH] tile per (axis b, feature row s): value rows are gathered row by
  row (each a contiguous [G, BH] segment of the source's [S*G, H] block), since a Triton tile
  cannot be sliced into rows afterwards, and the coupling is applied to the tiles at the end.
  With a ``stats_ref`` it also writes the softmax statistics (shift and denominator) for the
  backward: only then, since storing them cost ~11 % of the forward's time (run 16). With a sink
  logit ([N, 1, H], the first of ``refs``) the running maximum starts there instead of at 0.
  """
  sink_logit_ref, (out_ref, *stats_ref) = (refs[0], refs[1:]) if with_sink_logit else (None, refs)
  num_targets, num_slots, num_heads = gate_ref.shape
  num_out_rows, num_in_rows, _ = static.shape
  block_h, block_k = block_sizes.block_h, block_sizes.block_k
  heads, head_mask = _tiles.head_block(block_h, num_heads)

  def target(n):
    q = _tiles.load_row(q_ref, n, heads, head_mask, d_pad)  # [DP, BH]

    def slot(i):  # slot i of target n: its softmax inputs, then its vectors and value rows
      k, sources, valid, logits, envelope, post_weight = load_slot(
          slots_ref, k_ref, gate_ref, pw_ref, env_ref, n, i, q, scale=static.scale, d_pad=d_pad,
          heads=heads, head_mask=head_mask)
      vectors = [_tiles.load_vector(vec_ref, n, k, valid, b) for b in range(_NUM_AXES)]  # 3 x [1]
      rows = [_tiles.load_rows(v_ref, sources, valid, heads, head_mask, g_pad, (s * group, group))
              for s in range(num_in_rows)]  # S x [1, GP, BH]
      return logits, post_weight, envelope, vectors, rows

    def step(i, carry):
      m, l, acc = carry  # [BH], [BH], (3*S) x [GP, BH] with index b*S + s
      slots = [slot(i * block_k + j) for j in range(block_k)]
      m_new = m
      for logits, *_ in slots:
        m_new = jnp.maximum(m_new, logits)  # [BH]
      rescale = jnp.exp(m - m_new)  # [BH]: one rescale of the accumulators per step
      acc = [a * rescale[None] for a in acc]
      l = l * rescale
      for logits, post_weight, envelope, vectors, rows in slots:
        p = jnp.exp(logits - m_new) * envelope  # [BH]
        weights = p * post_weight
        l = l + p
        # Not _tiles.add_products: its written-out FMA measured slower in this loop (run 19).
        for b in range(_NUM_AXES):
          coef = (weights * vectors[b])[None]  # [1, BH]
          for s in range(num_in_rows):
            acc[b * num_in_rows + s] = acc[b * num_in_rows + s] + coef * rows[s][0]
      return m_new, l, tuple(acc)

    zeros = jnp.zeros((g_pad, block_h), jnp.float32)
    sink_logit = None
    m0 = jnp.zeros((block_h,), jnp.float32)
    if with_sink_logit:
      sink_logit = m0 = _tiles.load_row(sink_logit_ref, n, heads, head_mask, 1)[0]  # [BH]
    init = (m0, jnp.zeros((block_h,), jnp.float32), (zeros,) * (_NUM_AXES * num_in_rows))
    m, l, acc = _tiles.slot_loop(pl.cdiv(num_slots, block_k), step, init, block_sizes.unroll)
    denominator = softmax_denominator(l, m, static.sink, sink_logit)  # [BH]
    inv = (1.0 / denominator)[None]  # [1, BH]
    for row in range(num_out_rows):
      out = zeros
      for r, s, b, coef in static.terms:
        if r == row:
          out = out + coef * acc[b * num_in_rows + s]
      _tiles.store_row(out_ref, n, heads, head_mask, out * inv, (row * group, group))
    for stats in stats_ref:
      for row, stat in enumerate((m, denominator)):
        _tiles.store_row(stats, n, heads, head_mask, stat[None], (row, 1))

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _sink_logit_rows(sink_logit) -> tuple[jax.Array, ...]:
  """The optional kernel input: () or ([N, 1, H],), a one-row array as the row loaders read it."""
  return () if sink_logit is None else (sink_logit[:, None, :],)


def _forward_call(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                  sink_logit, nbrs: Neighbors, with_stats: bool):
  """out [N, R*G, H] in the dtype of values, or with_stats: (out in float32, stats [N, 2, H]),
  stats[:, 0] the softmax shift m and stats[:, 1] its denominator (float32)."""
  num_targets, head_dim, num_heads = q.shape
  num_out_rows, num_in_rows, _ = static.shape
  group = values.shape[1] // num_in_rows
  default = _FORWARD_BLOCKS_NARROW if values.dtype.itemsize < 4 else _FORWARD_BLOCKS
  block_sizes = static.block_sizes or default.at_most_heads(num_heads)
  kernel = functools.partial(
      _forward_kernel, static=static, block_sizes=block_sizes, d_pad=pl.next_power_of_2(head_dim),
      group=group, g_pad=pl.next_power_of_2(group), with_sink_logit=sink_logit is not None)
  outputs = pl.pallas_call(
      kernel,
      out_shape=(
          jax.ShapeDtypeStruct((num_targets, num_out_rows * group, num_heads),
                               jnp.float32 if with_stats else values.dtype),
          *([jax.ShapeDtypeStruct((num_targets, _NUM_STATS, num_heads), jnp.float32)]
            if with_stats else [])),
      grid=block_sizes.grid(num_targets, num_heads),
      compiler_params=block_sizes.compiler_params(),
      interpret=static.interpret,
      name="message_attention_fwd",
  )(nbrs.slots, q, k, gate, post_weight, envelope, vectors, values, *_sink_logit_rows(sink_logit))
  return outputs if with_stats else outputs[0]


# ---------------------------------------------------------------------------------- backward


def _pull_back_coupling(static: _MessageStatic, g: jax.Array) -> list[jax.Array]:
  """u_b = G[:, :, b]^T g per target, b = x, y, z: [N, R*G, H] -> 3 x [N, S*G, H] (float32).

  Three products, not one with a b axis: each u_b is an operand of its own kernel call, and XLA
  would copy every slice of a stacked result out before the call (1.9 ms each at N = 100k).
  """
  num_out_rows, _, _ = static.shape
  n, _, h = g.shape
  g = upcast(g).reshape(n, num_out_rows, -1, h)  # [N, R, G, H]
  coupling = static.dense(g.dtype)  # [R, S, 3]
  return [jnp.einsum("rs,nrgh->nsgh", coupling[..., b], g, precision=_HIGHEST).reshape(n, -1, h)
          for b in range(_NUM_AXES)]


def _composed_backward(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                       sink_logit, g, nbrs: Neighbors):
  """The backward from the gather primitives: the derivative of the fused backward (second order).

  out = sum_k a sum_b r_b (G_b v_j): with u_b = G_b^T g and E_b[n,k,h] = <u_b[n], v_j>_h,
  d a = sum_b r_b E_b, d r_b = sum_h a E_b, d v_j = sum_b scatter(a r_b, u_b). Returns the
  cotangents of (q, k, gate, post_weight, envelope, vectors, values, sink_logit), the last None
  without a sink logit.
  """
  by_rows = functools.partial(make_static, jnp.float32, None, static.interpret,
                              row_dim=values.shape[1], num_slots=gate.shape[1],
                              num_heads=gate.shape[2])
  u = _pull_back_coupling(static, g)  # 3 x [N, S*G, H]
  r = upcast(vectors)  # [N, K, 3]
  rows_f32 = by_rows(row_dtype=values.dtype)
  e = [edge_dot_prepared(rows_f32, u_b, values, nbrs) for u_b in u]  # 3 x [N, K, H]
  d_weights = sum(r[..., b, None] * e[b] for b in range(_NUM_AXES))  # [N, K, H]
  weights, softmax_cotangents = softmax_backward(
      q, k, gate, post_weight, envelope, nbrs, d_weights, scale=static.scale, sink=static.sink,
      interpret=static.interpret, sink_logit=sink_logit)
  d_sink_logit = softmax_cotangents[5] if sink_logit is not None else None
  d_vectors = jnp.stack([jnp.sum(weights * e[b], axis=-1) for b in range(_NUM_AXES)], axis=-1)
  # One scatter per moment: concatenating the three along heads would copy u and the weights.
  scatter = by_rows(row_dtype=jnp.float32)  # u is float32
  d_values = sum(scatter_sum_prepared(scatter, weights * r[..., b, None], u[b], nbrs)
                 for b in range(_NUM_AXES))  # [M, S*G, H]
  return (*softmax_cotangents[:5], d_vectors.astype(vectors.dtype), d_values.astype(values.dtype),
          d_sink_logit)


def _backward_kernel(slots_ref, q_ref, k_ref, gate_ref, pw_ref, env_ref, vec_ref, v_ref, g_ref,
                     out_ref, stats_ref, *refs, static: _MessageStatic, block_sizes: BlockSizes,
                     d_pad: int, group: int, g_pad: int, with_sink_logit: bool):
  """One program: block_n targets in turn, a block of heads, one pass over the slots.

  First it pulls the cotangent back through the coupling, u_b = G_b^T g, and forms the softmax
  row term sum_k a d a = <g, out>. Per slot it gathers the key and the S value rows of the source
  (as the forward does), rebuilds the weights from the forward's statistics and forms every
  target-side cotangent in registers: E_b = <u_b, v_j>, d a = sum_b r_b E_b, the softmax backward
  and d q. It writes the per-edge cotangents, d dots and the weights (what the source side needs)
  and accumulates d q; head sums (d envelope, d vectors) go to column ``head block`` of their
  [N, K, blocks] outputs. With a sink logit (input [N, 1, H] after stats_ref) it also writes
  d sink_logit = -s <g, out> [N, 1, H] (last output), s = sink exp(L - m) / denominator.
  """
  if with_sink_logit:
    sink_logit_ref, *refs = refs
  d_q_ref, d_gate_ref, d_pw_ref, d_dots_ref, w_ref, d_env_ref, d_vec_ref, *d_sink_ref = refs
  num_targets, num_slots, num_heads = gate_ref.shape
  num_in_rows = static.shape[1]
  block_h, block_k = block_sizes.block_h, block_sizes.block_k
  heads, head_mask = _tiles.head_block(block_h, num_heads)
  head_block = jnp.full((1,), pl.program_id(1), jnp.int32)
  scale = static.scale

  def node_rows(ref, n, num_rows, pad, length):  # rows of target n: num_rows x [pad, BH]
    return [_tiles.load_row(ref, n, heads, head_mask, pad, (i * length, length))
            for i in range(num_rows)]

  def target(n):
    q = _tiles.load_row(q_ref, n, heads, head_mask, d_pad)  # [DP, BH]
    num_out_rows = g_ref.shape[1] // group
    g = node_rows(g_ref, n, num_out_rows, g_pad, group)  # R x [GP, BH]
    u = [[jnp.zeros((g_pad, block_h), jnp.float32)] * num_in_rows for _ in range(_NUM_AXES)]
    for row, s, b, coef in static.terms:
      u[b][s] = u[b][s] + coef * g[row]
    total = sum(jnp.sum(a * b, axis=0) for a, b in zip(
        g, node_rows(out_ref, n, num_out_rows, g_pad, group)))  # [BH]: sum_k a d a
    m, denominator = node_rows(stats_ref, n, _NUM_STATS, 1, 1)  # [1, BH] each
    # Masked heads load 0; keep their lanes finite (they are never stored).
    denominator = jnp.where(denominator > 0, denominator, 1.0)
    if with_sink_logit:
      sink_logit = _tiles.load_row(sink_logit_ref, n, heads, head_mask, 1)  # [1, BH]
      share = static.sink * jnp.exp(sink_logit - m) / denominator  # the sink's share
      _tiles.store_row(d_sink_ref[0], n, heads, head_mask, -share * total[None])

    def contract(u_b, rows):  # sum_s u_b[s] * rows[s]: [BK, GP, BH]
      out = u_b[0][None] * rows[0]
      for s in range(1, num_in_rows):
        out = _tiles.fma(u_b[s][None], rows[s], out, static.interpret)
      return out

    def step(i, d_q):
      k, k_mask, sources, valid, keys, dots, gate, logits = slot_logits(
          slots_ref, k_ref, gate_ref, n, i, q, scale=scale, block_k=block_k, d_pad=d_pad,
          heads=heads, head_mask=head_mask)  # keys [BK, DP, BH]; the rest [BK, BH]
      unit = jnp.where(valid[:, None], jnp.exp(logits - m), 0.0)  # [BK, BH]
      e = unit * _tiles.load_vector(env_ref, n, k, valid)[:, None]
      alpha = e / denominator
      post_weight = _tiles.load_slots(pw_ref, n, k, valid, heads, head_mask)
      weights = alpha * post_weight
      rows = [_tiles.load_rows(v_ref, sources, valid, heads, head_mask, g_pad, (s * group, group))
              for s in range(num_in_rows)]  # S x [BK, GP, BH]
      e_b = [jnp.sum(contract(u_b, rows), axis=1) for u_b in u]  # 3 x [BK, BH]
      r = [_tiles.load_vector(vec_ref, n, k, valid, b) for b in range(_NUM_AXES)]  # 3 x [BK]
      d_weights = sum(r_b[:, None] * e_b[b] for b, r_b in enumerate(r))  # [BK, BH]
      d_e = (d_weights * post_weight - total) / denominator
      d_logits = d_e * e
      d_dots = d_logits * scale * gate

      def store(ref, value):
        _tiles.store_slots(ref, n, k, k_mask, heads, head_mask, value)

      store(d_gate_ref, d_logits * scale * dots)
      store(d_pw_ref, d_weights * alpha)
      store(d_dots_ref, d_dots)
      store(w_ref, weights)
      for b in range(_NUM_AXES):
        _tiles.store_slots(d_vec_ref, n, k, k_mask, head_block * _NUM_AXES + b, None,
                           jnp.sum(weights * e_b[b], axis=1, keepdims=True))
      _tiles.store_slots(d_env_ref, n, k, k_mask, head_block, None,
                         jnp.sum(d_e * unit, axis=1, keepdims=True))
      return _tiles.add_products(d_q, d_dots[:, None, :], keys, static.interpret)

    d_q = _tiles.slot_loop(pl.cdiv(num_slots, block_k), step,
                           jnp.zeros((d_pad, block_h), jnp.float32), block_sizes.unroll)
    _tiles.store_row(d_q_ref, n, heads, head_mask, d_q)

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _scatter_kernel(offsets_ref, order_ref, w_ref, d_dots_ref, vec_ref, q_ref, g_ref, d_k_ref,
                    d_v_ref, *, static: _MessageStatic, block_sizes: BlockSizes, num_slots: int,
                    d_pad: int, group: int, g_pad: int):
  """One program: block_n sources in turn, a block of heads; walks each one's incoming edges (CSR)
  and accumulates d k = sum d_dots q_n and d v = sum_b a r_b G_b^T g_n (S tiles [GP, BH]).

  It gathers the R rows of the target's cotangent g and applies the coupling per edge (one
  multiply-add per non-zero term), rather than gathering 3 S rows of the pulled-back u_b = G_b^T g:
  fewer bytes per edge (R = 20 against 27 rows for lmax = 2), more arithmetic (50 terms against 27).
  """
  num_sources, num_v_rows, num_heads = d_v_ref.shape
  num_in_rows = num_v_rows // group
  num_out_rows = g_ref.shape[1] // group
  heads, head_mask = _tiles.head_block(block_sizes.block_h, num_heads)

  def source(j):
    def step(edges, targets, in_run, carry):  # edges, targets, in_run: [BE]
      d_k, d_v = carry
      weights = _tiles.load_edges(w_ref, edges, in_run, heads, head_mask)  # [BE, BH]
      coefs = [weights * _tiles.load_vector(vec_ref, 0, edges, in_run, b)[:, None]
               for b in range(_NUM_AXES)]  # 3 x [BE, BH]: a r_b
      d_dots = _tiles.load_edges(d_dots_ref, edges, in_run, heads, head_mask)
      q = _tiles.load_rows(q_ref, targets, in_run, heads, head_mask, d_pad)  # [BE, DP, BH]
      d_k = _tiles.add_products(d_k, d_dots[:, None, :], q, static.interpret)
      g = [_tiles.load_rows(g_ref, targets, in_run, heads, head_mask, g_pad, (row * group, group))
           for row in range(num_out_rows)]  # R x [BE, GP, BH]
      scaled = {}  # (G value, b) -> G a r_b [BE, 1, BH]: 27 distinct of the 50 terms (lmax = 2)
      d_v = list(d_v)
      for row, s, b, coef in static.terms:
        if (coef, b) not in scaled:
          scaled[coef, b] = (coef * coefs[b])[:, None, :]
        d_v[s] = _tiles.add_products(d_v[s], scaled[coef, b], g[row], static.interpret)
      return d_k, tuple(d_v)

    init = (jnp.zeros((d_pad, block_sizes.block_h), jnp.float32),
            (jnp.zeros((g_pad, block_sizes.block_h), jnp.float32),) * num_in_rows)
    d_k, d_v = _tiles.incoming_edge_loop(offsets_ref, order_ref, j, block_sizes.block_k,
                                         num_slots, step, init)
    _tiles.store_row(d_k_ref, j, heads, head_mask, d_k)
    for s in range(num_in_rows):
      _tiles.store_row(d_v_ref, j, heads, head_mask, d_v[s], (s * group, group))

  _tiles.for_each_row(block_sizes.block_n, num_sources, source)


def _backward_call(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                   sink_logit, g, out, stats, nbrs: Neighbors):
  """Every input cotangent: one fused kernel for the target side, one for the source side (d k and
  d v, walking the reverse CSR). Returns (d_q, d_k, d_gate, d_post_weight, d_envelope, d_vectors,
  d_values, d_sink_logit), the last None without a sink logit."""
  num_targets, head_dim, num_heads = q.shape
  num_slots = gate.shape[1]
  group = values.shape[1] // static.shape[1]
  block_sizes, scatter_blocks = (
      static.backward_block_sizes or
      tuple(b.at_most_heads(num_heads) for b in (_BACKWARD_BLOCKS, _SCATTER_BLOCKS)))
  num_head_blocks = pl.cdiv(num_heads, block_sizes.block_h)

  def edge(dtype, width=num_heads):
    return jax.ShapeDtypeStruct((num_targets, num_slots, width), dtype)

  with_sink_logit = sink_logit is not None
  kernel = functools.partial(
      _backward_kernel, static=static, block_sizes=block_sizes,
      d_pad=pl.next_power_of_2(head_dim), group=group, g_pad=pl.next_power_of_2(group),
      with_sink_logit=with_sink_logit)
  d_q, d_gate, d_post_weight, d_dots, weights, d_env, d_vec, *d_sink = pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), edge(gate.dtype),
                 edge(post_weight.dtype), edge(jnp.float32), edge(jnp.float32),
                 edge(jnp.float32, num_head_blocks),
                 edge(jnp.float32, num_head_blocks * _NUM_AXES),
                 *([jax.ShapeDtypeStruct((num_targets, 1, num_heads), jnp.float32)]
                   if with_sink_logit else [])),
      grid=block_sizes.grid(num_targets, num_heads),
      compiler_params=block_sizes.compiler_params(),
      interpret=static.interpret,
      name="message_attention_bwd",
  )(nbrs.slots, q, k, gate, post_weight, envelope, vectors, values, g, out, stats,
    *_sink_logit_rows(sink_logit))
  num_sources = nbrs.num_sources
  num_edges = num_targets * num_slots
  # Per-edge arrays flattened to the CSR's slot ids n*K + k; the vectors as [1, N*K, 3] so that
  # _tiles.load_vector (a row, then columns) reads edge e's component b at (0, e, b).
  d_k, d_values = pl.pallas_call(
      functools.partial(_scatter_kernel, static=static, block_sizes=scatter_blocks,
                        num_slots=num_slots, d_pad=pl.next_power_of_2(head_dim), group=group,
                        g_pad=pl.next_power_of_2(group)),
      out_shape=(jax.ShapeDtypeStruct((num_sources, head_dim, num_heads), k.dtype),
                 jax.ShapeDtypeStruct(values.shape, values.dtype)),
      grid=scatter_blocks.grid(num_sources, num_heads),
      compiler_params=scatter_blocks.compiler_params(),
      interpret=static.interpret,
      name="message_attention_bwd_scatter",
  )(nbrs.source_offsets, nbrs.edge_order, weights.reshape(num_edges, num_heads),
    d_dots.reshape(num_edges, num_heads), vectors.reshape(1, num_edges, _NUM_AXES), q, g)
  d_vectors = d_vec.reshape(num_targets, num_slots, num_head_blocks, _NUM_AXES).sum(axis=2)
  d_sink_logit = d_sink[0].reshape(num_targets, num_heads).astype(sink_logit.dtype) if d_sink \
      else None
  return (d_q, d_k, d_gate, d_post_weight, jnp.sum(d_env, axis=-1).astype(envelope.dtype),
          d_vectors.astype(vectors.dtype), d_values, d_sink_logit)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _backward(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
              sink_logit, g, out, stats, nbrs: Neighbors):
  """The fused backward. Differentiated (force training), the composed backward runs instead,
  once: it yields the same cotangents and the residuals of its own VJP, so the fused pass would
  only add time. out and stats merely cache what the inputs determine and take no cotangent."""
  return _backward_call(static, q, k, gate, post_weight, envelope, vectors, values, sink_logit, g,
                        out, stats, nbrs)


def _backward_fwd(static, q, k, gate, post_weight, envelope, vectors, values, sink_logit, g, out,
                  stats, nbrs):
  del out, stats
  return jax.vjp(lambda *xs: _composed_backward(static, *xs, nbrs), q, k, gate, post_weight,
                 envelope, vectors, values, sink_logit, g)


def _backward_bwd(static, vjp, cotangents):
  return (*vjp(cotangents), None, None, None)


_backward.defvjp(_backward_fwd, _backward_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _message_attention(static: _MessageStatic, with_stats: bool, q, k, gate, post_weight, envelope,
                       vectors, values, sink_logit, nbrs: Neighbors):
  """out in the dtype of values, or with_stats: (out in float32, stats), what the backward reads.
  The stats feed only this op's backward, so their cotangent is always 0."""
  return _forward_call(static, q, k, gate, post_weight, envelope, vectors, values, sink_logit,
                       nbrs, with_stats)


def _message_attention_fwd(static, with_stats, q, k, gate, post_weight, envelope, vectors, values,
                           sink_logit, nbrs):
  # Through the custom_vjp so that outer derivatives (force training) stay in kernels. The
  # backward's softmax row term is <g, out>: it reads out in float32 (a bf16 out would make it
  # the largest error of the bf16 gradients), and the primal output is cast from it.
  out, stats = _message_attention(static, True, q, k, gate, post_weight, envelope, vectors, values,
                                  sink_logit, nbrs)
  residuals = (q, k, gate, post_weight, envelope, vectors, values, sink_logit, out, stats, nbrs)
  return ((out, stats) if with_stats else out.astype(values.dtype)), residuals


def _message_attention_bwd(static: _MessageStatic, with_stats, residuals, cotangents):
  q, k, gate, post_weight, envelope, vectors, values, sink_logit, out, stats, nbrs = residuals
  g = cotangents[0] if with_stats else cotangents
  return (*_backward(static, q, k, gate, post_weight, envelope, vectors, values, sink_logit, g,
                     out, stats, nbrs), None)


_message_attention.defvjp(_message_attention_fwd, _message_attention_bwd)


# -------------------------------------------------------------------------------- public API


def _check_inputs(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                  nbr_idx, nbr_mask, sink_logit) -> None:
  check_attention_inputs(q, k, values, nbr_idx, nbr_mask, static.sink, gate=gate,
                         post_weight=post_weight, envelope=envelope, vectors=vectors)
  if sink_logit is not None and (sink_logit.shape != (q.shape[0], q.shape[2]) or
                                 not jnp.issubdtype(sink_logit.dtype, jnp.floating)):
    raise ValueError(f"sink_logit must be a float [N, H] = {(q.shape[0], q.shape[2])} array; got "
                     f"{sink_logit.shape} {sink_logit.dtype}")
  num_in_rows = static.shape[1]
  if values.shape[1] % num_in_rows:
    raise ValueError(f"values must be [M, S*G, H] with S={num_in_rows} the coupling's feature "
                     f"rows; got {values.shape=}")


@functools.partial(jax.jit, static_argnums=(0,))
def _message_attention_jit(static, q, k, gate, post_weight, envelope, vectors, values, nbr_idx,
                           nbr_mask, sink_logit):
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, k.shape[0])
  return _message_attention(static, False, q, k, gate, post_weight, envelope, vectors, values,
                            sink_logit, nbrs)


def message_attention(q: Float[Array, "N d H"], k: Float[Array, "M d H"],
                      gate: Float[Array, "N K H"], post_weight: Float[Array, "N K H"],
                      envelope: Float[Array, "N K"], vectors: Float[Array, "N K 3"],
                      values: Float[Array, "M SG H"], nbr_idx: Int[ArrayLike, "N K"],
                      nbr_mask: Bool[ArrayLike, "N K"], *, coupling: Float[ArrayLike, "R S 3"],
                      scale: float, sink: float = 1e-3,
                      sink_logit: Float[Array, "N H"] | None = None,
                      block_sizes: BlockSizes | None = None,
                      backward_block_sizes: tuple[BlockSizes, BlockSizes] | None = None,
                      interpret: bool = False) -> Float[Array, "N RG H"]:
  """Fused attention message ``sum_k a T(v_j, r)`` (see the module docstring for the formula).

  Args:
    q: queries of the target atoms.
    k: keys of the source nodes.
    gate: per-edge multiplier of the logits.
    post_weight: per-edge multiplier applied after the softmax.
    envelope: smooth cutoff weight of each edge (multiplies exp(logits)).
    vectors: edge vectors r (the vector argument of T).
    values: source features v in head-last layout, SG = S*G rows: feature row s, channel group g
      sit at row s*G + g (i.e. v[M, S, C] with channel c = g*H + h, reshaped).
    nbr_idx: source of each slot (M, the sentinel, on empty slots).
    nbr_mask: True on real edges.
    coupling: static array G of T (e.g. the l1 (x) 1 -> l3 Clebsch-Gordan table).
    scale: logit scale (1/sqrt(d) in the paper).
    sink: strength of the attention sink; must be >= 0.
    sink_logit: logit L of the sink, which adds sink * exp(L) to the softmax denominator
      (differentiable); None puts it at logit 0.
    block_sizes: tiling of the forward kernel; None picks 64 heads (fewer if H is smaller) x 4
      slots per step x 1 warp for float32 values, 128 heads x 2 slots x 2 warps for narrower ones.
    backward_block_sizes: tilings of the fused backward's (target-side, source-side) kernels;
      None picks 64 and 32 heads x 1 slot x 1 warp. The second-order gather kernels use their
      defaults.
    interpret: run all kernels in the Pallas interpreter (CPU testing).

  Returns:
    RG = R*G rows in the dtype of ``values`` (float32 accumulation): row r, group g at r*G + g.
    Targets without a valid slot get 0.

  Raises:
    ValueError: on inconsistent shapes or dtypes, a malformed coupling or a negative sink.
  """
  static = _make_static(coupling, scale, sink, block_sizes, backward_block_sizes, interpret)
  _check_inputs(static, q, k, gate, post_weight, envelope, vectors, values, nbr_idx, nbr_mask,
                sink_logit)
  return _message_attention_jit(static, q, k, gate, post_weight, envelope, vectors, values,
                                nbr_idx, nbr_mask, sink_logit)


def message_attention_reference(
    q: Float[Array, "N d H"], k: Float[Array, "M d H"], gate: Float[Array, "N K H"],
    post_weight: Float[Array, "N K H"], envelope: Float[Array, "N K"],
    vectors: Float[Array, "N K 3"], values: Float[Array, "M SG H"],
    nbr_idx: Int[ArrayLike, "N K"], nbr_mask: Bool[ArrayLike, "N K"], *,
    coupling: Float[ArrayLike, "R S 3"], scale: float, sink: float = 1e-3,
    sink_logit: Float[Array, "N H"] | None = None, block_sizes: BlockSizes | None = None,
    backward_block_sizes: tuple[BlockSizes, BlockSizes] | None = None, interpret: bool = False
) -> Float[Array, "N RG H"]:
  """Pure-jnp ``message_attention`` in (at least) float32; materialises the gathered v rows."""
  del block_sizes, backward_block_sizes, interpret
  coupling = np.asarray(coupling)
  num_in_rows = coupling.shape[1]
  valid = valid_slots(nbr_idx, nbr_mask, k.shape[0])
  dots = jnp.einsum("ndh,nkdh->nkh", upcast(q), gather_sources(k, nbr_idx, valid),
                    precision=_HIGHEST)  # [N, K, H]
  weights = attention_weights(dots, gate, post_weight, envelope, valid, scale=scale, sink=sink,
                              sink_logit=sink_logit)
  rows = gather_sources(values, nbr_idx, valid)  # [N, K, S*G, H]
  n, num_slots, _, h = rows.shape
  rows = rows.reshape(n, num_slots, num_in_rows, -1, h)  # [N, K, S, G, H]
  moments = jnp.einsum("nkh,nkb,nksgh->nbsgh", weights, upcast(vectors), rows,
                       precision=_HIGHEST)  # [N, 3, S, G, H]
  out = jnp.einsum("rsb,nbsgh->nrgh", jnp.asarray(coupling, moments.dtype), moments,
                   precision=_HIGHEST)
  return out.reshape(n, -1, h).astype(values.dtype)
