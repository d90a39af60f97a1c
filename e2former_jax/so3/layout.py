"""Row layout of equivariant features: rows ``l^2 .. l^2 + 2l`` hold degree l, orders m = -l..l.

Features are ``[..., (lmax+1)^2, C]`` (spherical-harmonic rows, then channels last), the e3nn row
order: row 0 is l = 0, rows 1..3 are l = 1 with m = -1, 0, +1 ~ (x, y, z), rows 4..8 are l = 2, ...
"""

from __future__ import annotations

import math

import numpy as np
from jaxtyping import Int


def num_rows(lmax: int) -> int:
  """Number of rows (lmax+1)^2 of a feature tensor holding degrees 0..lmax."""
  _check_degree(lmax, "lmax")
  return (lmax + 1) ** 2


def lmax_from_rows(rows: int) -> int:
  """Inverse of :func:`num_rows`.

  Raises:
    ValueError: if ``rows`` is not a positive perfect square.
  """
  lmax = math.isqrt(rows) - 1 if rows > 0 else -1
  if lmax < 0 or (lmax + 1) ** 2 != rows:
    raise ValueError(f"{rows} rows is not (lmax+1)^2 for any lmax >= 0")
  return lmax


def row_index(l: int, m: int) -> int:
  """Row of the component (l, m), ``l^2 + l + m``."""
  _check_degree(l, "l")
  if abs(m) > l:
    raise ValueError(f"order m={m} is outside -l..l for l={l}")
  return l * l + l + m


def degree_slice(l: int) -> slice:
  """Rows of degree l: ``slice(l^2, (l+1)^2)``."""
  _check_degree(l, "l")
  return slice(l * l, (l + 1) ** 2)


def row_degrees(lmax: int) -> Int[np.ndarray, "S"]:
  """Degree l of every row, e.g. [0, 1, 1, 1, 2, 2, 2, 2, 2] for lmax=2."""
  _check_degree(lmax, "lmax")
  return np.concatenate([np.full(2 * l + 1, l) for l in range(lmax + 1)]).astype(np.int32)


def row_orders(lmax: int) -> Int[np.ndarray, "S"]:
  """Order m of every row, e.g. [0, -1, 0, 1, -2, ..., 2] for lmax=2."""
  _check_degree(lmax, "lmax")
  return np.concatenate([np.arange(-l, l + 1) for l in range(lmax + 1)]).astype(np.int32)


def _check_degree(l: int, name: str) -> None:
  if not isinstance(l, (int, np.integer)) or l < 0:
    raise ValueError(f"{name} must be a non-negative int, got {l!r}")
