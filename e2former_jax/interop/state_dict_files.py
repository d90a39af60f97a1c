"""Reading a PyTorch state dict from a file without PyTorch and without running its code.

A checkpoint is untrusted input. Three formats are read, into ``{key: numpy array}``:

* ``.npz`` (numpy, ``allow_pickle=False``);
* ``safetensors``: an 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
  data_offsets}}`` and the raw little-endian buffer; parsed here with numpy;
* PyTorch's zip format (``torch.save`` since 1.6): ``<archive>/data.pkl`` is a pickle whose
  tensors refer to raw storages ``<archive>/data/<key>``. It is read by :class:`_StateDictUnpickler`,
  which resolves only the few globals a tensor state dict needs (the tensor and parameter rebuild
  functions, the storage types, ``OrderedDict``), each mapped onto a numpy function of our own, and
  refuses any other global *before* it could be called: a pickle can only run code through a
  global it names. Nothing from the file is imported or executed, and torch is not needed.

Containers (a training checkpoint ``{"model": state_dict, "epoch": 3, ...}``) are flattened to
dotted keys; non-array leaves are dropped.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

# Magic bytes of a zip archive (npz and torch's format both are zips).
_ZIP_MAGIC = b"PK\x03\x04"
# safetensors: the header length is a little-endian u64; a header above this is not a real one.
_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
# torch's legacy storage classes, as its zip format names them (``torch.<X>Storage``).
_TORCH_STORAGES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
# Storage keys are decimal counters in torch's writer; anything else is refused.
_STORAGE_KEY = re.compile(r"^[0-9A-Za-z_]+$")


class UnsafeCheckpointError(ValueError):
  """The file asks for something a tensor state dict never needs (e.g. a function to call)."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """Every array of a ``.npz``, safetensors or PyTorch zip checkpoint, by dotted key.

  Raises:
    UnsafeCheckpointError: a PyTorch pickle that names a global other than the allowed ones.
    ValueError: an unreadable, truncated or inconsistent file, or one without arrays.
  """
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"{path}: no such file")
  with path.open("rb") as f:
    head = f.read(8)
  if head.startswith(_ZIP_MAGIC):
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
    if any(name.endswith("data.pkl") for name in names):
      arrays = _read_torch_zip(path)
    else:
      arrays = _read_npz(path)
  elif len(head) == 8 and _looks_like_safetensors(path, head):
    arrays = _read_safetensors(path)
  elif head[:1] == b"\x80":
    raise ValueError(f"{path}: a bare pickle (PyTorch's legacy format before 1.6, or pickle.dump), "
                     f"which is not read; save it with torch.save (zip format) or as safetensors")
  else:
    raise ValueError(f"{path}: not a .npz, safetensors or PyTorch zip checkpoint")
  if not arrays:
    raise ValueError(f"{path}: the checkpoint holds no arrays")
  return arrays


def _read_npz(path: Path) -> dict[str, np.ndarray]:
  try:
    with np.load(path, allow_pickle=False) as data:
      return {key: np.asarray(data[key]) for key in data.files}
  except (ValueError, OSError, zipfile.BadZipFile) as err:
    raise ValueError(f"{path}: unreadable .npz ({err})") from None


# ----------------------------------------------------------------------------------- safetensors


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
  length = int.from_bytes(head, "little")
  if not 2 <= length <= _SAFETENSORS_MAX_HEADER or length > path.stat().st_size - 8:
    return False
  with path.open("rb") as f:
    f.seek(8)
    return f.read(1) == b"{"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
  data = path.read_bytes()
  length = int.from_bytes(data[:8], "little")
  try:
    header = json.loads(data[8:8 + length])
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise ValueError(f"{path}: bad safetensors header ({err})") from None
  if not isinstance(header, dict):
    raise ValueError(f"{path}: bad safetensors header (not a JSON object)")
  buffer = memoryview(data)[8 + length:]
  arrays = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
      shape = tuple(int(x) for x in info["shape"])
      begin, end = (int(x) for x in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
      raise ValueError(f"{path}: safetensors entry {name!r} has a bad description {info!r}") from None
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= len(buffer) or end - begin != nbytes:
      raise ValueError(f"{path}: safetensors entry {name!r} (shape {shape}, {info['dtype']}) has "
                       f"data offsets {begin}..{end} inconsistent with its size {nbytes} or the "
                       f"buffer ({len(buffer)} bytes)")
    arrays[name] = np.frombuffer(buffer[begin:end], dtype).reshape(shape).astype(dtype.newbyteorder("="))
  return arrays


# ---------------------------------------------------------------------------------- torch zip


@dataclasses.dataclass(frozen=True)
class _StorageType:
  """What ``torch.<X>Storage`` resolves to: only its element type."""

  dtype: Any


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
  """The array torch's ``_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks,
  [metadata])`` describes, bounds-checked against its storage."""
  if not (isinstance(storage, np.ndarray) and isinstance(offset, int)
          and all(isinstance(x, int) for x in (*size, *stride)) and len(size) == len(stride)):
    raise ValueError("malformed tensor record in the pickle")
  size, stride = tuple(size), tuple(stride)
  if offset < 0 or min(size, default=1) < 0 or min(stride, default=0) < 0:
    raise ValueError(f"negative offset, size or stride in a tensor record: {offset}, {size}, {stride}")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise ValueError(f"tensor of size {size}, stride {stride} at offset {offset} reads past its "
                     f"storage of {storage.size} elements")
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size,
                                         strides=[s * storage.itemsize for s in stride],
                                         writeable=False)
  return np.array(view)


def _rebuild_parameter(data, _requires_grad, _hooks) -> np.ndarray:
  """torch's ``_rebuild_parameter``: a parameter is its data."""
  if not isinstance(data, np.ndarray):
    raise ValueError("malformed parameter record in the pickle")
  return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(dtype) for name, dtype in _TORCH_STORAGES.items()},
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles torch's ``data.pkl`` with numpy stand-ins; refuses every other global."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: Path):
    super().__init__(file)
    self._archive, self._prefix, self._byteorder, self._source = archive, prefix, byteorder, source
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str):
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise UnsafeCheckpointError(
          f"{self._source}: refused to load: the pickle asks for {module}.{name}, which a tensor "
          f"state dict never needs (only tensors, storages and OrderedDict are allowed); nothing "
          f"was executed")
    return allowed

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)
            and _STORAGE_KEY.match(pid[2]) and isinstance(pid[4], int)):
      raise ValueError(f"malformed storage reference {pid!r} in the pickle")
    _, storage_type, key, _location, numel = pid
    if key not in self._storages:
      dtype = np.dtype(storage_type.dtype).newbyteorder("<" if self._byteorder == "little" else ">")
      try:
        raw = self._archive.read(f"{self._prefix}data/{key}")
      except KeyError:
        raise ValueError(f"storage {key} is missing from the archive") from None
      if numel < 0 or len(raw) < numel * dtype.itemsize:
        raise ValueError(f"storage {key} holds {len(raw)} bytes, not {numel} elements of {dtype}")
      self._storages[key] = np.frombuffer(raw, dtype, count=numel).astype(dtype.newbyteorder("="))
    return self._storages[key]


def _read_torch_zip(path: Path) -> dict[str, np.ndarray]:
  with zipfile.ZipFile(path) as archive:
    pickles = [name for name in archive.namelist() if name.endswith("data.pkl")]
    if len(pickles) != 1 or pickles[0].count("/") != 1:
      raise ValueError(f"{path}: expected one <archive>/data.pkl in the zip, found {pickles}")
    prefix = pickles[0][: -len("data.pkl")]
    byteorder = "little"
    if f"{prefix}byteorder" in archive.namelist():
      byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
      if byteorder not in ("little", "big"):
        raise ValueError(f"{path}: unknown byte order {byteorder!r}")
    unpickler = _StateDictUnpickler(io.BytesIO(archive.read(pickles[0])), archive, prefix,
                                    byteorder, path)
    try:
      tree = unpickler.load()
    except UnsafeCheckpointError:
      raise
    except ValueError as err:
      raise ValueError(f"{path}: {err}") from None
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as err:
      raise ValueError(f"{path}: unreadable pickle ({type(err).__name__}: {err})") from None
  return _flatten(tree)


def _flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
  """Arrays of nested mappings and sequences by dotted path (other leaves are dropped)."""
  if isinstance(tree, np.ndarray):
    return {prefix.rstrip("."): tree}
  items: list[tuple[str, Any]] = []
  if isinstance(tree, dict):
    items = [(str(k), v) for k, v in tree.items()]
  elif isinstance(tree, (list, tuple)):
    items = [(str(i), v) for i, v in enumerate(tree)]
  out = {}
  for key, value in items:
    out.update(_flatten(value, f"{prefix}{key}."))
  return out
