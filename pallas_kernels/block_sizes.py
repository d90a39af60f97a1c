"""``BlockSizes``: how a kernel of this package tiles its grid and its loop over neighbour slots.

Every kernel runs one program per (block of ``block_n`` rows, block of ``block_h`` heads) and walks
the neighbour slots ``block_k`` at a time (docs/model.md §11.6). ``BlockSizes.get_default`` is the
gather primitives' default for a row length; the fused attention kernels keep their own measured
defaults (``message_attention._FORWARD_BLOCKS`` ...) and narrow them with ``at_most_heads``.
"""

from __future__ import annotations

import dataclasses

from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

# Elements of one gathered [block_k, row_pad, block_h] tile that the default tiling aims for: 8192
# float32 lanes are 64 registers per thread at 4 warps, which leaves room for the accumulator.
_DEFAULT_TILE_ELEMENTS = 8192
_DEFAULT_BLOCK_H = 32
_DEFAULT_NUM_WARPS = 4
_DEFAULT_NUM_STAGES = 2
# Rows of at most _WIDE_ROW_BYTES (padded length x element size) take up to _WIDE_BLOCK_H heads
# and _WIDE_BLOCK_K slots per step; longer rows take _DEFAULT_TILE_ELEMENTS-element tiles of
# _DEFAULT_BLOCK_H heads. On an H100 at N = 100k (K = 32, H = 128; docs/performance.md §3; at
# fbe54ac, 16f946e, b9e3215), edge_dot, gather_sum and scatter_sum took, at 128 x 4 against 32 heads:
# D = 8 float32 key rows 2.5, 1.8, 2.2 ms (3.7, 2.8, 3.5); 58 bf16 value rows 7.4, 7.2, 7.9 ms
# (17.3, 8.8, 9.5); 18 float32 v rows of message_attention 3.9, 3.9, 4.4 ms (8.1, 4.3, 5.5 at
# 32 x 8). For 58 float32 value rows (256 bytes) 32 x 4 stayed the fastest (12.2, 11.9, 12.5 ms).
_WIDE_ROW_BYTES = 128
_WIDE_BLOCK_H = 128
_WIDE_BLOCK_K = 4


@dataclasses.dataclass(frozen=True, slots=True)
class BlockSizes:
  """Tiling of one kernel (all block sizes are powers of two).

  Attributes:
    block_h: heads per program.
    block_k: neighbour slots (or, in the kernels that walk a source's incoming edges, those
      edges) gathered per loop step.
    block_n: consecutive rows (targets, or sources in those kernels) each program walks in turn;
      the grid is (ceil(rows / block_n), ceil(H / block_h)).
    num_warps: Triton warps per program.
    num_stages: Triton software-pipelining depth of the neighbour loop.
    unroll: unroll the loop over slot blocks (static K) in the kernel source; a loop over a
      source's incoming edges has a data-dependent length and is never unrolled.
  """

  block_h: int
  block_k: int
  block_n: int = 1
  num_warps: int = _DEFAULT_NUM_WARPS
  num_stages: int = _DEFAULT_NUM_STAGES
  unroll: bool = False

  def __post_init__(self):
    for name in ("block_h", "block_k", "block_n", "num_warps"):
      value = getattr(self, name)
      if value < 1 or value & (value - 1):
        raise ValueError(f"BlockSizes.{name} must be a power of two; got {value}")
    if self.num_stages < 1:
      raise ValueError(f"BlockSizes.num_stages must be >= 1; got {self.num_stages}")

  @classmethod
  def get_default(cls, row_dim: int, num_slots: int, num_heads: int,
                  itemsize: int = 4) -> BlockSizes:
    """A tiling for rows of ``row_dim`` (X) elements of ``itemsize`` bytes with ``num_slots`` (K)
    slots and ``num_heads`` heads."""
    row_pad = pl.next_power_of_2(row_dim)
    if row_pad * itemsize <= _WIDE_ROW_BYTES:
      return cls(block_h=min(_WIDE_BLOCK_H, pl.next_power_of_2(num_heads)),
                 block_k=min(_WIDE_BLOCK_K, pl.next_power_of_2(num_slots)))
    block_h = min(_DEFAULT_BLOCK_H, pl.next_power_of_2(num_heads))
    block_k = _DEFAULT_TILE_ELEMENTS // (row_pad * block_h)
    block_k = max(1, min(block_k, pl.next_power_of_2(num_slots)))
    return cls(block_h=block_h, block_k=block_k)

  def at_most_heads(self, num_heads: int) -> BlockSizes:
    """This tiling with no more heads per program than there are (rounded to a power of 2)."""
    return dataclasses.replace(self, block_h=min(self.block_h, pl.next_power_of_2(num_heads)))

  def compiler_params(self) -> plt.CompilerParams:
    return plt.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

  def grid(self, rows: int, num_heads: int) -> tuple[int, int]:
    """One program per (block of rows, block of heads)."""
    return pl.cdiv(rows, self.block_n), pl.cdiv(num_heads, self.block_h)
