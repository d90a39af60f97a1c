"""NaN-free geometry primitives: finite values and derivatives of every order at the zero vector."""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float


def safe_norm(x: Float[Array, "..."], axis: int = -1, keepdims: bool = False
              ) -> Float[Array, "..."]:
  """Euclidean norm ``sqrt(sum(x^2, axis))`` whose gradient is 0 (not NaN) at x = 0.

  The plain norm has gradient x/|x|, which is 0/0 at the origin (padded neighbour slots, an atom at
  the centre of mass). The double-``where`` keeps the sqrt away from 0 in *both* branches, so the
  derivative of the unused branch is finite too and nothing NaN leaks through the select.

  Args:
    x: [..., D, ...] vectors along ``axis``.
    axis: the vector axis.
    keepdims: keep ``axis`` with size 1.

  Returns:
    [...] norms (``axis`` removed unless ``keepdims``), dtype of ``x``.
  """
  squared = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  nonzero = squared > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squared, 1)), 0)
