"""Shapes in types (docs/model.md §2.1): the public API of e2former_jax and pallas_kernels carries
jaxtyping annotations, they resolve, and they hold at run time.

The run-time check is tests/shape_checks.py, in a fresh interpreter whose imports of both packages
go through jaxtyping's import hook (every function and dataclass checked by beartype as it runs or
traces): the tiny model, the dispatcher, the kernels (Pallas interpreter, tiny grids) and their
references, the neighbour lists, the SO(3) toolkit, and mis-shaped inputs that must be rejected.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import flax.linen as nn
import jax
import jaxtyping
import numpy as np
import pytest

import e2former_jax
import pallas_kernels
from e2f_testing import environment_without_launchers
from e2former_jax import neighbors, ops, so3
from e2former_jax.interop.predictor import Predictor

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("shape_checks.py")
PUBLIC = (e2former_jax, ops, so3, neighbors, pallas_kernels)
# Forward references that the modules import for type checkers only (``if TYPE_CHECKING``).
NAMESPACE = {name: getattr(module, name) for module in PUBLIC for name in module.__all__}
# Public names that take, return and hold no arrays: configurations and enums, kernel tilings and
# static grids, degree/row arithmetic, and factories whose arguments are functions and sizes.
ARRAY_FREE = {
    "AttentionImpl", "E2FormerConfig", "MessagePath", "Precision", "paper_config", "tiny_config",
    "resolve_impl", "BlockSizes", "RadialMLPBlocks", "CellGrid", "ImageNeighborListFns", "free_space_neighbor_list",
    "FirstOrderPath", "first_order_paths", "num_first_order_rows", "degree_slice", "lmax_from_rows",
    "num_rows", "row_index",
}
# Predictor's methods that take or return arrays.
PREDICTOR_METHODS = ("check_species", "reference_energy", "model_energy", "total_energy",
                     "state_offset")
# Array types that say nothing of dtype and shape.
BARE = {jax.Array, np.ndarray}
# The checks of tests/shape_checks.py (its JSON output's keys).
CHECKS = ("model_molecules", "model_per_edge_max_logit_sink", "model_cell_stress_and_predictor",
          "dispatcher_in_the_pallas_interpreter", "kernels_and_references", "neighbor_lists",
          "so3_toolkit", "mis_shaped_input_is_rejected")


def _public_callables():
  """Every public name of PUBLIC, every Flax module of e2former_jax.nn, and the methods of
  Predictor that take or return arrays."""
  for module in PUBLIC:
    for name in module.__all__:
      obj = getattr(module, name)
      if callable(obj):
        yield f"{module.__name__}.{name}", name, obj
  for info in pkgutil.iter_modules(e2former_jax.nn.__path__, "e2former_jax.nn."):
    module = importlib.import_module(info.name)
    for name, obj in vars(module).items():
      if inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__ == module.__name__:
        yield f"{module.__name__}.{name}", name, obj
  for name in PREDICTOR_METHODS:
    yield f"Predictor.{name}", name, getattr(Predictor, name)


def _annotated(obj) -> tuple[object, dict[str, object]]:
  """What carries the annotations of a public name (a Flax module's ``__call__``, a dataclass's or
  NamedTuple's fields, a function), with its resolved hints."""
  if inspect.isclass(obj) and issubclass(obj, nn.Module):
    obj = obj.__call__
  return obj, typing.get_type_hints(obj, localns=NAMESPACE)


def _parts(hint):
  """The types a hint is made of, through unions and tuples (not into callables' signatures)."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType, tuple):
    for arg in typing.get_args(hint):
      yield from _parts(arg)
  elif hint is not Ellipsis:
    yield hint


def _shaped(hint) -> bool:
  """A jaxtyping array, or a class with such a field (Graph, ModelOutput, neighbour lists)."""
  for part in _parts(hint):
    if isinstance(part, type) and issubclass(part, jaxtyping.AbstractArray):
      return True
    if inspect.isclass(part) and (dataclasses.is_dataclass(part) or hasattr(part, "_fields")):
      if any(_shaped(h) for h in typing.get_type_hints(part, localns=NAMESPACE).values()):
        return True
  return False


ARRAY_API = [(qualname, obj) for qualname, name, obj in _public_callables()
             if name not in ARRAY_FREE]


@pytest.mark.parametrize("qualname,obj", ARRAY_API, ids=[qualname for qualname, _ in ARRAY_API])
def test_public_api_has_shape_annotations(qualname, obj):
  target, hints = _annotated(obj)
  assert any(_shaped(h) for h in hints.values()), f"{qualname} has no jaxtyping annotation"
  bare = [key for key, hint in hints.items() if any(part in BARE for part in _parts(hint))]
  assert not bare, f"{qualname}: {bare} annotated as arrays without dtype and shape"
  if callable(target) and not inspect.isclass(target):
    params = inspect.signature(target).parameters.values()
    missing = [p.name for p in params if p.name != "self" and p.name not in hints
               and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    assert not missing and "return" in hints, f"{qualname}: {missing or 'return'} not annotated"


def test_array_free_names_exist_and_are_public():
  public = {name for module in PUBLIC for name in module.__all__}
  assert ARRAY_FREE <= public, ARRAY_FREE - public


@pytest.mark.parametrize("name", sorted(n for n in pallas_kernels.__all__
                                        if n + "_reference" in pallas_kernels.__all__))
def test_kernels_and_references_share_annotations(name):
  # Compared as written: jaxtyping makes a new class for each annotation it reads.
  kernel, reference = ({key: repr(hint) for key, hint in
                        typing.get_type_hints(getattr(pallas_kernels, n)).items()}
                       for n in (name, name + "_reference"))
  assert kernel == reference


@pytest.fixture(scope="module")
def checked_run() -> dict[str, str]:
  env = environment_without_launchers()
  # This checkout's packages, not an installed copy (the script's own folder, tests/, comes first
  # on its path and mirrors the package names).
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, env=env, capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


@pytest.mark.parametrize("check", CHECKS)
def test_annotations_hold_at_run_time(checked_run, check):
  assert checked_run.get(check) == "ok", checked_run.get(check, f"{check} did not run")


def test_every_check_is_asserted(checked_run):
  assert sorted(checked_run) == sorted(CHECKS)
