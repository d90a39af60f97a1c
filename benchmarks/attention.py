"""How fast are the fused attention kernels, and how much memory do they hold, against the
materialised per-edge message? At the paper's sizes: H = 128 heads of d = 8, C = 256 channels,
lmax = 2, K = 32 slots (docs/model.md §8; the kernels' contract is §11).

Implementations (``--impls``):

* ``message_attention``: ``pallas_kernels.message_attention``, the model's kernel: the message
  sum_k a_ik T(v_j, r_ij) ([N, 20, C]) gathering only the 9 rows of v_j per edge.
* ``per_edge_message``: the same message with T(v_j, r_ij) formed on every edge ([N, K, 20, C])
  and summed, compiled by XLA (the standard way; the baseline).

Per (implementation, size, dtype), in a fresh process (peak memory is per case): the forward and
the forward + backward (gradient of sum(out^2) with respect to every float input), median time
after warm-up, peak device memory, XLA's temp buffer, and for the kernels the fraction of the HBM
floor (every input read once and the output written once) that the forward reaches. Atoms are
uniform at random in a cube at 0.1 atoms/A^3, Morton ordered, K nearest within 4.5 A.

Modes:
  python -m benchmarks.attention [--sizes 1000,10000,100000] [--dtypes float32,bfloat16]
      [--impls ...] [--blocks h,k,n,warps,stages] [--backward-blocks 'h,k,n,w,s;h,k,n,w,s']
  python -m benchmarks.attention --once --sizes 100000 --impls message_attention
      # each case compiled and run once in this process, to run under a profiler (ncu, nsys)
  python -m benchmarks.attention --smoke    # tiny sizes on the CPU (Pallas interpreter)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

# The parent process only plans and records; workers take the device memory (see measure.py).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402
from benchmarks import measure, report, structures  # noqa: E402
from e2former_jax import so3  # noqa: E402
from e2former_jax.nn.radial import envelope  # noqa: E402
from e2former_jax.ops.attention import SOFTMAX_SINK  # noqa: E402

BENCHMARK = "attention"
IMPLS = ("message_attention", "per_edge_message")
CUTOFF = 4.5  # angstrom, the paper configuration's
LMAX = 2
# HBM bandwidth by device name (datasheets), for the roofline fraction of the kernels' forward.
HBM_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}
# A timed sample batches calls up to this long, so that sub-millisecond kernels time accurately.
MIN_SAMPLE_S = 0.01
REPEATS = 9


@dataclasses.dataclass(frozen=True)
class Dims:
  """The attention's sizes: heads, head width, channels, neighbour slots."""

  heads: int
  head_dim: int
  channels: int
  slots: int

  @property
  def groups(self) -> int:
    """Channel groups G = C / H: channel c = g H + h belongs to head h."""
    return self.channels // self.heads


PAPER = Dims(heads=128, head_dim=8, channels=256, slots=32)
SMOKE_DIMS = Dims(heads=4, head_dim=4, channels=8, slots=8)
# The dry run: SMOKE_DIMS, a few dozen atoms, the Pallas interpreter.
SMOKE = dict(sizes="48", dtypes="float32", repeats=2, interpret=True)


# ------------------------------------------------------------------------------ inputs and functions


def make_inputs(dims: Dims, num_atoms: int, dtype, seed: int = 0
                ) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, jax.Array]]:
  """(float inputs, (nbr_idx, nbr_mask)) of one case on the device: the per-edge scalars, then
  the edge vectors and node features v [N, 9, C]."""
  positions = structures.random_box(num_atoms, CUTOFF, seed)
  idx, mask, dist = structures.neighbor_slots(positions, CUTOFF, dims.slots)
  rng = np.random.default_rng(seed + 1)
  n, k, h = num_atoms, dims.slots, dims.heads

  def array(x):
    return jnp.asarray(np.asarray(x, np.float32)).astype(dtype)

  xs = (array(rng.normal(size=(n, dims.head_dim, h))),  # q
        array(rng.normal(size=(n, dims.head_dim, h))),  # k
        array(rng.normal(size=(n, k, h))),  # gate
        array(0.3 * rng.normal(size=(n, k, h))),  # post_weight
        array(np.where(mask, envelope(dist, CUTOFF), 0.0)))  # envelope
  sources = positions[np.minimum(idx, n - 1)]
  xs += (array(np.where(mask[..., None], positions[:, None] - sources, 0.0)),  # r_ij [N, K, 3]
         array(rng.normal(size=(n, (LMAX + 1) ** 2, dims.channels))))  # v [N, S, C]
  return xs, (jnp.asarray(idx), jnp.asarray(mask))


def make_fn(impl: str, dims: Dims, blocks=None, backward_blocks=None, interpret: bool = False):
  """(float inputs..., nbr_idx, nbr_mask) -> the implementation's output."""
  options = dict(scale=dims.head_dim ** -0.5, sink=SOFTMAX_SINK)
  if impl == "message_attention":
    coupling = so3.first_order_coupling(LMAX)  # [R, S, 3]
    def fn(q, k, gate, post_weight, envelope, vectors, v, nbr_idx, nbr_mask):
      n, s, c = v.shape
      heads_last = v.reshape(n, s * dims.groups, dims.heads)  # channel c = g H + h: head h
      out = pk.message_attention(q, k, gate, post_weight, envelope, vectors, heads_last,
                                 nbr_idx, nbr_mask, coupling=coupling, block_sizes=blocks,
                                 backward_block_sizes=backward_blocks, interpret=interpret, **options)
      return out.reshape(n, -1, c)
  elif impl == "per_edge_message":
    def fn(q, k, gate, post_weight, envelope, vectors, v, nbr_idx, nbr_mask):
      valid = nbr_mask & (nbr_idx < k.shape[0])
      take = lambda x: jnp.take(x, nbr_idx, axis=0, mode="fill", fill_value=0)  # noqa: E731
      dots = jnp.einsum("ndh,nkdh->nkh", q, take(k), precision=jax.lax.Precision.HIGHEST)
      weights = pk.attention_weights(dots, gate, post_weight, envelope, valid, **options)
      per_edge = so3.tensor_product_vector(take(v), vectors)  # [N, K, R, C]
      weights_c = jnp.tile(weights, (1, 1, dims.groups)).astype(per_edge.dtype)  # head c % H
      return jnp.einsum("nkc,nkrc->nrc", weights_c, per_edge,
                        precision=jax.lax.Precision.HIGHEST).astype(v.dtype)
  else:
    raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
  return fn


def with_gradient(fn):
  """Gradients of sum(out^2) with respect to every float input."""
  def grads(*args):
    *xs, nbr_idx, nbr_mask = args
    def loss(*ys):
      return jnp.sum(fn(*ys, nbr_idx, nbr_mask).astype(jnp.float32) ** 2)
    return jax.grad(loss, argnums=range(len(xs)))(*xs)
  return grads


def hbm_floor_bytes(impl: str, dims: Dims, num_atoms: int, itemsize: int) -> int | None:
  """Bytes a kernel's forward must move at least: every input read once, the output written once."""
  n, h, d, edges = num_atoms, dims.heads, dims.head_dim, num_atoms * dims.slots
  index_bytes = edges * 5  # int32 index and bool mask per slot
  if impl == "message_attention":
    rows_in, rows_out, per_edge = (LMAX + 1) ** 2, 20, 2 * h + 4  # gate, post_weight; envelope, r
  else:
    return None
  channels = dims.channels
  return (2 * n * d * h + n * rows_in * channels + edges * per_edge + n * rows_out * channels
          ) * itemsize + index_bytes


# ----------------------------------------------------------------------------------- one case


def _blocks(text: str | None) -> tuple | None:
  """'h,k,n,warps,stages[;...]' -> BlockSizes, or a tuple of them for several groups."""
  if not text:
    return None
  groups = [pk.BlockSizes(*map(int, g.split(","))) for g in text.split(";")]
  return groups[0] if len(groups) == 1 else tuple(groups)


def measure_case(spec: dict) -> dict:
  """One (implementation, size, dtype) in this process: forward, then forward + backward."""
  dims = Dims(**spec["dims"])
  device = jax.devices()[0]
  xs, nbrs = make_inputs(dims, spec["atoms"], jnp.dtype(spec["dtype"]))
  fn = make_fn(spec["impl"], dims, _blocks(spec["blocks"]), _blocks(spec["backward_blocks"]),
               spec["interpret"])
  result = {"status": "ok", "edges": int(np.asarray(nbrs[1]).sum())}
  for phase, f in (("fwd", fn), ("fwd_bwd", with_gradient(fn))):
    try:
      compiled = jax.jit(f).lower(*xs, *nbrs).compile()
      timing = measure.time_calls(lambda: jax.block_until_ready(compiled(*xs, *nbrs)),
                                  repeats=spec["repeats"], min_sample_s=MIN_SAMPLE_S)
      result[phase] = {"ms": timing["ms"], "peak_bytes": measure.peak_bytes(device),
                       "xla_temp_bytes": measure.compiled_memory(compiled).get("temp")}
    except Exception as e:  # noqa: BLE001  (an out-of-memory backward keeps the forward's numbers)
      result[phase] = measure.failure(e)
      result["status"] = result[phase]["status"]
      break
  return result


def result_line(impl: str, dims: Dims, num_atoms: int, dtype: str, device: str, data: dict) -> str:
  """The RESULTS.md line of one case."""
  parts = []
  for phase, label in (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd")):
    if phase not in data:  # not measured: the forward failed
      continue
    entry = data[phase]
    if entry.get("ms") is None:
      parts.append(f"{label} {entry.get('status', data['status'])}")
      continue
    text = f"{label} {entry['ms']:.3g} ms"
    floor = hbm_floor_bytes(impl, dims, num_atoms, jnp.dtype(dtype).itemsize)
    bandwidth = next((b for name, b in HBM_BYTES_PER_S.items() if name in device), None)
    if phase == "fwd" and floor and bandwidth:
      text += f" ({floor / (entry['ms'] * 1e-3) / bandwidth:.0%} of the HBM floor)"
    if entry.get("peak_bytes"):
      text += f", peak {entry['peak_bytes'] / 1e9:.2f} GB"
    parts.append(text)
  return "; ".join(parts)


# --------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
  """The command line (every option; documented commands are checked against it)."""
  parser = report.script_parser(__doc__, SMOKE)
  parser.add_argument("--sizes", default="1000,10000,100000", help="atoms, comma separated")
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--blocks", default=None, help="forward tiling h,k,n,warps,stages of the kernels")
  parser.add_argument("--backward-blocks", default=None,
                      help="message_attention's fused backward tilings: target side;source side")
  parser.add_argument("--repeats", type=int, default=REPEATS)
  parser.add_argument("--budget-s", type=float, default=float("inf"),
                      help="start no case after this many seconds")
  parser.add_argument("--worker-timeout-s", type=float, default=300.0)
  parser.add_argument("--once", action="store_true", help="run each case once, for a profiler")
  parser.add_argument("--interpret", action="store_true",
                      help="Pallas interpreter (default where no GPU is present)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  return parser


def main(argv=None) -> list[report.Record]:
  parser = build_parser()
  args = report.parse(parser, argv)
  if args.worker:
    measure.worker_main(measure_case, args.worker)
    return []

  dims = SMOKE_DIMS if args.smoke else PAPER
  sizes = [int(s) for s in args.sizes.split(",") if s]
  impls = [i for i in args.impls.split(",") if i]
  unknown = set(impls) - set(IMPLS)
  if unknown:
    parser.error(f"unknown implementations {sorted(unknown)}; choose from {IMPLS}")
  device = jax.devices()[0]
  interpret = args.interpret or device.platform != "gpu"

  if args.once:
    for impl in impls:
      for size in sizes:
        for dtype in args.dtypes.split(","):
          xs, nbrs = make_inputs(dims, size, jnp.dtype(dtype))
          fn = make_fn(impl, dims, _blocks(args.blocks), _blocks(args.backward_blocks), interpret)
          for f in (fn, with_gradient(fn)):
            jax.block_until_ready(jax.jit(f)(*xs, *nbrs))
    return []

  commit = args.commit or report.git_commit()
  deadline = time.time() + args.budget_s
  records = []
  for size in sizes:
    for dtype in args.dtypes.split(","):
      for impl in impls:
        if time.time() > deadline:
          print(f"skipped {impl} {dtype} N={size}: time budget", flush=True)
          continue
        spec = dict(impl=impl, atoms=size, dtype=dtype, dims=dataclasses.asdict(dims),
                    blocks=args.blocks, backward_blocks=args.backward_blocks, interpret=interpret,
                    repeats=args.repeats)
        data = {**spec, **measure.run_worker("benchmarks.attention", spec, args.worker_timeout_s)}
        case = f"{impl} {dtype} N={size}" + "".join(
            f" {name} {value}" for name, value in (("blocks", args.blocks),
                                                   ("backward blocks", args.backward_blocks))
            if value) + (" (smoke sizes)" if args.smoke else "")
        line = result_line(impl, dims, size, dtype, report.device_name(device), data)
        print(f"{case}: {line}", flush=True)
        records.append(report.Record(case, line, report.device_name(device), commit, report.today(),
                                     data))
  path = report.record(BENCHMARK, records, report.results_dir(args))
  print("recorded in", path, flush=True)
  return records


if __name__ == "__main__":
  main(sys.argv[1:])
