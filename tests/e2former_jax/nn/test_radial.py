"""The radial MLP evaluated in chunks of target atoms equals the one-piece evaluation: values, first
derivatives and the second derivative that training on forces takes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from e2f_testing import F32_RTOL, SECOND_ORDER_RTOL, assert_close, jaxpr_equations

from e2former_jax.nn.radial import RadialMLP

# 11 targets in chunks of at most 4: three chunks of 4, one padding row.
NUM_ATOMS, NUM_SLOTS, CHUNK_ATOMS = 11, 6, 4
TYPE_DIM, HIDDEN, OUT, NUM_WEIGHTS = 5, 16, 7, 3
CUTOFF, NUM_RBF = 4.5, 8


def inputs(rng):
  """Edge lengths, type embeddings and slot weights (differentiable) and the neighbour list, with
  empty slots (sentinel NUM_ATOMS) and one atom with none."""
  nbr_idx = rng.integers(0, NUM_ATOMS, (NUM_ATOMS, NUM_SLOTS))
  nbr_idx[rng.random(nbr_idx.shape) < 0.3] = NUM_ATOMS
  nbr_idx[3] = NUM_ATOMS
  floats = dict(distances=rng.uniform(0.5, CUTOFF, (NUM_ATOMS, NUM_SLOTS)),
                target_types=rng.normal(size=(NUM_ATOMS, TYPE_DIM)),
                source_types=rng.normal(size=(NUM_ATOMS, TYPE_DIM)),
                slot_weights=rng.normal(size=(NUM_ATOMS, NUM_SLOTS, NUM_WEIGHTS)))
  return {k: jnp.asarray(v, jnp.float32) for k, v in floats.items()}, jnp.asarray(nbr_idx, jnp.int32)


@pytest.mark.parametrize("contracted", [False, True], ids=["per-slot", "slot-weighted"])
def test_chunks_equal_one_piece(rng, contracted):
  floats, nbr_idx = inputs(rng)
  if not contracted:
    floats.pop("slot_weights")
  one_piece = RadialMLP(HIDDEN, OUT, CUTOFF, NUM_RBF)
  chunked = RadialMLP(HIDDEN, OUT, CUTOFF, NUM_RBF, chunk_atoms=CHUNK_ATOMS)
  init_args = (floats["distances"], floats["target_types"], floats["source_types"], nbr_idx)
  params = one_piece.init(jax.random.key(0), *init_args)
  # Same parameter tree and initial values: chunking is a way of computing, not another model.
  assert_close(chunked.init(jax.random.key(0), *init_args), params, 0.0)

  @functools.partial(jax.jit, static_argnums=0)
  def derivatives(mlp, params, floats, cotangent):
    def run(params, floats):
      return mlp.apply(params, floats["distances"], floats["target_types"], floats["source_types"],
                       nbr_idx, floats.get("slot_weights"))

    out, vjp = jax.vjp(run, params, floats)

    def force_loss(params):
      """Squared derivative with respect to the edge lengths, as a force loss."""
      lengths = jax.grad(lambda f: jnp.sum(run(params, f) * cotangent))(floats)["distances"]
      return jnp.sum(lengths**2)

    return out, vjp(cotangent), jax.grad(force_loss)(params)

  shape = (NUM_ATOMS, NUM_WEIGHTS if contracted else NUM_SLOTS, OUT)
  cotangent = jnp.asarray(rng.normal(size=shape), jnp.float32)
  out, grads, second = derivatives(chunked, params, floats, cotangent)
  out_ref, grads_ref, second_ref = derivatives(one_piece, params, floats, cotangent)
  assert out.shape == shape
  assert_close(out, out_ref, F32_RTOL)
  assert_close(grads, grads_ref, F32_RTOL)
  assert_close(second, second_ref, SECOND_ORDER_RTOL)
  # Not vacuous: every parameter but the output bias (a constant shift) has a second derivative.
  zero = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_leaves_with_path(second_ref)
          if not np.any(g)]
  assert zero == ["['params']['out']['bias']"], zero


def test_rejects_non_positive_chunks():
  from e2former_jax.config import tiny_config

  with pytest.raises(ValueError, match="edge_chunk_atoms must be positive"):
    tiny_config(edge_chunk_atoms=0)


@pytest.mark.parametrize("chunk_atoms", [None, CHUNK_ATOMS], ids=["one piece", "chunks"])
def test_output_column_blocks_equal_one_output_layer(rng, chunk_atoms):
  """The output layer applied as column blocks: same parameters, outputs and input gradients."""
  floats, nbr_idx = inputs(rng)
  args = (floats["distances"], floats["target_types"], floats["source_types"], nbr_idx)
  whole = RadialMLP(HIDDEN, OUT, CUTOFF, NUM_RBF)
  blocks = RadialMLP(HIDDEN, OUT, CUTOFF, NUM_RBF, chunk_atoms=chunk_atoms, out_blocks=(3, OUT - 3))
  params = whole.init(jax.random.key(0), *args)
  assert_close(blocks.init(jax.random.key(0), *args), params, 0.0)
  cotangent = jnp.asarray(rng.normal(size=(NUM_ATOMS, NUM_SLOTS, OUT)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grad(mlp, params, distances):
    def loss(params, distances):
      out = mlp.apply(params, distances, *args[1:])
      out = jnp.concatenate(out, -1) if isinstance(out, tuple) else out
      return jnp.sum(out * cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))(params, distances)

  assert_close(value_and_grad(blocks, params, args[0]), value_and_grad(whole, params, args[0]),
               F32_RTOL)


@pytest.mark.parametrize("chunk_atoms", [None, CHUNK_ATOMS], ids=["one piece", "chunks"])
def test_bfloat16_mlp_scatters_source_cotangents_in_float32(rng, chunk_atoms):
  """In bfloat16 (mixed precision) the parameter gradient's scatter of per-edge cotangents into the
  per-atom source term runs in float32 (docs/performance.md §4: in bfloat16 it was a training
  step's largest fusion); the output stays bfloat16."""
  floats, nbr_idx = inputs(rng)
  mlp = RadialMLP(HIDDEN, OUT, CUTOFF, NUM_RBF, chunk_atoms=chunk_atoms, dtype=jnp.bfloat16)
  args = (floats["distances"], floats["target_types"], floats["source_types"], nbr_idx)
  params = mlp.init(jax.random.key(0), *args)
  assert mlp.apply(params, *args).dtype == jnp.bfloat16

  def loss(params):
    return jnp.sum(mlp.apply(params, *args).astype(jnp.float32) ** 2)

  scatters = [e for e in jaxpr_equations(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
              if e.primitive.name == "scatter-add"]
  source_shape = (NUM_ATOMS, HIDDEN)
  dtypes = [e.outvars[0].aval.dtype for e in scatters if e.outvars[0].aval.shape == source_shape]
  assert dtypes == [jnp.float32], dtypes
