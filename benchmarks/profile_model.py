"""Where the model's GPU time goes: per-kernel times of energy + forces (and a training step) from a
JAX profiler trace.

Builds the paper configuration with random weights on a cluster of N atoms (a jittered cubic
lattice at 0.1 atoms/A^3, elements H C N O, K nearest within the cutoff), compiles energy + forces
(``--train``: also one Adam step on a force loss, which differentiates the forces), runs each twice
to warm up, then ``--calls`` times under ``jax.profiler.trace``. From the trace's Perfetto export
it sums the GPU kernels' durations per kernel name and per group (the Pallas kernels by name,
matrix products, XLA's fusions) and divides by the number of traced calls.

Writes JSON (``--out``: totals per group, the ``--top`` longest kernels with their share and the
HLO instruction behind each, its shape and the JAX op and source line that made it, and a few raw
events' arguments) and appends one line to ``--results-md``.

Usage: python benchmarks/profile_model.py [--atoms 10000] [--train] [--calls 3] [--out PATH]
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import e2former_jax as e2f  # noqa: E402

DENSITY = 0.1  # atoms per cubic angstrom (condensed organic matter)
JITTER = 0.2  # of the lattice spacing: keeps every pair well apart
ELEMENTS = (1, 6, 7, 8)
SEED = 0
# Names of the project's Pallas kernels (``name=`` of each pallas_call): their own groups.
PALLAS_NAMES = ("message_attention_fwd", "message_attention_bwd_scatter", "message_attention_bwd",
                "node_attention", "attention_weights", "edge_dot", "gather_sum", "scatter_sum")
# Kernel-name fragments of matrix products (cuBLAS, cuBLASLt, XLA's Triton GEMMs).
GEMM_MARKERS = ("gemm", "xmma", "cutlass", "cublas", "sm90_", "triton_gemm")


def cluster(num_atoms: int) -> e2f.Structure:
  rng = np.random.default_rng(SEED)
  spacing = DENSITY ** (-1 / 3)
  side = int(np.ceil(num_atoms ** (1 / 3)))
  grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)
  positions = (grid[:num_atoms] + JITTER * rng.uniform(-0.5, 0.5, (num_atoms, 3))) * spacing
  return e2f.Structure(numbers=rng.choice(ELEMENTS, num_atoms), positions=positions)


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
  total = sum(by_name.values())
  groups = collections.Counter()
  for name, ms in by_name.items():
    groups[group_of(name)] += ms
  return {
      "gpu_ms_per_call": total,
      "kernels_per_call": sum(count.values()) / calls,
      "groups_ms": dict(groups.most_common()),
      "top": [{"name": name, "ms": ms, "share": ms / total, "launches_per_call": count[name] / calls,
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--atoms", type=int, default=10000)
  parser.add_argument("--train", action="store_true", help="also profile one training step")
  parser.add_argument("--calls", type=int, default=3, help="traced calls of each function")
  parser.add_argument("--top", type=int, default=25, help="longest kernels listed")
  parser.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
  parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "profile_model.json"))
  parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
  args = parser.parse_args()

  device = jax.devices()[0]
  impl = e2f.AttentionImpl.PALLAS if device.platform == "gpu" else e2f.AttentionImpl.XLA
  cfg = e2f.paper_config().replace(attention_impl=impl)
  model = e2f.E2Former(cfg)
  structure = cluster(args.atoms)
  graph = e2f.build_graph([structure], cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors,
                          num_molecules=2)
  small = e2f.build_graph([cluster(8)], cutoff=cfg.cutoff, max_neighbors=cfg.max_neighbors,
                          num_molecules=2)
  params = jax.jit(model.init)(jax.random.key(SEED), small)  # weights do not depend on N
  graph = jax.device_put(graph)
  report = {"device": device.device_kind, "commit": args.commit,
            "date": datetime.date.today().isoformat(), "atoms": args.atoms,
            "attention_impl": impl.value, "calls": args.calls}

  report["energy_forces"] = profile(lambda p, g: e2f.energy_and_forces(model, p, g),
                                    (params, graph), args.calls, args.top)
  if args.train:
    tx = optax.adam(1e-4)
    targets = jnp.zeros((graph.positions.shape[0], 3), jnp.float32)

    def step(p, opt_state, g):
      def loss(p):
        energy, forces = e2f.energy_and_forces(model, p, g)
        return jnp.mean(energy ** 2) + jnp.mean((forces - targets) ** 2)

      grads = jax.grad(loss)(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    report["train_step"] = profile(step, (params, tx.init(params), graph), args.calls, args.top)

  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=1))
  parts = []
  for phase in ("energy_forces", "train_step"):
    if phase in report:
      r = report[phase]
      groups = ", ".join(f"{name} {ms:.1f}" for name, ms in list(r["groups_ms"].items())[:6])
      parts.append(f"{phase}: GPU {r['gpu_ms_per_call']:.1f} ms per call "
                   f"({r['kernels_per_call']:.0f} kernels): {groups} ms")
  line = (f"| {report['date']} | {report['device']} | commit {args.commit} | profile_model (paper "
          f"config, {args.atoms} atoms, {impl.value}) | " + " | ".join(parts) + f" | {out.name} |")
  if args.results_md:
    with open(args.results_md, "a") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
