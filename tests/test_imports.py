"""Imports: the declared dependencies are exactly the third-party packages the code imports
(docs/decisions.md D15), and imports run down the layers only (pallas_kernels imports nothing of
ours, the model reaches it only through e2former_jax/ops, nothing imports train from the model or
benchmarks from the product)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("e2former_jax", "pallas_kernels", "train")
# The extras the packages import themselves (lazily): RDKit and tblite to build the built-in
# dataset, JAX MD for simulations. The others serve benchmarks and tests.
PACKAGE_EXTRAS = ("chem", "md")
# Declared and never imported by name: ase.db loads this backend of *.aselmdb files itself.
LOADED_BY_ASE = {"ase-db-backends"}
# Who may import whom among our top-level packages (benchmarks: nothing of the product imports it).
ALLOWED_FIRST_PARTY = {
    "pallas_kernels": {"pallas_kernels"},
    "e2former_jax": {"e2former_jax", "pallas_kernels"},
    "train": {"train", "e2former_jax"},
}
FIRST_PARTY = {*PACKAGES, "benchmarks"}
# The one place of the model that calls the kernels.
DISPATCHER = ROOT / "e2former_jax" / "ops"


def _normalise(name: str) -> str:
  """A distribution name as packaging compares them (PEP 503)."""
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
  """"dependencies" and each extra -> the distribution names it declares."""
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
  return {group: {_normalise(re.match(r"[A-Za-z0-9._-]+", req).group()) for req in reqs}
          for group, reqs in groups.items()}


def _imports(root: Path) -> dict[str, set[Path]]:
  """Top-level module -> the files under ``root`` that import it (absolute imports, any depth,
  function-level ones included)."""
  found: dict[str, set[Path]] = {}
  for path in sorted(root.rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0:
        names = [node.module]
      else:
        continue
      for name in names:
        found.setdefault(name.split(".")[0], set()).add(path.relative_to(ROOT))
  return found


def _third_party(imports: dict[str, set[Path]], local: set[str]) -> dict[str, set[Path]]:
  """Distribution -> importing files, for the modules that are neither stdlib nor ``local``."""
  distributions = metadata.packages_distributions()
  out: dict[str, set[Path]] = {}
  for module, files in imports.items():
    if module in sys.stdlib_module_names or module in local:
      continue
    # An installed module names its distribution; one that is not installed (an extra missing
    # here) is assumed to share its name, as all of ours that differ (yaml, orbax) are core.
    for dist in distributions.get(module, [module]):
      out.setdefault(_normalise(dist), set()).update(files)
  return out


def test_package_dependencies_are_their_imports():
  declared = _declared()
  wanted = set().union(declared["dependencies"], *(declared[e] for e in PACKAGE_EXTRAS))
  imported: dict[str, set[Path]] = {}
  for package in PACKAGES:
    for dist, files in _third_party(_imports(ROOT / package), FIRST_PARTY).items():
      imported.setdefault(dist, set()).update(files)
  undeclared = {dist: sorted(map(str, files)) for dist, files in imported.items()
                if dist not in wanted}
  assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"
  unused = wanted - set(imported) - LOADED_BY_ASE
  assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_tests_import_declared_packages_only():
  declared = set().union(*_declared().values())
  local = FIRST_PARTY | {path.stem for path in (ROOT / "tests").glob("*.py")}
  undeclared = {dist: sorted(map(str, files))
                for dist, files in _third_party(_imports(ROOT / "tests"), local).items()
                if dist not in declared}
  assert not undeclared, f"tests import packages no extra declares: {undeclared}"


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_run_down_the_layers(package):
  allowed = ALLOWED_FIRST_PARTY[package]
  wrong = {module: sorted(map(str, files)) for module, files in _imports(ROOT / package).items()
           if module in FIRST_PARTY and module not in allowed}
  assert not wrong, f"{package} imports {wrong}; it may import only {sorted(allowed)} of ours"


def test_model_reaches_the_kernels_only_through_ops():
  callers = _imports(ROOT / "e2former_jax").get("pallas_kernels", set())
  outside = sorted(str(f) for f in callers if not (ROOT / f).is_relative_to(DISPATCHER))
  assert callers and not outside, f"pallas_kernels imported outside e2former_jax/ops: {outside}"
