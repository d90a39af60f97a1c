"""The fused message_attention kernel against its jnp reference, the reference against the per-edge
message it replaces, and the input checks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from e2former_jax import so3

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
RAGGED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4)
UNROLLED_BLOCKS = pk.BlockSizes(block_h=4, block_k=4, block_n=4, unroll=True)
F32_RTOL = 2e-5
SECOND_ORDER_RTOL = 1e-4
SINK = 1e-3
LMAX = 2  # S = 9 feature rows, R = 20 tensor-product rows: the paper's coupling
COUPLING = so3.first_order_coupling(LMAX)
NUM_OUT_ROWS, NUM_IN_ROWS, _ = COUPLING.shape


def _inputs(kt, rng, dtype=jnp.float32, groups=2, gate_scale=1.0):
  """q, k, gate, post_weight, envelope, vectors, values; values carry C = groups * H channels."""
  envelope = jnp.asarray(rng.uniform(0.0, 1.0, (kt.N, kt.K)).astype(np.float32))
  envelope = envelope.at[3, 0].set(0.0)  # an edge exactly at the cutoff
  return (kt.normal(rng, kt.N, kt.D, kt.H, dtype=dtype),
          kt.normal(rng, kt.M, kt.D, kt.H, dtype=dtype),
          (gate_scale * kt.normal(rng, kt.N, kt.K, kt.H)).astype(dtype),
          kt.normal(rng, kt.N, kt.K, kt.H, dtype=dtype),
          envelope.astype(dtype),
          kt.normal(rng, kt.N, kt.K, 3, dtype=dtype),
          kt.normal(rng, kt.M, NUM_IN_ROWS * groups, kt.H, dtype=dtype))


class TestMessageAttention:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and not HAS_GPU:
      pytest.skip("compiled Triton kernels need a GPU; the *Interpret class runs them on CPU")

  def _ops(self, kt, neighbors, block_sizes=RAGGED_BLOCKS):
    opts = dict(coupling=COUPLING, scale=kt.D ** -0.5, sink=SINK)
    nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
    kernel = functools.partial(
        pk.message_attention, block_sizes=block_sizes, interpret=self.INTERPRET,
        backward_block_sizes=None if block_sizes is None else (block_sizes, block_sizes), **opts)
    return ((lambda *xs, **kw: kernel(*xs, *nbr, **kw)),
            (lambda *xs, **kw: pk.message_attention_reference(*xs, *nbr, **opts, **kw)))

  @pytest.mark.parametrize("block_sizes, groups", [(RAGGED_BLOCKS, 2), (RAGGED_BLOCKS, 3),
                                                   (UNROLLED_BLOCKS, 2), (None, 2)],
                           ids=["ragged", "ragged-3-groups", "ragged-unrolled", "default"])
  def test_forward_matches_reference(self, kt, rng, neighbors, block_sizes, groups):
    inputs = _inputs(kt, rng, groups=groups)
    run_kernel, run_reference = self._ops(kt, neighbors, block_sizes)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, "forward")

  @pytest.mark.parametrize("block_sizes", [pk.BlockSizes(block_h=4, block_k=1), RAGGED_BLOCKS],
                           ids=["one-slot-steps", "ragged"])
  def test_forward_stable_for_large_logits(self, kt, rng, neighbors, block_sizes):
    """Gates of size ~300 push exp() far past float32 range without the running maximum."""
    inputs = _inputs(kt, rng, gate_scale=300.0)
    run_kernel, run_reference = self._ops(kt, neighbors, block_sizes)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, "large logits")

  def test_vjp_matches_reference(self, kt, rng, neighbors):
    inputs = _inputs(kt, rng)
    run_kernel, run_reference = self._ops(kt, neighbors)
    cotangent = kt.normal(rng, kt.N, NUM_OUT_ROWS * 2, kt.H)
    kt.assert_close(kt.input_grads(run_kernel, inputs, cotangent),
                    kt.input_grads(run_reference, inputs, cotangent), F32_RTOL, "vjp")

  def test_second_order_matches_reference(self, kt, rng, neighbors):
    """Force-training shape: grad over inputs of <r, grad of a nonlinear loss over inputs>."""
    inputs = _inputs(kt, rng)
    run_kernel, run_reference = self._ops(kt, neighbors)
    cotangent = kt.normal(rng, kt.N, NUM_OUT_ROWS * 2, kt.H)
    directions = [kt.normal(rng, *x.shape) for x in inputs]
    kt.assert_close(kt.second_order_grads(run_kernel, inputs, cotangent, directions),
                    kt.second_order_grads(run_reference, inputs, cotangent, directions),
                    SECOND_ORDER_RTOL, "second order")

  def test_sink_logit_matches_reference(self, kt, rng, neighbors):
    """A sink at a per-(target, head) logit L (the authors' softmax, differentiable): forward, VJP
    (the fused backward's d L = -s <g, out>) and second order (the composed backward)."""
    inputs = (*_inputs(kt, rng), 2.0 * kt.normal(rng, kt.N, kt.H))  # L above and below the logits
    # The default tiles: ragged ones are the other tests' subject, and a few large grid steps keep
    # the interpret-mode twin (whose cost is per step) affordable.
    kernel, reference = self._ops(kt, neighbors, block_sizes=None)

    def with_sink(fn):
      return lambda *xs: fn(*xs[:7], sink_logit=xs[7])

    run_kernel, run_reference = with_sink(kernel), with_sink(reference)
    kt.assert_close(run_kernel(*inputs), run_reference(*inputs), F32_RTOL, "forward")
    cotangent = kt.normal(rng, kt.N, NUM_OUT_ROWS * 2, kt.H)
    kt.assert_close(kt.input_grads(run_kernel, inputs, cotangent),
                    kt.input_grads(run_reference, inputs, cotangent), F32_RTOL, "vjp")
    directions = [kt.normal(rng, *x.shape) for x in inputs]
    kt.assert_close(kt.second_order_grads(run_kernel, inputs, cotangent, directions),
                    kt.second_order_grads(run_reference, inputs, cotangent, directions),
                    SECOND_ORDER_RTOL, "second order")

  def test_invalid_slots_are_exactly_zero(self, kt, rng, neighbors):
    run_kernel, _ = self._ops(kt, neighbors)
    kt.assert_invalid_slots_exactly_zero(run_kernel, _inputs(kt, rng),
                                         kt.normal(rng, kt.N, NUM_OUT_ROWS * 2, kt.H), neighbors,
                                         edge_inputs=(2, 3, 4, 5))  # gate, post, envelope, r

  @pytest.mark.parametrize("block_sizes", [RAGGED_BLOCKS, None], ids=["ragged", "default"])
  def test_bf16_error_within_twice_reference_error(self, kt, rng, neighbors, block_sizes):
    run_kernel, run_reference = self._ops(kt, neighbors, block_sizes)
    kt.assert_bf16_within_twice_reference(run_kernel, run_reference,
                                          _inputs(kt, rng, dtype=jnp.bfloat16),
                                          kt.normal(rng, kt.N, NUM_OUT_ROWS * 2, kt.H))


class TestMessageAttentionInterpret(TestMessageAttention):
  INTERPRET = True


def test_reference_matches_per_edge_message(kt, rng, neighbors):
  """sum_k a T(v_j, r) with T formed per edge (so3.tensor_product_vector): the moment identity
  behind the kernel is exact."""
  q, k, gate, post_weight, envelope, vectors, values = _inputs(kt, rng)
  nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
  out = pk.message_attention_reference(q, k, gate, post_weight, envelope, vectors, values, *nbr,
                                       coupling=COUPLING, scale=kt.D ** -0.5, sink=SINK)
  idx = np.asarray(neighbors.nbr_idx)
  safe = np.where(neighbors.valid, idx, 0)
  dots = jnp.einsum("ndh,nkdh->nkh", q, k[safe], precision="highest")
  weights = pk.attention_weights(dots, gate, post_weight, envelope, jnp.asarray(neighbors.valid),
                                 scale=kt.D ** -0.5, sink=SINK)  # [N, K, H]
  features = values.reshape(kt.M, NUM_IN_ROWS, 2 * kt.H)[safe]  # [N, K, S, C], c = g H + h
  edge_tp = so3.tensor_product_vector(features, vectors)  # [N, K, R, C]
  expected = jnp.einsum("nkc,nkrc->nrc", jnp.tile(weights, (1, 1, 2)), edge_tp,
                        precision="highest")
  kt.assert_close(out.reshape(kt.N, NUM_OUT_ROWS, 2 * kt.H), expected, F32_RTOL, "per-edge message")


def test_rejects_bad_inputs(kt, rng, neighbors):
  inputs = list(_inputs(kt, rng))
  nbr = (neighbors.nbr_idx, neighbors.nbr_mask)
  opts = dict(coupling=COUPLING, scale=1.0, interpret=True)
  bad_vectors = inputs[:5] + [inputs[5][..., :2]] + inputs[6:]
  with pytest.raises(ValueError, match="vectors must be"):
    pk.message_attention(*bad_vectors, *nbr, **opts)
  bad_values = inputs[:6] + [inputs[6][:, :NUM_IN_ROWS * 2 - 1]]
  with pytest.raises(ValueError, match="values must be"):
    pk.message_attention(*bad_values, *nbr, **opts)
  with pytest.raises(ValueError, match="coupling must be"):
    pk.message_attention(*inputs, *nbr, **{**opts, "coupling": COUPLING[..., :2]})
  with pytest.raises(ValueError, match="sink"):
    pk.message_attention(*inputs, *nbr, **{**opts, "sink": -1.0})
