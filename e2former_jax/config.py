"""Architecture configuration of E2Former-V2 (frozen, typed; no mode strings).

The paper/authors' values are translated in :func:`paper_config` with their provenance; every
decision taken where the reference is ambiguous or buggy is written down in ``docs/decisions.md``.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp

# Epsilon of the LayerNorms in the radial MLPs and the query/key readout: the authors' (torch's
# default). Until the field existed every LayerNorm used flax's default, LEGACY_LAYER_NORM_EPS, and a
# saved model config without the field means that value.
DEFAULT_LAYER_NORM_EPS = 1e-5
LEGACY_LAYER_NORM_EPS = 1e-6


class MessagePath(enum.Enum):
  """How the first-order equivariant message sum_j a_ij T(v_j, r_ij) is evaluated."""

  # Node-centric (E2Former-V2): three attention-weighted moments of v_j per node, T applied once per
  # node; edges carry only per-head scalars (docs/model.md §8.5).
  NODE_CENTRIC = "node_centric"
  # The standard way: gather v_j on every edge and form T(v_j, r_ij) per edge (benchmark baseline,
  # test oracle). Memory grows with edges x rows x channels.
  PER_EDGE = "per_edge"


class AttentionImpl(enum.Enum):
  """Implementation of the fused node-centric attention (dispatcher in ``e2former_jax.ops``)."""

  # The Pallas kernels when the computation is traced for a GPU, the jnp reference otherwise
  # (Pallas' Triton lowering needs a GPU). Resolved in one place: ``ops.resolve_impl``.
  AUTO = "auto"
  XLA = "xla"  # pure jnp reference, compiled by XLA
  PALLAS = "pallas"  # Pallas/Triton kernels (GPU)
  PALLAS_INTERPRET = "pallas_interpret"  # the same kernels in interpret mode (CPU tests)


class SoftmaxSink(enum.Enum):
  """Where the attention sink of strength 1e-3 sits in the softmax (docs/decisions.md D1)."""

  # Ours: alpha_k = exp(l_k) phi_k / (sum_k' exp(l_k') phi_k' + 1e-3) over the valid slots, the sink
  # at logit 0. Weights are C2 in positions; masked slots have no effect.
  ZERO = "zero"
  # The authors': the sink at M = the largest logit over every slot that holds an atom, masked ones
  # included: alpha_k = exp(l_k) phi_k / (sum_k' exp(l_k') phi_k' + 1e-3 exp(M)). Graphs must then
  # hold the authors' masked slots (``E2FormerConfig.reference_slots``). Energies jump where M
  # changes its slot set (atoms entering or leaving the K nearest).
  MAX_LOGIT = "max_logit"


class Precision(enum.Enum):
  """Number format of the products and stored activations (docs/model.md §9.5)."""

  # MIXED when the computation is traced for a GPU, FULL elsewhere. Resolved in one place:
  # ``resolve_precision``. On one H100 mixed precision matched float32's validation errors over three
  # training seeds (docs/decisions.md D18) at two thirds of the time and memory.
  AUTO = "auto"
  FULL = "full"  # every product and activation in the inputs' dtype (float32; float64 under x64)
  MIXED = "mixed"  # bfloat16 products and storage, float32 accumulation, norms, energies and forces


def resolve_precision(precision: Precision) -> Precision:
  """The precision that runs: AUTO becomes MIXED when tracing for a GPU, else FULL."""
  if precision is Precision.AUTO:
    return Precision.MIXED if jax.default_backend() == "gpu" else Precision.FULL
  return precision


class GateNormalisers(enum.Enum):
  """Second-moment normalisers of the S3 feed-forward gates (docs/decisions.md D10)."""

  EXACT = "exact"  # ours: E[(c f(z))^2] = 1 computed by quadrature (SiLU 1.67653, sigmoid 1.84623)
  MONTE_CARLO = "monte_carlo"  # the authors': e3nn's Monte-Carlo estimates (1.679177, 1.846706)


@dataclasses.dataclass(frozen=True, kw_only=True)
class E2FormerConfig:
  """Hyperparameters of the E2Former-V2 network.

  Attributes:
    num_layers: number of pre-norm transformer blocks.
    channels: channels C of every degree l = 0..lmax (node features are [N, (lmax+1)^2, C]).
    lmax: maximum degree of node features.
    num_heads: attention heads H; channel c of the value/tensor-product path belongs to head c % H.
    head_dim: width d of the per-head invariant query/key.
    num_rbf: number of Gaussian radial basis functions on [0, cutoff].
    cutoff: radial cutoff r_c in angstrom (graph, basis range and envelope).
    max_neighbors: static number K of neighbour slots per atom (nearest within the cutoff).
    edge_hidden: hidden width of every per-edge radial MLP.
    type_embed_dim: width of the per-layer source/target atom-type embeddings of the attention gates.
    num_species: size of the atom-type tables; valid atomic numbers are 1 .. num_species - 1.
    avg_degree: constant normaliser of the edge-degree embedding (authors' value, docs/model.md §5.1).
    message_path: node-centric (default) or materialised per-edge message.
    attention_impl: kernel implementation of the node-centric attention (default: automatic,
      Pallas on GPU); it changes speed and memory, not the numbers beyond round-off.
    radial_impl: implementation of the per-edge radial MLPs (docs/model.md §4.3, §11.8): the fused
      Pallas kernel (default AUTO: on a GPU), which computes an MLP wherever nothing differentiates
      it (energy + direct forces) and stores neither the basis nor a hidden activation, or XLA's
      layers; speed and memory, not the numbers (docs/performance.md §6 item 6).
    radial_vjp_kernel: under a Pallas ``radial_impl``, differentiate the MLPs through the fused
      kernels too (energy + forces: the forward kernel keeps only its inputs and a fused backward
      kernel gives the edge lengths' cotangents) rather than through XLA's layers, which keep their
      [N, K, hidden] activations.
    direct_force_head: add a linear l=1 -> force head (stage-1 training); conservative forces
      -dE/dx are always available.
    power_spectrum: add a linear map of the initial features' squared norm per degree l >= 1
      (three-body invariants of each atom's neighbourhood) to their l = 0 row (docs/model.md §5.3,
      docs/decisions.md D21). Ours, not the paper's; False is the paper's model.
    layer_norm_eps: epsilon of the LayerNorms inside the radial MLPs and the query/key readout
      (the authors' and torch's 1e-5; checkpoints saved before this field existed used flax's
      1e-6, and load with it).
    gate_normalisers: constants of the S3 feed-forward gates.
    inverse_distance_eps: the post-softmax weight divides by |r_ij| + inverse_distance_eps (the
      authors' code adds 1e-8; ours 0, see docs/decisions.md D4).
    softmax_sink: where the attention sink sits (docs/decisions.md D1).
    remat: rematerialise in the backward pass (``flax.linen.remat``) each transformer block and,
      inside, every per-edge radial MLP: the gradient keeps the block inputs [N, S, C] and the
      MLP outputs instead of their [N, K, hidden] activations, for one or two more forward passes.
      Same numbers, same parameters; only memory and time change (for the largest systems).
    edge_chunk_atoms: evaluate every per-edge radial MLP (attention gates, edge-degree embedding)
      over chunks of this many target atoms, each chunk recomputed in the backward pass, so that
      no [N, K, edge_hidden] activation is stored for forces or gradients (and the edge-degree
      embedding forms no [N, K, C] radial output either); None evaluates each MLP over every edge
      at once and keeps its activations (rematerialised only under ``remat``). Same numbers, same
      parameters.
    auto_memory: per structure, turn on edge chunks and then ``remat`` when energy + forces would
      not otherwise fit the free memory of the device (``e2former_jax.nn.memory``; never turns off
      what ``remat`` and ``edge_chunk_atoms`` ask for); False computes exactly as they say.
    precision: MIXED: bfloat16 storage and matrix products (float32 accumulation) in the radial
      MLPs, the SO(3) linear maps, the query/key readouts, the attention kernels' inputs and the
      feed-forward blocks; float32 weights, residual stream, norms, softmax statistics, energy
      head, energies and forces. The numbers change within bfloat16 rounding. FULL: everything
      in the inputs' dtype. AUTO (default): MIXED on a GPU, FULL elsewhere.
  """

  num_layers: int = 4
  channels: int = 256
  lmax: int = 2
  num_heads: int = 128
  head_dim: int = 8
  num_rbf: int = 256
  cutoff: float = 4.5
  max_neighbors: int = 32
  edge_hidden: int = 128
  type_embed_dim: int = 128
  num_species: int = 119
  avg_degree: float = 23.01
  message_path: MessagePath = MessagePath.NODE_CENTRIC
  attention_impl: AttentionImpl = AttentionImpl.AUTO
  radial_impl: AttentionImpl = AttentionImpl.AUTO
  radial_vjp_kernel: bool = False
  direct_force_head: bool = True
  power_spectrum: bool = False
  layer_norm_eps: float = DEFAULT_LAYER_NORM_EPS
  gate_normalisers: GateNormalisers = GateNormalisers.EXACT
  inverse_distance_eps: float = 0.0
  softmax_sink: SoftmaxSink = SoftmaxSink.ZERO
  remat: bool = False
  edge_chunk_atoms: int | None = None
  auto_memory: bool = True
  precision: Precision = Precision.AUTO

  def __post_init__(self):
    if self.channels % self.num_heads:
      raise ValueError(f"channels ({self.channels}) must be a multiple of num_heads ({self.num_heads})")
    if self.lmax < 1:
      raise ValueError(f"lmax must be >= 1 for the first-order message, got {self.lmax}")
    for name in ("num_layers", "channels", "num_heads", "head_dim", "num_rbf", "max_neighbors"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.edge_chunk_atoms is not None and self.edge_chunk_atoms < 1:
      raise ValueError(f"edge_chunk_atoms must be positive or None, got {self.edge_chunk_atoms}")
    if not self.cutoff > 0:
      raise ValueError(f"cutoff must be positive, got {self.cutoff}")
    if not self.layer_norm_eps > 0:
      raise ValueError(f"layer_norm_eps must be positive, got {self.layer_norm_eps}")
    if not self.inverse_distance_eps >= 0:
      raise ValueError(f"inverse_distance_eps must be >= 0, got {self.inverse_distance_eps}")

  @property
  def reference_slots(self) -> bool:
    """Whether graphs must fill masked slots as the authors' code does (see
    ``e2former_jax.neighbors.build_graph``): only the MAX_LOGIT sink reads them."""
    return self.softmax_sink is SoftmaxSink.MAX_LOGIT

  @property
  def compute_dtype(self):
    """dtype of the products and stored activations of the blocks and radial MLPs: bfloat16 when
    ``precision`` resolves to MIXED, else None (the inputs' dtype). Read at trace time."""
    return jnp.bfloat16 if resolve_precision(self.precision) is Precision.MIXED else None

  @property
  def num_rows(self) -> int:
    """Rows S = (lmax + 1)^2 of a node feature tensor."""
    return (self.lmax + 1) ** 2

  def replace(self, **changes) -> "E2FormerConfig":
    return dataclasses.replace(self, **changes)


def paper_config(**overrides) -> E2FormerConfig:
  """The E2Former-V2 paper/authors' architecture (arXiv 2601.16622; authors' e2former.yaml).

  4 blocks, 256 channels for l <= 2, 128 heads x 8, 256 Gaussian RBFs, K = 32, r_c = 4.5 A
  (the backbone yaml's max_radius; the authors' OMol25 stage scripts use 6 A, see docs/decisions.md).
  """
  return E2FormerConfig(**overrides)


# The numerics of the authors' code (docs/decisions.md D14); an imported checkpoint gets them, so it
# reproduces the authors' numbers. 1e-8: their 1 / (|r_ij| + 1e-8).
REFERENCE_NUMERICS = dict(layer_norm_eps=DEFAULT_LAYER_NORM_EPS,
                          gate_normalisers=GateNormalisers.MONTE_CARLO, inverse_distance_eps=1e-8,
                          softmax_sink=SoftmaxSink.MAX_LOGIT, precision=Precision.FULL)


def tiny_config(**overrides) -> E2FormerConfig:
  """A small configuration for tests and CPU training (same code paths, small widths)."""
  base = dict(num_layers=2, channels=16, num_heads=4, head_dim=4, num_rbf=16, max_neighbors=12,
              edge_hidden=16, type_embed_dim=8)
  base.update(overrides)
  return E2FormerConfig(**base)
