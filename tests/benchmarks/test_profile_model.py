"""benchmarks/profile_model.py's trace reading and accounting, on synthetic traces and a CPU compile."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile_model


def _event(name, dur_us, pid=1):
  return {"ph": "X", "pid": pid, "name": name, "dur": dur_us, "ts": 0}


def test_gpu_kernels_keeps_only_the_gpu_process(tmp_path):
  events = [
      {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
      _event("message_attention_fwd", 100.0), _event("python call", 500.0, pid=2),
  ]
  trace = tmp_path / "plugins" / "profile" / "run"
  trace.mkdir(parents=True)
  with gzip.open(trace / "perfetto_trace.json.gz", "wt") as f:
    json.dump({"traceEvents": events}, f)
  assert [e["name"] for e in profile_model.gpu_kernels(tmp_path)] == ["message_attention_fwd"]


def test_summarize_divides_by_calls_and_groups_kernels():
  kernels = [_event("message_attention_bwd_scatter", 3000.0), _event("message_attention_bwd", 1000.0),
             _event("sm90_xmma_gemm_f32f32_tf32", 2000.0), _event("loop_add_fusion_3", 500.0),
             _event("loop_add_fusion_3", 1500.0)]
  origins = {"loop_add_fusion_3": {"shape": "f32[8]", "op_name": "jit(f)/add"}}
  report = profile_model.summarize(kernels, calls=2, top=2, origins=origins)
  assert report["gpu_ms_per_call"] == pytest.approx(4.0)
  assert report["kernels_per_call"] == 2.5
  assert report["groups_ms"] == pytest.approx({
      "message_attention_bwd_scatter": 1.5, "message_attention_bwd": 0.5,
      "matrix products": 1.0, "xla fusions and copies": 1.0})
  top = report["top"]
  assert [t["name"] for t in top] == ["message_attention_bwd_scatter", "sm90_xmma_gemm_f32f32_tf32"]
  assert top[0]["share"] == pytest.approx(1.5 / 4.0)
  assert "hlo" not in top[0]


def test_hlo_origins_name_the_jax_op():
  compiled = jax.jit(lambda x: jnp.sum(jnp.sin(x) * 2.0, axis=0)).lower(jnp.ones((8, 8))).compile()
  origins = profile_model.hlo_origins(compiled.as_text())
  assert any(o.get("op_name", "").endswith("reduce_sum") for o in origins.values())
  assert all("." not in name for name in origins)  # kernel names use '_' where HLO uses '.'
