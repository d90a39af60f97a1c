"""First-order tensor product T(h, v): EAAS (aligned frame) == global sparse CG == dense CG."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2former_jax import so3

CHANNELS = 4

# Jitted once per module: eager op-by-op dispatch of the Wigner route costs seconds on CPU.
_global = jax.jit(so3.tensor_product_vector)
_aligned = jax.jit(so3.tensor_product_vector_aligned)
_dense = jax.jit(so3.tensor_product_vector_dense)

# The aligned-frame table of docs/model.md §7.4, typed here only as a cross-check of the generator:
# (src row or None, weight).
SPEC_ALIGNED_TABLE_LMAX2 = [
    (2, 1 / np.sqrt(3)),
    (None, 0), (0, 1.0), (None, 0),
    (3, -1 / np.sqrt(2)), (None, 0), (1, 1 / np.sqrt(2)),
    (5, np.sqrt(3 / 10)), (6, np.sqrt(2 / 5)), (7, np.sqrt(3 / 10)),
    (None, 0), (1, 1 / np.sqrt(2)), (2, np.sqrt(2 / 3)), (3, 1 / np.sqrt(2)), (None, 0),
    (8, -np.sqrt(2 / 3)), (7, -1 / np.sqrt(6)), (None, 0), (5, 1 / np.sqrt(6)), (4, np.sqrt(2 / 3)),
]


def _inputs(rng, lmax, batch=6, dtype=np.float64):
  h = rng.normal(size=(batch, so3.num_rows(lmax), CHANNELS)).astype(dtype)
  v = (rng.normal(size=(batch, 3)) * rng.uniform(0.2, 3.0, size=(batch, 1))).astype(dtype)
  return jnp.asarray(h), jnp.asarray(v)


def _output_wigner(lmax, rotation):
  """blockdiag over paths of D^{l3}(R): [..., R, R] acting on the l3-sequential rows."""
  rows = so3.num_first_order_rows(lmax)
  out = jnp.zeros(rotation.shape[:-2] + (rows, rows), rotation.dtype)
  for path in so3.first_order_paths(lmax):
    rows = slice(path.start, path.stop)
    out = out.at[..., rows, rows].set(so3.wigner_d(path.l3, rotation))
  return out


def test_lmax2_paths_and_rows_match_spec_section_5_3():
  paths = so3.first_order_paths(2)
  assert [p[:3] for p in paths] == [
      (1, 1, 0), (0, 1, 1), (1, 1, 1), (2, 1, 1), (1, 1, 2), (2, 1, 2)
  ]
  assert [(p.start, p.stop) for p in paths] == [(0, 1), (1, 4), (4, 7), (7, 10), (10, 15), (15, 20)]
  assert so3.num_first_order_rows(2) == 20
  assert so3.num_first_order_rows(3) == 20 + 2 * 7 + 5  # adds (3,1,2), (2,1,3), (3,1,3)


def test_lmax2_parity_table_matches_spec_section_5_5():
  src, weight = so3.aligned_parity_table(2)
  expected_src = [-1 if s is None else s for s, _ in SPEC_ALIGNED_TABLE_LMAX2]
  np.testing.assert_array_equal(src, expected_src)
  np.testing.assert_allclose(weight, [w for _, w in SPEC_ALIGNED_TABLE_LMAX2], atol=1e-15)


@pytest.mark.parametrize("lmax", [2, 3, 4])
def test_parity_rule_same_or_flipped_order(lmax):
  src, weight = so3.aligned_parity_table(lmax)
  orders = so3.row_orders(lmax)
  for path in so3.first_order_paths(lmax):
    for row in range(path.start, path.stop):
      m3 = row - path.start - path.l3
      if src[row] < 0:
        assert weight[row] == 0
        continue
      assert so3.row_degrees(lmax)[src[row]] == path.l1
      assert orders[src[row]] == (m3 if (path.l1 + 1 + path.l3) % 2 == 0 else -m3)


def test_global_sparse_cg_matches_spec_section_5_8_count_and_sums_to_the_product(x64, rng):
  out_row, in_row, axis, coef = so3.global_sparse_cg(2)
  assert len(coef) == 50
  h, v = _inputs(rng, 2)
  terms = coef * h[:, in_row, :].transpose(2, 0, 1) * v[:, axis]  # [C, batch, nnz]
  summed = jnp.zeros((CHANNELS, h.shape[0], 20)).at[..., out_row].add(terms).transpose(1, 2, 0)
  np.testing.assert_allclose(summed, _global(h, v), atol=1e-12)


def test_low_paths_are_dot_scale_and_cross_product(x64, rng):
  h, v = _inputs(rng, 2)
  t = _global(h, v)
  h1 = h[:, 1:4, :]  # [batch, 3, C] rows (x, y, z)
  np.testing.assert_allclose(t[:, 0], jnp.einsum("nac,na->nc", h1, v) / np.sqrt(3), atol=1e-12)
  np.testing.assert_allclose(t[:, 1:4], v[:, :, None] * h[:, :1, :], atol=1e-12)
  cross = jnp.cross(h1, v[:, :, None], axis=1)
  np.testing.assert_allclose(t[:, 4:7], cross / np.sqrt(2), atol=1e-12)


@pytest.mark.parametrize("lmax", [2, 3])
def test_aligned_equals_global_equals_dense_float64(x64, rng, lmax):
  h, v = _inputs(rng, lmax)
  dense = _dense(h, v)
  assert dense.shape == (6, so3.num_first_order_rows(lmax), CHANNELS)
  np.testing.assert_allclose(_global(h, v), dense, atol=1e-12)
  gamma = jnp.asarray(rng.uniform(0, 2 * np.pi, size=6))
  np.testing.assert_allclose(_aligned(h, v, gamma), dense, atol=1e-12)
  np.testing.assert_allclose(_aligned(h, v), dense, atol=1e-12)


@pytest.mark.parametrize("lmax", [2, 3])
def test_aligned_equals_global_equals_dense_float32(rng, lmax):
  h, v = _inputs(rng, lmax, dtype=np.float32)
  with jax.enable_x64(True):
    exact = np.asarray(_dense(h.astype(np.float64), v.astype(np.float64)))
  scale = np.abs(exact).max()
  for out in (
      _global(h, v),
      _dense(h, v),
      _aligned(h, v, jnp.float32(1.3)),
  ):
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, exact, atol=1e-6 * scale)


def test_aligned_handles_vectors_on_the_polar_axis_and_zero(x64, rng):
  h, _ = _inputs(rng, 2, batch=3)
  v = jnp.array([[0.0, 2.0, 0.0], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0]])
  np.testing.assert_allclose(_aligned(h, v, 0.4), _dense(h, v), atol=1e-12)


@pytest.mark.parametrize("lmax", [2, 3])
def test_equivariance(x64, rng, lmax):
  h, v = _inputs(rng, lmax)
  angles = [jnp.asarray(rng.uniform(0, 2 * np.pi, size=6)) for _ in range(3)]

  @jax.jit
  def rotated_minus_expected(h, v, rotation):  # T(D h, R v) - D_out T(h, v)
    rotated = so3.tensor_product_vector(
        so3.wigner_d_block_diag(lmax, rotation) @ h, jnp.einsum("nij,nj->ni", rotation, v)
    )
    return rotated - _output_wigner(lmax, rotation) @ so3.tensor_product_vector(h, v)

  difference = rotated_minus_expected(h, v, so3.rotation_matrix_from_angles(*angles))
  np.testing.assert_allclose(difference, 0, atol=1e-12)


def test_broadcasts_and_differentiates(rng):
  h, v = _inputs(rng, 2, dtype=np.float32)
  single = _global(h, v[0])
  np.testing.assert_allclose(single, _global(h, jnp.broadcast_to(v[0], v.shape)), atol=1e-6)
  loss = lambda h, v: jnp.sum(_global(h, v) ** 2)
  grad_h, grad_v = jax.grad(loss, argnums=(0, 1))(h, jnp.zeros_like(v))
  assert np.all(np.isfinite(grad_h)) and np.all(np.isfinite(grad_v))


@pytest.mark.parametrize(
    "h_shape, v_shape", [((6, 8, 4), (6, 3)), ((9,), (3,)), ((6, 9, 4), (6, 2))]
)
def test_bad_shapes_raise(h_shape, v_shape):
  with pytest.raises(ValueError):
    _global(jnp.zeros(h_shape), jnp.zeros(v_shape))
