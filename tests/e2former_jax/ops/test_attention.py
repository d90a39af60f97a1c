"""The dispatcher's attention message: model layout, kernels against XLA, against the per-edge formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import ops, so3
from e2former_jax.config import AttentionImpl

N, K, H, D, LMAX, C = 10, 6, 2, 4, 2, 4
S = so3.num_rows(LMAX)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  nbr_idx = rng.integers(0, N, (N, K)).astype(np.int32)
  nbr_mask = rng.random((N, K)) < 0.7
  nbr_idx[~nbr_mask] = N
  return dict(q=f(N, H, D), k=f(N, H, D), gate=f(N, K, H), post_weight=f(N, K, H),
              envelope=jnp.asarray(rng.uniform(0, 1, (N, K)), jnp.float32), vectors=f(N, K, 3),
              v=f(N, S, C), nbr_idx=jnp.asarray(nbr_idx), nbr_mask=jnp.asarray(nbr_mask))


def message_of(x, impl):
  return ops.message_attention(x["q"], x["k"], x["gate"], x["post_weight"], x["envelope"],
                               x["vectors"], x["v"], x["nbr_idx"], x["nbr_mask"], impl=impl)


def test_message_is_the_per_edge_formula(inputs):
  x = inputs
  mask = np.asarray(x["nbr_mask"])
  safe = np.where(mask, np.asarray(x["nbr_idx"]), 0)
  dots = jnp.einsum("nhd,nkhd->nkh", x["q"], x["k"][safe], precision="highest")
  weights = ops.attention_weights(dots, x["gate"], x["post_weight"], x["envelope"], x["nbr_mask"],
                                  head_dim=D)  # [N, K, H]
  edge_tp = so3.tensor_product_vector(x["v"][safe], x["vectors"])  # [N, K, R, C]
  expected = jnp.einsum("nkc,nkrc->nrc", jnp.tile(weights, (1, 1, C // H)), edge_tp,
                        precision="highest")
  np.testing.assert_allclose(message_of(x, AttentionImpl.XLA), expected, rtol=1e-5, atol=1e-5)


def test_kernels_match_xla_with_gradients(inputs):
  x = inputs
  names = ("q", "k", "gate", "vectors", "v")

  def loss(*args, impl):
    out = message_of(dict(x, **dict(zip(names, args))), impl)  # [N, R, C]
    return jnp.sum(out * jnp.cos(out)), out

  args = tuple(x[name] for name in names)
  grad = jax.value_and_grad(loss, argnums=range(len(names)), has_aux=True)
  (_, out), grads = grad(*args, impl=AttentionImpl.PALLAS_INTERPRET)
  (_, out_ref), grads_ref = grad(*args, impl=AttentionImpl.XLA)
  np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-5)
  for g, g_ref in zip(grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * np.abs(g_ref).max())


def test_auto_chooses_the_kernels_exactly_on_gpu(inputs, monkeypatch):
  """AUTO (the default) resolves by the platform being traced for: Pallas on GPU, XLA elsewhere."""
  import pallas_kernels

  assert ops.resolve_impl(AttentionImpl.AUTO) is AttentionImpl.XLA  # this CPU
  calls = []

  def kernel(*args, interpret, **kwargs):
    calls.append(interpret)
    return pallas_kernels.message_attention_reference(*args, **kwargs)

  monkeypatch.setattr(pallas_kernels, "message_attention", kernel)
  message_of(inputs, AttentionImpl.AUTO)
  assert calls == []
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert ops.resolve_impl(AttentionImpl.AUTO) is AttentionImpl.PALLAS
  for explicit in (AttentionImpl.XLA, AttentionImpl.PALLAS_INTERPRET):
    assert ops.resolve_impl(explicit) is explicit  # an explicit choice is kept on any platform
  np.testing.assert_array_equal(message_of(inputs, AttentionImpl.AUTO),
                                message_of(inputs, AttentionImpl.XLA))
  assert calls == [False]  # the compiled (not interpreted) kernels
