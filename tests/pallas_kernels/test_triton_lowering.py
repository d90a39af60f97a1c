"""Lower the real Triton kernels for an abstract H100 on CPU, at the paper's sizes.

Interpret mode hides what Triton rejects (non-power-of-two tiles, unsupported ops); this runs the
whole Pallas -> Triton IR lowering without a GPU. It also checks the
linear-memory claim on the lowered programs: no array anywhere in forward, backward or double
backward is larger than [N, K, H] per-edge scalars or [N, X, H] node rows, i.e. nothing like a
per-edge gather [N, K, D, H] or [N, K, X, H] is materialised.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh

import pallas_kernels as pk
from e2former_jax import so3

# Paper configuration (docs/model.md §8): H = 128 heads of d = 8, C / H = 2 channel groups, K = 32.
NUM_HEADS = 128
HEAD_DIM = 8
NUM_SLOTS = 32
NUM_TARGETS = 96  # ragged for any block; the kernels' grid has one program per target row
NUM_SOURCES = 80  # M != N
GROUPS = 2  # C / H channel groups of message_attention's value rows
COUPLING = so3.first_order_coupling(2)  # lmax = 2: S = 9 feature rows, R = 20 output rows
# The widest node-row array: the output's R G rows (the values have S G).
ROW_DIM = max(COUPLING.shape[:2]) * GROUPS
TRITON_CALL = "__gpu$xla.gpu.triton"
_TENSOR_TYPE = re.compile(r"tensor<((?:\d+x)+)[a-z]")


def _h100_mesh() -> AbstractMesh:
  device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  return AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)


def _message_specs(dtype):
  s = jax.ShapeDtypeStruct
  n, m, k, h = NUM_TARGETS, NUM_SOURCES, NUM_SLOTS, NUM_HEADS
  return (s((n, HEAD_DIM, h), dtype), s((m, HEAD_DIM, h), dtype), s((n, k, h), dtype),
          s((n, k, h), dtype), s((n, k), dtype), s((n, k, 3), dtype),
          s((m, COUPLING.shape[1] * GROUPS, h), dtype), s((n, k), jnp.int32), s((n, k), jnp.bool_))


def _message_sink_specs(dtype):
  """message_attention's inputs with a sink logit [N, H] after the values."""
  *inputs, nbr_idx, nbr_mask = _message_specs(dtype)
  return (*inputs, jax.ShapeDtypeStruct((NUM_TARGETS, NUM_HEADS), dtype), nbr_idx, nbr_mask)


def _message_with_sink(*args):
  *inputs, sink_logit, nbr_idx, nbr_mask = args
  return pk.message_attention(*inputs, nbr_idx, nbr_mask, sink_logit=sink_logit, coupling=COUPLING,
                              scale=HEAD_DIM ** -0.5)


# op: (forward, number of differentiable inputs, input specs, per-edge [N, K, H] arrays the
# backward may hold side by side: message_attention scatters its three moments in one call).
OPS = {
    "message": (lambda *a: pk.message_attention(*a, coupling=COUPLING, scale=HEAD_DIM ** -0.5),
                7, _message_specs, 3),
    "message_sink": (_message_with_sink, 8, _message_sink_specs, 3),
}


def _derivative(op: str, order: int):
  forward, num_inputs, _, _ = OPS[op]
  if order == 0:
    return forward

  def loss(*args):
    inputs, nbr = args[:num_inputs], args[num_inputs:]
    return sum(jnp.sum(y.astype(jnp.float32) ** 2) for y in jax.tree.leaves(
        _derivative(op, order - 1)(*inputs, *nbr)))

  return lambda *args: jax.grad(loss, argnums=range(num_inputs))(*args)


def _lower(fn, specs) -> str:
  with use_abstract_mesh(_h100_mesh()):
    return jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",)).as_text()


def _largest_tensor(text: str) -> int:
  return max(int(np.prod([int(d) for d in m.group(1).rstrip("x").split("x")]))
             for m in _TENSOR_TYPE.finditer(text))


@pytest.mark.parametrize(
    "op, order, dtype, min_kernels",
    [("message", 0, jnp.float32, 1), ("message", 1, jnp.float32, 3),
     ("message", 2, jnp.float32, 16), ("message", 0, jnp.bfloat16, 1),
     ("message", 1, jnp.bfloat16, 3), ("message_sink", 0, jnp.float32, 1),
     ("message_sink", 1, jnp.float32, 3), ("message_sink", 2, jnp.float32, 16)],
    ids=["message-fwd-f32", "message-bwd-f32", "message-double-bwd-f32", "message-fwd-bf16",
         "message-bwd-bf16", "message-sink-fwd-f32", "message-sink-bwd-f32",
         "message-sink-double-bwd-f32"])
def test_lowers_for_h100_with_linear_memory(op, order, dtype, min_kernels):
  _, _, specs, edge_arrays = OPS[op]
  text = _lower(_derivative(op, order), specs(dtype))
  assert text.count(TRITON_CALL) >= min_kernels
  # Per-edge scalars [N, K, H] and node rows [N or M, X, H] are the largest arrays allowed.
  linear = max(edge_arrays * NUM_TARGETS * NUM_SLOTS, NUM_TARGETS * ROW_DIM,
               NUM_SOURCES * ROW_DIM) * NUM_HEADS
  assert _largest_tensor(text) <= linear


# The radial MLPs (docs/model.md §4.3) as (K slots, hidden, Gaussians, outputs): the paper's model
# (the gates' 2H = 256 outputs in two column blocks, the edge-degree embedding's C = 256), and the
# main command's (configs/tiny.yaml: K = 16, hidden 32, 32 Gaussians, the gates' 2H = 8 outputs, narrower
# than a Triton dot's 16, also as the slot-weighted output), on which the fused kernel is the GPU
# default too. The slot-weighted MLPs are contracted with the 2l + 1 = 5 spherical harmonics of degree 2.
RADIAL_SIZES = {"paper": (NUM_SLOTS, 128, 256, 256), "main-command": (16, 32, 32, 8)}
NUM_SLOT_WEIGHTS = 5


@pytest.mark.parametrize("sizes", list(RADIAL_SIZES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("contracted", [False, True], ids=["gates", "slot-weighted"])
@pytest.mark.parametrize("forces", [False, True], ids=["forward", "forces"])
def test_radial_mlp_lowers_for_h100_without_per_edge_activations(dtype, contracted, forces, sizes):
  """One Triton kernel (two with the derivative that forces take: the cotangents of the edge
  lengths and slot weights), and nothing per edge wider than the inputs and outputs: the basis
  [N, K, num_rbf] and the hidden activations [N, K, hidden] exist only in registers (the
  slot-weighted output is [N, 5, out])."""
  s = jax.ShapeDtypeStruct
  n, f = NUM_TARGETS, jnp.float32
  k, d, r, o = RADIAL_SIZES[sizes]
  weights = pk.RadialMLPWeights(s((r, d), f), s((d,), f), s((d,), f), s((d,), f), s((d, d), f),
                                s((d,), f), s((d,), f), s((d,), f), s((d, o), f), s((o,), f))
  slot_weights = s((n, k, NUM_SLOT_WEIGHTS), f) if contracted else None
  out_blocks = None if contracted else (o // 2, o // 2)

  def forward(distances, target, source, nbr_idx, slot_weights, weights):
    return pk.radial_mlp(distances, target, source, nbr_idx, slot_weights, weights=weights,
                         cutoff=4.5, num_rbf=r, eps=1e-5, out_blocks=out_blocks, dtype=dtype)

  def geometry_grad(distances, target, source, nbr_idx, slot_weights, weights):
    def loss(distances, slot_weights):
      out = forward(distances, target, source, nbr_idx, slot_weights, weights)
      return sum(jnp.sum(y.astype(jnp.float32) ** 2) for y in out)
    return jax.grad(loss, argnums=(0, 1) if contracted else 0)(distances, slot_weights)

  text = _lower(geometry_grad if forces else forward,
                (s((n, k), f), s((n, d), f), s((NUM_SOURCES, d), f), s((n, k), jnp.int32),
                 slot_weights, weights))
  assert text.count(TRITON_CALL) == 1 + forces
  per_edge_inputs = n * k * NUM_SLOT_WEIGHTS if contracted else n * k
  outputs = n * NUM_SLOT_WEIGHTS * o if contracted else n * k * o // 2
  assert _largest_tensor(text) <= max(per_edge_inputs, outputs, r * d, d * o)
