"""Reading state dicts without torch: the PyTorch zip format (a restricted unpickler), safetensors and
npz, and the refusal of a pickle that carries code."""

from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile

import numpy as np
import pytest

from e2former_jax.interop.authors_checkpoint import model_state_dict
from e2former_jax.interop.state_dict_files import UnsafeCheckpointError, read_state_dict

# torch's storage class names by numpy dtype (the zip format pickles them as torch.<name>).
STORAGES = {np.dtype(np.float64): "DoubleStorage", np.dtype(np.float32): "FloatStorage",
            np.dtype(np.int64): "LongStorage"}
SAFETENSORS_DTYPES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32",
                      np.dtype(np.int64): "I64"}


def _global(module: str, name: str) -> bytes:
  return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(text: str) -> bytes:
  data = text.encode()
  return b"X" + struct.pack("<I", len(data)) + data


def _int(value: int) -> bytes:
  return b"J" + struct.pack("<i", value)


def _ints(values) -> bytes:
  return b"(" + b"".join(_int(int(v)) for v in values) + b"t"


def _tensor(key: str, array: np.ndarray, shape, strides, offset: int) -> bytes:
  """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
  storage = b"(" + _str("storage") + _global("torch", STORAGES[array.dtype]) + _str(key) + \
      _str("cpu") + _int(array.size) + b"tQ"  # the persistent id tuple, BINPERSID
  hooks = _global("collections", "OrderedDict") + b")R"
  return (_global("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _int(offset)
          + _ints(shape) + _ints(strides) + b"\x89" + hooks + b"tR")


def write_torch_zip(path, arrays: dict[str, np.ndarray], wrap: str | None = None) -> None:
  """What torch.save(state_dict) writes (protocol 2 pickle, one raw storage per tensor), optionally
  as a training checkpoint {wrap: state_dict, "epoch": 3}. Every other tensor is stored transposed
  and read through its strides, as a non-contiguous tensor would be."""
  items, storages = b"", {}
  for i, (name, array) in enumerate(arrays.items()):
    if array.ndim == 2 and i % 2:
      storage = np.ascontiguousarray(array.T)  # column-major: strides (1, rows)
      strides = (1, array.shape[0])
    else:
      storage = np.ascontiguousarray(array)
      strides = tuple(s // array.itemsize for s in storage.strides)
    storages[str(i)] = storage.tobytes()
    items += _str(name) + _tensor(str(i), storage.reshape(-1), array.shape, strides, 0)
  state = _global("collections", "OrderedDict") + b")R(" + items + b"u"
  if wrap is not None:
    state = b"}(" + _str(wrap) + state + _str("epoch") + _int(3) + b"u"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", b"\x80\x02" + state + b".")
    archive.writestr("archive/byteorder", "little")
    archive.writestr("archive/version", "3\n")
    for key, raw in storages.items():
      archive.writestr(f"archive/data/{key}", raw)


def write_safetensors(path, arrays: dict[str, np.ndarray]) -> None:
  header, offset, buffers = {"__metadata__": {"format": "pt"}}, 0, []
  for name, array in arrays.items():
    raw = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
    header[name] = {"dtype": SAFETENSORS_DTYPES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    buffers.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text + b"".join(buffers))


@pytest.fixture
def arrays(rng) -> dict[str, np.ndarray]:
  return {"decoder.decoder.norm_final.affine_weight": rng.normal(size=(3, 16)),
          "decoder.mix_cm.0.weight": rng.normal(size=(16, 32)).astype(np.float32),
          "decoder.decoder.norm_final.expand_index": np.array([0, 1, 1, 1, 2, 2, 2, 2, 2]),
          "head.energy_heads.omol25.mlp.4.bias": np.array([0.25]),
          "decoder.decoder.blocks.0.ga.query_linear.bias": rng.normal(size=(1, 1, 16))}


def _assert_same(got: dict, expected: dict) -> None:
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert got[key].dtype == value.dtype, key
    np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_torch_zip_round_trip(tmp_path, arrays):
  path = tmp_path / "model.pt"
  write_torch_zip(path, arrays)
  _assert_same(read_state_dict(path), arrays)


def test_training_checkpoint_is_unwrapped(tmp_path, arrays):
  path = tmp_path / "checkpoint.pt"
  write_torch_zip(path, arrays, wrap="model")
  state = model_state_dict(read_state_dict(path), source=str(path))
  _assert_same(state, arrays)


def test_safetensors_and_npz_round_trip(tmp_path, arrays):
  write_safetensors(tmp_path / "model.safetensors", arrays)
  _assert_same(read_state_dict(tmp_path / "model.safetensors"), arrays)
  np.savez(tmp_path / "model.npz", **arrays)
  _assert_same(read_state_dict(tmp_path / "model.npz"), arrays)


class _Payload:
  """Unpickling this would run a shell command that creates the marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return os.system, (f"touch {self.marker}",)


def test_pickle_carrying_code_is_refused_without_running_it(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  with zipfile.ZipFile(path, "w") as archive:
    archive.writestr("archive/data.pkl", pickle.dumps({"weight": _Payload(marker)}, protocol=2))
  with pytest.raises(UnsafeCheckpointError, match=r"refused to load: the pickle asks for "
                                                   r"(posix|os|nt)\.system"):
    read_state_dict(path)
  assert not marker.exists()


def test_npz_with_pickled_objects_is_refused(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.npz"
  np.savez(path, weight=np.array([_Payload(marker)], dtype=object))
  with pytest.raises(ValueError, match="unreadable .npz"):
    read_state_dict(path)
  assert not marker.exists()


def test_inconsistent_files_give_one_clear_error(tmp_path, arrays):
  write_safetensors(tmp_path / "model.safetensors", arrays)
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes((tmp_path / "model.safetensors").read_bytes()[:-8])
  with pytest.raises(ValueError, match="data offsets .* inconsistent"):
    read_state_dict(truncated)
  storage = np.arange(4.0)
  path = tmp_path / "overrun.pt"
  with zipfile.ZipFile(path, "w") as archive:
    record = _tensor("0", storage, (3, 3), (3, 1), 0)  # 9 elements from a storage of 4
    archive.writestr("archive/data.pkl", b"\x80\x02" + _global("collections", "OrderedDict")
                     + b")R(" + _str("w") + record + b"u.")
    archive.writestr("archive/data/0", storage.tobytes())
  with pytest.raises(ValueError, match="reads past its storage of 4 elements"):
    read_state_dict(path)
  (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"w": 1.0}))
  with pytest.raises(ValueError, match="bare pickle"):
    read_state_dict(tmp_path / "legacy.pt")
