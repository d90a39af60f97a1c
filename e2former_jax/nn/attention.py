"""E2Former-V2 attention with the first-order equivariant message (docs/model.md §8).

Per target atom i and neighbour slot k (source j):
  logit_ikh = gate_ikh (q_ih . k_jh) / sqrt(d)
  alpha_ikh = envelope-weighted softmax with a sink (at logit 0, or at the largest logit of the
              slots that hold an atom: config.SoftmaxSink)
  a_ikh     = alpha_ikh * inputhead_ikh / |r_ij|
  m_i       = sum_k a_ik T(v_j, r_ij)          T = channel-wise CG product l1 (x) 1 -> l3

Node-centric evaluation (E2Former-V2): T is linear in the vector, so
  sum_k a_ik T(v_j, r_ij) = sum_{b in x,y,z} T(sum_k a_ik r_ij[b] v_j, e_b),
three attention-weighted neighbour sums of v (S rows each) with per-edge *scalar* weights
a_ik r_ij[b], and T applied once per node; edges carry only [N, K, H] scalars and the true edge
vectors (so periodic images need no extra term, docs/decisions.md D11). One fused kernel evaluates
it (ops.message_attention). The per-edge path forms T(v_j, r_ij) on every edge (the standard
implementation; benchmark baseline and test oracle).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float

from e2former_jax import ops, so3
from e2former_jax.config import E2FormerConfig, MessagePath, SoftmaxSink
from e2former_jax.graph import Graph
from e2former_jax.nn.init import embedding_init, kaiming_uniform
from e2former_jax.nn.linear import SO3Linear, SO3LinearToScalar
from e2former_jax.nn.radial import RadialMLP


@flax.struct.dataclass
class EdgeGeometry:
  """Geometry shared by all blocks (computed once per forward pass).

  Attributes:
    vectors: r_ij = x_i - x_j (target minus source), zero on empty slots.
    distances: |r_ij| (safe norm: finite value and gradient on empty slots).
    envelope: phi(|r_ij|), zero on empty slots.
    inv_dist: 1 / (|r_ij| + inverse_distance_eps), zero on empty slots.
    holds_atom: the slots whose gate logits enter the MAX_LOGIT sink: every slot that holds an atom
      (masked ones too, with real ``distances``) under that sink, else the mask.
  """

  vectors: Float[Array, "N K 3"]
  distances: Float[Array, "N K"]
  envelope: Float[Array, "N K"]
  inv_dist: Float[Array, "N K"]
  holds_atom: Bool[ArrayLike, "N K"]


class PathMix(nn.Module):
  """Path mix (docs/model.md §7.5): out^{l3}[m] = 1/sqrt(n_l3) W_l3 concat_p M_p[m].

  The concatenation runs over the n_l3 paths ending in degree l3.
  """

  channels: int
  lmax: int
  dtype: Any = None  # of the products and the output (None: the input's)

  @nn.compact
  def __call__(self, m: Float[Array, "N R C"]) -> Float[Array, "N S C"]:
    """m: tensor-product rows (l3-sequential layout)."""
    n = m.shape[0]
    paths = so3.first_order_paths(self.lmax)
    out = []
    for l3 in range(self.lmax + 1):
      starts = [p.start for p in paths if p.l3 == l3]
      rows = jnp.stack([m[:, s:s + 2 * l3 + 1] for s in starts], axis=2)  # [N, 2l3+1, n_p, C]
      rows = rows.reshape(n, 2 * l3 + 1, len(starts) * self.channels)
      mixed = nn.Dense(self.channels, use_bias=False, kernel_init=kaiming_uniform, dtype=self.dtype,
                       name=f"mix_l{l3}")(rows)
      out.append(mixed / np.sqrt(len(starts)))
    return jnp.concatenate(out, axis=1)


class E2Attention(nn.Module):
  """One attention sub-layer: normalised features -> their update."""

  config: E2FormerConfig

  @nn.compact
  def __call__(self, x: Float[Array, "N S C"], graph: Graph, geometry: EdgeGeometry
               ) -> Float[Array, "N S C"]:
    cfg = self.config
    # A no-op forward; its transpose fences the cotangents of x and of this layer's edge lengths,
    # so the backward of the per-edge radial MLP (which ends in the edge lengths) completes before
    # the previous block's backward starts. Without it XLA defers every block's [N, K, 2H] gate
    # cotangent to the end of the backward pass (docs/performance.md §5).
    x, distances = jax.lax.optimization_barrier((x, geometry.distances))
    n, _, c = x.shape
    h, d = cfg.num_heads, cfg.head_dim
    qk_width = h * d
    eps, dtype = cfg.layer_norm_eps, cfg.compute_dtype
    readout = functools.partial(SO3LinearToScalar, qk_width, qk_width // 2, eps, dtype)
    q = readout(name="query")(x).reshape(n, h, d)  # [N, H, D]
    k = readout(name="key")(x).reshape(n, h, d)  # [N, H, D]

    target_table = self.param("target_types", embedding_init, (cfg.num_species, cfg.type_embed_dim))
    source_table = self.param("source_types", embedding_init, (cfg.num_species, cfg.type_embed_dim))
    # Chunks are rematerialised already.
    radial_mlp = nn.remat(RadialMLP) if cfg.remat and cfg.edge_chunk_atoms is None else RadialMLP
    # One output layer taken as two column blocks: on the GPU the bias cotangent of the whole
    # [N, K, 2H] output, fused with its per-edge producers, was one slow reduction (docs/
    # performance.md §4, §6).
    gate, inputhead = radial_mlp(cfg.edge_hidden, 2 * h, cfg.cutoff, cfg.num_rbf, eps,
                                 cfg.edge_chunk_atoms, (h, h), dtype, cfg.radial_impl,
                                 cfg.radial_vjp_kernel, name="edge_gates")(
        distances, target_table[graph.species], source_table[graph.species], graph.nbr_idx)  # [N, K, H]
    # In the gates' dtype: under Precision.MIXED the kernels read bfloat16 post weights as they read
    # bfloat16 gates, instead of two float32 [N, K, H] buffers per block that the float32 1/|r|
    # would promote (docs/performance.md §5).
    post_weight = (inputhead * geometry.inv_dist[..., None]).astype(inputhead.dtype)  # [N, K, H]
    sink_logit = None  # SoftmaxSink.ZERO
    if cfg.softmax_sink is SoftmaxSink.MAX_LOGIT:
      sink_logit = ops.max_slot_logit(q, k, gate, graph.nbr_idx, geometry.holds_atom,
                                      impl=cfg.attention_impl)  # [N, H]

    v = SO3Linear(c, dtype=dtype, name="value")(x)  # [N, S, C]
    if cfg.message_path is MessagePath.NODE_CENTRIC:
      message = ops.message_attention(q, k, gate, post_weight, geometry.envelope, geometry.vectors,
                                      v, graph.nbr_idx, graph.nbr_mask, sink_logit=sink_logit,
                                      impl=cfg.attention_impl)  # [N, R, C]
    else:
      message = _per_edge_message(q, k, gate, post_weight, v, graph, geometry, sink_logit)
    assert message.shape[:1] + message.shape[2:] == (n, c), message.shape
    mixed = PathMix(c, cfg.lmax, dtype, name="path_mix")(message)  # [N, S, C]
    return SO3Linear(c, dtype=dtype, name="proj")(mixed)


def _per_edge_message(q, k, gate, post_weight, v, graph: Graph, geometry: EdgeGeometry,
                      sink_logit: jax.Array | None) -> jax.Array:
  """sum_k a_ik T(v_j, r_ij) with every per-edge tensor materialised: [N, R, C]."""
  n, h, d = q.shape
  c = v.shape[-1]
  dots = jnp.einsum("nhd,nkhd->nkh", q, graph.gather_sources(k))  # [N, K, H]
  weights = ops.attention_weights(dots, gate, post_weight, geometry.envelope, graph.nbr_mask,
                                  head_dim=d, sink_logit=sink_logit)  # [N, K, H]
  edge_tp = so3.tensor_product_vector(graph.gather_sources(v), geometry.vectors)  # [N, K, R, C]
  weights_c = jnp.tile(weights, (1, 1, c // h))  # [N, K, C], channel c uses head c % H
  return jnp.einsum("nkc,nkrc->nrc", weights_c, edge_tp)
