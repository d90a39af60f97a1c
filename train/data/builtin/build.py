"""Building the built-in dataset: the parallel sampling run, the atomic write, the manifest and the cache.

A build writes into a temporary sibling folder and renames it into place, so an interrupted build
leaves no partial dataset. ``MANIFEST_FILENAME`` (version, build parameters, counts, the sha256 of
the HDF5 file) is written last; a folder whose manifest matches the requested build is reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from tqdm import tqdm

from train.data.builtin import sampling
from train.data.builtin.molecules import BuiltinMolecule
from train.data.builtin.sampling import MoleculeSamples, Task
from train.data.builtin.sizes import SIZE_SPECS, BuiltinSize, builtin_molecules
from train.data.builtin.writers import (ASELMDB_DIRNAME, ASELMDB_FILENAME, ASELMDB_METADATA_FILENAME,
                                        HDF5_FILENAME, THEORY_NOTE, level_of_theory, write_aselmdb,
                                        write_hdf5)

# Bump when the molecule tables, the recipe or the file layout changes: it invalidates cached builds.
BUILTIN_VERSION = "builtin-v2"
MANIFEST_FILENAME = "manifest.json"
DATA_DIR_ENV = "E2FORMER_DATA_DIR"
DEFAULT_CACHE_ROOT = Path("~/.cache/e2former_jax")


def default_builtin_dir(size: BuiltinSize = BuiltinSize.DEFAULT) -> Path:
  """Where a build is cached by default.

  ``$E2FORMER_DATA_DIR/builtin-v2`` when that variable is set, else ``~/.cache/e2former_jax/builtin-v2``;
  other sizes than the default get a suffix (``builtin-v2-small``), so that they never replace it.
  """
  root = Path(os.environ.get(DATA_DIR_ENV, str(DEFAULT_CACHE_ROOT))).expanduser()
  return root / (BUILTIN_VERSION + ("" if size is BuiltinSize.DEFAULT else f"-{size.value}"))


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _build_params(size: BuiltinSize, molecules: Sequence[BuiltinMolecule],
                  num_conformers: int) -> dict[str, Any]:
  """Everything that determines the numbers; a cached build is reused only if these match."""
  return {
    "size": size.value,
    "num_conformers_per_molecule": num_conformers,
    "molecules": [dataclasses.asdict(m) for m in molecules],
    "seed": sampling.SEED,
    "recipe": {
      "start_conformers": sampling.START_CONFORMERS, "temperatures_k": list(sampling.TEMPERATURES_K),
      "displacement_period": sampling.DISPLACEMENT_PERIOD,
      "bond_stretch_k_ev_per_a2": sampling.BOND_STRETCH_K_EV_PER_A2,
      "md_timestep_fs": sampling.MD_TIMESTEP_FS, "md_friction_per_fs": sampling.MD_FRICTION_PER_FS,
      "md_equilibration_steps": sampling.MD_EQUILIBRATION_STEPS,
      "md_snapshot_stride": sampling.MD_SNAPSHOT_STRIDE, "relax_max_steps": sampling.RELAX_MAX_STEPS,
      "relax_fmax_ev_per_a": sampling.RELAX_FMAX_EV_PER_A, "min_distance_a": sampling.MIN_DISTANCE_A,
      "mmff_max_iters": sampling.MMFF_MAX_ITERS, "fragment_gap_a": sampling.FRAGMENT_GAP_A,
    },
  }


def _cached_manifest(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
  """The manifest of a complete, intact build of ``params`` in ``out_dir``, else None.

  ``params`` without "molecules" (the table needs RDKit to enumerate) matches on everything else.
  """
  manifest_path = out_dir / MANIFEST_FILENAME
  if not manifest_path.is_file():
    return None
  try:
    manifest = json.loads(manifest_path.read_text())
  except json.JSONDecodeError:
    return None
  cached_params = manifest.get("params")
  if isinstance(cached_params, dict) and "molecules" not in params:
    cached_params = {key: value for key, value in cached_params.items() if key != "molecules"}
  hdf5 = out_dir / HDF5_FILENAME
  complete = (
    manifest.get("version") == BUILTIN_VERSION and cached_params == params
    and hdf5.is_file() and (out_dir / ASELMDB_DIRNAME / ASELMDB_FILENAME).is_file()
    and (out_dir / ASELMDB_DIRNAME / ASELMDB_METADATA_FILENAME).is_file()
    and manifest.get("sha256", {}).get(HDF5_FILENAME) == _sha256(hdf5)
  )
  return manifest if complete else None


def _sample_all(molecules: Sequence[BuiltinMolecule], num_conformers: int, workers: int,
                progress: bool) -> tuple[list[MoleculeSamples | None], dict[int, str]]:
  """Labels every molecule in ``workers`` single-threaded processes.

  Returns:
    The samples in table order (None for a rejected molecule) and {table index: reason} of the
    molecules none of whose geometries could be labelled. Which ones those are depends only on the
    molecules (per-molecule seeds), so the build stays deterministic.
  """
  sizes = [sampling.num_atoms(m) for m in molecules]  # validates the table up front
  # Largest first so that the last tasks to finish are short ones (better load balance).
  tasks = sorted((Task(i, m, num_conformers) for i, m in enumerate(molecules)),
                 key=lambda t: -sizes[t.index])
  results: list[MoleculeSamples | None] = [None] * len(molecules)
  rejected: dict[int, str] = {}
  # Fresh interpreters: thread settings apply before tblite loads, whatever the parent imported.
  context = multiprocessing.get_context("spawn")
  with context.Pool(min(workers, len(tasks)), initializer=sampling.init_worker) as pool, \
      tqdm(total=len(tasks), desc="built-in dataset (GFN2-xTB)", unit="mol", disable=not progress) as bar:
    num_done = 0
    for sample in pool.imap_unordered(sampling.sample_or_reject, tasks):
      if isinstance(sample, tuple):
        rejected[sample[0]] = sample[1]
      else:
        results[sample.index] = sample
        num_done += len(sample.energy)
      bar.set_postfix(conformers=num_done)
      bar.update()
  # imap_unordered re-raises a worker's error: every molecule has its samples or was rejected.
  assert all((r is None) == (i in rejected) for i, r in enumerate(results))
  return results, rejected


def _counts(molecules: Sequence[BuiltinMolecule], samples: Sequence[MoleculeSamples]) -> dict[str, Any]:
  molecules_per_subset: dict[str, int] = {}
  conformers_per_subset: dict[str, int] = {}
  for molecule, sample in zip(molecules, samples):
    molecules_per_subset[molecule.subset] = molecules_per_subset.get(molecule.subset, 0) + 1
    conformers_per_subset[molecule.subset] = conformers_per_subset.get(molecule.subset, 0) + len(sample.energy)
  return {
    "molecules": len(samples),
    "conformers": sum(len(s.energy) for s in samples),
    "atoms": sum(len(s.energy) * len(s.atomic_numbers) for s in samples),
    "rejected": sum(s.num_rejected for s in samples),
    "molecules_per_subset": molecules_per_subset,
    "conformers_per_subset": conformers_per_subset,
  }


def build_builtin_dataset(out_dir: str | os.PathLike[str] | None = None, *,
                          size: BuiltinSize = BuiltinSize.DEFAULT, num_conformers: int | None = None,
                          workers: int | None = None, force: bool = False,
                          progress: bool = True) -> Path:
  """Builds the built-in GFN2-xTB dataset (or reuses a cached build) and returns its folder.

  The folder holds ``HDF5_FILENAME`` (SPICE layout), ``ASELMDB_DIRNAME/`` (OMol25-style ASE LMDB
  copy with ``metadata.npz``) and ``MANIFEST_FILENAME``.

  Args:
    out_dir: Target folder; default ``default_builtin_dir(size)``. An existing folder is replaced
      only if it is empty or holds a previous built-in dataset (a manifest).
    size: Which build (``sizes.SIZE_SPECS``: molecules and geometries per molecule).
    num_conformers: Labelled geometries per molecule; default the size's. A few may be rejected.
    workers: Worker processes; default the number of usable CPU cores. Does not change the numbers.
    force: Rebuild even if a matching build exists.
    progress: Show a tqdm progress bar on stderr.

  Returns:
    The dataset folder.

  Raises:
    ImportError: if RDKit or tblite is not installed and no complete build of ``size`` is cached.
    ValueError: on a non-positive ``num_conformers`` or ``workers``, or an ``out_dir`` that exists
      and is neither empty nor a built-in dataset.
  """
  if num_conformers is None:
    num_conformers = SIZE_SPECS[size].conformers_per_molecule
  if num_conformers < 1:
    raise ValueError(f"num_conformers must be >= 1, got {num_conformers}")
  if workers is None:
    workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  out_dir = Path(out_dir).expanduser() if out_dir is not None else default_builtin_dir(size)
  if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILENAME).is_file():
    raise ValueError(f"{out_dir} exists and is not a built-in dataset folder (no {MANIFEST_FILENAME}); "
                     "pass an empty or new folder")
  try:
    sampling.require_chemistry()
  except ImportError:
    # A complete build of this size and recipe is still usable (e.g. copied to a GPU node without
    # RDKit); only its molecule table cannot be re-derived and compared.
    params = _build_params(size, (), num_conformers)
    del params["molecules"]
    if not force and _cached_manifest(out_dir, params) is not None:
      return out_dir
    raise
  molecules = builtin_molecules(size)
  params = _build_params(size, molecules, num_conformers)
  if not force and _cached_manifest(out_dir, params) is not None:
    return out_dir

  out_dir.parent.mkdir(parents=True, exist_ok=True)
  partial = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
  shutil.rmtree(partial, ignore_errors=True)
  start = time.perf_counter()
  try:
    partial.mkdir()
    samples, rejected = _sample_all(molecules, num_conformers, workers, progress)
    if len(rejected) == len(molecules):
      raise ValueError(f"every built-in molecule was rejected, e.g. {next(iter(rejected.values()))}")
    kept = [i for i, sample in enumerate(samples) if sample is not None]
    molecules, samples = [molecules[i] for i in kept], [samples[i] for i in kept]
    write_hdf5(partial / HDF5_FILENAME, molecules, samples, BUILTIN_VERSION)
    write_aselmdb(partial / ASELMDB_DIRNAME, molecules, samples)
    manifest = {
      "version": BUILTIN_VERSION,
      "params": params,
      "level_of_theory": level_of_theory(),
      "note": THEORY_NOTE,
      "counts": _counts(molecules, samples),
      "rejected_molecules": sorted(rejected.values()),
      "sha256": {HDF5_FILENAME: _sha256(partial / HDF5_FILENAME)},
      "software": {name: importlib.metadata.version(name) for name in ("tblite", "rdkit", "ase")},
      "workers": workers,
      "build_seconds": round(time.perf_counter() - start, 1),
    }
    # The manifest is written last: its presence marks the folder complete.
    (partial / MANIFEST_FILENAME).write_text(json.dumps(manifest, indent=2) + "\n")
    stale = out_dir.parent / f".{out_dir.name}.stale-{os.getpid()}"
    if out_dir.exists():
      out_dir.rename(stale)
    partial.rename(out_dir)
    shutil.rmtree(stale, ignore_errors=True)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return out_dir
