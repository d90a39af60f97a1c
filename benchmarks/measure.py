"""How the benchmarks measure: timing, device memory, and one case per fresh process.

A device's peak memory (``memory_stats()["peak_bytes_in_use"]``) is a process-lifetime maximum, so
benchmarks that report peaks per case run each case in its own subprocess: :func:`run_worker`
starts ``python -m <module> --worker <json>``, whose :func:`worker_main` prints one result line.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable

from benchmarks.report import REPO

_RESULT_PREFIX = "RESULT "
# Error texts of an allocation failure (XLA, PyTorch).
_OOM_MARKERS = ("out of memory", "resource_exhausted", "outofmemory", "failed to allocate")
# Workers may use this fraction of the accelerator's memory (JAX's default is 75 %); set before
# jax starts in the worker, and the parent does not preallocate, so that it starves no worker.
GPU_MEMORY_FRACTION = 0.95
# A JAX worker is the only process on the device while it runs, and takes its share up front: one
# allocator region. Grown on demand instead, 250k atoms' 60.7 GiB of temporaries failed to allocate
# under a 75.7 GiB limit (217f470) and ran once preallocated (af8eacf); most likely the regions that
# compilation's autotuning left behind (never returned, sizes doubling) fragmented the pool.
_WORKER_PREALLOCATE = "true"


def time_calls(call: Callable[[], object], *, repeats: int, min_sample_s: float = 0.0,
               time_limit_s: float = float("inf")) -> dict:
  """Median seconds per call of ``call`` (which must block until its result is ready).

  Two warm-up calls (compilation, first-run costs), then ``repeats`` samples; each sample batches
  as many calls as fit in ``min_sample_s`` (sub-millisecond kernels), and sampling stops early
  after ``time_limit_s``.

  Returns:
    {"ms": median per call, "samples_ms": [...], "output": the last call's result}.
  """
  call()
  start = time.perf_counter()
  output = call()
  inner = max(1, int(min_sample_s / max(time.perf_counter() - start, 1e-6)))
  samples = []
  loop_start = time.perf_counter()
  while len(samples) < repeats and (not samples or time.perf_counter() - loop_start < time_limit_s):
    start = time.perf_counter()
    for _ in range(inner):
      output = call()
    samples.append((time.perf_counter() - start) / inner * 1e3)
  return {"ms": statistics.median(samples) if samples else None, "samples_ms": samples,
          "output": output}


def peak_bytes(device) -> int | None:
  """The jax device's peak bytes in use so far (None where it keeps no statistics, e.g. CPU)."""
  stats = device.memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def compiled_memory(compiled) -> dict:
  """Bytes of each buffer class in XLA's plan of a compiled executable ({} if unknown)."""
  analysis = compiled.memory_analysis()
  fields = ("temp", "argument", "output", "alias", "generated_code")
  return {f: int(getattr(analysis, f"{f}_size_in_bytes")) for f in fields} if analysis else {}


def is_out_of_memory(text: str) -> bool:
  return any(marker in text.lower() for marker in _OOM_MARKERS)


def failure(error: BaseException) -> dict:
  """The status of a failed measurement: out of memory, or an error with its last lines."""
  text = "".join(traceback.format_exception(error))
  return {"status": "oom" if is_out_of_memory(text) else "error", "error": text[-1500:]}


def run_worker(module: str, spec: dict, timeout_s: float, env: dict | None = None) -> dict:
  """Runs ``python -m module --worker JSON(spec)`` from the repository root; its result dict.

  ``env`` overrides this process's environment (a None value removes the variable). A worker that
  prints no result (a crash, an allocation failure that kills the process) or runs out of time
  gives ``{"status": "oom" | "error" | "timeout", "error": ...}``.
  """
  env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": _WORKER_PREALLOCATE,
         "XLA_PYTHON_CLIENT_MEM_FRACTION": str(GPU_MEMORY_FRACTION), **(env or {})}
  env = {name: value for name, value in env.items() if value is not None}
  try:
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], cwd=REPO,
                          capture_output=True, text=True, env=env, timeout=max(1.0, timeout_s))
  except subprocess.TimeoutExpired:
    return {"status": "timeout", "error": f"worker exceeded {timeout_s:.0f} s"}
  lines = [line for line in proc.stdout.splitlines() if line.startswith(_RESULT_PREFIX)]
  if lines:
    return json.loads(lines[-1][len(_RESULT_PREFIX):])
  tail = (proc.stdout + proc.stderr)[-2000:]
  return {"status": "oom" if is_out_of_memory(tail) else "error",
          "error": f"worker exit {proc.returncode}: {tail}"}


def worker_main(measure: Callable[[dict], dict], spec_json: str) -> None:
  """The worker side: ``measure(spec)`` (or its failure) printed as the result line."""
  try:
    result = measure(json.loads(spec_json))
  except Exception as e:  # noqa: BLE001  (reported to the parent, which records it)
    result = failure(e)
  print(_RESULT_PREFIX + json.dumps(result), flush=True)
