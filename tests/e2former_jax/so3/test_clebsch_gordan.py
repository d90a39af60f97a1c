"""Clebsch-Gordan tensors (Racah formula -> e3nn real basis) against e3nn-jax."""

from __future__ import annotations

import itertools

import e3nn_jax as e3nn
import numpy as np
import pytest

from e2former_jax import so3

LMAX = 4


@pytest.mark.parametrize("l1, l2", list(itertools.product(range(LMAX + 1), repeat=2)))
def test_matches_e3nn_jax_for_every_l3(l1, l2):
  for l3 in range(2 * LMAX + 1):
    np.testing.assert_allclose(
        so3.clebsch_gordan(l1, l2, l3), e3nn.clebsch_gordan(l1, l2, l3), atol=1e-13,
        err_msg=f"CG({l1},{l2},{l3})",
    )


@pytest.mark.parametrize("l1, l2, l3", [(1, 1, 1), (2, 1, 2), (3, 2, 4), (4, 4, 2)])
def test_wonorm_gives_each_output_order_unit_weight(l1, l2, l3):
  c = so3.clebsch_gordan_wonorm(l1, l2, l3)
  np.testing.assert_allclose(c, np.sqrt(2 * l3 + 1) * so3.clebsch_gordan(l1, l2, l3))
  np.testing.assert_allclose(np.einsum("ijk,ijn->kn", c, c), np.eye(2 * l3 + 1), atol=1e-13)


def test_tables_are_read_only():
  with pytest.raises(ValueError):
    so3.clebsch_gordan(1, 1, 2)[0, 0, 0] = 1.0


def test_negative_degree_raises():
  with pytest.raises(ValueError, match="non-negative"):
    so3.clebsch_gordan(1, -1, 1)
