"""Radial pieces of every block: Gaussian basis, smooth envelope, per-edge radial MLP (docs/model.md §4)."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from e2former_jax import ops
from e2former_jax.config import DEFAULT_LAYER_NORM_EPS, AttentionImpl
from e2former_jax.nn.init import kaiming_uniform


def gaussian_rbf(distances: Float[Array, "*batch"], cutoff: float, num_basis: int
                 ) -> Float[Array, "*batch {num_basis}"]:
  """Gaussian smearing: centres mu_k = k * cutoff / (num_basis - 1), width sigma = 2 * spacing.

  Args:
    distances: edge lengths in angstrom.
  Returns:
    exp(-(d - mu_k)^2 / (2 sigma^2)); no learnable parameter (docs/model.md §4.1).
  """
  spacing = cutoff / (num_basis - 1)
  centres = jnp.arange(num_basis, dtype=distances.dtype) * spacing
  sigma = 2.0 * spacing
  return jnp.exp(-((distances[..., None] - centres) ** 2) / (2.0 * sigma**2))


def envelope(distances: Float[ArrayLike, "*batch"], cutoff: float) -> Float[Array, "*batch"]:
  """Smoothstep-C2 envelope phi(u) = 1 - 10u^3 + 15u^4 - 6u^5 for u = d / cutoff < 1, else 0.

  phi, phi' and phi'' vanish at the cutoff, so energies and forces are continuous when an atom
  crosses it (docs/model.md §4.2).
  """
  u = jnp.clip(distances / cutoff, 0.0, 1.0)
  return 1.0 - u**3 * (10.0 - 15.0 * u + 6.0 * u**2)


class RadialMLP(nn.Module):
  """Linear -> LayerNorm -> SiLU, Linear -> LayerNorm -> SiLU, Linear (docs/model.md §4.3).

  The first Linear acts on the concatenation [rbf(d_ij); E_t(Z_i); E_s(Z_j)]. It is written as the
  sum of three Linears so that the type terms are computed per atom and gathered, never forming the
  [N, K, num_rbf + 2 * type_dim] concatenation; the function and parameter count are those of one
  Linear on the concatenation.

  The Gaussian basis is evaluated here from the edge lengths rather than passed in: it is cheap
  (num_rbf exponentials per edge against a num_rbf x hidden product), and this way nothing of size
  [N, K, num_rbf] outlives one MLP. Shared between the blocks, the basis and the sum of its
  cotangents over every MLP were the largest per-edge buffers of energy + forces on the GPU
  (docs/performance.md §5); each MLP now reduces its basis cotangent to [N, K] at once.

  With ``chunk_atoms`` the per-edge layers run over chunks of target atoms in a loop
  (:func:`map_chunks`) whose backward pass recomputes one chunk at a time, so that no
  [N, K, hidden] activation exists in forces or in their parameter gradient (training on forces),
  for one more forward pass of the per-edge layers (two under the second derivative). Given
  ``slot_weights``, the output is contracted with them over the slots inside each chunk, so not
  even the [N, K, out] output is formed.

  With ``out_blocks`` the output layer is applied as separate column blocks of its one weight matrix
  (same parameters, same values): each block's output, and in the backward pass its cotangent and
  bias reduction, stands on its own instead of being sliced from, and padded back into, one
  [N, K, out] array.

  Attributes:
    hidden_width: hidden width.
    out_width: output width.
    cutoff: the basis spans [0, cutoff] (angstrom).
    num_rbf: number of Gaussians.
    layer_norm_eps: epsilon of both LayerNorms.
    chunk_atoms: target atoms per chunk (E2FormerConfig.edge_chunk_atoms); None evaluates every
      edge at once and keeps the activations for the backward pass.
    out_blocks: widths of the output's column blocks (summing to ``out_width``): the MLP returns
      a tuple of their outputs; None returns one array.
    dtype: dtype of the products and the output (None: the inputs'); the LayerNorms compute in
      float32.
    impl: under the Pallas implementations (``E2FormerConfig.radial_impl``) the MLP runs as a fused
      kernel wherever nothing differentiates it (``ops.radial_mlp``).
    vjp_kernel: under Pallas, differentiated too: the forward kernel and a fused backward kernel
      for the cotangents of the edge lengths and slot weights (``E2FormerConfig.radial_vjp_kernel``);
      the parameters' cotangents and second derivatives are always those of the layers written
      here.
  """

  hidden_width: int
  out_width: int
  cutoff: float
  num_rbf: int
  layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
  chunk_atoms: int | None = None
  out_blocks: tuple[int, ...] | None = None
  dtype: Any = None
  impl: AttentionImpl = AttentionImpl.XLA
  vjp_kernel: bool = False

  def setup(self):
    # The parameter names (the attribute names) are those of the checkpoints.
    dense = functools.partial(nn.Dense, kernel_init=kaiming_uniform, dtype=self.dtype)
    self.rbf_in = dense(self.hidden_width)
    self.target_in = dense(self.hidden_width, use_bias=False)
    self.source_in = dense(self.hidden_width, use_bias=False)
    self.norm_0 = nn.LayerNorm(epsilon=self.layer_norm_eps)
    self.hidden = dense(self.hidden_width)
    self.norm_1 = nn.LayerNorm(epsilon=self.layer_norm_eps)
    if self.out_blocks is None:
      self.out = dense(self.out_width)
    else:
      assert sum(self.out_blocks) == self.out_width, (self.out_blocks, self.out_width)
      self.out = ColumnBlocks(self.out_blocks, self.dtype)

  def __call__(self, distances: Float[Array, "N K"], target_types: Float[Array, "N T"],
               source_types: Float[Array, "N T"], nbr_idx: Int[ArrayLike, "N K"],
               slot_weights: Float[Array, "N K X"] | None = None
               ) -> (Float[Array, "N K F"] | Float[Array, "N X F"]
                     | tuple[Float[Array, "N _ _"], ...]):
    """
    Args:
      distances: edge lengths of every slot (any finite value on empty slots).
      target_types: type embedding of each target atom.
      source_types: type embedding of each atom as a source (gathered per slot).
      nbr_idx: source atom of each slot (sentinel N on empty slots reads zeros).
      slot_weights: optional weights of each slot.
    Returns:
      The MLP of every slot (F = ``out_width``) or, with ``slot_weights``,
      sum_k slot_weights[:, k, x] MLP[:, k, :]; with ``out_blocks``, a tuple of its column blocks.
    """
    source = self.source_in(source_types)  # [N, hidden]
    # Widened once to at least float32 and gathered per slot in the edge layers: the gather's
    # transpose scatter-adds every edge's cotangent into its source row. In bfloat16 (mixed
    # precision) that scatter was a training step's largest fusion on the GPU; in float32 the step
    # is 5 % faster (docs/performance.md §4). Chunks share this one copy.
    source = source.astype(jnp.promote_types(source.dtype, jnp.float32))
    rows = (distances, self.target_in(target_types))
    rows += () if slot_weights is None else (slot_weights,)
    # Initialisation creates the parameters in one piece (the chunks and the kernel see them as
    # arguments).
    if self.is_initializing():
      return self.edge_layers(source, nbr_idx, *rows)
    unbound = self.clone(parent=None)

    def layers(params, source, nbr_idx, *rows):
      return unbound.apply({"params": params}, source, nbr_idx, *rows, method=RadialMLP.edge_layers)

    def reference(params, source, nbr_idx, *rows):
      if self.chunk_atoms is None:
        return layers(params, source, nbr_idx, *rows)
      return map_chunks(layers, self.chunk_atoms, params, source, nbr_idx, *rows)

    return ops.radial_mlp(reference, _kernel_weights, self.variables["params"], source, nbr_idx,
                          *rows, cutoff=self.cutoff, num_rbf=self.num_rbf,
                          eps=self.layer_norm_eps, out_blocks=self.out_blocks, dtype=self.dtype,
                          impl=self.impl, vjp_kernel=self.vjp_kernel)

  def edge_layers(self, source, nbr_idx, distances, target, slot_weights=None
                  ) -> jax.Array | tuple[jax.Array, ...]:
    """The per-edge layers for a set of n target atoms (all of them, or one chunk).

    Args:
      source: [N, hidden] every atom's source term of the first layer (at least float32).
      nbr_idx, distances: [n, K] of the targets; target: [n, hidden] their target terms.
      slot_weights: optional [n, K, M].
    """
    rbf = gaussian_rbf(distances, self.cutoff, self.num_rbf)  # [n, K, num_rbf]
    h = self.rbf_in(rbf) + target[:, None, :]  # [n, K, hidden]
    h = h + jnp.take(source, nbr_idx, axis=0, mode="fill", fill_value=0).astype(h.dtype)
    h = nn.silu(self.norm_0(h))
    h = nn.silu(self.norm_1(self.hidden(h)))
    radial = self.out(h)  # [n, K, out] (or its column blocks)
    if slot_weights is None:
      return radial
    return jax.tree.map(lambda r: jnp.einsum("nkm,nkc->nmc", slot_weights, r), radial)  # [n, M, out]


def _kernel_weights(params) -> ops.RadialMLPWeights:
  """The fused kernel's view of a RadialMLP's parameters (its first layer's type terms are the
  caller's inputs)."""
  return ops.RadialMLPWeights(
      params["rbf_in"]["kernel"], params["rbf_in"]["bias"], params["norm_0"]["scale"],
      params["norm_0"]["bias"], params["hidden"]["kernel"], params["hidden"]["bias"],
      params["norm_1"]["scale"], params["norm_1"]["bias"], params["out"]["kernel"],
      params["out"]["bias"])


class ColumnBlocks(nn.Module):
  """``nn.Dense(sum(widths))`` applied as separate column blocks of its weight matrix and bias:
  the same parameters (names, shapes, initialisation) and outputs, as a tuple (one per width)."""

  widths: tuple[int, ...]
  dtype: Any = None  # of the products and outputs, as nn.Dense's

  @nn.compact
  def __call__(self, inputs: Float[Array, "*batch _"]) -> tuple[Float[Array, "*batch _"], ...]:
    features = sum(self.widths)
    kernel = self.param("kernel", kaiming_uniform, (inputs.shape[-1], features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (features,), jnp.float32)
    inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
    starts = np.cumsum((0,) + self.widths)
    return tuple(inputs @ kernel[:, a:b] + bias[a:b] for a, b in zip(starts[:-1], starts[1:]))


def map_chunks(fn: Callable[..., Any], chunk_atoms: int, params, shared: jax.Array,
               index: jax.Array, *rows: jax.Array) -> Any:
  """``fn(params, shared, index, *rows)``, evaluated over chunks of at most ``chunk_atoms`` target
  atoms in a loop; its derivative stores nothing per chunk.

  ``fn`` must act on each row (target atom) independently. The first derivative recomputes each
  chunk's forward pass before its backward pass (a loop of ``jax.vjp``, one chunk live at a time)
  and keeps only the inputs; the loops of the forward and of the backward each rematerialise their
  chunks under a further derivative. A ``jax.checkpoint``-ed loop alone would not do for forces
  trained on: a second derivative re-differentiates its forward loop, stripped of the checkpoint,
  and stores every chunk's activations.

  Args:
    fn: (params, shared, index, *rows) -> [n, ...] for n target atoms (or a pytree of them).
    params, shared: passed whole to every chunk (differentiable).
    index: integer array with the target atoms on axis 0 (not differentiated).
    rows: arrays with the target atoms on axis 0 (differentiable).
  Chunks are padded with zero rows to equal sizes; the padding's outputs are dropped, so its
  cotangents are zero.
  """
  n = index.shape[0]
  num_chunks = -(-n // chunk_atoms)
  size = -(-n // num_chunks)  # equal chunks: fewer than num_chunks padding rows

  def split(x):
    x = jnp.pad(x, [(0, num_chunks * size - n)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape(num_chunks, size, *x.shape[1:])

  out = _chunk_loop(fn, params, shared, split(index), *map(split, rows))
  return jax.tree.map(lambda o: o.reshape(num_chunks * size, *o.shape[2:])[:n], out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _chunk_loop(fn, params, shared, index, *chunks):
  body = jax.checkpoint(fn, prevent_cse=False)
  return jax.lax.map(lambda c: body(params, shared, *c), (index, *chunks))


def _chunk_loop_fwd(fn, params, shared, index, *chunks):
  return _chunk_loop(fn, params, shared, index, *chunks), (params, shared, index, chunks)


def _chunk_loop_bwd(fn, residuals, out_ct):
  params, shared, index, chunks = residuals

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_vjp(params, shared, index, chunk, ct):
    _, vjp = jax.vjp(lambda p, s, *c: fn(p, s, index, *c), params, shared, *chunk)
    return vjp(ct)

  def step(sums, xs):
    d_params, d_shared, *d_chunk = chunk_vjp(params, shared, *xs)
    return jax.tree.map(jnp.add, sums, (d_params, d_shared)), d_chunk

  # Sums over the chunks in at least float32 (the chunks' cotangents may be bfloat16).
  primals = (params, shared)
  zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32)), primals)
  sums, d_chunks = jax.lax.scan(step, zeros, (index, chunks, out_ct))
  d_params, d_shared = jax.tree.map(lambda d, x: d.astype(x.dtype), sums, primals)
  return (d_params, d_shared, None, *d_chunks)


_chunk_loop.defvjp(_chunk_loop_fwd, _chunk_loop_bwd)
