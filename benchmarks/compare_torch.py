"""E2Former-V2 side by side: the JAX/Pallas model against our PyTorch baseline on the same GPU.

Both implementations get the same structures, the same weights (the Flax initial parameters,
converted for torch with ``benchmarks.torch_baseline.flax_to_torch_state_dict``), the same precision
(float32 storage; ``--precision`` chooses TF32 or full float32 matrix products for both) and the
paper configuration (or ``--config tiny`` for a CPU dry run). Measured per (implementation,
structure), each in a fresh subprocess so that peak GPU memory belongs to that configuration alone:

* energy + conservative forces (-dE/dx): median wall time of repeated calls after warm-up, the
  atoms/s throughput, and the peak GPU memory (torch ``max_memory_allocated``; jax
  ``memory_stats()["peak_bytes_in_use"]``, both counting the weights and inputs);
* one training step on forces: energy and force losses -> parameter gradients (double backward)
  -> Adam update; time and peak memory;
* out-of-memory is caught and recorded; once an implementation runs out of memory, larger
  structures are recorded as skipped for it.

Then the largest structure each implementation fits (energy + forces only): doubling from the
largest size that ran, then one geometric bisection step, while the time budget lasts; plus an
estimate from a straight-line fit of peak memory against atoms.

Structures: atoms on a jittered cubic lattice at liquid-water density (0.1 atoms / A^3; O and H
in a 1:2 ratio), carved as a ball in free space and ordered along a Morton curve (molecules keep
their atoms together in memory too); K = 32 nearest neighbours within 4.5 A. "Batches" are B
separate clusters of m atoms each (one molecule slot each).

Implementations (``--impls``):
  jax-pallas          node-centric message, fused Pallas attention kernels (AttentionImpl.PALLAS)
  jax-pallas-remat    the same with every transformer block rematerialised in the backward pass
                      (E2FormerConfig.remat): one more forward pass for ~1/num_layers of the memory
  jax-xla             node-centric message, the jnp reference under XLA (AttentionImpl.XLA)
  jax-per-edge        materialised per-edge message in JAX (MessagePath.PER_EDGE)
  torch-edge          PyTorch eager, materialised per-edge message
  torch-node          PyTorch eager, node-centric message with plain gathers
  torch-compile-edge  torch.compile of the per-edge model (forces through torch.func.grad)
  torch-compile-node  torch.compile of the node-centric model
  torch-compile       torch.compile of whichever eager path was faster at the first structure

Outputs (``--out DIR``): ``compare_torch.json`` (updated after every run), ``compare_torch.png``
(time and memory against atoms, log-log) and ``results_section.md``, which is also appended to
``--results-md`` (benchmarks/RESULTS.md by default).

Usage:
  python benchmarks/compare_torch.py --quick --out DIR          # the H100 run, <= 8 min
  python benchmarks/compare_torch.py --phases fit --budget-s 300 --out DIR
  python benchmarks/compare_torch.py --device cpu --config tiny --sizes 64 --batches 4x12 \\
      --impls jax-pallas,torch-node,torch-edge --out /tmp/cmp   # CPU dry run
  python benchmarks/compare_torch.py --report-from DIR/compare_torch.json   # re-render, append md
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from benchmarks.provenance import git_commit  # noqa: E402
from benchmarks.xla_memory import compiled_memory  # noqa: E402

# Structures.
DENSITY = 0.1  # atoms per A^3: liquid water (33.4 molecules per nm^3, 3 atoms each)
LATTICE_JITTER = 0.25  # uniform displacement, as a fraction of the lattice spacing, per axis
OXYGEN, HYDROGEN = 8, 1
MOLECULE_GAP = 10.0  # A between the bounding spheres of batched clusters (> cutoff: no edges)
SEED = 0
# Training step: Adam on w_E mean(E^2) + w_F mean((F - F_ref)^2) with random force targets.
LEARNING_RATE = 1e-4
ENERGY_WEIGHT, FORCE_WEIGHT = 1.0, 10.0
FORCE_TARGET_SCALE = 0.5  # eV/A, standard deviation of the random force targets
# Both frameworks may use this fraction of the GPU memory (JAX's allocator and torch's caps).
GPU_MEMORY_FRACTION = 0.95
HEADLINE_ATOMS = 10_000  # the target: energy + forces speed-up at 10k atoms
RESULT_PREFIX = "RESULT "
JAX_IMPLS = ("jax-pallas", "jax-pallas-remat", "jax-xla", "jax-per-edge")
TORCH_IMPLS = ("torch-edge", "torch-node", "torch-compile-edge", "torch-compile-node", "torch-compile")
QUICK_IMPLS = "jax-pallas,torch-node,torch-edge,torch-compile"
FULL_IMPLS = "jax-pallas,jax-xla,torch-node,torch-edge,torch-compile-node,torch-compile-edge"


# ----------------------------------------------------------------------------------- structures


@dataclasses.dataclass(frozen=True)
class StructureSpec:
  """``molecules`` clusters of ``atoms_per_molecule`` atoms each."""

  molecules: int
  atoms_per_molecule: int

  @property
  def atoms(self) -> int:
    return self.molecules * self.atoms_per_molecule

  @property
  def name(self) -> str:
    if self.molecules == 1:
      return f"{self.atoms} atoms"
    return f"{self.molecules}x{self.atoms_per_molecule} molecules"

  @classmethod
  def parse(cls, text: str) -> StructureSpec:
    """'10000' (one structure) or '64x30' (a batch)."""
    if "x" in text:
      b, m = text.split("x")
      return cls(int(b), int(m))
    return cls(1, int(text))


def _morton_order(positions: np.ndarray, cell: float) -> np.ndarray:
  """Permutation sorting points along a Z-order curve of cubic cells of side ``cell``."""
  cells = np.floor((positions - positions.min(axis=0)) / cell).astype(np.int64)
  code = np.zeros(len(positions), np.int64)
  for bit in range(20):
    for axis in range(3):
      code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
  return np.argsort(code, kind="stable")


def cluster(num_atoms: int, rng: np.random.Generator) -> np.ndarray:
  """[n, 3] atoms of a jittered cubic lattice at DENSITY, the n sites nearest the centre."""
  spacing = DENSITY ** (-1 / 3)
  side = int(math.ceil(num_atoms ** (1 / 3))) + 2
  axis = np.arange(side) * spacing
  grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
  radius = np.linalg.norm(grid - grid.mean(axis=0), axis=1)
  sites = grid[np.argsort(radius, kind="stable")[:num_atoms]]
  sites = sites + rng.uniform(-LATTICE_JITTER, LATTICE_JITTER, sites.shape) * spacing
  return sites - sites.mean(axis=0)


def neighbor_slots(positions: np.ndarray, cutoff: float, k: int) -> tuple[np.ndarray, np.ndarray]:
  """K nearest other atoms within the cutoff: idx [n, K] int32 (sentinel n), mask [n, K] bool."""
  n = len(positions)
  try:
    from scipy.spatial import cKDTree
  except ImportError:  # the project's own cell-list search (slower for large n)
    from e2former_jax.neighbors import neighbor_list
    nbrs = neighbor_list(positions, cutoff, k)
    return nbrs.idx, nbrs.mask
  dist, idx = cKDTree(positions).query(positions, k=k + 1, distance_upper_bound=cutoff, workers=-1)
  # Column 0 is the atom itself (distance 0; the jittered lattice has no coincident atoms).
  idx, dist = idx[:, 1:], dist[:, 1:]
  mask = np.isfinite(dist) & (idx < n)
  return np.where(mask, idx, n).astype(np.int32), mask


def make_structure(spec: StructureSpec, cutoff: float, k: int) -> dict[str, np.ndarray]:
  """Host arrays of one padded-free batch (every atom and molecule slot real)."""
  rng = np.random.default_rng([SEED, spec.molecules, spec.atoms_per_molecule])
  blocks = [cluster(spec.atoms_per_molecule, rng) for _ in range(spec.molecules)]
  if spec.molecules > 1:
    pitch = 2 * np.abs(blocks[0]).max() + MOLECULE_GAP + 2 * LATTICE_JITTER
    per_row = int(math.ceil(spec.molecules ** (1 / 3)))
    offsets = np.stack(np.unravel_index(np.arange(spec.molecules), (per_row,) * 3), axis=1) * pitch
    blocks = [b + o for b, o in zip(blocks, offsets)]
  positions = np.concatenate(blocks)
  molecule_index = np.repeat(np.arange(spec.molecules), spec.atoms_per_molecule).astype(np.int32)
  if spec.molecules == 1:
    order = _morton_order(positions, cutoff)
    positions = positions[order]
  species = np.where(rng.random(spec.atoms) < 1 / 3, OXYGEN, HYDROGEN).astype(np.int32)
  nbr_idx, nbr_mask = neighbor_slots(positions, cutoff, k)
  return dict(positions=positions.astype(np.float32), species=species, nbr_idx=nbr_idx,
              nbr_mask=nbr_mask, molecule_index=molecule_index)


def graph_from_arrays(arrays: dict[str, np.ndarray]):
  """e2former_jax Graph (host numpy arrays) of a batch from :func:`make_structure`."""
  from e2former_jax.graph import Graph

  n, k = arrays["nbr_idx"].shape
  b = int(arrays["molecule_index"].max()) + 1
  return Graph(positions=arrays["positions"], species=arrays["species"],
               node_mask=np.ones(n, bool), molecule_index=arrays["molecule_index"],
               nbr_idx=arrays["nbr_idx"], nbr_mask=arrays["nbr_mask"],
               nbr_shift=np.zeros((n, k, 3), np.float32), charge=np.zeros(b, np.int32),
               spin=np.ones(b, np.int32), molecule_mask=np.ones(b, bool))


def force_targets(num_atoms: int) -> np.ndarray:
  return (FORCE_TARGET_SCALE * np.random.default_rng(SEED + 1).normal(size=(num_atoms, 3))
          ).astype(np.float32)


# --------------------------------------------------------------------------------------- config


def model_config(name: str, impl: str, device: str):
  from e2former_jax.config import AttentionImpl, MessagePath, paper_config, tiny_config

  base = {"paper": paper_config, "tiny": tiny_config}[name]()
  path = MessagePath.PER_EDGE if impl.endswith("edge") else MessagePath.NODE_CENTRIC
  attention = AttentionImpl.XLA
  if impl.startswith("jax-pallas"):
    attention = AttentionImpl.PALLAS if device == "cuda" else AttentionImpl.PALLAS_INTERPRET
  return base.replace(message_path=path, attention_impl=attention, remat=impl.endswith("remat"))


def init_params(config_name: str, path: Path) -> int:
  """Initial Flax parameters of the model (on the CPU), saved flat ('a/b/c' keys) to ``path``."""
  import jax

  from e2former_jax.nn.model import E2Former

  cfg = model_config(config_name, "jax-xla", "cpu")
  arrays = make_structure(StructureSpec(1, 8), cfg.cutoff, cfg.max_neighbors)
  params = jax.jit(E2Former(cfg).init)(jax.random.key(SEED), graph_from_arrays(arrays))
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  partial = path.with_name(path.name + ".partial.npz")
  np.savez(partial, **flat)
  os.replace(partial, path)  # a run cut short never leaves a truncated cache
  return sum(v.size for v in flat.values())


def load_params(path: str) -> dict:
  """The nested parameter dict saved by :func:`init_params` (numpy leaves)."""
  tree: dict = {}
  with np.load(path) as data:
    for key in data.files:
      *parents, leaf = key.split("/")
      node = tree
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = data[key]
  return tree


# --------------------------------------------------------------------------------------- worker


def _is_oom(error: BaseException) -> bool:
  text = f"{type(error).__name__} {error}".lower()
  return any(s in text for s in ("out of memory", "resource_exhausted", "outofmemory",
                                 "failed to allocate"))


def _time_calls(call, repeats: int, time_limit_s: float, finite) -> dict:
  """First call (compilation included), one more warm-up, then up to ``repeats`` timed calls.

  ``call()`` runs to completion (synchronised) and returns its outputs; ``finite(outputs)`` of
  the last call is checked outside the timed region. ``repeats = 0`` makes only the first call
  (a fit probe: does it run, and its peak memory).
  """
  start = time.perf_counter()
  outputs = call()
  first = time.perf_counter() - start
  timing = {"first_call_s": first, "ms": None, "ms_samples": []}
  if repeats > 0:
    outputs = call()
    samples = []
    loop_start = time.perf_counter()
    while len(samples) < repeats and (not samples or time.perf_counter() - loop_start < time_limit_s):
      start = time.perf_counter()
      outputs = call()
      samples.append(time.perf_counter() - start)
    timing.update(ms=statistics.median(samples) * 1e3, ms_samples=[s * 1e3 for s in samples])
  return {**timing, "finite": bool(finite(outputs))}


def _memory_plan(compiled, device) -> dict:
  """XLA's buffer sizes of a compiled executable, and what the device held before running it."""
  plan = compiled_memory(compiled)
  stats = device.memory_stats()  # None on the CPU
  plan["bytes_in_use_before"] = int(stats["bytes_in_use"]) if stats else None
  return plan


def _phase(result: dict, name: str, body) -> bool:
  """Runs one measured phase into result[name]; False when it failed (OOM or error)."""
  try:
    result[name] = {"status": "ok", **body()}
    return True
  except Exception as e:
    result[name] = {"status": "oom" if _is_oom(e) else "error",
                    "error": "".join(traceback.format_exception_only(e))[-1500:]}
    return False


def jax_worker(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from e2former_jax.nn.model import E2Former
  from e2former_jax.potential import energy_and_forces

  if spec["precision"] == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
  # tf32: JAX's default for float32 products on the GPU (TF32 tensor cores).
  device = jax.devices()[0]
  if spec["device"] == "cuda" and device.platform != "gpu":
    raise RuntimeError(f"--device cuda but jax runs on {device.platform}")
  cfg = model_config(spec["config"], spec["impl"], spec["device"])
  model = E2Former(cfg)
  arrays = dict(np.load(spec["structure_path"]))
  graph = jax.device_put(graph_from_arrays(arrays))
  params = jax.device_put(load_params(spec["params_path"]))
  stats = device.memory_stats()  # None on the CPU
  result = {"device_name": device.device_kind,
            "memory_limit_bytes": int(stats["bytes_limit"]) if stats else None}

  def peak() -> int | None:
    stats = device.memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats else None

  # Compiled ahead of time so that XLA's own memory plan is on record even when the run fails
  # (an out-of-memory error names one allocation, not what else was held).
  start = time.perf_counter()
  ef = jax.jit(lambda p, g: energy_and_forces(model, p, g)).lower(params, graph).compile()
  compile_s = time.perf_counter() - start
  result["ef_plan"] = _memory_plan(ef, device)

  def all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))

  def measure_ef():
    timing = _time_calls(lambda: jax.block_until_ready(ef(params, graph)), spec["repeats"],
                         spec["time_limit_s"], all_finite)
    timing["first_call_s"] += compile_s
    return {**timing, "peak_bytes": peak()}

  if not _phase(result, "ef", measure_ef) or not spec["train"]:
    return result

  tx = optax.adam(LEARNING_RATE)
  f_ref = jax.device_put(force_targets(len(arrays["species"])))

  def loss_fn(p, g):
    energy, forces = energy_and_forces(model, p, g)
    return ENERGY_WEIGHT * jnp.mean(energy**2) + FORCE_WEIGHT * jnp.mean((forces - f_ref) ** 2)

  def step(p, opt_state, g):
    loss, grads = jax.value_and_grad(loss_fn)(p, g)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))
  state = {"params": params, "opt": tx.init(params)}  # params are donated to the first step

  def run_step():
    state["params"], state["opt"], loss = jax.block_until_ready(
        step(state["params"], state["opt"], graph))
    return loss

  def measure_train():
    timing = _time_calls(run_step, spec["train_repeats"], spec["time_limit_s"], all_finite)
    return {**timing, "peak_bytes": peak()}

  _phase(result, "train", measure_train)
  return result


def torch_worker(spec: dict) -> dict:
  import torch

  from benchmarks.torch_baseline import (
    E2FormerTorch,
    energy_and_forces,
    flax_to_torch_state_dict,
    graph_to_torch,
  )

  torch.set_float32_matmul_precision("high" if spec["precision"] == "tf32" else "highest")
  device = torch.device(spec["device"])
  on_gpu = device.type == "cuda"
  if on_gpu:
    torch.cuda.set_per_process_memory_fraction(GPU_MEMORY_FRACTION)
  impl = spec["impl"]
  compiled = impl.startswith("torch-compile")
  cfg = model_config(spec["config"], impl, spec["device"])
  model = E2FormerTorch(cfg)
  model.load_state_dict(flax_to_torch_state_dict(load_params(spec["params_path"])), strict=True)
  model = model.to(device)
  arrays = dict(np.load(spec["structure_path"]))
  graph = graph_to_torch(graph_from_arrays(arrays), device=device)
  node_mask = graph.node_mask[:, None].float()
  result = {"device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu",
            "memory_limit_bytes": int(GPU_MEMORY_FRACTION
                                      * torch.cuda.get_device_properties(device).total_memory)
            if on_gpu else None}

  def sync():
    if on_gpu:
      torch.cuda.synchronize(device)

  def peak() -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if on_gpu else None

  def functional_energy_forces(positions):
    """E [B], -dE/dx with the inner derivative through torch.func (traceable by torch.compile,
    and differentiable again by ordinary autograd for the training step)."""
    def total(p):
      energy = model(graph, p).energy
      return energy.sum(), energy

    grad, energy = torch.func.grad(total, has_aux=True)(positions)
    return energy, -grad * node_mask

  compiled_ef = torch.compile(functional_energy_forces) if compiled else None

  def run_ef():
    if compiled:
      outputs = compiled_ef(graph.positions)
    else:
      outputs = energy_and_forces(model, graph)
    sync()
    return outputs

  def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)

  def measure_ef():
    model.requires_grad_(False)  # inference: derivatives with respect to positions only
    timing = _time_calls(run_ef, spec["repeats"], spec["time_limit_s"], all_finite)
    return {**timing, "peak_bytes": peak()}

  if not _phase(result, "ef", measure_ef) or not spec["train"]:
    return result

  model.requires_grad_(True)
  f_ref = torch.as_tensor(force_targets(len(arrays["species"])), device=device)
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=on_gpu)

  def loss_fn():
    if compiled:  # one graph: forward, inner derivative and loss (its own compilation)
      energy, forces = functional_energy_forces(graph.positions)
    else:
      energy, forces = energy_and_forces(model, graph, create_graph=True)
    return ENERGY_WEIGHT * (energy**2).mean() + FORCE_WEIGHT * ((forces - f_ref) ** 2).mean()

  if compiled:
    loss_fn = torch.compile(loss_fn)

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    optimizer.step()
    sync()
    return (loss.detach(),)

  def measure_train():
    if on_gpu:
      torch.cuda.reset_peak_memory_stats(device)
    timing = _time_calls(run_step, spec["train_repeats"], spec["time_limit_s"], all_finite)
    return {**timing, "peak_bytes": peak()}

  _phase(result, "train", measure_train)
  return result


def worker_main(spec_json: str) -> None:
  spec = json.loads(spec_json)
  try:
    result = (jax_worker if spec["impl"] in JAX_IMPLS else torch_worker)(spec)
  except Exception as e:
    result = {"status": "error", "error": "".join(traceback.format_exception(e))[-2500:]}
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------- driver


class Driver:
  """Plans the runs, starts one worker subprocess per run within the time budget, records."""

  def __init__(self, args: argparse.Namespace, out: Path, report: dict):
    self.args, self.out, self.report = args, out, report
    self.deadline = time.time() + args.budget_s
    self.work = Path(tempfile.mkdtemp(prefix="compare_torch_"))
    self.structures: dict[StructureSpec, tuple[Path, int]] = {}
    cfg = model_config(args.config, "jax-xla", "cpu")
    self.cutoff, self.max_neighbors = cfg.cutoff, cfg.max_neighbors
    self.params_path = Path(args.params_cache.format(config=args.config))

  def close(self) -> None:
    shutil.rmtree(self.work, ignore_errors=True)

  def remaining(self) -> float:
    return self.deadline - time.time()

  def save(self) -> None:
    (self.out / "compare_torch.json").write_text(json.dumps(self.report, indent=1))

  def prepare(self) -> None:
    """The initial parameters, shared by every worker (cached across runs on one machine)."""
    start = time.time()
    if not self.params_path.exists():
      self.params_path.parent.mkdir(parents=True, exist_ok=True)
      init_params(self.args.config, self.params_path)
    with np.load(self.params_path) as data:
      self.report["meta"]["num_params"] = int(sum(data[k].size for k in data.files))
    print(f"parameters: {self.report['meta']['num_params']} ({time.time() - start:.1f} s)",
          flush=True)

  def structure(self, spec: StructureSpec) -> tuple[Path, int]:
    """Path of the saved arrays and the number of real edges (built once per spec)."""
    if spec not in self.structures:
      start = time.time()
      arrays = make_structure(spec, self.cutoff, self.max_neighbors)
      path = self.work / f"structure_{spec.molecules}x{spec.atoms_per_molecule}.npz"
      np.savez(path, **arrays)
      self.structures[spec] = (path, int(arrays["nbr_mask"].sum()))
      print(f"built {spec.name} ({time.time() - start:.1f} s)", flush=True)
    return self.structures[spec]

  def forget(self, spec: StructureSpec) -> None:
    path, _ = self.structures.pop(spec)
    path.unlink(missing_ok=True)

  def run_worker(self, impl: str, spec: StructureSpec, *, train: bool, repeats: int) -> dict:
    """One (implementation, structure) in a fresh subprocess; the row for the report."""
    row = {"impl": impl, "structure": spec.name, "atoms": spec.atoms, "molecules": spec.molecules}
    if self.remaining() < self.args.min_worker_s:
      return {**row, "status": "skipped", "reason": "time budget"}
    path, row["edges"] = self.structure(spec)
    timeout = min(self.args.worker_timeout_s, self.remaining())
    worker_impl = self.resolve(impl)
    spec_json = json.dumps({
        "impl": worker_impl, "structure_path": str(path), "params_path": str(self.params_path),
        "config": self.args.config, "device": self.args.device, "precision": self.args.precision,
        "train": train, "repeats": repeats, "train_repeats": self.args.train_repeats,
        "time_limit_s": self.args.repeat_time_s})
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false",
               XLA_PYTHON_CLIENT_MEM_FRACTION=str(GPU_MEMORY_FRACTION))
    if worker_impl in TORCH_IMPLS or self.args.device == "cpu":
      env["JAX_PLATFORMS"] = "cpu"  # torch owns the GPU; jax only supplies tables there
    else:
      env.pop("JAX_PLATFORMS", None)
    if worker_impl in TORCH_IMPLS:
      # PyTorch's own advice against fragmentation near the memory limit: its best chance to fit.
      env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    start = time.time()
    try:
      proc = subprocess.run([sys.executable, __file__, "--worker", spec_json], capture_output=True,
                            text=True, env=env, timeout=timeout)
      lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_PREFIX)]
      if lines:
        row.update(json.loads(lines[-1][len(RESULT_PREFIX):]))
      else:
        tail = (proc.stdout + proc.stderr)[-2000:]
        row.update(status="oom" if _is_oom(RuntimeError(tail)) else "error",
                   error=f"worker exit {proc.returncode}: {tail}")
    except subprocess.TimeoutExpired:
      row.update(status="timeout", error=f"worker exceeded {timeout:.0f} s")
    row["wall_s"] = round(time.time() - start, 1)
    if worker_impl != impl:
      row["resolved_impl"] = worker_impl
    row.setdefault("status", row.get("ef", {}).get("status", "error"))
    if row["status"] == "ok" and not row["ef"].get("finite", True):
      row.update(status="error", error="non-finite energy or forces")
    for key in ("device_name", "memory_limit_bytes"):
      if row.get(key) and not self.report["meta"].get(key):
        self.report["meta"][key] = row[key]
    return row

  def resolve(self, impl: str) -> str:
    """torch-compile -> the compiled variant of the faster eager path (at 10k atoms if run)."""
    if impl != "torch-compile":
      return impl
    best = {}
    for path in ("node", "edge"):
      runs = [r for r in self.report["runs"] if r["impl"] == f"torch-{path}" and r["status"] == "ok"]
      runs = [r for r in runs if r["atoms"] == HEADLINE_ATOMS] or runs
      if runs:
        best[path] = runs[0]["ef"]["ms"]
    return f"torch-compile-{min(best, key=best.get) if best else 'node'}"

  def bench(self, structures: list[StructureSpec], impls: list[str]) -> None:
    """Every (structure, implementation) in order; runs kept from --resume are not repeated."""
    failed_at: dict[str, int] = {}  # impl -> fewest atoms that ran out of memory
    done = set()
    for row in self.report["runs"]:
      if row["status"] == "oom":
        failed_at[row["impl"]] = min(failed_at.get(row["impl"], row["atoms"]), row["atoms"])
      done.add((row["impl"], row["structure"]))
    for spec in structures:
      for impl in impls:
        if impl.startswith("torch-compile") and spec.atoms not in self.args.compile_atoms_set:
          continue
        if (impl, spec.name) in done:
          continue
        if impl in failed_at and spec.atoms > failed_at[impl]:
          row = {"impl": impl, "structure": spec.name, "atoms": spec.atoms,
                 "molecules": spec.molecules, "status": "skipped",
                 "reason": f"out of memory at {failed_at[impl]} atoms"}
        else:
          train = spec.atoms <= self.args.train_max_atoms and impl in self.args.train_impls_set
          row = self.run_worker(impl, spec, train=train, repeats=self.args.repeats)
          if row["status"] == "oom":
            failed_at[impl] = min(failed_at.get(impl, spec.atoms), spec.atoms)
        self.report["runs"].append(row)
        self.save()
        print(_row_line(row), flush=True)

  def fit(self, impls: list[str]) -> None:
    """Largest single structure with energy + forces: doubling, then bisection to fit_resolution.

    Starts from the runs of the bench phase (largest success, smallest out-of-memory). A probe
    that runs out of memory or fails bounds the search from above; a probe cut by the time budget
    ends it without a bound.
    """
    for impl in impls:
      entry = self.report["fit"].setdefault(impl, {"probes": []})
      known = [r for r in self.report["runs"] if r["impl"] == impl and r["molecules"] == 1]
      known += entry["probes"]
      lo = max((r["atoms"] for r in known if r["status"] == "ok"), default=0)
      hi = min((r["atoms"] for r in known if r["status"] in ("oom", "error") and r["atoms"] > lo),
               default=None)
      start = self.args.fit_start or (100_000 if impl in JAX_IMPLS else 10_000)
      size = 2 * lo if lo else start
      while self.remaining() >= self.args.min_worker_s:
        if hi is not None:
          if lo == 0 or hi / lo <= self.args.fit_resolution:
            break
          size = int(round(math.sqrt(lo * hi), -2))
        if size > self.args.fit_max_atoms:
          break
        spec = StructureSpec(1, size)
        row = self.run_worker(impl, spec, train=False, repeats=0)
        if spec in self.structures:
          self.forget(spec)
        entry["probes"].append({"atoms": size, "status": row["status"], "wall_s": row.get("wall_s"),
                                "peak_bytes": row.get("ef", {}).get("peak_bytes"),
                                "error": (row.get("error") or row.get("ef", {}).get("error"))})
        print(f"fit {impl} {size}: {row['status']}", flush=True)
        if row["status"] == "ok":
          lo, size = size, 2 * size
        elif row["status"] in ("oom", "error"):
          hi = size
        else:  # timeout or skipped: the budget, not the memory, ended the search
          break
        self.save()
      entry.update(largest_ok=lo or None, smallest_failed=hi)
      self.save()


def _row_line(row: dict) -> str:
  ef, tr = row.get("ef", {}), row.get("train", {})
  parts = [f"{row['impl']:>18} {row['structure']:>20}: {row['status']}"]
  if ef.get("status") == "ok" and ef.get("ms") is not None:
    parts.append(f"E+F {ef['ms']:.2f} ms (first call {ef['first_call_s']:.1f} s), "
                 f"peak {_gb(ef.get('peak_bytes'))}")
  if tr.get("status") == "ok":
    parts.append(f"train {tr['ms']:.2f} ms, peak {_gb(tr.get('peak_bytes'))}")
  elif tr:
    parts.append(f"train {tr.get('status')}")
  plan = row.get("ef_plan")
  if plan and plan.get("temp") is not None:
    parts.append(f"XLA plan: temp {_gb(plan['temp'])}, arguments {_gb(plan['argument'])}, "
                 f"in use before {_gb(plan['bytes_in_use_before'])}")
  error = row.get("error") or ef.get("error") or tr.get("error") or row.get("reason")
  if error:
    parts.append(error.strip().splitlines()[-1][:200])
  return " | ".join(parts)


def _gb(value) -> str:
  return f"{value / 1e9:.2f} GB" if isinstance(value, (int, float)) else "-"


# ------------------------------------------------------------------------------------- analysis


def _fits(report: dict) -> dict:
  """Per implementation: largest single structure that ran, smallest that failed (out of memory
  or error, bench or probe), and the size where a straight line through (atoms, peak memory)
  reaches the memory limit."""
  limit = report["meta"].get("memory_limit_bytes")
  fits = {}
  for impl in dict.fromkeys([r["impl"] for r in report["runs"]] + list(report.get("fit", {}))):
    rows = [r for r in report["runs"] if r["impl"] == impl and r["molecules"] == 1]
    probes = report.get("fit", {}).get(impl, {}).get("probes", [])
    points = [(r["atoms"], r["status"], r.get("ef", {}).get("peak_bytes")) for r in rows]
    points += [(p["atoms"], p["status"], p.get("peak_bytes")) for p in probes]
    ok = [a for a, status, _ in points if status == "ok"]
    largest = max(ok, default=None)
    failed = [a for a, status, _ in points if status in ("oom", "error") and a > (largest or 0)]
    memory = [(a, b) for a, status, b in points if status == "ok" and b]
    estimate = None
    if limit and len({a for a, _ in memory}) >= 2:
      atoms, peaks = np.array(memory, dtype=float).T
      slope, intercept = np.polyfit(atoms, peaks, 1)
      if slope > 0:
        estimate = int((limit - intercept) / slope)
    fits[impl] = {"largest_ok": largest, "smallest_failed": min(failed, default=None),
                  "estimated_max_atoms": estimate}
  return fits


def summarize(report: dict) -> dict:
  """The issue's three targets, from the measured runs."""
  ours = "jax-pallas"
  runs = [r for r in report["runs"] if r.get("status") == "ok" and r["ef"].get("ms") is not None]
  summary: dict = {}

  headline = [r for r in runs if r["atoms"] == HEADLINE_ATOMS and r["molecules"] == 1]
  mine = next((r for r in headline if r["impl"] == ours), None)
  theirs = [r for r in headline if r["impl"].startswith("torch")]
  if mine and theirs:
    best = min(theirs, key=lambda r: r["ef"]["ms"])
    summary["speedup_at_10k"] = {"jax_ms": mine["ef"]["ms"],
                                 "best_torch": best.get("resolved_impl", best["impl"]),
                                 "torch_ms": best["ef"]["ms"],
                                 "speedup": best["ef"]["ms"] / mine["ef"]["ms"], "target": 2.0}

  memory = []
  for structure in dict.fromkeys(r["structure"] for r in report["runs"]):
    mine = next((r for r in runs if r["impl"] == ours and r["structure"] == structure), None)
    if not mine or mine["ef"].get("peak_bytes") is None:
      continue
    torch_rows = [r for r in report["runs"] if r["structure"] == structure
                  and r["impl"].startswith("torch")]
    peaks = [r["ef"]["peak_bytes"] for r in torch_rows
             if r["status"] == "ok" and r["ef"].get("peak_bytes")]
    failed = bool(torch_rows) and all(r["status"] in ("oom", "skipped") for r in torch_rows)
    memory.append({"structure": structure, "jax_bytes": mine["ef"]["peak_bytes"],
                   "torch_min_bytes": min(peaks, default=None),
                   "torch_statuses": {r["impl"]: r["status"] for r in torch_rows},
                   "jax_less": (mine["ef"]["peak_bytes"] < min(peaks)) if peaks else
                               (True if failed else None)})
  summary["memory"] = memory
  verdicts = [m["jax_less"] for m in memory if m["jax_less"] is not None]
  summary["less_memory_everywhere"] = all(verdicts) if verdicts else None

  fits = summary["fits"] = _fits(report)
  torch_fits = {i: f for i, f in fits.items() if i.startswith("torch") and f["largest_ok"]}
  jax_fits = {i: f for i, f in fits.items() if i.startswith("jax") and f["largest_ok"]}
  if jax_fits and torch_fits:
    best = max(torch_fits, key=lambda i: torch_fits[i]["largest_ok"])
    ours = max(jax_fits, key=lambda i: jax_fits[i]["largest_ok"])
    jax_ok, torch_ok = fits[ours]["largest_ok"], torch_fits[best]["largest_ok"]
    # An upper bound on torch needs every eager path to have failed (the compiled variants are
    # not probed for size).
    eager_failed = [fits[i]["smallest_failed"] for i in ("torch-node", "torch-edge") if i in fits]
    torch_failed = max(eager_failed) if eager_failed and all(eager_failed) else None
    summary["fit_ratio"] = {
        "jax": jax_ok, "jax_impl": ours, "jax_failed": fits[ours]["smallest_failed"], "best_torch": best,
        "torch": torch_ok, "torch_failed": torch_failed, "ratio": jax_ok / torch_ok,
        # jax runs jax_ok atoms and every eager torch path fails at torch_failed.
        "guaranteed_ratio": jax_ok / torch_failed if torch_failed else None, "target": 2.0}
  return summary


def plot(report: dict, path: Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [r for r in report["runs"] if r.get("status") == "ok"]
  impls = sorted({r["impl"] for r in runs}, key=lambda i: (not i.startswith("jax"), i))
  fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
  for i, impl in enumerate(impls):
    color = f"C{i}"
    rows = sorted((r for r in runs if r["impl"] == impl), key=lambda r: r["atoms"])
    for phase, style in (("ef", "-"), ("train", "--")):
      done = [r for r in rows if r.get(phase, {}).get("status") == "ok"]
      label = f"{impl}, {'energy+forces' if phase == 'ef' else 'train step'}"
      for ax, key, scale in ((ax_t, "ms", 1.0), (ax_m, "peak_bytes", 1e-9)):
        for batch in (False, True):
          pts = [(r["atoms"], r[phase][key] * scale) for r in done
                 if (r["molecules"] > 1) == batch and r[phase].get(key) is not None]
          if not pts:
            continue
          xs, ys = zip(*pts)
          if batch:
            ax.plot(xs, ys, linestyle="none", marker="s" if phase == "ef" else "D", color=color,
                    mfc="none")
          else:
            ax.plot(xs, ys, style, marker="o", color=color, label=label)
    probes = [p for p in report.get("fit", {}).get(impl, {}).get("probes", [])
              if p.get("status") == "ok" and p.get("peak_bytes")]
    if probes:
      ax_m.plot([p["atoms"] for p in probes], [p["peak_bytes"] * 1e-9 for p in probes],
                linestyle="none", marker="^", color=color, mfc="none")
  limit = report["meta"].get("memory_limit_bytes")
  if limit:
    ax_m.axhline(limit * 1e-9, color="grey", linestyle=":", label="memory limit")
    ax_m.legend(fontsize=7)
  for ax, ylabel in ((ax_t, "time per call (ms)"), (ax_m, "peak GPU memory (GB)")):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("atoms")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
  ax_t.legend(fontsize=7)
  meta = report["meta"]
  fig.suptitle(f"E2Former-V2, {meta['config']} config, float32 ({meta['precision']} matmuls), "
               f"{meta.get('device_name') or meta['device']}; solid: energy+forces, dashed: train "
               "step; open squares/diamonds: molecule batches; triangles: fit probes", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _run_line(r: dict) -> str:
  ef, tr = r.get("ef", {}), r.get("train", {})
  impl = r["impl"] + (f" ({r['resolved_impl']})" if r.get("resolved_impl") else "")
  status = r["status"] if r["status"] != "skipped" else f"skipped: {r.get('reason')}"
  if tr and tr.get("status") != "ok":
    status += f"; train {tr.get('status')}"
  cells = [r["structure"], str(r["atoms"]), impl] + ["-"] * 5 + [status]
  if ef.get("status") == "ok" and ef.get("ms") is not None:
    cells[3:6] = [f"{ef['ms']:.2f}", f"{r['atoms'] / ef['ms'] * 1e3:,.0f}",
                  _gb(ef.get("peak_bytes")).removesuffix(" GB")]
  if tr.get("status") == "ok":
    cells[6:8] = [f"{tr['ms']:.2f}", _gb(tr.get("peak_bytes")).removesuffix(" GB")]
  return "| " + " | ".join(cells) + " |"


def markdown(report: dict) -> str:
  meta, summary = report["meta"], report.get("summary", {})
  lines = [
      f"## E2Former-V2: JAX/Pallas vs our PyTorch baseline ({meta['date']}, "
      f"{meta.get('device_name') or meta['device']}, commit {meta['commit']})", "",
      f"`python benchmarks/compare_torch.py {meta['argv']}`: {meta['config']} config "
      f"({meta.get('num_params', '?')} parameters), float32 storage with {meta['precision']} matrix "
      f"products in both frameworks; jax {meta.get('jax')}, torch {meta.get('torch')}. Structures: "
      "jittered lattice at 0.1 atoms/A^3 (water density) in free space, K = 32 nearest within "
      "4.5 A. E+F: energy + conservative forces, median of repeats after warm-up. Train: one "
      "step on a force loss (double backward) with Adam. Peak: the framework's peak GPU "
      "allocation in a fresh process, weights and inputs included.", "",
      "| structure | atoms | implementation | E+F ms | E+F atoms/s | E+F peak GB | train ms | "
      "train peak GB | status |",
      "|---|---|---|---|---|---|---|---|---|"]
  lines += [_run_line(r) for r in report["runs"]]
  fits = summary.get("fits", {})
  if fits:
    lines += ["", "Largest single structure with energy + forces (memory limit "
              f"{_gb(meta.get('memory_limit_bytes'))}):", "",
              "| implementation | largest that ran | smallest that failed | straight-line estimate |",
              "|---|---|---|---|"]
    lines += [f"| {impl} | {f['largest_ok'] or '-'} | {f['smallest_failed'] or '-'} | "
              f"{f['estimated_max_atoms'] or '-'} |" for impl, f in fits.items()]
  lines += ["", "Targets:"]
  s = summary.get("speedup_at_10k")
  lines.append(f"- E+F at {HEADLINE_ATOMS} atoms: jax-pallas {s['jax_ms']:.2f} ms, best torch "
               f"({s['best_torch']}) {s['torch_ms']:.2f} ms: **{s['speedup']:.2f}x** (target 2x)"
               if s else f"- E+F at {HEADLINE_ATOMS} atoms: not measured for both")
  parts = []
  for m in summary.get("memory", []):
    theirs = (_gb(m["torch_min_bytes"]) if m["torch_min_bytes"] else
              "torch " + "/".join(sorted(set(m["torch_statuses"].values()))) or "no torch run")
    parts.append(f"{m['structure']}: {_gb(m['jax_bytes'])} vs {theirs}")
  lines.append(f"- less memory at every size measured: **{summary.get('less_memory_everywhere')}** "
               f"({'; '.join(parts)})")
  f = summary.get("fit_ratio")
  if f:
    guaranteed = (f", at least {f['guaranteed_ratio']:.1f}x since eager torch failed at "
                  f"{f['torch_failed']}" if f["guaranteed_ratio"] else
                  ", not a bound: eager torch did not fail")
    lines.append(f"- largest structure: {f.get('jax_impl', 'jax-pallas')} ran {f['jax']} atoms, "
                 f"{f['best_torch']} {f['torch']}: **{f['ratio']:.1f}x**{guaranteed} (target 2x)")
  else:
    lines.append("- largest structure: not measured for both")
  return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path, results_md: Path | None) -> None:
  report["summary"] = summarize(report)
  (out / "compare_torch.json").write_text(json.dumps(report, indent=1))
  plot(report, out / "compare_torch.png")
  section = markdown(report)
  (out / "results_section.md").write_text(section)
  if results_md is not None:
    if not results_md.exists():
      results_md.write_text("# Benchmark results\n")
    with open(results_md, "a") as f:
      f.write("\n" + section)
  print(section, flush=True)


# ----------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[1:]))
  parser.add_argument("--quick", action="store_true",
                      help="the <= 8 min plan: torch.compile only at 10k atoms and without a "
                           "training step; training steps only up to 10k atoms")
  parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
  parser.add_argument("--config", default="paper", choices=("paper", "tiny"))
  parser.add_argument("--precision", default="tf32", choices=("tf32", "float32"),
                      help="matrix products of both frameworks (storage is float32 either way)")
  parser.add_argument("--sizes", default="10000,50000,100000,1000",
                      help="single-structure atom counts, run in this order")
  parser.add_argument("--batches", default="64x30", help="molecule batches BxM, comma separated")
  parser.add_argument("--impls", default=None, help=f"default: {QUICK_IMPLS} (--quick) or {FULL_IMPLS}")
  parser.add_argument("--phases", default="bench,fit", help="bench, fit (comma separated)")
  parser.add_argument("--train-impls", default=None,
                      help="implementations that also time a training step (default: all, but "
                           "no torch.compile with --quick)")
  parser.add_argument("--train-max-atoms", type=int, default=None,
                      help="train only on structures up to this size (default 10000 with --quick)")
  parser.add_argument("--compile-atoms", default=None,
                      help="sizes at which torch.compile variants run (default: 10000 with --quick, "
                           "every size otherwise)")
  parser.add_argument("--fit-impls", default=None,
                      help="default: the eager torch paths, then the jax-pallas variants")
  parser.add_argument("--fit-start", type=int, default=None,
                      help="first probe when the bench phase gave no size (default 100000 for jax, "
                           "10000 for torch)")
  parser.add_argument("--fit-max-atoms", type=int, default=3_200_000)
  parser.add_argument("--fit-resolution", type=float, default=1.25,
                      help="stop bisecting when smallest failure / largest success <= this")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--train-repeats", type=int, default=3)
  parser.add_argument("--repeat-time-s", type=float, default=10.0,
                      help="stop timing repeats of one phase after this long")
  parser.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget of the script")
  parser.add_argument("--worker-timeout-s", type=float, default=None,
                      help="per-worker limit (default 200 s with --quick, 600 s otherwise)")
  parser.add_argument("--min-worker-s", type=float, default=20.0,
                      help="do not start a worker with less budget than this left")
  parser.add_argument("--params-cache", default=str(Path(tempfile.gettempdir())
                                                    / "e2former_compare_params_{config}.npz"),
                      help="initial parameters, made once per machine ({config} is replaced)")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "compare_torch"))
  parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"),
                      help="append the table here ('' for no append)")
  parser.add_argument("--resume", default="",
                      help="continue the report of an earlier run (its JSON): its ok and "
                           "out-of-memory runs and fit probes are kept, the rest is run")
  parser.add_argument("--report-from", default="",
                      help="re-render PNG and table from this JSON (no runs)")
  parser.add_argument("--commit", default=None)
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.impls = args.impls or (QUICK_IMPLS if args.quick else FULL_IMPLS)
  unknown = set(args.impls.split(",")) - set(JAX_IMPLS) - set(TORCH_IMPLS)
  if unknown:
    parser.error(f"unknown implementations {sorted(unknown)}")
  train_default = ",".join(i for i in args.impls.split(",")
                           if not (args.quick and i.startswith("torch-compile")))
  args.train_impls_set = set((args.train_impls or train_default).split(","))
  if args.train_max_atoms is None:
    args.train_max_atoms = HEADLINE_ATOMS if args.quick else 10**9
  sizes = [int(s) for s in args.sizes.split(",") if s]
  compile_atoms = args.compile_atoms or (str(HEADLINE_ATOMS) if args.quick else "")
  args.compile_atoms_set = ({int(s) for s in compile_atoms.split(",")} if compile_atoms else
                            set(sizes) | {StructureSpec.parse(b).atoms
                                          for b in args.batches.split(",") if b})
  if args.worker_timeout_s is None:
    args.worker_timeout_s = 200.0 if args.quick else 600.0
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    worker_main(args.worker)
    return
  out = Path(args.report_from).parent if args.report_from else Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  results_md = Path(args.results_md) if args.results_md else None
  if args.report_from:
    write_outputs(json.loads(Path(args.report_from).read_text()), out, results_md)
    return

  # The driver initialises parameters on the CPU; the GPU belongs to one worker at a time.
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  report = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                     "commit": args.commit or git_commit(), "device": args.device,
                     "config": args.config, "precision": args.precision,
                     "argv": " ".join(sys.argv[1:]), "jax": jax.__version__,
                     "torch": torch_version, "memory_fraction": GPU_MEMORY_FRACTION},
            "runs": [], "fit": {}}
  if args.resume:
    earlier = json.loads(Path(args.resume).read_text())
    report["runs"] = [r for r in earlier["runs"] if r["status"] in ("ok", "oom")]
    report["fit"] = earlier.get("fit", {})
    report["meta"]["resumed_from"] = earlier["meta"]
    for key in ("device_name", "memory_limit_bytes"):
      report["meta"][key] = earlier["meta"].get(key)
  driver = Driver(args, out, report)
  try:
    driver.prepare()
    phases = args.phases.split(",")
    if "bench" in phases:
      structures = ([StructureSpec(1, int(s)) for s in args.sizes.split(",") if s]
                    + [StructureSpec.parse(b) for b in args.batches.split(",") if b])
      driver.bench(structures, args.impls.split(","))
    if "fit" in phases:
      # The eager torch searches are short (out of memory comes fast), so they go first.
      eager = [i for i in ("torch-node", "torch-edge") if i in args.impls.split(",")]
      ours = [i for i in ("jax-pallas", "jax-pallas-remat") if i in args.impls.split(",")]
      driver.fit(args.fit_impls.split(",") if args.fit_impls else [*eager, *ours])
  finally:
    driver.close()
  write_outputs(report, out, results_md)


if __name__ == "__main__":
  main()
