"""The authors' state-dict layout, as the checkpoint import reads it (docs/decisions.md D14).

Key prefixes and the tensors that are dead or constant in their model; the architecture the shapes
(and their config mapping, when given) imply (:func:`infer_dims`, :func:`config_settings`); and
where each of our parameters sits in their keys, with its conversion (:class:`Mapper`), checked
against the parameter tree of our model (:func:`check_complete`). This is the part of the import
that follows any change of our parameter names or of their layout; ``authors_checkpoint`` applies
it to a state dict.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax import so3
from e2former_jax.config import E2FormerConfig, paper_config
from e2former_jax.graph import Graph
from e2former_jax.nn.embedding import MAX_ABS_CHARGE, MAX_MULTIPLICITY
from e2former_jax.nn.model import E2Former

BACKBONE = "decoder."
CORE = "decoder.decoder."
ENERGY_HEADS = "head.energy_heads."
FORCE_HEADS = "head.force_heads."
# A key every checkpoint of theirs holds; whatever precedes it is a wrapper's prefix ("module.").
ANCHOR = CORE + "norm_final.affine_weight"
# Trainable tensors that have no effect on their energies or forces (no gradient; README "Dead
# parameters"): the atom-token embedding and its projection, the default node embedding,
# heads2basis and the edge-degree embedding's proj.
DEAD = tuple(re.compile(p) for p in (
    r"decoder\.embedding\.weight", r"decoder\.unifiedtokentoembedding\.(weight|bias)",
    r"decoder\.decoder\.default_node_embedding\.weight",
    r"decoder\.decoder\.heads2basis\.(weight|bias)",
    r"decoder\.decoder\.edge_deg_embed_dense\.proj\.(weight|bias)"))
# Constant tables of their Wigner-rotation route to the tensor product and of code paths the
# model never runs; the direct Clebsch-Gordan product (docs/decisions.md D3) needs none of them.
UNUSED_CONSTANTS = tuple(re.compile(p) for p in (
    r"decoder\.decoder\.Jd_list\.\d+", r"decoder\.decoder\.edge_deg_embed_dense\.sph\.W",
    r"decoder\.decoder\.blocks\.\d+\.ga\.first_order_tp\.so2_tp\.(selected_idx|CG_weight)"))
# The atom-type tables (edge-degree embedding and per-block attention), indexed by atomic number.
TYPE_TABLE = re.compile(re.escape(CORE) + r"(edge_deg_embed_dense|blocks\.\d+\.ga)\."
                         r"(target|source)_embedding\.weight")
# Their variants the model implements, by config key (anything else is refused).
SUPPORTED_VARIANTS = {
    "attn_type": ("so2-first-order",), "ffn_type": ("s3",), "norm_layer": ("rms_norm_sh",),
    "tp_type": ("QK_alpha", "QK_alpha+triton"), "basis_type": ("gaussiansmear",),
    "edge_embedtype": ("default",), "with_cluster": (False,),
}
# Our tables' rows: atomic numbers 0..118 (paper_config().num_species), charges
# -MAX_ABS_CHARGE..MAX_ABS_CHARGE (row q + MAX_ABS_CHARGE, their index too) and multiplicities
# 0..MAX_MULTIPLICITY (row = multiplicity, theirs too).
SPECIES_ROWS = paper_config().num_species
CHARGE_ROWS = 2 * MAX_ABS_CHARGE + 1
MULTIPLICITY_ROWS = MAX_MULTIPLICITY + 1


# ---------------------------------------------------------------------------------- inference


@dataclasses.dataclass(frozen=True)
class Dims:
  """The architecture the shapes give; ``sources``: config field -> the key it was read from."""

  num_layers: int
  channels: int
  lmax: int
  heads: int
  head_dim: int
  num_rbf: int
  hidden: int
  type_width: int
  sources: dict[str, str]


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int) -> tuple[int, ...]:
  if key not in shapes:
    raise ValueError(f"missing key {key!r}")
  shape = tuple(shapes[key])
  if len(shape) != ndim:
    raise ValueError(f"key {key!r} has shape {shape}, expected {ndim} dimensions")
  return shape


def infer_dims(shapes: Mapping[str, tuple[int, ...]]) -> Dims:
  blocks = sorted({int(m.group(1)) for key in shapes
                   if (m := re.match(re.escape(CORE) + r"blocks\.(\d+)\.", key))})
  if not blocks or blocks != list(range(len(blocks))):
    raise ValueError(f"transformer blocks {blocks} are not numbered 0..L-1")
  rows, channels = _shape(shapes, CORE + "norm_final.affine_weight", 2)
  gates_key = CORE + "blocks.0.ga.fc_easy.net.6.weight"
  two_h, hidden = _shape(shapes, gates_key, 2)
  qk_key = CORE + "blocks.0.ga.query_linear.final_linear.3.weight"
  qk_width, half = _shape(shapes, qk_key, 2)
  (num_rbf,) = _shape(shapes, CORE + "rbf.offset", 1)
  type_key = CORE + "blocks.0.ga.target_embedding.weight"
  _, type_width = _shape(shapes, type_key, 2)
  heads = two_h // 2
  if rows < 2 or two_h % 2 or not heads or qk_width % heads or channels % heads:
    raise ValueError(f"inconsistent widths: {gates_key} {shapes[gates_key]} (2 x heads), "
                     f"{qk_key} {shapes[qk_key]} (heads x head_dim), channels {channels}")
  if qk_width != 2 * half:
    raise ValueError(f"key {qk_key!r} has shape {shapes[qk_key]}: their readout's hidden width "
                     f"is half its output, expected ({qk_width}, {qk_width // 2})")
  sources = {"num_layers": "blocks.<b> keys", "channels": f"{CORE}norm_final.affine_weight shape",
             "lmax": f"{CORE}norm_final.affine_weight shape", "num_heads": f"{gates_key} shape",
             "head_dim": f"{qk_key} shape", "num_rbf": f"{CORE}rbf.offset shape",
             "edge_hidden": f"{gates_key} shape", "type_embed_dim": f"{type_key} shape"}
  return Dims(num_layers=len(blocks), channels=channels, lmax=rows - 1, heads=heads,
               head_dim=qk_width // heads, num_rbf=num_rbf, hidden=hidden, type_width=type_width,
               sources=sources)


def _irreps_multiplicity(text: str, key: str, lmax: int) -> int:
  """The common multiplicity of "Cx0e+Cx1e+..." (parities ignored), checked against lmax."""
  terms = [re.fullmatch(r"\s*(\d+)x(\d+)[eo]\s*", t) for t in str(text).split("+")]
  if not all(terms) or [int(t.group(2)) for t in terms] != list(range(len(terms))):
    raise ValueError(f"reference config {key}={text!r}: expected 'Cx0e+Cx1e+...' for l = 0, 1, ...")
  mults = {int(t.group(1)) for t in terms}
  if len(mults) != 1 or len(terms) != lmax + 1:
    raise ValueError(f"reference config {key}={text!r}: expected one multiplicity for l = 0..{lmax} "
                     f"(the checkpoint's shapes)")
  return mults.pop()


def config_settings(dims: Dims, reference_config: Mapping[str, Any] | None,
                    basis_cutoff: float | None) -> tuple[dict[str, Any], dict[str, str], list[str]]:
  """The values shapes cannot tell, and the provenance of every config field."""
  ref = dict(reference_config or {})
  if isinstance(ref.get("backbone_config"), Mapping):
    ref = dict(ref["backbone_config"])
  defaults = paper_config()
  sources = dict(dims.sources)
  for key, allowed in SUPPORTED_VARIANTS.items():
    if key in ref and ref[key] not in allowed:
      raise ValueError(f"reference config {key}={ref[key]!r}: only {list(allowed)} is implemented")
  # Their config key -> (its value as a model quantity, the checkpoint's value of it).
  checks = {
      "num_layers": (lambda v: int(v), dims.num_layers),
      "num_attn_heads": (lambda v: int(v), dims.heads),
      "attn_scalar_head": (lambda v: int(v), dims.head_dim),
      "number_of_basis": (lambda v: int(v), dims.num_rbf),
      "irreps_node_embedding": (lambda v: _irreps_multiplicity(v, "irreps_node_embedding",
                                                               dims.lmax), dims.channels),
      # Value channels per head: heads x multiplicity = channels.
      "irreps_head": (lambda v: _irreps_multiplicity(v, "irreps_head", dims.lmax) * dims.heads,
                      dims.channels),
  }
  for key, (quantity, from_shapes) in checks.items():
    if key in ref and quantity(ref[key]) != from_shapes:
      raise ValueError(f"reference config {key}={ref[key]!r} contradicts the checkpoint's shapes "
                       f"(which give {from_shapes})")
  settings = {}
  for field, key in (("cutoff", "max_radius"), ("max_neighbors", "max_neighbors"),
                     ("avg_degree", "avg_degree")):
    if key in ref:
      settings[field] = type(getattr(defaults, field))(ref[key])
      sources[field] = f"reference config {key}"
    elif field == "cutoff" and basis_cutoff is not None:
      settings[field] = basis_cutoff
      sources[field] = "the last Gaussian offset (rbf.offset)"
    else:
      settings[field] = getattr(defaults, field)
      sources[field] = "the authors' default (e2former.yaml / constructor)"
  used = {"max_radius", "max_neighbors", "avg_degree", *checks, *SUPPORTED_VARIANTS}
  return settings, sources, sorted(k for k in ref if k not in used)


# ------------------------------------------------------------------------------------ mapping


def _transpose(w: np.ndarray) -> np.ndarray:
  return w.T


class Mapper:
  """Collects (our path, source key, conversion) for every parameter and the expected constants."""

  def __init__(self, shapes: Mapping[str, tuple[int, ...]], config: E2FormerConfig):
    self.shapes, self.config = shapes, config
    self.targets: list[tuple[tuple[str, ...], str, Callable]] = []
    self.constants: dict[str, np.ndarray] = {}
    self.truncated: dict[str, str] = {}

  def _expect(self, key: str, shape: tuple[int, ...]) -> None:
    if key not in self.shapes:
      raise ValueError(f"missing key {key!r} (expected shape {shape})")
    if tuple(self.shapes[key]) != shape:
      raise ValueError(f"key {key!r} has shape {tuple(self.shapes[key])}, expected {shape} for "
                       f"{describe(self.config)}")

  def take(self, key: str, shape: tuple[int, ...], path: tuple[str, ...],
           convert: Callable = np.asarray) -> None:
    self._expect(key, shape)
    self.targets.append((path, key, convert))

  def constant(self, key: str, value: np.ndarray) -> None:
    self._expect(key, value.shape)
    self.constants[key] = value

  def dense(self, key: str, path: tuple[str, ...], out: int, inp: int, bias: bool = True) -> None:
    self.take(f"{key}.weight", (out, inp), (*path, "kernel"), _transpose)
    if bias:
      self.take(f"{key}.bias", (out,), (*path, "bias"))

  def layer_norm(self, key: str, path: tuple[str, ...], width: int) -> None:
    self.take(f"{key}.weight", (width,), (*path, "scale"))
    self.take(f"{key}.bias", (width,), (*path, "bias"))

  def so3_linear(self, key: str, path: tuple[str, ...], out: int, inp: int) -> None:
    self.take(f"{key}.weight", (self.config.lmax + 1, out, inp), (*path, "weight"))
    self.take(f"{key}.bias", (out,), (*path, "bias"))

  def table(self, key: str, rows: int, width: int, path: tuple[str, ...]) -> None:
    if key not in self.shapes:
      raise ValueError(f"missing key {key!r} (expected at least {rows} rows of {width})")
    shape = tuple(self.shapes[key])
    if len(shape) != 2 or shape[1] != width or shape[0] < rows:
      raise ValueError(f"key {key!r} has shape {shape}, expected ({rows} or more, {width})")
    if shape[0] > rows:
      self.truncated[key] = [rows, shape[0]]
    self.targets.append((path, key, lambda w: w[:rows]))

  def degree_constants(self, key: str, balance: bool) -> None:
    degrees = so3.row_degrees(self.config.lmax)
    self.constant(f"{key}.expand_index", degrees.astype(np.float64))
    if balance:
      weight = 1.0 / ((2 * degrees + 1) * (self.config.lmax + 1))
      self.constant(f"{key}.balance_degree_weight", weight[:, None])

  def rms_norm(self, key: str, path: tuple[str, ...]) -> None:
    c = self.config.channels
    self.take(f"{key}.affine_weight", (self.config.lmax + 1, c), (*path, "scale"))
    self.take(f"{key}.affine_bias", (c,), (*path, "bias"))
    self.degree_constants(key, balance=True)

  def radial_mlp(self, key: str, path: tuple[str, ...], type_width: int, out: int) -> None:
    """Their Sequential(Linear, LayerNorm, SiLU, Linear, LayerNorm, SiLU, Linear) as ``net.<i>``;
    the first Linear's input is [rbf; target type; source type], ours three Linears."""
    nb, hidden = self.config.num_rbf, self.config.edge_hidden
    first = f"{key}.0.weight"
    self._expect(first, (hidden, nb + 2 * type_width))
    blocks = {"rbf_in": slice(0, nb), "target_in": slice(nb, nb + type_width),
              "source_in": slice(nb + type_width, nb + 2 * type_width)}
    for name, columns in blocks.items():
      self.targets.append(((*path, name, "kernel"), first, lambda w, cols=columns: w[:, cols].T))
    self.take(f"{key}.0.bias", (hidden,), (*path, "rbf_in", "bias"))
    self.layer_norm(f"{key}.1", (*path, "norm_0"), hidden)
    self.dense(f"{key}.3", (*path, "hidden"), hidden, hidden)
    self.layer_norm(f"{key}.4", (*path, "norm_1"), hidden)
    self.dense(f"{key}.6", (*path, "out"), out, hidden)

  def readout(self, key: str, path: tuple[str, ...]) -> None:
    """SO3_Linear2Scalar: ``weight`` (+ ``bias`` [1, 1, P] on the invariant row) and ``weight2``."""
    cfg = self.config
    width = cfg.num_heads * cfg.head_dim
    p = width // 2
    self.take(f"{key}.weight", (cfg.lmax + 1, p, cfg.channels), (*path, "left", "weight"))
    self.take(f"{key}.bias", (1, 1, p), (*path, "left", "bias"), lambda b: b.reshape(-1))
    self.take(f"{key}.weight2", (cfg.lmax + 1, p, cfg.channels), (*path, "right", "weight"))
    self.dense(f"{key}.final_linear.0", (*path, "mlp_in"), p, (cfg.lmax + 1) * p)
    self.layer_norm(f"{key}.final_linear.1", (*path, "mlp_norm"), p)
    self.dense(f"{key}.final_linear.3", (*path, "mlp_out"), width, p)
    self.degree_constants(key, balance=False)

  def build(self, head: str, force_head: bool) -> None:
    cfg = self.config
    c, lmax, nb = cfg.channels, cfg.lmax, cfg.num_rbf
    self.table(BACKBONE + "embedding_charge.weight", CHARGE_ROWS, c, ("molecule", "charge_table"))
    self.table(BACKBONE + "embedding_multiplicity.weight", MULTIPLICITY_ROWS, c,
               ("molecule", "spin_table"))
    self.dense(BACKBONE + "mix_cm.0", ("molecule", "mix"), c, 2 * c)
    self.constant(CORE + "rbf.offset", np.linspace(0.0, cfg.cutoff, nb))
    degree = CORE + "edge_deg_embed_dense."
    for side in ("target", "source"):
      self.table(f"{degree}{side}_embedding.weight", cfg.num_species, nb,
                 ("edge_degree", f"{side}_table"))
    for l in range(lmax + 1):
      self.radial_mlp(f"{degree}gbf_projs.{l}.net", ("edge_degree", f"radial_l{l}"), nb, c)
    paths = so3.first_order_paths(lmax)
    for b in range(cfg.num_layers):
      key, block = f"{CORE}blocks.{b}.", f"block_{b}"
      attn = (block, "attention")
      self.rms_norm(key + "norm_1", (block, "attn_norm"))
      self.readout(key + "ga.query_linear", (*attn, "query"))
      self.readout(key + "ga.key_linear", (*attn, "key"))
      for side, ours in (("target", "target_types"), ("source", "source_types")):
        self.table(f"{key}ga.{side}_embedding.weight", cfg.num_species, cfg.type_embed_dim,
                   (*attn, ours))
      self.radial_mlp(key + "ga.fc_easy.net", (*attn, "edge_gates"), cfg.type_embed_dim,
                      2 * cfg.num_heads)
      self.so3_linear(key + "ga.proj_value", (*attn, "value"), c, c)
      path_count = [sum(p.l3 == l3 for p in paths) for l3 in range(lmax + 1)]
      tp = key + "ga.first_order_tp.so2_tp."
      for l3, count in enumerate(path_count):
        self.dense(f"{tp}out_linear.{l3}", (*attn, "path_mix", f"mix_l{l3}"), c, count * c,
                   bias=False)
      norms = np.array([1.0 / np.sqrt(path_count[l]) for l in so3.row_degrees(lmax)])
      self.constant(tp + "path_norm", norms.reshape(1, -1, 1))
      self.so3_linear(key + "ga.proj_first", (*attn, "proj"), c, c)
      self.rms_norm(key + "norm_ffn", (block, "ffn_norm"))
      self.so3_linear(key + "ffn.slinear_1", (block, "ffn", "linear_in"), c, c)
      self.dense(key + "ffn.gate.gates", (block, "ffn", "gate"), (lmax + 1) * c, c)
      self.so3_linear(key + "ffn.slinear_2", (block, "ffn", "linear_out"), c, c)
    self.rms_norm(CORE + "norm_final", ("final_norm",))
    mlp = f"{ENERGY_HEADS}{head}.mlp."
    self.dense(mlp + "0", ("energy_hidden_0",), c, c)
    self.dense(mlp + "2", ("energy_hidden_1",), c, c)
    self.dense(mlp + "4", ("energy_out",), 1, c)
    if force_head:
      self.dense(f"{FORCE_HEADS}{head}.sing_linear", ("force_head",), 1, c, bias=False)


def describe(config: E2FormerConfig) -> str:
  return (f"{config.num_layers} blocks, {config.channels} channels, lmax {config.lmax}, "
          f"{config.num_heads} heads x {config.head_dim}, {config.num_rbf} basis functions")


def check_complete(config: E2FormerConfig, shapes: Mapping[str, tuple[int, ...]], targets) -> None:
  """Every parameter of the model has exactly one source of its shape (guards the mapping)."""
  n, k = 2, config.max_neighbors
  spec = jax.ShapeDtypeStruct
  graph = Graph(positions=spec((n, 3), jnp.float32), species=spec((n,), jnp.int32),
                node_mask=spec((n,), jnp.bool_), molecule_index=spec((n,), jnp.int32),
                nbr_idx=spec((n, k), jnp.int32), nbr_mask=spec((n, k), jnp.bool_),
                nbr_shift=spec((n, k, 3), jnp.float32), charge=spec((1,), jnp.int32),
                spin=spec((1,), jnp.int32), molecule_mask=spec((1,), jnp.bool_))
  expected = jax.eval_shape(E2Former(config).init, jax.random.key(0), graph)["params"]
  wanted = {"/".join(str(p.key) for p in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(expected)}
  # Zero arrays of the source shapes are never touched (the conversions are views): only shapes.
  got = {"/".join(path): convert(np.zeros(shapes[key], np.float32)).shape
         for path, key, convert in targets}
  if len(got) != len(targets) or got != wanted:
    raise AssertionError(f"import mapping out of date: "
                         f"{sorted(set(wanted.items()) ^ set(got.items()))[:5]}")
