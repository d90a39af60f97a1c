"""The per-edge radial MLP, fused: Gaussian basis, three products, two layer norms in one kernel.

For every slot (i, k) of a target atom i with source j = nbr_idx[i, k] and edge length d:

    h1 = SiLU(LN_0(rbf(d) W_rbf + b_rbf + target[i] + source[j]))
    h2 = SiLU(LN_1(h1 W_hid + b_hid))
    out[i, k] = h2 W_out + b_out

with rbf(d)_r = exp(-(d - mu_r)^2 / (2 sigma^2)), mu_r = r * cutoff / (R - 1), sigma = 2 cutoff /
(R - 1); ``target`` and ``source`` are the type terms of the first layer, computed per atom by the
caller; an out-of-range source (the sentinel) contributes zero. Optionally the output is contracted
with per-slot weights, ``sum_k w[i, k, m] out[i, k]``, inside the kernel.

The kernel runs one program per block of ``block_targets`` target atoms, i.e. ``block_targets *
K_pad`` edges at once: the basis is evaluated in registers ``rbf_chunk`` columns at a time and fed
to the first product, so neither the basis nor any hidden activation is ever written to memory;
only the output is. It is a forward kernel: its ``custom_vjp`` differentiates the reference
(:func:`radial_mlp_reference`), which a caller that needs derivatives with less memory replaces by
its own (the model's chunked MLP).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, ArrayLike, Float, Int

from pallas_kernels import _tiles

# Smallest tile edge of a Triton dot (tl.dot needs every operand dimension >= 16).
_MIN_DOT = 16


class RadialMLPWeights(NamedTuple):
  """Parameters of the MLP (kernels [in, out]; biases, scales [out])."""

  rbf_kernel: Float[Array, "R D"]
  rbf_bias: Float[Array, "D"]
  norm_0_scale: Float[Array, "D"]
  norm_0_bias: Float[Array, "D"]
  hidden_kernel: Float[Array, "D D"]
  hidden_bias: Float[Array, "D"]
  norm_1_scale: Float[Array, "D"]
  norm_1_bias: Float[Array, "D"]
  out_kernel: Float[Array, "D F"]
  out_bias: Float[Array, "F"]


@dataclasses.dataclass(frozen=True)
class RadialMLPBlocks:
  """Tiling of the kernel.

  Attributes:
    block_targets: target atoms per program (their K slots, padded to a power of two, are the rows
      of every product).
    rbf_chunk: basis columns evaluated and multiplied at a time (bounds the registers the basis
      takes).
    num_warps: Triton warps per program.
  """

  block_targets: int
  rbf_chunk: int = 64
  num_warps: int = 4

  def __post_init__(self):
    for name in ("block_targets", "rbf_chunk", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a positive power of two, got {value}")
    if self.rbf_chunk < _MIN_DOT:
      raise ValueError(f"rbf_chunk must be >= {_MIN_DOT} (a Triton dot's smallest tile)")

  @staticmethod
  def get_default(num_slots: int) -> "RadialMLPBlocks":
    """64 edge rows per program (at least one target atom's slots), 4 warps: at the paper's sizes
    (K = 32, hidden 128, 256 Gaussians and outputs, bfloat16) the fastest of the tilings measured
    on one H200 (docs/performance.md §6); 128 rows on 4 warps took 2.4x (gates) and 3.7x (slot
    weighted) as long, their float32 accumulators no longer fitting the registers."""
    return RadialMLPBlocks(block_targets=max(1, 64 // pl.next_power_of_2(num_slots)))


@dataclasses.dataclass(frozen=True)
class _Static:
  cutoff: float
  num_rbf: int
  eps: float
  out_blocks: tuple[int, ...]
  dtype: jnp.dtype  # of the products and of the output
  blocks: RadialMLPBlocks
  interpret: bool


def _pad(n: int) -> int:
  return max(_MIN_DOT, pl.next_power_of_2(n))


def _lanes(width: int) -> tuple[jax.Array, jax.Array | None]:
  """Columns 0..pad-1 of a width-``width`` axis and their in-range mask (None: all in range)."""
  cols = _tiles.iota((_pad(width),), 0)
  return cols, (None if _pad(width) == width else cols < width)


def _layer_norm_silu(h, scale, bias, col_mask, width: int, eps: float):
  """SiLU(LayerNorm(h)) over the last axis (``width`` real lanes of h's padded ones), float32."""
  if col_mask is not None:
    h = jnp.where(col_mask[None], h, 0.0)
  mean = jnp.sum(h, axis=1) / width
  x = h - mean[:, None]
  if col_mask is not None:
    x = jnp.where(col_mask[None], x, 0.0)
  var = jnp.sum(x * x, axis=1) / width
  y = x * lax.rsqrt(var + eps)[:, None] * scale[None] + bias[None]
  return y / (1.0 + jnp.exp(-y))


def _kernel(distances_ref, nbr_ref, target_ref, source_ref, *refs, static: _Static,
            num_slots: int, num_slot_weights: int | None):
  (rbf_kernel, rbf_bias, scale_0, bias_0, hidden_kernel, hidden_bias, scale_1, bias_1, out_kernel,
   out_bias) = refs[:10]
  refs = refs[10:]
  slot_weights_ref = refs[0] if num_slot_weights is not None else None
  out_refs = refs[1:] if num_slot_weights is not None else refs
  num_targets = target_ref.shape[0]
  num_sources = source_ref.shape[0]
  hidden = target_ref.shape[1]
  blocks = static.blocks
  k_pad = pl.next_power_of_2(num_slots)
  rows = blocks.block_targets * k_pad
  dtype = static.dtype

  # Edge rows of this program: target t = first + p // K_pad, slot k = p % K_pad.
  p = _tiles.iota((rows,), 0)
  targets = pl.program_id(0) * blocks.block_targets + p // k_pad
  slots = p % k_pad
  valid = (targets < num_targets) & (slots < num_slots)
  # Masked lanes get an address past the end: never dereferenced by Triton, and dropped by the
  # interpreter's scatter (an in-range placeholder would race with a real lane's store there).
  edges = jnp.where(valid, targets * num_slots + slots, num_targets * num_slots)
  safe_targets = jnp.where(valid, targets, 0)
  distances = _tiles._load(distances_ref, (edges,), valid).astype(jnp.float32)  # [E]
  sources = _tiles._load(nbr_ref, (edges,), valid)
  has_source = valid & (sources >= 0) & (sources < num_sources)
  sources = jnp.where(has_source, sources, 0)

  cols, col_mask = _lanes(hidden)

  def vector(ref, cols, col_mask):
    return _tiles._load(ref, (cols,), col_mask).astype(jnp.float32)

  def matrix(ref, row_start, num_rows, row_pad, cols, col_mask):
    """ref[row_start : row_start + num_rows, cols], rows padded to row_pad, in the products'
    dtype."""
    r = row_start + _tiles.iota((row_pad,), 0)
    r_mask = None if row_pad == num_rows else r < row_start + num_rows
    return _tiles.load_matrix(ref, r, r_mask, cols, col_mask).astype(dtype)

  # Layer 0: the basis chunk by chunk into the first product, then the type terms.
  spacing = static.cutoff / (static.num_rbf - 1)
  inv_two_var = 1.0 / (2.0 * (2.0 * spacing) ** 2)
  chunk = min(blocks.rbf_chunk, _pad(static.num_rbf))
  h = jnp.zeros((rows, _pad(hidden)), jnp.float32)
  for start in range(0, static.num_rbf, chunk):
    width = min(chunk, static.num_rbf - start)
    r = _tiles.iota((chunk,), 0)
    centres = (start + r).astype(jnp.float32) * spacing
    basis = jnp.exp(-jnp.square(distances[:, None] - centres[None]) * inv_two_var)  # [E, chunk]
    if width < chunk:
      basis = jnp.where((r < width)[None], basis, 0.0)
    w = matrix(rbf_kernel, start, width, chunk, cols, col_mask)
    h += jnp.dot(basis.astype(dtype), w, preferred_element_type=jnp.float32)
  h += vector(rbf_bias, cols, col_mask)[None]
  h += _tiles.load_matrix(target_ref, safe_targets, valid, cols, col_mask).astype(jnp.float32)
  h += _tiles.load_matrix(source_ref, sources, has_source, cols, col_mask).astype(jnp.float32)
  h = _layer_norm_silu(h, vector(scale_0, cols, col_mask), vector(bias_0, cols, col_mask),
                       col_mask, hidden, static.eps)

  # Layer 1.
  h = jnp.dot(h.astype(dtype), matrix(hidden_kernel, 0, hidden, _pad(hidden), cols, col_mask),
              preferred_element_type=jnp.float32)
  h += vector(hidden_bias, cols, col_mask)[None]
  h = _layer_norm_silu(h, vector(scale_1, cols, col_mask), vector(bias_1, cols, col_mask),
                       col_mask, hidden, static.eps).astype(dtype)

  if num_slot_weights is not None:
    # S[(b, m), p] = w[t_b, k_p, m] where p is a slot of target b: the slot contraction as one
    # product [B * M_pad, E] x [E, F] per output block.
    m_pad = max(pl.next_power_of_2(num_slot_weights), _MIN_DOT // blocks.block_targets)
    s_shape = (blocks.block_targets * m_pad, rows)
    row = _tiles.iota(s_shape, 0)
    col_target = lax.broadcast_in_dim(targets, s_shape, (1,))
    m = row % m_pad
    s_mask = (lax.broadcast_in_dim(valid, s_shape, (1,)) & (m < num_slot_weights)
              & (pl.program_id(0) * blocks.block_targets + row // m_pad == col_target))
    s_idx = (jnp.where(s_mask, col_target, 0),
             jnp.where(s_mask, lax.broadcast_in_dim(slots, s_shape, (1,)), 0),
             jnp.where(s_mask, m, 0))
    contraction = _tiles._load(slot_weights_ref, s_idx, s_mask).astype(jnp.float32)
    out_targets = pl.program_id(0) * blocks.block_targets + _tiles.iota((s_shape[0],), 0) // m_pad
    out_m = _tiles.iota((s_shape[0],), 0) % m_pad
    out_valid = (out_targets < num_targets) & (out_m < num_slot_weights)

  start = 0
  for out_ref, width in zip(out_refs, static.out_blocks, strict=True):
    out_cols, out_mask = _lanes(width)
    w = _tiles.load_matrix(out_kernel, cols, col_mask, start + out_cols, out_mask).astype(dtype)
    y = jnp.dot(h, w, preferred_element_type=jnp.float32)
    y += _tiles._load(out_bias, (start + out_cols,), out_mask).astype(jnp.float32)[None]
    if num_slot_weights is None:
      _tiles.store_matrix(out_ref, edges, valid, out_cols, out_mask, y)
    else:
      # The reference contracts the output in the products' dtype; so does this.
      y = jnp.dot(contraction, y.astype(dtype).astype(jnp.float32),
                  preferred_element_type=jnp.float32)
      flat = jnp.where(out_valid, out_targets * num_slot_weights + out_m,
                       num_targets * num_slot_weights)
      _tiles.store_matrix(out_ref, flat, out_valid, out_cols, out_mask, y)
    start += width


def _forward_call(static: _Static, distances, target, source, nbr_idx, slot_weights,
                  weights: RadialMLPWeights):
  num_targets, num_slots = distances.shape
  kernel_weights = weights._replace(rbf_kernel=weights.rbf_kernel.astype(static.dtype),
                                    hidden_kernel=weights.hidden_kernel.astype(static.dtype),
                                    out_kernel=weights.out_kernel.astype(static.dtype))
  if slot_weights is None:
    out_rows, out_dtype, extra = num_targets * num_slots, static.dtype, ()
  else:
    num_weights = slot_weights.shape[-1]
    out_rows = num_targets * num_weights
    out_dtype = jnp.promote_types(slot_weights.dtype, static.dtype)
    extra = (slot_weights,)
  outputs = pl.pallas_call(
      functools.partial(_kernel, static=static, num_slots=num_slots,
                        num_slot_weights=None if slot_weights is None else slot_weights.shape[-1]),
      out_shape=tuple(jax.ShapeDtypeStruct((out_rows, w), out_dtype) for w in static.out_blocks),
      grid=(pl.cdiv(num_targets, static.blocks.block_targets),),
      compiler_params=plt.CompilerParams(num_warps=static.blocks.num_warps, num_stages=1),
      interpret=static.interpret,
      name="radial_mlp_fwd",
  )(distances.reshape(-1), nbr_idx.reshape(-1).astype(jnp.int32), target, source, *kernel_weights,
    *extra)
  return tuple(o.reshape(num_targets, -1, o.shape[-1]) for o in outputs)


def _reference(static: _Static, distances, target, source, nbr_idx, slot_weights,
               weights: RadialMLPWeights) -> tuple[jax.Array, ...]:
  """The MLP in jnp: products in static.dtype, layer norms in float32 (the model's semantics)."""
  dtype = static.dtype
  spacing = static.cutoff / (static.num_rbf - 1)
  centres = jnp.arange(static.num_rbf, dtype=jnp.float32) * spacing
  basis = jnp.exp(-jnp.square(distances.astype(jnp.float32)[..., None] - centres)
                  / (2.0 * (2.0 * spacing) ** 2))  # [N, K, R]

  def dense(x, kernel, bias):
    return (x.astype(dtype) @ kernel.astype(dtype) + bias.astype(dtype))

  def layer_norm_silu(x, scale, bias):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return jax.nn.silu((x - mean) * lax.rsqrt(var + static.eps) * scale + bias)

  sources = jnp.take(source, nbr_idx, axis=0, mode="fill", fill_value=0)  # [N, K, D]
  h = (dense(basis, weights.rbf_kernel, weights.rbf_bias) + target.astype(dtype)[:, None]
       + sources.astype(dtype))
  h = layer_norm_silu(h, weights.norm_0_scale, weights.norm_0_bias)
  h = layer_norm_silu(dense(h, weights.hidden_kernel, weights.hidden_bias), weights.norm_1_scale,
                      weights.norm_1_bias)
  out = dense(h, weights.out_kernel, weights.out_bias)  # [N, K, F]
  bounds = np.cumsum((0,) + static.out_blocks)
  blocks = tuple(out[..., a:b] for a, b in zip(bounds[:-1], bounds[1:]))
  if slot_weights is None:
    return blocks
  return tuple(jnp.einsum("nkm,nkf->nmf", slot_weights, b) for b in blocks)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _radial_mlp(static, distances, target, source, nbr_idx, slot_weights, weights):
  return _forward_call(static, distances, target, source, nbr_idx, slot_weights, weights)


def _radial_mlp_fwd(static, distances, target, source, nbr_idx, slot_weights, weights):
  out, vjp = jax.vjp(lambda d, t, s, w, p: _reference(static, d, t, s, nbr_idx, w, p),
                     distances, target, source, slot_weights, weights)
  return out, vjp


def _radial_mlp_bwd(static, vjp, cotangents):
  d_distances, d_target, d_source, d_slot_weights, d_weights = vjp(cotangents)
  return d_distances, d_target, d_source, None, d_slot_weights, d_weights


_radial_mlp.defvjp(_radial_mlp_fwd, _radial_mlp_bwd)


def _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret, num_slots):
  out_width = weights.out_kernel.shape[1]
  out_blocks = (out_width,) if out_blocks is None else tuple(out_blocks)
  if sum(out_blocks) != out_width:
    raise ValueError(f"out_blocks {out_blocks} must sum to the output width {out_width}")
  if num_rbf < 2 or weights.rbf_kernel.shape[0] != num_rbf:
    raise ValueError(f"num_rbf = {num_rbf} must be >= 2 and match rbf_kernel "
                     f"{weights.rbf_kernel.shape}")
  blocks = blocks or RadialMLPBlocks.get_default(num_slots)
  if blocks.block_targets * pl.next_power_of_2(num_slots) < _MIN_DOT:
    raise ValueError(f"{blocks} gives fewer than {_MIN_DOT} edge rows per program")
  return _Static(float(cutoff), int(num_rbf), float(eps), out_blocks,
                 jnp.dtype(dtype or jnp.float32), blocks, bool(interpret))


def radial_mlp(distances: Float[Array, "N K"], target: Float[Array, "N D"],
               source: Float[Array, "M D"], nbr_idx: Int[ArrayLike, "N K"],
               slot_weights: Float[Array, "N K W"] | None = None, *, weights: RadialMLPWeights,
               cutoff: float, num_rbf: int, eps: float, out_blocks: tuple[int, ...] | None = None,
               dtype=None, blocks: RadialMLPBlocks | None = None, interpret: bool = False
               ) -> tuple[Float[Array, "N _ _"], ...]:
  """The radial MLP of every slot (see the module docstring), fused.

  Args:
    distances: edge length of every slot (any finite value on empty slots).
    target: type term of the first layer per target atom. source: per source atom.
    nbr_idx: source of each slot; indices outside [0, M) (the sentinel M) add no source term.
    slot_weights: optional weights to contract the output with over the slots.
    weights: the parameters.
    cutoff, num_rbf: the Gaussian basis on [0, cutoff]. eps: of both layer norms.
    out_blocks: widths of the output's column blocks (None: one block of all F columns).
    dtype: of the products (float32 accumulation) and the output; None: float32.
    blocks: tiling (None: :meth:`RadialMLPBlocks.get_default`).
    interpret: run in the Pallas interpreter (CPU testing).
  Returns:
    One array per output block: [N, K, F_b], or with ``slot_weights`` [N, W, F_b] (in the
    promoted dtype of slot_weights and ``dtype``).
  """
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _radial_mlp(static, distances, target, source, nbr_idx, slot_weights, weights)


def radial_mlp_reference(distances: Float[Array, "N K"], target: Float[Array, "N D"],
                         source: Float[Array, "M D"], nbr_idx: Int[ArrayLike, "N K"],
                         slot_weights: Float[Array, "N K W"] | None = None, *,
                         weights: RadialMLPWeights, cutoff: float, num_rbf: int, eps: float,
                         out_blocks: tuple[int, ...] | None = None, dtype=None,
                         blocks: RadialMLPBlocks | None = None, interpret: bool = False
                         ) -> tuple[Float[Array, "N _ _"], ...]:
  """Pure-jnp :func:`radial_mlp`: materialises the basis and the hidden activations."""
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _reference(static, distances, target, source, nbr_idx, slot_weights, weights)
