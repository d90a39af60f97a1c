"""The energy plot of a simulation: potential, kinetic and total energy and the temperature against
time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

PLOT_FILENAME = "energy.png"


def plot_energies(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
  """Writes the plot of the recorded frames' ``rows`` (``time_fs``, ``potential_energy``,
  ``kinetic_energy``, ``total_energy``, ``temperature_K``, and ``conserved_energy`` for a
  Nose-Hoover run) to ``path``. Energies but the kinetic are relative to the total at t = 0."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  t = np.array([r["time_fs"] for r in rows])
  e0 = rows[0]["total_energy"]
  fig, (ax_e, ax_t) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
  for key, label in (("potential_energy", "potential - E(0)"), ("kinetic_energy", "kinetic"),
                     ("total_energy", "total - E(0)"),
                     ("conserved_energy", "Nose-Hoover conserved - E(0)")):
    if key in rows[0]:
      values = np.array([r[key] for r in rows])
      ax_e.plot(t, values - (e0 if key != "kinetic_energy" else 0.0), label=label)
  ax_e.set_ylabel("energy (eV)")
  ax_e.set_title(f"E(0) = total energy at t = 0 = {e0:.4f} eV", fontsize="small")
  ax_e.legend(fontsize="small")
  ax_t.plot(t, [r["temperature_K"] for r in rows], color="tab:red")
  ax_t.set_ylabel("temperature (K)")
  ax_t.set_xlabel("time (fs)")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
