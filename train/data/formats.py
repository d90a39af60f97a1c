"""Opens a dataset by its file format: SPICE HDF5, MACE-OFF extxyz or OMol25 ASE LMDB."""

from __future__ import annotations

from pathlib import Path

from train.data.extxyz import ExtXYZDataset
from train.data.omol25 import EXTENSION as ASELMDB_EXTENSION
from train.data.omol25 import OMol25Dataset
from train.data.records import Dataset, OnError
from train.data.spice import SpiceHDF5Dataset

HDF5_EXTENSIONS = (".hdf5", ".h5")
XYZ_EXTENSIONS = (".xyz", ".extxyz")


def open_dataset(path: str | Path, *, on_error: OnError = "raise", **options) -> Dataset:
  """Opens ``path`` with the reader its extension names.

  * ``.hdf5`` / ``.h5``: :class:`~train.data.spice.SpiceHDF5Dataset`;
  * ``.xyz`` / ``.extxyz``: :class:`~train.data.extxyz.ExtXYZDataset`;
  * ``.aselmdb`` or a folder holding ``.aselmdb`` files: :class:`~train.data.omol25.OMol25Dataset`.

  Args:
    path: the file or folder.
    on_error: ``"raise"`` (default) or ``"skip"`` invalid records (counted in a warning).
    **options: reader-specific keyword arguments (e.g. ``energy_keys`` for extxyz).

  Raises:
    ValueError: for a path that does not exist or whose format is not recognised.
  """
  path = Path(path)
  suffix = path.suffix.lower()
  if path.is_dir():
    if not any(path.glob(f"*{ASELMDB_EXTENSION}")):
      raise ValueError(f"{path}: folder holds no {ASELMDB_EXTENSION} files (the only folder "
                       f"format)")
    return OMol25Dataset(path, on_error=on_error, **options)
  if not path.exists():
    raise ValueError(f"{path}: no such file or folder")
  if suffix in HDF5_EXTENSIONS:
    return SpiceHDF5Dataset(path, on_error=on_error, **options)
  if suffix in XYZ_EXTENSIONS:
    return ExtXYZDataset(path, on_error=on_error, **options)
  if suffix == ASELMDB_EXTENSION:
    return OMol25Dataset(path, on_error=on_error, **options)
  known = HDF5_EXTENSIONS + XYZ_EXTENSIONS + (ASELMDB_EXTENSION,)
  raise ValueError(f"{path}: unknown dataset format {suffix!r} (known: {', '.join(known)} or a "
                   f"folder of {ASELMDB_EXTENSION} files)")
