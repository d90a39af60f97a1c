"""The learning-curve plot of a run without validation passes or training records."""

from __future__ import annotations

import warnings

from train.metrics import plot_learning_curves


def test_plot_without_records_draws_without_warnings(tmp_path):
  train_only = [{"kind": "train", "step": 1, "loss": 1.0, "energy_loss": 0.4, "force_loss": 0.6}]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. matplotlib's "No artists with labels found to put in legend"
    for name, records in (("empty.png", []), ("train_only.png", train_only)):
      assert plot_learning_curves(records, tmp_path / name).stat().st_size > 10_000
