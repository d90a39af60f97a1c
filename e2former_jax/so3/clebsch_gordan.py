"""Real Clebsch-Gordan coefficients of SO(3) in the e3nn basis, generated from the Racah formula.

Construction (no tables typed by hand):

1. The complex SU(2) coefficients <l1 m1 l2 m2 | l3 m3> in the Condon-Shortley convention, from
   Racah's closed formula, evaluated with exact rational arithmetic.
2. A change of basis to real spherical harmonics. The real basis of degree l is the usual one
   (S_m ~ cos(m phi), S_-m ~ sin(m phi), no extra sign) with the polar axis called y, i.e. the
   textbook z-polar harmonics evaluated at (X, Y, Z) = (z, x, y). That cyclic relabelling is a
   proper rotation: it changes which Cartesian axis a row refers to (the l = 1 rows become
   x, y, z), not the coefficients. Every degree also carries the phase i^l, which makes all
   coefficients real; i^l rather than (-i)^l is e3nn's sign choice (they differ by
   (-1)^(l1+l2+l3)).
3. Normalisation to unit Frobenius norm, as e3nn's ``wigner_3j`` / e3nn-jax's ``clebsch_gordan``.

The model uses the unnormalised ("wonorm", docs/model.md §2.4) tensor sqrt(2 l3 + 1) times that, for
which sum_{m1 m2} C[m1, m2, m3] C[m1, m2, m3'] = delta_{m3 m3'}: coupling two independent inputs of
unit variance per component gives an output of unit variance per component.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
from jaxtyping import Float

# The shape of C^{l1 l2 l3}: (2 l1 + 1, 2 l2 + 1, 2 l3 + 1) orders.
CGTensor = Float[np.ndarray, "{2*l1+1} {2*l2+1} {2*l3+1}"]

# Entries below this are rounding noise of the complex-to-real change of basis (true zeros); genuine
# coefficients are far larger (the smallest for degrees <= 8 is 7e-6).
_ZERO_TOLERANCE = 1e-12


def clebsch_gordan(l1: int, l2: int, l3: int) -> CGTensor:
  """Real CG tensor with unit Frobenius norm, equal to e3nn-jax ``clebsch_gordan(l1, l2, l3)``.

  ``sum_{m1, m2} C[m1, m2, m3] x[m1] y[m2]`` is the degree-l3 part of x (x) y: it transforms as
  ``D^{l3}(R) z`` when x -> D^{l1}(R) x and y -> D^{l2}(R) y.

  Args:
    l1: degree of the first input.
    l2: degree of the second input.
    l3: degree of the output.

  Returns:
    float64, read-only; all zeros when (l1, l2, l3) violates the triangle
    inequality |l1 - l2| <= l3 <= l1 + l2.

  Raises:
    ValueError: if a degree is not a non-negative int.
  """
  return _real_clebsch_gordan(*_check_degrees(l1, l2, l3))


def clebsch_gordan_wonorm(l1: int, l2: int, l3: int) -> CGTensor:
  """The model's CG tensor sqrt(2 l3 + 1) * :func:`clebsch_gordan` ("wonorm", docs/model.md §2.4).

  Its squares sum to 2 l3 + 1, and each output order m3 receives unit total weight
  (``sum_{m1 m2} C[m1, m2, m3]^2 = 1``).

  Returns:
    float64, read-only.
  """
  return _real_clebsch_gordan_wonorm(*_check_degrees(l1, l2, l3))


def _check_degrees(*degrees: int) -> tuple[int, ...]:
  for l in degrees:
    if not isinstance(l, (int, np.integer)) or l < 0:
      raise ValueError(f"Clebsch-Gordan degrees must be non-negative ints, got {degrees}")
  return tuple(int(l) for l in degrees)


@functools.cache
def _real_clebsch_gordan_wonorm(l1: int, l2: int, l3: int) -> np.ndarray:
  c = math.sqrt(2 * l3 + 1) * _real_clebsch_gordan(l1, l2, l3)
  c.setflags(write=False)
  return c


@functools.cache
def _real_clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
  shape = (2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1)
  if not abs(l1 - l2) <= l3 <= l1 + l2:
    c = np.zeros(shape)
    c.setflags(write=False)
    return c
  # A vector x_c transforming like the complex harmonics Y_c has real coordinates x = Q x_c, so
  # C_real[i, j, k] = sum Q3[k, c] cg[a, b, c] conj(Q1[i, a]) conj(Q2[j, b]).
  c = np.einsum(
      "kc,abc,ia,jb->ijk",
      _complex_to_real(l3),
      _su2_clebsch_gordan(l1, l2, l3),
      _complex_to_real(l1).conj(),
      _complex_to_real(l2).conj(),
  )
  if np.abs(c.imag).max() > _ZERO_TOLERANCE:
    raise AssertionError(f"CG({l1},{l2},{l3}) is not real after the change of basis")
  c = c.real / np.linalg.norm(c.real)
  c[np.abs(c) < _ZERO_TOLERANCE] = 0.0
  c.setflags(write=False)
  return c


@functools.cache
def _complex_to_real(l: int) -> np.ndarray:
  """Q [2l+1, 2l+1] with (real harmonics) = Q (complex Condon-Shortley harmonics), rows m = -l..l.

  For m > 0: S_m = ((-1)^m Y_m + Y_-m) / sqrt(2) (~ cos m phi) and
  S_-m = i (Y_-m - (-1)^m Y_m) / sqrt(2) (~ sin m phi); S_0 = Y_0. Times the phase i^l.
  """
  q = np.zeros((2 * l + 1, 2 * l + 1), dtype=np.complex128)
  q[l, l] = 1.0
  for m in range(1, l + 1):
    q[l + m, l + m] = (-1) ** m
    q[l + m, l - m] = 1.0
    q[l - m, l - m] = 1j
    q[l - m, l + m] = -1j * (-1) ** m
  q[np.arange(2 * l + 1) != l] /= math.sqrt(2)
  return 1j**l * q


def _su2_clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
  """Complex <l1 m1 l2 m2 | l3 m3> [2l1+1, 2l2+1, 2l3+1] from Racah's formula (integer degrees)."""
  f = math.factorial
  triangle = Fraction(
      (2 * l3 + 1) * f(l1 + l2 - l3) * f(l1 - l2 + l3) * f(-l1 + l2 + l3), f(l1 + l2 + l3 + 1)
  )
  cg = np.zeros((2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1))
  for m1 in range(-l1, l1 + 1):
    for m2 in range(max(-l2, -l3 - m1), min(l2, l3 - m1) + 1):
      m3 = m1 + m2
      total = Fraction(0)
      for k in range(l1 + l2 - l3 + 1):
        denominators = (
            k, l1 + l2 - l3 - k, l1 - m1 - k, l2 + m2 - k, l3 - l2 + m1 + k, l3 - l1 - m2 + k
        )
        if min(denominators) >= 0:
          total += Fraction((-1) ** k, math.prod(f(d) for d in denominators))
      factorials = f(l1 + m1) * f(l1 - m1) * f(l2 + m2) * f(l2 - m2) * f(l3 + m3) * f(l3 - m3)
      cg[l1 + m1, l2 + m2, l3 + m3] = float(total) * math.sqrt(triangle * factorials)
  return cg
