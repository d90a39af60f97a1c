"""Static SASS statistics of the fused attention kernels, without a GPU.

Lowers message_attention's forward and backward (paper configuration) for an abstract H100 on the
CPU, takes the Triton IR that Pallas emits for each kernel, compiles it for sm_90 with upstream
Triton and its bundled ptxas, and reports per kernel: registers per thread, spill bytes, and the
SASS instruction counts by opcode (the whole kernel, static, not executed counts) and the length of
each loop (instructions from a backward branch's target to the branch: one slot step). It answers
before any device time is spent: does a change spill, how many warps fit per SM, which FP
instructions it emits (FFMA or FMUL + FADD), where loads sit relative to arithmetic (``--sass``).

Caveat: XLA compiles the same Triton IR with its own Triton pipeline, which can differ from
upstream's in passes and LLVM version; treat the numbers as close estimates, and time on the GPU.

Needs upstream Triton besides jax (``pip install triton==3.9.0``; not a project dependency):
  COMMIT=$(git rev-parse --short HEAD) python benchmarks/sass_stats.py [--blocks h,k,n,warps,stages]
      [--backward-blocks h,k,n,warps,stages,h,k,n,warps,stages] [--dtype bfloat16] [--fp-fusion]
      [--sass DIR] [--out results.json]
(--out also appends a line to benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.pallas.triton import pallas_call_registration  # noqa: E402
from jax.sharding import AbstractDevice, AbstractMesh, AxisType, use_abstract_mesh  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from e2former_jax import so3  # noqa: E402

# Paper configuration (spec sections 6, 8); the number of atoms only sets the grid, not the code.
NUM_ATOMS = 96
NUM_SLOTS = 32
NUM_HEADS = 128
HEAD_DIM = 8
GROUPS = 2  # C / H channel groups of message_attention's value rows
COUPLING = so3.first_order_coupling(2)  # lmax = 2
SM90 = 90
WARP_SIZE = 32
# A SASS line: address, optional predicate, opcode with its modifiers, operands.
_SASS_LINE = re.compile(
    r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Z0-9_]+)*)\s*([^;]*)")
# Memory opcodes keep their width modifier (LDG.E.128 against LDG.E.64 tells the vector width).
_KEEP_MODIFIERS = ("LDG", "STG", "LDS", "STS")


def capture_kernels(block_sizes, backward_block_sizes, dtype) -> list[dict]:
  """Every pallas_call of one message_attention forward and gradient: name, warps, stages, IR."""
  kernels = []
  lower = pallas_call_registration.lowering.lower_jaxpr_to_triton_module
  custom_call = pallas_call_registration.mlir.custom_call

  def capture_ir(*args, **kwargs):
    result = lower(*args, **kwargs)
    kernels.append({"ir": result.module.operation.get_asm(enable_debug_info=False)})
    return result

  def capture_config(*args, backend_config, **kwargs):
    kernels[-1].update(name=backend_config["name"].value,
                       num_warps=int(backend_config["num_warps"].value),
                       num_stages=int(backend_config["num_stages"].value))
    return custom_call(*args, backend_config=backend_config, **kwargs)

  s = jax.ShapeDtypeStruct
  n, k, h, d = NUM_ATOMS, NUM_SLOTS, NUM_HEADS, HEAD_DIM
  specs = (s((n, d, h), dtype), s((n, d, h), dtype), s((n, k, h), dtype), s((n, k, h), dtype),
           s((n, k), dtype), s((n, k, 3), dtype), s((n, COUPLING.shape[1] * GROUPS, h), dtype),
           s((n, k), jnp.int32), s((n, k), jnp.bool_))

  def forward(*args):
    return pk.message_attention(*args, coupling=COUPLING, scale=d ** -0.5,
                                block_sizes=block_sizes,
                                backward_block_sizes=backward_block_sizes)

  def gradient(*args):
    *xs, idx, mask = args
    loss = lambda *ys: jnp.sum(forward(*ys, idx, mask).astype(jnp.float32) ** 2)  # noqa: E731
    return jax.grad(loss, argnums=tuple(range(len(xs))))(*xs)

  device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), (AxisType.Explicit,), abstract_device=device)
  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture_ir
  pallas_call_registration.mlir.custom_call = capture_config
  try:
    with use_abstract_mesh(mesh):
      for fn, label in ((forward, "primal"), (gradient, "differentiated")):
        first = len(kernels)
        jax.jit(fn).trace(*specs).lower(lowering_platforms=("cuda",))
        for kernel in kernels[first:]:
          kernel["call"] = label
  finally:
    pallas_call_registration.lowering.lower_jaxpr_to_triton_module = lower
    pallas_call_registration.mlir.custom_call = custom_call
  return kernels


def compile_kernel(kernel: dict, fp_fusion: bool, sass_dir: Path | None) -> dict:
  """Compiles one kernel's Triton IR for sm_90; registers, spills and SASS opcode counts."""
  import triton  # upstream Triton, only for this analysis
  from triton.backends.compiler import GPUTarget

  work = Path(tempfile.mkdtemp())
  source = work / f"{kernel['name']}.ttir"
  source.write_text(kernel["ir"])
  compiled = triton.compile(str(source), target=GPUTarget("cuda", SM90, WARP_SIZE), options=dict(
      num_warps=kernel["num_warps"], num_stages=kernel["num_stages"], enable_fp_fusion=fp_fusion))
  (work / "k.ptx").write_text(compiled.asm["ptx"])
  tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
  # The newest bundled ptxas: the PTX that Triton emits may be newer than the older one accepts.
  ptxas = next(p for p in (tools / "ptxas-blackwell", tools / "ptxas") if p.exists())
  report = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(work / "k.ptx"), "-o",
                           str(work / "k.cubin")], capture_output=True, text=True, check=True).stderr
  sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(work / "k.cubin")],
                        capture_output=True, text=True, check=True).stdout
  instructions = [match.groups() for match in map(_SASS_LINE.match, sass.splitlines()) if match]
  opcodes = collections.Counter(
      opcode + (modifiers if opcode in _KEEP_MODIFIERS else "")
      for _, opcode, modifiers, _ in instructions)
  addresses = [int(address, 16) for address, *_ in instructions]
  loops = []  # instructions per loop body, from a backward branch's target to the branch
  for address, (_, opcode, _, operands) in zip(addresses, instructions):
    target = re.search(r"0x([0-9a-f]+)", operands) if opcode == "BRA" else None
    if target and int(target.group(1), 16) < address:
      loops.append(sum(int(target.group(1), 16) <= a <= address for a in addresses))
  if sass_dir is not None:
    sass_dir.mkdir(parents=True, exist_ok=True)
    (sass_dir / f"{kernel['call']}_{kernel['name']}.sass").write_text(sass)

  def number(pattern):
    match = re.search(pattern, report)
    return int(match.group(1)) if match else None

  return dict(name=kernel["name"], call=kernel["call"], num_warps=kernel["num_warps"],
              num_stages=kernel["num_stages"], registers=number(r"Used (\d+) registers"),
              spill_store_bytes=number(r"(\d+) bytes spill stores"),
              spill_load_bytes=number(r"(\d+) bytes spill loads"),
              instructions=len(instructions), loop_instructions=loops,
              opcodes=dict(opcodes.most_common()))


def _tilings(text: str) -> list:
  """'h,k,n,warps,stages[,h,k,n,warps,stages...]' -> BlockSizes, one per five numbers."""
  numbers = [int(v) for v in text.split(",")]
  if len(numbers) % 5:
    raise SystemExit(f"a tiling is five numbers h,k,n,warps,stages; got {text!r}")
  return [pk.BlockSizes(block_h=h, block_k=k, block_n=n, num_warps=w, num_stages=st)
          for h, k, n, w, st in zip(*[iter(numbers)] * 5)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--blocks", help="message_attention forward tiling h,k,n,warps,stages")
  parser.add_argument("--backward-blocks",
                      help="fused backward tilings, target side then source side: 10 numbers")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                      help="dtype of every float input")
  parser.add_argument("--fp-fusion", action="store_true",
                      help="let LLVM contract multiply-adds (as XLA_FLAGS=--xla_backend_extra_"
                           "options=-nvptx-fma-level=1 does); off matches XLA's default")
  parser.add_argument("--sass", type=Path, help="directory for each kernel's full SASS listing")
  parser.add_argument("--out", type=Path, help="JSON with every kernel's statistics")
  parser.add_argument("--results-md", type=Path, default=REPO / "benchmarks" / "RESULTS.md",
                      help="appends one summary line (with --out)")
  args = parser.parse_args()
  block_sizes = _tilings(args.blocks)[0] if args.blocks else None
  backward_block_sizes = (tuple(_tilings(args.backward_blocks)) if args.backward_blocks
                          else None)
  rows = [compile_kernel(kernel, args.fp_fusion, args.sass)
          for kernel in capture_kernels(block_sizes, backward_block_sizes, jnp.dtype(args.dtype))]
  for row in rows:
    top = " ".join(f"{op}:{count}" for op, count in list(row["opcodes"].items())[:12])
    print(f"{row['call']:>14} {row['name']:<32} warps={row['num_warps']} regs={row['registers']} "
          f"spill={row['spill_store_bytes']}/{row['spill_load_bytes']} B "
          f"instructions={row['instructions']} loops={row['loop_instructions']}  {top}")
  if args.out:
    report = dict(commit=os.environ.get("COMMIT"), blocks=args.blocks,
                  backward_blocks=args.backward_blocks, dtype=args.dtype,
                  fp_fusion=args.fp_fusion,
                  triton=__import__("triton").__version__, jax=jax.__version__, kernels=rows)
    args.out.write_text(json.dumps(report, indent=1))
    summary = "; ".join(f"{row['call']} {row['name']}: {row['registers']} regs, "
                        f"{row['instructions']} instructions" for row in rows)
    with open(args.results_md, "a") as f:
      f.write(f"| {datetime.date.today()} | none (CPU: Triton {report['triton']} -> sm_90 SASS) | "
              f"commit {report['commit']} | sass_stats (message_attention, paper configuration, "
              f"{args.dtype}, "
              f"blocks {args.blocks or 'default'}, fp fusion {'on' if args.fp_fusion else 'off'}) | "
              f"{summary} | {args.out.name} |\n")


if __name__ == "__main__":
  main()
