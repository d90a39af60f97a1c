"""The jnp attention weights against their formula, and the fused attention_weights_vjp kernel
against jax.vjp of them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk

HAS_GPU = any(d.platform == "gpu" for d in jax.devices())
F32_RTOL = 2e-5
SECOND_ORDER_RTOL = 1e-4
BF16_RTOL = 2 ** -7  # one bf16 rounding (8 significant bits) of the largest value, with margin
SCALE = 0.35
SINK = 1e-3
# More heads than one 32-head program holds, the second block partial: d_envelope is summed over
# head blocks.
MANY_HEADS = 40
NUM_DIFF_INPUTS = 5  # dots, gate, post_weight, envelope, d_weights


def _inputs(kt, rng, neighbors, num_heads, dtype=jnp.float32, logit_scale=1.0):
  """dots, gate, post_weight, envelope, valid, d_weights on the ragged neighbour case."""
  n, k = kt.N, kt.K
  envelope = jnp.asarray(rng.uniform(0.05, 1.0, (n, k)).astype(np.float32))
  if logit_scale == 1.0:
    # An edge exactly at the cutoff. Not with large logits: if it held the largest logit, the
    # denominator would underflow and the reference's VJP itself turn NaN (1 / denom**2).
    envelope = envelope.at[3, 0].set(0.0)
  return (logit_scale * kt.normal(rng, n, k, num_heads), kt.normal(rng, n, k, num_heads, dtype=dtype),
          kt.normal(rng, n, k, num_heads, dtype=dtype), envelope.astype(dtype),
          jnp.asarray(neighbors.valid), kt.normal(rng, n, k, num_heads))


class TestAttentionWeightsVjp:
  INTERPRET = False

  @pytest.fixture(autouse=True)
  def _backend(self):
    if not self.INTERPRET and not HAS_GPU:
      pytest.skip("compiled Triton kernels need a GPU; the *Interpret class runs them on CPU")

  def _ops(self):
    opts = dict(scale=SCALE, sink=SINK)
    return (functools.partial(pk.attention_weights_vjp, interpret=self.INTERPRET, **opts),
            functools.partial(pk.attention_weights_vjp_reference, **opts))

  @pytest.mark.parametrize("num_heads", [6, MANY_HEADS])
  @pytest.mark.parametrize("logit_scale", [1.0, 300.0], ids=["unit", "large-logits"])
  def test_matches_reference(self, kt, rng, neighbors, num_heads, logit_scale):
    inputs = _inputs(kt, rng, neighbors, num_heads, logit_scale=logit_scale)
    kernel, reference = self._ops()
    kt.assert_close(kernel(*inputs), reference(*inputs), F32_RTOL, "weights and cotangents")

  def test_invalid_slots_are_exactly_zero(self, kt, rng, neighbors):
    inputs = _inputs(kt, rng, neighbors, kt.H)
    kernel, _ = self._ops()
    invalid = ~neighbors.valid
    for name, out in zip(("weights", "d_dots", "d_gate", "d_post_weight", "d_envelope"),
                         kernel(*inputs)):
      assert np.all(np.asarray(out)[invalid] == 0), name

  def test_bf16_inputs(self, kt, rng, neighbors):
    """Gate, post_weight and envelope in bf16 (the model's mixed precision): their cotangents come
    back in bf16, as jax.vjp gives them, within one bf16 rounding of the reference's."""
    inputs = _inputs(kt, rng, neighbors, kt.H, dtype=jnp.bfloat16)
    kernel, reference = self._ops()
    outputs, expected = kernel(*inputs), reference(*inputs)
    assert [x.dtype for x in outputs] == [x.dtype for x in expected]
    kt.assert_close(outputs[:2], expected[:2], F32_RTOL, "weights, d_dots")
    kt.assert_close(kt.upcast(outputs[2:]), kt.upcast(expected[2:]), BF16_RTOL, "bf16 cotangents")

  def test_second_order_matches_reference(self, kt, rng, neighbors):
    """Force training differentiates the backward: grads of <r, outputs> over every input."""
    inputs = _inputs(kt, rng, neighbors, MANY_HEADS)
    kernel, reference = self._ops()
    valid = inputs[4]
    directions = [kt.normal(rng, *x.shape) for x in reference(*inputs)]

    def contracted(fn):
      def loss(dots, gate, post_weight, envelope, d_weights):
        outs = fn(dots, gate, post_weight, envelope, valid, d_weights)
        return sum(jnp.sum(r * jnp.tanh(o)) for r, o in zip(directions, outs))
      diff_inputs = (*inputs[:4], inputs[5])
      return jax.grad(loss, argnums=range(NUM_DIFF_INPUTS))(*diff_inputs)

    kt.assert_close(contracted(kernel), contracted(reference), SECOND_ORDER_RTOL, "second order")

  @pytest.mark.parametrize("logit_scale", [1.0, 300.0], ids=["unit", "large-logits"])
  def test_sink_logit_matches_reference(self, kt, rng, neighbors, logit_scale):
    """A sink at a per-(target, head) logit (the authors' softmax): outputs, d sink_logit, and the
    second order through it."""
    inputs = _inputs(kt, rng, neighbors, MANY_HEADS, logit_scale=logit_scale)
    sink_logit = logit_scale * kt.normal(rng, kt.N, MANY_HEADS)
    kernel, reference = self._ops()
    outputs = kernel(*inputs, sink_logit=sink_logit)
    expected = reference(*inputs, sink_logit=sink_logit)
    assert len(outputs) == len(expected) == 6
    kt.assert_close(outputs, expected, F32_RTOL, "with sink logit")
    directions = [kt.normal(rng, *x.shape) for x in expected]
    valid = inputs[4]

    def contracted(fn):
      def loss(dots, gate, post_weight, envelope, d_weights, sink_logit):
        outs = fn(dots, gate, post_weight, envelope, valid, d_weights, sink_logit=sink_logit)
        return sum(jnp.sum(r * jnp.tanh(o)) for r, o in zip(directions, outs))
      return jax.grad(loss, argnums=range(NUM_DIFF_INPUTS + 1))(*inputs[:4], inputs[5], sink_logit)

    if logit_scale == 1.0:  # large logits underflow the reference's own second order
      kt.assert_close(contracted(kernel), contracted(reference), SECOND_ORDER_RTOL, "second order")


def test_sink_logit_zero_is_the_default(kt, rng, neighbors):
  """sink_logit = 0 gives the weights and cotangents of the default sink at logit 0."""
  inputs = _inputs(kt, rng, neighbors, kt.H)
  opts = dict(scale=SCALE, sink=SINK)
  with_zero = pk.attention_weights_vjp_reference(*inputs, sink_logit=jnp.zeros((kt.N, kt.H)), **opts)
  kt.assert_close(with_zero[:5], pk.attention_weights_vjp_reference(*inputs, **opts), 1e-6, "zero")


def _formula_float64(dots, gate, post_weight, envelope, valid, scale, sink):
  """The defining formula, looped in float64 with no max shift (for moderate logits)."""
  dots, gate, post_weight, envelope = (np.asarray(x, np.float64)
                                       for x in (dots, gate, post_weight, envelope))
  weights = np.zeros_like(dots)
  for n in range(dots.shape[0]):
    slots = np.nonzero(valid[n])[0]
    e = np.exp(gate[n, slots] * scale * dots[n, slots]) * envelope[n, slots, None]  # [k, H]
    weights[n, slots] = e / (e.sum(axis=0) + sink) * post_weight[n, slots]
  return weights


def test_weights_match_formula(kt, rng, neighbors):
  dots, gate, post_weight, envelope, valid, _ = _inputs(kt, rng, neighbors, kt.H)
  weights = pk.attention_weights(dots, gate, post_weight, envelope, valid, scale=SCALE, sink=SINK)
  expected = _formula_float64(dots, gate, post_weight, envelope, neighbors.valid, SCALE, SINK)
  np.testing.assert_allclose(weights, expected, rtol=1e-5, atol=1e-7)


def test_shift_is_exact_for_derivatives(kt, rng):
  """The stop_gradient max shift leaves the derivatives exact: gradient and Hessian-vector product
  against central differences in float64."""
  small = kt.make_neighbor_case(rng, num_targets=4, num_sources=3, num_slots=3)
  valid = jnp.asarray(small.valid)
  eps = 1e-5
  with jax.enable_x64(True):
    x = [rng.normal(size=(4, 3, 2)) for _ in range(3)] + [rng.uniform(0.0, 1.0, (4, 3))]
    v = [rng.normal(size=a.shape) for a in x]
    cotangent = rng.normal(size=(4, 3, 2))

    @jax.jit
    def loss(*xs):  # dots, gate, post_weight, envelope
      weights = pk.attention_weights(*xs, valid, scale=0.7, sink=SINK)
      return jnp.sum(cotangent * weights ** 2)

    grad = jax.jit(jax.grad(loss, argnums=range(len(x))))
    hvp = jax.jit(jax.grad(lambda *xs: sum(jnp.sum(g * d) for g, d in zip(grad(*xs), v)),
                           argnums=range(len(x))))
    plus = [a + eps * d for a, d in zip(x, v)]
    minus = [a - eps * d for a, d in zip(x, v)]
    directional = (float(loss(*plus)) - float(loss(*minus))) / (2 * eps)
    exact = sum(np.sum(np.asarray(g) * d) for g, d in zip(grad(*x), v))
    np.testing.assert_allclose(exact, directional, rtol=1e-6)
    for exact, g_plus, g_minus in zip(hvp(*x), grad(*plus), grad(*minus)):
      differences = (np.asarray(g_plus) - np.asarray(g_minus)) / (2 * eps)
      np.testing.assert_allclose(exact, differences, rtol=1e-6, atol=1e-8)


def test_rejects_mismatched_shapes(kt, rng, neighbors):
  dots, gate, post_weight, envelope, valid, d_weights = _inputs(kt, rng, neighbors, kt.H)
  with pytest.raises(ValueError, match="envelope must be"):
    pk.attention_weights_vjp(dots, gate, post_weight, envelope[:, :-1], valid, d_weights,
                             scale=SCALE, sink=SINK, interpret=True)


class TestAttentionWeightsVjpInterpret(TestAttentionWeightsVjp):
  INTERPRET = True
