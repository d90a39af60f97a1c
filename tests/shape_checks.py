"""Runs the model, the dispatcher, the kernels and their references, the neighbour lists and the
SO(3) toolkit with every jaxtyping annotation of ``e2former_jax`` and ``pallas_kernels`` checked
(``jaxtyping.jaxtyped`` with beartype, put on every function and dataclass of both packages by
jaxtyping's import hook), and prints one JSON object ``{check: "ok" or the traceback}``.

A script, run by tests/test_shapes.py in a fresh interpreter: the hook acts only on modules imported
after it is installed, and the product itself is never decorated. Annotations are checked when a
function is called, which under jax is when it is traced: the model is traced (``jax.eval_shape``:
every shape, nothing compiled), the kernels run in the Pallas interpreter on tiny grids, the host
code runs as it is.
"""

from __future__ import annotations

import json
import sys
import traceback

import jaxtyping

jaxtyping.install_import_hook(["e2former_jax", "pallas_kernels"], "beartype.beartype")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import e2former_jax  # noqa: E402
import pallas_kernels  # noqa: E402
from e2former_jax import neighbors, ops, so3  # noqa: E402
from e2former_jax.config import AttentionImpl, MessagePath, SoftmaxSink  # noqa: E402
from e2former_jax.interop.predictor import Predictor  # noqa: E402

CHECKS = {}


def check(fn):
  CHECKS[fn.__name__] = fn
  return fn


def _molecules(rng, sizes=(4, 3)):
  return [e2former_jax.Structure(numbers=rng.integers(1, 9, n),
                                 positions=rng.normal(size=(n, 3)) * 1.2) for n in sizes]


def _cell(rng):
  cell = np.diag([3.2, 3.4, 3.6]) + 0.1 * rng.normal(size=(3, 3))
  positions = rng.uniform(size=(5, 3)) @ cell
  return e2former_jax.Structure(numbers=rng.integers(1, 9, 5), positions=positions, cell=cell,
                                pbc=(True, True, True))


def _model_run(config, graph, *, stress=False):
  model = e2former_jax.E2Former(config)
  params = jax.eval_shape(model.init, jax.random.key(0), graph)
  if stress:
    return jax.eval_shape(lambda p, g: e2former_jax.energy_forces_stress(model, p, g), params,
                          graph)
  # Plain tuples out: the checked dataclasses reject the ShapeDtypeStruct leaves eval_shape returns.
  return jax.eval_shape(
      lambda p, g: (model.apply(p, g).direct_forces, *e2former_jax.energy_and_forces(model, p, g)),
      params, graph)


@check
def model_molecules():
  rng = np.random.default_rng(0)
  config = e2former_jax.tiny_config(direct_force_head=True)
  graph = e2former_jax.build_graph(_molecules(rng), cutoff=config.cutoff,
                                   max_neighbors=config.max_neighbors, num_nodes=9, num_molecules=3)
  direct_forces, energy, forces = _model_run(config, graph)
  assert direct_forces.shape == forces.shape == (9, 3) and energy.shape == (3,)


@check
def model_per_edge_max_logit_sink():
  rng = np.random.default_rng(1)
  config = e2former_jax.tiny_config(message_path=MessagePath.PER_EDGE,
                                    softmax_sink=SoftmaxSink.MAX_LOGIT)
  graph = e2former_jax.build_graph(_molecules(rng), cutoff=config.cutoff,
                                   max_neighbors=config.max_neighbors, reference_slots=True)
  _model_run(config, graph)


@check
def model_cell_stress_and_predictor():
  rng = np.random.default_rng(2)
  config = e2former_jax.tiny_config(edge_chunk_atoms=3)
  graph = e2former_jax.build_graph([_cell(rng), *_molecules(rng, (3,))], cutoff=config.cutoff,
                                   max_neighbors=config.max_neighbors)
  energy, forces, stress = _model_run(config, graph, stress=True)
  assert stress.shape == (2, 3, 3)
  model = e2former_jax.E2Former(config)
  predictor = lambda params: Predictor(model, params, {1: -0.5, 6: -37.8, 8: -75.0})  # noqa: E731
  params = jax.eval_shape(model.init, jax.random.key(0), graph)
  total = jax.eval_shape(lambda p, g: predictor(p).total_energy(g), params, graph)
  assert total.shape == energy.shape
  predictor(params).check_species(np.array([1, 6, 8]))
  predictor(params).state_offset(jnp.int32(0), jnp.int32(1))


@check
def dispatcher_in_the_pallas_interpreter():
  rng = np.random.default_rng(3)
  n, m, k, h, d, c, lmax = 5, 4, 3, 2, 4, 4, 1
  s = (lmax + 1) ** 2
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  nbr_idx = jnp.asarray(rng.integers(0, m + 1, (n, k)), jnp.int32)
  nbr_mask = nbr_idx < m
  q, key, gate, post = f32(n, h, d), f32(m, h, d), f32(n, k, h), f32(n, k, h)
  envelope, vectors, v = jnp.abs(f32(n, k)), f32(n, k, 3), f32(m, s, c)
  for impl in (AttentionImpl.XLA, AttentionImpl.PALLAS_INTERPRET):
    sink = ops.max_slot_logit(q, key, gate, nbr_idx, nbr_mask, impl=impl)
    message = ops.message_attention(q, key, gate, post, envelope, vectors, v, nbr_idx, nbr_mask,
                                    impl=impl, sink_logit=sink)
    assert message.shape == (n, so3.num_first_order_rows(lmax), c)
  dots = f32(n, k, h)
  ops.attention_weights(dots, gate, post, envelope, nbr_mask, head_dim=d, sink_logit=sink)


@check
def kernels_and_references():
  rng = np.random.default_rng(4)
  n, m, k, h, x, d = 5, 4, 3, 2, 3, 4
  f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  nbr_idx = jnp.asarray(rng.integers(0, m + 1, (n, k)), jnp.int32)
  nbr_mask = nbr_idx < m
  a, b, w = f32(n, x, h), f32(m, x, h), f32(n, k, h)
  coupling = so3.first_order_coupling(1)
  rows, groups = coupling.shape[1], 2
  attention = (f32(n, d, h), f32(m, d, h), f32(n, k, h), f32(n, k, h), jnp.abs(f32(n, k)),
               f32(n, k, 3), f32(m, rows * groups, h), nbr_idx, nbr_mask)
  weights = (f32(n, k, h), f32(n, k, h), f32(n, k, h), jnp.abs(f32(n, k)), nbr_mask, f32(n, k, h))
  for interpret, suffix in ((True, ""), (False, "_reference")):
    op = lambda name: getattr(pallas_kernels, name + suffix)  # noqa: E731
    kw = dict(interpret=interpret)
    op("edge_dot")(a, b, nbr_idx, nbr_mask, **kw)
    op("gather_sum")(w, b, nbr_idx, nbr_mask, **kw)
    op("scatter_sum")(w, a, nbr_idx, nbr_mask, num_sources=m, **kw)
    out = op("message_attention")(*attention, coupling=coupling, scale=d**-0.5,
                                  sink_logit=f32(n, h), **kw)
    assert out.shape == (n, coupling.shape[0] * groups, h)
    op("attention_weights_vjp")(*weights, scale=0.5, sink=1e-3, **kw)
    op("attention_weights_vjp")(*weights, scale=0.5, sink=1e-3, sink_logit=f32(n, h), **kw)
  pallas_kernels.attention_weights(*weights[:5], scale=0.5, sink=1e-3)


@check
def neighbor_lists():
  rng = np.random.default_rng(5)
  cell_structure = _cell(rng)
  positions, cell = cell_structure.positions, cell_structure.cell
  neighbors.neighbor_list(positions, 2.5, 6, cell=cell, pbc=True)
  neighbors.reference_neighbor_slots(positions, 2.5, 6)
  grid = neighbors.cell_grid(positions, cell, (True, True, True), 2.5)
  found = neighbors.device_neighbor_list(jnp.asarray(positions, jnp.float32),
                                         jnp.asarray(cell, jnp.float32), pbc=(True, True, True),
                                         cutoff=2.5, max_neighbors=6, grid=grid)
  assert found.idx.shape == (5, 6)
  x = jnp.asarray(positions, jnp.float32)
  selected = neighbors.select_neighbors(x, None, lambda a, b: a - b, cutoff=2.5, max_neighbors=6)
  graph = neighbors.system_graph(x, jnp.asarray(cell_structure.numbers), selected, 0, 1)
  assert graph.nbr_idx.shape == (5, 6)
  box = neighbors.box_to_cell(jnp.float32(7.0))
  neighbors.needs_all_images(np.float64(7.0), 2.5)
  image_list = neighbors.image_neighbor_list(box.T, 2.5).allocate(x)
  neighbors.select_image_neighbors(x, box, x @ jnp.linalg.inv(box), image_list.update(x),
                                   cutoff=2.5, max_neighbors=6)


@check
def so3_toolkit():
  rng = np.random.default_rng(6)
  h, v = jnp.asarray(rng.normal(size=(4, 9, 3))), jnp.asarray(rng.normal(size=(4, 3)))
  angles = jnp.asarray(rng.normal(size=(3, 4)))

  def run(h, v, angles):  # traced only: the annotations are checked as it traces
    so3.spherical_harmonics(v, 2, normalize=True)
    for tensor_product in (so3.tensor_product_vector, so3.tensor_product_vector_aligned,
                           so3.tensor_product_vector_dense):
      assert tensor_product(h, v).shape == (4, 20, 3)
    rotation = so3.rotation_matrix_from_angles(*angles)
    so3.wigner_d(2, rotation)
    so3.wigner_d_from_angles(2, angles[0], angles[1], 0.0)
    so3.wigner_d_block_diag(2, rotation)
    so3.safe_norm(v)

  jax.eval_shape(run, h, v, angles)
  for table in (so3.first_order_coupling, so3.global_sparse_cg, so3.aligned_parity_table,
                so3.row_degrees, so3.row_orders):
    table(2)
  so3.clebsch_gordan(1, 2, 3)
  so3.clebsch_gordan_wonorm(2, 1, 2)


@check
def mis_shaped_input_is_rejected():
  rng = np.random.default_rng(7)
  graph = e2former_jax.build_graph(_molecules(rng), cutoff=4.0, max_neighbors=4)
  try:
    graph.replace(species=graph.species[:-1])  # one atom short of the positions
  except jaxtyping.TypeCheckError as e:
    assert "species" in str(e), e
  else:
    raise AssertionError("a Graph with 6 species for 7 positions was accepted")
  n, k, h = 5, 3, 2
  # An [N, 1] envelope would broadcast over the slots without a word from the code.
  gate, envelope = jnp.ones((n, k, h)), jnp.ones((n, 1))
  try:
    pallas_kernels.attention_weights(gate, gate, gate, envelope, jnp.ones((n, k), bool), scale=1.0,
                                     sink=0.0)
  except jaxtyping.TypeCheckError as e:
    assert "envelope" in str(e), e
  else:
    raise AssertionError("attention_weights accepted an [N, 1] envelope for [N, K, H] dots")


def main() -> None:
  results = {}
  for name, fn in CHECKS.items():
    try:
      fn()
      results[name] = "ok"
    except Exception:  # every failure is reported, with its traceback
      results[name] = traceback.format_exc()
  json.dump(results, sys.stdout)


if __name__ == "__main__":
  main()
