"""The code's references to documentation resolve inside the repository.

Comments, docstrings, configs and docs cite the model as built (``docs/model.md §X.Y``), what was
measured (``docs/performance.md §X``) and decisions (``docs/decisions.md Dn``). Each cited section
must exist as a heading of that document; citations of the authors' specification by its old section
numbers, of lab-notebook files (``benchmarks/notes_<topic>.md``) or of documents outside the
repository must not come back, and the product and docs must not point at ``../shared``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCANNED_DIRS = ("e2former_jax", "pallas_kernels", "train", "configs", "tests", "benchmarks", "docs")
SCANNED_SUFFIXES = (".py", ".yaml", ".md")
# Folders a user's clone has that may not mention ../shared (tests may read data from there).
PRODUCT_DIRS = ("e2former_jax", "pallas_kernels", "train", "configs", "docs")

# References that do not resolve inside the repository: the old specification by section number
# (with or without "section", "§" or a hyphen), the lab-notebook diaries, the helper documents
# outside the repository.
STALE_CITATIONS = {
    "the old specification": re.compile(
        r"\bspec(?:ification)?(?:\s+|-|\s*§\s*)(?:sections?\s+)?\d|\bthe spec\b", re.IGNORECASE),
    "a lab-notebook file": re.compile(r"\bnotes_[a-z*]+\.md"),
    "a document outside the repository": re.compile(
        r"\b(?:toolchain|style)\.md\b|e2former_v2_spec"),
}
# A section number after §: "§8", "§8.4", and a range "§8.3–8.5" / "§3.3-3.4" (both ends checked).
SECTION = re.compile(r"§\s?(\d+(?:\.\d+)?)(?:\s?[–-]\s?(\d+(?:\.\d+)?))?")
# The documents whose sections a § refers to; a bare § refers to the one named last in its paragraph.
SECTIONED_DOCS = ("model.md", "performance.md")
DOC_NAME = re.compile(r"\b(model|performance)\.md\b")
# A bare § with no document named before it in its paragraph: the file's own sections (docs/).
DEFAULT_DOC = {"docs/model.md": "model.md", "docs/decisions.md": "model.md",
               "docs/performance.md": "performance.md"}
DECISION_REF = re.compile(r"decisions\.md\)?\s+D(\d+)\b")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)
DECISION_HEADING = re.compile(r"^##\s+D(\d+)\.", re.MULTILINE)


def _scanned_files() -> list[Path]:
  """README.md and the .py/.yaml/.md files of SCANNED_DIRS, except this file (its examples are the
  patterns themselves)."""
  files = [ROOT / "README.md"]
  for folder in SCANNED_DIRS:
    files += [p for p in sorted((ROOT / folder).rglob("*"))
              if p.suffix in SCANNED_SUFFIXES and p.resolve() != Path(__file__).resolve()]
  return files


def _line(text: str, offset: int) -> int:
  return text.count("\n", 0, offset) + 1


def _headings(doc: str) -> set[str]:
  return set(HEADING.findall((DOCS / doc).read_text()))


def section_references(rel: str, text: str) -> list[tuple[int, str, str]]:
  """(line, document, section) of every § in ``text``, the range ends included.

  A § belongs to the document (model.md or performance.md) named last before it in the same
  paragraph (text between blank lines), else to the file's default (docs/ only).
  """
  refs = []
  offset = 0
  for paragraph in re.split(r"\n\s*\n", text):
    start = text.index(paragraph, offset)
    offset = start + len(paragraph)
    names = [(m.start(), m.group(1) + ".md") for m in DOC_NAME.finditer(paragraph)]
    for m in SECTION.finditer(paragraph):
      named = [doc for pos, doc in names if pos < m.start()]
      doc = named[-1] if named else DEFAULT_DOC.get(rel)
      for number in filter(None, m.groups()):
        refs.append((_line(text, start + m.start()), doc, number))
  return refs


def test_section_reference_parser():
  """The parser binds each § to the document named before it and checks both ends of a range."""
  text = ("x (docs/model.md §8.3–8.5, §11; see §2)\n# docs/performance.md §4, §6\n\n"
          "bare §3 (decisions.md D2)\n")
  assert section_references("train/x.py", text) == [
      (1, "model.md", "8.3"), (1, "model.md", "8.5"), (1, "model.md", "11"), (1, "model.md", "2"),
      (2, "performance.md", "4"), (2, "performance.md", "6"), (4, None, "3")]
  assert [doc for _, doc, _ in section_references("docs/decisions.md", "§8.4\n")] == ["model.md"]


def test_headings_are_parsed():
  """The documents have the numbered headings the references are checked against."""
  model = _headings("model.md")
  assert {"1", "2.1", "8.4", "11.3", "12.8"} <= model and "8.9" not in model
  assert {"2", "2.3", "4"} <= _headings("performance.md")


def test_no_stale_citations():
  found = []
  for path in _scanned_files():
    text = path.read_text()
    for what, pattern in STALE_CITATIONS.items():
      for m in pattern.finditer(text):
        found.append(f"{path.relative_to(ROOT)}:{_line(text, m.start())}: {what}: {m.group()!r}")
  assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", PRODUCT_DIRS)
def test_product_does_not_point_at_shared(folder):
  found = []
  for path in sorted((ROOT / folder).rglob("*")):
    if path.suffix in SCANNED_SUFFIXES:
      text = path.read_text()
      found += [f"{path.relative_to(ROOT)}:{_line(text, m.start())}"
                for m in re.finditer("shared/", text)]
  assert not found, found


def test_section_references_resolve():
  headings = {doc: _headings(doc) for doc in SECTIONED_DOCS}
  decisions = set(DECISION_HEADING.findall((DOCS / "decisions.md").read_text()))
  bad = []
  for path in _scanned_files():
    rel = str(path.relative_to(ROOT))
    text = path.read_text()
    for line, doc, number in section_references(rel, text):
      if doc is None:
        bad.append(f"{rel}:{line}: §{number} names no document (docs/model.md or docs/performance.md)")
      elif number not in headings[doc]:
        bad.append(f"{rel}:{line}: docs/{doc} has no section {number}")
    for m in DECISION_REF.finditer(text):
      if m.group(1) not in decisions:
        bad.append(f"{rel}:{_line(text, m.start())}: docs/decisions.md has no D{m.group(1)}")
  assert not bad, "\n".join(bad)
