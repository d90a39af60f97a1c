"""Shared fixtures (helpers live in e2f_testing.py)."""

from __future__ import annotations

import os

# LLVM optimisation level 0 for the CPU backend: compiles 2-3x faster, and compilation, not
# execution, dominates this suite's time (everything here runs on tiny inputs). Must be set before
# jax creates its backend.
os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0"]))

# The command line keeps XLA's compiled programs in ~/.cache (train.cli.XLA_CACHE_ENV); tests that
# call it must not write there (test_training.py and test_md_command.py give it their own directories).
os.environ["E2FORMER_XLA_CACHE"] = "off"

import jax
import numpy as np
import pytest


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield
