"""Is the JAX model faster and leaner than PyTorch? Energy + forces and a training step of the
paper configuration, JAX/Pallas against our PyTorch baseline, same weights, same structures, same
precision (float32 storage, but for the bf16 and auto variants; ``--precision`` picks TF32 or full
float32 products for both). ``--direct-impls`` also times energy + the direct force head's forces
(one forward pass; the model's stage-1 output) for those JAX implementations.

Implementations (``--impls``; see benchmarks/model_run.py):
  jax-pallas          node-centric message, fused Pallas attention kernels, float32
  jax-pallas-remat    the same, each block and radial MLP rematerialised in the backward pass
  jax-pallas-chunks   jax-pallas with the radial MLPs in chunks of 4096 atoms (no [N, K, hidden]
                      activation stored; E2FormerConfig.edge_chunk_atoms)
  jax-pallas-chunks-remat  chunks and rematerialised blocks
  jax-pallas-auto     the model's defaults on a GPU: memory chosen per structure from its size and the
                      free GPU memory (auto_memory), mixed precision (precision AUTO), the fused
                      radial MLP kernel where nothing differentiates it (radial_impl AUTO)
  jax-pallas-auto-xla-radial  the same with XLA's radial MLPs everywhere (radial_impl XLA)
  jax-pallas-auto-radial-vjp  the same with the radial MLPs' backward kernel for forces
                      (radial_vjp_kernel)
  jax-pallas-bf16     jax-pallas in mixed precision (bfloat16 products and storage; Precision.MIXED)
  jax-pallas-bf16-chunks  mixed precision with the radial MLPs in chunks
  jax-pallas-bf16-chunks-remat  mixed precision with chunks and rematerialised blocks
  jax-xla             node-centric message, the kernels' jnp references under XLA
  jax-per-edge        materialised per-edge message in JAX
  torch-edge          PyTorch eager, materialised per-edge message (benchmarks/torch_baseline)
  torch-node          PyTorch eager, node-centric message with plain gathers
  torch-compile-edge  torch.compile of torch-edge
  torch-compile-node  torch.compile of torch-node

Structures (``--structures``): '10000' is one cluster of 10000 atoms, '64x30' a batch of 64
clusters of 30 atoms (benchmarks/structures.py: O and H at water density, K = 32 nearest within
4.5 A). Every (implementation, structure) runs in a fresh process; once an implementation runs out
of memory, its larger structures are skipped. ``--fit IMPLS`` then searches the largest single
cluster each of IMPLS fits with energy + forces: doubling from the largest that ran, then
geometric bisection down to ``--fit-resolution``.

Records go to benchmarks/results/compare_torch.json and RESULTS.md (benchmarks/report.py), and
benchmarks/results/compare_torch.png plots time and memory against atoms from every record.

Usage:
  python -m benchmarks.compare_torch [--impls jax-pallas,torch-node,torch-edge,torch-compile-node]
      [--structures 1000,10000,64x30] [--train-impls jax-pallas,torch-node,torch-edge]
      [--direct-impls jax-pallas-auto] [--fit jax-pallas-remat,torch-node]
  python -m benchmarks.compare_torch --smoke    # the smallest configuration on the CPU
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import measure, model_run, report
from benchmarks.structures import Batch

BENCHMARK = "compare_torch"
DEFAULT_IMPLS = "jax-pallas,torch-node,torch-edge,torch-compile-node"
DEFAULT_TRAIN_IMPLS = "jax-pallas,torch-node,torch-edge"
# The dry run: the jax-xla path and, where PyTorch is installed, torch-node.
SMOKE = dict(config="smoke", device="cpu", structures="2x12", repeats=2, train_repeats=1,
             impls="jax-xla" + (",torch-node" if importlib.util.find_spec("torch") else ""),
             train_impls="jax-xla,torch-node", direct_impls="jax-xla", fit="")
# The fit search starts here when the structures gave no size that ran.
FIT_START = {"jax": 100_000, "torch": 10_000}


def measure_case(args, params_path: Path, impl: str, structure: str, *, train: bool,
                 probe: bool, direct: bool = False) -> dict:
  """One implementation on one structure, in a fresh process."""
  spec = dict(impl=impl, structure=structure, config=args.config, device=args.device,
              precision=args.precision, train=train, direct=direct, probe=probe,
              repeats=args.repeats,
              train_repeats=args.train_repeats, time_limit_s=args.repeat_time_s,
              params_path=str(params_path))
  # The parent initialised the weights on the CPU; JAX workers get the accelerator back, torch
  # workers leave it to torch (JAX there only supplies tables).
  jax_on_cpu = impl in model_run.TORCH_IMPLS or args.device == "cpu"
  env = {"JAX_PLATFORMS": "cpu" if jax_on_cpu else args.jax_platforms}
  if impl in model_run.TORCH_IMPLS:
    # PyTorch's advice against fragmentation near the memory limit: its best chance to fit.
    env["PYTORCH_CUDA_ALLOC_CONF"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                    "expandable_segments:True")
  batch = Batch.parse(structure)
  result = measure.run_worker("benchmarks.compare_torch", spec, args.worker_timeout_s, env)
  return {"impl": impl, "structure": batch.name, "atoms": batch.atoms,
          "molecules": batch.molecules, **result}


def status(data: dict) -> str:
  """ok, oom, error or timeout: the first failure of the run or its phases."""
  for entry in (data, data.get("direct", {}), data.get("ef", {}), data.get("train", {})):
    if entry.get("status", "ok") != "ok":
      return entry["status"]
  return "ok"


def result_line(data: dict) -> str:
  parts = []
  for phase, label in (("direct", "E+direct F"), ("ef", "E+F"), ("train", "train step")):
    entry = data.get(phase)
    if entry is None:
      continue
    if entry.get("status") != "ok" or entry.get("ms") is None:
      parts.append(f"{label} {entry.get('status', 'not run')}")
      continue
    text = f"{label} {entry['ms']:.4g} ms"
    if entry.get("peak_bytes"):
      text += f", {entry['peak_bytes'] / 1e9:.2f} GB"
    parts.append(text)
  if "auto_memory" in data:  # what the plan chose
    chosen = data["auto_memory"]
    parts.append("plan: " + ("+".join(name for name, on in (("chunks", chosen["edge_chunk_atoms"]),
                                                            ("remat", chosen["remat"])) if on)
                             or "every activation kept"))
  return "; ".join(parts) or status(data)


def fit(args, params_path: Path, impl: str, runs: list[dict]) -> dict:
  """Largest single cluster with energy + forces: doubling, then bisection to --fit-resolution.

  Starts from this run's single-cluster results; a probe that fails bounds the search from
  above, one cut short by the time budget ends it.
  """
  known = [(r["atoms"], status(r)) for r in runs if r["impl"] == impl and r["molecules"] == 1]
  largest = max((a for a, s in known if s == "ok"), default=0)
  failed = min((a for a, s in known if s in ("oom", "error") and a > largest), default=None)
  size = 2 * largest if largest else FIT_START["jax" if impl in model_run.JAX_IMPLS else "torch"]
  probes, device = [], args.device
  while time.time() < args.deadline:
    if failed is not None:
      if not largest or failed / largest <= args.fit_resolution:
        break
      size = math.isqrt(largest * failed)
    if size > args.fit_max_atoms:
      break
    row = measure_case(args, params_path, impl, str(size), train=False, probe=True)
    device = row.get("device_name", device)
    probes.append({"atoms": size, "status": status(row),
                   "peak_bytes": row.get("ef", {}).get("peak_bytes")})
    print(f"fit {impl} {size}: {status(row)}", flush=True)
    if status(row) == "ok":
      largest, size = size, 2 * size
    elif status(row) in ("oom", "error"):
      failed = size
    else:  # the budget, not the memory, ended the search
      break
  return {"impl": impl, "largest_ok": largest or None, "smallest_failed": failed, "probes": probes,
          "device_name": device}


def plot(records: list[report.Record], path: Path) -> None:
  """Time and peak memory against atoms, per implementation, from every run record."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [r.data for r in records if "ef" in r.data]
  impls = sorted({d["impl"] for d in runs}, key=lambda i: (not i.startswith("jax"), i))
  fig, (ax_time, ax_memory) = plt.subplots(1, 2, figsize=(12, 4.8))
  for i, impl in enumerate(impls):
    rows = sorted((d for d in runs if d["impl"] == impl), key=lambda d: d["atoms"])
    for phase, style in (("ef", "-"), ("train", "--")):
      for ax, key, scale in ((ax_time, "ms", 1.0), (ax_memory, "peak_bytes", 1e-9)):
        for batch in (False, True):
          points = [(d["atoms"], d[phase][key] * scale) for d in rows
                    if (d["molecules"] > 1) == batch and d.get(phase, {}).get(key) is not None]
          if not points:
            continue
          xs, ys = zip(*points)
          label = f"{impl}, {'energy+forces' if phase == 'ef' else 'train step'}"
          label = None if batch and any(d["molecules"] == 1 for d in rows) else label
          ax.plot(xs, ys, "none" if batch else style, marker="s" if batch else "o", color=f"C{i}",
                  mfc="none" if batch else None, label=label)
  for ax, ylabel in ((ax_time, "time per call (ms)"), (ax_memory, "peak device memory (GB)")):
    ax.set(xscale="log", yscale="log", xlabel="atoms", ylabel=ylabel)
    ax.grid(True, which="both", alpha=0.3)
  if impls:
    ax_time.legend(fontsize=7)
  fig.suptitle("E2Former-V2 energy + forces (solid) and training step (dashed), float32; open "
               "squares: batches of molecules. Latest record per case: device and commit in "
               "benchmarks/RESULTS.md", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
  """The command line (every option; documented commands are checked against it)."""
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--impls", default=DEFAULT_IMPLS)
  parser.add_argument("--structures", default="1000,10000,64x30",
                      help="single clusters (ATOMS) and batches (MOLECULESxATOMS), in this order")
  parser.add_argument("--train-impls", default=DEFAULT_TRAIN_IMPLS,
                      help="implementations that also time a training step")
  parser.add_argument("--direct-impls", default="",
                      help="JAX implementations that also time energy + the direct head's forces")
  parser.add_argument("--fit", default="", help="implementations whose largest structure to search")
  parser.add_argument("--fit-resolution", type=float, default=1.25,
                      help="stop bisecting when smallest failure / largest success <= this")
  parser.add_argument("--fit-max-atoms", type=int, default=3_200_000)
  parser.add_argument("--config", default="paper", choices=model_run.CONFIG_NAMES)
  parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
  parser.add_argument("--precision", default="tf32", choices=("tf32", "float32"),
                      help="matrix products of both frameworks (storage is float32 either way)")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--train-repeats", type=int, default=3)
  parser.add_argument("--repeat-time-s", type=float, default=10.0,
                      help="stop timing the repeats of one phase after this long")
  parser.add_argument("--worker-timeout-s", type=float, default=600.0)
  parser.add_argument("--budget-s", type=float, default=float("inf"),
                      help="start no run after this many seconds")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return parser


def main(argv=None) -> list[report.Record]:
  parser = build_parser()
  args = report.parse(parser, argv)
  if args.worker:
    measure.worker_main(model_run.run, args.worker)
    return []
  impls, train_impls = args.impls.split(","), set(args.train_impls.split(","))
  direct_impls = set(args.direct_impls.split(",")) - {""}
  if direct_impls - set(model_run.JAX_IMPLS):
    parser.error(f"--direct-impls: JAX implementations only, not "
                 f"{sorted(direct_impls - set(model_run.JAX_IMPLS))}")
  unknown = set(impls + args.fit.split(",")) - set(model_run.JAX_IMPLS) - set(model_run.TORCH_IMPLS)
  if unknown - {""}:
    parser.error(f"unknown implementations {sorted(unknown - {''})}")
  structures = [s for s in args.structures.split(",") if s]
  for s in structures:
    Batch.parse(s)  # a malformed structure fails here, not in a worker
  args.deadline = time.time() + args.budget_s
  # The weights are made here on the CPU; the accelerator belongs to one worker at a time.
  args.jax_platforms = os.environ.get("JAX_PLATFORMS")
  os.environ["JAX_PLATFORMS"] = "cpu"
  commit = args.commit or report.git_commit()

  suffix = "" if args.config == "paper" else f" ({args.config} configuration)"
  runs, records = [], []
  with tempfile.TemporaryDirectory(prefix="compare_torch_") as work:
    params_path = Path(work) / "params.npz"
    num_params = model_run.init_params(args.config, params_path)
    print(f"{args.config} configuration: {num_params} parameters", flush=True)
    out_of_memory_at: dict[str, int] = {}
    for structure in structures:
      atoms = Batch.parse(structure).atoms
      for impl in impls:
        if time.time() > args.deadline:
          print(f"skipped {impl} {structure}: time budget", flush=True)
          continue
        if out_of_memory_at.get(impl, math.inf) < atoms:
          print(f"skipped {impl} {structure}: out of memory at {out_of_memory_at[impl]} atoms")
          continue
        data = measure_case(args, params_path, impl, structure, train=impl in train_impls,
                            probe=False, direct=impl in direct_impls)
        if status(data) == "oom":
          out_of_memory_at[impl] = min(out_of_memory_at.get(impl, atoms), atoms)
        runs.append(data)
        records.append(report.Record(f"{impl} {data['structure']}{suffix}", result_line(data),
                                     data.get("device_name", args.device), commit, report.today(),
                                     {"num_params": num_params, **data}))
        print(f"{records[-1].case}: {records[-1].result}", flush=True)
    for impl in (i for i in args.fit.split(",") if i):
      found = fit(args, params_path, impl, runs)
      line = (f"largest that ran: {found['largest_ok'] or 'none'} atoms; smallest that failed: "
              f"{found['smallest_failed'] or 'none'}")
      records.append(report.Record(f"{impl} largest single structure{suffix}", line,
                                   found["device_name"], commit, report.today(), found))
      print(f"{records[-1].case}: {line}", flush=True)
  directory = report.results_dir(args)
  path = report.record(BENCHMARK, records, directory)
  plot(report.load(BENCHMARK, directory), path.with_suffix(".png"))
  print("recorded in", path, flush=True)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
