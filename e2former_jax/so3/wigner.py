"""Wigner D-matrices of SO(3) in the e3nn real basis, with Y^l(R r) = D^l(R) Y^l(r).

Angles follow e3nn: R(alpha, beta, gamma) = R_y(alpha) R_x(beta) R_y(gamma), gamma applied first.
D^1(R) = R, because the rows of degree 1 are (x, y, z).
"""

from __future__ import annotations

import functools
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from e2former_jax.so3.clebsch_gordan import clebsch_gordan
from e2former_jax.so3.layout import num_rows

# A rotation by pi about (1, 1, 0)/sqrt(2): swaps x and y and flips z. Conjugating a rotation about
# y with it gives the same rotation about x, so D_x(beta) = J D_y(beta) J with J = D(_SWAP_XY).
_SWAP_XY = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])


def wigner_d(l: int, rotation_matrix: Float[Array, "*batch 3 3"]) -> Float[Array, "*batch O O"]:
  r"""D^l(R) for proper rotations R (O = 2l+1 orders).

  Built by the recursion :math:`D^l = (2l+1)\,C^\top (D^{l-1} \otimes R)\, C` with
  C = CG^{l-1,1,l} (unit norm): D^l is the degree-l block of D^{l-1} (x) D^1. Exact and polynomial
  in R, so smooth everywhere (no Euler angles, no gimbal lock).

  Raises:
    ValueError: if ``rotation_matrix`` is not [..., 3, 3] or l < 0.
  """
  return _wigner_d_list(l, rotation_matrix, jnp)[l]


def wigner_d_from_angles(l: int, alpha: Float[ArrayLike, "*#batch"],
                         beta: Float[ArrayLike, "*#batch"], gamma: Float[ArrayLike, "*#batch"]
                         ) -> Float[Array, "*#batch O O"]:
  """D^l(R_y(alpha) R_x(beta) R_y(gamma)) of angles that broadcast (O = 2l+1 orders).

  Evaluated in closed form as Y(alpha) J Y(beta) J Y(gamma), with Y the rotation about the polar
  axis and the constant involution J = D^l(rotation by pi about (1, 1, 0)/sqrt(2)).
  """
  dtype = jnp.result_type(alpha, beta, gamma, float)
  j = jnp.asarray(_swap_xy(l), dtype)
  return (
      _y_rotation(l, alpha, dtype) @ j @ _y_rotation(l, beta, dtype) @ j
      @ _y_rotation(l, gamma, dtype)
  )


def rotation_matrix_from_angles(alpha: Float[ArrayLike, "*#batch"],
                                beta: Float[ArrayLike, "*#batch"],
                                gamma: Float[ArrayLike, "*#batch"]) -> Float[Array, "*#batch 3 3"]:
  """R_y(alpha) R_x(beta) R_y(gamma) of angles that broadcast (= D^1)."""
  return wigner_d_from_angles(1, alpha, beta, gamma)


def wigner_d_block_diag(lmax: int, rotation_matrix: Float[Array, "*batch 3 3"]
                        ) -> Float[Array, "*batch S S"]:
  """blockdiag(D^0, ..., D^lmax)(R), acting on feature rows."""
  rows = num_rows(lmax)
  out = jnp.zeros(rotation_matrix.shape[:-2] + (rows, rows), rotation_matrix.dtype)
  for l, block in enumerate(_wigner_d_list(lmax, rotation_matrix, jnp)):
    out = out.at[..., l * l : (l + 1) ** 2, l * l : (l + 1) ** 2].set(block)
  return out


def _wigner_d_list(lmax: int, rotation_matrix, xp: ModuleType) -> list:
  """[D^0, ..., D^lmax] by the CG recursion, with ``xp`` = numpy (static tables) or jax.numpy."""
  if rotation_matrix.shape[-2:] != (3, 3):
    raise ValueError(f"rotation matrices must be [..., 3, 3], got shape {rotation_matrix.shape}")
  if lmax < 0:
    raise ValueError(f"degree must be non-negative, got {lmax}")
  blocks = [xp.ones(rotation_matrix.shape[:-2] + (1, 1), rotation_matrix.dtype)]
  for l in range(1, lmax + 1):
    cg = xp.asarray(clebsch_gordan(l - 1, 1, l), rotation_matrix.dtype)  # [2l-1, 3, 2l+1]
    coupled = xp.einsum("ija,...ik,...jn,knb->...ab", cg, blocks[-1], rotation_matrix, cg)
    blocks.append((2 * l + 1) * coupled)
  return blocks


@functools.cache
def _swap_xy(l: int) -> np.ndarray:
  return _wigner_d_list(l, _SWAP_XY, np)[l]


def _y_rotation(l: int, angle: ArrayLike, dtype) -> jax.Array:
  """D^l of the rotation by ``angle`` about y: [...] -> [..., 2l+1, 2l+1].

  Turning about the polar axis advances the azimuth phi by ``angle``, so each pair
  (S_-m ~ sin m phi, S_m ~ cos m phi) turns by m * angle and S_0 is fixed.
  """
  frequencies = jnp.arange(l, -l - 1, -1, dtype=dtype)  # row i = l + m turns by -m * angle
  phase = jnp.asarray(angle, dtype)[..., None] * frequencies  # [..., 2l+1]
  eye = jnp.eye(2 * l + 1, dtype=dtype)
  return jnp.cos(phase)[..., None] * eye + jnp.sin(phase)[..., None] * eye[::-1]
