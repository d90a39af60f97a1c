"""Three neighbour gather-reduce primitives, closed under differentiation (Pallas / Triton).

With a neighbour list ``idx [N, K]`` into M source rows and a validity mask (see ``_neighbors``), and
head-last arrays (H contiguous):

  edge_dot(a [N,X,H], b [M,X,H])          -> [N,K,H]:  out[n,k,h] = sum_x a[n,x,h] b[idx[n,k],x,h]
  gather_sum(w [N,K,H], b [M,X,H])        -> [N,X,H]:  out[n,x,h] = sum_k w[n,k,h] b[idx[n,k],x,h]
  scatter_sum(w [N,K,H], a [N,X,H]; M)    -> [M,X,H]:  out[j,x,h] = sum_{(n,k): idx[n,k]=j} w[n,k,h] a[n,x,h]

(sums run over valid slots only; edge_dot is 0 on invalid slots). All three are bilinear, and the
cotangents of each are the other two:

  d edge_dot:    da = gather_sum(g, b)    db = scatter_sum(g, a)
  d gather_sum:  dw = edge_dot(G, b)      db = scatter_sum(w, G)
  d scatter_sum: dw = edge_dot(a, G)      da = gather_sum(w, G)

so each is a ``custom_vjp`` whose backward calls the set again, and derivatives of any order stay in
these kernels. None of them materialises anything of size [N, K, X, H]; the extra index structure is
the O(N K) reverse CSR of ``_neighbors``. scatter_sum is gather-only (each source program walks its
incoming edges) and therefore deterministic; there are no atomics.

Kernels accumulate in float32 whatever the input dtype. The public functions return
``result_type`` of their inputs; internally the output dtype is a static choice so that backward
passes keep float32 intermediates and cast cotangents straight to each primal's dtype.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jaxtyping import Array, ArrayLike, Bool, Float, Int

from pallas_kernels import _tiles
from pallas_kernels._neighbors import (
    Neighbors,
    check_neighbor_list,
    gather_sources,
    prepare_neighbors,
    upcast,
    valid_slots,
)
from pallas_kernels.block_sizes import BlockSizes


@dataclasses.dataclass(frozen=True)
class _Static:
  """Static (hashable) configuration of one primitive call; inherited by its derivatives."""

  out_dtype: Any
  block_sizes: BlockSizes
  interpret: bool

  def with_dtype(self, dtype) -> _Static:
    return dataclasses.replace(self, out_dtype=jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------- kernels


def _edge_dot_kernel(slots_ref, a_ref, b_ref, out_ref, *, block_sizes: BlockSizes, row_pad: int):
  """One program: block_n targets and a block of heads; out[n, :, heads]."""
  num_targets, num_slots, num_heads = out_ref.shape
  heads, head_mask = _tiles.head_block(block_sizes.block_h, num_heads)

  def target(n):
    a = _tiles.load_row(a_ref, n, heads, head_mask, row_pad)  # [XP, BH]

    def step(i, carry):
      k, k_mask, sources, valid = _tiles.neighbor_block(slots_ref, n, i, block_sizes.block_k)
      b = _tiles.load_rows(b_ref, sources, valid, heads, head_mask, row_pad)  # [BK, XP, BH]
      dots = jnp.sum(b * a[None], axis=1)  # [BK, BH]; exactly 0 on invalid slots (b loaded as 0)
      _tiles.store_slots(out_ref, n, k, k_mask, heads, head_mask, dots)
      return carry

    _tiles.slot_loop(pl.cdiv(num_slots, block_sizes.block_k), step, 0, block_sizes.unroll)

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _gather_sum_kernel(slots_ref, w_ref, b_ref, out_ref, *, block_sizes: BlockSizes, row_pad: int):
  """One program: block_n targets and a block of heads; out[n, :, heads] = sum_k w[n,k] b[idx[n,k]]."""
  num_targets, num_slots, num_heads = w_ref.shape
  heads, head_mask = _tiles.head_block(block_sizes.block_h, num_heads)

  def target(n):
    def step(i, acc):
      k, _, sources, valid = _tiles.neighbor_block(slots_ref, n, i, block_sizes.block_k)
      w = _tiles.load_slots(w_ref, n, k, valid, heads, head_mask)  # [BK, BH]
      b = _tiles.load_rows(b_ref, sources, valid, heads, head_mask, row_pad)  # [BK, XP, BH]
      return acc + jnp.sum(w[:, None, :] * b, axis=0)

    acc = jnp.zeros((row_pad, block_sizes.block_h), jnp.float32)  # [XP, BH]
    acc = _tiles.slot_loop(pl.cdiv(num_slots, block_sizes.block_k), step, acc, block_sizes.unroll)
    _tiles.store_row(out_ref, n, heads, head_mask, acc)

  _tiles.for_each_row(block_sizes.block_n, num_targets, target)


def _scatter_sum_kernel(
    offsets_ref, order_ref, w_ref, a_ref, out_ref, *, block_sizes: BlockSizes, row_pad: int,
    num_slots: int,
):
  """One program: block_n sources and a block of heads; walks each one's incoming edges (CSR)."""
  num_sources, num_heads = out_ref.shape[0], out_ref.shape[2]
  heads, head_mask = _tiles.head_block(block_sizes.block_h, num_heads)

  def source(j):
    def step(edges, targets, in_run, acc):  # edges, targets, in_run: [BE]
      w = _tiles.load_edges(w_ref, edges, in_run, heads, head_mask)  # [BE, BH]
      a = _tiles.load_rows(a_ref, targets, in_run, heads, head_mask, row_pad)  # [BE, XP, BH]
      return acc + jnp.sum(w[:, None, :] * a, axis=0)

    acc = jnp.zeros((row_pad, block_sizes.block_h), jnp.float32)  # [XP, BH]
    acc = _tiles.incoming_edge_loop(offsets_ref, order_ref, j, block_sizes.block_k, num_slots,
                                    step, acc)
    _tiles.store_row(out_ref, j, heads, head_mask, acc)

  _tiles.for_each_row(block_sizes.block_n, num_sources, source)


def _edge_dot_call(static: _Static, a, b, nbrs: Neighbors) -> jax.Array:
  num_targets, row_dim, num_heads = a.shape
  num_slots = nbrs.slots.shape[1]
  kernel = functools.partial(
      _edge_dot_kernel, block_sizes=static.block_sizes, row_pad=pl.next_power_of_2(row_dim))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_targets, num_slots, num_heads), static.out_dtype),
      grid=static.block_sizes.grid(num_targets, num_heads),
      compiler_params=static.block_sizes.compiler_params(),
      interpret=static.interpret,
      name="edge_dot",
  )(nbrs.slots, a, b)


def _gather_sum_call(static: _Static, w, b, nbrs: Neighbors) -> jax.Array:
  num_targets, _, num_heads = w.shape
  row_dim = b.shape[1]
  kernel = functools.partial(
      _gather_sum_kernel, block_sizes=static.block_sizes, row_pad=pl.next_power_of_2(row_dim))
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_targets, row_dim, num_heads), static.out_dtype),
      grid=static.block_sizes.grid(num_targets, num_heads),
      compiler_params=static.block_sizes.compiler_params(),
      interpret=static.interpret,
      name="gather_sum",
  )(nbrs.slots, w, b)


def _scatter_sum_call(static: _Static, w, a, nbrs: Neighbors) -> jax.Array:
  num_targets, num_slots, num_heads = w.shape
  row_dim = a.shape[1]
  num_sources = nbrs.num_sources
  kernel = functools.partial(
      _scatter_sum_kernel, block_sizes=static.block_sizes, row_pad=pl.next_power_of_2(row_dim),
      num_slots=num_slots)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_sources, row_dim, num_heads), static.out_dtype),
      grid=static.block_sizes.grid(num_sources, num_heads),
      compiler_params=static.block_sizes.compiler_params(),
      interpret=static.interpret,
      name="scatter_sum",
  )(nbrs.source_offsets, nbrs.edge_order, w.reshape(num_targets * num_slots, num_heads), a)


# ------------------------------------------------------------------- differentiable primitives


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def edge_dot_prepared(static: _Static, a: jax.Array, b: jax.Array, nbrs: Neighbors) -> jax.Array:
  """edge_dot on a prepared neighbour list: a [N,X,H], b [M,X,H] -> [N,K,H] in static.out_dtype."""
  return _edge_dot_call(static, a, b, nbrs)


def _edge_dot_fwd(static, a, b, nbrs):
  # Through the custom_vjp (not the raw kernel) so that outer derivatives of a backward pass,
  # which differentiate this primal output too, also stay in the primitives.
  return edge_dot_prepared(static, a, b, nbrs), (a, b, nbrs)


def _edge_dot_bwd(static, residuals, g):
  a, b, nbrs = residuals
  da = gather_sum_prepared(static.with_dtype(a.dtype), g, b, nbrs)
  db = scatter_sum_prepared(static.with_dtype(b.dtype), g, a, nbrs)
  return da, db, None


edge_dot_prepared.defvjp(_edge_dot_fwd, _edge_dot_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def gather_sum_prepared(static: _Static, w: jax.Array, b: jax.Array, nbrs: Neighbors) -> jax.Array:
  """gather_sum on a prepared neighbour list: w [N,K,H], b [M,X,H] -> [N,X,H]."""
  return _gather_sum_call(static, w, b, nbrs)


def _gather_sum_fwd(static, w, b, nbrs):
  return gather_sum_prepared(static, w, b, nbrs), (w, b, nbrs)


def _gather_sum_bwd(static, residuals, g):
  w, b, nbrs = residuals
  dw = edge_dot_prepared(static.with_dtype(w.dtype), g, b, nbrs)
  db = scatter_sum_prepared(static.with_dtype(b.dtype), w, g, nbrs)
  return dw, db, None


gather_sum_prepared.defvjp(_gather_sum_fwd, _gather_sum_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def scatter_sum_prepared(static: _Static, w: jax.Array, a: jax.Array, nbrs: Neighbors) -> jax.Array:
  """scatter_sum on a prepared neighbour list: w [N,K,H], a [N,X,H] -> [M,X,H]."""
  return _scatter_sum_call(static, w, a, nbrs)


def _scatter_sum_fwd(static, w, a, nbrs):
  return scatter_sum_prepared(static, w, a, nbrs), (w, a, nbrs)


def _scatter_sum_bwd(static, residuals, g):
  w, a, nbrs = residuals
  dw = edge_dot_prepared(static.with_dtype(w.dtype), a, g, nbrs)
  da = gather_sum_prepared(static.with_dtype(a.dtype), w, g, nbrs)
  return dw, da, None


scatter_sum_prepared.defvjp(_scatter_sum_fwd, _scatter_sum_bwd)


# ------------------------------------------------------------------------------ public wrappers


def _check_float(name: str, x: jax.Array, ndim: int) -> None:
  if x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{name} must be a {ndim}-d float array; got {x.shape=}, {x.dtype=}")


def _check_heads(num_heads: int, *arrays: tuple[str, jax.Array]) -> None:
  for name, x in arrays:
    if x.shape[-1] != num_heads:
      raise ValueError(f"{name} must have H={num_heads} heads last; got {name}.shape={x.shape}")


def make_static(out_dtype, block_sizes: BlockSizes | None, interpret: bool, *, row_dim: int,
                num_slots: int, num_heads: int, row_dtype=jnp.float32) -> _Static:
  """Resolves the default tiling for gathered rows of ``row_dim`` elements of ``row_dtype`` and
  bundles the static configuration."""
  if block_sizes is None:
    block_sizes = BlockSizes.get_default(row_dim, num_slots, num_heads,
                                         itemsize=jnp.dtype(row_dtype).itemsize)
  return _Static(jnp.dtype(out_dtype), block_sizes, bool(interpret))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def edge_dot(a: Float[Array, "N X H"], b: Float[Array, "M X H"], nbr_idx: Int[ArrayLike, "N K"],
             nbr_mask: Bool[ArrayLike, "N K"], *, block_sizes: BlockSizes | None = None,
             interpret: bool = False) -> Float[Array, "N K H"]:
  """Per-edge dot products over the row axis: out[n,k,h] = sum_x a[n,x,h] b[idx[n,k],x,h].

  Args:
    a: target rows.
    b: source rows.
    nbr_idx: source of each slot (M or any value on empty slots).
    nbr_mask: True on real edges.
    block_sizes: kernel tiling; None picks ``BlockSizes.get_default(X, K, H)``.
    interpret: run the kernels in the Pallas interpreter (CPU testing).

  Returns:
    The products in ``result_type(a, b)``, exactly 0 on invalid slots. Differentiable to any order
    in reverse mode with respect to a and b.

  Raises:
    ValueError: on inconsistent shapes or dtypes.
  """
  _check_float("a", a, 3)
  _check_float("b", b, 3)
  if a.shape[1:] != b.shape[1:]:
    raise ValueError(f"a and b must share [X, H]; got {a.shape=}, {b.shape=}")
  check_neighbor_list(nbr_idx, nbr_mask, a.shape[0])
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, b.shape[0])
  static = make_static(jnp.result_type(a, b), block_sizes, interpret, row_dim=a.shape[1],
                       num_slots=nbr_idx.shape[1], num_heads=a.shape[2], row_dtype=b.dtype)
  return edge_dot_prepared(static, a, b, nbrs)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def gather_sum(w: Float[Array, "N K H"], b: Float[Array, "M X H"], nbr_idx: Int[ArrayLike, "N K"],
               nbr_mask: Bool[ArrayLike, "N K"], *, block_sizes: BlockSizes | None = None,
               interpret: bool = False) -> Float[Array, "N X H"]:
  """Weighted neighbour sum: out[n,x,h] = sum_k w[n,k,h] b[idx[n,k],x,h] over valid slots.

  Args:
    w: per-edge weights.
    b: source rows.
    nbr_idx: source of each slot.
    nbr_mask: True on real edges.
    block_sizes: kernel tiling; None picks ``BlockSizes.get_default(X, K, H)``.
    interpret: run the kernels in the Pallas interpreter.

  Returns:
    The sums in ``result_type(w, b)``.

  Raises:
    ValueError: on inconsistent shapes or dtypes.
  """
  _check_float("w", w, 3)
  _check_float("b", b, 3)
  _check_heads(w.shape[2], ("b", b))
  check_neighbor_list(nbr_idx, nbr_mask, w.shape[0])
  if w.shape[:2] != nbr_idx.shape:
    raise ValueError(f"w must be [N, K, H] like nbr_idx; got {w.shape=}, {nbr_idx.shape=}")
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, b.shape[0])
  static = make_static(jnp.result_type(w, b), block_sizes, interpret, row_dim=b.shape[1],
                       num_slots=nbr_idx.shape[1], num_heads=w.shape[2], row_dtype=b.dtype)
  return gather_sum_prepared(static, w, b, nbrs)


@functools.partial(jax.jit, static_argnames=("num_sources", "block_sizes", "interpret"))
def scatter_sum(w: Float[Array, "N K H"], a: Float[Array, "N X H"], nbr_idx: Int[ArrayLike, "N K"],
                nbr_mask: Bool[ArrayLike, "N K"], *, num_sources: int,
                block_sizes: BlockSizes | None = None, interpret: bool = False
                ) -> Float[Array, "{num_sources} X H"]:
  """Transpose of gather_sum: out[j,x,h] = sum over valid (n,k) with idx[n,k]=j of w[n,k,h] a[n,x,h].

  Deterministic (a fixed summation order per source, no atomics).

  Args:
    w: per-edge weights.
    a: target rows.
    nbr_idx: source of each slot.
    nbr_mask: True on real edges.
    num_sources: M, the number of source rows of the output.
    block_sizes: kernel tiling; None picks ``BlockSizes.get_default(X, K, H)``.
    interpret: run the kernels in the Pallas interpreter.

  Returns:
    The sums in ``result_type(w, a)``; rows with no incoming edge are 0.

  Raises:
    ValueError: on inconsistent shapes or dtypes.
  """
  _check_float("w", w, 3)
  _check_float("a", a, 3)
  _check_heads(w.shape[2], ("a", a))
  check_neighbor_list(nbr_idx, nbr_mask, a.shape[0])
  if w.shape[:2] != nbr_idx.shape:
    raise ValueError(f"w must be [N, K, H] like nbr_idx; got {w.shape=}, {nbr_idx.shape=}")
  if num_sources < 1:
    raise ValueError(f"num_sources must be positive; got {num_sources}")
  nbrs = prepare_neighbors(nbr_idx, nbr_mask, num_sources)
  static = make_static(jnp.result_type(w, a), block_sizes, interpret, row_dim=a.shape[1],
                       num_slots=nbr_idx.shape[1], num_heads=w.shape[2], row_dtype=a.dtype)
  return scatter_sum_prepared(static, w, a, nbrs)


# --------------------------------------------------------------------------------- references


_HIGHEST = lax.Precision.HIGHEST


def edge_dot_reference(a: Float[Array, "N X H"], b: Float[Array, "M X H"],
                       nbr_idx: Int[ArrayLike, "N K"], nbr_mask: Bool[ArrayLike, "N K"], *,
                       block_sizes: BlockSizes | None = None, interpret: bool = False
                       ) -> Float[Array, "N K H"]:
  """Pure-jnp edge_dot (>= float32, materialises [N, K, X, H]); same signature as ``edge_dot``."""
  del block_sizes, interpret
  valid = valid_slots(nbr_idx, nbr_mask, b.shape[0])
  out = jnp.einsum("nxh,nkxh->nkh", upcast(a), gather_sources(b, nbr_idx, valid),
                   precision=_HIGHEST)
  return jnp.where(valid[..., None], out, 0).astype(jnp.result_type(a, b))


def gather_sum_reference(w: Float[Array, "N K H"], b: Float[Array, "M X H"],
                         nbr_idx: Int[ArrayLike, "N K"], nbr_mask: Bool[ArrayLike, "N K"], *,
                         block_sizes: BlockSizes | None = None, interpret: bool = False
                         ) -> Float[Array, "N X H"]:
  """Pure-jnp gather_sum (>= float32, materialises [N, K, X, H]); same signature as ``gather_sum``."""
  del block_sizes, interpret
  valid = valid_slots(nbr_idx, nbr_mask, b.shape[0])
  w32 = jnp.where(valid[..., None], upcast(w), 0)
  out = jnp.einsum("nkh,nkxh->nxh", w32, gather_sources(b, nbr_idx, valid), precision=_HIGHEST)
  return out.astype(jnp.result_type(w, b))


def scatter_sum_reference(w: Float[Array, "N K H"], a: Float[Array, "N X H"],
                          nbr_idx: Int[ArrayLike, "N K"], nbr_mask: Bool[ArrayLike, "N K"], *,
                          num_sources: int, block_sizes: BlockSizes | None = None,
                          interpret: bool = False) -> Float[Array, "{num_sources} X H"]:
  """Pure-jnp scatter_sum (segment sum of [N*K, X, H] edge terms); same signature."""
  del block_sizes, interpret
  valid = valid_slots(nbr_idx, nbr_mask, num_sources)
  w32 = jnp.where(valid[..., None], upcast(w), 0)
  terms = w32[:, :, None, :] * upcast(a)[:, None]  # [N, K, X, H]
  segments = jnp.where(valid, nbr_idx, num_sources).reshape(-1)
  out = jax.ops.segment_sum(terms.reshape(-1, *a.shape[1:]), segments,
                            num_segments=num_sources + 1)[:num_sources]
  return out.astype(jnp.result_type(w, a))
