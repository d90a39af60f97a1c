"""The attention weights of the fused attention kernels and their fused VJP (Pallas / Triton).

``attention_weights`` maps the per-edge q.k products to the weights that multiply the value rows:

  logits[n,k,h] = gate[n,k,h] * scale * dots[n,k,h]
  e[n,k,h]      = exp(logits[n,k,h] - m[n,h]) * envelope[n,k]          (0 on invalid slots)
  W[n,k,h]      = e[n,k,h] / (sum_k e[n,k,h] + sink * exp(-m[n,h])) * post_weight[n,k,h]

with m = max(0, max over valid slots of the logits), a constant for differentiation (the weights
are invariant to it). It is plain jnp: the reference attention and the model use it directly.

With a sink logit L [N, H] the sink term is sink * exp(L - m) and m = max(L, max over valid slots);
L is differentiable (the authors' softmax puts it at their largest logit).

``attention_weights_vjp`` is what the attention's composed backward (``_softmax``) needs from it:
the weights and the cotangents of (dots, gate, post_weight, envelope[, sink_logit]) for a cotangent
of the weights. Under XLA the jax.vjp of the jnp function took eight fusions over [N, K, H] arrays
(13.3 ms at N = 100k, H = 128 on an H100, 30 % of the attention backward); the kernel does it in
one program per (target, block of heads) that holds all K slots, 5 arrays read and 4 written
(5.0 ms; docs/performance.md §3, e0ab69c). In closed form, with alpha = W / post_weight:

  d post_weight = dW * alpha
  d e           = (dW * post_weight - sum_k alpha dW post_weight) / denominator
  d logits      = d e * e,   d envelope = sum_h d e * exp(logits - m),
  d dots        = d logits * scale * gate,   d gate = d logits * scale * dots,
  d L           = -sink exp(L - m) / denominator * sum_k alpha dW post_weight.

The kernel's own derivative (force training differentiates the backward) is the jax.vjp of the
reference, so second order stays exact; its arrays are [N, K, H] at most.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt
from jaxtyping import Array, ArrayLike, Bool, Float

from pallas_kernels import _tiles
from pallas_kernels._neighbors import upcast

# Heads per program: a [K, 32] float32 tile of each of the ~8 live arrays is 8 registers per thread
# at 4 warps for K = 32, and each slot's 32 heads are one 128-byte line.
_BLOCK_H = 32
_NUM_WARPS = 4

# What attention_weights_vjp returns: (weights, d_dots, d_gate, d_post_weight, d_envelope), and
# d_sink_logit after them when a sink logit is given.
WeightsAndCotangents = (
    tuple[Float[Array, "N K H"], Float[Array, "N K H"], Float[Array, "N K H"],
          Float[Array, "N K H"], Float[Array, "N K"]]
    | tuple[Float[Array, "N K H"], Float[Array, "N K H"], Float[Array, "N K H"],
            Float[Array, "N K H"], Float[Array, "N K"], Float[Array, "N H"]])


def attention_weights(dots: Float[Array, "N K H"], gate: Float[Array, "N K H"],
                      post_weight: Float[Array, "N K H"], envelope: Float[Array, "N K"],
                      valid: Bool[ArrayLike, "N K"], *, scale: float, sink: float,
                      sink_logit: Float[Array, "N H"] | None = None) -> Float[Array, "N K H"]:
  """alpha * post_weight from the raw q.k products (>= float32).

  Invalid slots give exactly 0 and receive exactly 0 cotangent.
  sink_logit: logit L of the sink, whose term in the denominator is sink * exp(L); None
  means L = 0. The stabiliser becomes max(L, max over valid slots of the logits).
  """
  valid_h = valid[..., None]  # [N, K, 1]
  logits = jnp.where(valid_h, upcast(gate) * scale * dots, 0)  # [N, K, H]
  if sink_logit is None:
    shift = lax.stop_gradient(jnp.max(logits, axis=1, where=valid_h, initial=0.0))  # [N, H]
    sink_term = sink * jnp.exp(-shift)
  else:
    sink_logit = upcast(sink_logit)
    shift = lax.stop_gradient(jnp.maximum(
        jnp.max(logits, axis=1, where=valid_h, initial=-jnp.inf), sink_logit))  # [N, H]
    sink_term = sink * jnp.exp(sink_logit - shift)
  e = jnp.where(valid_h, jnp.exp(logits - shift[:, None]), 0)
  e = e * upcast(envelope)[..., None]  # [N, K, H]
  denom = jnp.sum(e, axis=1) + sink_term  # [N, H]
  # Only sink == 0 with no valid slot gives 0 here; the numerator is then 0 as well.
  denom = jnp.where(denom > 0, denom, 1.0)
  return e / denom[:, None] * upcast(post_weight)  # [N, K, H]


def attention_weights_vjp_reference(
    dots: Float[Array, "N K H"], gate: Float[Array, "N K H"], post_weight: Float[Array, "N K H"],
    envelope: Float[Array, "N K"], valid: Bool[ArrayLike, "N K"], d_weights: Float[Array, "N K H"],
    *, scale: float, sink: float, sink_logit: Float[Array, "N H"] | None = None,
    interpret: bool = False) -> WeightsAndCotangents:
  """(weights, d_dots, d_gate, d_post_weight, d_envelope[, d_sink_logit]) by jax.vjp of
  ``attention_weights``."""
  del interpret
  weights, vjp = jax.vjp(
      lambda *xs: attention_weights(*xs[:4], valid, scale=scale, sink=sink, sink_logit=xs[4]),
      dots, gate, post_weight, envelope, sink_logit)
  cotangents = vjp(d_weights.astype(weights.dtype))
  return (weights, *cotangents[:4], *([] if sink_logit is None else [cotangents[4]]))


@dataclasses.dataclass(frozen=True)
class _Static:
  scale: float
  sink: float
  interpret: bool


def _vjp_kernel(valid_ref, dots_ref, gate_ref, pw_ref, env_ref, dw_ref, *refs,
                scale: float, sink: float, block_h: int, k_pad: int, with_sink_logit: bool):
  """One target, one block of heads, all K slots as [k_pad, block_h] tiles. With a sink logit
  (input [N, 1, H] after dw_ref) it also writes d sink_logit [N, 1, H] (last output)."""
  if with_sink_logit:
    sink_logit_ref, w_ref, d_dots_ref, d_gate_ref, d_pw_ref, d_env_ref, d_sink_ref = refs
  else:
    w_ref, d_dots_ref, d_gate_ref, d_pw_ref, d_env_ref = refs
  num_slots, num_heads = dots_ref.shape[1], dots_ref.shape[2]
  n = pl.program_id(0)
  heads, head_mask = _tiles.head_block(block_h, num_heads)
  k = _tiles.iota((k_pad,), 0)
  k_mask = None if k_pad == num_slots else k < num_slots
  valid = (_tiles.load_vector(valid_ref, n, k, k_mask) > 0)[:, None]  # [KP, 1]; pad lanes: False

  def load(ref):
    return _tiles.load_slots(ref, n, k, k_mask, heads, head_mask)  # [KP, BH] float32

  dots, gate = load(dots_ref), load(gate_ref)
  logits = jnp.where(valid, gate * scale * dots, _tiles.NEG_INF)
  if with_sink_logit:
    sink_logit = _tiles.load_row(sink_logit_ref, n, heads, head_mask, 1)[0]  # [BH]
    m = jnp.maximum(jnp.max(logits, axis=0), sink_logit)  # [BH]
    sink_term = sink * jnp.exp(sink_logit - m)
  else:
    m = jnp.maximum(jnp.max(logits, axis=0), 0.0)  # [BH]
    sink_term = sink * jnp.exp(-m)
  unit = jnp.where(valid, jnp.exp(logits - m[None]), 0.0)  # exp(logits - m) on valid slots
  e = unit * _tiles.load_vector(env_ref, n, k, k_mask)[:, None]  # [KP, BH]
  denom = jnp.sum(e, axis=0) + sink_term  # [BH]
  denom = jnp.where(denom > 0, denom, 1.0)[None]
  alpha = e / denom
  post_weight, d_weights = load(pw_ref), load(dw_ref)
  d_alpha = d_weights * post_weight
  row_term = jnp.sum(alpha * d_alpha, axis=0)[None]  # [1, BH]
  d_e = (d_alpha - row_term) / denom
  d_logits = d_e * e
  if with_sink_logit:  # d alpha_k / d L = -alpha_k * (the sink's share of the denominator)
    _tiles.store_row(d_sink_ref, n, heads, head_mask, -sink_term[None] / denom * row_term)

  def store(ref, value):
    _tiles.store_slots(ref, n, k, k_mask, heads, head_mask, value)

  store(w_ref, alpha * post_weight)
  store(d_pw_ref, d_weights * alpha)
  store(d_dots_ref, d_logits * scale * gate)
  store(d_gate_ref, d_logits * scale * dots)
  # This head block's share of d_envelope, in column program_id(1) of [N, K, head blocks]; the
  # caller sums the blocks.
  partial = jnp.sum(d_e * unit, axis=1, keepdims=True)  # [KP, 1]
  block = jnp.full((1,), pl.program_id(1), jnp.int32)
  _tiles.store_slots(d_env_ref, n, k, k_mask, block, None, partial)


def _vjp_call(static: _Static, dots, gate, post_weight, envelope, valid, d_weights, sink_logit):
  num_targets, num_slots, num_heads = dots.shape
  block_h = min(_BLOCK_H, pl.next_power_of_2(num_heads))
  num_head_blocks = pl.cdiv(num_heads, block_h)
  with_sink_logit = sink_logit is not None

  def edge(dtype):
    return jax.ShapeDtypeStruct((num_targets, num_slots, num_heads), dtype)

  kernel = functools.partial(_vjp_kernel, scale=static.scale, sink=static.sink, block_h=block_h,
                             k_pad=pl.next_power_of_2(num_slots), with_sink_logit=with_sink_logit)
  # Cotangents in their primal's dtype, as jax.vjp gives them; the weights and d_dots, which feed
  # float32 kernels next, in float32.
  extra_in, extra_out = (), ()
  if with_sink_logit:
    extra_in = (sink_logit.reshape(num_targets, 1, num_heads),)
    extra_out = (jax.ShapeDtypeStruct((num_targets, 1, num_heads), jnp.float32),)
  weights, d_dots, d_gate, d_post_weight, d_env, *d_sink = pl.pallas_call(
      kernel,
      out_shape=(edge(jnp.float32), edge(dots.dtype), edge(gate.dtype), edge(post_weight.dtype),
                 jax.ShapeDtypeStruct((num_targets, num_slots, num_head_blocks), jnp.float32),
                 *extra_out),
      grid=(num_targets, num_head_blocks),
      compiler_params=plt.CompilerParams(num_warps=_NUM_WARPS, num_stages=1),
      interpret=static.interpret,
      name="attention_weights_vjp",
  )(valid.astype(jnp.int32), dots, gate, post_weight, envelope, d_weights, *extra_in)
  d_sink = [d.reshape(num_targets, num_heads).astype(sink_logit.dtype) for d in d_sink]
  return (weights, d_dots, d_gate, d_post_weight, jnp.sum(d_env, axis=-1).astype(envelope.dtype),
          *d_sink)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention_weights_vjp(static: _Static, dots, gate, post_weight, envelope, valid, d_weights,
                           sink_logit):
  return _vjp_call(static, dots, gate, post_weight, envelope, valid, d_weights, sink_logit)


def _attention_weights_vjp_fwd(static, dots, gate, post_weight, envelope, valid, d_weights,
                               sink_logit):
  out = _vjp_call(static, dots, gate, post_weight, envelope, valid, d_weights, sink_logit)
  return out, (dots, gate, post_weight, envelope, valid, d_weights, sink_logit)


def _attention_weights_vjp_bwd(static, residuals, cotangents):
  dots, gate, post_weight, envelope, valid, d_weights, sink_logit = residuals

  def reference(dots, gate, post_weight, envelope, d_weights, sink_logit):
    return attention_weights_vjp_reference(dots, gate, post_weight, envelope, valid, d_weights,
                                           scale=static.scale, sink=static.sink,
                                           sink_logit=sink_logit)

  _, vjp = jax.vjp(reference, dots, gate, post_weight, envelope, d_weights, sink_logit)
  d_dots, d_gate, d_post_weight, d_envelope, d_d_weights, d_sink_logit = vjp(cotangents)
  return d_dots, d_gate, d_post_weight, d_envelope, None, d_d_weights, d_sink_logit


_attention_weights_vjp.defvjp(_attention_weights_vjp_fwd, _attention_weights_vjp_bwd)


def attention_weights_vjp(
    dots: Float[Array, "N K H"], gate: Float[Array, "N K H"], post_weight: Float[Array, "N K H"],
    envelope: Float[Array, "N K"], valid: Bool[ArrayLike, "N K"], d_weights: Float[Array, "N K H"],
    *, scale: float, sink: float, sink_logit: Float[Array, "N H"] | None = None,
    interpret: bool = False) -> WeightsAndCotangents:
  """The weights and the cotangents of (dots, gate, post_weight, envelope[, sink_logit]), fused in
  one kernel.

  Args:
    dots: float32 q.k products; gate, post_weight, envelope, valid: as in ``attention_weights``;
    d_weights: cotangent of the weights.
    scale, sink, sink_logit: as in ``attention_weights``.
    interpret: run the kernel in the Pallas interpreter (CPU testing).

  Returns:
    (weights, d_dots, d_gate, d_post_weight, d_envelope), plus d_sink_logit when a sink logit is
    given; the weights in
    float32 (>= dots' dtype for the reference), each cotangent in its primal's dtype.
    Differentiable (through the reference's VJP).

  Raises:
    ValueError: on shapes that do not match dots [N, K, H].
  """
  if dots.ndim != 3:
    raise ValueError(f"dots must be [N, K, H]; got {dots.shape=}")
  named = dict(gate=gate, post_weight=post_weight, d_weights=d_weights, envelope=envelope,
               valid=valid, **({} if sink_logit is None else {"sink_logit": sink_logit}))
  for name, x in named.items():
    expected = {"envelope": dots.shape[:2], "valid": dots.shape[:2],
                "sink_logit": (dots.shape[0], dots.shape[2])}.get(name, dots.shape)
    if x.shape != expected:
      raise ValueError(f"{name} must be {expected} for dots {dots.shape}; got {x.shape}")
  static = _Static(float(scale), float(sink), bool(interpret))
  return _attention_weights_vjp(static, dots, gate, post_weight, envelope, valid, d_weights,
                                sink_logit)
