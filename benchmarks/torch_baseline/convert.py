"""From the Flax model's parameters and Graph to the PyTorch baseline's state dict and TorchGraph."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from benchmarks.torch_baseline.model import TorchGraph

# Graph fields that hold integer indices: torch indexes with int64.
_INDEX_FIELDS = ("species", "molecule_index", "nbr_idx", "charge", "spin")


def flax_to_torch_state_dict(params: Mapping) -> dict[str, torch.Tensor]:
  """State dict of :class:`~benchmarks.torch_baseline.model.E2FormerTorch` from Flax parameters.

  The torch modules carry the Flax module names, so a leaf ``a/b/c`` becomes ``a.b.c`` with two
  renames: a Dense ``kernel`` [in, out] becomes ``weight`` [out, in] (transposed), and a
  LayerNorm ``scale`` (1-D) becomes ``weight``. Everything else (SO(3)-linear weights
  [lmax+1, out, in], RMS-norm scales [lmax+1, C], embedding tables) keeps name and layout.
  Load with ``strict=True`` so that any mismatch is an error.

  Args:
    params: ``{"params": tree}`` as returned by ``E2Former(cfg).init``, or the tree itself; leaves
      are jax or numpy arrays.

  Returns:
    name -> float tensor (CPU, the leaves' dtype).
  """
  tree = params.get("params", params)
  state = {}

  def visit(node: Mapping, prefix: str) -> None:
    for name, value in node.items():
      if isinstance(value, Mapping):
        visit(value, f"{prefix}{name}.")
        continue
      array = np.array(value)  # a writable copy (jax arrays are read-only views)
      if name == "kernel":
        name, array = "weight", array.T
      elif name == "scale" and array.ndim == 1:
        name = "weight"
      state[prefix + name] = torch.from_numpy(np.ascontiguousarray(array))

  visit(tree, "")
  return state


def graph_to_torch(graph, device=None, dtype: torch.dtype | None = None) -> TorchGraph:
  """A :class:`TorchGraph` from an ``e2former_jax.graph.Graph`` (jax or numpy arrays).

  Args:
    graph: the padded batch of molecules.
    device: target device.
    dtype: float dtype of positions and shifts (default: theirs).

  Raises:
    NotImplementedError: for a periodic batch (the baseline has no image-shift term).
  """
  if getattr(graph, "cell", None) is not None:
    raise NotImplementedError("the torch baseline covers molecules only: this Graph has cells "
                              "(periodic batch)")
  fields = {}
  for name in TorchGraph.__dataclass_fields__:
    array = np.array(getattr(graph, name))
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if name in _INDEX_FIELDS:
      tensor = tensor.long()
    elif tensor.is_floating_point() and dtype is not None:
      tensor = tensor.to(dtype)
    fields[name] = tensor.to(device)
  return TorchGraph(**fields)
