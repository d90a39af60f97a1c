"""Fused attention message with a first-order tensor product (E2Former-V2 spec sections 5.8, 6.5).

For target atoms n with neighbour slots k pointing at sources j = idx[n, k], edge vectors r[n, k],
attention weights a[n, k, h] (the softmax of ``node_attention``, times post_weight) and source
features v[j, s, c] with channel c in head h = c mod H:

  out[n, row, c] = sum_k a[n, k, h] T(v_j, r[n, k])[row, c]
  T(v, r)[row, c] = sum_{s,b} G[row, s, b] v[s, c] r[b]

for a static coupling G [R, S, 3] (the Clebsch-Gordan table of l1 (x) 1 -> l3). T is linear in r,
so the kernel accumulates per target the three moments ``m_b = sum_k a r_b v_j`` ([S, C] each;
only per-edge *scalars* a r_b multiply node rows) and applies G once per target:
``out = sum_{s,b} G[:, s, b] m_b[s]``. Per edge it gathers the S rows of v_j (9 for lmax = 2), not
the R + S = 29 rows of ``[T(v_j, x_j); v_j]`` that ``node_attention`` needs for the same message,
and it uses the true edge vector (periodic images included), so no difference of two large node
terms is formed.

The backward is built from the primitives of ``neighbor_ops`` and the fused softmax VJP, like
``node_attention``'s, so every derivative order keeps the linear-memory property.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _tiles
from pallas_kernels._neighbors import (
    Neighbors,
    check_attention_inputs,
    gather_sources,
    prepare_neighbors,
    upcast,
    valid_slots,
)
from pallas_kernels.attention_weights import attention_weights
from pallas_kernels.neighbor_ops import (
    BlockSizes,
    edge_dot_prepared,
    make_static,
    scatter_sum_prepared,
)
from pallas_kernels.node_attention import (
    online_softmax_step,
    softmax_backward,
    softmax_denominator,
)

# Components of an edge vector (x, y, z).
_NUM_AXES = 3
# Default forward tiling: 64 heads, one slot per step, one warp. On an H100 at N = 100k (paper
# sizes, benchmarks/notes_attention.md, runs 9 and 13) it took 7.8 ms in float32 against 9.8 at
# 2 warps, 10.6 for 128 heads at 4 warps and 31-47 ms for every tiling with several slots per step
# (a reduction over slots per accumulator row).
_FORWARD_BLOCKS = BlockSizes(block_h=64, block_k=1, num_warps=1)
_HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class _MessageStatic:
  """Hashable configuration: the coupling as its non-zero terms, softmax constants, tiling."""

  shape: tuple[int, int, int]  # (R, S, 3) of the coupling
  terms: tuple[tuple[int, int, int, float], ...]  # (row, s, b, G[row, s, b]) for G != 0
  scale: float
  sink: float
  block_sizes: BlockSizes | None
  interpret: bool

  def dense(self, dtype) -> jax.Array:
    coupling = np.zeros(self.shape)
    for row, s, b, coef in self.terms:
      coupling[row, s, b] = coef
    return jnp.asarray(coupling, dtype)


def _make_static(coupling, scale, sink, block_sizes, interpret) -> _MessageStatic:
  coupling = np.asarray(coupling, np.float64)
  if coupling.ndim != 3 or coupling.shape[2] != _NUM_AXES:
    raise ValueError(f"coupling must be [R, S, 3]; got shape {coupling.shape}")
  if not np.all(np.isfinite(coupling)):
    raise ValueError("coupling must be finite")
  terms = tuple((int(r), int(s), int(b), float(coupling[r, s, b]))
                for r, s, b in zip(*np.nonzero(coupling)))
  return _MessageStatic(tuple(coupling.shape), terms, float(scale), float(sink), block_sizes,
                        bool(interpret))


# ----------------------------------------------------------------------------------- forward


def _forward_kernel(slots_ref, q_ref, k_ref, gate_ref, pw_ref, env_ref, vec_ref, v_ref, out_ref, *,
                    static: _MessageStatic, block_sizes: BlockSizes, d_pad: int, group: int,
                    g_pad: int):
  """One program: block_n targets in turn, a block of heads; online softmax over slot blocks.

  The accumulator is one [GP, BH] tile per (axis b, feature row s): value rows are gathered row by
  row (each a contiguous [G, BH] segment of the source's [S*G, H] block), since a Triton tile
  cannot be sliced into rows afterwards, and the coupling is applied to the tiles at the end.
  """
  num_targets, num_slots, num_heads = gate_ref.shape
  num_out_rows, num_in_rows, _ = static.shape
  block_h, block_k = block_sizes.block_h, block_sizes.block_k
  heads, head_mask = _tiles.head_block(block_h, num_heads)

  def target(n):
    q = _tiles.load_row(q_ref, n, heads, head_mask, d_pad)  # [DP, BH]

    def step(i, carry):
      m, l, acc = carry  # [BH], [BH], (3*S) x [GP, BH] with index b*S + s
      k, sources, valid, m_new, p, rescale, weights = online_softmax_step(
          slots_ref, k_ref, gate_ref, pw_ref, env_ref, n, i, q, m, scale=static.scale,
          block_k=block_k, d_pad=d_pad, heads=heads, head_mask=head_mask)
      coefs = [(weights * _tiles.load_vector(vec_ref, n, k, valid, b)[:, None])[:, None, :]
               for b in range(_NUM_AXES)]  # 3 x [BK, 1, BH]
      rows = [_tiles.load_rows(v_ref, sources, valid, heads, head_mask, g_pad, (s * group, group))
              for s in range(num_in_rows)]  # S x [BK, GP, BH]
      acc = tuple(acc[b * num_in_rows + s] * rescale[None] + jnp.sum(coefs[b] * rows[s], axis=0)
                  for b in range(_NUM_AXES) for s in range(num_in_rows))
      return m_new, l * rescale + jnp.sum(p, axis=0), acc

    zeros = jnp.zeros((g_pad, block_h), jnp.float32)
    init = (jnp.zeros((block_h,), jnp.float32), jnp.zeros((block_h,), jnp.float32),
            (zeros,) * (_NUM_AXES * num_in_rows))
    m, l, acc = _tiles.slot_loop(pl.cdiv(num_slots, block_k), step, init, block_sizes.unroll)
    inv = (1.0 / softmax_denominator(l, m, static.sink))[None]  # [1, BH]
    for row in range(num_out_rows):
      out = zeros
      for r, s, b, coef in static.terms:
        if r == row:
          out = out + coef * acc[b * num_in_rows + s]
      _tiles.store_row(out_ref, n, heads, head_mask, out * inv, (row * group, group))

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _forward_call(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                  nbrs: Neighbors) -> jax.Array:
  num_targets, head_dim, num_heads = q.shape
  num_out_rows, num_in_rows, _ = static.shape
  group = values.shape[1] // num_in_rows
  block_sizes = static.block_sizes or dataclasses.replace(
      _FORWARD_BLOCKS, block_h=min(_FORWARD_BLOCKS.block_h, pl.next_power_of_2(num_heads)))
  kernel = functools.partial(
      _forward_kernel, static=static, block_sizes=block_sizes, d_pad=pl.next_power_of_2(head_dim),
      group=group, g_pad=pl.next_power_of_2(group))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_targets, num_out_rows * group, num_heads), values.dtype),
      grid=block_sizes.grid(num_targets, num_heads),
      compiler_params=block_sizes.compiler_params(),
      interpret=static.interpret,
      name="message_attention_fwd",
  )(nbrs.slots, q, k, gate, post_weight, envelope, vectors, values)


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _message_attention(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                       nbrs: Neighbors):
  return _forward_call(static, q, k, gate, post_weight, envelope, vectors, values, nbrs)


def _message_attention_fwd(static, q, k, gate, post_weight, envelope, vectors, values, nbrs):
  # Through the custom_vjp so that outer derivatives (force training) stay in kernels.
  out = _message_attention(static, q, k, gate, post_weight, envelope, vectors, values, nbrs)
  return out, (q, k, gate, post_weight, envelope, vectors, values, nbrs)


def _message_attention_bwd(static: _MessageStatic, residuals, g):
  """out = sum_k a sum_b r_b (G_b v_j): with u_b = G_b^T g and E_b[n,k,h] = <u_b[n], v_j>_h,
  d a = sum_b r_b E_b, d r_b = sum_h a E_b, d v_j = sum_b scatter(a r_b, u_b)."""
  q, k, gate, post_weight, envelope, vectors, values, nbrs = residuals
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
      interpret=static.interpret)
  d_vectors = jnp.stack([jnp.sum(weights * e[b], axis=-1) for b in range(_NUM_AXES)], axis=-1)
  # One scatter per moment: concatenating the three along heads would copy u and the weights.
  scatter = by_rows(row_dtype=jnp.float32)  # u is float32
  d_values = sum(scatter_sum_prepared(scatter, weights * r[..., b, None], u[b], nbrs)
                 for b in range(_NUM_AXES))  # [M, S*G, H]
  return (*softmax_cotangents, d_vectors.astype(vectors.dtype), d_values.astype(values.dtype),
          None)


_message_attention.defvjp(_message_attention_fwd, _message_attention_bwd)


# -------------------------------------------------------------------------------- public API


def _check_inputs(static: _MessageStatic, q, k, gate, post_weight, envelope, vectors, values,
                  nbr_idx, nbr_mask) -> None:
  check_attention_inputs(q, k, values, nbr_idx, nbr_mask, static.sink, gate=gate,
                         post_weight=post_weight, envelope=envelope, vectors=vectors)
  num_in_rows = static.shape[1]
  if values.shape[1] % num_in_rows:
    raise ValueError(f"values must be [M, S*G, H] with S={num_in_rows} the coupling's feature "
                     f"rows; got {values.shape=}")


@functools.partial(jax.jit, static_argnums=(0,))
def _message_attention_jit(static, q, k, gate, post_weight, envelope, vectors, values, nbr_idx,
                           nbr_mask):
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, k.shape[0])
  return _message_attention(static, q, k, gate, post_weight, envelope, vectors, values, nbrs)


def message_attention(q: jax.Array, k: jax.Array, gate: jax.Array, post_weight: jax.Array,
                      envelope: jax.Array, vectors: jax.Array, values: jax.Array,
                      nbr_idx: jax.Array, nbr_mask: jax.Array, *, coupling, scale: float,
                      sink: float = 1e-3, block_sizes: BlockSizes | None = None,
                      interpret: bool = False) -> jax.Array:
  """Fused attention message ``sum_k a T(v_j, r)`` (see the module docstring for the formula).

  Args:
    q: [N, D, H] queries of the target atoms.
    k: [M, D, H] keys of the source nodes.
    gate: [N, K, H] per-edge multiplier of the logits.
    post_weight: [N, K, H] per-edge multiplier applied after the softmax.
    envelope: [N, K] smooth cutoff weight of each edge (multiplies exp(logits)).
    vectors: [N, K, 3] edge vectors r (the vector argument of T).
    values: [M, S*G, H] source features v in head-last layout: feature row s, channel group g sit
      at row s*G + g (i.e. v[M, S, C] with channel c = g*H + h, reshaped).
    nbr_idx: [N, K] int source of each slot (M, the sentinel, on empty slots).
    nbr_mask: [N, K] bool, True on real edges.
    coupling: [R, S, 3] static array G of T (e.g. the l1 (x) 1 -> l3 Clebsch-Gordan table).
    scale: logit scale (1/sqrt(D) in the paper).
    sink: strength of the attention sink (relative to logit 0); must be >= 0.
    block_sizes: tiling of the forward kernel; None picks 64 heads (fewer if H is smaller) x 1
      slot x 1 warp. The backward's gather kernels use their defaults.
    interpret: run all kernels in the Pallas interpreter (CPU testing).

  Returns:
    [N, R*G, H] in the dtype of ``values`` (float32 accumulation): row r, group g at r*G + g.
    Targets without a valid slot get 0.

  Raises:
    ValueError: on inconsistent shapes or dtypes, a malformed coupling or a negative sink.
  """
  static = _make_static(coupling, scale, sink, block_sizes, interpret)
  _check_inputs(static, q, k, gate, post_weight, envelope, vectors, values, nbr_idx, nbr_mask)
  return _message_attention_jit(static, q, k, gate, post_weight, envelope, vectors, values,
                                nbr_idx, nbr_mask)


def message_attention_reference(q, k, gate, post_weight, envelope, vectors, values, nbr_idx,
                                nbr_mask, *, coupling, scale, sink=1e-3, block_sizes=None,
                                interpret=False):
  """Pure-jnp ``message_attention`` in (at least) float32; materialises the gathered v rows."""
  del block_sizes, interpret
  coupling = np.asarray(coupling)
  num_in_rows = coupling.shape[1]
  valid = valid_slots(nbr_idx, nbr_mask, k.shape[0])
  dots = jnp.einsum("ndh,nkdh->nkh", upcast(q), gather_sources(k, nbr_idx, valid),
                    precision=_HIGHEST)  # [N, K, H]
  weights = attention_weights(dots, gate, post_weight, envelope, valid, scale=scale, sink=sink)
  rows = gather_sources(values, nbr_idx, valid)  # [N, K, S*G, H]
  n, num_slots, _, h = rows.shape
  rows = rows.reshape(n, num_slots, num_in_rows, -1, h)  # [N, K, S, G, H]
  moments = jnp.einsum("nkh,nkb,nksgh->nbsgh", weights, upcast(vectors), rows,
                       precision=_HIGHEST)  # [N, 3, S, G, H]
  out = jnp.einsum("rsb,nbsgh->nrgh", jnp.asarray(coupling, moments.dtype), moments,
                   precision=_HIGHEST)
  return out.reshape(n, -1, h).astype(values.dtype)
