"""The built-in default dataset: real molecules labelled with GFN2-xTB, in the SPICE and OMol25 layouts.

The training command trains on this dataset when it is given no other. Its molecules are the 120
hand-curated ones of ``molecules.py`` plus RDKit-enumerated ones (``enumeration.py``: substituted
scaffolds and fragments, amino acids and dipeptides, ions, radicals, ion pairs), in six subsets
(small organics, drug-like fragments, amino acids and dipeptides, charged species, doublet radicals,
ion pairs). ``sizes.py`` says how many of each a build holds (``BuiltinSize``: small for tests,
default for the main command, large for the GPU recipe); ``sampling.py`` turns each molecule into
thermal geometries labelled with GFN2-xTB (tblite) at its charge and spin; ``writers.py`` writes them
as SPICE HDF5 and as an OMol25-style ASE LMDB copy; ``build.py`` runs the build in parallel, writes
it atomically and caches it.

Run ``python -m train.data.builtin [--size small|default|large] [--out DIR] [--force]``.
"""

from train.data.builtin.build import (BUILTIN_VERSION, DATA_DIR_ENV, MANIFEST_FILENAME, build_builtin_dataset,
                                      default_builtin_dir)
from train.data.builtin.molecules import BuiltinMolecule
from train.data.builtin.sizes import BuiltinSize, builtin_molecules
from train.data.builtin.writers import HDF5_FILENAME

__all__ = [
  "BUILTIN_VERSION", "DATA_DIR_ENV", "HDF5_FILENAME", "MANIFEST_FILENAME", "BuiltinMolecule", "BuiltinSize",
  "build_builtin_dataset", "builtin_molecules", "default_builtin_dir",
]
