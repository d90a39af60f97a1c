r"""First-order tensor product T(h, v) of features with a vector and its EAAS form (docs/model.md §7).

.. math::
   T(h, v)^{(l_1 \to l_3)}_{m_3, c} = \sum_{m_1, m_2} C^{l_1, 1, l_3}[m_1, m_2, m_3]\,
   h_{l_1 m_1, c}\, v_{m_2}

with C the "wonorm" Clebsch-Gordan tensor, channel-wise (channel c of the output uses channel c of
h only), over every path l1 (x) 1 -> l3 with l1, l3 <= lmax. v enters as-is, in (x, y, z) order
(the order of the degree-1 rows): T is bilinear and needs no norm.

Three evaluations that agree to rounding:

* :func:`tensor_product_vector`: the global frame with a static coupling tensor (the model's path).
* :func:`tensor_product_vector_aligned`: EAAS. Rotate h into the frame where v is along +y; there
  v has only its m = 0 component, so each output row is one input row times a constant ("parity
  re-indexing", m3 <- +-m1); rotate back.
* :func:`tensor_product_vector_dense`: one dense CG contraction per path (the oracle).

Output rows follow the "l3-sequential" layout: paths sorted (stably) by l3, each path contributing
2 l3 + 1 consecutive rows. For lmax = 2 the paths are (1,1,0), (0,1,1), (1,1,1), (2,1,1), (1,1,2),
(2,1,2), 20 rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from e2former_jax.so3.clebsch_gordan import clebsch_gordan_wonorm
from e2former_jax.so3.layout import degree_slice, lmax_from_rows, num_rows, row_index
from e2former_jax.so3.safe import safe_norm
from e2former_jax.so3.wigner import wigner_d_from_angles

# In the aligned frame v = |v| y-hat, whose only non-zero component is m2 = 0 (index 1 of l = 1).
_Y_AXIS = 1


class FirstOrderPath(NamedTuple):
  """Path l1 (x) l2 -> l3 (l2 = 1) writing output rows ``start:stop``."""

  l1: int
  l2: int
  l3: int
  start: int

  @property
  def stop(self) -> int:
    return self.start + 2 * self.l3 + 1


@functools.cache
def first_order_paths(lmax: int) -> tuple[FirstOrderPath, ...]:
  """All paths l1 (x) 1 -> l3 with l1, l3 <= lmax, sorted by (l3, l1), with their output rows.

  The order is the stable sort by l3 of the l1-major enumeration (docs/model.md §7.2).

  Raises:
    ValueError: if lmax < 0.
  """
  if lmax < 0:
    raise ValueError(f"lmax must be non-negative, got {lmax}")
  paths, start = [], 0
  for l3 in range(lmax + 1):
    for l1 in range(lmax + 1):
      if abs(l1 - 1) <= l3 <= l1 + 1:  # the triangle rule of l1 (x) 1 -> l3
        paths.append(FirstOrderPath(l1, 1, l3, start))
        start += 2 * l3 + 1
  return tuple(paths)


def num_first_order_rows(lmax: int) -> int:
  """Rows of T(h, v): the sum over paths of 2 l3 + 1 (20 for lmax = 2)."""
  paths = first_order_paths(lmax)
  return paths[-1].stop if paths else 0


@functools.cache
def first_order_coupling(lmax: int) -> Float[np.ndarray, "R S 3"]:
  """Static coupling G: T(h, v)[r, c] = sum_{s,a} G[r, s, a] h[s, c] v[a].

  The block (rows ``path.start:path.stop``, columns of degree l1) holds C^{l1,1,l3} as
  [m3, m1, m2]. Read-only float64.
  """
  coupling = np.zeros((num_first_order_rows(lmax), num_rows(lmax), 3))
  for path in first_order_paths(lmax):
    cg = clebsch_gordan_wonorm(path.l1, 1, path.l3)  # [2l1+1, 3, 2l3+1]
    coupling[path.start : path.stop, degree_slice(path.l1)] = cg.transpose(2, 0, 1)
  coupling.setflags(write=False)
  return coupling


def global_sparse_cg(lmax: int) -> tuple[Int[np.ndarray, "nnz"], Int[np.ndarray, "nnz"],
                                         Int[np.ndarray, "nnz"], Float[np.ndarray, "nnz"]]:
  """Non-zero terms of T in the global frame (docs/model.md §7.3).

  T(h, v)[out_row] = sum over terms of coef * h[in_row] * v[axis], with axis 0, 1, 2 = x, y, z.

  Returns:
    (out_row, in_row, axis) int32 arrays and coef float64, one entry per term (50 for lmax = 2),
    sorted by (out_row, in_row, axis).
  """
  coupling = first_order_coupling(lmax)
  out_row, in_row, axis = np.nonzero(coupling)
  return (
      out_row.astype(np.int32), in_row.astype(np.int32), axis.astype(np.int32),
      coupling[out_row, in_row, axis],
  )


def aligned_parity_table(lmax: int) -> tuple[Int[np.ndarray, "R"], Float[np.ndarray, "R"]]:
  """Gather table of T in the frame where v = +y-hat (docs/model.md §7.4).

  There T(h, y-hat)[r] = weight[r] * h[src[r]]: the column m2 = 0 of C^{l1,1,l3} has at most one
  non-zero per m3, at m1 = m3 when l1 + 1 + l3 is even and at m1 = -m3 when it is odd (then
  m3 = 0 is empty). Derived from the CG tensors for any lmax.

  Returns:
    src int32, the input row (in the (lmax+1)^2 layout), -1 on the empty rows;
    weight float64, 0 on the empty rows. Both read-only.
  """
  return _aligned_parity_table(lmax)


@functools.cache
def _aligned_parity_table(lmax: int) -> tuple[np.ndarray, np.ndarray]:
  src = np.full(num_first_order_rows(lmax), -1, dtype=np.int32)
  weight = np.zeros(num_first_order_rows(lmax))
  for path in first_order_paths(lmax):
    column = clebsch_gordan_wonorm(path.l1, 1, path.l3)[:, _Y_AXIS, :]  # [2l1+1, 2l3+1]
    for k in range(2 * path.l3 + 1):
      (sources,) = np.nonzero(column[:, k])
      if len(sources) > 1:
        raise AssertionError(f"path {path[:3]}, m3={k - path.l3}: several sources {sources}")
      if len(sources) == 1:
        src[path.start + k] = row_index(path.l1, int(sources[0]) - path.l1)
        weight[path.start + k] = column[sources[0], k]
  src.setflags(write=False)
  weight.setflags(write=False)
  return src, weight


def tensor_product_vector(
    h: Float[Array, "*#batch S C"], v: Float[Array, "*#batch 3"], *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST
) -> Float[Array, "*#batch R C"]:
  """T(h, v) in the global frame: two small contractions with :func:`first_order_coupling`.

  Per node, the vector is contracted into G (an [R, S] matrix) that then multiplies the features,
  so h is read and T written once. That beat a gather over the 50 non-zeros, a per-axis split and
  an unrolled sum of the terms, on CPU and on an H100 (N = 32768, C = 256, float32, HIGHEST:
  0.65 ms forward, 2.1 ms with the gradient; within 2x of the memory-bandwidth bound).

  Args:
    h: features.
    v: raw vectors (x, y, z); leading axes broadcast with h's.
    precision: of the two contractions. HIGHEST by default: DEFAULT means TF32 on GPUs, measured
      1.35x faster forward (1.7x with the gradient) but ~1e-3 relative error, which breaks
      equivariance at that level.

  Returns:
    T in the l3-sequential layout (R = 20 for lmax = 2).
  """
  lmax = _check_inputs(h, v)
  dtype = jnp.result_type(h, v)
  coupling = jnp.asarray(first_order_coupling(lmax), dtype)  # [R, S, 3]
  per_node = jnp.einsum("rsa,...a->...rs", coupling, v, precision=precision)  # [..., R, S]
  return jnp.einsum("...rs,...sc->...rc", per_node, h, precision=precision)  # [..., R, C]


def tensor_product_vector_aligned(h: Float[Array, "*#batch S C"], v: Float[Array, "*#batch 3"],
                                  gamma: Float[ArrayLike, "*#batch"] = 0.0
                                  ) -> Float[Array, "*#batch R C"]:
  """T(h, v) the EAAS way (docs/model.md §7.4), equal to :func:`tensor_product_vector`.

  With R = R_y(alpha) R_x(beta) R_y(gamma) such that R y-hat = v/|v| (any gamma):
  T(h, v) = D_out(R) [ (D(R)^T h)[src] * weight ] |v|, with D = blockdiag D^l and
  D_out = blockdiag over paths of D^{l3}. Not differentiable at v parallel to +-y (the Euler
  angles are singular there); for gradients use :func:`tensor_product_vector`.

  Args:
    h: features.
    v: raw vectors.
    gamma: the free rotation about the aligned axis (a scalar or per vector).

  Returns:
    T in the l3-sequential layout.
  """
  lmax = _check_inputs(h, v)
  dtype = jnp.result_type(h, v)
  length = safe_norm(v)  # [...]
  unit = v / jnp.where(length > 0, length, 1)[..., None]  # [..., 3]
  alpha = jnp.arctan2(unit[..., 0], unit[..., 2])
  beta = jnp.arccos(jnp.clip(unit[..., 1], -1, 1))
  gamma = jnp.asarray(gamma, dtype)
  wigner = [wigner_d_from_angles(l, alpha, beta, gamma) for l in range(lmax + 1)]

  aligned = jnp.concatenate(
      [_matmul(jnp.swapaxes(d, -1, -2), h[..., degree_slice(l), :]) for l, d in enumerate(wigner)],
      axis=-2,
  )  # [..., S, C]: h in the frame where v is along +y
  src, weight = aligned_parity_table(lmax)
  scale = jnp.asarray(weight, dtype) * length[..., None]  # [..., R]
  products = aligned[..., np.maximum(src, 0), :] * scale[..., None]  # [..., R, C]
  return jnp.concatenate(
      [_matmul(wigner[p.l3], products[..., p.start : p.stop, :]) for p in first_order_paths(lmax)],
      axis=-2,
  )


def tensor_product_vector_dense(h: Float[Array, "*#batch S C"], v: Float[Array, "*#batch 3"]
                                ) -> Float[Array, "*#batch R C"]:
  """T(h, v) by one dense CG contraction per path (the oracle).

  Args:
    h: features.
    v: raw vectors.

  Returns:
    T in the l3-sequential layout.
  """
  lmax = _check_inputs(h, v)
  dtype = jnp.result_type(h, v)
  return jnp.concatenate(
      [
          jnp.einsum(
              "ijk,...ic,...j->...kc",
              jnp.asarray(clebsch_gordan_wonorm(p.l1, 1, p.l3), dtype),
              h[..., degree_slice(p.l1), :],
              v,
              precision=jax.lax.Precision.HIGHEST,
          )
          for p in first_order_paths(lmax)
      ],
      axis=-2,
  )


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _check_inputs(h: jax.Array, v: jax.Array) -> int:
  """lmax of h [..., (lmax+1)^2, C], after checking v is [..., 3]."""
  if h.ndim < 2:
    raise ValueError(f"features must be [..., (lmax+1)^2, C], got shape {h.shape}")
  if v.shape[-1:] != (3,):
    raise ValueError(f"vectors must be [..., 3], got shape {v.shape}")
  return lmax_from_rows(h.shape[-2])
