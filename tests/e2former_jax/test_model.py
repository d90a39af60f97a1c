"""Model-level physics and consistency tests (issue 3)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from e2f_testing import (F32_RTOL, SECOND_ORDER_RTOL, assert_close, brute_force_graph, buffer_shapes,
                         jaxpr_equations, random_molecule)
from e2former_jax import so3
from e2former_jax.config import (AttentionImpl, MessagePath, Precision, paper_config, resolve_precision,
                                 tiny_config)
from e2former_jax.nn.model import E2Former
from e2former_jax.potential import energy_and_forces as _energy_and_forces

CUTOFF = 4.5
K = 12
# Ways of computing the same model (E2FormerConfig fields): 24 atoms in chunks of 5 leave a partial
# chunk.
COMPUTE_OPTIONS = (dict(remat=True), dict(edge_chunk_atoms=5))
# Every graph of these tests is padded to the same shape so that each jitted function compiles
# once per dtype (XLA compilation dominates the cost of these tests on CPU).
NUM_NODES, NUM_MOLECULES = 24, 3


def graph_of(mols, dtype=np.float32, **padding):
  sizes = dict(num_nodes=NUM_NODES, num_molecules=NUM_MOLECULES, max_neighbors=K) | padding
  return brute_force_graph(mols, cutoff=CUTOFF, dtype=dtype, **sizes)

# Compiled once per (model, shapes): eager op-by-op execution of the whole network is slow.
energy_and_forces = jax.jit(_energy_and_forces, static_argnums=0, static_argnames="conservative")
apply = jax.jit(lambda model, params, graph: model.apply(params, graph), static_argnums=0)


def random_rotation(rng) -> np.ndarray:
  q, r = np.linalg.qr(rng.normal(size=(3, 3)))
  q = q * np.sign(np.diag(r))
  return q if np.linalg.det(q) > 0 else -q


def molecules(rng, sizes=(7, 11), charges=(0, 1), spins=(1, 2)):
  return [(*random_molecule(rng, n), q, s) for n, q, s in zip(sizes, charges, spins)]


def init_model(config, graph, seed=0):
  model = E2Former(config)
  return model, jax.jit(model.init)(jax.random.key(seed), graph)


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(1)
  mols = molecules(rng)
  cfg = tiny_config(max_neighbors=K)
  graph = graph_of(mols)
  model, params = init_model(cfg, graph)
  return cfg, mols, graph, model, params


def test_rotation_invariance_and_equivariance(setup):
  cfg, mols, graph, model, params = setup
  rot = random_rotation(np.random.default_rng(2))
  rotated = [(z, pos @ rot.T, q, s) for z, pos, q, s in mols]
  graph_r = graph_of(rotated)
  out, out_r = apply(model, params, graph), apply(model, params, graph_r)
  np.testing.assert_allclose(out_r.energy, out.energy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out_r.direct_forces, out.direct_forces @ rot.T, rtol=1e-4, atol=1e-5)
  # Every degree block of the node features rotates with its Wigner matrix.
  for l in range(1, cfg.lmax + 1):
    d = np.asarray(so3.wigner_d(l, jnp.asarray(rot)))
    rows = slice(l * l, (l + 1) ** 2)
    expected = np.einsum("ij,njc->nic", d, out.features[:, rows])
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out_r.features[:, rows], expected, atol=1e-5 * scale)
  _, forces = energy_and_forces(model, params, graph)
  _, forces_r = energy_and_forces(model, params, graph_r)
  np.testing.assert_allclose(forces_r, forces @ rot.T, rtol=1e-4, atol=1e-5 * np.abs(forces).max())


def test_power_spectrum_starts_as_the_plain_model_and_keeps_its_symmetries(setup):
  cfg, mols, graph, model, params = setup
  ps_model, ps_params = init_model(cfg.replace(power_spectrum=True), graph)
  extra = ps_params["params"].pop("power_spectrum")
  jax.tree.map(np.testing.assert_array_equal, ps_params, params)  # the same initial weights elsewhere
  np.testing.assert_array_equal(extra["mix"]["kernel"], 0.0)
  ps_params["params"]["power_spectrum"] = extra
  np.testing.assert_array_equal(apply(ps_model, ps_params, graph).energy, apply(model, params, graph).energy)
  # Trained weights: the term changes the energy, and energy and forces keep their symmetries and
  # ignore padding (the bias reaches padded atoms' rows too).
  extra["mix"] = {name: jax.random.normal(jax.random.key(3), w.shape) for name, w in extra["mix"].items()}
  energy, forces = energy_and_forces(ps_model, ps_params, graph)
  assert np.abs(energy - apply(model, params, graph).energy).max() > 1e-3
  rot = random_rotation(np.random.default_rng(4))
  energy_r, forces_r = energy_and_forces(ps_model, ps_params, graph_of([(z, pos @ rot.T, q, s)
                                                                         for z, pos, q, s in mols]))
  np.testing.assert_allclose(energy_r, energy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(forces_r, forces @ rot.T, rtol=1e-4, atol=1e-5 * np.abs(forces).max())
  energy_p, forces_p = energy_and_forces(ps_model, ps_params, graph_of(mols, num_nodes=NUM_NODES + 9,
                                                                        num_molecules=NUM_MOLECULES + 3))
  np.testing.assert_allclose(energy_p[:NUM_MOLECULES], energy, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(forces_p[:NUM_NODES], forces, atol=1e-5 * np.abs(forces).max())


def test_translation_invariance(setup):
  cfg, mols, graph, model, params = setup
  shifted = graph.replace(positions=graph.positions + jnp.asarray([13.0, -7.0, 2.5]))
  e0, f0 = energy_and_forces(model, params, graph)
  e1, f1 = energy_and_forces(model, params, shifted)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f1, f0, atol=1e-4 * np.abs(f0).max())


def test_permutation_equivariance(setup):
  cfg, mols, graph, model, params = setup
  rng = np.random.default_rng(3)
  perms = [rng.permutation(len(z)) for z, *_ in mols]
  permuted = [(z[p], pos[p], q, s) for (z, pos, q, s), p in zip(mols, perms)]
  graph_p = graph_of(permuted)
  e0, f0 = energy_and_forces(model, params, graph)
  e1, f1 = energy_and_forces(model, params, graph_p)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-5)
  offsets = np.cumsum([0] + [len(p) for p in perms])[:-1]
  full_perm = np.concatenate([p + o for p, o in zip(perms, offsets)])
  np.testing.assert_allclose(f1[:len(full_perm)], np.asarray(f0)[full_perm], atol=1e-5 * np.abs(f0).max())


def test_padding_invariance(setup):
  cfg, mols, graph, model, params = setup
  n = sum(len(z) for z, *_ in mols)
  padded = graph_of(mols, max_neighbors=K + 5, num_nodes=NUM_NODES + 9, num_molecules=NUM_MOLECULES + 3)
  # Fill padded atom slots with junk that must be ignored.
  padded = padded.replace(positions=padded.positions.at[n:].set(0.3), species=padded.species.at[n:].set(0))
  e0, f0 = energy_and_forces(model, params, graph)
  e1, f1 = energy_and_forces(model, params, padded)
  np.testing.assert_allclose(e1[:NUM_MOLECULES], e0, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(e1[len(mols):], 0.0)
  np.testing.assert_allclose(f1[:NUM_NODES], f0, atol=1e-5 * np.abs(f0).max())
  np.testing.assert_array_equal(f1[n:], 0.0)


def test_forces_sum_to_zero(setup):
  cfg, mols, graph, model, params = setup
  _, forces = energy_and_forces(model, params, graph)
  start = 0
  for z, *_ in mols:
    total = np.asarray(forces[start:start + len(z)]).sum(0)
    assert np.abs(total).max() < 1e-4 * np.abs(forces).max(), total
    start += len(z)


def test_conservative_forces_match_finite_differences(x64):
  rng = np.random.default_rng(4)
  mols = molecules(rng, sizes=(6,), charges=(0,), spins=(1,))
  graph = graph_of(mols, dtype=np.float64)
  model, params = init_model(tiny_config(max_neighbors=K), graph)
  _, forces = energy_and_forces(model, params, graph)
  energy = lambda pos: apply(model, params, graph.replace(positions=pos)).energy.sum()
  eps = 1e-5
  for atom, axis in [(0, 0), (2, 1), (5, 2)]:
    step = jnp.zeros_like(graph.positions).at[atom, axis].set(eps)
    fd = -(energy(graph.positions + step) - energy(graph.positions - step)) / (2 * eps)
    np.testing.assert_allclose(forces[atom, axis], fd, rtol=1e-6, atol=1e-8)


def test_node_centric_equals_per_edge(x64):
  rng = np.random.default_rng(5)
  mols = molecules(rng)
  graph = graph_of(mols, dtype=np.float64)
  cfg = tiny_config(max_neighbors=K)
  model, params = init_model(cfg, graph)
  per_edge = E2Former(cfg.replace(message_path=MessagePath.PER_EDGE))
  out_nc, out_pe = apply(model, params, graph), apply(per_edge, params, graph)
  np.testing.assert_allclose(out_nc.features, out_pe.features, rtol=1e-10, atol=1e-10)
  np.testing.assert_allclose(out_nc.energy, out_pe.energy, rtol=1e-10, atol=1e-10)
  _, f_nc = energy_and_forces(model, params, graph)
  _, f_pe = energy_and_forces(per_edge, params, graph)
  np.testing.assert_allclose(f_nc, f_pe, rtol=1e-9, atol=1e-10)


def test_energy_smooth_at_cutoff(x64):
  """A neighbour crossing r_c changes energy and force continuously: E(r_c - h) - E(r_c) ~ h^3."""
  cfg = tiny_config(max_neighbors=K)
  base = np.array([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [-0.4, 1.0, 0.0]])

  def graph_at(r):
    pos = np.vstack([base, [[0.0, 0.0, r]]])  # only the pair (0, 3) is near the cutoff
    return graph_of([(np.array([6, 1, 8, 7], np.int32), pos, 0, 1)], dtype=np.float64)

  model, params = init_model(cfg, graph_at(CUTOFF - 0.5))
  energy = lambda r: float(apply(model, params, graph_at(r)).energy[0])
  outside = energy(CUTOFF + 1e-3)
  assert abs(energy(CUTOFF + 2e-3) - outside) < 1e-12  # no edge: no dependence beyond rounding
  steps = np.array([1e-3, 5e-4, 2.5e-4])
  jumps = np.array([energy(CUTOFF - h) - outside for h in steps])
  # The envelope vanishes with its first two derivatives at r_c, so halving h divides the
  # difference by ~8 (a discontinuity or a kink would give ratios near 1 or 2).
  ratios = jumps[:-1] / jumps[1:]
  assert np.all((ratios > 6.5) & (ratios < 9.5)), (jumps, ratios)
  # Forces vanish like h^2: at h = 1e-4 the entering edge moves them by < 1e-4 of their size.
  _, forces = energy_and_forces(model, params, graph_at(CUTOFF - 1e-4))
  _, forces_out = energy_and_forces(model, params, graph_at(CUTOFF + 1e-4))
  np.testing.assert_allclose(forces, forces_out, atol=1e-4 * np.abs(forces_out).max())


def test_jit_compiles_once(setup):
  cfg, mols, graph, model, params = setup
  traces = []

  @jax.jit
  def step(params, graph):
    traces.append(1)
    return energy_and_forces(model, params, graph)

  step(params, graph)
  step(params, graph.replace(positions=graph.positions + 0.01))
  step(params, graph.replace(positions=graph.positions * 1.01))
  assert len(traces) == 1


@functools.partial(jax.jit, static_argnums=0)
def force_loss_gradient(model, params, graph):
  """Parameter gradient of a force loss: the training gradient (a double backward)."""
  def loss(params):
    _, forces = _energy_and_forces(model, params, graph)
    return jnp.abs(forces - 1.0).sum()
  return jax.grad(loss)(params)


def test_force_loss_parameter_gradient_is_finite(setup):
  """The training gradient is finite, nonzero, and the same with remat blocks and the radial MLPs in
  chunks of atoms (float32 second-order tolerance of the kernel tests). Both options at once: one
  compilation of the double backward instead of two (test_compute_options_change_memory_not_numbers
  takes them one at a time)."""
  cfg, mols, graph, model, params = setup
  leaves = jax.tree.leaves(force_loss_gradient(model, params, graph))
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert sum(float(jnp.abs(g).sum()) for g in leaves) > 0
  other = E2Former(cfg.replace(**{k: v for changes in COMPUTE_OPTIONS for k, v in changes.items()}))
  for g0, g1 in zip(leaves, jax.tree.leaves(force_loss_gradient(other, params, graph))):
    assert_close(g1, g0, SECOND_ORDER_RTOL)


def test_mixed_precision_error_budget(setup):
  """bfloat16 products and storage (Precision.MIXED, here with chunks) against
  float32 on random molecules: energies and forces within 16 bfloat16 epsilons of their scale, the
  force-loss parameter gradient within 32; outputs in float32, and really rounded to bfloat16."""
  cfg, mols, graph, model, params = setup
  mixed = E2Former(cfg.replace(precision=Precision.MIXED, edge_chunk_atoms=8))
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  (e0, f0), (e1, f1) = energy_and_forces(model, params, graph), energy_and_forces(mixed, params, graph)
  assert e1.dtype == f1.dtype == jnp.float32
  energy_error = float(jnp.abs(e1 - e0).max() / jnp.abs(e0).max())
  force_error = float(jnp.sqrt(jnp.mean((f1 - f0) ** 2) / jnp.mean(f0**2)))
  g0, g1 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(force_loss_gradient(m, params, graph))])
            for m in (model, mixed))
  gradient_error = float(jnp.linalg.norm(g1 - g0) / jnp.linalg.norm(g0))
  assert energy_error <= 16 * eps and force_error <= 16 * eps and gradient_error <= 32 * eps, \
      (energy_error, force_error, gradient_error)
  assert min(energy_error, force_error, gradient_error) > eps / 16  # not float32's rounding


def test_auto_precision_is_mixed_exactly_on_gpu(setup, monkeypatch):
  """Precision.AUTO (the default) resolves by the platform being traced for: mixed on GPU, full
  elsewhere; the model traced for a (faked) GPU computes exactly what Precision.MIXED computes."""
  cfg, mols, graph, model, params = setup
  assert cfg.precision is Precision.AUTO and resolve_precision(Precision.AUTO) is Precision.FULL
  xla = cfg.replace(attention_impl=AttentionImpl.XLA)  # the kernels need a real GPU
  on_cpu = energy_and_forces(E2Former(xla), params, graph)
  full = energy_and_forces(E2Former(xla.replace(precision=Precision.FULL)), params, graph)
  mixed = energy_and_forces(E2Former(xla.replace(precision=Precision.MIXED)), params, graph)
  # The choice is made at trace time and jit's cache is keyed by the configuration: trace anew on
  # the faked GPU, and drop that trace before any other test can reuse it.
  jax.clear_caches()
  try:
    with monkeypatch.context() as patch:
      patch.setattr(jax, "default_backend", lambda: "gpu")
      assert resolve_precision(Precision.AUTO) is Precision.MIXED
      for explicit in (Precision.FULL, Precision.MIXED):
        assert resolve_precision(explicit) is explicit  # an explicit choice is kept on any platform
      on_gpu = energy_and_forces(E2Former(xla), params, graph)
  finally:
    jax.clear_caches()
  for got, want in ((on_cpu, full), (on_gpu, mixed)):
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a, b)
  assert not np.array_equal(on_gpu[1], on_cpu[1])


def test_paper_parameter_count():
  rng = np.random.default_rng(6)
  graph = brute_force_graph([(*random_molecule(rng, 4), 0, 1)], cutoff=4.5, max_neighbors=32,
                            dtype=np.float32)
  cfg = paper_config()
  shapes = jax.eval_shape(E2Former(cfg).init, jax.random.key(0), graph)
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  # docs/model.md §9.6: ~24.5 M with the reference's dead parameters and 300/256-row type tables; ours
  # drops those (docs/decisions.md D7), landing a few hundred thousand lower.
  assert 23.5e6 < count < 24.6e6, count


def test_pallas_kernel_path_matches_xla(setup):
  """The model with the Pallas kernels (interpret mode on CPU) equals the jnp path, forces included."""
  cfg, mols, graph, model, params = setup
  kernel_model = E2Former(cfg.replace(attention_impl=AttentionImpl.PALLAS_INTERPRET))
  e0, f0 = energy_and_forces(model, params, graph)
  e1, f1 = energy_and_forces(kernel_model, params, graph)
  np.testing.assert_allclose(e1, e0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(f1, f0, atol=1e-5 * np.abs(f0).max())


@pytest.mark.parametrize("vjp_kernel, memory", [(False, "chunks"), (True, "chunks"), (False, "remat")],
                         ids=["xla-derivatives", "vjp-kernel", "xla-derivatives-remat"])
def test_pallas_radial_kernels(setup, vjp_kernel, memory):
  """With ``radial_impl`` the Pallas kernels, every radial MLP (the attention gates and the
  edge-degree embedding's) runs as the fused forward kernel in energy + direct forces; energy +
  forces run XLA's layers, or with ``radial_vjp_kernel`` the forward kernel and the fused backward
  kernel of each. Energies, direct and conservative forces equal the jnp path's; so does the
  force-loss parameter gradient, whose second derivative is the MLPs' own. The MLPs in chunks of
  atoms, or rematerialised whole."""
  cfg, mols, graph, _, _ = setup
  cfg = cfg.replace(direct_force_head=True, edge_chunk_atoms=4 if memory == "chunks" else None,
                    remat=memory == "remat")
  model, params = init_model(cfg, graph)
  kernel_model = E2Former(cfg.replace(radial_impl=AttentionImpl.PALLAS_INTERPRET,
                                      radial_vjp_kernel=vjp_kernel))
  direct = functools.partial(_energy_and_forces, conservative=False)

  def count(fn):  # fused radial MLP calls: (forward, backward)
    jaxpr = jax.make_jaxpr(fn, static_argnums=0)(kernel_model, params, graph).jaxpr
    names = [e.params["name"] for e in jaxpr_equations(jaxpr) if e.primitive.name == "pallas_call"]
    return names.count("radial_mlp_fwd"), names.count("radial_mlp_geometry_vjp")

  mlps = cfg.num_layers + cfg.lmax + 1
  assert count(direct) == (mlps, 0)
  assert count(_energy_and_forces) == ((mlps, mlps) if vjp_kernel else (0, 0))
  for forces in (direct, _energy_and_forces):
    e0, f0 = forces(model, params, graph)
    e1, f1 = forces(kernel_model, params, graph)
    assert_close(e1, e0, F32_RTOL)
    assert_close(f1, f0, F32_RTOL)
  assert_close(force_loss_gradient(kernel_model, params, graph),
               force_loss_gradient(model, params, graph), SECOND_ORDER_RTOL)


@pytest.mark.parametrize("changes", COMPUTE_OPTIONS, ids=str)
def test_compute_options_change_memory_not_numbers(setup, changes):
  """Rematerialised blocks, or radial MLPs in chunks of atoms: same parameters, energy and forces,
  less temporary memory (gradient: above)."""
  cfg, mols, graph, model, params = setup
  other = E2Former(cfg.replace(**changes))
  assert jax.tree.structure(jax.eval_shape(other.init, jax.random.key(0), graph)) == \
      jax.tree.structure(params)
  e0, f0 = energy_and_forces(model, params, graph)
  e1, f1 = energy_and_forces(other, params, graph)
  assert_close(e1, e0, F32_RTOL)
  assert_close(f1, f0, F32_RTOL)

  def temp_bytes(model):
    compiled = jax.jit(_energy_and_forces, static_argnums=0).lower(model, params, graph).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(other) < temp_bytes(model)


def test_edge_chunks_store_no_per_edge_hidden_activation(tmp_path):
  """XLA's buffer assignment of energy + forces and of the force-loss parameter gradient holds no
  [N, K, hidden] buffer when the radial MLPs run in chunks of atoms; it does when they do not."""
  hidden = 40  # no other dimension in play has this size
  cfg = tiny_config(max_neighbors=K, num_layers=1, lmax=1, edge_hidden=hidden)
  graph = graph_of(molecules(np.random.default_rng(7)))
  model, params = init_model(cfg, graph)
  chunked = E2Former(cfg.replace(edge_chunk_atoms=8))

  def per_edge_hidden(program, name, *args):
    shapes = buffer_shapes(jax.jit(program).lower(*args), tmp_path / name)
    # Any layout of [N, K, hidden], or chunks of it stacked over the atoms.
    return [s for s in shapes if hidden in s and np.prod(s) >= NUM_NODES * K * hidden]

  def force_loss_gradient(model):
    return jax.grad(lambda p: jnp.sum(_energy_and_forces(model, p, graph)[1] ** 2))

  assert per_edge_hidden(functools.partial(_energy_and_forces, model), "reference", params, graph)
  assert per_edge_hidden(functools.partial(_energy_and_forces, chunked), "forces", params, graph) == []
  assert per_edge_hidden(force_loss_gradient(chunked), "train", params) == []
