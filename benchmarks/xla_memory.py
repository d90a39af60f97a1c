"""XLA's memory plan of a compiled executable, as recorded by the benchmarks."""

from __future__ import annotations

PLAN_FIELDS = ("temp", "argument", "output", "alias", "generated_code")


def compiled_memory(compiled) -> dict:
  """Bytes of each buffer class in XLA's plan of ``jax.jit(f).lower(...).compile()`` ({} if unknown)."""
  analysis = compiled.memory_analysis()
  return {key: int(getattr(analysis, f"{key}_size_in_bytes")) for key in PLAN_FIELDS} if analysis else {}
