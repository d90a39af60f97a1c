"""XLA's compiled memory plan of energy + forces and of an MD step/chunk, against system size.

For each water system of ``benchmarks/md.py`` (``cluster`` in free space, periodic ``box``) and size,
compiles ahead of time, without running unless asked:

* ``forces``: ``jax.value_and_grad`` of the JAX MD energy function at a fixed neighbour list;
* ``step``: one integrator step with its neighbour-list update (what one MD step holds);
* ``chunk``: ``interop.jax_md.md_chunk``, the compiled ``fori_loop`` of ``--chunk`` steps that
  ``benchmarks/md.py`` runs;

and records ``compiled.memory_analysis()`` (temp, argument, output, alias bytes) per atom. With
``--run``, each compiled function then runs once in the order above and the device's peak bytes
(a process-lifetime maximum) are recorded after each, and the time of a second call (one sample: a
cost breakdown, not a benchmark; ``benchmarks/md.py`` measures throughput). XLA's own per-buffer report comes from its dump
flags, set by the caller, e.g.

  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*(forces|step|chunk).* \\
    --xla_dump_hlo_as_text" python benchmarks/memory_plan.py --remat --sizes 100000

then ``/tmp/dump/*memory-usage-report.txt`` lists the largest buffers and the values sharing them.

Usage:
  python benchmarks/memory_plan.py [--systems cluster,box] [--sizes 10000,100000] [--remat]
                                   [--config paper|tiny] [--programs forces,step,chunk] [--chunk 5]
                                   [--run] [--out PATH]
  python benchmarks/memory_plan.py --config tiny --sizes 300 --out /tmp/plan.json   # CPU check
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# First: benchmarks.md sets the allocator fraction before jax starts.
from benchmarks import md as md_bench  # noqa: E402

import jax  # noqa: E402

from benchmarks.provenance import git_commit  # noqa: E402
from benchmarks.xla_memory import compiled_memory  # noqa: E402
from e2former_jax.config import AttentionImpl, paper_config, tiny_config  # noqa: E402
from e2former_jax.interop import jax_md as e2f_md  # noqa: E402


def plan_system(predictor, system: str, size: int, args) -> dict:
  """Compiles forces, step and chunk for one system and size; optionally runs each once."""
  md = md_bench.make_system(predictor, system, size, seed=args.seed, skin=e2f_md.DEFAULT_SKIN,
                            ensemble="nve")
  device = jax.devices()[0]
  row = {"system": system, "requested_atoms": size, "num_atoms": md.num_atoms,
         "candidates_per_atom": int(md.neighbors.max_occupancy)}
  position, nbrs, state = md.state.position, md.neighbors, md.state

  def forces(position, nbrs):
    return jax.value_and_grad(md.energy_fn)(position, neighbor=nbrs)

  def step(state, nbrs):
    nbrs = nbrs.update(state.position)
    return md.apply_fn(state, neighbor=nbrs), nbrs

  programs = {"forces": (jax.jit(forces), (position, nbrs)),
              "step": (jax.jit(step), (state, nbrs)),
              "chunk": (e2f_md.md_chunk(md.apply_fn, args.chunk), (state, nbrs))}
  for name in args.programs.split(","):
    fn, fn_args = programs[name]
    start = time.perf_counter()
    try:
      compiled = fn.lower(*fn_args).compile()
      plan = compiled_memory(compiled)
      entry = {**plan, "compile_s": time.perf_counter() - start,
               "temp_per_atom_kb": plan.get("temp", 0) / md.num_atoms / 1e3}
      if args.run:
        jax.block_until_ready(compiled(*fn_args))
        stats = device.memory_stats()  # None on the CPU
        entry["peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats else None
        start = time.perf_counter()
        jax.block_until_ready(compiled(*fn_args))  # the second call: no first-run costs
        entry["run_s"] = time.perf_counter() - start
    except Exception as e:  # noqa: BLE001  (an out-of-memory must not lose the other programs)
      entry = {"error": "".join(traceback.format_exception_only(e))[-800:]}
    row[name] = entry
    print(name, system, md.num_atoms, json.dumps(entry), flush=True)
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--systems", default="cluster", help="comma-separated: cluster, box")
  parser.add_argument("--sizes", default="10000,100000", help="atoms per system (rounded to 3M)")
  parser.add_argument("--config", choices=("paper", "tiny"), default="paper")
  parser.add_argument("--remat", action="store_true", help="E2FormerConfig.remat")
  parser.add_argument("--programs", default="forces,step,chunk", help="comma-separated subset, in order")
  parser.add_argument("--chunk", type=int, default=5, help="steps of the compiled chunk")
  parser.add_argument("--run", action="store_true", help="also run each program (peak bytes, time of a 2nd call)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--commit", default=None, help="default: git rev-parse")
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "memory_plan.json"))
  args = parser.parse_args(argv)
  systems = [s for s in args.systems.split(",") if s]
  sizes = sorted({int(s) for s in args.sizes.split(",")})
  device = jax.devices()[0]
  impl = AttentionImpl.PALLAS if device.platform == "gpu" else AttentionImpl.XLA
  make_config = paper_config if args.config == "paper" else tiny_config
  config = make_config(attention_impl=impl, direct_force_head=False).replace(remat=args.remat)
  if "box" in systems:
    md_bench.check_box_sizes(sizes, config.cutoff)
  predictor = md_bench.random_predictor(config)
  report = {"device": device.device_kind, "commit": args.commit or git_commit(),
            "date": datetime.date.today().isoformat(), "jax": jax.__version__, "config_name": args.config,
            "attention_impl": impl.value, "remat": args.remat, "chunk": args.chunk, "rows": []}
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  for size in sizes:
    for system in systems:
      report["rows"].append(plan_system(predictor, system, size, args))
      out.write_text(json.dumps(report, indent=1))
      jax.clear_caches()
  print("wrote", out, flush=True)
  return report


if __name__ == "__main__":
  main()
