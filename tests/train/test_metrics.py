"""The learning-curve plot of a run without validation passes or training records; the
electronic-state rows of the error tables."""

from __future__ import annotations

import warnings

import numpy as np

from train.metrics import STATE_ROWS, ErrorSums, electronic_state, error_table, plot_learning_curves, shown_states


def test_plot_without_records_draws_without_warnings(tmp_path):
  train_only = [{"kind": "train", "step": 1, "loss": 1.0, "energy_loss": 0.4, "force_loss": 0.6}]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found to put in legend"
    for name, records in (("empty.png", []), ("train_only.png", train_only)):
      assert plot_learning_curves(records, tmp_path / name).stat().st_size > 10_000


def test_electronic_state_of_molecules():
  charge = np.array([0, 0, 0, 1, -1, -2, 0])
  spin = np.array([1, 0, 2, 1, 2, 1, 3])  # multiplicity 2S+1; 0 = unspecified
  states = [STATE_ROWS[i] for i in electronic_state(charge, spin)]
  closed, charged, open_shell = STATE_ROWS
  assert states == [closed, closed, open_shell, charged, charged, charged, open_shell]


def test_error_table_orders_all_then_subsets_then_states():
  row = ErrorSums.from_array(np.ones(len(ErrorSums.FIELDS)))
  groups = {name: row for name in ("zeta", STATE_ROWS[2], "all", STATE_ROWS[0], "alpha", STATE_ROWS[1])}
  assert [r["subset"] for r in error_table({"test": groups})] == ["all", "alpha", "zeta", *STATE_ROWS]


def test_a_single_state_gets_no_rows():
  assert shown_states(np.array([5, 0, 0])) == []
  assert shown_states(np.array([0, 3, 0])) == []
  assert shown_states(np.array([5, 0, 2])) == [0, 2]
  assert shown_states(np.array([1, 1, 1])) == [0, 1, 2]
