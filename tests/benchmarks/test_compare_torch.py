"""benchmarks/compare_torch.py's search for the largest structure, against a fake memory limit."""

from __future__ import annotations

import argparse

import pytest

from benchmarks import compare_torch


@pytest.mark.parametrize("limit", [5_000, 37_000, 150_000])
def test_fit_brackets_the_memory_limit(monkeypatch, limit):
  probed = []

  def fake_case(args, params_path, impl, structure, *, train, probe):
    assert probe and not train
    probed.append(int(structure))
    fits = int(structure) <= limit
    return {"ef": {"status": "ok" if fits else "oom"}, "device_name": "fake"}

  monkeypatch.setattr(compare_torch, "measure_case", fake_case)
  args = argparse.Namespace(deadline=float("inf"), fit_resolution=1.25, fit_max_atoms=10**6,
                            device="cuda")
  runs = [{"impl": "jax-pallas", "atoms": 1000, "molecules": 1, "status": "ok"},
          {"impl": "jax-pallas", "atoms": 640, "molecules": 64, "status": "ok"}]
  found = compare_torch.fit(args, None, "jax-pallas", runs)
  largest, failed = found["largest_ok"], found["smallest_failed"]
  assert largest <= limit < failed and failed / largest <= 1.25
  assert probed[0] == 2000  # doubling from the largest single structure that ran
  assert found["device_name"] == "fake" and len(found["probes"]) == len(probed)


def test_fit_stops_at_the_size_limit(monkeypatch):
  monkeypatch.setattr(compare_torch, "measure_case",
                      lambda *a, **k: {"ef": {"status": "ok"}, "device_name": "fake"})
  args = argparse.Namespace(deadline=float("inf"), fit_resolution=1.25, fit_max_atoms=10_000,
                            device="cuda")
  found = compare_torch.fit(args, None, "torch-node", [])
  assert found["largest_ok"] == 10_000 and found["smallest_failed"] is None  # starts at 10k
