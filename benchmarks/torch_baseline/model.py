"""E2Former-V2 in plain PyTorch: our own baseline of the JAX model, for side-by-side benchmarks.

It computes exactly what ``e2former_jax.nn`` computes (the model of ``docs/model.md``), module for
module and parameter for parameter (converter: :mod:`benchmarks.torch_baseline.convert`). Only
static numpy tables (Clebsch-Gordan couplings, row degrees, path lists, normalising constants) come
from ``e2former_jax``; every operation on tensors is PyTorch.

Two evaluations of the attention message sum_k a_ik T(v_j, r_ij):

* ``MessagePath.PER_EDGE``: the standard materialised form. v_j is gathered on every edge and
  T(v_j, r_ij) formed per edge: [N, K, R, C] tensors.
* ``MessagePath.NODE_CENTRIC``: the E2Former-V2 identity with plain PyTorch gathers. The per-node
  stack [T(v_j, r_j); v_j] is gathered per edge ([N, K, R + S, C]) and reduced, then
  T(A_i, r_i) - B_i. Without a fused kernel the gathered stack is still materialised (and kept for
  the backward); what it saves is the per-edge tensor product.

Conventions are those of the JAX model: features [N, S, C] with S = (lmax + 1)^2 rows in e3nn
order, neighbour slots ``nbr_idx [N, K]`` with the sentinel N on empty slots (gathers read zeros
there), edge vectors target minus source, positions centred per molecule inside the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from e2former_jax import so3
from e2former_jax.config import DEFAULT_LAYER_NORM_EPS, E2FormerConfig, MessagePath
from e2former_jax.nn.embedding import MAX_ABS_CHARGE, MAX_MULTIPLICITY
from e2former_jax.nn.ffn import second_moment_normaliser
from e2former_jax.nn.init import EMBEDDING_INIT_SCALE
from e2former_jax.nn.norm import RMS_NORM_EPS
from e2former_jax.ops.attention import SOFTMAX_SINK

# The JAX model's default LayerNorm epsilon (E2FormerConfig.layer_norm_eps); the baseline is built
# for configs that keep it.
LAYER_NORM_EPS = DEFAULT_LAYER_NORM_EPS
# The numerics options the baseline implements (E2FormerConfig's defaults).
_DEFAULT_NUMERICS = {f: getattr(E2FormerConfig(), f) for f in (
    "layer_norm_eps", "gate_normalisers", "inverse_distance_eps", "softmax_sink")}


@dataclasses.dataclass
class TorchGraph:
  """The padded batch of :class:`e2former_jax.graph.Graph` as torch tensors (same fields and meaning).

  Attributes:
    positions: [N, 3] float.
    species: [N] int64 atomic numbers, 0 on padding.
    node_mask: [N] bool.
    molecule_index: [N] int64 in [0, B).
    nbr_idx: [N, K] int64 source atom of each slot, N on empty slots.
    nbr_mask: [N, K] bool.
    nbr_shift: [N, K, 3] float lattice shift of the source image (zeros for molecules).
    charge: [B] int64.
    spin: [B] int64.
    molecule_mask: [B] bool.
  """

  positions: torch.Tensor
  species: torch.Tensor
  node_mask: torch.Tensor
  molecule_index: torch.Tensor
  nbr_idx: torch.Tensor
  nbr_mask: torch.Tensor
  nbr_shift: torch.Tensor
  charge: torch.Tensor
  spin: torch.Tensor
  molecule_mask: torch.Tensor

  @property
  def num_molecules(self) -> int:
    return self.charge.shape[0]

  def to(self, device=None, dtype: torch.dtype | None = None) -> TorchGraph:
    """Moves every tensor to ``device``; float tensors are cast to ``dtype`` when given."""
    def move(t):
      return t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else None)
    return TorchGraph(**{f.name: move(getattr(self, f.name)) for f in dataclasses.fields(self)})


class EdgeGeometry(NamedTuple):
  """Per-slot geometry shared by all blocks (as ``e2former_jax.nn.attention.EdgeGeometry``).

  Attributes:
    vectors: [N, K, 3] r_ij = x_i - x_j, zero on empty slots.
    rbf: [N, K, num_rbf].
    envelope: [N, K] phi(|r_ij|), zero on empty slots.
    inv_dist: [N, K] 1 / |r_ij|, zero on empty slots.
    positions: [N, 3] centred positions.
  """

  vectors: torch.Tensor
  rbf: torch.Tensor
  envelope: torch.Tensor
  inv_dist: torch.Tensor
  positions: torch.Tensor


class ModelOutput(NamedTuple):
  """energy [B]; atom_energy [N]; direct_forces [N, 3] or None; features [N, S, C]."""

  energy: torch.Tensor
  atom_energy: torch.Tensor
  direct_forces: torch.Tensor | None
  features: torch.Tensor


# ------------------------------------------------------------------------------ geometry, tables


def gather_sources(x: torch.Tensor, nbr_idx: torch.Tensor) -> torch.Tensor:
  """x[nbr_idx] with zeros at the sentinel index N: [N, ...] -> [N, K, ...]."""
  padded = torch.cat([x, x.new_zeros((1, *x.shape[1:]))])
  return padded[nbr_idx]


def segment_sum(data: torch.Tensor, segment_ids: torch.Tensor, num_segments: int) -> torch.Tensor:
  """out[b] = sum of data[i] over i with segment_ids[i] = b: [N, ...] -> [num_segments, ...].

  One segment is a plain sum: the same numbers, and it avoids a scatter into a single row, which
  torch.compile's inductor (2.13, CPU) fails to generate code for.
  """
  if num_segments == 1:
    return data.sum(dim=0, keepdim=True)
  return data.new_zeros((num_segments, *data.shape[1:])).index_add(0, segment_ids, data)


def safe_norm(x: torch.Tensor) -> torch.Tensor:
  """|x| over the last axis with value and gradients finite (0) at x = 0: [..., 3] -> [...]."""
  squared = (x * x).sum(-1)
  nonzero = squared > 0
  return torch.where(nonzero, torch.sqrt(torch.where(nonzero, squared, torch.ones_like(squared))),
                     torch.zeros_like(squared))


@functools.cache
def _sh_recursion_table(l: int) -> np.ndarray:
  """[2l-1, 3, 2l+1] table with Y^l(r) = sum_ij table[i, j, :] Y^{l-1}(r)_i r_j (component norm).

  The degree-l part of Y^{l-1} (x) r is the degree-l harmonic polynomial up to a constant, fixed so
  that Y^l_0(y-hat) = sqrt(2l + 1) (at y-hat only the m = 0 entries of Y^{l-1} and r are non-zero).
  """
  cg = so3.clebsch_gordan(l - 1, 1, l)
  at_pole = math.sqrt(2 * l - 1) * cg[l - 1, 1, l]
  return math.sqrt(2 * l + 1) / at_pole * cg


def spherical_harmonics(vectors: torch.Tensor, recursion_tables: list[torch.Tensor]) -> torch.Tensor:
  """Y^0..Y^lmax of the unit vectors r / |r| (0 -> Y^0 = 1, rest 0): [..., 3] -> [..., (lmax+1)^2].

  Args:
    vectors: [..., 3].
    recursion_tables: ``_sh_recursion_table(l)`` for l = 1..lmax as tensors.
  """
  norm = safe_norm(vectors)[..., None]
  unit = vectors / torch.where(norm > 0, norm, torch.ones_like(norm))
  ys = [torch.ones_like(unit[..., :1])]
  for table in recursion_tables:
    outer = ys[-1][..., :, None] * unit[..., None, :]  # [..., 2l-1, 3]
    ys.append(torch.einsum("...ij,ijk->...k", outer, table.to(unit.dtype)))
  return torch.cat(ys, dim=-1)


def gaussian_rbf(distances: torch.Tensor, cutoff: float, num_basis: int) -> torch.Tensor:
  """exp(-(d - mu_k)^2 / (2 sigma^2)), mu_k = k cutoff / (num_basis - 1), sigma = 2 spacing."""
  spacing = cutoff / (num_basis - 1)
  centres = torch.arange(num_basis, dtype=distances.dtype, device=distances.device) * spacing
  sigma = 2.0 * spacing
  return torch.exp(-((distances[..., None] - centres) ** 2) / (2.0 * sigma**2))


def envelope(distances: torch.Tensor, cutoff: float) -> torch.Tensor:
  """Smoothstep-C2 1 - 10u^3 + 15u^4 - 6u^5 of u = d / cutoff, clipped to [0, 1]."""
  u = torch.clamp(distances / cutoff, 0.0, 1.0)
  return 1.0 - u**3 * (10.0 - 15.0 * u + 6.0 * u**2)


def centre_positions(graph: TorchGraph, positions: torch.Tensor) -> torch.Tensor:
  """Subtract each molecule's mean real-atom position: [N, 3] -> [N, 3]."""
  weights = graph.node_mask.to(positions.dtype)
  num = segment_sum(positions * weights[:, None], graph.molecule_index, graph.num_molecules)
  count = segment_sum(weights, graph.molecule_index, graph.num_molecules)
  mean = num / torch.clamp(count, min=1.0)[:, None]  # [B, 3]
  return positions - mean[graph.molecule_index]


def edge_geometry(config: E2FormerConfig, graph: TorchGraph, positions: torch.Tensor) -> EdgeGeometry:
  centred = centre_positions(graph, positions)
  mask = graph.nbr_mask
  vectors = centred[:, None, :] - (gather_sources(centred, graph.nbr_idx) + graph.nbr_shift)
  vectors = torch.where(mask[..., None], vectors, torch.zeros_like(vectors))  # [N, K, 3]
  dist = safe_norm(vectors)  # [N, K]
  inv_dist = torch.where(mask, 1.0 / torch.where(mask, dist, torch.ones_like(dist)),
                         torch.zeros_like(dist))
  return EdgeGeometry(
      vectors=vectors,
      rbf=gaussian_rbf(dist, config.cutoff, config.num_rbf),
      envelope=torch.where(mask, envelope(dist, config.cutoff), torch.zeros_like(dist)),
      inv_dist=inv_dist,
      positions=centred,
  )


def tensor_product_vector(h: torch.Tensor, v: torch.Tensor, coupling: torch.Tensor) -> torch.Tensor:
  """T(h, v)[r, c] = sum_{s,a} G[r, s, a] h[s, c] v[a]: [..., S, C] x [..., 3] -> [..., R, C].

  ``coupling`` is ``so3.first_order_coupling(lmax)`` [R, S, 3] (rows in the l3-sequential layout).
  """
  per_node = torch.einsum("rsa,...a->...rs", coupling, v)  # [..., R, S]
  return torch.matmul(per_node, h)  # [..., R, C]


def attention_weights(dots, gate, post_weight, envelope_weights, nbr_mask, *, scale: float,
                      sink: float = SOFTMAX_SINK) -> torch.Tensor:
  """alpha * post_weight with alpha = exp(l) phi / (sum_valid exp(l) phi + sink), l = gate scale dots.

  Stabilised with m = max(0, max over valid slots of l) (alpha is invariant to it, so it is
  detached). All [N, K, H] except envelope_weights and nbr_mask [N, K]; 0 on masked slots.
  """
  valid = nbr_mask[..., None]  # [N, K, 1]
  logits = torch.where(valid, gate * scale * dots, torch.zeros_like(dots))
  shift = torch.where(valid, logits, torch.full_like(logits, -math.inf)).amax(dim=1)
  shift = torch.clamp(shift, min=0.0).detach()  # [N, H]
  e = torch.where(valid, torch.exp(logits - shift[:, None]), torch.zeros_like(logits))
  e = e * envelope_weights[..., None]  # [N, K, H]
  denom = e.sum(dim=1) + sink * torch.exp(-shift)  # [N, H]
  denom = torch.where(denom > 0, denom, torch.ones_like(denom))
  return e / denom[:, None] * post_weight


def neighbor_sum(weights: torch.Tensor, rows: torch.Tensor, nbr_idx: torch.Tensor) -> torch.Tensor:
  """out[n, r, c] = sum_k weights[n, k, c % H] rows[nbr_idx[n, k], r, c] (node-centric aggregation).

  Eager: the rows are gathered head-major, [H, N, K, X] with X = R C / H, so that the sum over
  slots is one batched matrix product with no further copy of the gathered tensor (which autograd
  keeps for the backward). Under torch.compile: a broadcast product and sum, which inductor can
  fuse with the gather.

  Args:
    weights: [N, K, H]. rows: [M, R, C], channel c in head c % H. nbr_idx: [N, K] (M = empty).
  Returns:
    [N, R, C]
  """
  n, _, h = weights.shape
  m, r, c = rows.shape
  if torch.compiler.is_compiling():
    weights_c = weights.repeat(1, 1, c // h)  # [N, K, C]
    return (weights_c[:, :, None, :] * gather_sources(rows, nbr_idx)).sum(dim=1)
  per_head = rows.reshape(m, r * (c // h), h).permute(2, 0, 1)  # [H, M, X], c = g H + h
  per_head = torch.cat([per_head, per_head.new_zeros((h, 1, per_head.shape[-1]))], dim=1)
  gathered = per_head[:, nbr_idx]  # [H, N, K, X]
  out = torch.matmul(weights.permute(2, 0, 1).unsqueeze(2), gathered)  # [H, N, 1, X]
  return out[:, :, 0].permute(1, 2, 0).reshape(n, r, c)


def slot_sum(weights_c: torch.Tensor, per_slot: torch.Tensor) -> torch.Tensor:
  """sum_k weights_c[n, k, c] per_slot[n, k, r, c]: [N, K, C] x [N, K, R, C] -> [N, R, C]."""
  if torch.compiler.is_compiling():
    return (weights_c[:, :, None, :] * per_slot).sum(dim=1)
  return torch.einsum("nkc,nkrc->nrc", weights_c, per_slot)


# ------------------------------------------------------------------------------------- modules


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
  """nn.Linear with the JAX model's init: U(+-sqrt(6 / fan_in)) weights, zero bias."""
  layer = nn.Linear(in_features, out_features, bias=bias)
  nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
  if bias:
    nn.init.zeros_(layer.bias)
  return layer


def _embedding_table(rows: int, width: int) -> nn.Parameter:
  return nn.Parameter(torch.empty(rows, width).uniform_(-EMBEDDING_INIT_SCALE, EMBEDDING_INIT_SCALE))


def _layer_norm(width: int) -> nn.LayerNorm:
  return nn.LayerNorm(width, eps=LAYER_NORM_EPS)


class SO3Linear(nn.Module):
  """y[(l,m), o] = sum_i W[l, o, i] x[(l,m), i] (+ b[o] on the l = 0 row); W [lmax+1, out, in]."""

  def __init__(self, in_features: int, out_features: int, lmax: int, bias: bool = True):
    super().__init__()
    self.lmax = lmax
    bound = 1.0 / math.sqrt(in_features)
    self.weight = nn.Parameter(torch.empty(lmax + 1, out_features, in_features).uniform_(-bound, bound))
    self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [N, S, in] -> [N, S, out]."""
    rows = [torch.matmul(x[:, l * l:(l + 1) ** 2], self.weight[l].T) for l in range(self.lmax + 1)]
    if self.bias is not None:
      rows[0] = rows[0] + self.bias
    return torch.cat(rows, dim=1)


class SO3LinearToScalar(nn.Module):
  """q/k readout: MLP([sum_{m in l} u[(l,m)] w[(l,m)] for each l]), u, w SO(3)-linear maps."""

  def __init__(self, channels: int, lmax: int, features: int, hidden: int):
    super().__init__()
    self.lmax = lmax
    self.left = SO3Linear(channels, hidden, lmax, bias=True)
    self.right = SO3Linear(channels, hidden, lmax, bias=False)
    self.mlp_in = _linear((lmax + 1) * hidden, hidden)
    self.mlp_norm = _layer_norm(hidden)
    self.mlp_out = _linear(hidden, features)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [N, S, C] -> [N, features]."""
    products = self.left(x) * self.right(x)  # [N, S, P]
    invariants = torch.cat(
        [products[:, l * l:(l + 1) ** 2].sum(dim=1) for l in range(self.lmax + 1)], dim=-1)
    return self.mlp_out(F.silu(self.mlp_norm(self.mlp_in(invariants))))


class RMSNormSH(nn.Module):
  """Centre row 0 over channels; divide by one degree-balanced RMS per atom; scale [lmax+1, C]; bias row 0."""

  def __init__(self, channels: int, lmax: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(lmax + 1, channels))
    self.bias = nn.Parameter(torch.zeros(channels))
    degrees = so3.row_degrees(lmax)
    self.register_buffer("degrees", torch.as_tensor(degrees, dtype=torch.long), persistent=False)
    self.register_buffer("row_weight", torch.as_tensor(1.0 / ((lmax + 1) * (2 * degrees + 1)),
                                                       dtype=torch.float32), persistent=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [N, S, C] -> [N, S, C]."""
    scalar = x[:, :1] - x[:, :1].mean(dim=-1, keepdim=True)
    x = torch.cat([scalar, x[:, 1:]], dim=1)
    mean_square = torch.einsum("nsc,s->n", x * x, self.row_weight.to(x.dtype)) / x.shape[-1]
    x = x * torch.rsqrt(mean_square + RMS_NORM_EPS)[:, None, None] * self.scale[self.degrees]
    return torch.cat([x[:, :1] + self.bias, x[:, 1:]], dim=1)


class RadialMLP(nn.Module):
  """Linear([rbf; E_t(Z_i); E_s(Z_j)]) -> LN -> SiLU -> Linear -> LN -> SiLU -> Linear.

  The first Linear is split by input block (rbf_in, target_in, source_in) like the JAX model's.
  """

  def __init__(self, num_rbf: int, type_dim: int, hidden: int, out: int):
    super().__init__()
    self.rbf_in = _linear(num_rbf, hidden)
    self.target_in = _linear(type_dim, hidden, bias=False)
    self.source_in = _linear(type_dim, hidden, bias=False)
    self.norm_0 = _layer_norm(hidden)
    self.hidden = _linear(hidden, hidden)
    self.norm_1 = _layer_norm(hidden)
    self.out = _linear(hidden, out)

  def forward(self, rbf, target_types, source_types, nbr_idx) -> torch.Tensor:
    """rbf [N, K, num_rbf]; target_types, source_types [N, T]; nbr_idx [N, K] -> [N, K, out]."""
    h = self.rbf_in(rbf) + self.target_in(target_types)[:, None, :]
    h = h + gather_sources(self.source_in(source_types), nbr_idx)  # [N, K, hidden]
    h = F.silu(self.norm_0(h))
    h = F.silu(self.norm_1(self.hidden(h)))
    return self.out(h)


class EdgeDegreeEmbedding(nn.Module):
  """h0_i[(l,m)] = 1/avg_degree sum_k phi_ik Y_lm(r_ik) R_l([rbf; E_t(Z_i); E_s(Z_j)])."""

  def __init__(self, config: E2FormerConfig):
    super().__init__()
    cfg = config
    self.lmax, self.avg_degree = cfg.lmax, cfg.avg_degree
    self.target_table = _embedding_table(cfg.num_species, cfg.num_rbf)
    self.source_table = _embedding_table(cfg.num_species, cfg.num_rbf)
    for l in range(cfg.lmax + 1):
      self.add_module(f"radial_l{l}", RadialMLP(cfg.num_rbf, cfg.num_rbf, cfg.edge_hidden,
                                                cfg.channels))

  def forward(self, species, rbf, envelope_weights, edge_sh, nbr_idx) -> torch.Tensor:
    """-> [N, S, C]."""
    target_types, source_types = self.target_table[species], self.source_table[species]
    blocks = []
    for l in range(self.lmax + 1):
      radial = getattr(self, f"radial_l{l}")(rbf, target_types, source_types, nbr_idx)  # [N, K, C]
      sh_l = edge_sh[..., l * l:(l + 1) ** 2] * envelope_weights[..., None]  # [N, K, 2l+1]
      blocks.append(torch.einsum("nkm,nkc->nmc", sh_l, radial))
    return torch.cat(blocks, dim=1) / self.avg_degree


class MoleculeEmbedding(nn.Module):
  """s_mol = SiLU(W [E_q(charge); E_s(multiplicity)] + b): [B] -> [B, C]."""

  def __init__(self, channels: int):
    super().__init__()
    self.charge_table = _embedding_table(2 * MAX_ABS_CHARGE + 1, channels)
    self.spin_table = _embedding_table(MAX_MULTIPLICITY + 1, channels)
    self.mix = _linear(2 * channels, channels)

  def forward(self, charge: torch.Tensor, spin: torch.Tensor) -> torch.Tensor:
    e_q = self.charge_table[torch.clamp(charge, -MAX_ABS_CHARGE, MAX_ABS_CHARGE) + MAX_ABS_CHARGE]
    e_s = self.spin_table[torch.clamp(spin, 0, MAX_MULTIPLICITY)]
    return F.silu(self.mix(torch.cat([e_q, e_s], dim=-1)))


class PathMix(nn.Module):
  """out^{l3}[m] = 1/sqrt(n_l3) W_l3 concat_p M_p[m] over the paths p ending in degree l3."""

  def __init__(self, channels: int, lmax: int):
    super().__init__()
    paths = so3.first_order_paths(lmax)
    self.starts = [[p.start for p in paths if p.l3 == l3] for l3 in range(lmax + 1)]
    for l3, starts in enumerate(self.starts):
      self.add_module(f"mix_l{l3}", _linear(len(starts) * channels, channels, bias=False))

  def forward(self, m: torch.Tensor) -> torch.Tensor:
    """m: [N, R, C] -> [N, S, C]."""
    n = m.shape[0]
    out = []
    for l3, starts in enumerate(self.starts):
      rows = torch.stack([m[:, s:s + 2 * l3 + 1] for s in starts], dim=2)  # [N, 2l3+1, n_p, C]
      rows = rows.reshape(n, 2 * l3 + 1, -1)
      out.append(getattr(self, f"mix_l{l3}")(rows) / math.sqrt(len(starts)))
    return torch.cat(out, dim=1)


class S3FeedForward(nn.Module):
  """z = SO3Linear(x); gates = Linear(z_0); row 0 <- c_s SiLU(g_0); l > 0 <- c_g sigmoid(g_l) z_l."""

  def __init__(self, channels: int, lmax: int):
    super().__init__()
    self.lmax, self.channels = lmax, channels
    self.linear_in = SO3Linear(channels, channels, lmax)
    self.gate = _linear(channels, (lmax + 1) * channels)
    self.linear_out = SO3Linear(channels, channels, lmax)
    self.register_buffer("gate_rows", torch.as_tensor(so3.row_degrees(lmax)[1:], dtype=torch.long),
                         persistent=False)
    self.silu_norm = second_moment_normaliser("silu")
    self.sigmoid_norm = second_moment_normaliser("sigmoid")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    z = self.linear_in(x)  # [N, S, C]
    gates = self.gate(z[:, 0]).view(-1, self.lmax + 1, self.channels)  # [N, lmax+1, C]
    scalar = self.silu_norm * F.silu(gates[:, :1])
    gate_rows = self.sigmoid_norm * torch.sigmoid(gates[:, self.gate_rows])  # [N, S-1, C]
    return self.linear_out(torch.cat([scalar, gate_rows * z[:, 1:]], dim=1))


class E2Attention(nn.Module):
  """Attention with the first-order equivariant message, per-edge or node-centric (config)."""

  def __init__(self, config: E2FormerConfig):
    super().__init__()
    cfg = self.config = config
    c, h, d = cfg.channels, cfg.num_heads, cfg.head_dim
    self.query = SO3LinearToScalar(c, cfg.lmax, h * d, h * d // 2)
    self.key = SO3LinearToScalar(c, cfg.lmax, h * d, h * d // 2)
    self.target_types = _embedding_table(cfg.num_species, cfg.type_embed_dim)
    self.source_types = _embedding_table(cfg.num_species, cfg.type_embed_dim)
    self.edge_gates = RadialMLP(cfg.num_rbf, cfg.type_embed_dim, cfg.edge_hidden, 2 * h)
    self.value = SO3Linear(c, c, cfg.lmax)
    self.path_mix = PathMix(c, cfg.lmax)
    self.proj = SO3Linear(c, c, cfg.lmax)
    self.register_buffer("coupling", torch.tensor(so3.first_order_coupling(cfg.lmax),
                                                     dtype=torch.float32), persistent=False)

  def forward(self, x: torch.Tensor, graph: TorchGraph, geometry: EdgeGeometry) -> torch.Tensor:
    """x: [N, S, C] normalised features -> [N, S, C] update."""
    cfg = self.config
    n, s, c = x.shape
    h, d = cfg.num_heads, cfg.head_dim
    coupling = self.coupling.to(x.dtype)
    q = self.query(x).view(n, h, d)
    k = self.key(x).view(n, h, d)
    edge = self.edge_gates(geometry.rbf, self.target_types[graph.species],
                           self.source_types[graph.species], graph.nbr_idx)  # [N, K, 2H]
    gate, inputhead = edge[..., :h], edge[..., h:]
    post_weight = inputhead * geometry.inv_dist[..., None]  # [N, K, H]
    dots = torch.einsum("nhd,nkhd->nkh", q, gather_sources(k, graph.nbr_idx))  # [N, K, H]
    weights = attention_weights(dots, gate, post_weight, geometry.envelope, graph.nbr_mask,
                                scale=d**-0.5)  # [N, K, H]
    v = self.value(x)  # [N, S, C]
    if cfg.message_path is MessagePath.NODE_CENTRIC:
      stack = torch.cat([tensor_product_vector(v, geometry.positions, coupling), v], dim=1)
      agg = neighbor_sum(weights, stack, graph.nbr_idx)  # [N, R+S, C]
      num_tp_rows = agg.shape[1] - s
      message = (tensor_product_vector(agg[:, num_tp_rows:], geometry.positions, coupling)
                 - agg[:, :num_tp_rows])  # [N, R, C]
    else:
      edge_tp = tensor_product_vector(gather_sources(v, graph.nbr_idx), geometry.vectors,
                                      coupling)  # [N, K, R, C]
      weights_c = weights.repeat(1, 1, c // h)  # [N, K, C]: channel c uses head c % H
      message = slot_sum(weights_c, edge_tp)  # [N, R, C]
    return self.proj(self.path_mix(message))


class TransformerBlock(nn.Module):
  """x += Attn(RMSNormSH(x) + s_mol on row 0); x += FFN(RMSNormSH(x))."""

  def __init__(self, config: E2FormerConfig):
    super().__init__()
    self.attn_norm = RMSNormSH(config.channels, config.lmax)
    self.attention = E2Attention(config)
    self.ffn_norm = RMSNormSH(config.channels, config.lmax)
    self.ffn = S3FeedForward(config.channels, config.lmax)

  def forward(self, x, molecule_signal, graph: TorchGraph, geometry: EdgeGeometry) -> torch.Tensor:
    xt = self.attn_norm(x)
    xt = torch.cat([xt[:, :1] + molecule_signal[:, None], xt[:, 1:]], dim=1)
    x = x + self.attention(xt, graph, geometry)
    return x + self.ffn(self.ffn_norm(x))


class E2FormerTorch(nn.Module):
  """E2Former-V2 on a :class:`TorchGraph`; parameter names mirror the Flax model's tree."""

  def __init__(self, config: E2FormerConfig):
    super().__init__()
    cfg = self.config = config
    numerics = {f: getattr(cfg, f) for f in _DEFAULT_NUMERICS}
    if numerics != _DEFAULT_NUMERICS:
      raise ValueError(f"the torch baseline implements the default numerics {_DEFAULT_NUMERICS}; "
                       f"got {numerics}")
    if cfg.power_spectrum:
      raise ValueError("the torch baseline implements the paper's model: power_spectrum=False")
    self.edge_degree = EdgeDegreeEmbedding(cfg)
    self.molecule = MoleculeEmbedding(cfg.channels)
    for layer in range(cfg.num_layers):
      self.add_module(f"block_{layer}", TransformerBlock(cfg))
    self.final_norm = RMSNormSH(cfg.channels, cfg.lmax)
    self.energy_hidden_0 = _linear(cfg.channels, cfg.channels)
    self.energy_hidden_1 = _linear(cfg.channels, cfg.channels)
    self.energy_out = _linear(cfg.channels, 1)
    self.force_head = _linear(cfg.channels, 1, bias=False) if cfg.direct_force_head else None
    for l in range(1, cfg.lmax + 1):
      self.register_buffer(f"sh_table_{l}", torch.tensor(_sh_recursion_table(l), dtype=torch.float32),
                           persistent=False)

  def forward(self, graph: TorchGraph, positions: torch.Tensor | None = None) -> ModelOutput:
    """Energies of the molecule slots; ``positions`` [N, 3] replaces graph.positions when given."""
    cfg = self.config
    positions = graph.positions if positions is None else positions
    geometry = edge_geometry(cfg, graph, positions)
    tables = [getattr(self, f"sh_table_{l}") for l in range(1, cfg.lmax + 1)]
    edge_sh = spherical_harmonics(geometry.vectors, tables)  # [N, K, S]
    edge_sh = torch.where(graph.nbr_mask[..., None], edge_sh, torch.zeros_like(edge_sh))
    x = self.edge_degree(graph.species, geometry.rbf, geometry.envelope, edge_sh, graph.nbr_idx)
    atom_signal = self.molecule(graph.charge, graph.spin)[graph.molecule_index]  # [N, C]
    for layer in range(cfg.num_layers):
      x = getattr(self, f"block_{layer}")(x, atom_signal, graph, geometry)
    x = self.final_norm(x)

    node_mask = graph.node_mask.to(x.dtype)
    h = F.silu(self.energy_hidden_1(F.silu(self.energy_hidden_0(x[:, 0]))))
    atom_energy = self.energy_out(h)[:, 0] * node_mask  # [N]
    energy = segment_sum(atom_energy, graph.molecule_index, graph.num_molecules)  # [B]
    energy = energy * graph.molecule_mask.to(x.dtype)
    direct_forces = None
    if self.force_head is not None:
      direct_forces = self.force_head(x[:, 1:4])[..., 0] * node_mask[:, None]  # [N, 3]
    return ModelOutput(energy=energy, atom_energy=atom_energy, direct_forces=direct_forces, features=x)


def energy_and_forces(model: E2FormerTorch, graph: TorchGraph, *, create_graph: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor]:
  """Energy per molecule slot [B] and conservative forces -dE/dx [N, 3] (zero on padding).

  Args:
    create_graph: keep the graph of the force computation (training on forces).
  """
  positions = graph.positions.detach().requires_grad_(True)
  energy = model(graph, positions).energy
  (grad,) = torch.autograd.grad(energy.sum(), positions, create_graph=create_graph)
  return energy, -grad * graph.node_mask[:, None].to(grad.dtype)
