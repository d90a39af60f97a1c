"""Dispatcher of the fused radial MLP (docs/model.md §4.3, §11.8).

The model's radial MLP (``nn.radial.RadialMLP``) is its own reference: under ``AttentionImpl.XLA``
it runs as written. Under the Pallas implementations the fused kernel ``pallas_kernels.radial_mlp``
computes it wherever nothing differentiates it (energy + direct forces). Differentiated, it is one
of two things:

* without ``vjp_kernel``, the module's own layers, which keep their activations for the backward
  pass: time and memory of energy + forces and of training are XLA's;
* with ``vjp_kernel``, the fused forward kernel, keeping only its inputs; the first derivative takes
  the cotangents of the edge lengths and slot weights (all that forces need) from the fused
  backward kernel ``pallas_kernels.radial_mlp_geometry_vjp``, and those of the parameters and type
  terms from the module's own layers (chunked or not; XLA drops them when nothing uses them, as in
  energy + forces). Differentiated again (training on forces), the module's own VJP runs instead,
  so the second derivative and its numbers are what they are without the kernels.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

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
               eps: float, out_blocks: tuple[int, ...] | None, dtype: Any, impl: AttentionImpl,
               vjp_kernel: bool) -> Float[Array, "N _ _"] | tuple[Float[Array, "N _ _"], ...]:
  """``reference(params, source, nbr_idx, distances, target[, slot_weights])``, in fused kernels
  under the Pallas implementations.

  Args:
    reference: the MLP as the model writes it (the XLA implementation and, under Pallas, the
      function whose VJP gives the parameters' cotangents and every second derivative).
    weights_of: the kernels' parameters from ``params``.
    params: the MLP's parameters (differentiable).
    source, target: the first layer's type terms per source / target atom.
    nbr_idx: source of each slot (the sentinel M reads no source term).
    distances: edge lengths. slot_weights: optional per-slot weights to contract the output with.
    cutoff, num_rbf, eps, out_blocks, dtype: the MLP's (see ``pallas_kernels.radial_mlp``).
    impl: implementation.
    vjp_kernel: under Pallas, differentiate through the fused backward kernel (keeping no
      activation) rather than XLA's layers (keeping theirs).
  Returns:
    What ``reference`` returns: [N, K, F], or [N, W, F] with slot weights; a tuple of column
    blocks with ``out_blocks``.
  """
  rows = (distances, target) + (() if slot_weights is None else (slot_weights,))
  impl = resolve_impl(impl)
  if impl is AttentionImpl.XLA:
    return reference(params, source, nbr_idx, *rows)
  options = dict(cutoff=cutoff, num_rbf=num_rbf, eps=eps, out_blocks=out_blocks, dtype=dtype,
                 interpret=impl is AttentionImpl.PALLAS_INTERPRET)

  def forward(params, source, nbr_idx, distances, target, *slot_weights):
    out = pallas_kernels.radial_mlp(distances, target, source, nbr_idx, *slot_weights,
                                    weights=weights_of(params), **options)
    return out if out_blocks is not None else out[0]

  def geometry_vjp(params, source, nbr_idx, distances, target, *rest):
    *slot_weights, cotangents = rest
    cotangents = cotangents if out_blocks is not None else (cotangents,)
    d_distances, d_slot_weights = pallas_kernels.radial_mlp_geometry_vjp(
        distances, target, source, nbr_idx, *(slot_weights or (None,)), cotangents,
        weights=weights_of(params), **options)
    return (d_distances,) + (() if d_slot_weights is None else (d_slot_weights,))

  fused = _fused if vjp_kernel else _forward_kernel
  return fused(_Kernels(forward, geometry_vjp, reference), params, source, nbr_idx, *rows)


class _Kernels(NamedTuple):
  """The functions of one MLP call: the custom VJPs' static argument."""

  forward: Callable[..., Any]
  geometry_vjp: Callable[..., Any]
  reference: Callable[..., Any]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(fns: _Kernels, params, source, nbr_idx, *rows):
  return fns.forward(params, source, nbr_idx, *rows)


def _fused_fwd(fns, params, source, nbr_idx, *rows):
  # Through the custom_vjp, so that an outer derivative of the output stays on these rules; only
  # the inputs are kept.
  return _fused(fns, params, source, nbr_idx, *rows), (params, source, nbr_idx, rows)


def _fused_bwd(fns, residuals, cotangents):
  params, source, nbr_idx, rows = residuals
  d_params, d_source, d_rows = _cotangents(fns, params, source, nbr_idx, rows, cotangents)
  return (d_params, d_source, None, *d_rows)


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _forward_kernel(fns: _Kernels, params, source, nbr_idx, *rows):
  return fns.forward(params, source, nbr_idx, *rows)


def _forward_kernel_fwd(fns, params, source, nbr_idx, *rows):
  # Differentiated, the kernel does not run: the layers do, and keep their activations (the VJP's
  # residuals), as under XLA.
  return _reference_vjp(fns, params, source, nbr_idx, rows)


def _forward_kernel_bwd(fns, vjp, cotangents):
  d_params, d_source, *d_rows = vjp(cotangents)
  return (d_params, d_source, None, *d_rows)


_forward_kernel.defvjp(_forward_kernel_fwd, _forward_kernel_bwd)


def _reference_vjp(fns: _Kernels, params, source, nbr_idx, rows):
  """(output, VJP) of the reference with respect to params, source and rows."""
  return jax.vjp(lambda p, s, *r: fns.reference(p, s, nbr_idx, *r), params, source, *rows)


def _reference_cotangents(fns: _Kernels, params, source, nbr_idx, rows, cotangents):
  _, vjp = _reference_vjp(fns, params, source, nbr_idx, rows)
  d_params, d_source, *d_rows = vjp(cotangents)
  return d_params, d_source, tuple(d_rows)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _cotangents(fns: _Kernels, params, source, nbr_idx, rows, cotangents):
  """(d params, d source, d rows): the edge lengths' and slot weights' (rows 0 and 2) from the
  fused kernel, the rest from the reference's VJP."""
  d_params, d_source, (_, d_target, *_) = _reference_cotangents(fns, params, source, nbr_idx,
                                                                rows, cotangents)
  d_distances, *d_slot_weights = fns.geometry_vjp(params, source, nbr_idx, *rows, cotangents)
  return d_params, d_source, (d_distances, d_target, *d_slot_weights)


def _cotangents_fwd(fns, params, source, nbr_idx, rows, cotangents):
  return jax.vjp(lambda p, s, r, g: _reference_cotangents(fns, p, s, nbr_idx, r, g), params,
                 source, rows, cotangents)


def _cotangents_bwd(fns, vjp, cotangents):
  d_params, d_source, d_rows, d_cotangents = vjp(cotangents)
  return d_params, d_source, None, d_rows, d_cotangents


_cotangents.defvjp(_cotangents_fwd, _cotangents_bwd)
