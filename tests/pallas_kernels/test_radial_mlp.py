"""The fused radial MLP forward kernel against its jnp reference; its derivatives (the reference's
through the custom VJP) to second order; the tiling checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
# On a GPU the kernel's float32 products, as XLA's by default, round their inputs to TF32 (10-bit
# mantissa), and those of the reference do so too (interpreted kernels included), each differently.
F32_RTOL = 2e-3 if HAS_GPU else 2e-5
# The second derivatives are the reference's on both sides, evaluated at the first derivatives'
# residuals, so on a GPU they inherit those TF32 differences: 3.4e-4 relative on one H100, and
# within 1e-4 with every product in float32 (JAX_DEFAULT_MATMUL_PRECISION=highest).
SECOND_ORDER_RTOL = F32_RTOL if HAS_GPU else 1e-4
# Ragged everywhere: hidden 20 and 20 basis functions are padded to 32 lanes in registers, the basis
# runs in two chunks of 16 (the second with 4 real columns), K = 6 slots pad to 8, and 11 targets in
# blocks of 2 leave a partial last block; the output splits into column blocks of 5 and 7.
HIDDEN, NUM_RBF, OUT_BLOCKS, NUM_WEIGHTS = 20, 20, (5, 7), 3
CUTOFF, EPS = 4.5, 1e-5
RAGGED_BLOCKS = pk.RadialMLPBlocks(block_targets=2, rbf_chunk=16)


def _inputs(kt, rng, contracted: bool, dtype=jnp.float32):
  """(distances, target, source, slot weights or None) and the weights. The ``neighbors`` fixture
  they run with has targets without any source (sentinel slots) and in-range garbage on masked
  slots."""
  distances = jnp.asarray(rng.uniform(0.3, CUTOFF, (kt.N, kt.K)).astype(np.float32)).astype(dtype)
  out = sum(OUT_BLOCKS)
  weights = pk.RadialMLPWeights(
      0.3 * kt.normal(rng, NUM_RBF, HIDDEN), kt.normal(rng, HIDDEN),
      1.0 + 0.1 * kt.normal(rng, HIDDEN), 0.1 * kt.normal(rng, HIDDEN),
      0.3 * kt.normal(rng, HIDDEN, HIDDEN), kt.normal(rng, HIDDEN),
      1.0 + 0.1 * kt.normal(rng, HIDDEN), 0.1 * kt.normal(rng, HIDDEN),
      0.3 * kt.normal(rng, HIDDEN, out), kt.normal(rng, out))
  slot_weights = kt.normal(rng, kt.N, kt.K, NUM_WEIGHTS) if contracted else None
  return (distances, kt.normal(rng, kt.N, HIDDEN, dtype=dtype),
          kt.normal(rng, kt.M, HIDDEN, dtype=dtype), slot_weights), weights


class TestRadialMLP:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and not HAS_GPU:
      pytest.skip("compiled Triton kernels need a GPU; the *Interpret class runs them on CPU")

  def _ops(self, neighbors, blocks=RAGGED_BLOCKS, dtype=None):
    """kernel(distances, target, source, slot_weights, *weights) and the reference, outputs
    concatenated."""
    opts = dict(cutoff=CUTOFF, num_rbf=NUM_RBF, eps=EPS, out_blocks=OUT_BLOCKS, dtype=dtype)

    def op(fn, distances, target, source, slot_weights, *weights):
      out = fn(distances, target, source, neighbors.nbr_idx, slot_weights,
               weights=pk.RadialMLPWeights(*weights), **opts)
      assert len(out) == len(OUT_BLOCKS)
      return jnp.concatenate(out, axis=-1)

    kernel = functools.partial(pk.radial_mlp, blocks=blocks, interpret=self.INTERPRET)
    return functools.partial(op, kernel), functools.partial(op, pk.radial_mlp_reference)

  @pytest.mark.parametrize("contracted", [False, True], ids=["per-slot", "slot-weighted"])
  @pytest.mark.parametrize("blocks", [RAGGED_BLOCKS, None], ids=["ragged", "default"])
  def test_forward_matches_reference(self, kt, rng, neighbors, contracted, blocks):
    inputs, weights = _inputs(kt, rng, contracted)
    run_kernel, run_reference = self._ops(neighbors, blocks)
    out = run_kernel(*inputs, *weights)
    assert out.shape == (kt.N, NUM_WEIGHTS if contracted else kt.K, sum(OUT_BLOCKS))
    kt.assert_close(out, run_reference(*inputs, *weights), F32_RTOL)

  @pytest.mark.parametrize("contracted", [False, True], ids=["per-slot", "slot-weighted"])
  def test_derivatives_match_reference_to_second_order(self, kt, rng, neighbors, contracted):
    """First derivatives (the edge lengths' and slot weights' from the fused backward kernel, the
    rest from the reference) and second (force-training) derivatives over every input and
    parameter."""
    (distances, target, source, slot_weights), weights = _inputs(kt, rng, contracted)
    run_kernel, run_reference = self._ops(neighbors)
    if contracted:
      inputs = (distances, target, source, slot_weights, *weights)
    else:  # slot_weights=None is no differentiable input
      run_kernel, run_reference = (functools.partial(lambda fn, d, t, s, *w: fn(d, t, s, None, *w),
                                                     fn) for fn in (run_kernel, run_reference))
      inputs = (distances, target, source, *weights)
    cotangent = kt.normal(rng, kt.N, NUM_WEIGHTS if contracted else kt.K, sum(OUT_BLOCKS))
    kt.assert_close(kt.input_grads(run_kernel, inputs, cotangent),
                    kt.input_grads(run_reference, inputs, cotangent), F32_RTOL)
    directions = jax.tree.map(lambda x: kt.normal(rng, *x.shape), inputs)
    kt.assert_close(kt.second_order_grads(run_kernel, inputs, cotangent, directions),
                    kt.second_order_grads(run_reference, inputs, cotangent, directions),
                    SECOND_ORDER_RTOL)

  @pytest.mark.parametrize("contracted", [False, True], ids=["per-slot", "slot-weighted"])
  def test_bf16_error_within_twice_reference_error(self, kt, rng, neighbors, contracted):
    """bfloat16 products and output (float32 accumulation and layer norms)."""
    (distances, target, source, slot_weights), weights = _inputs(kt, rng, contracted,
                                                                  dtype=jnp.bfloat16)
    run_kernel, run_reference = self._ops(neighbors, dtype=jnp.bfloat16)
    float32_reference = self._ops(neighbors)[1]
    truth = float32_reference(*kt.upcast((distances, target, source)), slot_weights, *weights)
    inputs = (distances, target, source, slot_weights, *weights)
    out, baseline = run_kernel(*inputs), run_reference(*inputs)
    assert out.dtype == baseline.dtype == (jnp.float32 if contracted else jnp.bfloat16)
    assert kt.max_error(out, truth) <= 2 * kt.max_error(baseline, truth) + 1e-5


class TestRadialMLPInterpret(TestRadialMLP):
  INTERPRET = True


@pytest.mark.parametrize("num_slots", [1, 6, 16, 32, 64])
def test_default_tilings(num_slots):
  rows = lambda blocks: blocks.block_targets * (1 << (num_slots - 1).bit_length())  # padded slots
  forward = pk.RadialMLPBlocks.get_default(num_slots)
  backward = pk.RadialMLPBlocks.get_default_backward(num_slots)
  # Whole targets per program, 64 edge rows (forward) or 32 (backward, more float32 values per
  # row, on twice the warps), or one target where its slots are more.
  assert (forward.num_warps, backward.num_warps) == (4, 8)
  assert rows(forward) == max(64, rows(pk.RadialMLPBlocks(1)))
  assert rows(backward) == max(32, rows(pk.RadialMLPBlocks(1)))


def test_rejects_bad_tilings_and_widths(kt, rng, neighbors):
  (distances, target, source, _), weights = _inputs(kt, rng, False)
  opts = dict(weights=weights, cutoff=CUTOFF, num_rbf=NUM_RBF, eps=EPS, interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pk.RadialMLPBlocks(block_targets=3)
  with pytest.raises(ValueError, match="rbf_chunk"):
    pk.RadialMLPBlocks(block_targets=2, rbf_chunk=8)
  with pytest.raises(ValueError, match="fewer than 16 edge rows"):
    pk.radial_mlp(distances, target, source, neighbors.nbr_idx, blocks=pk.RadialMLPBlocks(1),
                  **opts)
  with pytest.raises(ValueError, match="must sum to the output width"):
    pk.radial_mlp(distances, target, source, neighbors.nbr_idx, out_blocks=(5, 5), **opts)
  with pytest.raises(ValueError, match="num_rbf"):
    pk.radial_mlp(distances, target, source, neighbors.nbr_idx, **{**opts, "num_rbf": NUM_RBF + 1})
