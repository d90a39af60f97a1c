"""Dispatcher of the fused radial MLP forward (docs/model.md §4.3).

The model's radial MLP (``nn.radial.RadialMLP``) is its own reference: under ``AttentionImpl.XLA``
it runs as written. Under the Pallas implementations its forward pass is the fused kernel
``pallas_kernels.radial_mlp``, and its derivatives are those of the module's own forward (chunked
or not), through a custom VJP: energy + forces and training compute exactly what they computed
before, while a pass that differentiates nothing (energy + the direct head's forces, energies)
never writes the basis or a hidden activation to memory.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from jaxtyping import Array, ArrayLike, Float, Int

import pallas_kernels
from e2former_jax.config import AttentionImpl
from e2former_jax.ops.attention import resolve_impl

RadialMLPWeights = pallas_kernels.RadialMLPWeights


def radial_mlp(reference: Callable[..., Any], weights_of: Callable[[Any], RadialMLPWeights],
               params: Any, source: Float[Array, "M D"], nbr_idx: Int[ArrayLike, "N K"],
               distances: Float[Array, "N K"], target: Float[Array, "N D"],
               slot_weights: Float[Array, "N K W"] | None = None, *, cutoff: float, num_rbf: int,
               eps: float, out_blocks: tuple[int, ...] | None, dtype: Any, impl: AttentionImpl
               ) -> Float[Array, "N _ _"] | tuple[Float[Array, "N _ _"], ...]:
  """``reference(params, source, nbr_idx, distances, target[, slot_weights])``, in a fused kernel
  where it is not differentiated.

  Args:
    reference: the MLP as the model writes it (the XLA implementation and, under Pallas, the
      function whose VJP is used).
    weights_of: the kernel's parameters from ``params``.
    params: the MLP's parameters (differentiable).
    source, target: the first layer's type terms per source / target atom.
    nbr_idx: source of each slot (the sentinel M reads no source term).
    distances: edge lengths. slot_weights: optional per-slot weights to contract the output with.
    cutoff, num_rbf, eps, out_blocks, dtype: the MLP's (see ``pallas_kernels.radial_mlp``).
    impl: implementation.
  Returns:
    What ``reference`` returns: [N, K, F], or [N, W, F] with slot weights; a tuple of column
    blocks with ``out_blocks``.
  """
  rows = (distances, target) + (() if slot_weights is None else (slot_weights,))
  impl = resolve_impl(impl)
  if impl is AttentionImpl.XLA:
    return reference(params, source, nbr_idx, *rows)

  def kernel(params, source, nbr_idx, distances, target, *slot_weights):
    out = pallas_kernels.radial_mlp(
        distances, target, source, nbr_idx, *slot_weights, weights=weights_of(params),
        cutoff=cutoff, num_rbf=num_rbf, eps=eps, out_blocks=out_blocks, dtype=dtype,
        interpret=impl is AttentionImpl.PALLAS_INTERPRET)
    return out if out_blocks is not None else out[0]

  return _fused_forward(kernel, reference, params, source, nbr_idx, *rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_forward(kernel, reference, params, source, nbr_idx, *rows):
  return kernel(params, source, nbr_idx, *rows)


def _fused_forward_fwd(kernel, reference, params, source, nbr_idx, *rows):
  del kernel  # differentiated: the reference runs instead, once, and keeps what its VJP needs
  return jax.vjp(lambda p, s, *r: reference(p, s, nbr_idx, *r), params, source, *rows)


def _fused_forward_bwd(kernel, reference, vjp, cotangents):
  d_params, d_source, *d_rows = vjp(cotangents)
  return (d_params, d_source, None, *d_rows)


_fused_forward.defvjp(_fused_forward_fwd, _fused_forward_bwd)
