"""Test helpers importable from any test (pytest adds tests/ to sys.path): brute-force graphs, molecules."""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from e2former_jax.graph import Graph

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Variables of launchers and cluster schedulers that jax.distributed.initialize() detects.
_LAUNCHER_ENV_PREFIXES = ("SLURM_", "OMPI_", "PMIX_", "KUBERNETES_", "JAX_COORDINATOR",
                          "JAX_LOCAL_DEVICE_IDS", "E2F_")


def environment_without_launchers() -> dict[str, str]:
  """``os.environ`` minus what would make a child process join, or detect, a multi-process launch."""
  return {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_ENV_PREFIXES)}

# Numbers of the authors' own code (README there): tests that read it skip when it is absent.
REFERENCE_PARITY = SHARED_DATA / "reference_parity"


def brute_force_graph(molecules, *, cutoff, max_neighbors, num_nodes=None, num_molecules=None,
                      dtype=np.float64) -> Graph:
  """Padded Graph from [(numbers, positions, charge, spin), ...] with an O(n^2) neighbour search.

  K nearest other atoms within the cutoff (inclusive), ties by index; sentinel N on empty slots.
  """
  sizes = [len(m[0]) for m in molecules]
  n_real = sum(sizes)
  n = num_nodes or n_real
  b = num_molecules or len(molecules)
  positions = np.zeros((n, 3), dtype)
  species = np.zeros(n, np.int32)
  node_mask = np.zeros(n, bool)
  molecule_index = np.full(n, b - 1, np.int32)
  nbr_idx = np.full((n, max_neighbors), n, np.int32)
  nbr_mask = np.zeros((n, max_neighbors), bool)
  charge = np.zeros(b, np.int32)
  spin = np.zeros(b, np.int32)
  molecule_mask = np.zeros(b, bool)
  start = 0
  for mol, (numbers, pos, q, s) in enumerate(molecules):
    size = len(numbers)
    sl = slice(start, start + size)
    positions[sl] = pos
    species[sl] = numbers
    node_mask[sl] = True
    molecule_index[sl] = mol
    charge[mol], spin[mol], molecule_mask[mol] = q, s, True
    dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    for i in range(size):
      order = np.lexsort((np.arange(size), dist[i]))
      chosen = [j for j in order if dist[i, j] <= cutoff][:max_neighbors]
      nbr_idx[start + i, :len(chosen)] = np.asarray(chosen, np.int32) + start
      nbr_mask[start + i, :len(chosen)] = True
    start += size
  return Graph(positions=jnp.asarray(positions), species=jnp.asarray(species),
               node_mask=jnp.asarray(node_mask), molecule_index=jnp.asarray(molecule_index),
               nbr_idx=jnp.asarray(nbr_idx), nbr_mask=jnp.asarray(nbr_mask),
               nbr_shift=jnp.zeros((n, max_neighbors, 3), dtype), charge=jnp.asarray(charge),
               spin=jnp.asarray(spin), molecule_mask=jnp.asarray(molecule_mask))


def authors_graph(structure: dict, *, num_nodes: int, num_molecules: int, max_neighbors: int,
                  dtype=np.float64) -> Graph:
  """A padded one-molecule Graph from a reference-parity structure (keys of inputs_outputs.npz
  without the ``sN_`` prefix) with the authors' own neighbour arrays: ``nbr`` [n, K_ref] and
  ``nbr_mask`` (True = beyond the cutoff; those slots still hold atoms)."""
  nbr, beyond = structure["nbr"], structure["nbr_mask"]
  n, k_ref = nbr.shape
  positions = np.zeros((num_nodes, 3), dtype)
  positions[:n] = structure["positions"]
  species = np.zeros(num_nodes, np.int32)
  species[:n] = structure["numbers"]
  nbr_idx = np.full((num_nodes, max_neighbors), num_nodes, np.int32)
  nbr_idx[:n, :k_ref] = nbr
  nbr_mask = np.zeros((num_nodes, max_neighbors), bool)
  nbr_mask[:n, :k_ref] = ~beyond
  molecule_index = np.full(num_nodes, num_molecules - 1, np.int32)
  molecule_index[:n] = 0
  charge = np.zeros(num_molecules, np.int32)
  spin = np.zeros(num_molecules, np.int32)
  charge[0], spin[0] = int(structure["charge"]), int(structure["spin"])
  return Graph(positions=jnp.asarray(positions), species=jnp.asarray(species),
               node_mask=jnp.asarray(np.arange(num_nodes) < n),
               molecule_index=jnp.asarray(molecule_index), nbr_idx=jnp.asarray(nbr_idx),
               nbr_mask=jnp.asarray(nbr_mask),
               nbr_shift=jnp.zeros((num_nodes, max_neighbors, 3), dtype),
               charge=jnp.asarray(charge), spin=jnp.asarray(spin),
               molecule_mask=jnp.asarray(np.arange(num_molecules) == 0))


def random_molecule(rng: np.random.Generator, num_atoms: int, *, min_dist: float = 0.9,
                    density: float = 0.08, elements=(1, 6, 7, 8)):
  """Random atoms in a ball at roughly molecular density, no pair closer than min_dist."""
  radius = (3 * num_atoms / (4 * np.pi * density)) ** (1 / 3)
  pos = []
  while len(pos) < num_atoms:
    p = rng.uniform(-radius, radius, 3)
    if np.linalg.norm(p) <= radius and all(np.linalg.norm(p - q) >= min_dist for q in pos):
      pos.append(p)
  return rng.choice(elements, num_atoms).astype(np.int32), np.asarray(pos)


def random_cell(rng: np.random.Generator, scale: float) -> np.ndarray:
  """A right- or left-handed triclinic cell with angles well away from degenerate."""
  while True:
    cell = np.eye(3) * scale + rng.normal(size=(3, 3)) * 0.3 * scale
    if abs(np.linalg.det(cell)) > 0.5 * np.prod(np.linalg.norm(cell, axis=1)):
      return cell * rng.choice([-1, 1])


def random_periodic_atoms(rng: np.random.Generator, cell: np.ndarray, num_atoms: int, *,
                          min_dist: float = 1.0, elements=(1, 6, 8)):
  """ase.Atoms of random H/C/O in a periodic cell, no pair (minimum image) closer than min_dist;
  charge 0 and the lowest spin multiplicity of the electron count in ``info``."""
  import ase

  while True:
    atoms = ase.Atoms(numbers=rng.choice(elements, num_atoms), cell=cell, pbc=True,
                      scaled_positions=rng.uniform(0.0, 1.0, (num_atoms, 3)))
    if atoms.get_all_distances(mic=True)[np.triu_indices(num_atoms, 1)].min() > min_dist:
      break
  atoms.info.update(charge=0, spin=1 + int(atoms.numbers.sum()) % 2)
  return atoms


# The kernel tests' float32 tolerances (tests/pallas_kernels), for any computation that must equal
# another up to float32 rounding: max |error| <= rtol * max(1, max |expected|).
F32_RTOL = 2e-5
SECOND_ORDER_RTOL = 1e-4


def assert_close(actual, expected, rtol: float) -> None:
  """max |actual - expected| <= rtol * max(1, max |expected|), leaf by leaf over two pytrees."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape and np.all(np.isfinite(a)), (a.shape, e.shape)
    error, bound = np.max(np.abs(a - e), initial=0.0), rtol * max(1.0, np.max(np.abs(e), initial=0.0))
    assert error <= bound, f"max abs error {error:.3e} > {bound:.3e}"


_BUFFER_VALUE = re.compile(r"^\s*value: <.*?> \(size=\d+,offset=\d+\): \w+\[([\d,]*)\]", re.M)


def buffer_shapes(lowered, dump_dir: Path) -> list[tuple[int, ...]]:
  """Shapes of every value in XLA's buffer assignment of a lowered program (what the compiled
  program allocates: parameters, outputs, temporaries), compiled with its dumps in ``dump_dir``."""
  lowered.compile(compiler_options={"xla_dump_to": str(dump_dir)})
  [report] = Path(dump_dir).glob("*buffer-assignment.txt")
  return [tuple(int(d) for d in dims.split(",") if d)
          for dims in _BUFFER_VALUE.findall(report.read_text())]


_INDEXED_OP = re.compile(r"= \w+\[([\d,]*)\]\S* (?:gather|scatter)\(")


def per_atom_indexing(module, x: jax.Array) -> list[tuple[int, ...]]:
  """Shapes of the gathers and scatters over per-atom arrays (a dimension equal to x.shape[0]) left
  in the optimized HLO of a Flax module's forward and VJP on x: static row selections should be
  slices and broadcasts, which XLA fuses, not index arrays (a gather, and a scatter-add in the
  backward). Choose x.shape[0] unequal to every other dimension in play."""
  params = module.init(jax.random.key(0), x)

  def loss(params, x):
    return jnp.sum(module.apply(params, x) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  shapes = [tuple(int(d) for d in m.group(1).split(",")) for m in _INDEXED_OP.finditer(hlo)]
  return [s for s in shapes if x.shape[0] in s]


def jaxpr_equations(jaxpr):
  """Every equation of a jaxpr, those of its nested jaxprs (jit, custom rules, loops) too."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          yield from jaxpr_equations(getattr(sub, "jaxpr", sub))
