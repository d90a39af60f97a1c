"""Row layout helpers: (l, m) <-> row, in the e3nn order."""

from __future__ import annotations

import numpy as np
import pytest

from e2former_jax import so3


def test_lmax2_layout_matches_spec_section_1():
  assert so3.num_rows(2) == 9
  np.testing.assert_array_equal(so3.row_degrees(2), [0, 1, 1, 1, 2, 2, 2, 2, 2])
  np.testing.assert_array_equal(so3.row_orders(2), [0, -1, 0, 1, -2, -1, 0, 1, 2])
  assert so3.degree_slice(1) == slice(1, 4)
  assert so3.degree_slice(2) == slice(4, 9)


@pytest.mark.parametrize("lmax", [0, 1, 3, 5])
def test_row_index_inverts_row_degrees_and_orders(lmax):
  pairs = zip(so3.row_degrees(lmax), so3.row_orders(lmax))
  rows = [so3.row_index(int(l), int(m)) for l, m in pairs]
  assert rows == list(range(so3.num_rows(lmax)))
  assert so3.lmax_from_rows(so3.num_rows(lmax)) == lmax


@pytest.mark.parametrize("call", [
    lambda: so3.lmax_from_rows(8),
    lambda: so3.lmax_from_rows(0),
    lambda: so3.row_index(1, 2),
    lambda: so3.num_rows(-1),
    lambda: so3.row_degrees(-1),
])
def test_bad_layout_arguments_raise(call):
  with pytest.raises(ValueError):
    call()
