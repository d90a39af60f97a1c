"""Molecular-dynamics throughput of E2Former in JAX MD: MD steps/s and atom-steps/s against system size.

Systems (``--systems``, default both), each of N = 3 x molecules atoms (e.g. 999 for --sizes 1000) of
water-like molecules (O-H 0.9572 A, H-O-H 104.52 deg, random orientations on a jittered cubic grid)
at liquid density, 0.0334 molecules/A^3 (0.100 atoms/A^3):

* ``cluster``: a cube of water in free space (``space.free``), inside a larger cell-list box;
* ``box``: liquid water in a cubic periodic box of the same density (``space.periodic(side)``, the
  periodic neighbour list and the model's image-shift term). The grid tiles the box, so molecules
  across the boundary are as far apart as inside it; atoms are wrapped into [0, side). Every plane
  spacing must exceed 2 x cutoff (9 A at r_c = 4.5 A, i.e. at least ~75 atoms); smaller sizes are
  refused up front with a ValueError. 1k atoms is a 21.5 A box, 100k atoms a 99.9 A box.

Model: random weights (throughput does not depend on them) at the paper configuration
(``--config paper``: 4 blocks, 256 channels, lmax 2, 128 heads, K = 32, r_c = 4.5 A) or ``tiny``;
the Pallas attention kernels on GPU, the XLA reference elsewhere. ``--remat`` rematerialises each
transformer block and per-edge radial MLP in the backward pass (``E2FormerConfig.remat``): forces
then hold about half the memory, for one or two more forward passes per step.

Dynamics: ``jax_md.simulate.nve`` (or ``nvt_langevin`` with ``--ensemble nvt``) at 0.5 fs, 300 K
initial velocities, through ``e2former_jax.interop.jax_md``: a JAX MD Dense neighbour list (cell
list, skin ``--skin``) updated every step inside the compiled loop, the model's K nearest selected
on device, conservative forces. Steps run in compiled chunks of ``--chunk`` (``interop.jax_md.run``;
a candidate-list overflow re-allocates and redoes the chunk). The first chunk compiles and is not
timed; the state starts with zero forces, which that first chunk corrects (it saves compiling a
separate initial force call).

Runs go in increasing size, both systems at each size (cluster, then box), in this process: each
run's peak device memory (``memory_stats()["peak_bytes_in_use"]``, a process-lifetime maximum) is
then that of the largest system so far, i.e. its own (at equal N the second system reports at least
the first's). Out-of-memory and other errors are recorded per run; when the time budget is spent,
the remaining runs are recorded as not run. (On an H100 at 6913803, 10k atoms held 12.9 GB
(clusters and boxes) without ``--remat``; 100k atoms need ``--remat``: 44 GB, see
benchmarks/RESULTS.md.)

Writes JSON to ``--out`` (one row per system and size) and appends one line to ``--results-md``
(device, commit, date, systems, sizes, ensemble, remat).

Usage:
  python benchmarks/md.py [--sizes 1000,10000,100000] [--systems cluster,box] [--config paper|tiny]
                          [--ensemble nve|nvt] [--remat] [--steps 40] [--chunk 10] [--budget-s 540]
                          [--out PATH]
  python benchmarks/md.py --sizes 300 --config tiny --steps 20 --results-md /tmp/md.md   # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# Let the largest system use the whole GPU (JAX reserves 75 % by default); set before jax starts.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax
import jax.numpy as jnp

from benchmarks.provenance import git_commit
from e2former_jax.config import AttentionImpl, paper_config, tiny_config
from e2former_jax.interop import jax_md as e2f_md
from e2former_jax.interop.predictor import Predictor
from e2former_jax.neighbors import build_graph
from e2former_jax.nn.model import E2Former
from e2former_jax.structure import Structure

# Liquid water: 0.997 g/cm^3 / 18.015 g/mol = 0.0334 molecules per cubic angstrom.
WATER_DENSITY = 0.0334
OH_BOND = 0.9572  # angstrom (TIP3P geometry)
HOH_ANGLE = np.deg2rad(104.52)
# Grid jitter (angstrom): breaks the lattice symmetry while keeping every O-O distance above ~2.5 A.
JITTER = 0.15
SYSTEMS = ("cluster", "box")
# Empty space around the cluster inside the cell-list box (angstrom): atoms must stay inside the
# box (checked at the end); a random-weight model heats the system, so this is generous.
MARGIN = 10.0
# A random network's forces (~1-10 eV/A) heat water to thousands of kelvin within ~100 fs; the
# density fluctuations that follow overflow the neighbour buffers again and again, and every
# re-allocation recompiles, which a trained potential would not cause. Scaling the last layer by
# this factor gives thermal-sized forces; it changes no shape and no cost.
ENERGY_SCALE = 0.01
# A size starts only if the budget left exceeds this multiple of the previous size's compilation
# (compilation does not depend much on N; the larger system also needs its steps).
COMPILE_MARGIN = 1.5
TIMESTEP_FS = 0.5
TEMPERATURE_K = 300.0
LANGEVIN_FRICTION_PER_FS = 0.01


def water_side(num_atoms: int) -> float:
  """Side (angstrom) of the cube of M = num_atoms // 3 water molecules at liquid density."""
  return (max(1, num_atoms // 3) / WATER_DENSITY) ** (1 / 3)


def water_box(num_atoms: int, seed: int = 0, periodic: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
  """M = num_atoms // 3 water molecules at liquid density in a cube of side ``water_side(num_atoms)``.

  The oxygens sit at jittered centres of a grid of cells that tiles the cube, so in a periodic box
  of that side the molecules across the boundary are as far apart as those inside.

  Args:
    num_atoms: requested atoms (rounded down to whole molecules, at least one).
    seed: grid occupancy, jitter and orientations.
    periodic: wrap every atom into [0, side) (hydrogens of boundary molecules stick out otherwise).

  Returns:
    (numbers [3M], positions [3M, 3] in angstrom, side).
  """
  rng = np.random.default_rng(seed)
  molecules = max(1, num_atoms // 3)
  side = water_side(num_atoms)
  per_side = int(np.ceil(molecules ** (1 / 3)))
  spacing = side / per_side
  grid = np.stack(np.meshgrid(*[np.arange(per_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
  oxygen = (grid[rng.permutation(len(grid))[:molecules]] + 0.5) * spacing
  oxygen = oxygen + rng.uniform(-JITTER, JITTER, oxygen.shape)  # [M, 3]
  half = HOH_ANGLE / 2
  local = OH_BOND * np.array([[np.sin(half), np.cos(half), 0.0], [-np.sin(half), np.cos(half), 0.0]])
  q = rng.normal(size=(molecules, 4))
  q /= np.linalg.norm(q, axis=1, keepdims=True)
  w, x, y, z = q.T
  rotation = np.stack([  # [M, 3, 3] from random unit quaternions: uniform orientations
      np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
      np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
      np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1)], 1)
  hydrogen = oxygen[:, None, :] + np.einsum("mab,hb->mha", rotation, local)  # [M, 2, 3]
  positions = np.concatenate([oxygen[:, None], hydrogen], axis=1).reshape(-1, 3)
  if periodic:
    positions = np.mod(positions, side)
  numbers = np.tile(np.array([8, 1, 1], np.int32), molecules)
  return numbers, positions, side


def random_predictor(config) -> Predictor:
  """Random weights for ``config`` with the energy read-out scaled by ``ENERGY_SCALE``.

  Initialised on one water molecule (the shapes do not depend on N).
  """
  numbers, positions, _ = water_box(3)
  graph = build_graph([Structure(numbers, positions)], cutoff=config.cutoff,
                      max_neighbors=config.max_neighbors)
  model = E2Former(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jax.tree.map(jnp.asarray, graph))
  params["params"]["energy_out"]["kernel"] = params["params"]["energy_out"]["kernel"] * ENERGY_SCALE
  return Predictor(model=model, params=params)


def _peak_bytes(device) -> int | None:
  stats = device.memory_stats()  # None on CPU
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def check_box_sizes(sizes: list[int], cutoff: float) -> None:
  """Raises ValueError for a size whose periodic water box is too small for JAX MD's minimum image."""
  for size in sizes:
    try:
      e2f_md.check_box(water_side(size), cutoff)
    except ValueError as e:
      raise ValueError(f"--sizes {size}: the periodic water box of {3 * max(1, size // 3)} atoms is "
                       f"{water_side(size):.2f} A wide; {e}") from None


class MDSystem(NamedTuple):
  """A water system ready for JAX MD: the allocated neighbour list and the integrator's first state."""

  num_atoms: int
  box: float
  periodic: bool
  energy_fn: Callable
  neighbor_fn: Any
  apply_fn: Callable
  state: Any
  neighbors: Any


def make_system(predictor: Predictor, system: str, num_atoms: int, *, seed: int, skin: float,
                ensemble: str) -> MDSystem:
  """Water ``system`` ("cluster" or "box") of ~num_atoms atoms with 300 K momenta and zero forces."""
  from jax_md import simulate, space

  periodic = system == "box"
  numbers, positions, side = water_box(num_atoms, seed=seed, periodic=periodic)
  n = len(numbers)
  if periodic:
    box = side
    displacement, shift = space.periodic(side)
  else:
    positions = positions + MARGIN
    box = float(positions.max() + MARGIN)
    displacement, shift = space.free()
  neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(displacement, box, predictor, numbers,
                                                         periodic=periodic, dr_threshold=skin)
  position = jnp.asarray(positions, jnp.float32)
  nbrs = neighbor_fn.allocate(position)
  dt = TIMESTEP_FS * e2f_md.FEMTOSECOND
  kT = TEMPERATURE_K * e2f_md.BOLTZMANN
  mass = jnp.asarray(e2f_md.masses(numbers), jnp.float32)[:, None]
  rng = np.random.default_rng(seed)
  momentum = np.sqrt(np.asarray(mass) * kT) * rng.normal(size=(n, 3))
  momentum = jnp.asarray(momentum - momentum.mean(axis=0), jnp.float32)
  zeros = jnp.zeros_like(position)
  if ensemble == "nve":
    _, apply_fn = simulate.nve(energy_fn, shift, dt)
    state = simulate.NVEState(position, momentum, zeros, mass)
  else:
    _, apply_fn = simulate.nvt_langevin(energy_fn, shift, dt, kT,
                                        gamma=LANGEVIN_FRICTION_PER_FS / e2f_md.FEMTOSECOND)
    state = simulate.NVTLangevinState(position, momentum, zeros, mass, jax.random.PRNGKey(seed))
  return MDSystem(n, box, periodic, energy_fn, neighbor_fn, apply_fn, state, nbrs)


def bench_size(predictor: Predictor, system: str, num_atoms: int, args, deadline: float) -> dict:
  """One system and size: allocate, compile (first chunk), then timed chunks until --steps or the deadline."""
  device = jax.devices()[0]
  start = time.perf_counter()
  md = make_system(predictor, system, num_atoms, seed=args.seed, skin=args.skin, ensemble=args.ensemble)
  jax.block_until_ready(md.neighbors.idx)
  n, periodic, box, nbrs, state = md.num_atoms, md.periodic, md.box, md.neighbors, md.state
  result = {"system": system, "requested_atoms": num_atoms, "num_atoms": n, "box_A": box,
            "periodic": periodic, "ensemble": args.ensemble, "timestep_fs": TIMESTEP_FS,
            "chunk": args.chunk, "skin_A": args.skin,
            "allocate_s": time.perf_counter() - start, "candidates_per_atom": int(nbrs.max_occupancy)}

  def observe(state, nbrs):
    kinetic = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    return {"temperature_K": 2 * kinetic / (3 * n * e2f_md.BOLTZMANN),
            "max_force": jnp.max(jnp.abs(state.force))}

  chunks = e2f_md.run(md.apply_fn, state, num_chunks=1 + max(1, args.steps // args.chunk),
                      steps_per_chunk=args.chunk, neighbors=nbrs, neighbor_fn=md.neighbor_fn,
                      observe_fn=observe)
  def buffers(nbrs):
    return nbrs.max_occupancy, nbrs.cell_list_capacity

  start = time.perf_counter()
  _, state, new_nbrs, obs = next(chunks)  # compiles; not timed
  jax.block_until_ready(state.position)
  result["compile_and_first_chunk_s"] = time.perf_counter() - start
  reallocations = int(buffers(new_nbrs) != buffers(nbrs))
  nbrs = new_nbrs
  timed_steps, start = 0, time.perf_counter()
  for _, state, new_nbrs, obs in chunks:
    # A re-allocation (and its recompilation) inside the timed loop is part of the cost.
    reallocations += int(buffers(new_nbrs) != buffers(nbrs))
    nbrs = new_nbrs
    timed_steps += args.chunk
    if time.perf_counter() > deadline:
      result["stopped_early"] = "time budget"
      break
  jax.block_until_ready(state.position)
  elapsed = time.perf_counter() - start
  final = jax.device_get(obs)
  result.update({
      "timed_steps": timed_steps, "timed_s": elapsed,
      "steps_per_s": timed_steps / elapsed, "atom_steps_per_s": n * timed_steps / elapsed,
      "ns_per_day": timed_steps / elapsed * TIMESTEP_FS * 86400 / 1e6,
      "ms_per_step": 1e3 * elapsed / timed_steps,
      "final_temperature_K": float(final["temperature_K"]), "final_max_force": float(final["max_force"]),
      "final_candidates_per_atom": int(nbrs.max_occupancy), "reallocations": reallocations,
      "peak_bytes": _peak_bytes(device),
  })
  if not periodic:  # the cell list of free space finds all pairs only inside its box
    result["inside_box"] = bool((np.asarray(state.position) >= 0).all()
                                & (np.asarray(state.position) < box).all())
  return result


def results_line(report: dict) -> str:
  """One Markdown line for benchmarks/RESULTS.md with the key numbers."""
  parts = [report["date"], report["device"], f"commit {report['commit']}",
           (f"md ({'+'.join(report['systems'])}, sizes {','.join(map(str, report['requested_sizes']))}, "
            f"{report['ensemble']}, remat {'on' if report['remat'] else 'off'}, {report['config_name']} "
            f"config, {report['attention_impl']}, {TIMESTEP_FS} fs, K={report['max_neighbors']}, f32)")]
  for r in report["sizes"]:
    label = f"{r['system']} N={r.get('num_atoms', r['requested_atoms'])}"
    if "steps_per_s" in r:
      peak = f", peak {r['peak_bytes'] / 1e9:.1f} GB" if r.get("peak_bytes") else ""
      parts.append(f"{label}: {r['steps_per_s']:.3g} steps/s, {r['atom_steps_per_s']:.3g} atom-steps/s, "
                   f"{r['final_candidates_per_atom']} candidates/atom{peak}")
    else:
      parts.append(f"{label}: {r.get('error', 'not run')[:60]}")
  return "| " + " | ".join(parts) + " |"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", default="1000,10000,100000", help="atoms per system (rounded to 3M)")
  parser.add_argument("--systems", default=",".join(SYSTEMS),
                      help="comma-separated: cluster (free space), box (periodic liquid)")
  parser.add_argument("--config", choices=("paper", "tiny"), default="paper")
  parser.add_argument("--ensemble", choices=("nve", "nvt"), default="nve", help="nvt: Langevin, 300 K")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise blocks and radial MLPs in the backward pass (less memory)")
  parser.add_argument("--steps", type=int, default=40, help="timed steps per size (after the first chunk)")
  parser.add_argument("--chunk", type=int, default=10, help="steps per compiled chunk")
  parser.add_argument("--skin", type=float, default=e2f_md.DEFAULT_SKIN, help="neighbour-list skin (A)")
  parser.add_argument("--attention-impl", choices=[i.value for i in AttentionImpl], default=None,
                      help="default: pallas on GPU, xla otherwise")
  parser.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of all sizes")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--commit", default=None, help="default: $GIT_COMMIT or git rev-parse")
  parser.add_argument("--out", default="", help="JSON output (default benchmarks/results/md_<device>.json)")
  parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
  args = parser.parse_args(argv)
  deadline = time.perf_counter() + args.budget_s
  systems = [s.strip() for s in args.systems.split(",") if s.strip()]
  if not systems or set(systems) - set(SYSTEMS) or len(set(systems)) != len(systems):
    raise ValueError(f"--systems must list distinct names among {SYSTEMS}, got {args.systems!r}")
  systems = [s for s in SYSTEMS if s in systems]  # at each size: cluster, then box
  sizes = sorted({int(s) for s in args.sizes.split(",")})

  device = jax.devices()[0]
  impl = AttentionImpl(args.attention_impl) if args.attention_impl else (
      AttentionImpl.PALLAS if device.platform == "gpu" else AttentionImpl.XLA)
  make_config = paper_config if args.config == "paper" else tiny_config
  config = make_config(attention_impl=impl, direct_force_head=False)
  if args.remat:
    config = config.replace(remat=True)
  if "box" in systems:
    check_box_sizes(sizes, config.cutoff)
  report = {"device": device.device_kind, "platform": device.platform, "commit": args.commit or os.environ.get("GIT_COMMIT") or git_commit(),
            "date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "config_name": args.config, "attention_impl": impl.value, "ensemble": args.ensemble,
            "remat": args.remat, "systems": systems, "requested_sizes": sizes,
            "max_neighbors": config.max_neighbors, "cutoff": config.cutoff, "sizes": []}
  out_path = Path(args.out or REPO / "benchmarks" / "results" /
                  f"md_{device.device_kind.replace(' ', '_')}.json")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  predictor = random_predictor(config)
  compile_s = 0.0  # the last size's compilation: a lower bound on the next one's
  for size, system in ((size, system) for size in sizes for system in systems):
    if time.perf_counter() + COMPILE_MARGIN * compile_s > deadline:
      report["sizes"].append({"system": system, "requested_atoms": size, "error": "not run: time budget"})
      continue
    try:
      row = bench_size(predictor, system, size, args, deadline)
    # Recorded per run: an out-of-memory must not lose the smaller sizes.
    except Exception as e:  # noqa: BLE001
      message = repr(e)
      kind = "OOM" if "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower() else "error"
      row = {"system": system, "requested_atoms": size, "error": f"{kind}: {message[:300]}",
             "traceback": traceback.format_exc()[-1500:]}
    compile_s = row.get("compile_and_first_chunk_s", compile_s)
    report["sizes"].append(row)
    print("md", json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    out_path.write_text(json.dumps(report, indent=1))
    jax.clear_caches()
  out_path.write_text(json.dumps(report, indent=1))
  with open(args.results_md, "a") as f:
    f.write(results_line(report) + "\n")
  print(results_line(report), flush=True)
  print("wrote", out_path, flush=True)
  return report


if __name__ == "__main__":
  main()
