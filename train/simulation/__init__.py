"""Molecular dynamics of a trained model: the library behind ``e2former md``.

``structures.py`` picks the start geometry (a dataset record, a structure file); ``driver.py`` runs
the simulation in JAX MD (:func:`simulate` with :class:`MDSettings`: NVE or NVT, free space or a
periodic box), after relaxing the start on the model's energy surface (``relax.py``); ``trajectory.py`` writes its frames as extended XYZ, ``plot.py`` its energy and
temperature plot; ``watchdog.py`` reports when a run stops being physical. The command line is
``train/md_command.py``.

Example::

  from train.checkpoint import load_predictor
  from train.simulation import MDSettings, read_structure, simulate

  summary = simulate(load_predictor("runs/tiny"), read_structure("ethanol.xyz"),
                     MDSettings(steps=2000), "runs/tiny/md/ethanol")
"""

from train.simulation.driver import SUMMARY_FILENAME, Ensemble, MDSettings, Thermostat, simulate
from train.simulation.plot import PLOT_FILENAME
from train.simulation.relax import relax
from train.simulation.structures import dataset_structure, molecule_key, read_structure
from train.simulation.trajectory import TRAJECTORY_FILENAME
from train.simulation.watchdog import OnUnphysical, Watchdog

__all__ = [
  "PLOT_FILENAME", "SUMMARY_FILENAME", "TRAJECTORY_FILENAME", "Ensemble", "MDSettings", "OnUnphysical",
  "Thermostat", "Watchdog", "dataset_structure", "molecule_key", "read_structure", "relax", "simulate",
]
