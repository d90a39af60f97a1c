"""The per-edge radial MLP, fused: Gaussian basis, three products, two layer norms in one kernel.

For every slot (i, k) of a target atom i with source j = nbr_idx[i, k] and edge length d:

    h1 = SiLU(LN_0(rbf(d) W_rbf + b_rbf + target[i] + source[j]))
    h2 = SiLU(LN_1(h1 W_hid + b_hid))
    out[i, k] = h2 W_out + b_out

with rbf(d)_r = exp(-(d - mu_r)^2 / (2 sigma^2)), mu_r = r * cutoff / (R - 1), sigma = 2 cutoff /
(R - 1); ``target`` and ``source`` are the type terms of the first layer, computed per atom by the
caller; an out-of-range source (the sentinel) contributes zero. Optionally the output is contracted
with per-slot weights, ``sum_k w[i, k, m] out[i, k]``, inside the kernel.

Each kernel runs one program per block of ``block_targets`` target atoms, i.e. ``block_targets *
K_pad`` edges at once: the basis is evaluated in registers ``rbf_chunk`` columns at a time and fed
to the first product, so neither the basis nor any hidden activation is ever written to memory;
only the output is. The first derivative keeps only the inputs: a second kernel
(:func:`radial_mlp_geometry_vjp`) recomputes the forward in registers and takes the output's
cotangent back to the edge lengths and slot weights, the inputs that depend on positions, so
energy + forces hold nothing per edge but those. The cotangents of the type terms and parameters
come from autodiff of the reference (:func:`radial_mlp_reference`), as does every second
derivative (training on forces).
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
from jax.typing import DTypeLike
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
    """The forward kernel's: 64 edge rows per program (at least one target atom's slots), 4 warps:
    at the paper's sizes (K = 32, hidden 128, 256 Gaussians and outputs, bfloat16) the fastest
    forward of the tilings measured on one H200 (docs/performance.md §6); 128 rows on 4 warps took
    2.4x (gates) and 3.7x (slot weighted) as long, probably spilling their float32 accumulators."""
    return RadialMLPBlocks(block_targets=max(1, 64 // pl.next_power_of_2(num_slots)))

  @staticmethod
  def get_default_backward(num_slots: int) -> "RadialMLPBlocks":
    """The geometry VJP kernel's: 32 edge rows per program, 8 warps. At the paper's sizes on one
    H100 (docs/performance.md §6) it took 1.14 ms (gates) and 1.77 ms (slot weighted) where the
    forward's tiling took 4.13 and 5.46 ms; 32 rows on 4 warps took 1.82 and 4.40 ms, and 64 rows
    on 8 warps 2.34 and 5.15 ms. The backward holds more float32 values per row than the forward
    (the recomputed activations and their cotangents)."""
    return RadialMLPBlocks(block_targets=max(1, 32 // pl.next_power_of_2(num_slots)), num_warps=8)


@dataclasses.dataclass(frozen=True)
class _Static:
  cutoff: float
  num_rbf: int
  eps: float
  out_blocks: tuple[int, ...]
  dtype: jnp.dtype  # of the products and of the output
  blocks: RadialMLPBlocks  # the tiling of the kernel being called
  backward_blocks: RadialMLPBlocks  # the geometry VJP kernel's, which its call makes `blocks`
  interpret: bool


def _pad(n: int) -> int:
  return max(_MIN_DOT, pl.next_power_of_2(n))


def _lanes(width: int) -> tuple[jax.Array, jax.Array | None]:
  """Columns 0..pad-1 of a width-``width`` axis and their in-range mask (None: all in range)."""
  cols = _tiles.iota((_pad(width),), 0)
  return cols, (None if _pad(width) == width else cols < width)


def _silu(z):
  return z / (1.0 + jnp.exp(-z))


def _silu_grad(z):
  sigmoid = 1.0 / (1.0 + jnp.exp(-z))
  return sigmoid * (1.0 + z * (1.0 - sigmoid))


def _row_mean(x, width: int):
  return jnp.sum(x, axis=1) / width


def _layer_norm(h, col_mask, width: int, eps: float):
  """(h - mean) / std over the last axis (``width`` real lanes of h's padded ones) and 1 / std:
  float32 [E, pad], zero on padded lanes, and [E]."""
  if col_mask is not None:
    h = jnp.where(col_mask[None], h, 0.0)
  x = h - _row_mean(h, width)[:, None]
  if col_mask is not None:
    x = jnp.where(col_mask[None], x, 0.0)
  inv_std = lax.rsqrt(_row_mean(x * x, width) + eps)
  return x * inv_std[:, None], inv_std


def _layer_norm_vjp(dz, normalised, inv_std, scale, width: int):
  """Cotangent of the layer norm's input from that of its output n * scale + bias."""
  dn = dz * scale[None]
  return inv_std[:, None] * (dn - _row_mean(dn, width)[:, None]
                             - normalised * _row_mean(dn * normalised, width)[:, None])


class _Tile(NamedTuple):
  """The edge rows of one program: target t = first + p // K_pad, slot k = p % K_pad."""

  first: jax.Array  # first target atom of the program
  targets: jax.Array  # [E]
  slots: jax.Array  # [E]
  valid: jax.Array  # [E] a real (target, slot)
  edges: jax.Array  # [E] flat slot index t K + k; past the end on invalid rows


def _tile(block_targets: int, num_targets: int, num_slots: int) -> _Tile:
  k_pad = pl.next_power_of_2(num_slots)
  p = _tiles.iota((block_targets * k_pad,), 0)
  first = pl.program_id(0) * block_targets
  targets = first + p // k_pad
  slots = p % k_pad
  valid = (targets < num_targets) & (slots < num_slots)
  # Masked lanes get an address past the end: never dereferenced by Triton, and dropped by the
  # interpreter's scatter (an in-range placeholder would race with a real lane's store there).
  edges = jnp.where(valid, targets * num_slots + slots, num_targets * num_slots)
  return _Tile(first, targets, slots, valid, edges)


class _Weights(NamedTuple):
  """In-kernel loaders of the parameter refs (RadialMLPWeights order)."""

  refs: tuple
  hidden: int
  dtype: jnp.dtype

  def lanes(self):
    return _lanes(self.hidden)

  def vector(self, index: int) -> jax.Array:
    """A [hidden] bias or scale, float32 [pad]."""
    cols, col_mask = self.lanes()
    return _tiles._load(self.refs[index], (cols,), col_mask).astype(jnp.float32)

  def rows(self, index: int, start: int, num_rows: int, row_pad: int) -> jax.Array:
    """Rows start .. start + num_rows (padded to row_pad) of a [., hidden] kernel, in the products'
    dtype."""
    cols, col_mask = self.lanes()
    r = start + _tiles.iota((row_pad,), 0)
    r_mask = None if row_pad == num_rows else r < start + num_rows
    return _tiles.load_matrix(self.refs[index], r, r_mask, cols, col_mask).astype(self.dtype)

  def out_block(self, start: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Columns start .. start + width of the output layer: kernel [hidden pad, pad] in the
    products' dtype and bias float32 [pad]."""
    cols, col_mask = self.lanes()
    out_cols, out_mask = _lanes(width)
    kernel = _tiles.load_matrix(self.refs[8], cols, col_mask, start + out_cols, out_mask)
    bias = _tiles._load(self.refs[9], (start + out_cols,), out_mask)
    return kernel.astype(self.dtype), bias.astype(jnp.float32)


def _basis_chunks(static: _Static, distances):
  """(start, basis chunk [E, chunk] float32 (0 on columns >= num_rbf), d basis / d distance)."""
  spacing = static.cutoff / (static.num_rbf - 1)
  inv_two_var = 1.0 / (2.0 * (2.0 * spacing) ** 2)
  chunk = min(static.blocks.rbf_chunk, _pad(static.num_rbf))
  r = _tiles.iota((chunk,), 0)
  for start in range(0, static.num_rbf, chunk):
    offset = distances[:, None] - ((start + r).astype(jnp.float32) * spacing)[None]
    basis = jnp.exp(-jnp.square(offset) * inv_two_var)  # [E, chunk]
    if static.num_rbf - start < chunk:
      basis = jnp.where((r < static.num_rbf - start)[None], basis, 0.0)
    yield start, chunk, basis, basis * (-2.0 * inv_two_var) * offset


def _hidden_layers(static: _Static, tile: _Tile, w: _Weights, distances, target_ref, source_ref,
                   nbr_ref):
  """The two hidden layers of the tile's edges: h2 in the products' dtype [E, hidden pad] and the
  layer norms' (normalised input, 1 / std) for a backward pass."""
  cols, col_mask = w.lanes()
  hidden, dtype = w.hidden, w.dtype
  num_sources = source_ref.shape[0]
  sources = _tiles._load(nbr_ref, (tile.edges,), tile.valid)
  has_source = tile.valid & (sources >= 0) & (sources < num_sources)
  sources = jnp.where(has_source, sources, 0)
  # Layer 0: the basis chunk by chunk into the first product, then the type terms.
  h = jnp.zeros((tile.edges.shape[0], _pad(hidden)), jnp.float32)
  for start, chunk, basis, _ in _basis_chunks(static, distances):
    width = min(chunk, static.num_rbf - start)
    h += jnp.dot(basis.astype(dtype), w.rows(0, start, width, chunk),
                 preferred_element_type=jnp.float32)
  h += w.vector(1)[None]
  h += _tiles.load_matrix(target_ref, jnp.where(tile.valid, tile.targets, 0), tile.valid, cols,
                          col_mask).astype(jnp.float32)
  h += _tiles.load_matrix(source_ref, sources, has_source, cols, col_mask).astype(jnp.float32)
  n0, inv_std_0 = _layer_norm(h, col_mask, hidden, static.eps)
  h = _silu(n0 * w.vector(2)[None] + w.vector(3)[None])
  # Layer 1.
  h = jnp.dot(h.astype(dtype), w.rows(4, 0, hidden, _pad(hidden)),
              preferred_element_type=jnp.float32) + w.vector(5)[None]
  n1, inv_std_1 = _layer_norm(h, col_mask, hidden, static.eps)
  h = _silu(n1 * w.vector(6)[None] + w.vector(7)[None]).astype(dtype)
  return h, (n0, inv_std_0, n1, inv_std_1)


class _SlotContraction(NamedTuple):
  """The contraction over the slots of a tile's B target atoms as products: rows (b, m) of the
  [N W, F] output (or its cotangent) against the tile's edge rows."""

  weights: jax.Array  # [B M_pad, E]: w[t_b, k_p, m] where edge p is a slot of target b, else 0
  rows: jax.Array  # [B M_pad] flat output row t W + m (past the end where invalid)
  valid: jax.Array  # [B M_pad]
  m_pad: int


def _slot_contraction(static: _Static, tile: _Tile, slot_weights_ref, num_targets: int
                      ) -> _SlotContraction:
  num_weights = slot_weights_ref.shape[-1]
  block_targets = static.blocks.block_targets
  m_pad = max(pl.next_power_of_2(num_weights), _MIN_DOT // block_targets)
  shape = (block_targets * m_pad, tile.edges.shape[0])
  row = _tiles.iota(shape, 0)
  col_target = lax.broadcast_in_dim(tile.targets, shape, (1,))
  m = row % m_pad
  mask = (lax.broadcast_in_dim(tile.valid, shape, (1,)) & (m < num_weights)
          & (tile.first + row // m_pad == col_target))
  indices = (jnp.where(mask, col_target, 0),
             jnp.where(mask, lax.broadcast_in_dim(tile.slots, shape, (1,)), 0),
             jnp.where(mask, m, 0))
  weights = _tiles._load(slot_weights_ref, indices, mask).astype(jnp.float32)
  out_row = _tiles.iota((shape[0],), 0)
  out_targets = tile.first + out_row // m_pad
  out_m = out_row % m_pad
  valid = (out_targets < num_targets) & (out_m < num_weights)
  rows = jnp.where(valid, out_targets * num_weights + out_m, num_targets * num_weights)
  return _SlotContraction(weights, rows, valid, m_pad)


def _split_refs(refs, contracted: bool):
  """(weights, slot_weights_ref or None, the remaining refs)."""
  weights = refs[:len(RadialMLPWeights._fields)]
  refs = refs[len(weights):]
  slot_weights_ref = refs[0] if contracted else None
  return weights, slot_weights_ref, refs[1:] if contracted else refs


def _forward_kernel(distances_ref, nbr_ref, target_ref, source_ref, *refs, static: _Static,
                    num_slots: int, contracted: bool):
  weight_refs, slot_weights_ref, out_refs = _split_refs(refs, contracted)
  num_targets = target_ref.shape[0]
  w = _Weights(weight_refs, target_ref.shape[1], static.dtype)
  tile = _tile(static.blocks.block_targets, num_targets, num_slots)
  distances = _tiles._load(distances_ref, (tile.edges,), tile.valid).astype(jnp.float32)
  h, _ = _hidden_layers(static, tile, w, distances, target_ref, source_ref, nbr_ref)
  if contracted:
    contraction = _slot_contraction(static, tile, slot_weights_ref, num_targets)
  start = 0
  for out_ref, width in zip(out_refs, static.out_blocks, strict=True):
    out_cols, out_mask = _lanes(width)
    kernel, bias = w.out_block(start, width)
    y = jnp.dot(h, kernel, preferred_element_type=jnp.float32) + bias[None]
    if not contracted:
      _tiles.store_matrix(out_ref, tile.edges, tile.valid, out_cols, out_mask, y)
    else:
      # The reference contracts the output in the products' dtype; so does this.
      y = jnp.dot(contraction.weights, y.astype(w.dtype).astype(jnp.float32),
                  preferred_element_type=jnp.float32)
      _tiles.store_matrix(out_ref, contraction.rows, contraction.valid, out_cols, out_mask, y)
    start += width


def _geometry_vjp_kernel(distances_ref, nbr_ref, target_ref, source_ref, *refs, static: _Static,
                         num_slots: int, contracted: bool):
  """d distances [N K] and, with slot weights, d slot_weights [N K, W] for the output cotangents
  (one ref per output block): the forward recomputed in registers, then taken back through the
  output layer, both layer norms and the basis."""
  weight_refs, slot_weights_ref, refs = _split_refs(refs, contracted)
  num_blocks = len(static.out_blocks)
  cotangent_refs, (d_distances_ref, *d_slot_weights_ref) = refs[:num_blocks], refs[num_blocks:]
  num_targets = target_ref.shape[0]
  hidden = target_ref.shape[1]
  w = _Weights(weight_refs, hidden, static.dtype)
  tile = _tile(static.blocks.block_targets, num_targets, num_slots)
  distances = _tiles._load(distances_ref, (tile.edges,), tile.valid).astype(jnp.float32)
  h, (n0, inv_std_0, n1, inv_std_1) = _hidden_layers(static, tile, w, distances, target_ref,
                                                      source_ref, nbr_ref)
  contract = (((1,), (1,)), ((), ()))  # x y^T
  if contracted:
    contraction = _slot_contraction(static, tile, slot_weights_ref, num_targets)
    num_weights = slot_weights_ref.shape[-1]
    d_slot_weights = [jnp.zeros(tile.edges.shape, jnp.float32) for _ in range(num_weights)]
    # Column c of a [E, B M_pad] product is output row (b, m) = divmod(c, M_pad) of the tile.
    columns = _tiles.iota((tile.edges.shape[0], contraction.weights.shape[0]), 1)
    local = lax.broadcast_in_dim(tile.targets - tile.first, columns.shape, (0,))
  dh = jnp.zeros(h.shape, jnp.float32)
  start = 0
  for g_ref, width in zip(cotangent_refs, static.out_blocks, strict=True):
    out_cols, out_mask = _lanes(width)
    kernel, bias = w.out_block(start, width)
    if not contracted:
      dy = _tiles.load_matrix(g_ref, tile.edges, tile.valid, out_cols, out_mask)
      dy = dy.astype(jnp.float32)
    else:
      g = _tiles.load_matrix(g_ref, contraction.rows, contraction.valid, out_cols, out_mask)
      g = g.astype(jnp.float32)  # [B M_pad, F pad]
      dy = lax.dot_general(contraction.weights, g, (((0,), (0,)), ((), ())),
                           preferred_element_type=jnp.float32)  # [E, F pad]
      y = jnp.dot(h, kernel, preferred_element_type=jnp.float32) + bias[None]
      y = y.astype(w.dtype).astype(jnp.float32)
      per_row = lax.dot_general(y, g, contract, preferred_element_type=jnp.float32)
      for m in range(num_weights):
        pick = columns == local * contraction.m_pad + m
        d_slot_weights[m] += jnp.sum(jnp.where(pick, per_row, 0.0), axis=1)
    dh += lax.dot_general(dy.astype(w.dtype), kernel, contract, preferred_element_type=jnp.float32)
    start += width
  # Back through layer 1 and layer 0 to the basis.
  z = n1 * w.vector(6)[None] + w.vector(7)[None]
  da = _layer_norm_vjp(dh * _silu_grad(z), n1, inv_std_1, w.vector(6), hidden)
  dh = lax.dot_general(da.astype(w.dtype), w.rows(4, 0, hidden, _pad(hidden)), contract,
                       preferred_element_type=jnp.float32)
  z = n0 * w.vector(2)[None] + w.vector(3)[None]
  da = _layer_norm_vjp(dh * _silu_grad(z), n0, inv_std_0, w.vector(2), hidden).astype(w.dtype)
  d_distances = jnp.zeros(tile.edges.shape, jnp.float32)
  for start, chunk, _, d_basis in _basis_chunks(static, distances):
    width = min(chunk, static.num_rbf - start)
    d_rows = lax.dot_general(da, w.rows(0, start, width, chunk), contract,
                             preferred_element_type=jnp.float32)  # [E, chunk]
    d_distances += jnp.sum(d_rows * d_basis, axis=1)
  _tiles._store(d_distances_ref, (tile.edges,), d_distances, tile.valid)
  if contracted:
    for m, value in enumerate(d_slot_weights):
      _tiles._store(d_slot_weights_ref[0], (tile.edges, jnp.full(tile.edges.shape, m, jnp.int32)),
                    value, tile.valid)


def _kernel_inputs(static: _Static, distances, target, source, nbr_idx, slot_weights,
                   weights: RadialMLPWeights) -> tuple[jax.Array, ...]:
  kernels = {name: getattr(weights, name).astype(static.dtype)
             for name in ("rbf_kernel", "hidden_kernel", "out_kernel")}
  return (distances.reshape(-1), nbr_idx.reshape(-1).astype(jnp.int32), target, source,
          *weights._replace(**kernels), *(() if slot_weights is None else (slot_weights,)))


def _call(kernel, static: _Static, name: str, inputs, out_shape, num_slots: int, contracted: bool):
  num_targets = inputs[2].shape[0]
  return pl.pallas_call(
      functools.partial(kernel, static=static, num_slots=num_slots, contracted=contracted),
      out_shape=out_shape,
      grid=(pl.cdiv(num_targets, static.blocks.block_targets),),
      compiler_params=plt.CompilerParams(num_warps=static.blocks.num_warps, num_stages=1),
      interpret=static.interpret,
      name=name,
  )(*inputs)


def _forward_call(static: _Static, distances, target, source, nbr_idx, slot_weights,
                  weights: RadialMLPWeights):
  num_targets, num_slots = distances.shape
  if slot_weights is None:
    out_rows, out_dtype = num_targets * num_slots, static.dtype
  else:
    out_rows = num_targets * slot_weights.shape[-1]
    out_dtype = jnp.promote_types(slot_weights.dtype, static.dtype)
  outputs = _call(
      _forward_kernel, static, "radial_mlp_fwd",
      _kernel_inputs(static, distances, target, source, nbr_idx, slot_weights, weights),
      tuple(jax.ShapeDtypeStruct((out_rows, w), out_dtype) for w in static.out_blocks), num_slots,
      slot_weights is not None)
  return tuple(o.reshape(num_targets, -1, o.shape[-1]) for o in outputs)


def _geometry_vjp_call(static: _Static, distances, target, source, nbr_idx, slot_weights,
                       weights: RadialMLPWeights, cotangents):
  static = dataclasses.replace(static, blocks=static.backward_blocks)
  num_targets, num_slots = distances.shape
  out_shape = [jax.ShapeDtypeStruct((num_targets * num_slots,), distances.dtype)]
  if slot_weights is not None:
    out_shape.append(jax.ShapeDtypeStruct((num_targets * num_slots, slot_weights.shape[-1]),
                                          slot_weights.dtype))
  inputs = _kernel_inputs(static, distances, target, source, nbr_idx, slot_weights, weights)
  cotangents = tuple(g.reshape(-1, g.shape[-1]) for g in cotangents)
  outputs = _call(_geometry_vjp_kernel, static, "radial_mlp_geometry_vjp", inputs + cotangents,
                  tuple(out_shape), num_slots, slot_weights is not None)
  d_distances = outputs[0].reshape(num_targets, num_slots)
  if slot_weights is None:
    return d_distances, None
  return d_distances, outputs[1].reshape(slot_weights.shape)


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


def _reference_vjp(static: _Static, distances, target, source, nbr_idx, slot_weights, weights,
                   cotangents):
  """Cotangents of (distances, target, source, slot_weights, weights) by autodiff of the
  reference."""
  _, vjp = jax.vjp(lambda d, t, s, p, w: _reference(static, d, t, s, nbr_idx, p, w),
                   distances, target, source, slot_weights, weights)
  return vjp(tuple(cotangents))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _radial_mlp(static, distances, target, source, nbr_idx, slot_weights, weights):
  return _forward_call(static, distances, target, source, nbr_idx, slot_weights, weights)


def _radial_mlp_fwd(static, distances, target, source, nbr_idx, slot_weights, weights):
  # Through the custom_vjp, so that an outer derivative of the output stays on these rules; only
  # the inputs are kept: the backward recomputes what it needs.
  out = _radial_mlp(static, distances, target, source, nbr_idx, slot_weights, weights)
  return out, (distances, target, source, nbr_idx, slot_weights, weights)


def _radial_mlp_bwd(static, residuals, cotangents):
  distances, target, source, nbr_idx, slot_weights, weights = residuals
  d_distances, d_target, d_source, d_slot_weights, d_weights = _radial_mlp_vjp(
      static, distances, target, source, nbr_idx, slot_weights, weights, tuple(cotangents))
  return d_distances, d_target, d_source, None, d_slot_weights, d_weights


_radial_mlp.defvjp(_radial_mlp_fwd, _radial_mlp_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _radial_mlp_vjp(static, distances, target, source, nbr_idx, slot_weights, weights, cotangents):
  """The first derivative: the geometric cotangents (edge lengths, slot weights: what forces
  need) from the fused kernel; those of the type terms and parameters from the reference's VJP,
  which XLA drops when they are unused (forces). Differentiated again (training on forces), the
  reference's VJP runs instead, once."""
  _, d_target, d_source, _, d_weights = _reference_vjp(
      static, distances, target, source, nbr_idx, slot_weights, weights, cotangents)
  d_distances, d_slot_weights = _geometry_vjp_call(static, distances, target, source, nbr_idx,
                                                   slot_weights, weights, cotangents)
  return d_distances, d_target, d_source, d_slot_weights, d_weights


def _autodiff_fwd(fn):
  """Forward rule of a custom VJP over (static, distances, target, source, nbr_idx, slot_weights,
  weights, cotangents) whose derivative is the autodiff of ``fn`` (same arguments)."""
  def fwd(static, distances, target, source, nbr_idx, slot_weights, weights, cotangents):
    return jax.vjp(lambda *xs: fn(static, *xs[:3], nbr_idx, *xs[3:]), distances, target, source,
                   slot_weights, weights, cotangents)
  return fwd


def _autodiff_bwd(static, vjp, cotangents):
  """Backward rule paired with :func:`_autodiff_fwd` (nbr_idx gets no cotangent)."""
  d_distances, d_target, d_source, d_slot_weights, d_weights, d_cotangents = vjp(cotangents)
  return d_distances, d_target, d_source, None, d_slot_weights, d_weights, d_cotangents


_radial_mlp_vjp.defvjp(_autodiff_fwd(_reference_vjp), _autodiff_bwd)


def _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret, num_slots):
  out_width = weights.out_kernel.shape[1]
  out_blocks = (out_width,) if out_blocks is None else tuple(out_blocks)
  if sum(out_blocks) != out_width:
    raise ValueError(f"out_blocks {out_blocks} must sum to the output width {out_width}")
  if num_rbf < 2 or weights.rbf_kernel.shape[0] != num_rbf:
    raise ValueError(f"num_rbf = {num_rbf} must be >= 2 and match rbf_kernel "
                     f"{weights.rbf_kernel.shape}")
  forward_blocks = blocks or RadialMLPBlocks.get_default(num_slots)
  backward_blocks = blocks or RadialMLPBlocks.get_default_backward(num_slots)
  for tiling in (forward_blocks, backward_blocks):
    if tiling.block_targets * pl.next_power_of_2(num_slots) < _MIN_DOT:
      raise ValueError(f"{tiling} gives fewer than {_MIN_DOT} edge rows per program")
  return _Static(float(cutoff), int(num_rbf), float(eps), out_blocks,
                 jnp.dtype(dtype or jnp.float32), forward_blocks, backward_blocks, bool(interpret))


def radial_mlp(distances: Float[Array, "N K"], target: Float[Array, "N D"],
               source: Float[Array, "M D"], nbr_idx: Int[ArrayLike, "N K"],
               slot_weights: Float[Array, "N K W"] | None = None, *, weights: RadialMLPWeights,
               cutoff: float, num_rbf: int, eps: float, out_blocks: tuple[int, ...] | None = None,
               dtype: DTypeLike | None = None, blocks: RadialMLPBlocks | None = None,
               interpret: bool = False) -> tuple[Float[Array, "N _ _"], ...]:
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
    blocks: tiling of both kernels (None: :meth:`RadialMLPBlocks.get_default` for this one,
      :meth:`RadialMLPBlocks.get_default_backward` for the geometry VJP of its derivative).
    interpret: run in the Pallas interpreter (CPU testing).
  Returns:
    One array per output block: [N, K, F_b], or with ``slot_weights`` [N, W, F_b] (in the
    promoted dtype of slot_weights and ``dtype``).
  """
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _radial_mlp(static, distances, target, source, nbr_idx, slot_weights, weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _geometry_vjp(static, distances, target, source, nbr_idx, slot_weights, weights, cotangents):
  return _geometry_vjp_call(static, distances, target, source, nbr_idx, slot_weights, weights,
                            cotangents)


def _geometry_vjp_reference(static, distances, target, source, nbr_idx, slot_weights, weights,
                            cotangents):
  d_distances, _, _, d_slot_weights, _ = _reference_vjp(
      static, distances, target, source, nbr_idx, slot_weights, weights, cotangents)
  return d_distances, d_slot_weights


_geometry_vjp.defvjp(_autodiff_fwd(_geometry_vjp_reference), _autodiff_bwd)


def radial_mlp_geometry_vjp(
    distances: Float[Array, "N K"], target: Float[Array, "N D"], source: Float[Array, "M D"],
    nbr_idx: Int[ArrayLike, "N K"], slot_weights: Float[Array, "N K W"] | None,
    cotangents: tuple[Float[Array, "N _ _"], ...], *, weights: RadialMLPWeights, cutoff: float,
    num_rbf: int, eps: float, out_blocks: tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None, blocks: RadialMLPBlocks | None = None, interpret: bool = False
) -> tuple[Float[Array, "N K"], Float[Array, "N K W"] | None]:
  """The cotangents of the edge lengths and of the slot weights (None without) for cotangents of
  :func:`radial_mlp`'s outputs (one per output block): what forces need, in one kernel that
  recomputes the forward in registers. Its own derivative is the reference's."""
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _geometry_vjp(static, distances, target, source, nbr_idx, slot_weights, weights,
                       tuple(cotangents))


def radial_mlp_geometry_vjp_reference(
    distances: Float[Array, "N K"], target: Float[Array, "N D"], source: Float[Array, "M D"],
    nbr_idx: Int[ArrayLike, "N K"], slot_weights: Float[Array, "N K W"] | None,
    cotangents: tuple[Float[Array, "N _ _"], ...], *, weights: RadialMLPWeights, cutoff: float,
    num_rbf: int, eps: float, out_blocks: tuple[int, ...] | None = None,
    dtype: DTypeLike | None = None, blocks: RadialMLPBlocks | None = None, interpret: bool = False
) -> tuple[Float[Array, "N K"], Float[Array, "N K W"] | None]:
  """:func:`radial_mlp_geometry_vjp` by autodiff of the jnp reference."""
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _geometry_vjp_reference(static, distances, target, source, nbr_idx, slot_weights,
                                 weights, tuple(cotangents))


def radial_mlp_reference(distances: Float[Array, "N K"], target: Float[Array, "N D"],
                         source: Float[Array, "M D"], nbr_idx: Int[ArrayLike, "N K"],
                         slot_weights: Float[Array, "N K W"] | None = None, *,
                         weights: RadialMLPWeights, cutoff: float, num_rbf: int, eps: float,
                         out_blocks: tuple[int, ...] | None = None, dtype: DTypeLike | None = None,
                         blocks: RadialMLPBlocks | None = None, interpret: bool = False
                         ) -> tuple[Float[Array, "N _ _"], ...]:
  """Pure-jnp :func:`radial_mlp`: materialises the basis and the hidden activations."""
  static = _static(cutoff, num_rbf, eps, out_blocks, weights, dtype, blocks, interpret,
                   distances.shape[1])
  return _reference(static, distances, target, source, nbr_idx, slot_weights, weights)
