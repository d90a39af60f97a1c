"""edge_dot / gather_sum / scatter_sum kernels against their jnp references, to second order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
# Ragged tiling for the standard sizes (H = 6, K = 6, N = 11, M = 9): partial head, slot and row blocks.
RAGGED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4)
UNROLLED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4, unroll=True)
F32_RTOL = 2e-5
SECOND_ORDER_RTOL = 1e-4
# Absolute slack of the bf16 budget, for elements where the bf16 reference happens to round exactly.


def _op_inputs(op: str, kt, rng, dtype=jnp.float32):
  """Differentiable inputs of each op at the standard sizes, plus its static keyword arguments."""
  if op == "edge_dot":
    return (kt.normal(rng, kt.N, kt.X, kt.H, dtype=dtype),
            kt.normal(rng, kt.M, kt.X, kt.H, dtype=dtype)), {}
  if op == "gather_sum":
    return (kt.normal(rng, kt.N, kt.K, kt.H, dtype=dtype),
            kt.normal(rng, kt.M, kt.X, kt.H, dtype=dtype)), {}
  return (kt.normal(rng, kt.N, kt.K, kt.H, dtype=dtype),
          kt.normal(rng, kt.N, kt.X, kt.H, dtype=dtype)), {"num_sources": kt.M}


class _PrimitiveChecks:
  """Checks shared by the three primitives; subclasses set OP (and INTERPRET)."""

  OP: str
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and not HAS_GPU:
      pytest.skip("compiled Triton kernels need a GPU; the *Interpret class runs them on CPU")

  def _ops(self, neighbors, kwargs, block_sizes=RAGGED_BLOCKS):
    kernel = getattr(pk, self.OP)
    reference = getattr(pk, self.OP + "_reference")
    nbr = (neighbors.nbr_idx, neighbors.nbr_mask)

    def run_kernel(*xs):
      return kernel(*xs, *nbr, block_sizes=block_sizes, interpret=self.INTERPRET, **kwargs)

    def run_reference(*xs):
      return reference(*xs, *nbr, **kwargs)

    return run_kernel, run_reference

  @pytest.mark.parametrize("block_sizes", [RAGGED_BLOCKS, UNROLLED_BLOCKS, None],
                           ids=["ragged", "ragged-unrolled", "default"])
  def test_forward_matches_reference(self, kt, rng, neighbors, block_sizes):
    inputs, kwargs = _op_inputs(self.OP, kt, rng)
    run_kernel, run_reference = self._ops(neighbors, kwargs, block_sizes)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, self.OP)

  def test_vjp_matches_reference(self, kt, rng, neighbors):
    inputs, kwargs = _op_inputs(self.OP, kt, rng)
    run_kernel, run_reference = self._ops(neighbors, kwargs)
    cotangent = kt.normal(rng, *run_reference(*inputs).shape)
    kt.assert_close(kt.input_grads(run_kernel, inputs, cotangent),
                    kt.input_grads(run_reference, inputs, cotangent), F32_RTOL, self.OP + " vjp")

  def test_second_order_matches_reference(self, kt, rng, neighbors):
    """Reverse over reverse: grad of <r, grad f> with a nonlinear f of the op's output."""
    inputs, kwargs = _op_inputs(self.OP, kt, rng)
    run_kernel, run_reference = self._ops(neighbors, kwargs)
    cotangent = kt.normal(rng, *run_reference(*inputs).shape)
    directions = [kt.normal(rng, *x.shape) for x in inputs]
    kt.assert_close(kt.second_order_grads(run_kernel, inputs, cotangent, directions),
                    kt.second_order_grads(run_reference, inputs, cotangent, directions),
                    SECOND_ORDER_RTOL, self.OP + " second order")

  def test_invalid_slots_are_exactly_zero(self, kt, rng, neighbors):
    inputs, kwargs = _op_inputs(self.OP, kt, rng)
    run_kernel, _ = self._ops(neighbors, kwargs)
    out = np.asarray(run_kernel(*inputs))
    cotangent = kt.normal(rng, *out.shape)
    g0, g1 = (np.asarray(g) for g in jax.grad(
        lambda *xs: jnp.sum(run_kernel(*xs) * cotangent), argnums=(0, 1))(*inputs))
    invalid = ~neighbors.valid
    empty = [neighbors.empty_target, neighbors.masked_garbage_target]
    if self.OP == "edge_dot":
      assert np.all(out[invalid] == 0)
      assert np.all(g0[empty] == 0)  # targets without edges get no cotangent
      assert np.all(g1[neighbors.unused_source] == 0)
    elif self.OP == "gather_sum":
      assert np.all(out[empty] == 0)
      assert np.all(g0[invalid] == 0)
      assert np.all(g1[neighbors.unused_source] == 0)
    else:
      assert np.all(out[neighbors.unused_source] == 0)
      assert np.all(g0[invalid] == 0)
      assert np.all(g1[empty] == 0)

  def test_bf16_error_within_twice_reference_error(self, kt, rng, neighbors):
    """bf16 inputs, float32 accumulation: error vs float32 truth at most 2x the bf16 reference's."""
    inputs, kwargs = _op_inputs(self.OP, kt, rng, dtype=jnp.bfloat16)
    run_kernel, run_reference = self._ops(neighbors, kwargs)
    kt.assert_bf16_within_twice_reference(run_kernel, run_reference, inputs,
                                          kt.normal(rng, *run_reference(*inputs).shape))


class TestEdgeDot(_PrimitiveChecks):
  OP = "edge_dot"


class TestEdgeDotInterpret(TestEdgeDot):
  INTERPRET = True


class TestGatherSum(_PrimitiveChecks):
  OP = "gather_sum"


class TestGatherSumInterpret(TestGatherSum):
  INTERPRET = True


class TestScatterSum(_PrimitiveChecks):
  OP = "scatter_sum"

  def test_deterministic(self, kt, rng, neighbors):
    if self.INTERPRET:
      pytest.skip("the interpreter runs programs sequentially; determinism is a GPU property")
    inputs, kwargs = _op_inputs(self.OP, kt, rng)
    run_kernel, _ = self._ops(neighbors, kwargs)
    np.testing.assert_array_equal(np.asarray(run_kernel(*inputs)), np.asarray(run_kernel(*inputs)))


class TestScatterSumInterpret(TestScatterSum):
  INTERPRET = True


def test_primitives_are_mutually_adjoint(kt, rng, neighbors):
  """<gather_sum(w, b), G> = <w, edge_dot(G, b)> = <b, scatter_sum(w, G)> (kernels, interpret)."""
  nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
  opts = dict(block_sizes=RAGGED_BLOCKS, interpret=True)
  w = kt.normal(rng, kt.N, kt.K, kt.H)
  b = kt.normal(rng, kt.M, kt.X, kt.H)
  g = kt.normal(rng, kt.N, kt.X, kt.H)
  via_gather = jnp.sum(pk.gather_sum(w, b, *nbr, **opts) * g)
  via_dot = jnp.sum(w * pk.edge_dot(g, b, *nbr, **opts))
  via_scatter = jnp.sum(b * pk.scatter_sum(w, g, *nbr, num_sources=kt.M, **opts))
  np.testing.assert_allclose(via_dot, via_gather, rtol=1e-5)
  np.testing.assert_allclose(via_scatter, via_gather, rtol=1e-5)


def test_scatter_reference_matches_loops(kt, rng, neighbors):
  """The scatter reference against a plain float64 loop over the valid slots."""
  w = kt.normal(rng, kt.N, kt.K, kt.H)
  a = kt.normal(rng, kt.N, kt.X, kt.H)
  out = pk.scatter_sum_reference(w, a, neighbors.nbr_idx, neighbors.nbr_mask, num_sources=kt.M)
  expected = np.zeros((kt.M, kt.X, kt.H))
  idx = np.asarray(neighbors.nbr_idx)
  for n, k in zip(*np.nonzero(neighbors.valid)):
    expected[idx[n, k]] += np.asarray(w, np.float64)[n, k] * np.asarray(a, np.float64)[n]
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_rejects_mismatched_shapes(kt, rng, neighbors):
  with pytest.raises(ValueError, match="w must be"):
    pk.gather_sum(kt.normal(rng, kt.N, kt.K + 1, kt.H), kt.normal(rng, kt.M, kt.X, kt.H),
                  neighbors.nbr_idx, neighbors.nbr_mask, interpret=True)
  with pytest.raises(ValueError, match="nbr_mask must be a bool"):
    pk.edge_dot(kt.normal(rng, kt.N, kt.X, kt.H), kt.normal(rng, kt.M, kt.X, kt.H),
                neighbors.nbr_idx, neighbors.nbr_mask.astype(jnp.int32), interpret=True)
  with pytest.raises(ValueError, match="power of two"):
    pk.BlockSizes(block_h=6, block_k=4)


@pytest.mark.parametrize("row_dim, itemsize, expected", [
    (58, 4, (32, 4)),  # float32 value rows, 256 bytes: 8192-element tiles of 32 heads
    (58, 2, (128, 4)),  # bf16 value rows, 128 bytes: as wide as the key rows (notes, run 8)
    (18, 4, (128, 4)),  # message_attention's float32 v rows, 128 bytes (run 11)
    (8, 4, (128, 4)),  # key rows
])
def test_default_tiling_by_row_length_and_dtype(row_dim, itemsize, expected):
  blocks = pk.BlockSizes.get_default(row_dim, num_slots=32, num_heads=128, itemsize=itemsize)
  assert (blocks.block_h, blocks.block_k) == expected
  # Never wider than the problem: 6 heads and 3 slots round up to one 8-head, 4-slot tile.
  small = pk.BlockSizes.get_default(row_dim, num_slots=3, num_heads=6, itemsize=itemsize)
  assert small.block_h <= 8 and small.block_k <= 4
