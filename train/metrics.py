"""What a run writes for people: metric logs (JSONL + CSV), learning curves (PNG), error tables.

Files in the working directory:

* ``metrics.jsonl``: every record, one JSON object per line, ``{"kind": "train"|"val", "step": ...}``;
* ``metrics_train.csv`` / ``metrics_val.csv``: the same records as tables, one per kind;
* ``learning_curve.png``: training loss and validation energy/force errors against the step;
* ``eval_table.md`` / ``eval_table.json``: final energy (meV/atom) and force (meV/A) MAE per split
  and subset.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

JSONL_FILENAME = "metrics.jsonl"
CURVE_FILENAME = "learning_curve.png"
TABLE_MD_FILENAME = "eval_table.md"
TABLE_JSON_FILENAME = "eval_table.json"
MEV = 1000.0  # meV per eV
ALL_SUBSETS = "all"
# Rows by electronic state, whatever the dataset's subsets: the errors of charged and open-shell
# molecules against those of neutral closed-shell ones (a multiplicity of 0, unspecified, counts as
# closed-shell). Index = :func:`electronic_state` of a molecule.
STATE_ROWS = ("state: neutral closed-shell", "state: charged", "state: neutral open-shell")


def electronic_state(charge: np.ndarray, spin: np.ndarray) -> np.ndarray:
  """Index into ``STATE_ROWS`` of each molecule: charged (any multiplicity), else open-shell when
  the multiplicity 2S+1 is 2 or more, else closed-shell."""
  return np.where(charge != 0, 1, np.where(spin >= 2, 2, 0))


def shown_states(counts: np.ndarray) -> list[int]:
  """The ``STATE_ROWS`` indices a table shows, from the molecule count of each state: the states
  present, or none when only one is (its row would repeat the "all" row)."""
  present = [i for i, count in enumerate(counts) if count > 0]
  return present if len(present) > 1 else []


def csv_filename(kind: str) -> str:
  return f"metrics_{kind}.csv"


class MetricsLog:
  """Appends metric records to the JSONL and per-kind CSV files of a run.

  On resume, records after the restored step (written by the interrupted run after its last
  checkpoint) are dropped first, so the files read as one uninterrupted run.
  """

  def __init__(self, workdir: str | Path, *, resume_step: int | None = None, enabled: bool = True):
    self.workdir = Path(workdir)
    self.enabled = enabled
    # Only the writing process reads the files back: the others would race with its rewrite.
    self._records = [] if resume_step is None or not enabled else [
        r for r in read_records(self.workdir) if r["step"] <= resume_step]
    if enabled:
      self._rewrite()

  @property
  def records(self) -> list[dict[str, Any]]:
    return list(self._records)

  def write(self, kind: str, step: int, values: dict[str, Any]) -> dict[str, Any]:
    record = {"kind": kind, "step": int(step), **{k: _plain(v) for k, v in values.items()}}
    self._records.append(record)
    if self.enabled:
      with (self.workdir / JSONL_FILENAME).open("a") as f:
        f.write(json.dumps(record) + "\n")
      self._write_csv(kind)
    return record

  def _rewrite(self) -> None:
    self.workdir.mkdir(parents=True, exist_ok=True)
    with (self.workdir / JSONL_FILENAME).open("w") as f:
      for record in self._records:
        f.write(json.dumps(record) + "\n")
    for kind in {r["kind"] for r in self._records}:
      self._write_csv(kind)

  def _write_csv(self, kind: str) -> None:
    # Rewritten whole: the column set may grow (e.g. a new subset) and the files are small.
    rows = [r for r in self._records if r["kind"] == kind]
    columns = list(dict.fromkeys(key for r in rows for key in r if key != "kind"))
    with (self.workdir / csv_filename(kind)).open("w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      writer.writeheader()
      writer.writerows({k: v for k, v in r.items() if k != "kind"} for r in rows)


def read_records(workdir: str | Path) -> list[dict[str, Any]]:
  path = Path(workdir) / JSONL_FILENAME
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_learning_curves(records: list[dict[str, Any]], path: str | Path) -> Path:
  """Training loss, and validation energy / force MAE (EMA weights), against the step, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  train = [r for r in records if r["kind"] == "train"]
  val = [r for r in records if r["kind"] == "val"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
  if train:
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="loss", color="k")
    axes[0].plot(steps, [r["energy_loss"] for r in train], label="energy term", alpha=0.7)
    axes[0].plot(steps, [r["force_loss"] for r in train], label="force term", alpha=0.7)
    axes[0].legend()
  axes[0].set(title="training", xlabel="step", yscale="log")
  panels = ((axes[1], ("energy_mae_mev_per_atom",), "validation energy MAE (meV/atom)"),
            (axes[2], ("force_mae_mev_per_a", "direct_force_mae_mev_per_a"),
             "validation force MAE (meV/\u00c5)"))
  for ax, keys, title in panels:
    for key, label in zip(keys, ("-dE/dx", "direct head")):
      points = [(r["step"], r[key]) for r in val if key in r]
      if points:
        ax.plot(*zip(*points), "o-", label=label if len(keys) > 1 else None)
    if not val:
      ax.text(0.5, 0.5, "no validation passes", ha="center", va="center", transform=ax.transAxes)
    ax.set(title=title, xlabel="step", yscale="log")
  if any("direct_force_mae_mev_per_a" in r for r in val):
    axes[2].legend()
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


@dataclasses.dataclass
class ErrorSums:
  """Running sums of evaluation errors for one group of molecules (a split or a subset).

  Attributes:
    molecules: number of molecules.
    atoms: number of atoms.
    energy_abs_per_atom: sum over molecules of |E - E*| / n (eV/atom).
    energy_abs: sum over molecules of |E - E*| (eV).
    force_abs: sum over atoms and Cartesian components of |F - F*| (eV/A), F = -dE/dx.
    force_l2: sum over atoms of |F - F*|_2 (eV/A).
    direct_force_abs, direct_force_l2: the same for the direct force head; None for a model
      without one.
  """

  molecules: float = 0.0
  atoms: float = 0.0
  energy_abs_per_atom: float = 0.0
  energy_abs: float = 0.0
  force_abs: float = 0.0
  force_l2: float = 0.0
  direct_force_abs: float | None = None
  direct_force_l2: float | None = None

  FIELDS = ("molecules", "atoms", "energy_abs_per_atom", "energy_abs", "force_abs", "force_l2",
            "direct_force_abs", "direct_force_l2")

  @classmethod
  def from_array(cls, values: np.ndarray) -> "ErrorSums":
    """From [len(FIELDS)] sums; NaN marks an absent (None) field."""
    return cls(**{f: None if np.isnan(v) else float(v) for f, v in zip(cls.FIELDS, values)})

  def summary(self) -> dict[str, float]:
    """MAEs in meV: energy per atom and per molecule, force (-dE/dx) per component and per atom
    (L2), and the direct head's force MAEs when the model has one."""
    mol, atoms = max(self.molecules, 1.0), max(self.atoms, 1.0)
    summary = {
        "molecules": int(self.molecules),
        "atoms": int(self.atoms),
        "energy_mae_mev_per_atom": MEV * self.energy_abs_per_atom / mol,
        "energy_mae_mev": MEV * self.energy_abs / mol,
        "force_mae_mev_per_a": MEV * self.force_abs / (3.0 * atoms),
        "force_l2mae_mev_per_a": MEV * self.force_l2 / atoms,
    }
    if self.direct_force_abs is not None:
      summary["direct_force_mae_mev_per_a"] = MEV * self.direct_force_abs / (3.0 * atoms)
      summary["direct_force_l2mae_mev_per_a"] = MEV * self.direct_force_l2 / atoms
    return summary


def error_table(results: dict[str, dict[str, ErrorSums]]) -> list[dict[str, Any]]:
  """Rows ``{split, subset, ...summary}``: per split, the "all" row first, then subsets by name,
  then the electronic-state rows in ``STATE_ROWS`` order."""
  rows = []
  for split, groups in results.items():
    for subset in sorted(groups, key=lambda s: (s != ALL_SUBSETS, s in STATE_ROWS,
                                                STATE_ROWS.index(s) if s in STATE_ROWS else 0, s)):
      rows.append({"split": split, "subset": subset, **groups[subset].summary()})
  return rows


def write_error_table(rows: list[dict[str, Any]], workdir: str | Path) -> str:
  """Writes ``eval_table.md`` and ``eval_table.json``; returns the markdown.

  The force column is -dE/dx, the forces the simulation interfaces use; a model with a direct force
  head gets a second, labelled column for the head's forces.
  """
  direct = any("direct_force_mae_mev_per_a" in r for r in rows)
  header = ("| split | subset | molecules | atoms | energy MAE (meV/atom) | force MAE, -dE/dx (meV/\u00c5) |"
            + (" force MAE, direct head (meV/\u00c5) |" if direct else "") + "\n"
            + "|---|---|---:|---:|---:|---:|" + ("---:|" if direct else "") + "\n")
  lines = [f"| {r['split']} | {r['subset']} | {r['molecules']} | {r['atoms']} | "
           f"{r['energy_mae_mev_per_atom']:.2f} | {r['force_mae_mev_per_a']:.1f} |"
           + (f" {r['direct_force_mae_mev_per_a']:.1f} |" if direct else "") for r in rows]
  markdown = header + "\n".join(lines) + "\n"
  workdir = Path(workdir)
  (workdir / TABLE_MD_FILENAME).write_text(markdown)
  (workdir / TABLE_JSON_FILENAME).write_text(json.dumps(rows, indent=2) + "\n")
  return markdown


def _plain(value):
  if isinstance(value, (np.generic, np.ndarray)):
    return value.item() if np.ndim(value) == 0 else value.tolist()
  return value
