"""Command line: build (or find cached) the built-in dataset and print where it is and what it holds."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Sequence

from train.data.builtin.build import (BUILTIN_VERSION, DATA_DIR_ENV, DEFAULT_CACHE_ROOT, MANIFEST_FILENAME,
                                      build_builtin_dataset)
from train.data.builtin.sizes import SIZE_SPECS, BuiltinSize


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m train.data.builtin",
    description="Build the built-in GFN2-xTB dataset (SPICE HDF5 + OMol25-style aselmdb).")
  parser.add_argument("--size", choices=[s.value for s in BuiltinSize], default=BuiltinSize.DEFAULT.value,
                      help="small (tests, seconds), default (the main command, ~3 min on 2 cores), "
                           "large (the GPU recipe, thousands of molecules) or heldout (300 molecules no "
                           "default-sized build holds, to score the main command's recipes); default: "
                           "%(default)s")
  parser.add_argument("--out", type=Path, default=None,
                      help=f"output folder (default ${DATA_DIR_ENV}/{BUILTIN_VERSION}[-SIZE] or "
                           f"{DEFAULT_CACHE_ROOT}/{BUILTIN_VERSION}[-SIZE])")
  parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
  parser.add_argument("--num-conformers", type=int, default=None,
                      help="geometries per molecule (default: " + ", ".join(
                        f"{s.value} {SIZE_SPECS[s].conformers_per_molecule}" for s in BuiltinSize) + ")")
  parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all cores)")
  args = parser.parse_args(argv)
  start = time.perf_counter()
  try:
    folder = build_builtin_dataset(args.out, size=BuiltinSize(args.size), num_conformers=args.num_conformers,
                                   workers=args.workers, force=args.force)
  except (ImportError, ValueError) as err:
    parser.error(str(err))
  counts = json.loads((folder / MANIFEST_FILENAME).read_text())["counts"]
  per_subset = ", ".join(f"{subset} {n}" for subset, n in counts["molecules_per_subset"].items())
  print(f"{folder}: {counts['conformers']} conformers of {counts['molecules']} molecules "
        f"({per_subset}; {counts['rejected']} rejected); {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
  main()
