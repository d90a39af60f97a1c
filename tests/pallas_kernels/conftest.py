"""Fixtures for the Pallas kernel tests: ragged neighbour lists and comparison helpers.

Test modules are not importable (no packages under tests/), so helpers reach them through the
``kt`` fixture rather than imports.
"""

from __future__ import annotations

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Ragged sizes: N is no multiple of anything, M != N, K = 6 with block_k 4 leaves a partial slot
# block, H = 6 with block_h 4 a partial head block, and X, D are padded to 8 and 4 in registers.
NUM_TARGETS = 11
NUM_SOURCES = 9
NUM_SLOTS = 6
NUM_HEADS = 6
ROW_DIM = 5
HEAD_DIM = 3


@dataclasses.dataclass(frozen=True)
class NeighborCase:
  """A neighbour list with every awkward case, and which rows/slots they are in."""

  nbr_idx: jax.Array  # [N, K] int32
  nbr_mask: jax.Array  # [N, K] bool
  valid: np.ndarray  # [N, K] bool: mask and index in range
  empty_target: int  # no slot set, sentinel indices
  masked_garbage_target: int  # no slot set, in-range garbage indices
  duplicate_target: int  # one source in three valid slots
  unused_source: int  # no valid slot points here

  @property
  def num_targets(self) -> int:
    return self.nbr_idx.shape[0]


def make_neighbor_case(rng: np.random.Generator, num_targets=NUM_TARGETS, num_sources=NUM_SOURCES,
                       num_slots=NUM_SLOTS) -> NeighborCase:
  idx = rng.integers(0, num_sources, size=(num_targets, num_slots))
  mask = rng.random((num_targets, num_slots)) < 0.7
  unused = num_sources - 1
  idx[idx == unused] = 0
  # Masked slots hold the sentinel M or in-range garbage: neither may be dereferenced or counted.
  idx = np.where(mask | (rng.random(idx.shape) < 0.5), idx, num_sources)
  mask[0], idx[0] = False, num_sources
  mask[1], idx[1] = False, rng.integers(0, num_sources - 1, num_slots)
  mask[2, :3], idx[2, :3] = True, num_sources // 3
  return NeighborCase(jnp.asarray(idx, jnp.int32), jnp.asarray(mask), mask.copy(), 0, 1, 2, unused)


@pytest.fixture
def neighbors(rng) -> NeighborCase:
  return make_neighbor_case(rng)


def normal(rng: np.random.Generator, *shape, dtype=jnp.float32) -> jax.Array:
  return jnp.asarray(rng.normal(size=shape).astype(np.float32)).astype(dtype)


def assert_close(actual, expected, rtol: float, name: str = "") -> None:
  """max |actual - expected| <= rtol * max(1, max |expected|), elementwise over a pytree."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a = np.asarray(a, np.float64)
    e = np.asarray(e, np.float64)
    assert a.shape == e.shape, (name, a.shape, e.shape)
    assert np.all(np.isfinite(a)), f"{name}: non-finite values"
    err = np.max(np.abs(a - e), initial=0.0)
    bound = rtol * max(1.0, np.max(np.abs(e), initial=0.0))
    assert err <= bound, f"{name}: max abs error {err:.3e} > {bound:.3e}"


def max_error(actual, truth) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - np.asarray(truth, np.float64))))


def upcast(tree):
  return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def input_grads(fn, inputs, cotangent):
  """Gradient of <cotangent, fn(*inputs)> with respect to every input (a VJP)."""
  return jax.grad(lambda *xs: jnp.sum(fn(*xs) * cotangent), argnums=range(len(inputs)))(*inputs)


def second_order_grads(fn, inputs, cotangent, directions):
  """Reverse over reverse, the shape of force training: the gradient over the inputs of
  <directions, gradient over the inputs of the nonlinear loss sum(cotangent * fn^2)>."""
  argnums = range(len(inputs))

  def first(*xs):
    return jax.grad(lambda *ys: jnp.sum(cotangent * fn(*ys) ** 2), argnums=argnums)(*xs)

  def contracted(*xs):
    return sum(jnp.sum(r * g) for r, g in zip(directions, first(*xs)))

  return jax.grad(contracted, argnums=argnums)(*inputs)


def assert_invalid_slots_exactly_zero(run_kernel, inputs, cotangent, neighbors: NeighborCase,
                                      edge_inputs: tuple[int, ...]) -> None:
  """For an attention op with inputs (q, k, ..., values): the output of targets without a valid
  slot, the gradients (of <cotangent, out>) of the per-edge inputs at positions ``edge_inputs`` on
  invalid slots, d q on those targets and d k, d values on unused sources are exactly 0."""
  empty = [neighbors.empty_target, neighbors.masked_garbage_target]
  assert np.all(np.asarray(run_kernel(*inputs))[empty] == 0)
  grads = [np.asarray(g) for g in input_grads(run_kernel, inputs, cotangent)]
  invalid = ~neighbors.valid
  for i in edge_inputs:
    assert np.all(grads[i][invalid] == 0), f"input {i}"
  assert np.all(grads[0][empty] == 0)
  assert np.all(grads[1][neighbors.unused_source] == 0)
  assert np.all(grads[-1][neighbors.unused_source] == 0)


# Absolute slack of the bf16 budget, for outputs and gradients that are ~0.
BF16_ATOL = 1e-5


def assert_bf16_within_twice_reference(run_kernel, run_reference, inputs, cotangent) -> None:
  """bf16 inputs, float32 accumulation: for the output and the gradient of every input (of the
  linear functional <cotangent, out>), the kernel's error against the float32 truth (the reference
  on upcast inputs) is at most twice the bf16 reference's; dtypes match the reference's."""
  def value_and_grads(fn, xs):
    def loss(*ys):
      return jnp.sum(fn(*ys).astype(jnp.float32) * cotangent)
    return fn(*xs), jax.grad(loss, argnums=range(len(xs)))(*xs)

  truth = value_and_grads(run_reference, upcast(inputs))
  baseline = value_and_grads(run_reference, inputs)
  kernel = value_and_grads(run_kernel, inputs)
  assert jax.tree.map(lambda x: x.dtype, kernel) == jax.tree.map(lambda x: x.dtype, baseline)
  for got, base, true in zip(jax.tree.leaves(kernel), jax.tree.leaves(baseline),
                             jax.tree.leaves(truth)):
    assert max_error(got, true) <= 2 * max_error(base, true) + BF16_ATOL


@pytest.fixture
def kt() -> types.SimpleNamespace:
  """Kernel-test helpers and the standard ragged sizes."""
  return types.SimpleNamespace(
      N=NUM_TARGETS, M=NUM_SOURCES, K=NUM_SLOTS, H=NUM_HEADS, X=ROW_DIM, D=HEAD_DIM,
      make_neighbor_case=make_neighbor_case, normal=normal, assert_close=assert_close,
      max_error=max_error, upcast=upcast,
      assert_bf16_within_twice_reference=assert_bf16_within_twice_reference,
      assert_invalid_slots_exactly_zero=assert_invalid_slots_exactly_zero,
      input_grads=input_grads, second_order_grads=second_order_grads)
