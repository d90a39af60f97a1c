"""In-kernel helpers: masked loads and stores of head-last tiles for the Pallas Triton kernels.

Every kernel here runs on a grid ``(row blocks, head blocks)``: one program owns ``block_n``
consecutive rows (target atoms or source nodes), visited one after the other, and ``block_h``
consecutive heads. Arrays are head-last, ``[R, X, H]``, so a program's
slice of one row is ``[X, block_h]`` with the heads contiguous in memory.

All refs are whole arrays indexed with integer arrays on every dimension plus a mask, because

* Triton needs power-of-two tile shapes, so X and H are padded *in registers* (masked lanes read 0),
  never by copying the array in HBM;
* jax 0.11.2's Triton lowering does not mask ragged blocks, and its interpreter only accepts masked
  loads whose indexers are integer arrays on every dimension.

Masks are built only where a static check says they can be false, which keeps the common case
(X, H and K multiples of the tile) free of per-lane predicates.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Finite "minus infinity" for the online softmax: exp(NEG_INF - m) underflows to exactly 0, whereas a
# true -inf gives inf - inf = NaN for a row whose running maximum is still -inf.
NEG_INF = -1e30


def iota(shape: tuple[int, ...], dim: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, shape, dim)


def _and(a: jax.Array | None, b: jax.Array | None) -> jax.Array | None:
  if a is None:
    return b
  if b is None:
    return a
  return a & b


def _bcast(x: jax.Array | None, shape: tuple[int, ...], dims: tuple[int, ...]) -> jax.Array | None:
  return None if x is None else lax.broadcast_in_dim(x, shape, dims)


def _load(ref, indices: tuple[jax.Array, ...], mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return plt.load(ref.at[indices])
  return plt.load(ref.at[indices], mask=mask, other=0)


def _store(ref, indices: tuple[jax.Array, ...], value: jax.Array, mask: jax.Array | None) -> None:
  if mask is None:
    plt.store(ref.at[indices], value.astype(ref.dtype))
  else:
    plt.store(ref.at[indices], value.astype(ref.dtype), mask=mask)


def fma(a: jax.Array, b: jax.Array, c: jax.Array, interpret: bool) -> jax.Array:
  """``a * b + c`` with one fused multiply-add per float32 element (a, b broadcast to c's shape).

  Why written out: for ``a * b + c`` the Triton pipeline behind Pallas emits a rounded multiply and
  a rounded add (PTX mul.rn / add.rn, which ptxas does not fuse). In message_attention's backward
  kernels the written-out FMA took forward + backward at N = 100k from 37.4 to 36.0 ms on an H100;
  in the forward kernels it measured slower, so they keep the plain expression
  (docs/performance.md §2.3, §2.4; measured at 1c75bf2). The interpreter runs the plain expression.
  """
  assert c.dtype == jnp.float32, c.dtype
  a, b = (jnp.broadcast_to(x.astype(jnp.float32), c.shape) for x in (a, b))
  if interpret:
    return a * b + c
  [out] = plt.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=[a, b, c], constraints="=f,f,f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(c.shape, jnp.float32)])
  return out


def add_products(acc: jax.Array, a: jax.Array, b: jax.Array, interpret: bool) -> jax.Array:
  """``acc + sum_k a[k] * b[k]`` over the leading (slot) axis of a and b (broadcast against each
  other, the sum shaped as acc): FMAs when that axis has length 1, as in the default tilings."""
  if a.shape[0] == 1 and b.shape[0] == 1:
    return fma(a.reshape(a.shape[1:]), b.reshape(b.shape[1:]), acc, interpret)
  return acc + jnp.sum(a * b, axis=0)


def for_each_row(block_n: int, num_rows: int, body) -> None:
  """Runs ``body(row)`` for this program's rows, ``block_n`` consecutive ones, in order.

  Consecutive rows are spatial neighbours (atoms come in molecules or space-filling order), so
  walking them in one program lets the L1 cache serve the source rows they share.
  """
  if block_n == 1:
    body(pl.program_id(0))
    return
  first = pl.program_id(0) * block_n

  def step(i, carry):
    body(first + i)
    return carry

  lax.fori_loop(0, jnp.minimum(block_n, num_rows - first), step, 0)


def slot_loop(num_steps: int, body, carry, unroll: bool):
  """``carry = body(i, carry)`` for i < num_steps: a Triton loop, or unrolled in the trace.

  Unrolled, every step's slot-index load and gathers are independent instructions that the
  compiler can issue early, instead of one index load -> gather dependency per loop iteration.
  """
  if not unroll:
    return lax.fori_loop(0, num_steps, body, carry)
  for step in range(num_steps):
    carry = body(step, carry)
  return carry


def head_block(block_h: int, num_heads: int) -> tuple[jax.Array, jax.Array | None]:
  """The heads of this program, [block_h], and their in-range mask (None when always in range)."""
  heads = pl.program_id(1) * block_h + iota((block_h,), 0)
  return heads, (None if num_heads % block_h == 0 else heads < num_heads)


def row_tile_indices(
    rows: jax.Array, row_dim: int, row_pad: int, heads: jax.Array, head_mask: jax.Array | None,
    row_mask: jax.Array | None, start: int = 0,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array | None]:
  """Indexers and mask of ``ref[rows, start:start + row_dim, heads]``:
  a [B, row_pad, block_h] tile."""
  shape = (rows.shape[0], row_pad, heads.shape[0])
  x = iota(shape, 1)
  mask = _and(_bcast(row_mask, shape, (0,)), _bcast(head_mask, shape, (2,)))
  if row_dim < row_pad:
    mask = _and(mask, x < row_dim)
  indices = (lax.broadcast_in_dim(rows, shape, (0,)), x + start if start else x,
             lax.broadcast_in_dim(heads, shape, (2,)))
  return indices, mask


def load_rows(ref, rows, row_mask, heads, head_mask, row_pad: int,
              segment: tuple[int, int] | None = None) -> jax.Array:
  """Gathers ``ref[rows]`` ([R, X, H] -> float32 [B, row_pad, block_h]); zero on masked lanes.

  ``segment = (start, length)`` gathers only ``ref[rows, start:start + length]`` (default: all X).
  Masked rows are never dereferenced, so ``rows`` may hold any in-range placeholder there.
  """
  start, length = segment or (0, ref.shape[1])
  indices, mask = row_tile_indices(rows, length, row_pad, heads, head_mask, row_mask, start)
  return _load(ref, indices, mask).astype(jnp.float32)


def load_row(ref, row, heads, head_mask, row_pad: int,
             segment: tuple[int, int] | None = None) -> jax.Array:
  """``ref[row]`` (or its ``segment``, as in :func:`load_rows`) for a scalar row: float32
  [row_pad, block_h]."""
  rows = jnp.full((1,), row, jnp.int32)
  return load_rows(ref, rows, None, heads, head_mask, row_pad, segment).reshape(
      row_pad, heads.shape[0])


def store_row(ref, row, heads, head_mask, value: jax.Array,
              segment: tuple[int, int] | None = None) -> None:
  """``ref[row, :X, heads] = value[:X]`` for value [row_pad, block_h] (or into ``segment``, as in
  :func:`load_rows`)."""
  row_pad = value.shape[0]
  rows = jnp.full((1,), row, jnp.int32)
  start, length = segment or (0, ref.shape[1])
  indices, mask = row_tile_indices(rows, length, row_pad, heads, head_mask, None, start)
  _store(ref, indices, value.reshape(1, *value.shape), mask)


def slot_tile_indices(row, slots, slot_mask, heads, head_mask):
  """Indexers and mask of ``ref[row, slots, heads]`` for a [N, K, H] ref: shape [B, block_h]."""
  shape = (slots.shape[0], heads.shape[0])
  indices = (
      jnp.full(shape, row, jnp.int32),
      lax.broadcast_in_dim(slots, shape, (0,)),
      lax.broadcast_in_dim(heads, shape, (1,)),
  )
  return indices, _and(_bcast(slot_mask, shape, (0,)), _bcast(head_mask, shape, (1,)))


def load_slots(ref, row, slots, slot_mask, heads, head_mask) -> jax.Array:
  """``ref[row, slots, heads]`` of a [N, K, H] ref as float32 [B, block_h]; zero on masked lanes."""
  indices, mask = slot_tile_indices(row, slots, slot_mask, heads, head_mask)
  return _load(ref, indices, mask).astype(jnp.float32)


def store_slots(ref, row, slots, slot_mask, heads, head_mask, value: jax.Array) -> None:
  indices, mask = slot_tile_indices(row, slots, slot_mask, heads, head_mask)
  _store(ref, indices, value, mask)


def _matrix_tile(rows, row_mask, cols, col_mask):
  shape = (rows.shape[0], cols.shape[0])
  indices = (lax.broadcast_in_dim(rows, shape, (0,)), lax.broadcast_in_dim(cols, shape, (1,)))
  return indices, _and(_bcast(row_mask, shape, (0,)), _bcast(col_mask, shape, (1,)))


def load_matrix(ref, rows, row_mask, cols, col_mask) -> jax.Array:
  """``ref[rows, cols]`` of a 2-d ref: [B, C] in the ref's dtype, 0 on masked lanes."""
  return _load(ref, *_matrix_tile(rows, row_mask, cols, col_mask))


def store_matrix(ref, rows, row_mask, cols, col_mask, value: jax.Array) -> None:
  """``ref[rows, cols] = value`` ([B, C]) on the unmasked lanes of a 2-d ref."""
  indices, mask = _matrix_tile(rows, row_mask, cols, col_mask)
  _store(ref, indices, value, mask)


def load_edges(ref, edges, edge_mask, heads, head_mask) -> jax.Array:
  """``ref[edges, heads]`` of a flattened [N*K, H] ref as float32 [B, block_h]."""
  return load_matrix(ref, edges, edge_mask, heads, head_mask).astype(jnp.float32)


def load_vector(ref, row, cols, col_mask, *trailing: int) -> jax.Array:
  """``ref[row, cols, *trailing]`` (static trailing indices): float32 [B], 0 on masked lanes."""
  indices = (jnp.full(cols.shape, row, jnp.int32), cols,
             *(jnp.full(cols.shape, t, jnp.int32) for t in trailing))
  return _load(ref, indices, col_mask).astype(jnp.float32)


def neighbor_block(slots_ref, row, step, block_k: int):
  """Slots ``[step*block_k, (step+1)*block_k)`` of one target row of the [N, K] ``slots`` ref.

  Returns:
    (k, k_mask, sources, valid): slot numbers [block_k], their in-range mask (None when K is a
    multiple of block_k), the source row of each slot with invalid slots mapped to row 0 (safe to
    form an address from, never dereferenced) and the validity mask [block_k].
  """
  num_slots = slots_ref.shape[1]
  k = step * block_k + iota((block_k,), 0)
  k_mask = None if num_slots % block_k == 0 else k < num_slots
  indices = (jnp.full((block_k,), row, jnp.int32), k)
  if k_mask is None:
    slots = plt.load(slots_ref.at[indices])
  else:
    slots = plt.load(slots_ref.at[indices], mask=k_mask, other=-1)
  valid = slots >= 0
  return k, k_mask, jnp.maximum(slots, 0), valid


def incoming_edge_loop(offsets_ref, order_ref, source, block_e: int, num_slots: int, body, carry):
  """``carry = body(edges, targets, in_run, carry)`` over blocks of ``block_e`` incoming edges of
  ``source`` in the reverse CSR (``_neighbors.Neighbors``): flat slot ids n*K + k [block_e], their
  target rows n, and the mask of positions inside the source's run. The loop length is
  data-dependent, so it is never unrolled."""
  start = offsets_ref[source]
  end = offsets_ref[source + 1]

  def step(i, carry):
    pos = start + i * block_e + iota((block_e,), 0)
    in_run = pos < end
    edges = plt.load(order_ref.at[(pos,)], mask=in_run, other=0)
    return body(edges, edges // num_slots, in_run, carry)

  return lax.fori_loop(0, pl.cdiv(end - start, block_e), step, carry)
