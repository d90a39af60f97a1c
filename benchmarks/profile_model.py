"""Where does the model's GPU time go? Per-kernel times of energy + forces (and of a training step)
from a JAX profiler trace.

Builds the configuration with random weights on one cluster of N atoms (benchmarks/structures.py:
a jittered lattice ball of O and H at 0.1 atoms/A^3, K nearest within the cutoff), compiles energy +
forces (``--direct``: also energy + the direct head's forces, one forward pass; ``--train``: also one
Adam step on a force loss, which differentiates the forces), runs
each twice to warm up, then ``--calls`` times under ``jax.profiler.trace``. From the trace's
Perfetto export it sums the GPU kernels' durations per kernel name and per group (the Pallas
kernels by name, matrix products, XLA's fusions) and divides by the number of traced calls. Each of
the ``--top`` longest kernels is tied to its HLO instruction, its shape and the JAX op and source
line that made it.

Usage:
  python -m benchmarks.profile_model [--atoms 10000] [--direct] [--train] [--calls 3] [--top 25]
      [--impl jax-pallas|jax-pallas-chunks|...]   (benchmarks/model_run.py: compute choices)
  python -m benchmarks.profile_model --smoke    # the smallest configuration on the CPU (the CPU
      trace has no GPU kernels: it checks that the script runs)
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import e2former_jax as e2f
from benchmarks import model_run, report, structures

BENCHMARK = "profile_model"
SEED = 0
# Names of the project's Pallas kernels (``name=`` of each pallas_call): their own groups.
PALLAS_NAMES = ("message_attention_fwd", "message_attention_bwd_scatter", "message_attention_bwd",
                "attention_weights", "edge_dot", "gather_sum", "scatter_sum", "radial_mlp_fwd",
                "radial_mlp_geometry_vjp")
# Kernel-name fragments of matrix products (cuBLAS, cuBLASLt, XLA's Triton GEMMs).
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "cublas", "sm90_", "triton_gemm")
# Groups shown in the RESULTS.md line.
SHOWN_GROUPS = 6
SMOKE = dict(config="smoke", atoms=24, calls=1, direct=True)


def group_of(name: str) -> str:
  for pallas in PALLAS_NAMES:
    if pallas in name:
      return pallas
  if any(marker in name.lower() for marker in GEMM_MARKERS):
    return "matrix products"
  return "xla fusions and copies"


def gpu_kernels(trace_dir: Path) -> list[dict]:
  """Complete events ('X') of the GPU's streams in the trace's Perfetto export."""
  [path] = trace_dir.rglob("perfetto_trace.json.gz")
  events = json.load(gzip.open(path))
  events = events["traceEvents"] if isinstance(events, dict) else events
  gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
              and "GPU" in e["args"].get("name", "")}
  return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]


_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?metadata=\{(.*?)\}")
_METADATA = re.compile(r'(op_name|source_file|source_line)=("[^"]*"|\d+)')


def hlo_origins(hlo_text: str) -> dict[str, dict]:
  """Kernel name (an HLO instruction's name, '.' -> '_') -> its shape and the JAX op and source line
  that produced it, from the optimized module's text."""
  origins = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if match:
      name, shape, metadata = match.groups()
      origins[name.replace(".", "_")] = {
          "shape": shape, **{k: v.strip('"') for k, v in _METADATA.findall(metadata)}}
  return origins


def summarize(kernels: list[dict], calls: int, top: int, origins: dict[str, dict]) -> dict:
  by_name = collections.Counter()
  count = collections.Counter()
  for e in kernels:
    by_name[e["name"]] += e["dur"] / 1e3 / calls  # us -> ms per call
    count[e["name"]] += 1
  total = sum(by_name.values())  # 0 where the trace holds no GPU kernel (a CPU run)
  groups = collections.Counter()
  for name, ms in by_name.items():
    groups[group_of(name)] += ms
  return {
      "gpu_ms_per_call": total,
      "kernels_per_call": sum(count.values()) / calls,
      "groups_ms": dict(groups.most_common()),
      "top": [{"name": name, "ms": ms, "share": ms / total if total else 0.0,
               "launches_per_call": count[name] / calls,
               **({"hlo": origins[name]} if name in origins else {})}
              for name, ms in by_name.most_common(top)],
      "example_args": [e.get("args", {}) for e in
                       sorted(kernels, key=lambda e: -e["dur"])[:3]],
  }


def profile(fn, args, calls: int, top: int) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  for _ in range(2):
    jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(compiled(*args))
    kernels = gpu_kernels(Path(trace_dir))
  return summarize(kernels, calls, top, hlo_origins(compiled.as_text()))


def result_line(entry: dict) -> str:
  shown = list(entry["groups_ms"].items())[:SHOWN_GROUPS]
  groups = ", ".join(f"{name} {ms:.1f}" for name, ms in shown)
  return (f"GPU {entry['gpu_ms_per_call']:.1f} ms per call ({entry['kernels_per_call']:.0f} "
          f"kernels)" + (f": {groups} ms" if groups else ""))


def build_parser() -> argparse.ArgumentParser:
  """The command line (every option; documented commands are checked against it)."""
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--atoms", type=int, default=10000)
  parser.add_argument("--config", choices=model_run.CONFIG_NAMES, default="paper")
  parser.add_argument("--impl", choices=[i for i in model_run.JAX_IMPLS if i.startswith("jax-pallas")],
                      default="jax-pallas", help="how the model computes (attention: Pallas on a GPU)")
  parser.add_argument("--direct", action="store_true",
                      help="also profile energy + the direct head's forces (one forward pass)")
  parser.add_argument("--train", action="store_true", help="also profile one training step")
  parser.add_argument("--calls", type=int, default=3, help="traced calls of each function")
  parser.add_argument("--top", type=int, default=25, help="longest kernels listed")
  return parser


def main(argv=None) -> list[report.Record]:
  args = report.parse(build_parser(), argv)
  device = jax.devices()[0]
  impl = e2f.AttentionImpl.PALLAS if device.platform == "gpu" else e2f.AttentionImpl.XLA
  cfg = model_run.model_config(args.config, args.impl, device.platform).replace(attention_impl=impl)
  model = e2f.E2Former(cfg)
  graph = structures.cluster_batch(structures.Batch(1, args.atoms), cfg.cutoff, cfg.max_neighbors)
  small = structures.cluster_batch(structures.Batch(1, 8), cfg.cutoff, cfg.max_neighbors)
  params = model.init(jax.random.key(SEED), small)  # the weights do not depend on N
  graph = jax.device_put(graph)
  profiles = {"energy_forces": profile(lambda p, g: e2f.energy_and_forces(model, p, g),
                                       (params, graph), args.calls, args.top)}
  if args.direct:
    profiles["energy_direct_forces"] = profile(
        lambda p, g: e2f.energy_and_forces(model, p, g, conservative=False), (params, graph),
        args.calls, args.top)
  if args.train:
    tx = optax.adam(1e-4)
    targets = jnp.zeros((graph.positions.shape[0], 3), jnp.float32)

    def step(p, opt_state, g):
      def loss(p):
        energy, forces = e2f.energy_and_forces(model, p, g)
        return jnp.mean(energy ** 2) + jnp.mean((forces - targets) ** 2)

      updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    profiles["train_step"] = profile(step, (params, tx.init(params), graph), args.calls, args.top)

  commit = args.commit or report.git_commit()
  suffix = "" if args.impl == "jax-pallas" else f" {args.impl}"
  suffix += "" if args.config == "paper" else f" ({args.config} configuration)"
  records = [report.Record(f"{phase} N={args.atoms}{suffix}", result_line(entry),
                           report.device_name(device), commit, report.today(),
                           {"atoms": args.atoms, "impl": args.impl, "attention_impl": impl.value, "calls": args.calls,
                            **entry})
             for phase, entry in profiles.items()]
  for r in records:
    print(f"{r.case}: {r.result}", flush=True)
  path = report.record(BENCHMARK, records, report.results_dir(args))
  print("recorded in", path, flush=True)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
