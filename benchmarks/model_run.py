"""One measured run of the model, JAX or our PyTorch baseline, in the current process.

For one implementation and one structure (:mod:`benchmarks.structures`), with the weights that
:func:`init_params` saved (the Flax initial parameters; the PyTorch baseline loads them through
``benchmarks.torch_baseline.flax_to_torch_state_dict``):

* optionally (JAX only), energy + the direct head's forces: one forward pass, median time and peak
  (measured first, so that the process's peak memory is its own);
* energy + conservative forces (-dE/dx): median time of repeated calls after warm-up, the
  compilation time, peak device memory (jax ``peak_bytes_in_use``, torch ``max_memory_allocated``;
  both count weights and inputs) and, for JAX, XLA's memory plan;
* one training step on forces: w_E mean(E^2) + w_F mean((F - F_ref)^2) with random force targets,
  differentiated with respect to the parameters (a second derivative through the model), then an
  Adam update;

each recorded as ``{"status": "ok", ...}`` or as out of memory / error. ``benchmarks/compare_torch.py``
runs every case in a fresh process (peak memory per case) through :mod:`benchmarks.measure`.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

import numpy as np

from benchmarks import measure, report, structures

# jax, torch and e2former_jax (which imports jax) are imported inside the functions: the parent
# process of compare_torch chooses the platform (JAX_PLATFORMS) before jax starts.

# name -> (message path, attention kernels, E2FormerConfig compute choices: "remat" rematerialised
# blocks, "chunks" radial MLPs in chunks of atoms, "auto" memory chosen per structure (none of the
# three: every activation kept), "bf16" mixed precision, "radial" the fused radial MLP kernel where
# the attention's run (otherwise XLA's MLPs), "radial-vjp" its backward kernel too)
JAX_IMPLS = {
    "jax-pallas": ("node_centric", "pallas", ()),
    "jax-pallas-remat": ("node_centric", "pallas", ("remat",)),
    "jax-pallas-chunks": ("node_centric", "pallas", ("chunks",)),
    "jax-pallas-chunks-remat": ("node_centric", "pallas", ("chunks", "remat")),
    "jax-pallas-auto": ("node_centric", "pallas", ("auto", "radial")),
    # The GPU defaults with XLA's radial MLPs (E2FormerConfig.radial_impl), or with the radial
    # MLPs' backward kernel for forces (radial_vjp_kernel).
    "jax-pallas-auto-xla-radial": ("node_centric", "pallas", ("auto",)),
    "jax-pallas-auto-radial-vjp": ("node_centric", "pallas", ("auto", "radial", "radial-vjp")),
    "jax-pallas-bf16": ("node_centric", "pallas", ("bf16",)),
    "jax-pallas-bf16-chunks": ("node_centric", "pallas", ("bf16", "chunks")),
    "jax-pallas-bf16-chunks-remat": ("node_centric", "pallas", ("bf16", "chunks", "remat")),
    "jax-xla": ("node_centric", "xla", ()),
    "jax-per-edge": ("per_edge", "xla", ()),
}
TORCH_IMPLS = {  # name -> (message path, torch.compile)
    "torch-edge": ("per_edge", False),
    "torch-node": ("node_centric", False),
    "torch-compile-edge": ("per_edge", True),
    "torch-compile-node": ("node_centric", True),
}
SEED = 0
# The model configurations the benchmarks take by name (see :func:`config`).
CONFIG_NAMES = ("paper", "tiny", "smoke")
LEARNING_RATE = 1e-4
ENERGY_WEIGHT, FORCE_WEIGHT = 1.0, 10.0
FORCE_TARGET_SCALE = 0.5  # eV/A, standard deviation of the random force targets


def config(name: str):
  """The E2Former configuration ``name``: the paper's, the tiny one of the tests, or "smoke", the
  smallest with every code path, for dry runs on the CPU (where compilation dominates)."""
  from e2former_jax.config import paper_config, tiny_config

  return {"paper": paper_config, "tiny": tiny_config,
          "smoke": functools.partial(tiny_config, num_layers=1, lmax=1)}[name]()


def model_config(name: str, impl: str, device: str):
  """The configuration ``name`` as implementation ``impl`` runs it on ``device``."""
  from e2former_jax.config import AttentionImpl, MessagePath
  from e2former_jax.nn.memory import AUTO_EDGE_CHUNK_ATOMS

  base = config(name)
  if impl in TORCH_IMPLS:
    return base.replace(message_path=MessagePath(TORCH_IMPLS[impl][0]))
  path, kernels, choices = JAX_IMPLS[impl]
  attention = AttentionImpl(kernels)
  if attention is AttentionImpl.PALLAS and device == "cpu":
    attention = AttentionImpl.PALLAS_INTERPRET
  return base.replace(message_path=MessagePath(path), attention_impl=attention,
                      radial_impl=attention if "radial" in choices else AttentionImpl.XLA,
                      radial_vjp_kernel="radial-vjp" in choices,
                      remat="remat" in choices, auto_memory="auto" in choices,
                      edge_chunk_atoms=AUTO_EDGE_CHUNK_ATOMS if "chunks" in choices else None,
                      precision=_precision(choices))


def _precision(choices: tuple[str, ...]):
  """bf16: mixed precision; auto: the library's defaults (mixed on GPU); otherwise float32."""
  from e2former_jax.config import Precision

  if "bf16" in choices:
    return Precision.MIXED
  return Precision.AUTO if "auto" in choices else Precision.FULL


def init_params(config_name: str, path: Path) -> int:
  """Saves the Flax initial parameters of the configuration (flat 'a/b/c' keys); their count."""
  import jax

  from e2former_jax.nn.model import E2Former

  cfg = model_config(config_name, "jax-xla", "cpu")
  graph = structures.cluster_batch(structures.Batch(1, 8), cfg.cutoff, cfg.max_neighbors)
  params = E2Former(cfg).init(jax.random.key(SEED), graph)  # eager: faster than compiling it
  flat = {jax.tree_util.keystr(p, simple=True, separator="/"): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  partial = path.with_name(path.name + ".partial.npz")
  np.savez(partial, **flat)
  os.replace(partial, path)  # a run cut short never leaves a truncated file
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


def force_targets(num_atoms: int) -> np.ndarray:
  rng = np.random.default_rng(SEED + 1)
  return (FORCE_TARGET_SCALE * rng.normal(size=(num_atoms, 3))).astype(np.float32)


def _phase(result: dict, name: str, body) -> bool:
  """Runs one measured phase into result[name]; False when it failed."""
  try:
    result[name] = {"status": "ok", **body()}
    return True
  except Exception as e:  # noqa: BLE001  (out of memory is a result)
    result[name] = measure.failure(e)
    return False


def _timed(call, spec: dict, finite, repeats: int) -> dict:
  """A fit probe runs once; otherwise median time of repeats. Checks the outputs are finite."""
  if spec["probe"]:
    return {"finite": bool(finite(call()))}
  timing = measure.time_calls(call, repeats=repeats, time_limit_s=spec["time_limit_s"])
  return {"ms": timing["ms"], "samples_ms": timing["samples_ms"],
          "finite": bool(finite(timing.pop("output")))}


def run(spec: dict) -> dict:
  """The worker: one implementation on one structure (see the module docstring for ``spec``)."""
  return (run_jax if spec["impl"] in JAX_IMPLS else run_torch)(spec)


def run_jax(spec: dict) -> dict:
  import jax
  import jax.numpy as jnp
  import optax

  from e2former_jax.nn.model import E2Former
  from e2former_jax.potential import energy_and_forces

  if spec["precision"] == "float32":  # otherwise JAX's default: TF32 products on the GPU
    jax.config.update("jax_default_matmul_precision", "highest")
  device = jax.devices()[0]
  if spec["device"] == "cuda" and device.platform != "gpu":
    raise RuntimeError(f"--device cuda but jax runs on {device.platform}")
  cfg = model_config(spec["config"], spec["impl"], spec["device"])
  model = E2Former(cfg)
  graph = structures.cluster_batch(structures.Batch.parse(spec["structure"]), cfg.cutoff,
                                   cfg.max_neighbors)
  result = {"status": "ok", "edges": int(graph.nbr_mask.sum()),
            "device_name": report.device_name(device)}
  graph = jax.device_put(graph)
  params = jax.device_put(load_params(spec["params_path"]))
  if cfg.auto_memory:  # what the model will choose when traced (nn/memory.py)
    from e2former_jax.nn import memory

    chosen = memory.plan(cfg, *graph.nbr_idx.shape, graph.positions.dtype.itemsize)
    result["auto_memory"] = {"edge_chunk_atoms": chosen.edge_chunk_atoms, "remat": chosen.remat}

  def all_finite(tree) -> bool:
    return all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(tree))

  def measure_forces(conservative: bool):
    # Compiled ahead of time so that XLA's plan is on record even when running fails.
    start = time.perf_counter()
    ef = jax.jit(lambda p, g: energy_and_forces(model, p, g, conservative=conservative)).lower(
        params, graph).compile()
    plan = {"compile_s": time.perf_counter() - start, "plan": measure.compiled_memory(ef)}
    timing = _timed(lambda: jax.block_until_ready(ef(params, graph)), spec, all_finite,
                    spec["repeats"])
    return {**plan, **timing, "peak_bytes": measure.peak_bytes(device)}

  if spec.get("direct") and not _phase(result, "direct", lambda: measure_forces(False)):
    return result
  if not _phase(result, "ef", lambda: measure_forces(True)) or not spec["train"]:
    return result
  tx = optax.adam(LEARNING_RATE)
  f_ref = jax.device_put(force_targets(graph.num_nodes))

  def loss_fn(p, g):
    energy, forces = energy_and_forces(model, p, g)
    return ENERGY_WEIGHT * jnp.mean(energy**2) + FORCE_WEIGHT * jnp.mean((forces - f_ref) ** 2)

  def step(p, opt_state, g):
    loss, grads = jax.value_and_grad(loss_fn)(p, g)
    updates, opt_state = tx.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  step = jax.jit(step, donate_argnums=(0, 1))  # as a training loop: one copy of the weights
  state = {"params": params, "opt": tx.init(params)}

  def run_step():
    state["params"], state["opt"], loss = jax.block_until_ready(
        step(state["params"], state["opt"], graph))
    return loss

  _phase(result, "train", lambda: {**_timed(run_step, spec, all_finite, spec["train_repeats"]),
                                   "peak_bytes": measure.peak_bytes(device)})
  return result


def run_torch(spec: dict) -> dict:
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
    torch.cuda.set_per_process_memory_fraction(measure.GPU_MEMORY_FRACTION)
  compiled = TORCH_IMPLS[spec["impl"]][1]
  cfg = model_config(spec["config"], spec["impl"], spec["device"])
  model = E2FormerTorch(cfg)
  model.load_state_dict(flax_to_torch_state_dict(load_params(spec["params_path"])), strict=True)
  model = model.to(device)
  host_graph = structures.cluster_batch(structures.Batch.parse(spec["structure"]), cfg.cutoff,
                                        cfg.max_neighbors)
  graph = graph_to_torch(host_graph, device=device)
  node_mask = graph.node_mask[:, None].float()
  result = {"status": "ok", "edges": int(host_graph.nbr_mask.sum()),
            "device_name": torch.cuda.get_device_name(device) if on_gpu else "cpu"}

  def sync():
    if on_gpu:
      torch.cuda.synchronize(device)

  def peak() -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if on_gpu else None

  def functional_energy_forces(positions):
    """E [B] and -dE/dx through torch.func: traceable by torch.compile, and differentiable again
    by ordinary autograd for the training step."""
    def total(p):
      energy = model(graph, p).energy
      return energy.sum(), energy

    grad, energy = torch.func.grad(total, has_aux=True)(positions)
    return energy, -grad * node_mask

  compiled_ef = torch.compile(functional_energy_forces) if compiled else None

  def run_ef():
    outputs = compiled_ef(graph.positions) if compiled else energy_and_forces(model, graph)
    sync()
    return outputs

  def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)

  def measure_ef():
    model.requires_grad_(False)  # inference: derivatives with respect to positions only
    return {**_timed(run_ef, spec, all_finite, spec["repeats"]), "peak_bytes": peak()}

  if not _phase(result, "ef", measure_ef) or not spec["train"]:
    return result
  model.requires_grad_(True)
  f_ref = torch.as_tensor(force_targets(host_graph.num_nodes), device=device)
  optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=on_gpu)

  def loss_fn():
    if compiled:  # one graph: forward, inner derivative and loss
      energy, forces = functional_energy_forces(graph.positions)
    else:
      energy, forces = energy_and_forces(model, graph, create_graph=True)
    return ENERGY_WEIGHT * (energy**2).mean() + FORCE_WEIGHT * ((forces - f_ref) ** 2).mean()

  loss = torch.compile(loss_fn) if compiled else loss_fn

  def run_step():
    optimizer.zero_grad(set_to_none=True)
    value = loss()
    value.backward()
    optimizer.step()
    sync()
    return (value.detach(),)

  def measure_train():
    if on_gpu:
      torch.cuda.reset_peak_memory_stats(device)
    return {**_timed(run_step, spec, all_finite, spec["train_repeats"]), "peak_bytes": peak()}

  _phase(result, "train", measure_train)
  return result
