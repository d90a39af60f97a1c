"""Unit conversions of the dataset readers (CODATA 2018, the values SPICE and OMol25 tools use)."""

from __future__ import annotations

HARTREE_EV = 27.211386245988  # eV per hartree
BOHR_A = 0.529177210903  # angstrom per bohr
HARTREE_PER_BOHR_EV_PER_A = HARTREE_EV / BOHR_A  # (eV/angstrom) per (hartree/bohr)
