"""JAX MD interface in periodic cells narrower than twice the cutoff: the all-images neighbour list."""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_md import simulate, space

from e2former_jax.interop import jax_md as e2f_md
from e2former_jax.neighbors import (ImageNeighborListFns, build_graph, image_neighbor_list,
                                    needs_all_images, neighbor_list)
from e2former_jax.potential import energy_forces_stress
from e2former_jax.structure import Structure

# Narrow cells (plane spacings below 2 x 4.5 A, the MICRO model's cutoff): several images of one
# atom are neighbours of another. Every lattice vector is longer than the cutoff, so no atom is its
# own neighbour (its images at +a and -a would tie): the host and the device search may break
# ties differently, and _check_narrow makes sure that no tie sits at the K-nearest boundary.
CUBIC_SIDE = 6.0
TRICLINIC = np.array([[5.2, 0.0, 0.0], [1.1, 5.4, 0.0], [0.6, -0.8, 5.6]])
NUM_ATOMS = 6
SUPERCELL = 2
# Host graphs of the cell and of its 2 x 2 x 2 supercell share one padded shape: one compilation.
HOST_NODES = NUM_ATOMS * SUPERCELL ** 3
# Energies are sums of the same edge terms in another order (float64): agreement to ~1e-13.
RTOL = 1e-9
FORCE_ATOL = 1e-9
# NVE run in the cubic cell: a small skin so that the list is rebuilt inside the compiled chunks.
RUN_SKIN, RUN_DT_FS, RUN_CHUNKS, RUN_CHUNK_STEPS = 0.1, 0.5, 3, 8
# Initial velocity (A/fs) of the atom that starts just inside a face of the box: it leaves through
# the face within the run, and the box wraps it to the other side.
CROSSING_SPEED = 0.05


def _random_cell_atoms(rng, cell: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n random C/N/O atoms in a periodic cell, no two (images included) closer than 1.1 A."""
  while True:
    positions = rng.uniform(0.0, 1.0, (n, 3)) @ cell
    if not neighbor_list(positions, 1.1, 1, cell=cell, pbc=True).mask.any():
      return rng.choice([6, 7, 8], n), positions


def _supercell(numbers, positions, cell) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  grid = np.stack(np.meshgrid(*[np.arange(SUPERCELL)] * 3, indexing="ij"), -1).reshape(-1, 3)
  images = (positions[None] + (grid @ cell)[:, None]).reshape(-1, 3)  # the cell's copy first
  return np.tile(numbers, len(grid)), images, SUPERCELL * cell


@pytest.fixture(scope="module")
def host_model(predictor):
  """float64 predictor and ``model(numbers, positions, cell) -> (total energy, forces, stress)`` (call
  it under x64); one jitted model for the module's tests, so its shape compiles once."""
  with jax.enable_x64(True):
    pred = predictor.with_dtype(jnp.float64)
  config = pred.config
  compute = jax.jit(functools.partial(energy_forces_stress, pred.model))

  def model(numbers, positions, cell):
    graph = build_graph([Structure(numbers, positions, cell=cell, pbc=True)], cutoff=config.cutoff,
                        max_neighbors=config.max_neighbors, num_nodes=HOST_NODES, dtype=np.float64)
    energy, forces, stress = jax.device_get(compute(pred.params, jax.tree.map(jnp.asarray, graph)))
    return float(energy[0]) + pred.reference_energy(numbers), forces[:len(numbers)], stress[0]

  return pred, model


def _check_narrow(cell, numbers, positions, cutoff, max_neighbors):
  """The structure needs several images of one source and truncates to the K nearest, tie-free."""
  assert needs_all_images(cell.T, cutoff)
  host = neighbor_list(positions, cutoff, 4 * max_neighbors, cell=cell, pbc=True)
  rows = [set(host.idx[i][host.mask[i]].tolist()) for i in range(len(numbers))]
  assert any(len(r) < host.mask[i].sum() for i, r in enumerate(rows))  # a source twice in a row
  assert host.mask.sum(axis=1).max() > max_neighbors  # the K-nearest truncation is exercised
  kth, next_one = host.distances[:, max_neighbors - 1], host.distances[:, max_neighbors]
  truncated = np.isfinite(next_one)
  assert np.all(next_one[truncated] - kth[truncated] > 1e-6)  # no tie at the K boundary


def test_triclinic_narrow_cell_matches_model_supercell_and_stress(x64, host_model, rng):
  """periodic_general, fractional coordinates: energy, forces and stress (both quantity.stress's
  perturbation derivative and the box derivative) of a narrow triclinic cell equal the model's on
  the host graph and 1/8 of its 2x2x2 supercell's; whole lattice translations of atoms (wrapping)
  leave them unchanged."""
  pred, model = host_model
  config = pred.config
  numbers, positions = _random_cell_atoms(rng, TRICLINIC, NUM_ATOMS)
  _check_narrow(TRICLINIC, numbers, positions, config.cutoff, config.max_neighbors)
  e_host, f_host, s_host = model(numbers, positions, TRICLINIC)
  e_super, f_super, _ = model(*_supercell(numbers, positions, TRICLINIC))
  np.testing.assert_allclose(e_super / SUPERCELL ** 3, e_host, rtol=RTOL)
  np.testing.assert_allclose(f_super[:NUM_ATOMS], f_host, atol=FORCE_ATOL)

  box = jnp.asarray(TRICLINIC.T)  # JAX MD: lattice vectors as columns
  displacement, _ = space.periodic_general(box)
  neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(
      displacement, box, pred, numbers, periodic=True, fractional_coordinates=True)
  assert isinstance(neighbor_fn, ImageNeighborListFns)
  frac = np.mod(positions @ np.linalg.inv(TRICLINIC), 1.0)
  nbrs = neighbor_fn.allocate(jnp.asarray(frac))
  assert not nbrs.did_buffer_overflow

  @jax.jit
  def evaluate(r, nb, box):
    """Energy, forces, dE/d box and dE/d eps of energy_fn(r, box=box, perturbation=1 + eps) at eps = 0
    (what quantity.stress differentiates), in one backward pass."""
    def energy_of(r, b, eps):
      return energy_fn(r, neighbor=nb, box=b, perturbation=jnp.eye(3) + eps)

    energy, (by_r, by_box, by_eps) = jax.value_and_grad(energy_of, argnums=(0, 1, 2))(
        r, box, jnp.zeros((3, 3)))
    # Fractional positions have Cartesian gradients in JAX MD (quantity.force's convention).
    return energy, -by_r, by_box, by_eps

  energy, forces, by_box, by_eps = jax.device_get(evaluate(jnp.asarray(frac), nbrs, box))
  np.testing.assert_allclose(float(energy), e_host, rtol=RTOL)
  np.testing.assert_allclose(forces, f_host, atol=FORCE_ATOL)
  assert np.abs(s_host).max() > 1e-4
  volume = abs(np.linalg.det(TRICLINIC))
  # quantity.stress is -(1/V) dE/d eps, the opposite sign of the model's (ASE's) convention.
  np.testing.assert_allclose(by_eps / volume, s_host, atol=1e-10)
  # At fixed fractional positions dE/d(cell) = (dE/d box)^T, and the strain derivative is
  # cell^T dE/d(cell): the image shifts S @ cell follow the box= keyword (NPT).
  np.testing.assert_allclose(TRICLINIC.T @ by_box.T / volume, s_host, atol=1e-10)

  # Whole lattice translations of some atoms (what wrapping does) keep the list and the energy.
  moved = frac + np.array([[1, 0, 0], [0, -1, 2], [0, 0, 0], [-1, -1, -1], [0, 0, 0], [0, 3, 0]])
  moved_energy, moved_forces, *_ = jax.device_get(evaluate(jnp.asarray(moved), nbrs, box))
  np.testing.assert_allclose(float(moved_energy), e_host, rtol=RTOL)
  np.testing.assert_allclose(moved_forces, f_host, atol=FORCE_ATOL)


def test_cubic_narrow_cell_nve_run_matches_the_model(x64, host_model, rng):
  """space.periodic, real coordinates, a 6 A box (cutoff 4.5 A): the all-images list is chosen,
  rebuilt inside the compiled chunks of run(), and follows an atom wrapped across a face; energies
  and forces along the trajectory equal the model's on host graphs, and 1/8 of the supercell's."""
  pred, model = host_model
  config = pred.config
  cell = np.eye(3) * CUBIC_SIDE
  numbers, positions = _random_cell_atoms(rng, cell, NUM_ATOMS)
  # A rigid translation (wrapped) puts atom 0 just inside the +x face.
  positions = np.mod(positions + [CUBIC_SIDE - 0.05 - positions[0, 0], 0.0, 0.0], CUBIC_SIDE)
  _check_narrow(cell, numbers, positions, config.cutoff, config.max_neighbors)
  e_host, f_host, _ = model(numbers, positions, cell)
  e_super, _, _ = model(*_supercell(numbers, positions, cell))
  np.testing.assert_allclose(e_super / SUPERCELL ** 3, e_host, rtol=RTOL)

  displacement, shift = space.periodic(CUBIC_SIDE)
  neighbor_fn, energy_fn = e2f_md.e2former_neighbor_list(
      displacement, CUBIC_SIDE, pred, numbers, periodic=True, dr_threshold=RUN_SKIN)
  assert isinstance(neighbor_fn, ImageNeighborListFns)
  nbrs = neighbor_fn.allocate(jnp.asarray(positions))
  _, apply_fn = simulate.nve(energy_fn, shift, RUN_DT_FS * e2f_md.FEMTOSECOND)
  mass = e2f_md.masses(numbers)[:, None]
  velocity = np.zeros((NUM_ATOMS, 3))
  velocity[0, 0] = CROSSING_SPEED / e2f_md.FEMTOSECOND  # A per time unit
  # The state nve's init_fn builds, with the model's initial force from the host graph (init_fn
  # would evaluate it once more, eagerly: seconds of CPU for the same numbers).
  state = simulate.NVEState(position=jnp.asarray(positions), momentum=mass * jnp.asarray(velocity),
                            force=jnp.asarray(f_host), mass=mass)

  traces = []

  def observe(state, nbrs):
    traces.append(None)  # trace time: once per compilation of a chunk
    return energy_fn(state.position, neighbor=nbrs)

  runs = list(e2f_md.run(apply_fn, state, num_chunks=RUN_CHUNKS, steps_per_chunk=RUN_CHUNK_STEPS,
                         neighbors=nbrs, neighbor_fn=neighbor_fn, observe_fn=observe))
  assert len(traces) == 1  # compiled once: no overflow, no re-allocation
  references = [np.asarray(nbrs.reference)]
  for steps, state, chunk_nbrs, energy in runs:
    assert not chunk_nbrs.did_buffer_overflow
    references.append(np.asarray(chunk_nbrs.reference))
    position = np.asarray(state.position)
    e_step, f_step, _ = model(numbers, position, cell)
    np.testing.assert_allclose(float(energy), e_step, rtol=RTOL, err_msg=f"step {steps}")
    np.testing.assert_allclose(np.asarray(state.force), f_step, atol=FORCE_ATOL, err_msg=f"step {steps}")
  assert position[0, 0] < 1.0  # atom 0 left through the +x face and was wrapped to the -x side
  # The list was rebuilt inside the compiled chunks (atom 0 moves 2 skins per chunk).
  assert not any(np.array_equal(a, b) for a, b in itertools.pairwise(references))


def test_small_cell_bad_inputs(predictor, cluster):
  numbers = cluster[0][:3]
  displacement, _ = space.periodic(CUBIC_SIDE)
  positions = jnp.asarray(np.array([[0.5, 0.5, 0.5], [2.0, 1.0, 3.0], [4.0, 4.5, 1.5]]))
  with pytest.raises(ValueError, match="cell is singular"):
    e2f_md.e2former_neighbor_list(displacement, jnp.asarray([[6.0, 3.0, 0.0], [0.0, 0.0, 0.0],
                                                             [0.0, 0.0, 6.0]]),
                                  predictor, numbers, periodic=True)
  with pytest.raises(ValueError, match="all_images=True needs a periodic space"):
    e2f_md.e2former_neighbor_list(displacement, CUBIC_SIDE, predictor, numbers, all_images=True)
  # A Dense list or all pairs cannot hold several images: the error names the all-images list.
  with pytest.raises(ValueError, match="2 x cutoff.*all_images=True"):
    e2f_md.e2former_energy(displacement, predictor, numbers, box=CUBIC_SIDE)
  with pytest.raises(ValueError, match="2 x cutoff.*all_images=True"):
    e2f_md.e2former_neighbor_list(displacement, CUBIC_SIDE, predictor, numbers, periodic=True,
                                  all_images=False)
  energy_fn = e2f_md.e2former_energy(displacement, predictor, numbers, box=CUBIC_SIDE, all_images=True)
  with pytest.raises(ValueError, match="2 x cutoff"):
    energy_fn(positions)
  neighbor_fn = image_neighbor_list(CUBIC_SIDE, predictor.config.cutoff)
  with pytest.raises(ValueError, match=r"position must be \[N, 3\]"):
    neighbor_fn.allocate(positions[:, :2])
  with pytest.raises(ValueError, match="must exceed the skin"):
    image_neighbor_list(0.4, predictor.config.cutoff)
  free_energy = e2f_md.e2former_energy(space.free()[0], predictor, numbers)
  with pytest.raises(ValueError, match="needs a periodic energy function"):
    free_energy(positions, neighbor=neighbor_fn.allocate(positions))
  fractional_energy = e2f_md.e2former_energy(
      displacement, predictor, numbers, box=CUBIC_SIDE, all_images=True, fractional_coordinates=True)
  with pytest.raises(ValueError, match="fractional_coordinates"):
    fractional_energy(positions / CUBIC_SIDE, neighbor=neighbor_fn.allocate(positions))
