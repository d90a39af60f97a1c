"""The memory plan: savings added in order as the free device memory shrinks (a faked budget), the
config's own choices kept, and the model traced with the plan's computation."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from e2f_testing import brute_force_graph, random_molecule

from e2former_jax.config import AttentionImpl, Precision, paper_config, tiny_config
from e2former_jax.nn import memory
from e2former_jax.nn.model import E2Former
from e2former_jax.potential import energy_and_forces

NUM_ATOMS, NUM_NEIGHBORS, FLOAT32 = 10_000, 32, 4


@dataclasses.dataclass
class FakeDevice:
  """A device with a given allocator limit and use (None: no statistics, as some platforms)."""

  platform: str = "gpu"
  limit: int | None = None
  in_use: int = 0

  def memory_stats(self):
    return None if self.limit is None else {"bytes_limit": self.limit, "bytes_in_use": self.in_use}


def needed(config) -> float:
  return memory.forces_bytes(config, NUM_ATOMS, NUM_NEIGHBORS, FLOAT32, "gpu")


def planned(config, free: int):
  return memory.plan(config, NUM_ATOMS, NUM_NEIGHBORS, FLOAT32, FakeDevice(limit=free + 1000,
                                                                           in_use=1000))


def test_savings_added_in_order_as_memory_shrinks():
  config = paper_config()
  plain, chunks, both = memory.candidates(config)
  assert (chunks.edge_chunk_atoms, chunks.remat) == (memory.AUTO_EDGE_CHUNK_ATOMS, False)
  assert (both.edge_chunk_atoms, both.remat) == (memory.AUTO_EDGE_CHUNK_ATOMS, True)
  assert needed(plain) > needed(chunks) > needed(both) > 0
  # The budget is MEMORY_HEADROOM of the free bytes: just enough, then just too little, for each.
  for option, fallback in ((plain, chunks), (chunks, both)):
    enough = int(np.ceil(needed(option) / memory.MEMORY_HEADROOM))
    assert planned(config, enough) == option
    assert planned(config, enough - 1000) == fallback
  assert planned(config, 1) == both  # nothing fits: the most saving computation


def test_mixed_precision_plans_with_its_share_of_the_bytes():
  full, mixed = paper_config(precision=Precision.FULL), paper_config(precision=Precision.MIXED)
  assert needed(mixed) == pytest.approx(memory.MIXED_PRECISION_SHARE * needed(full))
  # Just enough memory to keep every activation in mixed precision: float32 must chunk there.
  free = int(np.ceil(needed(mixed) / memory.MEMORY_HEADROOM))
  assert planned(mixed, free) == mixed
  assert planned(full, free).edge_chunk_atoms == memory.AUTO_EDGE_CHUNK_ATOMS


def test_the_configs_own_choices_are_kept():
  rematerialised = paper_config(remat=True)
  assert [c.remat for c in memory.candidates(rematerialised)] == [True, True]
  assert planned(rematerialised, 1) == rematerialised.replace(
      edge_chunk_atoms=memory.AUTO_EDGE_CHUNK_ATOMS)
  chunked = paper_config(edge_chunk_atoms=100)
  assert [c.edge_chunk_atoms for c in memory.candidates(chunked)] == [100, 100]
  # Unknown free memory: the config as it is.
  assert memory.plan(paper_config(), NUM_ATOMS, NUM_NEIGHBORS, FLOAT32, FakeDevice()) == paper_config()


def test_free_bytes():
  assert memory.free_bytes(FakeDevice(limit=5000, in_use=1200)) == 3800
  assert memory.free_bytes(FakeDevice()) is None
  host = memory.free_bytes(jax.devices("cpu")[0])  # free physical memory where the OS says
  assert host is None or host > 0


@pytest.mark.parametrize("free, expected", [(1 << 50, {}), (1, dict(edge_chunk_atoms=8, remat=True))],
                         ids=["fits", "fits nothing"])
def test_model_computes_as_planned(monkeypatch, free, expected):
  """Energy + forces of the auto-planned model trace to the same program as the planned config."""
  monkeypatch.setattr(memory, "AUTO_EDGE_CHUNK_ATOMS", 8)
  monkeypatch.setattr(memory, "free_bytes", lambda device: free)
  rng = np.random.default_rng(0)
  graph = brute_force_graph([(*random_molecule(rng, 20), 0, 1)], cutoff=4.5, max_neighbors=8,
                            dtype=np.float32)
  config = tiny_config(max_neighbors=8, num_layers=1)
  params = jax.eval_shape(E2Former(config).init, jax.random.key(0), graph)

  def program(config):
    return str(jax.make_jaxpr(lambda p, g: energy_and_forces(E2Former(config), p, g))(params, graph))

  fixed = config.replace(auto_memory=False)
  assert program(config) == program(fixed.replace(**expected))
  assert program(config) != program(fixed.replace(edge_chunk_atoms=8))


def test_fused_radial_mlps_plan_as_chunks_and_never_add_them():
  """Differentiated through the Pallas kernels, the radial MLPs hold no activation in energy +
  forces, chunked or not: the estimate is the chunked one's, and the only saving left to add is
  rematerialisation. With the forward kernel alone, forces differentiate XLA's layers: planned as
  XLA."""
  xla = paper_config()
  forward_only = xla.replace(radial_impl=AttentionImpl.PALLAS)
  fused = forward_only.replace(radial_vjp_kernel=True)
  assert needed(forward_only) == needed(xla)
  assert len(memory.candidates(forward_only)) == 3
  assert needed(fused) == needed(xla.replace(edge_chunk_atoms=memory.AUTO_EDGE_CHUNK_ATOMS))
  assert needed(fused) < needed(xla)
  assert memory.candidates(fused) == [fused, fused.replace(remat=True)]
  assert planned(fused, 1) == fused.replace(remat=True)
