"""How many molecular-dynamics steps per second does the model run in JAX MD, against system size?

Systems (``--systems``), each of N = 3 x molecules atoms of water at liquid density
(benchmarks/structures.py, ``water_box``):

* ``cluster``: a cube of water in free space (``space.free``), inside a larger cell-list box;
* ``box``: liquid water in a periodic cube (``space.periodic``): periodic neighbour lists and
  periodic images in the model. Every plane spacing must exceed twice the cutoff (about 75 atoms
  at r_c = 4.5 A); smaller boxes are refused up front.

Model: random weights (throughput does not depend on them; the energy read-out is scaled down so
that the forces stay thermal) at the chosen configuration; on a GPU the Pallas attention kernels
and mixed precision (the model's defaults; ``--full-precision`` keeps float32), elsewhere the XLA
reference in float32; ``--remat`` rematerialises blocks and radial MLPs in the backward pass (about
half the memory for forces, one or two more forward passes).

Dynamics: ``jax_md.simulate.nve`` (or ``nvt_langevin``, ``--ensemble nvt``) at 0.5 fs from 300 K,
through ``e2former_jax.interop.jax_md``: a JAX MD neighbour list updated every step inside
compiled chunks of ``--chunk`` steps, the model's K nearest selected on device, conservative
forces. The first chunk compiles and is not timed (the state starts with zero forces, which that
chunk corrects). Sizes run in increasing order, both systems at each size, in this process: the
device's peak memory (a process-lifetime maximum) is then that of the largest system so far.
After the timed chunks, one neighbour-list update that keeps the list and one that rebuilds it
(one atom moved by the skin) are timed on their own: what a rebuild costs against a step.

Usage:
  python -m benchmarks.md [--sizes 1000,10000] [--systems cluster,box] [--ensemble nve|nvt]
      [--remat] [--steps 40] [--chunk 10]
  python -m benchmarks.md --sizes 100000 --remat --steps 10 --chunk 5
  python -m benchmarks.md --smoke    # the smallest configuration on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

# Let the largest system use the whole accelerator (JAX reserves 75 % by default).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks import measure, model_run, report  # noqa: E402
from benchmarks.structures import water_box, water_side  # noqa: E402
from e2former_jax.config import AttentionImpl, Precision, resolve_precision  # noqa: E402
from e2former_jax.interop import jax_md as e2f_md  # noqa: E402
from e2former_jax.interop.predictor import Predictor  # noqa: E402
from e2former_jax.neighbors import build_graph  # noqa: E402
from e2former_jax.nn.model import E2Former  # noqa: E402
from e2former_jax.structure import Structure  # noqa: E402

BENCHMARK = "md"
SYSTEMS = ("cluster", "box")
# Empty space around the cluster inside the cell-list box (angstrom): atoms must stay inside it.
MARGIN = 10.0
# A random network's forces (~1-10 eV/A) heat water to thousands of kelvin within ~100 fs; the
# density fluctuations that follow overflow the neighbour buffers again and again, and every
# re-allocation recompiles, which a trained potential would not cause. Scaling the last layer by
# this factor gives thermal-sized forces; it changes no shape and no cost.
ENERGY_SCALE = 0.01
TIMESTEP_FS = 0.5
TEMPERATURE_K = 300.0
LANGEVIN_FRICTION_PER_FS = 0.01
# Timed samples of each neighbour-list update.
REBUILD_REPEATS = 5
SMOKE = dict(config="smoke", sizes="81", systems="box", steps=2, chunk=2)


def random_predictor(config) -> Predictor:
  """Random weights for ``config``, the energy read-out scaled by ENERGY_SCALE (initialised on one
  water molecule: the shapes do not depend on N)."""
  numbers, positions, _ = water_box(3)
  graph = build_graph([Structure(numbers, positions)], cutoff=config.cutoff,
                      max_neighbors=config.max_neighbors)
  model = E2Former(config)
  params = jax.jit(model.init)(jax.random.key(0), jax.tree.map(jnp.asarray, graph))
  params["params"]["energy_out"]["kernel"] = params["params"]["energy_out"]["kernel"] * ENERGY_SCALE
  return Predictor(model=model, params=params)


def check_box_sizes(sizes: list[int], cutoff: float) -> None:
  """Raises ValueError for a size whose periodic water box is too narrow for the cutoff."""
  for size in sizes:
    try:
      e2f_md.check_box(water_side(size), cutoff)
    except ValueError as e:
      raise ValueError(f"--sizes {size}: the periodic water box of {3 * max(1, size // 3)} atoms is "
                       f"{water_side(size):.2f} A wide; {e}") from None


class MDSystem(NamedTuple):
  """A water system ready for JAX MD: its neighbour list and the integrator's first state."""

  num_atoms: int
  box: float
  periodic: bool
  neighbor_fn: Any
  apply_fn: Callable
  state: Any
  neighbors: Any


def make_system(predictor: Predictor, system: str, num_atoms: int, *, seed: int, skin: float,
                ensemble: str) -> MDSystem:
  """Water ``system`` ("cluster" or "box") of about num_atoms atoms, 300 K momenta, zero forces."""
  from jax_md import simulate, space

  periodic = system == "box"
  numbers, positions, side = water_box(num_atoms, seed=seed, periodic=periodic)
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
  dt = TIMESTEP_FS * e2f_md.FEMTOSECOND
  kT = TEMPERATURE_K * e2f_md.BOLTZMANN
  mass = jnp.asarray(e2f_md.masses(numbers), jnp.float32)[:, None]
  momentum = np.sqrt(np.asarray(mass) * kT) * np.random.default_rng(seed).normal(size=position.shape)
  momentum = jnp.asarray(momentum - momentum.mean(axis=0), jnp.float32)
  zeros = jnp.zeros_like(position)
  if ensemble == "nve":
    _, apply_fn = simulate.nve(energy_fn, shift, dt)
    state = simulate.NVEState(position, momentum, zeros, mass)
  else:
    _, apply_fn = simulate.nvt_langevin(energy_fn, shift, dt, kT,
                                        gamma=LANGEVIN_FRICTION_PER_FS / e2f_md.FEMTOSECOND)
    state = simulate.NVTLangevinState(position, momentum, zeros, mass, jax.random.key(seed))
  return MDSystem(len(numbers), box, periodic, neighbor_fn, apply_fn, state,
                  neighbor_fn.allocate(position))


def run_system(predictor: Predictor, system: str, num_atoms: int, args, deadline: float) -> dict:
  """One system and size: allocate, compile (the first chunk), then timed chunks."""
  start = time.perf_counter()
  md = make_system(predictor, system, num_atoms, seed=args.seed, skin=args.skin,
                   ensemble=args.ensemble)
  n, nbrs = md.num_atoms, md.neighbors
  result = {"status": "ok", "system": system, "num_atoms": n, "box_A": md.box,
            "allocate_s": time.perf_counter() - start,
            "candidates_per_atom": int(nbrs.max_occupancy)}

  def observe(state, nbrs):
    kinetic = 0.5 * jnp.sum(state.momentum**2 / state.mass)
    return {"temperature_K": 2 * kinetic / (3 * n * e2f_md.BOLTZMANN),
            "max_force": jnp.max(jnp.abs(state.force))}

  def buffers(nbrs):
    return nbrs.max_occupancy, nbrs.cell_list_capacity

  chunks = e2f_md.run(md.apply_fn, md.state, num_chunks=1 + max(1, args.steps // args.chunk),
                      steps_per_chunk=args.chunk, neighbors=nbrs, neighbor_fn=md.neighbor_fn,
                      observe_fn=observe)
  start = time.perf_counter()
  _, state, new_nbrs, observation = next(chunks)  # compiles; not timed
  jax.block_until_ready(state.position)
  result["compile_and_first_chunk_s"] = time.perf_counter() - start
  reallocations, nbrs = int(buffers(new_nbrs) != buffers(nbrs)), new_nbrs
  timed_steps, start = 0, time.perf_counter()
  for _, state, new_nbrs, observation in chunks:
    # A re-allocation (and its recompilation) inside the timed loop is part of the cost.
    reallocations += int(buffers(new_nbrs) != buffers(nbrs))
    nbrs = new_nbrs
    timed_steps += args.chunk
    if time.perf_counter() > deadline:
      result["stopped_early"] = "time budget"
      break
  jax.block_until_ready(state.position)
  elapsed = time.perf_counter() - start
  final = jax.device_get(observation)
  result.update(timed_steps=timed_steps, timed_s=elapsed, steps_per_s=timed_steps / elapsed,
                atom_steps_per_s=n * timed_steps / elapsed,
                final_temperature_K=float(final["temperature_K"]),
                final_max_force=float(final["max_force"]), reallocations=reallocations,
                final_candidates_per_atom=int(nbrs.max_occupancy),
                peak_bytes=measure.peak_bytes(jax.devices()[0]))
  result.update(rebuild_cost_ms(md, state.position, nbrs, args.skin))
  if not md.periodic:  # the cell list of free space finds all pairs only inside its box
    result["inside_box"] = bool((np.asarray(state.position) >= 0).all()
                                & (np.asarray(state.position) < md.box).all())
  return result


def rebuild_cost_ms(md: MDSystem, position, nbrs, skin: float) -> dict:
  """Milliseconds of one neighbour-list update that keeps the list and of one that rebuilds it.

  JAX MD's convention (and the all-images list's): ``update`` rebuilds once some atom has moved
  more than half the skin since the last rebuild. Moving one atom by the skin forces that rebuild
  (a translation of every atom would not: the free-space list centres the positions first).
  """
  update = jax.jit(md.neighbor_fn.update)
  moved = position.at[0, 0].add(skin)
  return {name: measure.time_calls(lambda p=p: jax.block_until_ready(update(p, nbrs)),
                                   repeats=REBUILD_REPEATS)["ms"]
          for name, p in (("kept_ms", position), ("rebuild_ms", moved))}


def result_line(data: dict) -> str:
  if "steps_per_s" not in data:
    return data.get("status", "not run")
  peak = f", peak {data['peak_bytes'] / 1e9:.1f} GB" if data.get("peak_bytes") else ""
  rebuild = ""
  if data.get("rebuild_ms") is not None:
    step_ms = 1e3 / data["steps_per_s"]
    rebuild = (f"; a neighbour-list rebuild {data['rebuild_ms']:.3g} ms ({100 * data['rebuild_ms'] / step_ms:.0f} % "
               f"of a step), an update that keeps the list {data['kept_ms']:.3g} ms")
  return (f"{data['steps_per_s']:.3g} steps/s, {data['atom_steps_per_s']:.3g} atom-steps/s"
          f"{peak}{rebuild}")


def build_parser() -> argparse.ArgumentParser:
  """The command line (every option; documented commands are checked against it)."""
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--sizes", default="1000,10000", help="atoms per system (rounded to 3M)")
  parser.add_argument("--systems", default=",".join(SYSTEMS))
  parser.add_argument("--config", choices=model_run.CONFIG_NAMES, default="paper")
  parser.add_argument("--ensemble", choices=("nve", "nvt"), default="nve",
                      help="nvt: Langevin at 300 K")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise blocks and radial MLPs in the backward pass")
  parser.add_argument("--full-precision", action="store_true",
                      help="float32 products on a GPU too (default: the model's, mixed precision there)")
  parser.add_argument("--steps", type=int, default=40, help="timed steps per system")
  parser.add_argument("--chunk", type=int, default=10, help="steps per compiled chunk")
  parser.add_argument("--skin", type=float, default=e2f_md.DEFAULT_SKIN, help="neighbour-list skin (A)")
  parser.add_argument("--budget-s", type=float, default=float("inf"),
                      help="stop timing, and start no system, after this many seconds")
  parser.add_argument("--seed", type=int, default=0)
  return parser


def main(argv=None) -> list[report.Record]:
  parser = build_parser()
  args = report.parse(parser, argv)
  systems = [s for s in SYSTEMS if s in args.systems.split(",")]
  if not systems or set(args.systems.split(",")) - set(SYSTEMS):
    parser.error(f"--systems must name some of {SYSTEMS}, got {args.systems!r}")
  sizes = sorted({int(s) for s in args.sizes.split(",")})
  device = jax.devices()[0]
  impl = AttentionImpl.PALLAS if device.platform == "gpu" else AttentionImpl.XLA
  config = model_run.config(args.config).replace(attention_impl=impl, direct_force_head=False,
                                                 remat=args.remat)
  if args.full_precision:
    config = config.replace(precision=Precision.FULL)
  precision = resolve_precision(config.precision)
  if "box" in systems:
    check_box_sizes(sizes, config.cutoff)
  commit = args.commit or report.git_commit()
  deadline = time.perf_counter() + args.budget_s
  predictor = random_predictor(config)
  records = []
  for size in sizes:
    for system in systems:
      if time.perf_counter() > deadline:
        print(f"skipped {system} {size}: time budget", flush=True)
        continue
      try:
        data = run_system(predictor, system, size, args, deadline)
      except Exception as e:  # noqa: BLE001  (out of memory must not lose the smaller sizes)
        data = {"system": system, "num_atoms": size, **measure.failure(e)}
        traceback.print_exc()
      data.update(config=args.config, attention_impl=impl.value, precision=precision.value,
                  ensemble=args.ensemble, remat=args.remat, timestep_fs=TIMESTEP_FS, chunk=args.chunk,
                  skin_A=args.skin)
      case = (f"{system} N={data['num_atoms']} {args.ensemble}" + (" remat" if args.remat else "")
              + (" mixed precision" if precision is Precision.MIXED else "")
              + ("" if args.config == "paper" else f" ({args.config} configuration)"))
      records.append(report.Record(case, result_line(data), report.device_name(device), commit,
                                   report.today(), data))
      print(f"{case}: {records[-1].result}", flush=True)
      jax.clear_caches()
  path = report.record(BENCHMARK, records, report.results_dir(args))
  print("recorded in", path, flush=True)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
