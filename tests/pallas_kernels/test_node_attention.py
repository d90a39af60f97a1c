"""The fused node_attention kernel against its jnp reference, and the reference against the formula."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
RAGGED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4)
UNROLLED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4, unroll=True)
F32_RTOL = 2e-5
SECOND_ORDER_RTOL = 1e-4
SINK = 1e-3
NUM_INPUTS = 6  # q, k, gate, post_weight, envelope, values


def _inputs(kt, rng, dtype=jnp.float32, gate_scale=1.0):
  """q, k, gate, post_weight, envelope, values at the standard ragged sizes."""
  envelope = jnp.asarray(rng.uniform(0.0, 1.0, (kt.N, kt.K)).astype(np.float32))
  envelope = envelope.at[3, 0].set(0.0)  # an edge exactly at the cutoff
  return (kt.normal(rng, kt.N, kt.D, kt.H, dtype=dtype),
          kt.normal(rng, kt.M, kt.D, kt.H, dtype=dtype),
          (gate_scale * kt.normal(rng, kt.N, kt.K, kt.H)).astype(dtype),
          kt.normal(rng, kt.N, kt.K, kt.H, dtype=dtype),
          envelope.astype(dtype),
          kt.normal(rng, kt.M, kt.X, kt.H, dtype=dtype))


class TestNodeAttention:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and not HAS_GPU:
      pytest.skip("compiled Triton kernels need a GPU; the *Interpret class runs them on CPU")

  def _ops(self, kt, neighbors, block_sizes=RAGGED_BLOCKS, backward_impl="pallas"):
    opts = dict(scale=kt.D ** -0.5, sink=SINK)
    nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
    kernel = functools.partial(pk.node_attention, block_sizes=block_sizes,
                               interpret=self.INTERPRET, backward_impl=backward_impl, **opts)
    return (lambda *xs: kernel(*xs, *nbr)), (lambda *xs: pk.node_attention_reference(*xs, *nbr, **opts))

  @pytest.mark.parametrize("block_sizes", [RAGGED_BLOCKS, UNROLLED_BLOCKS, None],
                           ids=["ragged", "ragged-unrolled", "default"])
  def test_forward_matches_reference(self, kt, rng, neighbors, block_sizes):
    inputs = _inputs(kt, rng)
    run_kernel, run_reference = self._ops(kt, neighbors, block_sizes)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, "forward")

  def test_forward_stable_for_large_logits(self, kt, rng, neighbors):
    """Gates of size ~300 push exp() far past float32 range without the max shift."""
    inputs = _inputs(kt, rng, gate_scale=300.0)
    run_kernel, run_reference = self._ops(kt, neighbors)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, "large logits")

  @pytest.mark.parametrize("backward_impl", ["pallas", "xla"])
  def test_vjp_matches_reference(self, kt, rng, neighbors, backward_impl):
    inputs = _inputs(kt, rng)
    run_kernel, run_reference = self._ops(kt, neighbors, backward_impl=backward_impl)
    cotangent = kt.normal(rng, kt.N, kt.X, kt.H)
    kt.assert_close(kt.input_grads(run_kernel, inputs, cotangent),
                    kt.input_grads(run_reference, inputs, cotangent), F32_RTOL,
                    f"vjp ({backward_impl})")

  def test_second_order_matches_reference(self, kt, rng, neighbors):
    """Force-training shape: grad over inputs of <r, grad of a nonlinear loss over inputs>."""
    inputs = _inputs(kt, rng)
    run_kernel, run_reference = self._ops(kt, neighbors)
    cotangent = kt.normal(rng, kt.N, kt.X, kt.H)
    directions = [kt.normal(rng, *x.shape) for x in inputs]
    kt.assert_close(kt.second_order_grads(run_kernel, inputs, cotangent, directions),
                    kt.second_order_grads(run_reference, inputs, cotangent, directions),
                    SECOND_ORDER_RTOL, "second order")

  def test_invalid_slots_are_exactly_zero(self, kt, rng, neighbors):
    run_kernel, _ = self._ops(kt, neighbors)
    kt.assert_invalid_slots_exactly_zero(run_kernel, _inputs(kt, rng),
                                         kt.normal(rng, kt.N, kt.X, kt.H), neighbors,
                                         edge_inputs=(2, 3, 4))  # gate, post_weight, envelope

  def test_bf16_error_within_twice_reference_error(self, kt, rng, neighbors):
    run_kernel, run_reference = self._ops(kt, neighbors)
    kt.assert_bf16_within_twice_reference(run_kernel, run_reference,
                                          _inputs(kt, rng, dtype=jnp.bfloat16),
                                          kt.normal(rng, kt.N, kt.X, kt.H))

  def test_deterministic(self, kt, rng, neighbors):
    if self.INTERPRET:
      pytest.skip("the interpreter runs programs sequentially; determinism is a GPU property")
    inputs = _inputs(kt, rng)
    run_kernel, _ = self._ops(kt, neighbors)
    cotangent = kt.normal(rng, kt.N, kt.X, kt.H)
    grad = jax.jit(jax.grad(lambda *xs: jnp.sum(run_kernel(*xs) * cotangent), argnums=(1, 5)))
    first, second = grad(*inputs), grad(*inputs)
    for a, b in zip(first, second):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class TestNodeAttentionInterpret(TestNodeAttention):
  INTERPRET = True


def _formula_float64(q, k, gate, post_weight, envelope, values, idx, valid, scale, sink):
  """The defining formula, looped in float64 with no max shift (for moderate logits)."""
  q, k, gate, post_weight, envelope, values = (
      np.asarray(x, np.float64) for x in (q, k, gate, post_weight, envelope, values))
  out = np.zeros((q.shape[0], values.shape[1], q.shape[2]))
  for n in range(q.shape[0]):
    e = np.zeros((idx.shape[1], q.shape[2]))
    for s in np.nonzero(valid[n])[0]:
      logits = gate[n, s] * scale * np.sum(q[n] * k[idx[n, s]], axis=0)
      e[s] = np.exp(logits) * envelope[n, s]
    alpha = e / (e.sum(axis=0) + sink)
    for s in np.nonzero(valid[n])[0]:
      out[n] += alpha[s] * post_weight[n, s] * values[idx[n, s]]
  return out


def test_reference_matches_formula(kt, rng, neighbors):
  inputs = _inputs(kt, rng)
  out = pk.node_attention_reference(*inputs, neighbors.nbr_idx, neighbors.nbr_mask,
                                    scale=kt.D ** -0.5, sink=SINK)
  expected = _formula_float64(*inputs, np.asarray(neighbors.nbr_idx), neighbors.valid,
                              kt.D ** -0.5, SINK)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_reference_derivatives_match_finite_differences(kt, rng):
  """The stop_gradient max shift is exact: gradient and Hessian-vector product vs central differences."""
  small = kt.make_neighbor_case(rng, num_targets=4, num_sources=3, num_slots=3)
  eps = 1e-5
  shapes = [(4, 2, 2), (3, 2, 2), (4, 3, 2), (4, 3, 2), (4, 3), (3, 2, 2)]  # D = X = H = 2
  with jax.enable_x64(True):
    x = [rng.normal(size=shape) for shape in shapes]
    x[4] = rng.uniform(0.0, 1.0, shapes[4])  # envelope
    v = [rng.normal(size=shape) for shape in shapes]
    cotangent = rng.normal(size=(4, 2, 2))

    @jax.jit
    def loss(*xs):
      out = pk.node_attention_reference(*xs, small.nbr_idx, small.nbr_mask, scale=0.7, sink=SINK)
      return jnp.sum(cotangent * out ** 2)

    grad = jax.jit(jax.grad(loss, argnums=range(NUM_INPUTS)))
    hvp = jax.jit(jax.grad(lambda *xs: sum(jnp.sum(g * d) for g, d in zip(grad(*xs), v)),
                           argnums=range(NUM_INPUTS)))
    plus = [a + eps * d for a, d in zip(x, v)]
    minus = [a - eps * d for a, d in zip(x, v)]
    directional = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
    exact = sum(np.sum(np.asarray(g) * d) for g, d in zip(grad(*x), v))
    np.testing.assert_allclose(exact, directional, rtol=1e-6)
    for exact, g_plus, g_minus in zip(hvp(*x), grad(*plus), grad(*minus)):
      differences = (np.asarray(g_plus) - np.asarray(g_minus)) / (2 * eps)
      np.testing.assert_allclose(exact, differences, rtol=1e-6, atol=1e-8)


def test_rejects_bad_inputs(kt, rng, neighbors):
  inputs = list(_inputs(kt, rng))
  nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
  bad_gate = inputs.copy()
  bad_gate[2] = bad_gate[2][:, :-1]
  with pytest.raises(ValueError, match="gate must be"):
    pk.node_attention(*bad_gate, *nbr, scale=1.0, interpret=True)
  with pytest.raises(ValueError, match="sink must be non-negative"):
    pk.node_attention(*inputs, *nbr, scale=1.0, sink=-1.0, interpret=True)
  with pytest.raises(ValueError, match="backward_impl"):
    pk.node_attention(*inputs, *nbr, scale=1.0, backward_impl="triton", interpret=True)
