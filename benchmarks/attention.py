"""GPU validation, tuning and benchmark of pallas_kernels.node_attention at the paper configuration.

Paper configuration (spec sections 6, 8): H = 128 heads, head dim D = 8, value rows X = 29 x C/H = 58
(C = 256), K = 32 neighbour slots. Atoms fill a random box at 0.1 atoms/A^3, sorted along a Morton
curve (as molecules keep their atoms together), with the K nearest neighbours inside 4.5 A.

Phases (``--phases``, comma separated, run in the given order while the time budget lasts):

* ``validate``: the compiled kernels against the float32 jnp reference at the paper sizes (forward,
  backward, double backward; float32 and bf16 error budget), bitwise determinism of the backward.
* ``tune_fwd``: a sweep of forward-kernel tilings at the largest size (the fastest is used by
  ``bench`` unless ``--blocks`` is given).
* ``bench``: forward and forward+backward time (median), bytes moved against the HBM roofline,
  and peak GPU memory, for the kernel, (a) the jnp reference under XLA, (b) the per-edge model path
  that materialises the per-edge messages [T(v_j, r_ij); v_j], and the node-centric pipeline that
  replaces (b) with node-level tensor products around the kernel. For the model's message alone
  (sum_k a T(v_j, r_ij), 20 rows): ``message`` (pallas_kernels.message_attention, 9 rows of v
  gathered per edge), ``per_edge_message`` ((b) for that message) and ``pipeline_message`` (the
  node-centric pipeline's T rows). Every (size, implementation) runs in a fresh subprocess so that
  peak memory is per configuration; out-of-memory is recorded.
* ``tune_msg``: a sweep of message_attention's forward tilings at the largest size.
* ``tune_msg_bwd``: a sweep of message_attention's fused-backward tilings (forward + backward time,
  default forward tiling) at the largest size.
* ``pytest``: the compiled (GPU) variants of every test in tests/pallas_kernels.
* ``tune_bwd``: a sweep of the backward primitives' tilings at the largest size.
* ``profile``: one forward and one forward+backward call at the largest size (``--blocks`` or the
  default tiling) of node_attention, or of message_attention when ``--impls`` names ``message``
  first, each compiled and run once, for a profiler wrapped around this script
  (``benchmarks/profile_attention.sh``).

Writes JSON to ``--out`` and appends one line to ``--results-md``.

Usage: python benchmarks/attention.py [--phases ...] [--sizes 1000,10000,100000] [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The parent process only validates at small sizes; without this it would hold XLA's default 75 %
# of the GPU memory and starve the bench and pytest subprocesses (seen: out of memory at 100k).
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import pallas_kernels as pk  # noqa: E402

NUM_HEADS = 128
HEAD_DIM = 8
CHANNELS = 256
NUM_ROWS = 29  # 20 tensor-product rows + 9 rows of v (lmax = 2)
ROW_DIM = NUM_ROWS * CHANNELS // NUM_HEADS  # 58
NUM_SLOTS = 32
DENSITY = 0.1  # atoms per cubic angstrom (condensed organic matter)
CUTOFF = 4.5  # angstrom
SCALE = HEAD_DIM ** -0.5
SINK = 1e-3
HBM_BYTES_PER_S = 3.35e12  # H100 SXM datasheet
FP32_FLOPS_PER_S = 67e12  # H100 SXM datasheet, non-tensor FP32
IMPLS = ("pallas", "reference", "per_edge", "pipeline", "message", "per_edge_message",
         "pipeline_message")
NUM_TP_ROWS = 20  # rows of T(v, r) for lmax = 2: the attention message the model needs
NUM_V_ROWS = 9 * CHANNELS // NUM_HEADS  # message_attention's 18 head-last rows of v (lmax = 2)
# Set by --interpret: runs the kernels in the Pallas interpreter, to dry-run this script on a CPU.
INTERPRET = False
NUM_INPUTS = 6


# ------------------------------------------------------------------------------------ inputs


def _morton_order(positions: np.ndarray, cell: float) -> np.ndarray:
  """Atom order along a Morton (Z) curve of cells of side ``cell``."""
  cells = np.floor((positions - positions.min(0)) / cell).astype(np.int64)
  code = np.zeros(len(positions), np.int64)
  for bit in range(16):
    for axis in range(3):
      code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
  return np.argsort(code, kind="stable")


def make_system(num_atoms: int, seed: int = 0):
  """Positions [N, 3] (Morton sorted) and the K-nearest neighbour list within the cutoff."""
  from scipy.spatial import cKDTree  # benchmark-only dependency, present on both machines

  rng = np.random.default_rng(seed)
  side = (num_atoms / DENSITY) ** (1 / 3)
  positions = rng.uniform(0, side, (num_atoms, 3))
  positions = positions[_morton_order(positions, CUTOFF)]
  dist, idx = cKDTree(positions).query(positions, k=NUM_SLOTS + 1, distance_upper_bound=CUTOFF)
  dist, idx = dist[:, 1:], idx[:, 1:]  # drop self
  mask = idx < num_atoms  # cKDTree marks missing neighbours with index N: our sentinel
  return positions.astype(np.float32), idx.astype(np.int32), mask, np.where(mask, dist, CUTOFF)


def make_inputs(num_atoms: int, dtype, *, op: bool = True, model: bool = False, seed: int = 0):
  """Arrays on device: the op's (random value rows) and/or the model's (v and positions)."""
  positions, idx, mask, dist = make_system(num_atoms, seed)
  rng = np.random.default_rng(seed + 1)
  n = num_atoms

  def normal(*shape, scale=1.0):
    return jnp.asarray((scale * rng.normal(size=shape)).astype(np.float32)).astype(dtype)

  envelope = np.where(mask, 0.5 * (np.cos(np.pi * dist / CUTOFF) + 1), 0).astype(np.float32)
  inputs = dict(
      q=normal(n, HEAD_DIM, NUM_HEADS), k=normal(n, HEAD_DIM, NUM_HEADS),
      gate=normal(n, NUM_SLOTS, NUM_HEADS), post_weight=normal(n, NUM_SLOTS, NUM_HEADS, scale=0.3),
      envelope=jnp.asarray(envelope).astype(dtype),
      nbr_idx=jnp.asarray(idx), nbr_mask=jnp.asarray(mask),
  )
  if op:
    inputs["values"] = normal(n, ROW_DIM, NUM_HEADS)
  if model:
    inputs["v9"] = normal(n, 9, CHANNELS)
    # Centred coordinates: T(v_j, x_j) grows with |x|, and the pipeline's difference of two such
    # terms loses precision far from the origin.
    inputs["positions"] = jnp.asarray(positions - positions.mean(0)).astype(dtype)
  return inputs


def _to_heads(rows: jax.Array) -> jax.Array:
  """[..., R, C] -> [..., R * C/H, H]: channel c = g*H + h goes to head h (spec section 6.5)."""
  *lead, r, c = rows.shape
  return rows.reshape(*lead, r * (c // NUM_HEADS), NUM_HEADS)


def node_values(v9: jax.Array, positions: jax.Array) -> jax.Array:
  """S_j = [T(v_j, x_j); v_j] in head-last layout: [M, 9, C] -> [M, 58, 128]."""
  from e2former_jax.so3 import tensor_product_vector

  return _to_heads(jnp.concatenate([tensor_product_vector(v9, positions), v9], axis=-2))


# ---------------------------------------------------------------------------- implementations


def op_args(inputs):
  return tuple(inputs[name] for name in ("q", "k", "gate", "post_weight", "envelope", "values"))


def make_op(impl: str, block_sizes: pk.BlockSizes | None):
  """The attention op alone: (q, k, gate, post_weight, envelope, values, idx, mask) -> [N, X, H]."""
  if impl == "pallas":
    return lambda *a: pk.node_attention(*a, scale=SCALE, sink=SINK, block_sizes=block_sizes,
                                         interpret=INTERPRET)
  return lambda *a: pk.node_attention_reference(*a, scale=SCALE, sink=SINK)


def _per_edge_weights(q, k, gate, post_weight, envelope, positions, nbr_idx, nbr_mask):
  """(weights [N, K, H], gather of source rows, edge vectors x_i - x_j [N, K, 3]) per edge."""
  num_sources = positions.shape[0]
  valid = nbr_mask & (nbr_idx < num_sources)
  safe = jnp.where(valid, nbr_idx, num_sources)
  take = lambda x: jnp.take(x, safe, axis=0, mode="fill", fill_value=0)  # noqa: E731
  dots = jnp.einsum("ndh,nkdh->nkh", q, take(k), precision=jax.lax.Precision.HIGHEST)
  weights = pk.attention_weights(dots, gate, post_weight, envelope, valid, scale=SCALE, sink=SINK)
  return weights, take, _edge_vectors(positions, nbr_idx, nbr_mask)


def per_edge_model(q, k, gate, post_weight, envelope, v9, positions, nbr_idx, nbr_mask):
  """The standard per-edge path: messages [T(v_j, x_i - x_j); v_j] per edge, weighted and summed.

  Returns [N, 29, C]: rows 0..19 are sum_k a T(v_j, r_ij), rows 20..28 sum_k a v_j.
  """
  from e2former_jax.so3 import tensor_product_vector

  weights, take, r_edge = _per_edge_weights(q, k, gate, post_weight, envelope, positions, nbr_idx,
                                            nbr_mask)
  v_edge = take(v9)  # [N, K, 9, C]
  messages = jnp.concatenate([tensor_product_vector(v_edge, r_edge), v_edge], axis=-2)
  messages = _to_heads(messages)  # [N, K, 58, H]
  out = jnp.einsum("nkh,nkxh->nxh", weights.astype(messages.dtype), messages,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(out.shape[0], NUM_ROWS, CHANNELS).astype(v9.dtype)


def per_edge_message(q, k, gate, post_weight, envelope, v9, positions, nbr_idx, nbr_mask):
  """(b) for the model's message alone: sum_k a T(v_j, x_i - x_j) per edge, [N, 20, C]."""
  from e2former_jax.so3 import tensor_product_vector

  weights, take, r_edge = _per_edge_weights(q, k, gate, post_weight, envelope, positions, nbr_idx,
                                            nbr_mask)
  messages = _to_heads(tensor_product_vector(take(v9), r_edge))  # [N, K, 40, H]
  out = jnp.einsum("nkh,nkxh->nxh", weights.astype(messages.dtype), messages,
                   precision=jax.lax.Precision.HIGHEST)
  return out.reshape(out.shape[0], NUM_TP_ROWS, CHANNELS).astype(v9.dtype)


def _coupling():
  from e2former_jax.so3 import first_order_coupling

  return first_order_coupling(2)


def _edge_vectors(positions, nbr_idx, nbr_mask):
  """x_i - x_j per slot, 0 on invalid slots: [N, K, 3]."""
  num_sources = positions.shape[0]
  valid = nbr_mask & (nbr_idx < num_sources)
  sources = jnp.take(positions, jnp.where(valid, nbr_idx, num_sources), axis=0, mode="fill",
                     fill_value=0)
  return jnp.where(valid[..., None], positions[:, None, :] - sources, 0)


def fused_message(q, k, gate, post_weight, envelope, v9, positions, nbr_idx, nbr_mask, *,
                  block_sizes=None, backward_block_sizes=None):
  """The same message from ``pk.message_attention``: only v_j (9 rows) gathered per edge."""
  out = pk.message_attention(q, k, gate, post_weight, envelope,
                             _edge_vectors(positions, nbr_idx, nbr_mask), _to_heads(v9), nbr_idx,
                             nbr_mask, coupling=_coupling(), scale=SCALE, sink=SINK,
                             block_sizes=block_sizes, backward_block_sizes=backward_block_sizes,
                             interpret=INTERPRET)
  return out.reshape(out.shape[0], NUM_TP_ROWS, CHANNELS)


def node_pipeline(q, k, gate, post_weight, envelope, v9, positions, nbr_idx, nbr_mask, *,
                  block_sizes=None):
  """Same result as per_edge_model with node-level tensor products around the fused kernel.

  T is linear in the vector, so sum_k a T(v_j, x_i - x_j) = T(sum_k a v_j, x_i) - sum_k a T(v_j, x_j).
  """
  from e2former_jax.so3 import tensor_product_vector

  values = node_values(v9, positions)  # [M, 58, H]
  agg = pk.node_attention(q, k, gate, post_weight, envelope, values, nbr_idx, nbr_mask,
                          scale=SCALE, sink=SINK, block_sizes=block_sizes, interpret=INTERPRET)
  agg = agg.reshape(agg.shape[0], NUM_ROWS, CHANNELS)
  tp_rows, v_rows = agg[:, :20], agg[:, 20:]
  return jnp.concatenate([tensor_product_vector(v_rows, positions) - tp_rows, v_rows], axis=1)


def model_args(inputs):
  return tuple(inputs[name] for name in
               ("q", "k", "gate", "post_weight", "envelope", "v9", "positions"))


def make_fn(impl: str, block_sizes, with_grad: bool, backward_block_sizes=None):
  """Jitted (args, nbr_idx, nbr_mask) -> output or gradients w.r.t. all float inputs
  (``backward_block_sizes``: message_attention's fused backward tiling)."""
  if impl in ("pallas", "reference"):
    fn = make_op(impl, block_sizes)
  elif impl == "per_edge":
    fn = per_edge_model
  elif impl == "per_edge_message":
    fn = per_edge_message
  elif impl == "message":
    fn = lambda *a: fused_message(  # noqa: E731
        *a, block_sizes=block_sizes, backward_block_sizes=backward_block_sizes)
  elif impl == "pipeline_message":  # the model's current node-centric message: T rows only
    fn = lambda *a: node_pipeline(*a, block_sizes=block_sizes)[:, :NUM_TP_ROWS]  # noqa: E731
  else:
    fn = lambda *a: node_pipeline(*a, block_sizes=block_sizes)  # noqa: E731
  if not with_grad:
    return jax.jit(fn)

  def grads(*args):
    *xs, idx, mask = args
    loss = lambda *ys: jnp.sum(fn(*ys, idx, mask).astype(jnp.float32) ** 2)  # noqa: E731
    return jax.grad(loss, argnums=range(len(xs)))(*xs)

  return jax.jit(grads)


def args_for(impl: str, inputs):
  base = op_args(inputs) if impl in ("pallas", "reference") else model_args(inputs)
  return (*base, inputs["nbr_idx"], inputs["nbr_mask"])


# ------------------------------------------------------------------------------ measurement


def time_fn(fn, args, samples: int = 9, min_sample_s: float = 0.01) -> float:
  """Median seconds per call (after compile and warm-up), batching calls into >= min_sample_s."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  single = time.perf_counter() - start
  inner = max(1, int(min_sample_s / max(single, 1e-6)))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(inner):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / inner)
  return statistics.median(times)


def traffic(num_atoms: int, itemsize: int) -> dict:
  """Floor bytes (each input read once, each output written once), FLOPs and gathered bytes."""
  n = m = num_atoms
  edges = n * NUM_SLOTS
  h, d, x = NUM_HEADS, HEAD_DIM, ROW_DIM
  inputs = (n * d * h + m * d * h + m * x * h + 2 * edges * h + edges) * itemsize + edges * 5
  out = n * x * h * itemsize
  grads = (n * d * h + m * d * h + m * x * h + 2 * edges * h + edges) * itemsize
  return dict(
      fwd_bytes=inputs + out,
      fwd_bwd_bytes=inputs + out + inputs + out + grads,  # forward, then backward reads all again
      fwd_flops=edges * (2 * d * h + 2 * x * h + 10 * h),
      fwd_bwd_flops=edges * (8 * d * h + 6 * x * h + 30 * h),
      fwd_gathered_bytes=edges * (d + x) * h * itemsize,
      fwd_bwd_gathered_bytes=edges * (4 * d + 3 * x) * h * itemsize,
  )


def message_traffic(num_atoms: int, itemsize: int) -> dict:
  """``traffic`` for message_attention: v [M, 9, C] and edge vectors in, [N, 20, C] out."""
  n = m = num_atoms
  edges = n * NUM_SLOTS
  h, d = NUM_HEADS, HEAD_DIM
  inputs = (n * d * h + m * d * h + m * NUM_V_ROWS * h + 2 * edges * h + 4 * edges) * itemsize \
      + edges * 5
  out = n * NUM_TP_ROWS * CHANNELS * itemsize
  return dict(fwd_bytes=inputs + out, fwd_gathered_bytes=edges * (d + NUM_V_ROWS) * h * itemsize)


FLOORS = {"pallas": traffic, "reference": traffic, "message": message_traffic}
# (baseline, ours) pairs whose time ratios the summary reports.
SPEEDUPS = (("reference", "pallas"), ("per_edge", "pipeline"), ("per_edge", "pallas"),
            ("per_edge_message", "message"), ("pipeline_message", "message"))


def rel_err(a, b) -> float:
  a = np.asarray(jnp.asarray(a, jnp.float32), np.float64)
  b = np.asarray(jnp.asarray(b, jnp.float32), np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def max_err(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# -------------------------------------------------------------------------------- phases


def _derivative_errors(kernel, reference, args, num_inputs: int, names, seed: int) -> dict:
  """Relative errors of forward, gradient and second-order gradient of kernel vs reference.

  The loss sum(c * out^2) is nonlinear so that the second order exercises the backward's own
  derivative (force training); the second order is grad of <directions, gradient>.
  """
  inputs, nbr = args[:num_inputs], args[num_inputs:]
  out_ref = jax.jit(reference)(*args)
  cotangent = jax.random.normal(jax.random.key(seed), out_ref.shape)
  directions = [jax.random.normal(jax.random.key(seed + 1 + i), x.shape)
                for i, x in enumerate(inputs)]

  def grads(fn):
    def first(*xs):
      return jax.grad(lambda *ys: jnp.sum(cotangent * fn(*ys, *nbr) ** 2),
                      argnums=range(num_inputs))(*xs)
    return first

  def second(fn):
    def contracted(*xs):
      return sum(jnp.sum(r * g) for r, g in zip(directions, grads(fn)(*xs)))
    return jax.grad(contracted, argnums=range(num_inputs))

  out = {"fwd_rel_err": rel_err(jax.jit(kernel)(*args), out_ref)}
  g_kernel = jax.jit(grads(kernel))(*inputs)
  out["bwd_rel_err"] = {n: rel_err(a, b) for n, a, b in
                        zip(names, g_kernel, jax.jit(grads(reference))(*inputs))}
  out["double_bwd_rel_err"] = {n: rel_err(a, b) for n, a, b in zip(
      names, jax.jit(second(kernel))(*inputs), jax.jit(second(reference))(*inputs))}
  g_again = jax.jit(grads(kernel))(*inputs)
  out["bwd_bitwise_deterministic"] = all(
      bool(np.array_equal(np.asarray(a), np.asarray(b))) for a, b in zip(g_kernel, g_again))
  return out


def validate(report: dict, num_atoms: int, blocks: tuple | None) -> None:
  """Compiled kernels vs the float32 reference at paper sizes; bf16 budget; determinism."""
  inputs = make_inputs(num_atoms, jnp.float32, model=True)
  args = (*op_args(inputs), inputs["nbr_idx"], inputs["nbr_mask"])
  kernel = make_op("pallas", _blocks(blocks) if blocks else None)
  reference = make_op("reference", None)
  cotangent = jax.random.normal(jax.random.key(1), (num_atoms, ROW_DIM, NUM_HEADS))
  names = ("q", "k", "gate", "post_weight", "envelope", "values")
  out = {"num_atoms": num_atoms, "edges": int(np.sum(np.asarray(inputs["nbr_mask"]))),
         "forward_blocks": blocks}
  out.update(_derivative_errors(kernel, reference, args, NUM_INPUTS, names, seed=1))

  # bf16 inputs, float32 accumulation: error vs float32 truth against the bf16 reference's.
  low = tuple(x.astype(jnp.bfloat16) for x in args[:NUM_INPUTS])
  truth_args = tuple(x.astype(jnp.float32) for x in low)
  nbr = args[NUM_INPUTS:]
  truth = jax.jit(reference)(*truth_args, *nbr)
  budget = {"fwd": (max_err(jax.jit(kernel)(*low, *nbr).astype(jnp.float32), truth),
                    max_err(jax.jit(reference)(*low, *nbr).astype(jnp.float32), truth))}
  # A linear functional of the output, so kernel and reference receive the same bf16 cotangent.
  def linear_grads(fn):
    return jax.jit(jax.grad(
        lambda *ys: jnp.sum(cotangent * fn(*ys, *nbr).astype(jnp.float32)),
        argnums=range(NUM_INPUTS)))

  g_truth = linear_grads(reference)(*truth_args)
  g_low_kernel = linear_grads(kernel)(*low)
  g_low_ref = linear_grads(reference)(*low)
  for n, gk, gr, gt in zip(names, g_low_kernel, g_low_ref, g_truth):
    budget["bwd_" + n] = (max_err(gk.astype(jnp.float32), gt), max_err(gr.astype(jnp.float32), gt))
  out["bf16_max_err_kernel_vs_reference"] = budget
  out["bf16_within_budget"] = all(k <= 2 * r + 1e-5 for k, r in budget.values())

  # The node-centric pipeline equals the per-edge model (linearity of T in the vector).
  margs = (*model_args(inputs), *nbr)
  out["pipeline_vs_per_edge_rel_err"] = rel_err(jax.jit(node_pipeline)(*margs),
                                                jax.jit(per_edge_model)(*margs))
  # message_attention: against its reference, and the whole message against (b)'s.
  message_inputs = (inputs["q"], inputs["k"], inputs["gate"], inputs["post_weight"],
                    inputs["envelope"], _edge_vectors(inputs["positions"], *nbr),
                    _to_heads(inputs["v9"]))
  options = dict(coupling=_coupling(), scale=SCALE, sink=SINK)
  out["message"] = _derivative_errors(
      lambda *a: pk.message_attention(*a, **options, interpret=INTERPRET),
      lambda *a: pk.message_attention_reference(*a, **options), (*message_inputs, *nbr), 7,
      ("q", "k", "gate", "post_weight", "envelope", "vectors", "values"), seed=20)
  out["message_vs_per_edge_rel_err"] = rel_err(jax.jit(fused_message)(*margs),
                                               jax.jit(per_edge_message)(*margs))
  report["validation"] = out
  print(json.dumps(out, indent=1), flush=True)


def run_pytest(report: dict, timeout_s: int) -> None:
  try:
    import pytest  # noqa: F401
  except ImportError:
    report["pytest"] = "pytest not installed"
    return
  # The compiled (GPU) variants of the kernel tests: ragged sizes, duplicates, empty rows, second
  # order and bf16 through every kernel, forward and backward.
  cmd = [sys.executable, "-m", "pytest", "tests/pallas_kernels", "-q", "-k", "not Interpret",
         "-p", "no:cacheprovider"]
  try:
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    report["pytest"] = {"returncode": proc.returncode, "tail": tail}
  except subprocess.TimeoutExpired:
    report["pytest"] = f"timed out after {timeout_s} s"
  print("pytest:", json.dumps(report["pytest"], indent=1), flush=True)


FORWARD_CANDIDATES = [
    # (block_h, block_k, block_n, num_warps, num_stages, unroll). Notes, runs 1-6 and 20: block_n > 1
    # and unrolling are slower; in float32 32 heads x 2 single slots at 1 warp (the default) took
    # 15.2 ms at N = 100k on an H100 against 17.5-17.9 for 128 x 1 at 4 warps, which stays the
    # fastest in bf16 (13.5 ms; 64 x 2 at 2 warps 13.6).
    (32, 2, 1, 1, 2, 0), (32, 1, 1, 1, 2, 0), (64, 2, 1, 2, 2, 0), (128, 1, 1, 4, 2, 0),
    (16, 4, 1, 1, 2, 0), (128, 1, 1, 4, 3, 0), (32, 4, 1, 1, 2, 0),
]
# One (size, implementation) subprocess may not take longer than this.
_WORKER_TIMEOUT_S = 150  # compile of the largest fwd+bwd programs included
# message_attention's forward: 18 value rows (9 x 2 groups, gathered as nine [G, block_h] segments)
# and 27 [2, block_h] accumulators, block_k single slots per step; its default is 64 heads x 4
# slots x 1 warp (run 20: 6.1 ms at N = 100k against 6.4-6.6 for 2 slots and 7.7 for 1), in bf16
# 128 heads x 2 slots x 2 warps (run 21: 7.5 ms against 9.4 for the float32 default).
MESSAGE_CANDIDATES = [
    (64, 4, 1, 1, 2, 0), (64, 2, 1, 1, 2, 0), (64, 1, 1, 1, 2, 0), (64, 8, 1, 1, 2, 0),
    (32, 4, 1, 1, 2, 0), (64, 4, 1, 1, 3, 0), (64, 2, 1, 2, 2, 0), (128, 2, 1, 2, 2, 0),
]
# message_attention's fused backward: (target side, source side) tilings, 12 numbers. The target
# side holds 27 [2, block_h] pulled-back cotangent tiles besides the forward's operands; defaults
# 64 heads x 1 slot x 1 warp for it and 32 heads x 1 slot x 1 warp for the source side (runs 15-16,
# 20).
_ONE_WARP = {h: (h, 1, 1, 1, 2, 0) for h in (32, 64, 128)}
MESSAGE_BACKWARD_CANDIDATES = [
    _ONE_WARP[64] + _ONE_WARP[64], _ONE_WARP[64] + _ONE_WARP[32], _ONE_WARP[64] + _ONE_WARP[128],
    _ONE_WARP[64] + (64, 1, 1, 2, 2, 0), _ONE_WARP[64] + (128, 1, 1, 4, 2, 0),
    _ONE_WARP[64] + (64, 2, 1, 1, 2, 0), _ONE_WARP[64] + (128, 4, 1, 4, 2, 0),
    _ONE_WARP[32] + _ONE_WARP[64],
]
PRIMITIVE_CANDIDATES = [
    (32, 4, 1, 4, 2, 0), (32, 4, 1, 4, 2, 1), (32, 2, 1, 4, 2, 1), (64, 2, 1, 4, 2, 1),
]


def _blocks(t) -> pk.BlockSizes:
  """BlockSizes from (block_h, block_k, block_n, num_warps, num_stages[, unroll])."""
  return pk.BlockSizes(block_h=t[0], block_k=t[1], block_n=t[2], num_warps=t[3], num_stages=t[4],
                       unroll=bool(t[5]) if len(t) > 5 else False)


def tune_forward(report: dict, num_atoms: int, deadline: float, candidates: list[tuple],
                 dtype_name: str = "float32", impl: str = "pallas",
                 backward: bool = False) -> tuple | None:
  """Times forward tilings of ``impl``'s kernel at one size and input dtype; returns the fastest.
  With ``backward``, times forward + backward over tilings of message_attention's fused backward."""
  is_op = impl in ("pallas", "reference")
  inputs = make_inputs(num_atoms, jnp.dtype(dtype_name), op=is_op, model=not is_op)
  args = args_for(impl, inputs)
  timed = []
  for cand in candidates:
    if time.time() > deadline:
      break
    entry = {"impl": impl, "blocks": cand, "dtype": dtype_name, "backward": backward}
    fn = (make_fn(impl, None, True, (_blocks(cand[:6]), _blocks(cand[6:]))) if backward
          else make_fn(impl, _blocks(cand), False))
    try:
      seconds = time_fn(fn, args, samples=5)
      timed.append((seconds, cand))
      entry["ms"] = seconds * 1e3
    except Exception as e:  # a tiling Triton rejects (e.g. too many registers) is data, not a crash
      entry["error"] = repr(e)[:300]
    report.setdefault("tune_forward", []).append(entry)
    print("tune", json.dumps(entry), flush=True)
  return min(timed)[1] if timed else None


def tune_backward(report: dict, num_atoms: int, deadline: float, candidates: list[tuple],
                  dtype_name: str = "float32") -> None:
  """Times tilings of the backward's primitives on value rows (X = 58), key rows (D = 8) and
  message_attention's v rows (18)."""
  inputs = make_inputs(num_atoms, jnp.dtype(dtype_name))
  w = inputs["gate"]
  nbr = (inputs["nbr_idx"], inputs["nbr_mask"])
  for row_name, rows in (("values", inputs["values"]), ("keys", inputs["k"]),
                         ("v9", inputs["values"][:, :NUM_V_ROWS])):
    ops = {  # M = N, so target rows and source rows have the same shape
        "edge_dot": lambda bs, r=rows: pk.edge_dot(r, r, *nbr, block_sizes=bs,
                                                   interpret=INTERPRET),
        "gather_sum": lambda bs, r=rows: pk.gather_sum(w, r, *nbr, block_sizes=bs,
                                                       interpret=INTERPRET),
        "scatter_sum": lambda bs, r=rows: pk.scatter_sum(w, r, *nbr, num_sources=num_atoms,
                                                         block_sizes=bs, interpret=INTERPRET),
    }
    for op_name, op in ops.items():
      for cand in candidates:
        if time.time() > deadline:
          return
        entry = {"op": op_name, "rows": row_name, "blocks": cand, "dtype": dtype_name}
        try:
          entry["ms"] = time_fn(lambda op=op, cand=cand: op(_blocks(cand)), (), samples=5) * 1e3
        except Exception as e:
          entry["error"] = repr(e)[:300]
        report.setdefault("tune_backward", []).append(entry)
        print("tune bwd", json.dumps(entry), flush=True)


def _memory(device, key: str) -> int | None:
  stats = device.memory_stats()  # None on CPU
  return int(stats[key]) if stats else None


def bench_worker(num_atoms: int, impl: str, blocks: tuple | None, dtype_name: str) -> dict:
  """One (size, implementation) in this process: forward, then forward+backward, with peak memory."""
  dtype = jnp.dtype(dtype_name)
  device = jax.devices()[0]
  is_op = impl in ("pallas", "reference")
  inputs = make_inputs(num_atoms, dtype, op=is_op, model=not is_op)
  args = args_for(impl, inputs)
  jax.block_until_ready(args)
  result = {"num_atoms": num_atoms, "impl": impl, "dtype": dtype_name,
            "input_bytes": _memory(device, "bytes_in_use")}
  block_sizes = _blocks(blocks) if blocks else None
  for name, with_grad in (("fwd", False), ("fwd_bwd", True)):
    try:
      compiled = make_fn(impl, block_sizes, with_grad).lower(*args).compile()
      analysis = compiled.memory_analysis()
      if analysis is not None:
        result[name + "_xla_temp_bytes"] = int(analysis.temp_size_in_bytes)
      result[name + "_ms"] = time_fn(compiled, args) * 1e3
      result[name + "_peak_bytes"] = _memory(device, "peak_bytes_in_use")
    except Exception as e:
      message = str(e)
      out_of_memory = "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
      result[name + "_ms"] = "OOM" if out_of_memory else "error"
      result[name + "_error"] = message[:1500]
      break
  return result


def bench(report: dict, sizes: list[int], impls: list[str], blocks: tuple | None,
          dtype_name: str, deadline: float) -> None:
  rows = []
  for num_atoms in sizes:
    for impl in impls:
      if time.time() > deadline:
        rows.append({"num_atoms": num_atoms, "impl": impl, "skipped": "time budget"})
        continue
      cmd = [sys.executable, __file__, "--worker", f"{num_atoms},{impl},{dtype_name}"]
      if INTERPRET:
        cmd.append("--interpret")
      if blocks:
        cmd += ["--blocks", ",".join(map(str, blocks))]
      env = dict(os.environ, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
      try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                              timeout=max(10, min(_WORKER_TIMEOUT_S, deadline - time.time())))
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        row = json.loads(lines[-1][7:]) if lines else {
            "num_atoms": num_atoms, "impl": impl, "error": (proc.stdout + proc.stderr)[-800:]}
      except subprocess.TimeoutExpired:
        row = {"num_atoms": num_atoms, "impl": impl, "error": f"timeout (> {_WORKER_TIMEOUT_S} s)"}
      rows.append(row)
      print("bench", json.dumps(row), flush=True)
  report.setdefault("bench", {})[dtype_name] = rows


def summarize(report: dict) -> str:
  """Table of the benchmark, with roofline fractions and speed-ups."""
  lines = []
  for dtype_name, rows in report.get("bench", {}).items():
    itemsize = jnp.dtype(dtype_name).itemsize
    by_key = {(r["num_atoms"], r["impl"]): r for r in rows}
    lines.append(f"[{dtype_name}] N | impl | fwd ms | fwd+bwd ms | fwd HBM% | fwd+bwd HBM% | "
                 "peak GB (fwd, fwd+bwd)")
    for (n, impl), r in sorted(by_key.items()):
      f, fb = r.get("fwd_ms"), r.get("fwd_bwd_ms")
      floor = FLOORS[impl](n, itemsize) if impl in FLOORS else {}
      frac = lambda ms, key: f"{floor[key] / (ms * 1e-3) / HBM_BYTES_PER_S * 100:.1f}" \
          if isinstance(ms, float) and key in floor else "-"  # noqa: E731
      peak = [r.get(k) for k in ("fwd_peak_bytes", "fwd_bwd_peak_bytes")]
      peak_s = ", ".join(f"{p / 1e9:.2f}" if isinstance(p, int) else "-" for p in peak)
      fmt = lambda ms: f"{ms:.3f}" if isinstance(ms, float) else str(ms)  # noqa: E731
      lines.append(f"  {n} | {impl} | {fmt(f)} | {fmt(fb)} | {frac(f, 'fwd_bytes')} | "
                   f"{frac(fb, 'fwd_bwd_bytes')} | {peak_s}")
    for n in sorted({k[0] for k in by_key}):
      for base, mine in SPEEDUPS:
        other, ours = by_key.get((n, base), {}), by_key.get((n, mine), {})
        for key in ("fwd_ms", "fwd_bwd_ms"):
          a, b = other.get(key), ours.get(key)
          if isinstance(a, float) and isinstance(b, float):
            label = f"{base}/{mine}"
            report.setdefault("speedups", {}).setdefault(dtype_name, {}).setdefault(
                str(n), {})[f"{label} {key}"] = a / b
            lines.append(f"  N={n} speed-up {label} {key}: {a / b:.1f}x")
  return "\n".join(lines)


def results_line(report: dict) -> str:
  """One Markdown line for benchmarks/RESULTS.md with the key numbers."""
  dtype_name = next(iter(report.get("bench", {})), "float32")
  rows = report.get("bench", {}).get(dtype_name, [])
  by_key = {(r["num_atoms"], r["impl"]): r for r in rows}
  parts = [f"{report['date']}", report["device"], f"commit {report['commit']}",
           f"attention (pallas_kernels, H128 D8 X58 K32, {dtype_name})"]
  largest_sizes = set()
  for impl, label in (("pallas", "node_attention"), ("message", "message_attention")):
    largest = max((n for n, i in by_key if i == impl), default=None)
    if largest is None:
      continue
    largest_sizes.add(largest)
    r = by_key[(largest, impl)]
    floor = FLOORS[impl](largest, jnp.dtype(dtype_name).itemsize)["fwd_bytes"]
    if isinstance(r.get("fwd_ms"), float):
      parts.append(f"{label} N={largest}: fwd {r['fwd_ms']:.2f} ms "
                   f"({floor / (r['fwd_ms'] * 1e-3) / HBM_BYTES_PER_S * 100:.0f}% HBM)")
    if isinstance(r.get("fwd_bwd_ms"), float):
      parts.append(f"fwd+bwd {r['fwd_bwd_ms']:.2f} ms")
  for n in sorted(largest_sizes):
    for key, value in sorted(report.get("speedups", {}).get(dtype_name, {}).get(str(n), {})
                             .items()):
      parts.append(f"N={n} {key} {value:.1f}x")
  return "| " + " | ".join(parts) + " |"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--phases", default="validate,tune_fwd,bench,pytest,tune_bwd")
  parser.add_argument("--sizes", default="1000,10000,100000")
  parser.add_argument("--dtypes", default="float32")
  parser.add_argument("--impls", default=",".join(IMPLS))
  parser.add_argument("--validate-size", type=int, default=4096)
  parser.add_argument("--blocks", default="", help="forward tiling h,k,n,warps,stages for bench")
  parser.add_argument("--candidates", default="",
                      help="tilings for the tune phases, 'h,k,n,warps,stages[,unroll];...', for "
                      "tune_msg_bwd two such groups of six (target side, source side) "
                      "(default: each phase's built-in list)")
  parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of all phases")
  parser.add_argument("--pytest-timeout-s", type=int, default=150)
  parser.add_argument("--commit", default=os.environ.get("GIT_COMMIT", "unknown"))
  parser.add_argument("--out", default="")
  parser.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
  parser.add_argument("--interpret", action="store_true", help="CPU dry run (Pallas interpreter)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  global INTERPRET
  INTERPRET = args.interpret
  blocks = tuple(int(v) for v in args.blocks.split(",")) if args.blocks else None
  candidates = [tuple(int(v) for v in c.split(",")) for c in args.candidates.split(";") if c]

  if args.worker:
    num_atoms, impl, dtype_name = args.worker.split(",")
    print("RESULT " + json.dumps(bench_worker(int(num_atoms), impl, blocks, dtype_name)), flush=True)
    return

  deadline = time.time() + args.budget_s
  device = jax.devices()[0]
  report = {"device": device.device_kind, "platform": device.platform, "commit": args.commit,
            "date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "config": dict(H=NUM_HEADS, D=HEAD_DIM, X=ROW_DIM, K=NUM_SLOTS, density=DENSITY,
                           cutoff=CUTOFF)}
  out_path = Path(args.out or REPO / "benchmarks" / "results" /
                  f"attention_{device.device_kind.replace(' ', '_')}.json")
  out_path.parent.mkdir(parents=True, exist_ok=True)
  sizes = [int(s) for s in args.sizes.split(",")]
  phases = args.phases.split(",")

  def save():
    out_path.write_text(json.dumps(report, indent=1))

  largest = max(sizes)
  for phase in phases:
    if time.time() > deadline:
      report.setdefault("skipped", []).append(phase)
      continue
    try:
      if phase == "validate":
        validate(report, args.validate_size, blocks)
      elif phase == "tune_fwd":
        # The fastest tiling for the first dtype is the one bench uses.
        best, *_ = [tune_forward(report, largest, deadline, candidates or FORWARD_CANDIDATES,
                                 dtype_name)
                    for dtype_name in args.dtypes.split(",")]
        report["tuned_forward_blocks"] = best
        blocks = blocks or best
      elif phase == "tune_msg":
        for dtype_name in args.dtypes.split(","):
          tune_forward(report, largest, deadline, candidates or MESSAGE_CANDIDATES, dtype_name,
                       impl="message")
      elif phase == "tune_msg_bwd":
        for dtype_name in args.dtypes.split(","):
          tune_forward(report, largest, deadline, candidates or MESSAGE_BACKWARD_CANDIDATES,
                       dtype_name, impl="message", backward=True)
      elif phase == "bench":
        report["bench_forward_blocks"] = blocks
        for dtype_name in args.dtypes.split(","):
          bench(report, sizes, args.impls.split(","), blocks, dtype_name, deadline)
      elif phase == "pytest":
        run_pytest(report, min(args.pytest_timeout_s, int(deadline - time.time())))
      elif phase == "tune_bwd":
        # bf16 halves the bytes per row, so its fastest tiling may differ from float32's.
        for dtype_name in args.dtypes.split(","):
          tune_backward(report, largest, deadline, candidates or PRIMITIVE_CANDIDATES, dtype_name)
      elif phase == "profile":
        # The first of --impls if it is a kernel, else node_attention.
        impl = next((i for i in args.impls.split(",") if i in ("pallas", "message")), "pallas")
        is_op = impl == "pallas"
        inputs = make_inputs(largest, jnp.dtype(args.dtypes.split(",")[0]), op=is_op,
                             model=not is_op)
        for with_grad in (False, True):
          fn = make_fn(impl, _blocks(blocks) if blocks else None, with_grad)
          jax.block_until_ready(fn(*args_for(impl, inputs)))
      else:
        raise ValueError(f"unknown phase {phase!r}")
    except Exception:
      report.setdefault("errors", {})[phase] = traceback.format_exc()[-2000:]
      print(f"phase {phase} failed:\n{traceback.format_exc()}", flush=True)
    save()

  table = summarize(report)
  save()
  if "bench" in report:
    with open(args.results_md, "a") as f:
      f.write(results_line(report) + "\n")
  print(table, flush=True)
  print("wrote", out_path, flush=True)


if __name__ == "__main__":
  main()
